"""Feature scores of cross-layer transcoders (tccli.features.cross_layer): `tc score`, `tc show` and
`tc deembed` on a saved CLT folder give exactly the per-layer set's results when its decoders to later layers
are zero; with them, the logit effect and pullbacks are the hand-summed decoders; CLT features are marked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import TOKENIZER_TEXT, build_tiny_model, run_tc
from tccli.features.files import FeaturesFile

CLT_ONLY_RECORD_KEYS = ("decoder_norms",)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clt_corpus") / "corpus.txt"
    path.write_text("\n\n".join(f"Tale {i}. " + TOKENIZER_TEXT[i % 4] for i in range(24)))
    return path


def score(model_dir, transcoders, corpus, out, *extra) -> None:
    result = run_tc(
        "score",
        "--model",
        str(model_dir),
        "--transcoders",
        str(transcoders),
        "--data",
        str(corpus),
        "--tokens",
        "320",
        "--context",
        "32",
        "--top",
        "4",
        "--quantiles",
        "2",
        "--per-quantile",
        "2",
        "--batch-size",
        "4",
        "--out",
        str(out),
        "--quiet",
        *extra,
    )
    assert result.returncode == 0, result.stderr


def records(path: Path) -> dict:
    features = FeaturesFile.open(path)
    return {
        (layer, i): features.feature(layer, i) for layer in features.layers for i in range(features.n_features(layer))
    }


def without_clt_keys(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in CLT_ONLY_RECORD_KEYS}


@pytest.fixture(scope="module")
def scored_pair(tiny_model_dirs, random_transcoder_folder, random_clt_folder, corpus, tmp_path_factory):
    """`tc score` of the tiny GPT-2's random per-layer set and of the CLT with the same weights and zero
    decoders to later layers, to .h5 and .jsonl."""
    root = tmp_path_factory.mktemp("clt_scores")
    out = {}
    for name, folder in (
        ("set", random_transcoder_folder("gpt2")),
        ("clt", random_clt_folder("gpt2", off_diagonal=0.0)),
    ):
        for suffix in ("h5", "jsonl"):
            out[name, suffix] = root / name / f"features.{suffix}"  # one name: pages show it
            out[name, suffix].parent.mkdir(exist_ok=True)
            score(tiny_model_dirs["gpt2"], folder, corpus, out[name, suffix])
    return out


@pytest.mark.parametrize("suffix", ["h5", "jsonl"])
def test_zero_off_diagonal_clt_scores_exactly_as_the_per_layer_set(scored_pair, suffix):
    per_layer, cross_layer = records(scored_pair["set", suffix]), records(scored_pair["clt", suffix])
    assert per_layer.keys() == cross_layer.keys() and len(per_layer) == 2 * 48
    fired = 0
    for key, record in per_layer.items():
        assert "decoder_norms" not in record
        assert without_clt_keys(cross_layer[key]) == record  # every score, example and float identical
        fired += bool(record["top_examples"])
        layer = key[0]
        writes = dict(cross_layer[key]["decoder_norms"])
        assert sorted(writes) == list(range(layer, 2))  # the layers it writes to
        assert writes[layer] > 0 and all(writes[t] == 0.0 for t in writes if t > layer)
    assert fired > 10  # the comparison covers real examples
    clt_meta = FeaturesFile.open(scored_pair["clt", suffix]).meta
    assert clt_meta["cross_layer_transcoder"]["layers"] == [0, 1]
    assert "cross_layer_transcoder" not in FeaturesFile.open(scored_pair["set", suffix]).meta


def test_zero_off_diagonal_clt_shows_as_the_per_layer_set(scored_pair):
    for feature in ("L0.F3", "L1.F7"):
        shown = {name: run_tc("show", str(scored_pair[name, "h5"]), feature) for name in ("set", "clt")}
        assert all(result.returncode == 0 for result in shown.values()), shown["clt"].stderr
        writes = [line for line in shown["clt"].stdout.splitlines() if line.startswith("writes (decoder norm)")]
        layer = int(feature[1])
        assert len(writes) == 1 and [f"L{t}" for t in range(layer, 2)] == re.findall(r"L\d+", writes[0])
        assert shown["clt"].stdout.replace(writes[0] + "\n", "") == shown["set"].stdout
    pages = {}
    for name in ("set", "clt"):
        page = Path(scored_pair[name, "h5"]).with_suffix(".html")
        result = run_tc("show", str(scored_pair[name, "h5"]), "--html", str(page), "--features", "L0.F3,L1.F7")
        assert result.returncode == 0, result.stderr
        pages[name] = page.read_text()
    writes_table = re.compile(r'<table class="tok writes"><caption>writes \(decoder norm\)</caption>.*?</table>')
    assert len(writes_table.findall(pages["clt"])) == 2 and not writes_table.findall(pages["set"])
    assert writes_table.sub("", pages["clt"]) == pages["set"]


def deembed(model_dir, folder, *extra):
    result = run_tc(
        "deembed", "--model", str(model_dir), "--transcoders", str(folder), "--feature", "L1.F5", "--top", "8", *extra
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_zero_off_diagonal_clt_deembeds_as_the_per_layer_set(
    tiny_model_dirs, random_transcoder_folder, random_clt_folder
):
    model_dir = tiny_model_dirs["gpt2"]
    for extra in ((), ("--head", "L0.H1")):
        per_layer = deembed(model_dir, random_transcoder_folder("gpt2"), *extra)
        assert len(per_layer.splitlines()) == 8
        assert deembed(model_dir, random_clt_folder("gpt2", off_diagonal=0.0), *extra) == per_layer
        # the encoder side is per layer, whatever the decoders to later layers
        assert deembed(model_dir, random_clt_folder("gpt2"), *extra) == per_layer


def test_deembed_of_a_clt_names_its_layers_for_a_missing_one(tiny_model_dirs, random_clt_folder):
    result = run_tc(
        "deembed", "--model", str(tiny_model_dirs["gpt2"]), "--transcoders", str(random_clt_folder("gpt2")),
        "--feature", "L5.F0",
    )  # fmt: skip
    assert result.returncode != 0 and result.stderr.startswith("tc: error:") and "Traceback" not in result.stderr
    assert "no transcoder for layer 5 (have layers [0, 1])" in result.stderr, result.stderr


# ----------------------------------------------------------------------------- decoders to later layers


@pytest.fixture(scope="module")
def three_layer_gemma(tmp_path_factory):
    """A 3-layer tiny Gemma-2 (its post-MLP norm weights each target layer's writes) and a random CLT on it
    with decoders to later layers, saved."""
    from circuit_helpers import loaded_model, random_clt
    from tccli.transcoders.files import save_cross_layer

    root = tmp_path_factory.mktemp("clt_gemma")
    model_dir = build_tiny_model("gemma2", root / "model", n_layers=3)
    loaded = loaded_model(model_dir)
    # output space mlp_output: the writes are the MLP's output before the post-MLP norm, whose weight then
    # moves each write into the residual stream (frozen scale left out, as for a per-layer transcoder)
    clt = random_clt(loaded.info, 24, 3, 1.0, output_space="mlp_output")
    return model_dir, loaded, clt, save_cross_layer(clt, root / "clt")


def test_a_clt_features_logit_effect_and_pullbacks_are_its_summed_decoders(three_layer_gemma, corpus, tmp_path):
    """Scoring layers 0 and 2 only: layer 0's logit effect sums its writes to layers 0, 1 and 2 (layer 1 not
    scored), each through that layer's post-MLP norm weight, times W_U; layer 2's pullbacks of layer 0 read
    its writes to layers 0 and 1, which reach layer 2's input."""
    from tccli.features.weight_scores import LayerReads, top_entries

    model_dir, loaded, clt, folder = three_layer_gemma
    out = tmp_path / "f.jsonl"
    score(model_dir, folder, corpus, out, "--layers", "0,2", "--top-tokens", "6")
    scored = records(out)
    assert {layer for layer, _ in scored} == {0, 2}
    W_U = loaded.bridge.W_U.detach().float()
    post = {t: loaded.spaces[t].post_weight.float() for t in range(3)}
    assert all(weight is not None for weight in post.values())

    def write(source: int, target: int) -> torch.Tensor:  # W_dec^(source -> target) as it enters the residual
        return clt.W_dec[str(source)][:, target - source, :].detach().float() * post[target]

    total = write(0, 0)
    for target in (1, 2):
        total = total + write(0, target)
    promoted, promoted_values = top_entries(total @ W_U, 6)
    suppressed, suppressed_values = top_entries(total @ W_U, 6, largest=False)
    own_only, _ = top_entries(write(0, 0) @ W_U, 6)
    assert (own_only != promoted).any()  # the later layers' writes change the answer
    reaching_2 = write(0, 0) + write(0, 1)
    reader = LayerReads.of(clt.layer_transcoder(2), loaded.spaces[2])
    pull_feature, pull_value = top_entries(reader.encoders @ reaching_2.T, 6)  # only layer 0 is scored before 2
    for i in range(24):
        record = scored[0, i]
        assert record["logit_promoted"] == [[int(t), float(v)] for t, v in zip(promoted[i], promoted_values[i])]
        assert record["logit_suppressed"] == [[int(t), float(v)] for t, v in zip(suppressed[i], suppressed_values[i])]
        norms = [[t, float(clt.W_dec["0"][i, t].detach().float().norm())] for t in range(3)]
        assert record["decoder_norms"] == norms
        assert scored[2, i]["pullbacks"] == [[0, int(f), float(v)] for f, v in zip(pull_feature[i], pull_value[i])]
        assert [t for t, _ in scored[2, i]["decoder_norms"]] == [2]


