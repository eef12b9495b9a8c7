"""Graph files: DOT (rendered by Graphviz when present), JSON round trip, Neuronpedia schema, GraphML."""

from __future__ import annotations

import io
import json

import networkx as nx
import pytest

from circuit_helpers import small_circuit_graph
from tccli.circuit import files as circuit_files
from tccli.circuit import neuronpedia
from tccli.errors import TcError
from tccli.nodes import node_label, target_description, target_label


@pytest.fixture()
def graph() -> nx.DiGraph:
    return small_circuit_graph()


def test_node_labels():
    assert (
        node_label({"kind": "feature", "layer": 8, "feature": 1234, "token": "Paris", "position": 5})
        == 'L8 F1234 "Paris" @5'
    )
    assert node_label({"kind": "head", "layer": 3, "head": 2, "token": "cat", "position": 4}) == 'L3 H2 "cat" @4'
    assert node_label({"kind": "error", "layer": 8, "position": 5}) == "err L8 @5"


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
