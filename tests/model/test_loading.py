import pytest
import torch

from conftest import plain_model_reference
from tccli.errors import TcError
from tccli.model.loading import MlpCapture, compat_mlp_out, compat_normalized, load_model, run_capture, run_logits


def test_describe_three_architectures(tiny_model_dirs):
    infos = {arch: load_model(str(path), device="cpu").info for arch, path in tiny_model_dirs.items()}
    assert infos["gpt2"].normalization == "layernorm" and not infos["gpt2"].parallel_attn_mlp
    assert infos["gpt2"].positional == "learned" and infos["gpt2"].pos_embed_hook == "hook_pos_embed"
    assert infos["neox"].parallel_attn_mlp and infos["neox"].layer(0).resid_mid is None
    assert infos["llama"].normalization == "rmsnorm" and infos["llama"].gated_mlp
    assert infos["llama"].n_kv_heads == 2 and infos["llama"].n_heads == 4
    for info in infos.values():
        assert info.n_layers == 2 and info.d_model == 32
        assert info.mlp_in_hook(1) == "blocks.1.ln2.hook_normalized"


def test_hooks_capture_the_mlp_exactly(tiny_model_dir):
    """The MLP-input hook is what the MLP reads: feeding it to the model's own MLP gives mlp_out."""
    loaded = load_model(str(tiny_model_dir), device="cpu")
    info = loaded.info
    tokens = torch.tensor([[info.bos_token_id, 5, 9, 33, 70, 2]])
    hooks = info.layer(1)
    acts = run_capture(loaded, tokens, [hooks.mlp_in, hooks.mlp_out])
    mlp = loaded.bridge.blocks[1].mlp
    with torch.no_grad():
        again = mlp(acts[hooks.mlp_in])
    torch.testing.assert_close(again, acts[hooks.mlp_out], rtol=0, atol=1e-6)


def test_stop_after_gives_same_values_and_skips_later_layers(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), device="cpu")
    info = loaded.info
    tokens = torch.tensor([[info.bos_token_id, 7, 8, 9]])
    full = run_capture(loaded, tokens, [info.mlp_out_hook(0), info.mlp_out_hook(1)])
    fired = []
    early = run_capture(
        loaded,
        tokens,
        [info.mlp_out_hook(0)],
        stop_after=info.mlp_out_hook(0),
        extra_hooks=[(info.layer(1).resid_pre, lambda t, hook: fired.append(1))],
    )
    assert torch.equal(full[info.mlp_out_hook(0)], early[info.mlp_out_hook(0)])
    assert fired == []


def test_stories260k_loads(stories_dir):
    info = load_model(str(stories_dir), device="cpu").info
    assert (info.n_layers, info.d_model, info.d_mlp, info.n_heads, info.n_kv_heads) == (5, 64, 172, 8, 4)
    assert info.architecture == "LlamaForCausalLM" and info.bos_token_id == 1


@pytest.mark.parametrize("name,message", [("/nonexistent/model", "does not exist"), ("/tmp", "no config.json")])
def test_bad_model_is_one_line(name, message):
    with pytest.raises(TcError, match=message):
        load_model(name, device="cpu")


# ============================================================================ MlpCapture: native and bridge engines


def test_compat_normalized_by_hand():
    # LayerNorm: [1, 3] centres to [-1, 1], mean square 1, so with eps 0 it is unchanged and the scale is 1
    normalized, scale = compat_normalized(torch.tensor([[1.0, 3.0]]), "layernorm", 0.0, False)
    assert torch.equal(normalized, torch.tensor([[-1.0, 1.0]])) and torch.equal(scale, torch.tensor([[1.0]]))
    # RMSNorm: [3, 4] has mean square 12.5; no centring
    normalized, scale = compat_normalized(torch.tensor([[3.0, 4.0]]), "rmsnorm", 0.0, True)
    torch.testing.assert_close(normalized, torch.tensor([[3.0, 4.0]]) / 12.5**0.5, rtol=1e-7, atol=0)
    torch.testing.assert_close(scale, torch.tensor([[12.5**0.5]]), rtol=1e-7, atol=0)
    assert torch.equal(compat_mlp_out(torch.tensor([[1.0, 2.0, 6.0]]), "layernorm"), torch.tensor([[-2.0, -1.0, 3.0]]))
    assert torch.equal(compat_mlp_out(torch.tensor([[1.0, 2.0, 6.0]]), "rmsnorm"), torch.tensor([[1.0, 2.0, 6.0]]))


def _random_tokens(info, rows=4, seq=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, min(info.d_vocab, 300), (rows, seq), generator=generator)
    tokens[:, 0] = info.bos_token_id
    return tokens


def _native_equals_bridge_up_to_rounding(model_dir, attention="sdpa"):
    loaded = load_model(str(model_dir), device="cpu")
    layers = list(range(loaded.info.n_layers))
    native, bridge = MlpCapture(loaded, layers, "native"), MlpCapture(loaded, layers, "bridge")
    assert (native.engine_used, native.attention, bridge.engine_used) == ("native", attention, "bridge")
    tokens = _random_tokens(loaded.info)
    got, want = native.capture(tokens), bridge.capture(tokens)
    for layer in layers:
        for which in ("mlp_in", "mlp_scale", "mlp_out"):
            a, b = got[layer][which], want[layer][which]
            assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
            # float32 rounding of a different attention kernel, nothing more: ~1e-7 of the values' size
            assert (a - b).abs().max() <= 2e-6 * b.abs().max(), (layer, which, (a - b).abs().max())


def test_native_capture_equals_bridge_up_to_rounding(tiny_model_dir):
    _native_equals_bridge_up_to_rounding(tiny_model_dir)


