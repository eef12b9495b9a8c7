"""`tc graph`: the library call and the command as users run it (subprocess), every kind of bad input."""

from __future__ import annotations

import json

import pytest
import torch

from circuit_helpers import random_transcoders
from conftest import run_tc
from tccli.config.graph import GraphConfig
from tccli.errors import TcError
from tccli.graph.trace import attribution_graph

PROMPT = "The cat sat on the mat"


@pytest.fixture
def gpt2(tiny_models):
    return tiny_models["gpt2"]


@pytest.fixture
def transcoder_dir(random_transcoder_folder):
    """The saved twin of transcoders(gpt2)."""
    return random_transcoder_folder("gpt2", bias_shift=-0.1)


def config(transcoder_dir, **kwargs) -> GraphConfig:
    made = GraphConfig(**{"transcoders": str(transcoder_dir), "prompt": PROMPT, "max_feature_nodes": 60, **kwargs})
    made.validate()
    return made


def transcoders(loaded):
    return random_transcoders(loaded.info, 48, 0, bias_shift=-0.1)


def test_default_targets_are_the_likely_logits(gpt2, transcoder_dir, one_torch_thread):
    run = attribution_graph(gpt2, transcoders(gpt2), PROMPT, config(transcoder_dir, max_logits=4))
    targets = run.metadata["targets"]
    assert len(targets) == 4 and all(t["kind"] == "logit" and t["position"] == len(run.tokens) - 1 for t in targets)
    weights = [t["weight"] for t in targets]
    assert weights == sorted(weights, reverse=True) and sum(weights) < 0.95  # a random model: flat
    logits = gpt2.bridge(torch.tensor([run.tokens]))[0, -1]
    probs = torch.softmax(logits.double(), -1)
    assert [t["token"] for t in targets] == probs.topk(4).indices.tolist()
    assert weights == pytest.approx(probs.topk(4).values.tolist(), rel=1e-5)
    # value: the logit minus the mean logit, from the real forward pass
    assert targets[0]["value"] == pytest.approx(float(logits[targets[0]["token"]] - logits.mean()), abs=1e-4)
    assert run.metadata["tokens"][0] == "<|endoftext|>" and run.graph.table.n_features == 60
    assert run.graph.n_active_features > 60


def test_chosen_target_and_position(gpt2, transcoder_dir, one_torch_thread):
    run = attribution_graph(gpt2, transcoders(gpt2), PROMPT, config(transcoder_dir, feature="L1.F3", pos=4))
    (target,) = run.metadata["targets"]
    assert target["kind"] == "feature" and target["position"] == 4 and target["weight"] == 1.0
    table = run.graph.table  # only features that can reach the target: earlier layers, tokens <= 4
    assert bool((table.feature_layer < 1).all()) and bool((table.feature_position <= 4).all())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(logit=" the", feature="L1.F3"), "give at most one target"),
        (dict(target="logit"), "--target must be 'logits'"),
        (dict(logit_diff=["a"]), "exactly two tokens"),
        (dict(direction="d.npy"), "needs --layer"),
        (dict(format="svg"), "--format must be one of json, neuronpedia, dot, pt"),
        (dict(node_threshold=1.5), "--node-threshold must be between 0 and 1"),
        (dict(logit_prob=0.0), "--logit-prob must be in"),
        (dict(drop_mass=1.0), "--drop-mass must be in"),
        (dict(batch_size=0), "--batch-size must be at least 1"),
    ],
)
def test_bad_options(transcoder_dir, kwargs, message):
    with pytest.raises(TcError, match=message):
        config(transcoder_dir, **kwargs)


def test_bad_targets(gpt2, transcoder_dir):
    for kwargs, message in (
        (dict(feature="L1.F48"), "feature 48 is out of range"),
        (dict(logit="The cat"), "not one"),
        (dict(pos=40), "outside the prompt"),
    ):
        with pytest.raises(TcError, match=message):
            attribution_graph(gpt2, transcoders(gpt2), PROMPT, config(transcoder_dir, **kwargs))


