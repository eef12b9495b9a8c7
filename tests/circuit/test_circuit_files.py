"""Graph files: DOT (rendered by Graphviz when present), JSON round trip, Neuronpedia schema, GraphML."""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import networkx as nx
import pytest
import torch

from circuit_helpers import paper_model
from tccli.circuit import files as circuit_files
from tccli.circuit import neuronpedia
from tccli.circuit.search import SearchParams, greedy_search, paths_to_graph
from tccli.config.circuit import PictureOptions
from tccli.errors import TcError
from tccli.nodes import node_label, target_description, target_label
from tccli.replacement.targets import direction_target


@pytest.fixture()
def graph() -> nx.DiGraph:
    frozen = paper_model()
    target = direction_target(frozen, torch.tensor([1.0, 1.0]), 1, 1)
    g = paths_to_graph(
        frozen, target, greedy_search(frozen, target, SearchParams(iters=2, branches=2)), ["<bos>", 'say "hi"']
    )
    g.graph["metadata"] = {
        "model": "paper",
        "scan": "paper-set",
        "n_layers": 1,
        "prompt": "x",
        "tokens": ["<bos>", 'say "hi"'],
        "target": target.description,
        "transcoder_list": ["layer_0"],
        "search": {"iters": 2, "branches": 2},
        "tc_version": "0",
    }
    return g


def test_node_labels():
    assert (
        node_label({"kind": "feature", "layer": 8, "feature": 1234, "token": "Paris", "position": 5})
        == 'L8 F1234 "Paris" @5'
    )
    assert node_label({"kind": "head", "layer": 3, "head": 2, "token": "cat", "position": 4}) == 'L3 H2 "cat" @4'
    assert node_label({"kind": "error", "layer": 8, "position": 5}) == "err L8 @5"


def render_svg(text: str) -> bytes:
    return subprocess.run(["dot", "-Tsvg"], input=text.encode(), capture_output=True, check=True).stdout


def test_dot_is_valid_graphviz(graph):
    text = circuit_files.to_dot(graph)
    assert text.startswith("digraph circuit {") and text.rstrip().endswith("}")
    assert '"mlp0.f1@1" -> "target"' in text and "layout=neato" in text
    assert 'label="\\"say \\\\\\"hi\\\\\\"\\"\\n1"' in text  # the column's token: quotes survive two escapings
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed; the DOT text was checked, not rendered")
    svg = render_svg(text)
    assert b"<svg" in svg and b"mlp0.f1@1" in svg and b"L0.F1" in svg


def test_dot_edge_style_by_weight_and_sign(graph):
    graph.add_edge("err0@1", "mlp0.f1@1", weight=-3.0)
    lines = {line.split(" [")[0].strip(): line for line in circuit_files.to_dot(graph).splitlines() if "->" in line}
    assert 'color="#c0392b"' in lines['"err0@1" -> "mlp0.f1@1"']  # negative: red
    assert 'color="#1f5fbf"' in lines['"mlp0.f1@1" -> "target"']
    assert "penwidth=5.00" in lines['"mlp0.f1@1" -> "target"']  # the largest |weight| is widest


def test_dot_thresholds_hide_small_edges_and_label_at_3_significant_figures(graph):
    # target value 13: --min-edge 0.01 hides |weight| < 0.13, --min-edge-label 0.05 labels >= 0.65
    graph.add_node("err0@0", kind="error", layer=0, position=0, token="<bos>", path_contribution=0.0001)
    graph.add_edge("err0@0", "mlp0.f0@1", weight=0.0001)
    graph.edges["mlp0.f1@1", "target"]["weight"] = 6.123456
    text = circuit_files.to_dot(graph)
    edges = {line.split(" [")[0].strip(): line for line in text.splitlines() if "->" in line}
    assert '"err0@0" -> "mlp0.f0@1"' not in edges and '"err0@0" [' not in text  # edge and its node hidden
    assert 'label="6.12"' in edges['"mlp0.f1@1" -> "target"']
    assert "label=" not in edges['"err0@1" -> "target"']  # 0.5 < 0.65: drawn, not labelled
    assert "not drawn: 1 edges below 0.01 x |target| and 1 nodes left without an edge" in text
    everything = circuit_files.to_dot(graph, PictureOptions(min_edge=0.0, min_edge_label=0.0))
    assert '"err0@0" -> "mlp0.f0@1"' in everything and 'label="0.0001"' in everything
    with pytest.raises(TcError, match="--min-edge must be a fraction >= 0"):
        PictureOptions(min_edge=float("nan")).validate()


