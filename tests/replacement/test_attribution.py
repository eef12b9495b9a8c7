"""Exact direct attributions: the identity target == constant + sum of direct terms, autograd, and a
hand-built model worked out on paper."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from circuit_helpers import SPACE_PAIRS, loaded_model, paper_model, random_clt, random_transcoders
from tccli.replacement import attribution
from tccli.replacement.frozen import FrozenForward
from tccli.replacement.prompts import freeze_prompt
from tccli.replacement.targets import Target, direction_target, feature_target, unembed_target

PROMPT_IDS = [0, 37, 90, 151, 12, 200, 64, 7, 99]  # BOS first; ids < the tiny vocab of 320


def frozen_for(path, dtype: str, n_features: int = 48, seed: int = 0, clt: bool = False, **kinds):
    """``clt``: a cross-layer transcoder (the same per-layer part, random decoders to later layers)."""
    loaded = loaded_model(path, dtype)
    torch_dtype = torch.float64 if dtype == "float64" else torch.float32
    if clt:
        transcoders = random_clt(loaded.info, n_features, seed, dtype=torch_dtype, **kinds)
    else:
        transcoders = random_transcoders(loaded.info, n_features, seed, torch_dtype, **kinds)
    tokens = torch.tensor(PROMPT_IDS[: min(len(PROMPT_IDS), 9)])
    return loaded, freeze_prompt(loaded, transcoders, tokens)


def all_targets(frozen: FrozenForward, d_model: int):
    last = frozen.n_layers - 1
    generator = torch.Generator().manual_seed(1)
    direction = torch.randn(d_model, generator=generator, dtype=torch.float64)
    return [
        feature_target(frozen, last, 5, 8),
        feature_target(frozen, 0, 11, 4),
        unembed_target(frozen, 17, None, 8),
        unembed_target(frozen, 40, 20, 6),
        direction_target(frozen, direction, last, 7),
        direction_target(frozen, direction, frozen.n_layers, 8),
    ]


def terms(contributions: attribution.DirectContributions) -> torch.Tensor:
    """Every direct term as one flat tensor (for the scale of rounding errors)."""
    parts = [contributions.embed.reshape(1)]
    if contributions.pos_embed is not None:
        parts.append(contributions.pos_embed.reshape(1))
    parts += [t.reshape(-1) for t in contributions.features.values()]
    parts += [t.reshape(-1) for t in contributions.heads.values()]
    for group in (contributions.attn_bias, contributions.decoder_bias, contributions.errors, contributions.skips):
        parts += [t.reshape(1) for t in group.values()]
    return torch.cat(parts)


# Rounding: the target is a sum of many terms of either sign, so its error is measured against the
# magnitude summed, sum(|term|) + |constant|. Llama in float64 is exact only to ~1e-8 of that
# scale: the model's attention (HF eager, float32 softmax / norms inside) does not satisfy
# attn_out == sum_h pattern_h V_h W_O better than that; test_llama_float64_limit_is_the_model's shows it.
TOLERANCE = {
    ("float32", "gpt2"): 1e-5,
    ("float32", "neox"): 1e-5,
    ("float32", "llama"): 1e-5,
    ("float64", "gpt2"): 1e-10,
    ("float64", "neox"): 1e-10,
    ("float64", "llama"): 1e-7,
    # Gemma-2 and Qwen3 compute their norms and softmax in float32 inside the float64 model too
    ("float32", "gemma2"): 1e-5,
    ("float32", "qwen3"): 1e-5,
    ("float64", "gemma2"): 1e-7,
    ("float64", "qwen3"): 1e-7,
    ("float32", "gemma3"): 1e-5,
    ("float64", "gemma3"): 1e-7,
}


@pytest.mark.parametrize("clt", [False, True], ids=["per-layer", "cross-layer"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_exactness_identity(tiny_model_dirs, arch, dtype, clt):
    """target == constant + every direct term; a cross-layer transcoder's feature's term sums its writes to
    every MLP output the target reads after (docs/method.md section 11)."""
    loaded, frozen = frozen_for(tiny_model_dirs[arch], dtype, clt=clt)
    for target in all_targets(frozen, loaded.info.d_model):
        direct = attribution.direct_contributions(frozen, target.vector, target.position, target.read_point)
        flat = terms(direct)
        total = float(flat.sum()) + target.constant
        scale = float(flat.abs().sum()) + abs(target.constant)
        assert abs(total - target.value) <= TOLERANCE[(dtype, arch)] * scale, (
            target.description,
            total,
            target.value,
            scale,
        )
        if target.read_point != (0, 0):  # (0, 0): a NeoX layer-0 MLP reads the embedding only
            assert (flat.abs() > 1e-6 * scale).sum() > 10  # many terms, not one dominating


def test_exactness_identity_relative_to_value_float64(tiny_model_dirs):
    """On GPT-2 in float64 the identity also holds relative to the value itself, to 1e-10."""
    loaded, frozen = frozen_for(tiny_model_dirs["gpt2"], "float64")
    for target in all_targets(frozen, loaded.info.d_model):
        direct = attribution.direct_contributions(frozen, target.vector, target.position, target.read_point)
        total = float(direct.total()) + target.constant
        assert abs(total - target.value) <= 1e-10 * max(abs(target.value), 1e-3)


def test_llama_float64_limit_is_the_models(tiny_model_dirs):
    """Why Llama float64 gets 1e-7: the model's own attention identity is only that exact."""
    _, frozen = frozen_for(tiny_model_dirs["llama"], "float64")
    layer = frozen.layers[0]
    rebuilt = torch.einsum("hts,she,hed->td", layer.pattern, layer.values, layer.W_O) + layer.b_O
    error = float((rebuilt - layer.attn_out).abs().max() / layer.attn_out.abs().max())
    assert 1e-12 < error < 1e-6


