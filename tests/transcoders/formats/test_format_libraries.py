"""Every format tc writes, read back by the library that defines it, where that library installs from PyPI:
SAELens (``sae-lens``), sparsify (``eai-sparsify``) and circuit-tracer (``circuit-tracer``, which also reads
Gemma Scope's params.npz). Each is an optional test dependency: its tests skip, saying so, when it is absent.
Peek is not on PyPI (tests/transcoders/formats/test_formats_peek.py checks its formula by hand).

Slow tier: importing these libraries takes tens of seconds, and some pin other versions of TransformerLens or
transformers than tc's, so they are best installed in a separate environment that reuses tc's (as
docs/pending/issue-24.md describes).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from format_helpers import D, M, random_transcoder
from tccli.transcoders.formats import circuit_tracer, gemma_scope, saelens, sparsify
from tccli.transcoders.transcoder import Transcoder

pytestmark = pytest.mark.slow


def variant(transcoder: Transcoder, seed: int = 1, **changes) -> Transcoder:
    """The same weights under another config (thresholds and W_skip random where the new kind has them)."""
    out = Transcoder(dataclasses.replace(transcoder.config, **changes))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in transcoder.tensor_names():
            if name in out.tensor_names():
                getattr(out, name).copy_(getattr(transcoder, name))
        if out.threshold is not None:  # batchtopk: one threshold, in every entry
            threshold = torch.rand(out.threshold.shape, generator=generator)
            out.threshold.copy_(
                threshold if out.config.activation == "jumprelu" else threshold[:1].expand_as(threshold)
            )
        if out.W_skip is not None:
            out.W_skip.copy_(torch.randn(out.W_skip.shape, generator=generator) / D**0.5)
    return out


def inputs(seed: int = 7) -> torch.Tensor:
    return torch.randn(64, D, generator=torch.Generator().manual_seed(seed))


def tc_output(transcoder: Transcoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return transcoder(x)


# ----------------------------------------------------------------------------- SAELens


SAELENS_KINDS = {
    "transcoder": dict(activation="relu"),
    "skip_transcoder": dict(activation="relu", skip=True),
    "jumprelu_transcoder": dict(activation="jumprelu"),
    "jumprelu_skip_transcoder": dict(activation="jumprelu", skip=True),
    "batchtopk as jumprelu_transcoder": dict(activation="batchtopk", k=4),
    "standard SAE": dict(kind="sae", activation="relu"),
    "topk SAE": dict(kind="sae", activation="topk", k=5),
}


@pytest.mark.parametrize("kind", list(SAELENS_KINDS))
def test_saelens_reads_what_tc_writes(tmp_path, kind):
    sae_lens = pytest.importorskip("sae_lens", reason="SAELens is not installed (pip install sae-lens)")
    changes = SAELENS_KINDS[kind]
    if changes.get("kind") == "sae":
        changes = {**changes, "input_space": "mlp_out"}
    transcoder = variant(random_transcoder(kind=changes.get("kind", "transcoder")), **changes)
    folder = saelens.write(transcoder, tmp_path / "saelens")
    loaded = sae_lens.SAE.load_from_disk(folder, device="cpu")
    x = inputs()
    y, z = tc_output(transcoder, x)
    with torch.no_grad():
        assert torch.allclose(loaded.encode(x), z, rtol=1e-5, atol=1e-5), kind
        assert torch.allclose(loaded(x), y, rtol=1e-5, atol=1e-4), kind


def test_saelens_sae_with_its_own_input_bias(tmp_path):
    """An SAE whose b_pre is its b_dec is written with apply_b_dec_to_input: SAELens subtracts it itself."""
    sae_lens = pytest.importorskip("sae_lens", reason="SAELens is not installed (pip install sae-lens)")
    transcoder = variant(random_transcoder(kind="sae"), input_space="mlp_out")
    with torch.no_grad():
        transcoder.b_pre.copy_(transcoder.b_dec)
    loaded = sae_lens.SAE.load_from_disk(saelens.write(transcoder, tmp_path / "saelens"), device="cpu")
    assert loaded.cfg.apply_b_dec_to_input
    x = inputs()
    with torch.no_grad():
        assert torch.allclose(loaded(x), tc_output(transcoder, x)[0], rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- sparsify


@pytest.mark.parametrize("kind, skip", [("transcoder", False), ("transcoder", True), ("sae", False)])
def test_sparsify_reads_what_tc_writes(tmp_path, kind, skip):
    sparse_coder = pytest.importorskip("sparsify", reason="sparsify is not installed (pip install eai-sparsify)")
    space = "mlp_output"
    transcoder = variant(
        random_transcoder(kind=kind),
        activation="topk",
        k=5,
        skip=skip,
        input_space="mlp_input" if kind == "transcoder" else space,
        output_space=space,
    )
    if kind == "sae":
        with torch.no_grad():
            transcoder.b_pre.copy_(transcoder.b_dec)  # sparsify's SAEs subtract b_dec from their input
    folder = sparsify.write(transcoder, tmp_path / "layers.1.mlp")
    coder = sparse_coder.SparseCoder.load_from_disk(folder, device="cpu")
    x = inputs()
    y, z = tc_output(transcoder, x)
    with torch.no_grad():
        out = coder(x)
    dense = torch.zeros(x.shape[0], M).scatter(-1, out.latent_indices, out.latent_acts)
    assert torch.allclose(dense, z, rtol=1e-5, atol=1e-5)
    assert torch.allclose(out.sae_out, y, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- circuit-tracer and Gemma Scope


@pytest.mark.parametrize("activation, skip", [("relu", False), ("jumprelu", True), ("batchtopk", False)])
def test_circuit_tracer_reads_the_sets_tc_writes(tmp_path, activation, skip):
    """circuit-tracer's own loader (load_transcoders, on the config.yaml tc convert writes, as it reads a set
    from the hub) gives the same features and outputs. Not TopK sets: circuit-tracer 0.5.0 reads no
    ``activation`` from config.yaml, so it would run them as ReLU."""
    pytest.importorskip("circuit_tracer", reason="circuit-tracer is not installed (pip install circuit-tracer)")
    import yaml
    from circuit_tracer.utils.hf_utils import load_transcoders

    transcoders = {
        layer: variant(random_transcoder(layer=layer, seed=layer), seed=layer, activation=activation, skip=skip, k=4)
        for layer in range(2)
    }
    folder = tmp_path / "set"
    circuit_tracer.write_set(transcoders, folder)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    # the files listed as a hub config lists them (the layout circuit-tracer reads without a download)
    config.update(transcoders=[str(folder / f"layer_{layer}.safetensors") for layer in transcoders], scan="tc")
    theirs = load_transcoders(config, torch.device("cpu"), torch.float32, lazy_encoder=False, lazy_decoder=False)
    x = inputs()
    for layer, transcoder in transcoders.items():
        y, z = tc_output(transcoder, x)
        with torch.no_grad():
            features = theirs.encode_layer(x, layer)
            output = theirs[layer](x)
        assert torch.allclose(features, z, rtol=1e-5, atol=1e-5), layer
        assert torch.allclose(output, y, rtol=1e-5, atol=1e-4), layer


def test_circuit_tracer_reads_the_gemma_scope_files_tc_writes(tmp_path):
    """circuit-tracer's Gemma Scope loader (a local params.npz) on what tc convert --to gemma-scope writes."""
    pytest.importorskip("circuit_tracer", reason="circuit-tracer is not installed (pip install circuit-tracer)")
    from circuit_tracer.transcoder.single_layer_transcoder import load_gemma_scope_transcoder

    transcoder = variant(random_transcoder(layer=3), activation="jumprelu")
    folder = gemma_scope.write(transcoder, tmp_path / "layer_3")
    theirs = load_gemma_scope_transcoder(str(folder / "params.npz"), 3, device=torch.device("cpu"))
    x = inputs()
    y, z = tc_output(transcoder, x)
    with torch.no_grad():
        features = theirs.encode(x)
        assert torch.allclose(features, z, rtol=1e-5, atol=1e-5)
        assert torch.allclose(theirs.decode(features), y, rtol=1e-5, atol=1e-4)
