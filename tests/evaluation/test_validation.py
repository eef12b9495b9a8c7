"""`tc validate`: the metrics worked out by hand, and every figure it reports recomputed from single runs of
the replacement model."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch

from circuit_helpers import random_transcoders, save_transcoders
from conftest import run_tc
from tccli.circuit.files import to_json
from tccli.circuit.trace import circuit_graph
from tccli.config.circuit import CircuitConfig
from tccli.config.evaluation import ValidateConfig
from tccli.errors import TcError
from tccli.evaluation.validation import map_position, node_attribution, run_validation, target_from_metadata
from tccli.evaluation.validation_math import (
    average_ranks,
    largest_disagreements,
    necessity,
    sample_random_circuit,
    spearman,
    sufficiency,
)
from tccli.nodes import Intervention, NodeRef, parse_node
from tccli.replacement.model import ReplacementModel, RowSpec
from tccli.replacement.targets import unembed_target

PROMPT = "The war lasted from 1735 to 17"
T = "--transcoders"


# ---------------------------------------------------------------------------- pure math


def test_spearman_by_hand():
    assert average_ranks([10, 30, 20, 30]) == [1.0, 3.5, 2.0, 3.5]
    # no ties: 1 - 6 sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 60
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # ties: ranks [1.5, 1.5, 3] against [1, 2, 3]: covariance 1.5 over sqrt(1.5 * 2)
    assert spearman([1, 1, 2], [5, 6, 7]) == pytest.approx(1.5 / math.sqrt(3))
    assert spearman([3, 2, 1], [1, 2, 3]) == pytest.approx(-1.0)
    assert spearman([1, 5, 2], [10, 1000, 11]) == pytest.approx(1.0)  # ranks, not values
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1], [2]))


def test_necessity_sufficiency_and_disagreements():
    assert necessity([2.0, 4.0], [1.0, 2.0]) == pytest.approx(0.5)  # ratio of means, not mean of ratios
    assert necessity([1.0, -1.0], [0.0, 0.0]) != necessity([1.0, -1.0], [0.0, 0.0])  # NaN when T0 sums to 0
    assert sufficiency([2.0, 4.0], [3.0, 0.0]) == pytest.approx(0.5)
    rows = largest_disagreements(["a", "b", "c"], [1.0, 0.0, 5.0], [1.5, -3.0, 5.0], 2)
    assert [r["id"] for r in rows] == ["b", "a"] and rows[0]["difference"] == -3.0


def test_random_circuit_has_the_same_size_layers_and_positions():
    circuit = [
        NodeRef("feature", 0, 1, 3),
        NodeRef("feature", 0, 2, 3),
        NodeRef("feature", 1, 7, 2),
        NodeRef("head", 1, 0, 4),
        NodeRef("head", 0, 3, 1),
    ]
    active = {(0, 3): [1, 2, 5, 9], (1, 2): [7], (1, 5): [8, 11]}
    draws = [sample_random_circuit(circuit, active, 4, range(1, 6), random.Random(seed)) for seed in range(20)]
    for drawn in draws:
        assert len(drawn) == len(circuit) and not set(drawn) & set(circuit) and len(set(drawn)) == len(drawn)
        for old, new in zip(circuit, drawn):
            assert (new.kind, new.layer) == (old.kind, old.layer)
        assert {n.index for n in drawn[:2]} <= {5, 9} and all(n.position == 3 for n in drawn[:2])
        assert drawn[2].position == 5 and drawn[2].index in (8, 11)  # (1, 2) holds only the circuit's own
        assert 1 <= drawn[3].position <= 5
    assert draws[0] == sample_random_circuit(circuit, active, 4, range(1, 6), random.Random(0))
    assert len({tuple(d) for d in draws}) > 1
    with pytest.raises(TcError, match="random stand-in"):
        sample_random_circuit([NodeRef("feature", 0, 1, 3)], {(0, 3): [1]}, 4, range(1, 6), random.Random(0))


def test_positions_by_offset_from_the_end_and_attributions_by_any_name():
    assert map_position(0, 10, 7) == 0 and map_position(9, 10, 7) == 6 and map_position(5, 10, 12) == 7
    assert map_position(3, 10, 7) is None  # before the shorter prompt's first token
    assert node_attribution({"contribution": 2.0}) == 2.0  # a graph written before path_contribution
    assert node_attribution({"path_contribution": -1.0, "direct_contribution": 2.0}) == -1.0
    assert node_attribution({"path_contribution": None}) == 0.0


def test_path_attributions_of_a_direct_effect_graph_by_hand():
    """A -> T 3 (A active at 2); B -> A 0.5 of which 0.2 through head H, B -> T 1; error E -> A 0.2; X -> B 4.
    D(T) = 1, D(A) = 3 / 2; B: 1 + 0.5 * 1.5 = 1.75; H: 0.2 * 1.5; E: 0.2 * 1.5; X: 4 * 1.75 / 1 (B at 1)."""
    import networkx as nx

    from tccli.evaluation.validation import circuit_nodes, path_attributions

    graph = nx.DiGraph()
    graph.add_node("T", kind="target")
    graph.add_node("mlp1.f0@3", kind="feature", layer=1, feature=0, position=3, activation=2.0)
    graph.add_node("mlp0.f5@2", kind="feature", layer=0, feature=5, position=2, activation=1.0)
    graph.add_node("attn1.h1@2", kind="head", layer=1, head=1, position=2)
    graph.add_node("err0@3", kind="error", layer=0, position=3)
    graph.add_node("embed@2", kind="embed", position=2)
    graph.add_edge("mlp1.f0@3", "T", weight=3.0)
    graph.add_edge("mlp0.f5@2", "mlp1.f0@3", weight=0.3, heads={"L1.H1@2": 0.2})
    graph.add_edge("mlp0.f5@2", "attn1.h1@2", weight=0.2)
    graph.add_edge("attn1.h1@2", "mlp1.f0@3", weight=0.2)
    graph.add_edge("mlp0.f5@2", "T", weight=1.0)
    graph.add_edge("err0@3", "mlp1.f0@3", weight=0.2)
    graph.add_edge("embed@2", "mlp0.f5@2", weight=4.0)
    got = path_attributions(graph, "T")
    expected = {"mlp1.f0@3": 3.0, "mlp0.f5@2": 1.75, "attn1.h1@2": 0.3, "err0@3": 0.3, "embed@2": 7.0}
    assert got == pytest.approx(expected)
    graph.graph["metadata"] = {
        "kind": "attribution-graph",
        "targets": [{"kind": "feature", "layer": 2, "feature": 1, "position": 3, "weight": 1.0}],
    }
    graph = nx.relabel_nodes(graph, {"T": "target"})
    nodes = {n.ref.id: n.attribution for n in circuit_nodes(graph)}
    assert nodes == pytest.approx({"mlp1.f0@3": 3.0, "mlp0.f5@2": 1.75, "attn1.h1@2": 0.3})


# ---------------------------------------------------------------------------- end to end on a tiny model


@pytest.fixture(scope="module")
def traced(tiny_model_dirs, tiny_models, random_transcoder_folder, tmp_path_factory):
    """A tc circuit graph on the tiny GPT-2 with sparse random transcoders, saved as JSON."""
    root = tmp_path_factory.mktemp("validate")
    loaded = tiny_models["gpt2"]
    transcoders = random_transcoders(loaded.info, 48, 0, bias_shift=-0.3)
    saved = random_transcoder_folder("gpt2", bias_shift=-0.3)  # these transcoders, saved
    config = CircuitConfig(
        model=str(tiny_model_dirs["gpt2"]),
        transcoders=str(saved),
        prompt=PROMPT,
        logit_diff=["1", "0"],
        iters=2,
        branches=6,
        both_signs=True,
    )
    config.validate()
    graph, _ = circuit_graph(loaded, transcoders, PROMPT, config)
    # the random model's heads are too weak for the greedy search: add the largest head term into the target
    # as tc circuit would (its direct contribution as edge and contribution)
    from tccli.nodes import NodeRef
    from tccli.replacement import attribution
    from tccli.replacement.prompts import freeze_prompt

    meta = graph.graph["metadata"]
    frozen = freeze_prompt(loaded, transcoders, torch.tensor(meta["token_ids"]))
    target = unembed_target(frozen, meta["target"]["token"], meta["target"]["token_b"], meta["position"])
    heads = attribution.direct_contributions(frozen, target.vector, target.position, target.read_point).heads[1]
    head, source = divmod(int(heads[:, 1:].abs().argmax()), heads.shape[1] - 1)
    key = NodeRef("head", 1, head, source + 1)
    weight = float(heads[head, source + 1])
    graph.add_node(
        key.id,
        kind="head",
        layer=1,
        feature=None,
        head=head,
        position=source + 1,
        token=meta["tokens"][source + 1],
        activation=None,
        path_contribution=weight,
        direct_contribution=weight,
    )
    graph.add_edge(key.id, "target", weight=weight)
    path = root / "graph.json"
    path.write_text(to_json(graph))
    return dict(root=root, loaded=loaded, transcoders=transcoders, saved=saved, graph=graph, path=path)


def validate_files(config):
    """What `tc validate` does once its settings are checked: read the graph, load the model, the transcoders
    (and any --features, --prompts) it names, validate; the results dict."""
    from tccli.circuit.files import read_graph
    from tccli.evaluation.validation import load_validation_inputs

    graph = read_graph(config.graph)
    return run_validation(config, graph, *load_validation_inputs(config, graph.graph.get("metadata", {})))


def validate(traced, **kwargs):
    config = ValidateConfig(graph=str(traced["path"]), **kwargs)
    config.validate()
    return validate_files(config)


def test_every_figure_is_the_replacement_models(traced, one_torch_thread):
    # on the reference model's device (the CPU): the figures are compared to 1e-9 (pytest --device cuda)
    results = validate(traced, mode="frozen", random=2, seed=3, device=str(traced["loaded"].device))
    loaded, transcoders, graph = traced["loaded"], traced["transcoders"], traced["graph"]
    meta = graph.graph["metadata"]
    model = ReplacementModel(loaded, transcoders, torch.tensor([meta["token_ids"]]))
    target = target_from_metadata(meta, loaded)
    circuit = [parse_node(n) for n, kind in graph.nodes(data="kind") if kind in ("feature", "head")]
    assert {n.kind for n in circuit} == {"feature", "head"}  # both kinds are exercised
    keep = frozenset((n.layer, n.index, n.position) for n in circuit if n.kind == "feature")
    rows = [RowSpec(0), RowSpec(0, tuple(Intervention(n, "ablate") for n in circuit)), RowSpec(0, (), keep)]
    rows += [RowSpec(0, (Intervention(n, "ablate"),)) for n in circuit]
    values = target.values(model, model.run(rows, "frozen")).tolist()
    clean, ablated, kept = values[:3]
    summary = results["circuit"]
    assert results["target_clean"] == pytest.approx(meta["target_value"], rel=1e-5)
    assert summary["necessity"] == pytest.approx(1 - ablated / clean, rel=1e-9)
    assert summary["sufficiency"] == pytest.approx(kept / clean, rel=1e-9)
    measured = {row["id"]: row["measured"] for row in summary["nodes"]}
    for node, value in zip(circuit, values[3:]):
        assert measured[node.id] == pytest.approx(value - clean, rel=1e-9, abs=1e-12)
    predicted = [row["predicted_graph"] for row in summary["nodes"]]
    assert predicted == [-graph.nodes[row["id"]]["path_contribution"] for row in summary["nodes"]]
    assert summary["spearman_graph"] == pytest.approx(
        spearman(predicted, [row["measured"] for row in summary["nodes"]])
    )
    # the unpruned first-order prediction is the frozen model's derivative times the change
    gradients = model.node_gradients(target)
    for row, node in ((row, parse_node(row["id"])) for row in summary["nodes"]):
        if node.kind == "feature":
            z = float(gradients.activations[node.layer][0, node.position, node.index])
            slope = float(gradients.feature[node.layer][0, node.position, node.index])
            assert row["predicted_total"] == pytest.approx(-z * slope, rel=1e-6)
        else:
            assert row["predicted_total"] == pytest.approx(
                -float(gradients.head[node.layer][0, node.index, node.position]), rel=1e-6
            )
    assert results["random"]["draws"] == 2 and len(results["random"]["circuits"]) == 2
    assert summary["disagreements"][0]["id"] in measured


def test_a_prompts_file_matches_nodes_by_offset_from_the_end(traced, tmp_path, one_torch_thread):
    alone = validate(traced, random=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n\nThe war lasted from 1799 to 17\nwar 17\n")
    many = validate(traced, random=1, prompts=str(prompts))
    assert many["prompts"] == 3
    # the graph's prompt alone reproduces the graph-only figures: same node mapping, same random circuit
    single = tmp_path / "single.txt"
    single.write_text(PROMPT + "\n")
    again = validate(traced, random=1, prompts=str(single))
    for key in ("necessity", "sufficiency", "spearman_graph", "spearman_total"):
        assert again["circuit"][key] == pytest.approx(alone["circuit"][key], rel=1e-9, nan_ok=True)
    assert many["circuit"]["nodes_dropped"] > 0  # the short prompt cannot hold the earliest nodes
    assert alone["circuit"]["nodes_dropped"] == 0


def test_greater_than_task_reports_the_probability_difference(builtin_model, tmp_path, one_torch_thread):
    from tccli.evaluation.greater_than import probability_difference_of_model

    loaded = builtin_model
    transcoders = random_transcoders(loaded.info, 64, 0, bias_shift=-0.5)
    save_transcoders(transcoders, tmp_path / "tcs")
    prompt = "The war lasted from the year 1735 to the year 17"
    config = CircuitConfig(
        transcoders=str(tmp_path / "tcs"), prompt=prompt, logit_diff=["40", "20"], iters=1, branches=3
    )
    config.validate()
    graph, _ = circuit_graph(loaded, transcoders, prompt, config)
    (tmp_path / "g.json").write_text(to_json(graph))
    results = validate_files(
        ValidateConfig(graph=str(tmp_path / "g.json"), task="greater-than", random=1, device="cpu")
    )  # the reference's device (pytest --device cuda)
    assert results["prompts"] == 100
    assert results["metric"]["clean"] == pytest.approx(probability_difference_of_model(loaded).mean, rel=1e-6)
    for key in ("metric_ablated", "metric_kept"):
        assert -1 <= results["circuit"][key] <= 1 and key in results["random"]["summary"]


def test_a_tc_graph_graph_with_heads_is_validated_on_its_most_probable_logit(traced, tiny_model_dirs, one_torch_thread):
    out = traced["root"] / "attribution.json"
    made = run_tc(
        "graph",
        "--model",
        str(tiny_model_dirs["gpt2"]),
        "--transcoders",
        str(traced["saved"]),
        "--prompt",
        PROMPT,
        "--heads",
        "--node-threshold",
        "0.9",
        "--format",
        "json",
        "--out",
        str(out),
        "--quiet",
    )
    assert made.returncode == 0, made.stderr
    result = run_tc("validate", str(out), "--random", "1", "--mode", "frozen", "--json")
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    targets = json.loads(out.read_text())["graph"]["metadata"]["targets"]
    top = max(targets, key=lambda t: t["weight"])
    assert results["target"]["token"] == top["token"] and results["target"]["demeaned"]
    assert results["target_clean"] == pytest.approx(top["value"], rel=1e-5)  # logit minus the mean logit
    assert results["circuit_size"]["feature"] > 0 and -1 <= results["circuit"]["spearman_graph"] <= 1


# ---------------------------------------------------------------------------- the command


def test_validate_command_writes_results_into_the_graph(traced):
    out = traced["root"] / "validated.json"
    result = run_tc("validate", str(traced["path"]), "--random", "1", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    saved = json.loads(out.read_text())["graph"]["metadata"]
    assert saved["validation"] == json.loads(json.dumps(printed))
    assert "necessity" in result.stderr and "Spearman" in result.stderr
    info = run_tc("info", str(out))
    assert info.returncode == 0  # still a tc circuit graph
    again = run_tc("validate", str(traced["path"]), "--random", "1", "--out", str(out))
    assert again.returncode == 2 and "--force" in again.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mode", "direct"], "--mode must be one of free, frozen"),
        (["--ablation", "mean"], "needs --features"),
        (["--task", "less-than"], "--task must be one of"),
        (["--random", "-1"], "--random must be at least 0"),
        (["--transcoders", "/nonexistent"], "are not here"),
    ],
)
def test_validate_bad_input_is_one_line(traced, args, message):
    result = run_tc("validate", str(traced["path"]), *args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tc: error:") and message in lines[0], result.stderr


def test_validate_refuses_to_write_over_its_input(traced):
    result = run_tc("validate", str(traced["path"]), "--out", str(traced["path"]), "--force")
    assert result.returncode == 2 and "is the graph being read" in result.stderr


def test_graphs_record_the_paths_they_were_made_with_absolute(traced, tiny_model_dirs, monkeypatch, one_torch_thread):
    """Model and transcoders given relative to the working folder are recorded absolute in a graph's metadata
    (tc info shows them), so tc validate finds them from any other folder (it could not)."""
    work, elsewhere = traced["root"] / "work", traced["root"] / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    model = os.path.relpath(tiny_model_dirs["gpt2"], work)
    transcoders = os.path.relpath(traced["saved"], work)
    made = run_tc(
        "graph", "--model", model, T, transcoders, "--prompt", PROMPT, "--max-feature-nodes", "30",
        "--out", "g.json", "--quiet", cwd=work,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    meta = json.loads((work / "g.json").read_text())["graph"]["metadata"]
    absolute = {name: os.path.abspath(work / path) for name, path in (("model", model), ("transcoders", transcoders))}
    assert (meta["model"], meta["transcoders"]) == (absolute["model"], absolute["transcoders"])
    info = run_tc("info", str(work / "g.json"), "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["transcoders"] == absolute["transcoders"], info.stderr
    validated = run_tc("validate", str(work / "g.json"), "--random", "0", "--mode", "frozen", cwd=elsewhere)
    assert validated.returncode == 0, validated.stderr
    # tc circuit's graphs too (the library call behind it)
    monkeypatch.chdir(work)
    config = CircuitConfig(
        model=model, transcoders=transcoders, prompt=PROMPT, logit_diff=["1", "0"], iters=1, branches=2
    )
    config.validate()
    graph, _ = circuit_graph(traced["loaded"], traced["transcoders"], PROMPT, config)
    assert graph.graph["metadata"]["transcoders"] == absolute["transcoders"]
