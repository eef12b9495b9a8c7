"""`tc eval`, `tc greater-than` and `tc validate` with a cross-layer transcoder (docs/method.md section 11): the
all-layers row and the per-layer rows against a plain HuggingFace forward pass with the CLT written out by
hand, and a CLT whose decoders to later layers are zero giving its per-layer set's results bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from circuit_helpers import random_clt, random_transcoders, save_transcoders
from conftest import run_tc
from tccli.circuit.files import to_json
from tccli.circuit.trace import circuit_graph
from tccli.config.circuit import CircuitConfig
from tccli.evaluation.evaluate import evaluate
from tccli.transcoders.files import save_cross_layer

PROMPT = "The war lasted from 1735 to 17"


def sample_tokens(loaded, rows=6, context=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, loaded.info.d_vocab, (rows, context), generator=generator)
    tokens[:, 0] = loaded.info.bos_token_id
    return tokens


def plain_gpt2_with_clt(model_dir, clt, tokens: torch.Tensor, replaced: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean logits, logits with the MLPs of ``replaced`` replaced by a resid_mid -> mlp_out ReLU CLT) of the
    plain HuggingFace GPT-2, by torch hooks and independently of tccli: each layer's features read tc's
    resid_mid (the residual in front of ln_2, centred: see circuit_helpers.plain_gpt2_with_transcoders) of the
    same forward pass, and MLP l' outputs sum over l <= l' of relu((x_l - b_pre) W_enc + b_enc) W_dec[:, l' - l]
    + b_dec^l'."""
    from transformers import AutoModelForCausalLM

    assert clt.config.input_space == "resid_mid" and clt.config.activation == "relu" and not clt.config.skip
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    features: dict[int, torch.Tensor] = {}

    def read(layer: int, residual: torch.Tensor) -> None:
        key = str(layer)
        x = residual - residual.mean(-1, keepdim=True)
        features[layer] = torch.relu((x - clt.b_pre[key]) @ clt.W_enc[key] + clt.b_enc[key])

    def output(layer: int) -> torch.Tensor:
        out = clt.b_dec[str(layer)]
        for source in range(layer + 1):
            out = out + features[source] @ clt.W_dec[str(source)][:, layer - source]
        return out

    handles = []
    try:
        with torch.no_grad():
            clean = model(tokens).logits
            for layer in clt.layers:
                block = model.transformer.h[layer]
                handles.append(block.ln_2.register_forward_pre_hook(lambda m, a, layer=layer: read(layer, a[0])))
                if layer in replaced:
                    handles.append(block.mlp.register_forward_hook(lambda m, a, out, layer=layer: output(layer)))
            spliced = model(tokens).logits
    finally:
        for handle in handles:
            handle.remove()
    return clean, spliced


def kl_and_ce(clean: torch.Tensor, spliced: torch.Tensor, tokens: torch.Tensor) -> tuple[float, float]:
    clean_lp = torch.log_softmax(clean[:, :-1].double(), -1)
    spliced_lp = torch.log_softmax(spliced[:, :-1].double(), -1)
    kl = float((clean_lp.exp() * (clean_lp - spliced_lp)).sum(-1).mean())
    return kl, float(-spliced_lp.gather(-1, tokens[:, 1:, None]).mean())


def test_all_layers_and_per_layer_rows_are_plain_huggingface_with_the_clt(tiny_models, tiny_model_dirs):
    """The all-layers row replaces both MLPs at once (layer 1's features reading the replaced model); layer 1's
    row replaces MLP 1 only, from the clean inputs of layers 0 and 1; layer 0's row is the per-layer set's,
    since nothing writes to layer 0 but layer 0 itself. b_dec is shifted by 1 so that the outputs have a large
    mean, which no reader may see (as in test_evaluate)."""
    loaded = tiny_models["gpt2"]
    kwargs = dict(input_space="resid_mid", output_space="mlp_out")
    clt = random_clt(loaded.info, 48, 3, 1.0, **kwargs)
    transcoders = random_transcoders(loaded.info, 48, 3, **kwargs)
    with torch.no_grad():
        for layer in clt.layers:
            clt.b_dec[str(layer)].add_(1.0)
            transcoders[layer].b_dec.add_(1.0)
    tokens = sample_tokens(loaded)
    result = evaluate(loaded, clt, tokens, batch_size=len(tokens))
    by_set = evaluate(loaded, transcoders, tokens, batch_size=len(tokens))

    for row, replaced in ((result.all_layers, [0, 1]), (result.layers[1], [1])):
        kl, ce = kl_and_ce(*plain_gpt2_with_clt(tiny_model_dirs["gpt2"], clt, tokens, replaced), tokens)
        assert kl > 0.005  # the CLT changes the model
        assert row["kl"] == pytest.approx(kl, rel=1e-5) and row["ce_spliced"] == pytest.approx(ce, rel=1e-6)
    assert result.layers[0] == by_set.layers[0]
    assert result.layers[1]["fvu"] != by_set.layers[1]["fvu"]
    assert result.layers[1]["l0"] == by_set.layers[1]["l0"]  # the same encoders on the same clean inputs
    all_ce = result.all_layers["ce_spliced"]
    assert all_ce not in (
        result.layers[0]["ce_spliced"],
        result.layers[1]["ce_spliced"],
        by_set.all_layers["ce_spliced"],
    )
    assert result.all_layers["ce_zero_ablated"] == by_set.all_layers["ce_zero_ablated"]  # ablation is the model's


