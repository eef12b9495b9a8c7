"""Spaces: the maps of docs/method.md section 8 by hand, and every space the model layer produces checked against
the plain HuggingFace model's own modules on all six tiny architectures."""

from __future__ import annotations

import warnings

import pytest
import torch

from tccli.model.loading import load_model, run_capture, space_activation
from tccli.model.spaces import (
    LayerSpaces,
    NormMap,
    input_map,
    output_map,
    post_norm,
    transcoder_input,
    written_to_residual,
)

# ----------------------------------------------------------------------------- maps by hand


def test_norm_map_by_hand_and_adjoint():
    y = torch.tensor([[3.0, 1.0, 2.0]], dtype=torch.float64)
    v = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    weight = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    scale = torch.tensor([2.0], dtype=torch.float64)
    both = NormMap(scale=scale, weight=weight, centred=True)
    # centre [3,1,2] -> [1,-1,0]; / 2 -> [.5,-.5,0]; * weight -> [1,-.5,0]
    assert both.push(y).tolist() == [[1.0, -0.5, 0.0]]
    # pull: v * weight = [2,0,-.5]; centre (mean .5) -> [1.5,-.5,-1]; / 2
    assert both.pull(v).tolist() == [[0.75, -0.25, -0.5]]
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        a, b = (
            torch.randn(4, 3, generator=generator, dtype=torch.float64),
            torch.randn(4, 3, generator=generator, dtype=torch.float64),
        )
        positions = torch.tensor([0, 0, 0, 0])
        assert torch.allclose((a * both.push(b, positions)).sum(-1), (both.pull(a, positions) * b).sum(-1))
    assert NormMap().identity and NormMap().push(y).equal(y)


def test_input_map_reproduces_each_space():
    """x = map.push(r) + constant = transcoder_input(...) for each input space of a LayerNorm layer, from a
    residual with a mean (a replaced MLP's output may have one): every space reads it centred, resid_mid too."""
    generator = torch.Generator().manual_seed(1)
    r = torch.randn(5, 4, generator=generator, dtype=torch.float64) + 3.0
    r_c = r - r.mean(-1, keepdim=True)
    scale = (r_c.pow(2).mean(-1) + 1e-5).sqrt()
    spaces = LayerSpaces(
        layernorm=True,
        norm_weight=torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64),
        norm_bias=torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64),
    )
    normalized = r_c / scale.unsqueeze(-1)
    expected = {
        "resid_mid": r_c,
        "normalized": normalized,
        "mlp_input": normalized * spaces.norm_weight + spaces.norm_bias,
    }
    for space, x in expected.items():
        read, constant = input_map(space, spaces, scale)
        got = read.push(r) + (0 if constant is None else constant)
        assert torch.allclose(got, x, atol=1e-12), space
        assert torch.allclose(transcoder_input(space, normalized, r, spaces), x, atol=1e-12), space
    rms = LayerSpaces(layernorm=False)  # RMSNorm does not centre: resid_mid is the residual itself
    assert input_map("resid_mid", rms, scale)[0].identity and transcoder_input("resid_mid", None, r, rms).equal(r)


def test_output_map_and_written_to_residual_agree():
    """Frozen at the output's own scale, the output map is what the model does with the output."""
    generator = torch.Generator().manual_seed(2)
    y = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    gemma = LayerSpaces(
        layernorm=False, post_weight=torch.tensor([1.5, 0.5, 1.0, 2.0], dtype=torch.float64), post_eps=1e-6
    )
    scale = (y.pow(2).mean(-1) + 1e-6).sqrt()
    assert torch.allclose(output_map("mlp_output", gemma, scale).push(y), written_to_residual("mlp_output", y, gemma))
    assert torch.allclose(post_norm(y, gemma.post_weight, 1e-6), gemma.post_weight * y / scale.unsqueeze(-1))
    layernorm = LayerSpaces(layernorm=True)
    assert torch.allclose(output_map("mlp_output", layernorm, None).push(y), y - y.mean(-1, keepdim=True))
    assert output_map("mlp_out", gemma, scale).identity


# ----------------------------------------------------------------------------- against the plain model