def test_native_capture_equals_bridge_on_stories260k(stories_dir):
    _native_equals_bridge_up_to_rounding(stories_dir)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_native_capture_in_float16_agrees_to_float16_rounding(tiny_model_dirs, arch):
    loaded = load_model(str(tiny_model_dirs[arch]), device="cpu", dtype="float16")
    native, bridge = MlpCapture(loaded, [0, 1], "native"), MlpCapture(loaded, [0, 1], "bridge")
    tokens = _random_tokens(loaded.info)
    got, want = native.capture(tokens), bridge.capture(tokens)
    for which, dtype in (("mlp_in", torch.float32), ("mlp_out", torch.float16)):  # norms work in float32
        a, b = got[1][which], want[1][which]
        assert a.dtype == b.dtype == dtype
        # a few float16 ulps (2**-10 of the values' size): the kernels round differently, two layers deep
        assert (a.float() - b.float()).abs().max() <= 4e-3 * b.float().abs().max(), which


def test_native_capture_equals_bridge_on_gemma3(modern_model_dirs):
    _native_equals_bridge_up_to_rounding(modern_model_dirs["gemma3"])


def test_gemma3_logits_are_the_plain_models(modern_model_dirs):
    """The bridge runs Gemma 3's text model as HuggingFace does: a sliding-window layer (window 4, shorter
    than the prompt) and a full-attention one with another RoPE base, RMSNorm on queries and keys, post-norms.
    Compatibility mode centres the unembedding, so the logits agree up to their mean over the vocabulary."""
    from transformers import AutoModelForCausalLM

    folder = modern_model_dirs["gemma3"]
    loaded = load_model(str(folder), device="cpu")
    tokens = _random_tokens(loaded.info, rows=2, seq=16)
    logits, _ = run_logits(loaded, tokens)
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want = plain(input_ids=tokens).logits
    got, want = logits - logits.mean(-1, keepdim=True), want - want.mean(-1, keepdim=True)
    assert (got - want).abs().max() <= 2e-6 * want.abs().max(), (got - want).abs().max()


def test_native_capture_is_the_plain_model_exactly(tiny_model_dir):
    """Module paths read from the bridge are the ones a person would write by hand, and stopping early
    changes nothing: the captured tensors equal a full plain forward pass's, bit for bit."""
    loaded = load_model(str(tiny_model_dir), device="cpu")
    tokens = _random_tokens(loaded.info, rows=3)
    capture = MlpCapture(loaded, [0], "native")
    got = capture.capture(tokens)
    want = plain_model_reference(tiny_model_dir, tokens, [0], batch_size=3)
    d = loaded.info.d_model
    assert torch.equal(got[0]["mlp_in"].reshape(-1, d), want[0, "mlp_in"])
    assert torch.equal(got[0]["mlp_out"].reshape(-1, d), want[0, "mlp_out"])


def test_native_capture_stops_after_the_last_layer(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), device="cpu")
    capture = MlpCapture(loaded, [0], "native")
    later = []
    site = capture._sites[1]
    capture._model.get_submodule(site.norm_module).register_forward_pre_hook(lambda m, args: later.append(1))
    capture.capture(_random_tokens(loaded.info))
    assert later == []
    assert capture.capture(_random_tokens(loaded.info)).keys() == {0}


def test_native_engine_falls_back_to_the_bridge_for_unverified_architectures(tiny_model_dirs, monkeypatch):
    import tccli.model.loading as models

    monkeypatch.setattr(models, "NATIVE_ARCHITECTURES", ())
    loaded = load_model(str(tiny_model_dirs["llama"]), device="cpu")
    capture = MlpCapture(loaded, [1], "native")
    assert capture.engine_used == "bridge" and "LlamaForCausalLM" in capture.fallback_reason
    tokens = _random_tokens(loaded.info)
    assert torch.equal(
        capture.capture(tokens)[1]["mlp_in"],
        run_capture(loaded, tokens, ["blocks.1.ln2.hook_normalized"])["blocks.1.ln2.hook_normalized"],
    )


def test_release_bridge_keeps_one_copy(tiny_model_dirs):
    loaded = load_model(str(tiny_model_dirs["gpt2"]), device="cpu")
    capture = MlpCapture(loaded, [0, 1], "native", release_bridge=True)
    assert loaded.bridge is None and capture.capture(_random_tokens(loaded.info))[1]["mlp_out"].shape[-1] == 32


def test_model_identity_compares_meaning_not_spelling(tmp_path, monkeypatch):
    from tccli.model.loading import BUILTIN_MODEL_DIR, known_different_models, model_identity

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "n").mkdir()
    assert model_identity(None) == model_identity("builtin") == model_identity(str(BUILTIN_MODEL_DIR)) == "builtin"
    assert model_identity("/old/install/site-packages/tccli/builtin/model") == "builtin"  # an older tc's record
    assert model_identity("./m") == model_identity(str(tmp_path / "m")) == str((tmp_path / "m").resolve())
    assert model_identity("gpt2") == "gpt2"
    assert known_different_models(str(tmp_path / "m"), str(tmp_path / "n"))
    assert known_different_models("builtin", str(tmp_path / "n"))
    assert not known_different_models("./m", str(tmp_path / "m"))
    assert not known_different_models(str(tmp_path / "moved-away"), str(tmp_path / "n"))  # cannot tell
    assert not known_different_models("gpt2-small", "gpt2")  # hub aliases are not judged
    assert not known_different_models(None, "gpt2")


def test_context_longer_than_the_model_is_refused():
    from types import SimpleNamespace

    from tccli.model.loading import check_context

    check_context(256, SimpleNamespace(n_ctx=256))
    with pytest.raises(TcError, match="--context 257 is longer than the model's maximum context of 256 tokens"):
        check_context(257, SimpleNamespace(n_ctx=256))