# ----------------------------------------------------------------------------- marking


def test_neuronpedia_feature_files_mark_clt_features(
    tiny_model_dirs, random_transcoder_folder, random_clt_folder, corpus, tmp_path
):
    folders = {"set": random_transcoder_folder("gpt2"), "clt": random_clt_folder("gpt2", off_diagonal=0.0)}
    for name, folder in folders.items():
        score(
            tiny_model_dirs["gpt2"],
            folder,
            corpus,
            tmp_path / name,
            "--format",
            "neuronpedia-features",
            "--scan",
            "./data/f",
        )
    files = sorted(p.name for p in (tmp_path / "set" / "f").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "clt" / "f").iterdir()) and len(files) == 96
    for file in files:
        per_layer = json.loads((tmp_path / "set" / "f" / file).read_text())
        cross_layer = json.loads((tmp_path / "clt" / "f" / file).read_text())
        assert "feature_type" not in per_layer
        assert cross_layer.pop("feature_type") == "cross layer transcoder"  # circuit-tracer's feature node type
        assert cross_layer == per_layer


def test_a_clt_gets_its_own_scan_id(tiny_models, random_transcoder_folder, random_clt_folder):
    from tccli.transcoders.files import load_cross_layer
    from tccli.transcoders.formats import load_transcoder_set
    from tccli.transcoders.set_id import transcoder_set_id

    zero = load_cross_layer(random_clt_folder("gpt2", off_diagonal=0.0))
    full = load_cross_layer(random_clt_folder("gpt2"))
    per_layer = load_transcoder_set(random_transcoder_folder("gpt2"))
    ids = {transcoder_set_id("x", t) for t in (zero, full, per_layer)}
    assert len(ids) == 3 and all(re.fullmatch(r"tc-[0-9a-f]{16}", i) for i in ids)
    assert transcoder_set_id("y", load_cross_layer(random_clt_folder("gpt2"))) == transcoder_set_id("x", full)


