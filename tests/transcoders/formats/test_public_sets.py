"""The issue's bar, end to end as users run it: tc eval and tc circuit on a tiny Gemma-2 with a JumpReLU
skip-transcoder set in circuit-tracer's layout (reading resid_mid, writing mlp_out after the post-norm), and
on a tiny Llama with a sparsify TopK skip-transcoder set (mlp_input -> mlp_output), and on a tiny Qwen3
with a circuit-tracer set in its Qwen3 layout (mlp.hook_in -> mlp.hook_out); the exactness identity
holds to 1e-5 relative in float32."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from conftest import run_tc
from tccli.model.loading import load_model
from tccli.replacement import attribution
from tccli.replacement.prompts import freeze_prompt
from tccli.replacement.targets import feature_target, unembed_target
from tccli.transcoders.files import check_matches_model
from tccli.transcoders.formats import load_transcoder_set

N_FEATURES = 64
PROMPT_IDS = [0, 37, 90, 151, 12, 200, 64, 7, 99]


def circuit_tracer_set(
    folder,
    d_model: int,
    n_layers: int = 2,
    model_name: str = "google/gemma-2-2b",
    input_hook: str = "hook_resid_mid",
    output_hook: str = "hook_mlp_out",
):
    """JumpReLU skip transcoders as circuit-tracer publishes them: W_enc [m, d], W_skip [d_out, d_in]; its
    Gemma-2 sets read hook_resid_mid and write hook_mlp_out (after the post-MLP norm), its Qwen3 sets read
    mlp.hook_in and write mlp.hook_out."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(11)
    for layer in range(n_layers):
        tensors = {
            "W_enc": torch.randn(N_FEATURES, d_model, generator=generator) / d_model**0.5,
            "W_dec": torch.randn(N_FEATURES, d_model, generator=generator) / d_model**0.5,
            "b_enc": torch.randn(N_FEATURES, generator=generator) * 0.1,
            "b_dec": torch.randn(d_model, generator=generator) * 0.1,
            "activation_function.threshold": torch.rand(N_FEATURES, generator=generator),
            "W_skip": torch.randn(d_model, d_model, generator=generator) / d_model**0.5,
        }
        save_file(tensors, str(folder / f"layer_{layer}.safetensors"))
    config = {
        "model_name": model_name,
        "model_kind": "transcoder_set",
        "feature_input_hook": input_hook,
        "feature_output_hook": output_hook,
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def sparsify_llama_set(folder, d_model: int, n_layers: int = 2, k: int = 8):
    """TopK skip transcoders as sparsify saves them: layers.N.mlp/{cfg.json, sae.safetensors}."""
    generator = torch.Generator().manual_seed(12)
    for layer in range(n_layers):
        member = folder / f"layers.{layer}.mlp"
        member.mkdir(parents=True)
        tensors = {
            "encoder.weight": torch.randn(N_FEATURES, d_model, generator=generator) / d_model**0.5,
            "encoder.bias": torch.randn(N_FEATURES, generator=generator) * 0.1,
            "W_dec": torch.randn(N_FEATURES, d_model, generator=generator) / d_model**0.5,
            "b_dec": torch.randn(d_model, generator=generator) * 0.1,
            "W_skip": torch.randn(d_model, d_model, generator=generator) / d_model**0.5,
        }
        save_file(tensors, str(member / "sae.safetensors"))
        cfg = {
            "activation": "topk",
            "expansion_factor": N_FEATURES // d_model,
            "normalize_decoder": True,
            "num_latents": N_FEATURES,
            "k": k,
            "multi_topk": False,
            "skip_connection": True,
            "transcode": True,
            "d_in": d_model,
        }
        (member / "cfg.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def public_sets(modern_model_dirs, tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("public_sets")
    return {
        "gemma2": (modern_model_dirs["gemma2"], circuit_tracer_set(root / "gemma_ct", 32)),
        "llama": (tiny_model_dirs["llama"], sparsify_llama_set(root / "llama_sparsify", 32)),
        "qwen3": (
            modern_model_dirs["qwen3"],
            circuit_tracer_set(root / "qwen3_ct", 32, 2, "Qwen/Qwen3-0.6B", "mlp.hook_in", "mlp.hook_out"),
        ),
    }


EXPECTED = {
    "gemma2": ("circuit-tracer", "resid_mid", "mlp_out", "jumprelu"),
    "llama": ("sparsify", "mlp_input", "mlp_output", "topk"),
    "qwen3": ("circuit-tracer", "mlp_input", "mlp_output", "jumprelu"),
}


@pytest.mark.parametrize("arch", ["gemma2", "llama", "qwen3"])
def test_identity_holds_to_1e5_in_float32(public_sets, arch):
    model_dir, set_dir = public_sets[arch]
    loaded = load_model(str(model_dir), "cpu", "float32")
    transcoders = load_transcoder_set(set_dir)
    fmt, input_space, output_space, activation = EXPECTED[arch]
    for transcoder in transcoders.values():
        check_matches_model(transcoder, loaded.info)
        config = transcoder.config
        assert (config.source["format"], config.input_space, config.output_space, config.activation, config.skip) == (
            fmt,
            input_space,
            output_space,
            activation,
            True,
        )
    frozen = freeze_prompt(loaded, transcoders, torch.tensor(PROMPT_IDS))
    last = frozen.n_layers - 1
    # the largest feature, the top logit (pre-soft-cap for Gemma-2) and its gap to the bottom logit: values
    # well away from 0 (a value near 0 from cancelling terms is exact only relative to the terms' size)
    logits = frozen.final_normalized[8] @ frozen.W_U + frozen.b_U
    first, last_token = int(logits.argmax()), int(logits.argmin())
    targets = [
        feature_target(frozen, last, int(frozen.layers[last].pre[8].argmax()), 8),
        unembed_target(frozen, first, None, 8),
        unembed_target(frozen, first, last_token, 8),
    ]
    for target in targets:
        direct = attribution.direct_contributions(frozen, target.vector, target.position, target.read_point)
        total = float(direct.total()) + target.constant
        # relative to the value itself, and to the summed magnitude of the terms (the suite's measure)
        magnitude = sum(
            float(t.abs().sum())
            for group in (direct.features, direct.heads, direct.skips, direct.errors)
            for t in group.values()
        )
        assert abs(total - target.value) <= 1e-5 * abs(target.value), (target.description, total, target.value)
        assert abs(total - target.value) <= 1e-6 * magnitude, (target.description, total, target.value, magnitude)
        assert direct.skips and all(abs(float(v)) > 0 for v in direct.skips.values())


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gemma2", "llama", "qwen3"])
def test_eval_and_circuit_end_to_end(public_sets, arch, text_file, tmp_path):
    model_dir, set_dir = public_sets[arch]
    result = run_tc(
        "eval",
        "--model",
        str(model_dir),
        "--transcoders",
        str(set_dir),
        "--data",
        str(text_file),
        "--tokens",
        "1024",
        "--context",
        "32",
        "--device",
        "cpu",
        "--json",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [row["layer"] for row in report["layers"]] == [0, 1] and report["all_layers"]["layers"] == [0, 1]
    for row in report["layers"]:
        assert row["fvu"] > 0 and row["l0"] > 0 and row["ce_spliced"] > 0
    out = tmp_path / "graph.json"
    result = run_tc(
        "circuit",
        "--model",
        str(model_dir),
        "--transcoders",
        str(set_dir),
        "--device",
        "cpu",
        "--prompt",
        "The cat sat on the mat",
        "--logit",
        " the",
        "--format",
        "json",
        "--out",
        str(out),
        "--iters",
        "2",
        "--branches",
        "6",
        "--both-signs",
    )
    assert result.returncode == 0, result.stderr
    graph = json.loads(out.read_text())
    meta = graph["graph"]["metadata"]
    assert meta["transcoder_spaces"]["0"] == {
        "input": EXPECTED[arch][1],
        "output": EXPECTED[arch][2],
        "skip": True,
        "activation": EXPECTED[arch][3],
    }
    assert meta["final_logit_softcap"] == (30.0 if arch == "gemma2" else None)
    kinds = {node["kind"] for node in graph["nodes"]}
    assert "target" in kinds and kinds & {"feature", "skip"} and len(graph["nodes"]) > 3
    info = run_tc("info", str(set_dir))
    assert info.returncode == 0 and f"from {EXPECTED[arch][0]}" in info.stdout


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gemma2", "qwen3"])
def test_cache_and_score_on_gemma2_and_qwen3(modern_model_dirs, text_file, tmp_path, arch):
    """tc cache (native engine) and tc score run on the new architectures; score reads a resid_mid set."""
    import h5py

    model = str(modern_model_dirs[arch])
    result = run_tc(
        "cache",
        "--model",
        model,
        "--data",
        str(text_file),
        "--tokens",
        "512",
        "--context",
        "32",
        "--out",
        str(tmp_path / "c.h5"),
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    with h5py.File(tmp_path / "c.h5") as f:
        assert f.attrs["engine"] == "native" and f["layers/1/mlp_out"].shape == (512, 32)
    set_dir = circuit_tracer_set(tmp_path / "set", 32)
    result = run_tc(
        "score",
        "--model",
        model,
        "--transcoders",
        str(set_dir),
        "--data",
        str(text_file),
        "--tokens",
        "256",
        "--context",
        "32",
        "--top",
        "3",
        "--out",
        str(tmp_path / "f.h5"),
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
