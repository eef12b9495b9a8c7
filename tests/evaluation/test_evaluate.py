import json
import math

import pytest
import torch
from safetensors.torch import load_file

from circuit_helpers import loaded_model
from conftest import run_tc
from tccli.config.transcoders import TranscoderConfig
from tccli.evaluation.evaluate import (
    MeanOutput,
    ReconstructionStats,
    evaluate,
    fraction_recovered,
    kl_to_clean,
    next_token_loss,
    splice_hooks,
)
from tccli.model.loading import run_capture, run_logits
from tccli.transcoders.files import save_transcoder
from tccli.transcoders.transcoder import Transcoder

# ----------------------------------------------------------------------------- metric math by hand


def test_next_token_loss_uniform_and_certain():
    tokens = torch.tensor([[0, 2, 1]])
    uniform = torch.zeros(1, 3, 4, dtype=torch.float64)
    assert torch.allclose(next_token_loss(uniform, tokens), torch.full((1, 2), math.log(4), dtype=torch.float64))
    assert next_token_loss(uniform.half(), tokens).dtype == torch.float32  # half-precision logits are widened
    certain = torch.full((1, 3, 4), -1e4)
    certain[0, 0, 2] = 0.0  # position 0 predicts token 2 (right)
    certain[0, 1, 3] = 0.0  # position 1 predicts token 3, truth is 1 (wrong by 1e4 nats)
    loss = next_token_loss(certain, tokens)
    assert loss[0, 0] == pytest.approx(0.0, abs=1e-12) and loss[0, 1] == pytest.approx(1e4)


def test_kl_to_clean_two_outcomes():
    clean = torch.log(torch.tensor([[[0.5, 0.5], [0.5, 0.5]]], dtype=torch.float64))
    other = torch.log(torch.tensor([[[0.25, 0.75], [0.9, 0.1]]], dtype=torch.float64))
    kl = kl_to_clean(clean, other)  # only the first position is scored (it predicts the second token)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl.shape == (1, 1) and kl[0, 0].item() == pytest.approx(expected, rel=1e-12)
    assert kl_to_clean(other, other).abs().max().item() < 1e-12


def test_fraction_recovered():
    assert fraction_recovered(1.0, 1.0, 3.0) == 1.0
    assert fraction_recovered(1.0, 3.0, 3.0) == 0.0
    assert fraction_recovered(1.0, 2.5, 3.0) == 0.25
    assert math.isnan(fraction_recovered(2.0, 2.0, 2.0))


def test_reconstruction_stats_by_hand():
    stats = ReconstructionStats(n_features=3)
    # two batches of one token each: y = (1, 0) then (3, 0); yhat = (1, 0) both times
    stats.update(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]))
    stats.update(torch.tensor([[3.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 3.0, 0.0]]))
    result = stats.result(dense_threshold=0.6)
    assert result["l0"] == 1.5  # (1 + 2) / 2
    assert result["mse"] == 1.0  # squared error 4 over 2 tokens x 2 dims
    assert result["fvu"] == 2.0  # 4 / (variance sum about the mean (2, 0): 1 + 1)
    assert result["dead_features"] == 1  # feature 2 never fires
    assert result["dense_features"] == 1  # feature 0 fires on 100% > 60%; feature 1 on 50%


def test_negative_activations_count_as_active():
    # signed_topk (circuit-tracer's, Peek's TopK) keeps negative values: they are written to the output
    stats = ReconstructionStats(n_features=3)
    stats.update(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, -0.25, 0.0]]))
    result = stats.result(dense_threshold=0.6)
    assert result["l0"] == 2.0 and result["dead_features"] == 1


def test_mean_output_per_position_and_global():
    a = torch.tensor([[[1.0], [2.0]], [[3.0], [6.0]]])  # [batch 2, seq 2, d 1]
    per_position, overall = MeanOutput(True), MeanOutput(False)
    for batch in (a[:1], a[1:]):
        per_position.update(batch)
        overall.update(batch)
    assert per_position.mean().squeeze(-1).tolist() == [2.0, 4.0]
    assert overall.mean().squeeze(-1).tolist() == [3.0]


# ----------------------------------------------------------------------------- on tiny models