def test_graph_files_mark_feature_nodes_as_circuit_tracer_does():
    import networkx as nx

    from tccli.circuit.neuronpedia import attribution_graph_to_neuronpedia

    graph = nx.DiGraph(metadata={"kind": "attribution-graph", "scan": "tc-1", "n_layers": 2, "tokens": ["a"]})
    graph.add_node("f", kind="feature", layer=1, feature=4, position=0, activation=1.0, cumulative_influence=0.5)
    graph.add_node("e", kind="error", layer=0, position=0, cumulative_influence=0.1)
    graph.add_edge("e", "f", weight=0.3)
    nodes = {n["node_id"]: n for n in json.loads(attribution_graph_to_neuronpedia(graph))["nodes"]}
    assert nodes["1_4_0"]["feature_type"] == "cross layer transcoder"
    assert nodes["0_-1_0"]["feature_type"] == "mlp reconstruction error"


def test_score_refuses_a_clt_made_for_another_model_in_one_line(tiny_model_dirs, random_clt_folder, corpus, tmp_path):
    out = tmp_path / "f.h5"
    result = run_tc(
        "score", "--model", str(tiny_model_dirs["llama"]), "--transcoders", str(random_clt_folder("gpt2")),
        "--data", str(corpus), "--tokens", "64", "--context", "32", "--out", str(out),
    )  # fmt: skip
    assert result.returncode != 0 and not out.exists()
    assert result.stderr.startswith("tc: error:") and "Traceback" not in result.stderr
    assert "was trained on a GPT2LMHeadModel model" in result.stderr, result.stderr