def test_stories260k_identity(stories_dir):
    """The real stories260K (Llama, 5 layers) with random sparse transcoders (no trained ones needed)."""
    loaded = loaded_model(stories_dir, "float32")
    transcoders = random_transcoders(loaded.info, 256, 3, bias_shift=-0.2)
    tokens = torch.tensor(
        [loaded.info.bos_token_id]
        + loaded.tokenizer.encode("Once upon a time there was a little girl named Lily", add_special_tokens=False)
    )
    frozen = freeze_prompt(loaded, transcoders, tokens)
    assert all(layer.z.gt(0).float().mean() < 0.6 for layer in frozen.layers)
    for target in all_targets(frozen, loaded.info.d_model):
        direct = attribution.direct_contributions(frozen, target.vector, target.position, target.read_point)
        flat = terms(direct)
        total = float(flat.sum()) + target.constant
        assert abs(total - target.value) <= 1e-5 * (float(flat.abs().sum()) + abs(target.constant))


# ----------------------------------------------------------------------------- autograd


def _centre(x):
    return x - x.mean(-1, keepdim=True)


def replacement_target(frozen: FrozenForward, target: Target, leaves: dict) -> torch.Tensor:
    """The target recomputed from leaves with patterns' values, scales and attention inputs frozen:
    a direct-effect model, so gradient x activation of a leaf is its direct contribution. Spaces are
    written out here from docs/method.md section 8, independently of tccli.model.spaces."""
    t = target.position
    resid = leaves["embed"] + (leaves["pos"] if "pos" in leaves else 0)
    n_attn, n_mlp = target.read_point

    def normalised(x, scale):
        if frozen.layernorm:
            x = _centre(x)
        return x / scale.unsqueeze(-1)

    def transcoder_input(layer, r):
        space = layer.transcoder.config.input_space
        if space == "resid_mid":  # the residual as the norm sees it: centred for LayerNorm
            return _centre(r) if frozen.layernorm else r
        x = normalised(r, layer.mlp_scale)
        if space == "mlp_input":
            x = x * layer.spaces.norm_weight + (0 if layer.spaces.norm_bias is None else layer.spaces.norm_bias)
        return x

    def written(layer, y):  # the transcoder's output as it enters the residual
        if layer.transcoder.config.output_space == "mlp_out":
            return y
        if layer.spaces.post_weight is not None:
            return layer.spaces.post_weight * y / layer.mlp_post_scale.unsqueeze(-1)
        return _centre(y) if frozen.layernorm else y

    for index, layer in enumerate(frozen.layers):
        if index == n_attn == n_mlp:
            break
        heads = torch.einsum("hts,she,hed->td", leaves["pattern", index], layer.values, layer.W_O) + layer.b_O
        attn = (
            heads
            if layer.attn_post_scale is None
            else (layer.spaces.attn_post_weight * heads / layer.attn_post_scale.unsqueeze(-1))
        )
        # every layer whose features write here, from the weights (a cross-layer transcoder's blocks)
        clt = frozen.cross_layer
        writers = (
            [(index, layer.transcoder.W_dec)] if clt is None else [(s, clt.decoder(s, index)) for s in range(index + 1)]
        )
        output = sum(leaves["z", source] @ decoder for source, decoder in writers) + layer.transcoder.b_dec
        if ("skip", index) in leaves:
            output = output + leaves["skip", index]
        mlp = written(layer, output) + layer.error
        if frozen.parallel:
            resid = resid + attn + mlp
        else:
            resid = resid + attn
            if (n_attn, n_mlp) == (index + 1, index):
                break
            resid = resid + mlp
    kind = target.description["kind"]
    if kind == "feature":
        layer = frozen.layers[target.description["layer"]]
        return layer.transcoder.pre_activation(transcoder_input(layer, resid)[t])[target.description["feature"]]
    if kind in ("logit", "logit_diff"):
        logits = normalised(resid[t], frozen.final_scale[t]) @ frozen.W_U + frozen.b_U
        value = logits[target.description["token"]]
        if kind == "logit_diff":
            value = value - logits[target.description["token_b"]]
        return value
    return resid[t] @ target.vector