def test_command_writes_every_format(tiny_model_dirs, transcoder_dir, tmp_path):
    model = str(tiny_model_dirs["gpt2"])
    common = ("graph", "--model", model, "--transcoders", str(transcoder_dir), "--max-feature-nodes", "40")
    result = run_tc(*common, "--prompt", "-", "--out", str(tmp_path / "g.json"), input=PROMPT + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    summary = result.stderr.strip().splitlines()[-1]
    assert summary.startswith("tc graph: ") and "replacement score" in summary and "completeness score" in summary
    graph = json.loads((tmp_path / "g.json").read_text())
    meta = graph["graph"]["metadata"]
    assert meta["prompt"] == PROMPT and meta["kind"] == "attribution-graph"  # stdin, less its newline
    assert {"mlp", "err", "embed", "logit"} >= {n["id"].split("@")[0].rstrip("0123456789.f") for n in graph["nodes"]}
    info = run_tc("info", str(tmp_path / "g.json"))
    assert info.returncode == 0 and "tc attribution graph" in info.stdout and "replacement" in info.stdout
    exported = run_tc("export", str(tmp_path / "g.json"), "--format", "neuronpedia")
    direct = run_tc(*common, "--prompt", PROMPT, "--format", "neuronpedia", "--quiet")
    assert direct.returncode == 0 and direct.stderr == ""
    assert json.loads(exported.stdout)["nodes"] == json.loads(direct.stdout)["nodes"]
    dot = run_tc(*common, "--prompt", PROMPT, "--format", "dot", "--quiet")
    assert dot.stdout.startswith("digraph") and "->" in dot.stdout
    pt = run_tc(*common, "--prompt", PROMPT, "--format", "pt", "--quiet", "--out", str(tmp_path / "g.pt"))
    assert pt.returncode == 0
    data = torch.load(tmp_path / "g.pt", weights_only=True)
    assert data["row_nodes"].shape[0] == 40 + len(meta["targets"]) and data["crow"][-1] == data["col"].shape[0]


def test_command_errors_are_one_line(tiny_model_dirs, transcoder_dir, tmp_path):
    model = str(tiny_model_dirs["gpt2"])
    for args, message in (
        (("--feature", "L1.F3", "--logit", " the"), "give at most one target"),
        (("--feature", "L5.F3"), "no transcoder for layer 5"),
        (("--transcoders", str(tmp_path / "none")), "do not exist"),
    ):
        result = run_tc(
            "graph",
            "--model",
            model,
            "--transcoders",
            str(transcoder_dir),
            "--prompt",
            PROMPT,
            "--out",
            str(tmp_path / "g.json"),
            *args,
        )
        assert result.returncode != 0
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("tc: error:") and message in lines[0], result.stderr
        assert not (tmp_path / "g.json").exists()


def test_heads_become_nodes_and_edges_keep_their_totals(gpt2, transcoder_dir, one_torch_thread):
    from tccli.graph import files as graph_files

    run = attribution_graph(gpt2, transcoders(gpt2), PROMPT, config(transcoder_dir, heads=True, max_logits=3))
    assert run.heads is not None
    graph = graph_files.to_networkx(run.graph, run.metadata, run.strings, run.tokens, run.heads)
    heads = [n for n, kind in graph.nodes(data="kind") if kind == "head"]
    assert heads and all(n.startswith("attn") for n in heads)
    routed: dict = {}
    for u, v, attrs in graph.edges(data=True):
        if "total" in attrs:
            # the direct edge's weight + what goes through head nodes == the edge; residual + heads == the edge
            assert attrs["residual"] + sum(attrs["heads"].values()) + attrs["other_heads"] == pytest.approx(
                attrs["total"], rel=1e-4, abs=1e-6
            )
            routed[u, v] = attrs["total"] - attrs["weight"]
    through = {}
    for layer, head, token in {k for parts in run.heads.parts for k in parts}:
        node = f"attn{layer}.h{head}@{token}"
        assert graph.nodes[node]["kind"] == "head" and graph.nodes[node]["position"] == token
        through[node] = sum(w for _, _, w in graph.in_edges(node, data="weight"))
        assert through[node] == pytest.approx(sum(w for _, _, w in graph.out_edges(node, data="weight")), abs=1e-6)
    assert sum(routed.values()) == pytest.approx(sum(through.values()), rel=1e-4, abs=1e-6)


# ----------------------------------------------------------------------------- cross-layer transcoders


def graph_json(model: str, folder, *flags: str) -> dict:
    result = run_tc(
        "graph",
        "--model",
        model,
        "--transcoders",
        str(folder),
        "--prompt",
        PROMPT,
        "--quiet",
        "--max-feature-nodes",
        "40",
        *flags,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# what names the transcoders given (their folder, its id) rather than the graph computed from them
NAMING_THE_INPUT = ("transcoders", "scan", "config", "cross_layer", "slug")


def test_command_on_a_cross_layer_transcoder_without_cross_writes_is_the_per_layer_sets(
    tiny_model_dirs, random_transcoder_folder, random_clt_folder
):
    """A saved CLT whose decoders to later layers are zero gives, through `tc graph`, exactly the graph of the
    saved per-layer set with the same weights: nodes, links, scores (everything but the input's name)."""
    model = str(tiny_model_dirs["gpt2"])
    per_layer = graph_json(model, random_transcoder_folder("gpt2"))
    clt = graph_json(model, random_clt_folder("gpt2", off_diagonal=0.0))
    assert clt["graph"]["metadata"]["cross_layer"] is True and per_layer["graph"]["metadata"]["cross_layer"] is False
    for graph in (per_layer, clt):
        metadata = graph["graph"]["metadata"]
        for key in [*NAMING_THE_INPUT, *(key for key in metadata if key.startswith("seconds"))]:  # and timings
            metadata.pop(key, None)
    assert len(per_layer["nodes"]) > 20 and len(per_layer["links"]) > 20
    assert clt == per_layer


def test_command_on_a_cross_layer_transcoder_scores_with_its_errors(
    tiny_model_dirs, random_transcoder_folder, random_clt_folder
):
    """With decoders to later layers, the graph's features are the same (the same encoders) but its error nodes
    are the CLT's (MLP output - everything the CLT writes there), so its scores and links differ."""
    model = str(tiny_model_dirs["gpt2"])
    per_layer = graph_json(model, random_transcoder_folder("gpt2"))
    clt = graph_json(model, random_clt_folder("gpt2", off_diagonal=1.0))
    scores = lambda graph: {k: v for k, v in graph["graph"]["metadata"].items() if "score" in k}  # noqa: E731
    assert scores(clt) and scores(clt) != scores(per_layer)
    assert clt["links"] != per_layer["links"]
