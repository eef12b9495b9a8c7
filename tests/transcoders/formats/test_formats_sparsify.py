"""sparsify sparse coders (EleutherAI): read against sparsify's own formula, written and read back."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tccli.errors import TcError
from tccli.transcoders.formats import sparsify

D, M, K = 8, 32, 4


def sparsify_folder(folder, transcode=True, skip=True, seed=0, activation="topk"):
    """A layers.N.mlp folder laid out as SparseCoder.save_to_disk writes it."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "encoder.weight": torch.randn(M, D, generator=generator),
        "encoder.bias": torch.randn(M, generator=generator),
        "W_dec": torch.randn(M, D, generator=generator),
        "b_dec": torch.randn(D, generator=generator),
    }
    if skip:
        tensors["W_skip"] = torch.randn(D, D, generator=generator)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "sae.safetensors"))
    cfg = {
        "activation": activation,
        "expansion_factor": 4,
        "normalize_decoder": True,
        "num_latents": M,
        "k": K,
        "multi_topk": False,
        "skip_connection": skip,
        "transcode": transcode,
        "d_in": D,
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return tensors


def sparsify_formula(tensors, x, transcode=True):
    """SparseCoder.forward (sparsify/sparse_coder.py, fused_encoder.py) written out."""
    source = x if transcode else x - tensors["b_dec"]
    pre = torch.relu(source @ tensors["encoder.weight"].T + tensors["encoder.bias"])
    values, indices = pre.topk(K, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, indices, values)
    y = z @ tensors["W_dec"] + tensors["b_dec"]
    if "W_skip" in tensors:
        y = y + x @ tensors["W_skip"].mT
    return y, z


@pytest.mark.parametrize("skip", [True, False])
def test_sparsify_transcoder_is_read_exactly(tmp_path, skip):
    tensors = sparsify_folder(tmp_path / "layers.3.mlp", skip=skip)
    transcoder = sparsify.read(tmp_path / "layers.3.mlp")
    config = transcoder.config
    assert (config.kind, config.activation, config.k, config.layer, config.skip) == ("transcoder", "topk", K, 3, skip)
    assert (config.input_space, config.output_space) == ("mlp_input", "mlp_output")
    x = torch.randn(40, D)
    y, z = sparsify_formula(tensors, x)
    with torch.no_grad():
        y_tc, z_tc = transcoder(x)
    assert torch.allclose(z_tc, z, atol=1e-5) and torch.allclose(y_tc, y, atol=1e-4)
    sparsify.write(transcoder, tmp_path / "out" / "layers.3.mlp")
    written = load_file(str(tmp_path / "out" / "layers.3.mlp" / "sae.safetensors"))
    assert torch.allclose(sparsify_formula(written, x)[0], y, atol=1e-4)
    again = sparsify.read(tmp_path / "out" / "layers.3.mlp")
    with torch.no_grad():
        assert torch.allclose(again(x)[0], y, atol=1e-4)


def test_sparsify_sae_on_the_mlp_output(tmp_path):
    tensors = sparsify_folder(tmp_path / "h.1.mlp", transcode=False, skip=False)
    sae = sparsify.read(tmp_path / "h.1.mlp")
    assert sae.config.kind == "sae" and sae.config.input_space == sae.config.output_space == "mlp_output"
    x = torch.randn(10, D)
    with torch.no_grad():
        assert torch.allclose(sae(x)[0], sparsify_formula(tensors, x, transcode=False)[0], atol=1e-4)


def test_sparsify_refusals(tmp_path):
    sparsify_folder(tmp_path / "layers.2", seed=1)
    with pytest.raises(TcError, match="not an MLP module"):
        sparsify.read(tmp_path / "layers.2")
    sparsify_folder(tmp_path / "layers.2.mlp", activation="groupmax")
    with pytest.raises(TcError, match="groupmax"):
        sparsify.read(tmp_path / "layers.2.mlp")