def test_dense_graphs_get_straight_edges_and_at_most_40_labels():
    nodes = {"target": ("target", 1, 2, -1), **{f"f{i}": ("feature", 0, i % 3, i) for i in range(130)}}
    graph = grid_graph(nodes)
    graph.nodes["target"]["activation"] = 1.0
    for i in range(130):
        graph.add_edge(f"f{i}", "target", weight=1.0 + i / 100)
    text = circuit_files.to_dot(graph)
    labels = [line for line in text.splitlines() if "->" in line and "label=" in line]
    assert "splines=false" in text and len(labels) == circuit_files.MAX_EDGE_LABELS
    assert any('"f129" -> "target"' in line for line in labels)  # the largest weights are the ones written
    assert not any('"f0" -> "target"' in line for line in labels)
    small = grid_graph({"target": ("target", 1, 2, -1), "f0": ("feature", 0, 1, 0)})
    small.add_edge("f0", "target", weight=1.0)
    assert "splines=curved" in circuit_files.to_dot(small)


def test_target_labels_say_what_the_target_is():
    logit_diff = {
        "kind": "target",
        "target_kind": "logit_diff",
        "target_token_string": " 40",
        "target_token_b_string": " 20",
        "token": " 17",
        "position": 12,
        "activation": 0.73512,
    }
    assert target_label(logit_diff) == 'logit(" 40") - logit(" 20") at " 17"@12 = 0.735'
    assert target_description({"target_kind": "logit", "target_token": 7}) == "logit(#7)"
    assert target_description({"target_kind": "feature", "layer": 3, "target_feature": 545}) == "L3.F545 pre-activation"
    assert target_description({"target_kind": "direction", "layer": 2}) == "direction . resid_pre[2]"


def grid_graph(names: dict) -> nx.DiGraph:
    """A graph of the given nodes (name -> (kind, layer, position, index)) and 3 tokens."""
    graph = nx.DiGraph()
    for name, (kind, layer, position, index) in names.items():
        graph.add_node(
            name,
            kind=kind,
            layer=layer,
            position=position,
            token=f"t{position}",
            feature=index if kind == "feature" else None,
            head=index if kind == "head" else None,
            path_contribution=1.0,
        )
    graph.graph["metadata"] = {"tokens": ["<bos>", " a", " b"]}
    return graph


def test_grid_layout_rows_by_layer_columns_by_position():
    nodes = {
        "target": ("target", 2, 2, -1),
        "embed@1": ("embed", -1, 1, -1),
        "embed@2": ("embed", -1, 2, -1),
        "attn0.h1@1": ("head", 0, 1, 1),
        "mlp0.f3@2": ("feature", 0, 2, 3),
        "mlp1.f4@2": ("feature", 1, 2, 4),
        "mlp1.f5@2": ("feature", 1, 2, 5),
        "err1@2": ("error", 1, 2, -1),
        "attn1.h0@0": ("head", 1, 0, 0),
    }
    layout = circuit_files.grid_layout(grid_graph(nodes))
    x = {n: p[0] for n, p in layout.positions.items()}
    y = {n: p[1] for n, p in layout.positions.items()}
    # rows: embeddings < layer 0 attention < layer 0 MLP < layer 1 attention < layer 1 MLP < target
    assert (
        y["embed@1"] == y["embed@2"] < y["attn0.h1@1"] < y["mlp0.f3@2"] < y["attn1.h0@0"] < y["mlp1.f4@2"] < y["target"]
    )
    assert y["mlp1.f4@2"] == y["mlp1.f5@2"] == y["err1@2"]  # one cell, side by side
    # columns: position 0 < 1 < 2, the token written under each
    assert x["attn1.h0@0"] < x["embed@1"] == x["attn0.h1@1"] < x["embed@2"] == x["mlp0.f3@2"] == x["target"]
    assert [(p, t) for p, _, t in layout.columns] == [(0, "<bos>"), (1, " a"), (2, " b")]
    assert [name for name, _ in layout.rows] == ["embed", "L0 attn", "L0 MLP", "L1 attn", "L1 MLP", "target"]
    cell = sorted(["mlp1.f4@2", "mlp1.f5@2", "err1@2"], key=lambda n: x[n])
    assert cell[-1] == "err1@2"  # errors last in a cell
    assert all(x[b] - x[a] >= layout.widths[a] for a, b in zip(cell, cell[1:]))  # no overlap
    assert sum(x[n] for n in cell) / 3 == pytest.approx(x["mlp0.f3@2"])  # centred on the column


def test_grid_layout_depends_on_attributes_only():
    """Renaming nodes moves nothing: `tc graph` lays out its own graphs with the same function."""
    nodes = {"a": ("feature", 0, 1, 7), "b": ("feature", 0, 1, 8), "c": ("head", 1, 0, 2), "t": ("target", 2, 1, -1)}
    first = circuit_files.grid_layout(grid_graph(nodes))
    renamed = grid_graph({f"node {name}": spec for name, spec in nodes.items()})
    second = circuit_files.grid_layout(renamed)
    assert {f"node {n}": p for n, p in first.positions.items()} == second.positions
    crowded = grid_graph(
        {**{f"f{i}": ("feature", 0, 1, i) for i in range(circuit_files.PER_LINE + 1)}, "t": ("target", 1, 1, -1)}
    )
    lines = sorted({round(p[1], 6) for n, p in circuit_files.grid_layout(crowded).positions.items() if n != "t"})
    assert len(lines) == 2  # more than PER_LINE nodes in one cell wrap onto a second line


