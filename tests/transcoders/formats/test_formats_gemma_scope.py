"""Gemma Scope transcoders (params.npz): read against the JumpReLU formula, sets, writing, no pickles."""

import numpy as np
import pytest
import torch

from tccli.errors import TcError
from tccli.transcoders.formats import gemma_scope, load_transcoder_set

D, M = 8, 16


def write_params(folder, seed=0):
    """params.npz laid out as google/gemma-scope-2b-pt-transcoders publishes it: W_enc [d, m]."""
    generator = np.random.default_rng(seed)
    arrays = {
        "W_enc": generator.standard_normal((D, M)),
        "W_dec": generator.standard_normal((M, D)),
        "b_enc": generator.standard_normal(M),
        "b_dec": generator.standard_normal(D),
        "threshold": generator.random(M),
    }
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "params.npz", **arrays)
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def test_read_one_and_a_set(tmp_path):
    tensors = {
        layer: write_params(tmp_path / f"layer_{layer}" / "width_16k" / "average_l0_76", layer) for layer in (0, 1)
    }
    one = gemma_scope.read(tmp_path / "layer_1" / "width_16k" / "average_l0_76" / "params.npz")
    config = one.config
    assert (config.layer, config.activation, config.input_space, config.output_space) == (
        1,
        "jumprelu",
        "normalized",
        "mlp_out",
    )
    assert config.source == {
        "format": "gemma-scope",
        "path": str(tmp_path / "layer_1" / "width_16k" / "average_l0_76" / "params.npz"),
        "variant": "width_16k/average_l0_76",
    }
    x = torch.randn(12, D)
    t = tensors[1]
    pre = x @ t["W_enc"] + t["b_enc"]
    with torch.no_grad():
        y, z = one(x)
    assert torch.equal(z, pre * (pre > t["threshold"])) and torch.allclose(y, z @ t["W_dec"] + t["b_dec"], atol=1e-5)
    assert sorted(load_transcoder_set(tmp_path)) == [0, 1]
    write_params(tmp_path / "layer_1" / "width_16k" / "average_l0_20", 5)
    with pytest.raises(TcError, match="2 Gemma Scope transcoders for layer 1"):
        load_transcoder_set(tmp_path)


def test_write_round_trip_and_refusals(tmp_path):
    write_params(tmp_path / "layer_3" / "w", 3)
    original = gemma_scope.read(tmp_path / "layer_3" / "w")
    gemma_scope.write(original, tmp_path / "out" / "layer_3")
    again = gemma_scope.read(tmp_path / "out" / "layer_3")
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        assert torch.equal(getattr(again, name), getattr(original, name))
    original.config.skip = True
    with pytest.raises(TcError, match="without a skip"):
        gemma_scope.check(original, "here")


def test_pickled_npz_is_refused(tmp_path):
    folder = tmp_path / "layer_0"
    folder.mkdir()
    np.savez(folder / "params.npz", W_enc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(TcError, match="cannot read"):
        gemma_scope.read(folder)