def make_transcoder(info, layer, kind="transcoder", n_features=None, input_space=None, output_space="mlp_out"):
    hooks = info.layer(layer)
    d = info.d_model
    input_space = input_space or (output_space if kind == "sae" else "normalized")
    tc_spaces = (input_space, output_space) in (("normalized", "mlp_out"), ("mlp_out", "mlp_out"))
    config = TranscoderConfig(
        d_in=d,
        d_out=d,
        n_features=n_features or 2 * d,
        kind=kind,
        layer=layer,
        model_name=info.name,
        model_architecture=info.architecture,
        weight_processing=dict(info.weight_processing),
        input_space=input_space,
        output_space=output_space,
        input_hook=(hooks.mlp_out if kind == "sae" else hooks.mlp_in) if tc_spaces else None,
        output_hook=hooks.mlp_out if tc_spaces else None,
    )
    return Transcoder(config)


def identity(info, layer, kind, **spaces):
    """relu(x) - relu(-x) = x: features [I, -I] reproduce their input exactly."""
    transcoder = make_transcoder(info, layer, kind, **spaces)
    eye = torch.eye(info.d_model)
    with torch.no_grad():
        transcoder.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        transcoder.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return transcoder


def sample_tokens(loaded, rows=6, context=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, loaded.info.d_vocab, (rows, context), generator=generator)
    tokens[:, 0] = loaded.info.bos_token_id
    return tokens


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_exact_sae_recovers_everything(tiny_models, arch):
    loaded = tiny_models[arch]
    info = loaded.info
    saes = {layer: identity(info, layer, "sae") for layer in range(info.n_layers)}
    result = evaluate(loaded, saes, sample_tokens(loaded), batch_size=4)
    for row in [*result.layers, result.all_layers]:
        # [I, -I] features are exact in floating point, so the spliced model is bit-identical
        assert row["ce_spliced"] == row["ce_clean"] != row["ce_zero_ablated"]
        assert row["recovered_zero"] == 1.0 and row["recovered_mean"] == 1.0 and row["kl"] == 0.0
    for row in result.layers:
        assert row["fvu"] < 1e-10 and row["dead_features"] <= info.d_model
    assert result.all_layers["layers"] == list(range(info.n_layers))


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_zero_transcoder_is_zero_ablation_and_bias_is_mean_ablation(tiny_models, arch):
    loaded = tiny_models[arch]
    info = loaded.info
    tokens = sample_tokens(loaded)
    layer = info.n_layers - 1
    zero = make_transcoder(info, layer)
    result = evaluate(loaded, {layer: zero}, tokens, batch_size=4)
    row = result.layers[0]
    assert row["ce_spliced"] == row["ce_zero_ablated"] and row["recovered_zero"] == 0.0
    assert row["l0"] == 0 and row["dead_features"] == zero.n_features and result.all_layers is None
    # a transcoder that outputs the global mean MLP output is exactly global mean ablation
    means = MeanOutput(per_position=False)
    for start in range(0, tokens.shape[0], 4):
        means.update(
            run_capture(loaded, tokens[start : start + 4], [info.layer(layer).mlp_out])[info.layer(layer).mlp_out]
        )
    constant = make_transcoder(info, layer)
    with torch.no_grad():
        constant.b_dec.copy_(means.mean()[0].float())
    row = evaluate(loaded, {layer: constant}, tokens, batch_size=4, mean_ablation="global").layers[0]
    assert row["ce_spliced"] == row["ce_mean_ablated"] and row["recovered_mean"] == 0.0
    per_position = evaluate(loaded, {layer: constant}, tokens, batch_size=4).layers[0]
    assert per_position["ce_mean_ablated"] != row["ce_mean_ablated"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_transcoder_reads_mlp_input_and_replaces_mlp_output(tiny_models, arch):
    """An identity transcoder outputs the MLP input in place of the MLP output."""
    loaded = tiny_models[arch]
    info = loaded.info
    tokens = sample_tokens(loaded, rows=2)
    layer = 1
    hooks = info.layer(layer)
    clean, captured = run_logits(loaded, tokens, [hooks.mlp_in])
    by_hand, _ = run_logits(loaded, tokens, extra_hooks=[(hooks.mlp_out, lambda t, hook: captured[hooks.mlp_in])])
    spliced, _ = run_logits(
        loaded, tokens, extra_hooks=splice_hooks(loaded, {layer: identity(info, layer, "transcoder")})
    )
    assert torch.allclose(spliced, by_hand, atol=1e-5) and not torch.allclose(spliced, clean, atol=1e-3)


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_exact_sae_on_the_raw_mlp_output(tiny_models, arch):
    """An identity SAE reading and writing mlp_output (the MLP module's raw output; for LayerNorm models
    uncentred, its mean restored from the hidden activations) leaves the model unchanged."""
    loaded = tiny_models[arch]
    info = loaded.info
    saes = {layer: identity(info, layer, "sae", output_space="mlp_output") for layer in range(info.n_layers)}
    result = evaluate(loaded, saes, sample_tokens(loaded), batch_size=4)
    for row in [*result.layers, result.all_layers]:
        assert row["ce_spliced"] == pytest.approx(row["ce_clean"], abs=1e-6) and row["kl"] < 1e-7  # float32 rounding
    for row in result.layers:
        assert row["fvu"] < 1e-10


@pytest.mark.parametrize("space", ["normalized", "mlp_input", "resid_mid"])
@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_transcoder_reads_its_input_space(tiny_models, arch, space):
    """An identity transcoder in each input space, writing mlp_output, replaces the MLP output by its input
    as that space defines it (written out here by hand), passed on as the model would (centred for LayerNorm)."""
    loaded = tiny_models[arch]
    info = loaded.info
    tokens = sample_tokens(loaded, rows=2)
    layer = 1
    hooks = info.layer(layer)
    clean, captured = run_logits(loaded, tokens, [hooks.mlp_in, hooks.mlp_norm_input])
    g, beta = loaded.spaces[layer].norm_weight, loaded.spaces[layer].norm_bias
    x = {
        "normalized": captured[hooks.mlp_in],
        "resid_mid": captured[hooks.mlp_norm_input],
        "mlp_input": captured[hooks.mlp_in] * g + (0 if beta is None else beta),
    }[space]
    written = x - x.mean(-1, keepdim=True) if info.normalization == "layernorm" else x
    by_hand, _ = run_logits(loaded, tokens, extra_hooks=[(hooks.mlp_out, lambda t, hook: written)])
    transcoder = identity(info, layer, "transcoder", input_space=space, output_space="mlp_output")
    spliced, _ = run_logits(loaded, tokens, extra_hooks=splice_hooks(loaded, {layer: transcoder}))
    assert torch.allclose(spliced, by_hand, atol=1e-5) and not torch.allclose(spliced, clean, atol=1e-3)


def test_skip_transcoder_eval_counts_the_skip_term(tiny_models):
    """A skip transcoder with no live features and W_skip = I reproduces its input: FVU against the MLP
    output is that of the input, and its L0 is 0."""
    loaded = tiny_models["llama"]
    info = loaded.info
    transcoder = make_transcoder(info, 1, input_space="mlp_input", output_space="mlp_output")
    transcoder = Transcoder(TranscoderConfig(**{**transcoder.config.to_dict(), "skip": True}))
    with torch.no_grad():
        transcoder.b_enc.fill_(-1e4)
        transcoder.W_skip.copy_(torch.eye(info.d_model))
    tokens = sample_tokens(loaded, rows=2)
    row = evaluate(loaded, {1: transcoder}, tokens, batch_size=2).layers[0]
    hooks = info.layer(1)
    _, captured = run_logits(loaded, tokens, [hooks.mlp_in, hooks.mlp_out])
    x = captured[hooks.mlp_in] * loaded.spaces[1].norm_weight
    y = captured[hooks.mlp_out]
    fvu = float(((y - x) ** 2).sum() / ((y - y.reshape(-1, y.shape[-1]).mean(0)) ** 2).sum())
    assert row["l0"] == 0 and row["fvu"] == pytest.approx(fvu, rel=1e-5)


@pytest.mark.parametrize("output_space", ["mlp_out", "mlp_output"])
@pytest.mark.parametrize("arch", ["gemma2", "qwen3"])
def test_exact_sae_on_gemma2_and_qwen3(modern_model_dirs, arch, output_space):
    """An identity SAE at every layer on either output space leaves Gemma-2 and Qwen3 unchanged: Gemma-2's
    mlp_output (before the post-MLP norm) is passed on through that norm, its scale recomputed from the
    SAE's output."""
    loaded = loaded_model(modern_model_dirs[arch])
    info = loaded.info
    saes = {layer: identity(info, layer, "sae", output_space=output_space) for layer in range(info.n_layers)}
    result = evaluate(loaded, saes, sample_tokens(loaded), batch_size=4)
    for row in [*result.layers, result.all_layers]:
        assert row["ce_spliced"] == pytest.approx(row["ce_clean"], abs=1e-6) and row["kl"] < 1e-7  # float32 rounding
        assert row["ce_zero_ablated"] != row["ce_clean"]  # the splice point carries something
    for row in result.layers:
        assert row["fvu"] < 1e-10


def test_gemma2_resid_mid_transcoder_writes_through_the_post_norm(modern_model_dirs):
    """An identity transcoder reading resid_mid and writing mlp_output on Gemma-2: what enters the residual
    is the post-MLP RMSNorm of resid_mid, (1 + w) x / sqrt(mean(x^2) + eps), written out here by hand."""
    loaded = loaded_model(modern_model_dirs["gemma2"])
    info = loaded.info
    tokens = sample_tokens(loaded, rows=2)
    layer = 1
    hooks = info.layer(layer)
    clean, captured = run_logits(loaded, tokens, [hooks.mlp_norm_input])
    x = captured[hooks.mlp_norm_input]
    folder = modern_model_dirs["gemma2"]  # the norm's weight and eps as HuggingFace stores them
    w = load_file(str(folder / "model.safetensors"))[f"model.layers.{layer}.post_feedforward_layernorm.weight"]
    eps = json.loads((folder / "config.json").read_text())["rms_norm_eps"]
    written = (1 + w.float()) * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    by_hand, _ = run_logits(loaded, tokens, extra_hooks=[(hooks.mlp_out, lambda t, hook: written)])
    transcoder = identity(info, layer, "transcoder", input_space="resid_mid", output_space="mlp_output")
    spliced, _ = run_logits(loaded, tokens, extra_hooks=splice_hooks(loaded, {layer: transcoder}))
    assert torch.allclose(spliced, by_hand, atol=1e-5) and not torch.allclose(spliced, clean, atol=1e-3)


def test_all_layers_row_matches_plain_huggingface_for_an_uncentred_mlp_out_set(tiny_models, tiny_model_dirs):
    """A resid_mid -> mlp_out set whose outputs have a large mean (b_dec shifted by 1) on the LayerNorm GPT-2:
    the all-layers row's KL and CE equal those of plain HuggingFace with the MLPs replaced by hooks. The mean
    is invisible to every norm, and tc's resid_mid is the centred residual, so it must not reach the next
    layer's transcoder either (it did: KL 0.0112 against 0.0151)."""
    from circuit_helpers import plain_gpt2_with_transcoders, random_transcoders

    loaded = tiny_models["gpt2"]
    transcoders = random_transcoders(loaded.info, 48, seed=3, input_space="resid_mid", output_space="mlp_out")
    with torch.no_grad():
        for transcoder in transcoders.values():
            transcoder.b_dec.add_(1.0)
    tokens = sample_tokens(loaded)
    row = evaluate(loaded, transcoders, tokens, batch_size=len(tokens)).all_layers

    clean, spliced = plain_gpt2_with_transcoders(tiny_model_dirs["gpt2"], transcoders, tokens)
    clean_lp = torch.log_softmax(clean[:, :-1].double(), -1)
    spliced_lp = torch.log_softmax(spliced[:, :-1].double(), -1)
    kl = float((clean_lp.exp() * (clean_lp - spliced_lp)).sum(-1).mean())
    ce = float(-spliced_lp.gather(-1, tokens[:, 1:, None]).mean())
    assert kl > 0.005  # the set changes the model
    assert row["kl"] == pytest.approx(kl, rel=1e-5) and row["ce_spliced"] == pytest.approx(ce, rel=1e-6)


# ----------------------------------------------------------------------------- the command


def test_tc_eval_command_and_bad_input(tmp_path, tiny_model_dirs, tiny_models, text_file):
    loaded = tiny_models["gpt2"]
    info = loaded.info
    model = str(tiny_model_dirs["gpt2"])
    for layer in range(info.n_layers):
        save_transcoder(identity(info, layer, "transcoder"), tmp_path / "tcs" / f"layer_{layer}")
    common = ["eval", "--model", model, "--data", str(text_file), "--tokens", "256", "--context", "32"]
    ok = run_tc(*common, "--transcoders", str(tmp_path / "tcs"), "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert [row["layer"] for row in report["layers"]] == [0, 1] and report["n_tokens"] == 256
    assert report["all_layers"]["ce_clean"] == report["layers"][0]["ce_clean"]
    table = run_tc(*common, "--transcoders", str(tmp_path / "tcs"), "--wide", "--quiet")
    assert table.returncode == 0 and "CE zero-abl" in table.stdout and "MSE" in table.stdout, table.stderr

    missing = run_tc(*common, "--transcoders", str(tmp_path / "tcs" / "layer_0"), "--layers", "1")
    assert missing.returncode == 2 and "no transcoder for layer 1" in missing.stderr

    narrow = make_transcoder(info, 0)
    narrow.config.d_in = narrow.config.d_out = 8
    save_transcoder(Transcoder(narrow.config), tmp_path / "narrow")
    wide = run_tc(*common, "--transcoders", str(tmp_path / "narrow"))
    assert wide.returncode == 2 and "d_model is 32" in wide.stderr and wide.stderr.count("\n") == 1

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    no_text = run_tc(*common[:4], str(empty), "--transcoders", str(tmp_path / "tcs"))
    assert no_text.returncode == 2 and "no text" in no_text.stderr


def test_load_for_eval_refuses_mismatches(tmp_path, tiny_models, tiny_model_dirs):
    from tccli.config.evaluation import EvalConfig
    from tccli.errors import TcError
    from tccli.evaluation.evaluate import check_kind
    from tccli.transcoders.formats import load_checked_transcoders

    def load_for_eval(config, loaded):
        """The transcoders `tc eval` loads: checked against the model, then against --kind."""
        transcoders = load_checked_transcoders(config.transcoders, loaded, config.layers)
        check_kind(transcoders, config.kind)
        return transcoders

    loaded = tiny_models["llama"]
    info = loaded.info

    def config(path, **kwargs):
        return EvalConfig(model=str(tiny_model_dirs["llama"]), data=["x"], transcoders=str(path), **kwargs)

    wrong_hook = make_transcoder(info, 0)
    wrong_hook.config.input_hook = info.layer(1).mlp_in
    save_transcoder(wrong_hook, tmp_path / "hook")
    with pytest.raises(TcError, match="reads blocks.1.ln2.hook_normalized"):
        load_for_eval(config(tmp_path / "hook"), loaded)

    other_model = make_transcoder(info, 0)
    other_model.config.model_architecture = "GPT2LMHeadModel"
    save_transcoder(other_model, tmp_path / "arch")
    with pytest.raises(TcError, match="trained on a GPT2LMHeadModel model"):
        load_for_eval(config(tmp_path / "arch"), loaded)

    other_processing = make_transcoder(info, 0)
    other_processing.config.weight_processing = {"fold_ln": False}
    save_transcoder(other_processing, tmp_path / "processing")
    with pytest.raises(TcError, match="other weight processing"):
        load_for_eval(config(tmp_path / "processing"), loaded)

    save_transcoder(make_transcoder(info, 1, kind="sae"), tmp_path / "sae")
    with pytest.raises(TcError, match="--kind transcoder given, but the file for layer 1 holds a sae"):
        load_for_eval(config(tmp_path / "sae", kind="transcoder"), loaded)
    assert list(load_for_eval(config(tmp_path / "sae", kind="sae"), loaded)) == [1]


def test_result_table_and_json_without_nan():
    from rich.console import Console

    from tccli.evaluation.evaluate import EvalResult, result_table

    row = {
        "layer": 3,
        "l0": 2.5,
        "fvu": 0.25,
        "mse": 0.01,
        "dead_features": 4,
        "dense_features": 1,
        "ce_clean": 2.0,
        "ce_spliced": 2.5,
        "ce_zero_ablated": 2.0,
        "ce_mean_ablated": 3.0,
        "recovered_zero": fraction_recovered(2.0, 2.5, 2.0),
        "recovered_mean": 0.5,
        "kl": 0.125,
    }
    result = EvalResult([row], None, n_tokens=64, n_scored=62)
    console = Console(record=True, width=200)
    console.print(result_table(result))
    text = console.export_text()
    assert "64 tokens, 62 next-token predictions" in text
    assert "2.50" in text and "0.2500" in text and "n/a" in text and "0.500" in text and "all" not in text
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["layers"][0]["recovered_zero"] is None and data["layers"][0]["recovered_mean"] == 0.5


def test_result_table_fits_80_columns_unless_wide():
    from rich.console import Console

    from tccli.evaluation.evaluate import EvalResult, result_table

    # the widest values a real run shows: five-digit dead counts, negative recovered fractions
    row = {
        "layer": 11,
        "l0": 128.25,
        "fvu": 1.2345,
        "mse": 0.0123,
        "dead_features": 24576,
        "dense_features": 12,
        "ce_clean": 3.2981,
        "ce_spliced": 10.1234,
        "ce_zero_ablated": 9.0,
        "ce_mean_ablated": 3.5,
        "recovered_zero": -12.125,
        "recovered_mean": -0.5,
        "kl": 11.0625,
    }
    result = EvalResult([row], {**row, "layer": "all"}, n_tokens=100_000, n_scored=99_219)
    narrow = Console(record=True, width=80)
    narrow.print(result_table(result))
    text = narrow.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80 and "\u2026" not in text  # nothing cut
    for cell in ("128.25", "1.2345", "24576", "10.1234", "-12.125", "-0.500", "11.0625", "CE clean 3.2981"):
        assert cell in text, cell
    header = next(line for line in text.splitlines() if "layer" in line)
    assert "MSE" not in header and "CE zero-abl" not in header and "--wide" in text
    wide = Console(record=True, width=200)
    wide.print(result_table(result, wide=True))
    text = wide.export_text()
    assert all(title in text for title in ("MSE", "dense", "CE clean", "CE zero-abl", "CE mean-abl", "0.0123"))


def test_result_table_says_when_too_few_tokens_to_call_a_feature_dead():
    """Under 50k tokens a feature of density 1e-4 is often never seen: the table says "dead" means
    "not seen in these tokens" and names the bound; from 50k tokens on it says nothing."""
    from rich.console import Console

    from tccli.evaluation.evaluate import DEAD_TOKENS, EvalResult, result_table

    row = {"layer": 0, "l0": 8.0, "fvu": 0.1, "dead_features": 223, "ce_spliced": 2.3, "kl": 0.01}

    def printed(n_tokens: int, wide: bool = False) -> str:
        console = Console(record=True, width=200)
        console.print(result_table(EvalResult([row], None, n_tokens=n_tokens, n_scored=n_tokens - 1), wide=wide))
        return console.export_text()

    few = printed(9_984)
    assert "not active in these 9,984 tokens" in few and "density below 3e-04" in few and "--tokens 50k" in few
    assert "not active in these" in printed(9_984, wide=True)
    # the bound is the rule of three: (1 - 3/n)^n is about 5%
    assert (1 - 3 / 9_984) ** 9_984 == pytest.approx(0.05, rel=0.01)
    # from DEAD_TOKENS on, a feature of density 1e-4 goes unseen with probability at most 1%: no warning
    assert (1 - 1e-4) ** DEAD_TOKENS <= 0.01 < (1 - 1e-4) ** (DEAD_TOKENS - 1000)
    assert "not active in these" in printed(DEAD_TOKENS - 1)
    assert "not active in these" not in printed(DEAD_TOKENS) and "too few" not in printed(49_920, wide=True)