# architecture -> (norm in front of the MLP, the MLP, the module whose output enters the residual)
PLAIN_MODULES = {
    "GPT2LMHeadModel": ("transformer.h.{}.ln_2", "transformer.h.{}.mlp", "transformer.h.{}.mlp"),
    "GPTNeoXForCausalLM": (
        "gpt_neox.layers.{}.post_attention_layernorm",
        "gpt_neox.layers.{}.mlp",
        "gpt_neox.layers.{}.mlp",
    ),
    "LlamaForCausalLM": ("model.layers.{}.post_attention_layernorm", "model.layers.{}.mlp", "model.layers.{}.mlp"),
    "Qwen3ForCausalLM": ("model.layers.{}.post_attention_layernorm", "model.layers.{}.mlp", "model.layers.{}.mlp"),
    "Gemma2ForCausalLM": (
        "model.layers.{}.pre_feedforward_layernorm",
        "model.layers.{}.mlp",
        "model.layers.{}.post_feedforward_layernorm",
    ),
    "Gemma3ForCausalLM": (
        "model.layers.{}.pre_feedforward_layernorm",
        "model.layers.{}.mlp",
        "model.layers.{}.post_feedforward_layernorm",
    ),
}


def plain_activations(path, architecture: str, tokens: torch.Tensor, layer: int) -> dict:
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    norm, mlp, written = (name.format(layer) for name in PLAIN_MODULES[architecture])
    seen = {}
    model.get_submodule(norm).register_forward_pre_hook(lambda m, args: seen.__setitem__("norm_in", args[0]))
    model.get_submodule(mlp).register_forward_pre_hook(lambda m, args: seen.__setitem__("mlp_in", args[0]))
    model.get_submodule(mlp).register_forward_hook(lambda m, args, out: seen.__setitem__("mlp_out", out))
    model.get_submodule(written).register_forward_hook(lambda m, args, out: seen.__setitem__("written", out))
    with torch.no_grad():
        model(input_ids=tokens)
    return seen


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama", "gemma2", "qwen3", "gemma3"])
def test_every_space_is_the_plain_models_activation(all_model_dirs, arch):
    loaded = load_model(str(all_model_dirs[arch]), "cpu")
    info = loaded.info
    tokens = torch.tensor([[info.bos_token_id, 37, 90, 151, 12, 200, 64, 7, 99]])
    layer = 1
    names = [name for space in ("normalized", "mlp_input", "resid_mid") for name in info.input_hooks(layer, space)]
    names += [name for space in ("mlp_out", "mlp_output") for name in info.output_hooks(layer, space)]
    captured = run_capture(loaded, tokens, names)
    plain = plain_activations(all_model_dirs[arch], info.architecture, tokens, layer)
    layernorm = info.normalization == "layernorm"
    residual = plain["norm_in"] - plain["norm_in"].mean(-1, keepdim=True) if layernorm else plain["norm_in"]
    expected = {
        "mlp_input": plain["mlp_in"],  # what the MLP module reads
        "resid_mid": residual,  # compatibility mode's residual: centred for LayerNorm models
        "normalized": residual / (residual.pow(2).mean(-1, keepdim=True) + _eps(loaded, layer)).sqrt(),
        "mlp_output": plain["mlp_out"],  # the MLP module's own output, uncentred
        "mlp_out": plain["written"] - plain["written"].mean(-1, keepdim=True) if layernorm else plain["written"],
    }
    for space, value in expected.items():
        got = space_activation(loaded, layer, space, captured)
        assert torch.allclose(got, value, atol=2e-5, rtol=1e-5), (arch, space, float((got - value).abs().max()))
    # and the output map takes the raw output to what enters the residual
    assert torch.allclose(
        written_to_residual("mlp_output", plain["mlp_out"], loaded.spaces[layer]), expected["mlp_out"], atol=2e-5
    )
    assert info.post_norms == (arch in ("gemma2", "gemma3"))


def _eps(loaded, layer: int) -> float:
    component = loaded.bridge.blocks[layer].ln2.original_component
    return float(getattr(component, "eps", None) or component.variance_epsilon)


def test_gemma2_description(modern_model_dirs):
    info = load_model(str(modern_model_dirs["gemma2"]), "cpu").info
    assert info.post_norms and info.final_logit_softcap == 30.0 and info.attn_logit_softcap == 50.0
    assert info.embed_scale == pytest.approx(32**0.5) and info.n_kv_heads == 2
    assert info.layer(0).mlp_post_scale == "blocks.0.ln2_post.hook_scale"


def test_gemma3_description(modern_model_dirs):
    """Gemma 3's text model loads like Gemma-2: post-norms, scaled embeddings, (1 + w) RMSNorm weights, and
    no soft-capping (Gemma 3 has none)."""
    loaded = load_model(str(modern_model_dirs["gemma3"]), "cpu")
    info = loaded.info
    assert info.architecture == "Gemma3ForCausalLM" and info.normalization == "rmsnorm"
    assert info.post_norms and info.final_logit_softcap is None and info.attn_logit_softcap is None
    assert info.embed_scale == pytest.approx(32**0.5) and info.n_kv_heads == 2 and info.gated_mlp
    assert info.layer(1).mlp_post_scale == "blocks.1.ln2_post.hook_scale"
