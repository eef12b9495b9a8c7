"""A transcoder set's id (tccli.transcoders.set_id), the scan graph and feature files name it by: the hub
id as circuit-tracer spells it, a circuit-tracer config's scan, else a hash of the set that follows the
weights, not the folder."""

from __future__ import annotations

import re

import pytest
import torch

from tccli.config.transcoders import TranscoderConfig
from tccli.transcoders.files import save_transcoder
from tccli.transcoders.formats import load_transcoder_set
from tccli.transcoders.set_id import transcoder_set_id
from tccli.transcoders.transcoder import Transcoder


def random_set(n_layers: int = 3, n_features: int = 100, seed: int = 0) -> dict[int, Transcoder]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(n_layers):
        transcoder = Transcoder(TranscoderConfig(d_in=8, d_out=8, n_features=n_features, layer=layer))
        with torch.no_grad():
            for param in transcoder.parameters():
                param.copy_(torch.randn(param.shape, generator=generator))
        out[layer] = transcoder
    return out


def saved(transcoders: dict[int, Transcoder], folder) -> str:
    for layer, transcoder in transcoders.items():
        save_transcoder(transcoder, folder / f"layer_{layer}")
    return str(folder)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("mntss/transcoder-Llama-3.2-1B", "mntss/transcoder-Llama-3.2-1B"),
        ("hf://mntss/transcoder-Llama-3.2-1B", "mntss/transcoder-Llama-3.2-1B"),
        ("mwhanna/gemma-scope-transcoders@abc123", "mwhanna/gemma-scope-transcoders@abc123"),
        ("org/repo/width_16k/l0_small@main", "org/repo//width_16k/l0_small@main"),
    ],
)
def test_a_hub_set_is_named_as_circuit_tracer_names_it(spec, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing of that name on disk
    assert transcoder_set_id(spec, {}) == expected


@pytest.mark.parametrize("key", ["scan_name", "scan"])
def test_a_circuit_tracer_config_names_its_scan(tmp_path, key):
    (tmp_path / "config.yaml").write_text(
        f"model_name: m\nfeature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n{key}: my-scan\n"
    )
    assert transcoder_set_id(str(tmp_path), random_set()) == "my-scan"


def test_other_sets_get_a_hash_of_their_weights(tmp_path):
    transcoders = random_set()
    first = transcoder_set_id(saved(transcoders, tmp_path / "a"), load_transcoder_set(tmp_path / "a"))
    assert re.fullmatch(r"tc-[0-9a-f]{16}", first)
    # the same set in another folder, named another way, in memory: the same id
    moved = tmp_path / "elsewhere" / "b"
    moved.parent.mkdir()
    assert transcoder_set_id(saved(transcoders, moved), load_transcoder_set(moved)) == first
    assert transcoder_set_id("./whatever", transcoders) == first
    # another set, a changed weight or a subset of the layers: another id
    assert transcoder_set_id("x", random_set(seed=1)) != first
    for change in (lambda t: t[1].b_enc, lambda t: t[2].W_dec[0], lambda t: t[0].W_enc[:, 99]):
        changed = random_set()
        with torch.no_grad():
            change(changed).add_(1e-3)
        assert transcoder_set_id("x", changed) != first
    assert transcoder_set_id("x", {0: transcoders[0], 1: transcoders[1]}) != first