def test_json_of_older_graphs_reads_contribution_as_path_contribution(graph):
    data = json.loads(circuit_files.to_json(graph))
    for node in data["nodes"]:
        node["contribution"] = node.pop("path_contribution")
        node.pop("direct_contribution")
    back = circuit_files.from_json(json.dumps(data))
    assert back.nodes["mlp0.f1@1"]["path_contribution"] == graph.nodes["mlp0.f1@1"]["path_contribution"]


def test_json_round_trip(graph):
    back = circuit_files.from_json(circuit_files.to_json(graph))
    assert set(back.nodes) == set(graph.nodes)
    assert {(u, v): w for u, v, w in back.edges(data="weight")} == {(u, v): w for u, v, w in graph.edges(data="weight")}
    assert all(back.nodes[n] == graph.nodes[n] for n in graph.nodes)
    assert back.graph["metadata"] == graph.graph["metadata"]
    with pytest.raises(TcError, match="not a tc circuit graph"):
        circuit_files.from_json('{"nodes": []}')
    with pytest.raises(TcError, match="not JSON"):
        circuit_files.from_json("{")


def test_neuronpedia_schema(graph):
    document = json.loads(neuronpedia.to_neuronpedia(graph))
    assert set(document) == {"metadata", "qParams", "nodes", "links"}
    assert document["metadata"]["scan"] == "paper-set"
    for key in ("slug", "scan", "transcoder_list", "prompt_tokens", "prompt"):
        assert key in document["metadata"]
    node_keys = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "influence", "activation"}
    assert all(node_keys <= set(node) for node in document["nodes"])
    by_id = {node["node_id"]: node for node in document["nodes"]}
    assert by_id["0_1_1"]["feature_type"] == "cross layer transcoder" and by_id["0_1_1"]["activation"] == 3.0
    assert by_id["0_-1_1"]["feature_type"] == "mlp reconstruction error"
    assert by_id["E_1_1"]["feature_type"] == "embedding" and by_id["E_1_1"]["layer"] == "E"
    assert all(node["feature_type"] != "head" for node in document["nodes"])
    links = {(link["source"], link["target"]): link["weight"] for link in document["links"]}
    target_id = [n["node_id"] for n in document["nodes"] if n["is_target_logit"]][0]
    assert links[("0_1_1", target_id)] == 6.0
    # the head attn0.h0@1 -> f1 is folded: its upstream (none here) would be relinked; f1's inputs stay
    assert links[("E_1_1", "0_1_1")] == 4.0
    assert all(s in by_id and t in by_id for s, t in links)


def test_graphml_and_render(graph):
    back = nx.read_graphml(io.BytesIO(circuit_files.render(graph, "graphml")))
    assert set(back.nodes) == set(graph.nodes) and back.number_of_edges() == graph.number_of_edges()
    with pytest.raises(TcError, match="unknown format"):
        circuit_files.render(graph, "pdf")


def test_svg_without_dot_says_so(graph, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(TcError, match="Graphviz's `dot` program"):
        circuit_files.render(graph, "svg")


def test_tc_info_describes_graph_files(graph, tmp_path):
    from tccli.cli import info

    path = tmp_path / "g.json"
    path.write_text(circuit_files.to_json(graph))
    summary = info.describe(path)
    assert summary["kind"] == "circuit-graph" and summary["nodes"] == graph.number_of_nodes()
    assert summary["node_kinds"]["feature"] == 2 and summary["model"] == "paper"
    assert "tc circuit graph" in info.render(summary)
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(TcError, match="not something tc knows"):
        info.describe(tmp_path / "other.json")


def test_skip_nodes_are_labelled_and_folded_for_neuronpedia():
    import networkx as nx

    from tccli.circuit.neuronpedia import to_neuronpedia
    from tccli.nodes import node_label

    graph = nx.DiGraph()
    graph.graph["metadata"] = {"n_layers": 2, "target": {"kind": "logit"}, "scan": "s"}
    graph.add_node("target", kind="target", layer=2, position=3, token="x", activation=2.0, contribution=2.0)
    graph.add_node("skip1@3", kind="skip", layer=1, position=3, token="x", contribution=1.5)
    graph.add_node(
        "mlp0.f4@3", kind="feature", layer=0, feature=4, position=3, token="x", activation=1.0, contribution=0.5
    )
    graph.add_edge("skip1@3", "target", weight=1.5)
    graph.add_edge("mlp0.f4@3", "skip1@3", weight=0.5)
    assert node_label(graph.nodes["skip1@3"]) == 'skip L1 "x" @3'
    document = json.loads(to_neuronpedia(graph))
    assert all(node["node_id"] != "skip1@3" for node in document["nodes"])
    assert [(link["source"], link["weight"]) for link in document["links"]] == [("0_4_3", 0.5)]