def check_against_autograd(frozen: FrozenForward, d_model: int) -> None:
    for target in all_targets(frozen, d_model):
        leaves = {"embed": frozen.embed.clone().requires_grad_()}
        if frozen.pos_embed is not None:
            leaves["pos"] = frozen.pos_embed.clone().requires_grad_()
        for index, layer in enumerate(frozen.layers):
            leaves["pattern", index] = layer.pattern.clone().requires_grad_()
            leaves["z", index] = layer.z.clone().requires_grad_()
            if layer.skip_out is not None:
                leaves["skip", index] = layer.skip_out.clone().requires_grad_()
        value = replacement_target(frozen, target, leaves)
        value.backward()
        direct = attribution.direct_contributions(frozen, target.vector, target.position, target.read_point)
        t = target.position
        atol = 1e-9 * float(terms(direct).abs().sum())
        assert abs(float(value) - target.value) < 1e-6 * float(terms(direct).abs().sum())
        assert abs(float((leaves["embed"].grad * leaves["embed"]).sum()) - float(direct.embed)) < atol
        if "pos" in leaves:
            assert abs(float((leaves["pos"].grad * leaves["pos"]).sum()) - float(direct.pos_embed)) < atol
        for index in range(frozen.n_layers):
            z = leaves["z", index]
            grad_x_act = (z.grad * z)[t] if z.grad is not None else torch.zeros_like(z[t])
            expected = direct.features.get(index, torch.zeros_like(grad_x_act))
            assert torch.allclose(grad_x_act, expected, atol=atol, rtol=0), (target.description, index)
            # nothing at other tokens: a direct effect lives at the target's token only
            if z.grad is not None:
                assert float(z.grad[torch.arange(z.shape[0]) != t].abs().max()) == 0.0
            if ("skip", index) in leaves:
                skip = leaves["skip", index]
                grad_x_act = float((skip.grad * skip)[t].sum()) if skip.grad is not None else 0.0
                assert abs(grad_x_act - float(direct.skips.get(index, 0.0))) < atol, (target.description, index)
            pattern = leaves["pattern", index]
            heads = (pattern.grad * pattern)[:, t, :] if pattern.grad is not None else torch.zeros_like(pattern[:, t])
            expected = direct.heads.get(index, torch.zeros_like(heads))
            assert torch.allclose(heads, expected, atol=atol, rtol=0), (target.description, index)


@pytest.mark.parametrize("clt", [False, True], ids=["per-layer", "cross-layer"])
@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_direct_contributions_match_autograd(tiny_model_dirs, arch, clt):
    loaded, frozen = frozen_for(tiny_model_dirs[arch], "float64", clt=clt)
    check_against_autograd(frozen, loaded.info.d_model)