@pytest.mark.parametrize("arch, activation, skip", [("gpt2", "jumprelu", True), ("llama", "topk", False)])
def test_a_clt_with_zero_later_decoders_evaluates_as_its_set_bit_for_bit(tiny_models, arch, activation, skip):
    loaded = tiny_models[arch]
    transcoders = random_transcoders(loaded.info, 48, 0, bias_shift=-0.3, activation=activation, skip=skip)
    clt = random_clt(loaded.info, 48, 0, 0.0, bias_shift=-0.3, activation=activation, skip=skip)
    tokens = sample_tokens(loaded)
    assert evaluate(loaded, clt, tokens, 4).to_dict() == evaluate(loaded, transcoders, tokens, 4).to_dict()


# ----------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def saved(tiny_model_dirs, tiny_models, tmp_path_factory):
    """The tiny GPT-2's sparse random set, the CLT equal to it (zero decoders to later layers) and a CLT that
    writes to later layers, saved."""
    root = tmp_path_factory.mktemp("clt_eval")
    info = tiny_models["gpt2"].info
    return dict(
        root=root,
        model=str(tiny_model_dirs["gpt2"]),
        set=str(save_transcoders(random_transcoders(info, 48, 0, bias_shift=-0.3), root / "set")),
        equal=str(save_cross_layer(random_clt(info, 48, 0, 0.0, bias_shift=-0.3), root / "clt0")),
        clt=str(save_cross_layer(random_clt(info, 48, 0, 1.0, bias_shift=-0.3), root / "clt1")),
    )


def without_paths(report: dict) -> dict:
    """A tc eval report less what names the files it read (and the CLT's own mark)."""
    return {k: v for k, v in report.items() if k not in ("transcoders", "config", "cross_layer")}


def test_eval_command_on_a_clt(saved, text_file):
    common = ["eval", "--model", saved["model"], "--data", str(text_file), "--tokens", "256", "--context", "32"]

    def run(which, *args):
        result = run_tc(*common, "--transcoders", saved[which], *args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    by_set, equal = json.loads(run("set", "--json")), json.loads(run("equal", "--json"))
    assert equal["cross_layer"] is True and "cross_layer" not in by_set
    assert without_paths(equal) == without_paths(by_set)
    assert run("equal", "--wide", "--quiet") == run("set", "--wide", "--quiet")
    writing = json.loads(run("clt", "--json"))
    assert [row["layer"] for row in writing["layers"]] == [0, 1] and writing["all_layers"]["layers"] == [0, 1]
    assert writing["layers"][0] == by_set["layers"][0] and writing["layers"][1] != by_set["layers"][1]
    # --layers picks the rows; the CLT stays whole, so layer 1's row is the same
    one = json.loads(run("clt", "--layers", "1", "--json"))
    assert one["layers"] == writing["layers"][1:] and one["all_layers"] is None
    for args, message in (
        (["--layers", "5"], "out of range"),
        (["--kind", "sae"], "--kind sae given"),
    ):
        bad = run_tc(*common, "--transcoders", saved["clt"], *args)
        assert bad.returncode == 2 and message in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr


def test_greater_than_command_on_a_clt_prints_the_sets_figures(builtin_model, tmp_path):
    info = builtin_model.info
    set_folder = save_transcoders(random_transcoders(info, 64, 0, bias_shift=-0.5), tmp_path / "set")
    clt_folder = save_cross_layer(random_clt(info, 64, 0, 0.0, bias_shift=-0.5), tmp_path / "clt")
    outputs = [run_tc("greater-than", "--transcoders", str(folder), "--json") for folder in (set_folder, clt_folder)]
    assert all(out.returncode == 0 for out in outputs), outputs[0].stderr + outputs[1].stderr
    report = json.loads(outputs[1].stdout)
    assert outputs[0].stdout == outputs[1].stdout and report["all_replaced"] is not None
    assert len(report["replaced"]) == info.n_layers


@pytest.fixture(scope="module")
def traced_graph(saved, tiny_models):
    """A tc circuit graph traced with the set, and a copy of it that names the equal CLT as its transcoders."""
    loaded = tiny_models["gpt2"]
    config = CircuitConfig(
        model=saved["model"], transcoders=saved["set"], prompt=PROMPT, logit_diff=["1", "0"], iters=2, branches=6
    )
    config.validate()
    transcoders = random_transcoders(loaded.info, 48, 0, bias_shift=-0.3)
    graph, _ = circuit_graph(loaded, transcoders, PROMPT, config)
    path = saved["root"] / "graph.json"
    path.write_text(to_json(graph))
    data = json.loads(path.read_text())
    data["graph"]["metadata"]["transcoders"] = saved["equal"]
    clt_path = saved["root"] / "graph-clt.json"
    clt_path.write_text(json.dumps(data))
    return dict(set=path, clt=clt_path)


def test_validate_command_on_a_clt_graph_gives_the_sets_results(saved, traced_graph):
    def validate(graph, *args):
        result = run_tc("validate", str(graph), "--random", "2", "--json", *args)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    by_set = validate(traced_graph["set"])
    from_metadata = validate(traced_graph["clt"])  # the graph names the CLT: loaded through load_transcoders
    assert from_metadata.pop("graph") != by_set.pop("graph")
    assert from_metadata == by_set
    for mode in ("free", "frozen"):  # --transcoders names the CLT for a graph traced with the set
        by_clt = validate(traced_graph["set"], "--transcoders", saved["equal"], "--mode", mode)
        assert by_clt == validate(traced_graph["set"], "--mode", mode), mode
    writing = validate(traced_graph["set"], "--transcoders", saved["clt"])
    assert writing["transcoder_layers"] == [0, 1]
    assert writing["circuit"]["necessity"] != by_set["circuit"]["necessity"]