# ----------------------------------------------------------------------------- spaces and skip connections


def check_identity(frozen: FrozenForward, d_model: int, tolerance: float) -> None:
    for target in all_targets(frozen, d_model):
        direct = attribution.direct_contributions(frozen, target.vector, target.position, target.read_point)
        flat = terms(direct)
        total = float(flat.sum()) + target.constant
        scale = float(flat.abs().sum()) + abs(target.constant)
        assert abs(total - target.value) <= tolerance * scale, (target.description, total, target.value, scale)


@pytest.mark.parametrize("clt", [False, True], ids=["per-layer", "cross-layer"])
@pytest.mark.parametrize("spaces", SPACE_PAIRS, ids=["-".join(p) for p in SPACE_PAIRS])
@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_every_space_with_a_skip_is_exact(tiny_model_dirs, arch, spaces, clt):
    """JumpReLU skip transcoders (and cross-layer transcoders) reading and writing every space: the identity in
    float32 and float64, and every direct term (features, skip terms, heads, embeddings) equal to autograd's."""
    kinds = dict(activation="jumprelu", skip=True, input_space=spaces[0], output_space=spaces[1])
    for dtype in ("float32", "float64"):
        loaded, frozen = frozen_for(tiny_model_dirs[arch], dtype, clt=clt, **kinds)
        assert all(layer.skip_out is not None and float(layer.skip_out.abs().max()) > 0 for layer in frozen.layers)
        check_identity(frozen, loaded.info.d_model, TOLERANCE[(dtype, arch)])
    check_against_autograd(frozen, loaded.info.d_model)


@pytest.mark.parametrize("clt", [False, True], ids=["per-layer", "cross-layer"])
@pytest.mark.parametrize("spaces", SPACE_PAIRS, ids=["-".join(p) for p in SPACE_PAIRS])
@pytest.mark.parametrize("arch", ["gemma2", "qwen3", "gemma3"])
def test_gemma2_and_qwen3_every_space_is_exact(modern_model_dirs, arch, spaces, clt):
    """Gemma-2's post-norms (frozen scales: linear maps), (1 + w) norms, soft-caps, sliding windows and
    scaled embeddings, Qwen3's query/key norms and Gemma 3's: the identity and autograd, as for the other three (and
    with a cross-layer transcoder, whose writes to later layers pass through those layers' post-norms)."""
    kinds = dict(activation="jumprelu", skip=True, input_space=spaces[0], output_space=spaces[1])
    for dtype in ("float32", "float64"):
        loaded, frozen = frozen_for(modern_model_dirs[arch], dtype, clt=clt, **kinds)
        check_identity(frozen, loaded.info.d_model, TOLERANCE[(dtype, arch)])
        if arch == "gemma2":
            assert frozen.final_logit_softcap == 30.0 and frozen.layers[0].attn_post_scale is not None
    check_against_autograd(frozen, loaded.info.d_model)


def test_spaces_read_different_inputs(tiny_model_dirs):
    """The three input spaces are different activations (so the tests above tell them apart)."""
    firsts = {}
    for space in ("normalized", "mlp_input", "resid_mid"):
        _, frozen = frozen_for(tiny_model_dirs["gpt2"], "float64", input_space=space)
        firsts[space] = frozen.layers[1].transcoder_input
    assert not torch.allclose(firsts["normalized"], firsts["mlp_input"], atol=1e-3)
    assert not torch.allclose(firsts["normalized"], firsts["resid_mid"], atol=1e-3)
    # normalized is resid_mid centred and divided by its scale
    layer = frozen.layers[1]
    expected = _centre(firsts["resid_mid"]) / layer.mlp_scale.unsqueeze(-1)
    assert torch.allclose(firsts["normalized"], expected, atol=1e-10)


def test_skip_path_one_step_upstream_is_exact(tiny_model_dirs):
    """The skip node's upstream vector explains its contribution: direct terms of W_skip W(v) moved through
    the norm, plus the norm bias's constant, sum to the skip term's contribution."""
    for arch in ("gpt2", "llama"):
        loaded, frozen = frozen_for(
            tiny_model_dirs[arch], "float64", skip=True, input_space="mlp_input", output_space="mlp_output"
        )
        target = unembed_target(frozen, 17, None, 8)
        rows = attribution.Rows.from_target(target)
        for layer in range(frozen.n_layers):
            contribution = float(attribution.skip_contributions(frozen, rows, layer)[0])
            vector, read_point, constant = attribution.skip_upstream(frozen, layer, 8, target.vector)
            upstream = attribution.direct_contributions(frozen, vector, 8, read_point)
            scale = float(terms(upstream).abs().sum())
            error = abs(float(upstream.total()) + float(constant) - contribution)
            assert error <= TOLERANCE[("float64", arch)] * scale and abs(contribution) > 1e-4
            if arch == "gpt2":  # LayerNorm: the norm bias enters as a constant
                assert abs(float(constant)) > 1e-6


# ----------------------------------------------------------------------------- a model on paper


def test_paper_model_direct_terms():
    frozen = paper_model()
    assert frozen.final_resid[1].tolist() == [3.5, 9.5]
    target = direction_target(frozen, torch.tensor([1.0, 1.0]), 1, 1)
    assert target.value == 13.0
    direct = attribution.direct_contributions(frozen, target.vector, 1, target.read_point)
    assert float(direct.embed) == 1.0  # [1,1].[0,1]
    assert direct.heads[0].tolist() == [[1.0, 0.5]]  # .5*[2,0].[1,1], .5*[0,1].[1,1]
    assert direct.features[0].tolist() == [4.0, 6.0]  # z=2 * (W_dec[0].v=2), z=3 * (W_dec[1].v=2)
    assert float(direct.errors[0]) == 0.5
    assert float(direct.attn_bias[0]) == 0.0 and float(direct.decoder_bias[0]) == 0.0
    assert float(direct.total()) == 13.0


def test_paper_model_one_step_upstream():
    frozen = paper_model()
    v = torch.tensor([1.0, 1.0], dtype=torch.float64)
    # feature 1 (coefficient W_dec[1].v = 2) reads resid_mid / .5 through W_enc[:,1] = e1
    vector, read_point, constant = attribution.feature_upstream(frozen, 0, 1, 1, torch.tensor(2.0, dtype=torch.float64))
    assert vector.tolist() == [0.0, 4.0] and read_point == (1, 0) and float(constant) == 0.0
    direct = attribution.direct_contributions(frozen, vector, 1, read_point)
    assert float(direct.embed) == 4.0 and direct.heads[0].tolist() == [[0.0, 2.0]] and direct.features == {}
    assert float(direct.total()) == 2.0 * 3.0  # coefficient * pre-activation
    # head 0 reading token 1 for token 1: .5 * W_V W_O v = .5 * [2,1]
    vector, read_point = attribution.head_upstream(frozen, 0, 0, 1, 1, v)
    assert vector.tolist() == [1.0, 0.5] and read_point == (0, 0)
    assert float(attribution.direct_contributions(frozen, vector, 1, read_point).total()) == 0.5


def test_parallel_block_mlp_cannot_see_its_attention():
    frozen = paper_model()
    frozen.parallel = True
    assert frozen.mlp_read_point(0) == (0, 0)
    rows = attribution.Rows.single(torch.tensor([1.0, 1.0], dtype=torch.float64), 1, frozen.mlp_read_point(0))
    assert float(attribution.head_contributions(frozen, rows, 0).abs().sum()) == 0.0


def test_layernorm_vectors_are_centred():
    frozen = paper_model()
    frozen.layernorm = True
    raw = frozen.to_raw(torch.tensor([[3.0, 1.0]], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64))
    assert raw.tolist() == [[0.5, -0.5]]  # ([3,1] - 2) / 2


def test_direction_file_shape(tmp_path):
    from tccli.errors import TcError
    from tccli.replacement.targets import load_direction

    np.save(tmp_path / "d.npy", np.ones(4))
    assert load_direction(str(tmp_path / "d.npy"), 4).tolist() == [1.0] * 4
    with pytest.raises(TcError, match="d_model is 5"):
        load_direction(str(tmp_path / "d.npy"), 5)
