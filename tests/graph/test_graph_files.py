"""Attribution graph files: the pruned graph as tc JSON (round trip through tc export / tc info), Neuronpedia's
schema, DOT through Graphviz, and the torch file holding the whole sparse adjacency."""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import pytest
import torch
from graph_helpers import hand_graph

from tccli.circuit import files as circuit_files
from tccli.circuit import neuronpedia
from tccli.graph import attribution_graph as ag
from tccli.graph import files as graph_files
from tccli.nodes import target_id

METADATA = {
    "kind": "attribution-graph",
    "model": "hand",
    "scan": "hand-set",
    "n_layers": 1,
    "prompt": "x",
    "tokens": ["x"],
    "token_ids": [7],
    "transcoder_list": ["layer_0"],
    "tc_version": "0",
    "config": {"node_threshold": 0.8, "edge_threshold": 0.9},
    "targets": [
        {
            "kind": "logit",
            "token": 5,
            "token_string": " five",
            "demeaned": True,
            "position": 0,
            "value": 2.0,
            "constant": 0.0,
            "weight": 1.0,
        }
    ],
}


@pytest.fixture()
def graph() -> ag.AttributionGraph:
    table, adjacency = hand_graph()
    params = ag.GraphParams(node_threshold=0.8, edge_threshold=0.9)
    return ag.finish_graph(adjacency, table, params)


def test_node_ids():
    table, _ = hand_graph()
    assert graph_files.node_ids(table, METADATA["targets"]) == [
        "mlp0.f0@0",
        "mlp0.f1@0",
        "err0@0",
        "embed@0",
        "logit5@0",
    ]
    assert target_id({"kind": "feature", "layer": 1, "feature": 3, "position": 2}, 1) == "target"


def test_pruned_graph_nodes_edges_and_metadata(graph):
    pruned = graph_files.to_networkx(graph, METADATA, ["x"], [7])
    # the hand-worked pruning at edge threshold 0.9: e pruned, f1<-f0 dropped
    assert set(pruned.nodes) == {"mlp0.f0@0", "mlp0.f1@0", "embed@0", "logit5@0"}
    assert {(u, v): w for u, v, w in pruned.edges(data="weight")} == {
        ("mlp0.f0@0", "logit5@0"): 3.0,
        ("mlp0.f1@0", "logit5@0"): -1.0,
        ("embed@0", "mlp0.f0@0"): 3.0,
        ("embed@0", "mlp0.f1@0"): 3.0,
    }
    assert pruned.nodes["mlp0.f0@0"]["influence"] == 0.8125
    assert pruned.nodes["logit5@0"]["kind"] == "target" and pruned.nodes["logit5@0"]["weight"] == 1.0
    assert pruned.nodes["embed@0"]["token_id"] == 7
    meta = pruned.graph["metadata"]
    assert meta["replacement_score"] == 0.796875 and meta["kept_features"] == 2 and meta["kept_edges"] == 4
    back = circuit_files.from_json(circuit_files.to_json(pruned))  # what tc export and tc info read
    assert {(u, v): w for u, v, w in back.edges(data="weight")} == {
        (u, v): w for u, v, w in pruned.edges(data="weight")
    }
    assert back.graph["metadata"] == json.loads(json.dumps(meta))


def test_neuronpedia_schema(graph):
    document = json.loads(
        neuronpedia.attribution_graph_to_neuronpedia(graph_files.to_networkx(graph, METADATA, ["x"], [7]))
    )
    assert set(document) == {"metadata", "qParams", "nodes", "links"}
    assert document["metadata"]["schema_version"] == 1 and document["metadata"]["prompt_tokens"] == ["x"]
    by_id = {node["node_id"]: node for node in document["nodes"]}
    assert set(by_id) == {"0_0_0", "0_1_0", "E_7_0", "2_5_0"}
    logit = by_id["2_5_0"]
    assert logit["feature_type"] == "logit" and logit["is_target_logit"] and logit["token_prob"] == 1.0
    assert logit["clerp"] == 'Output " five" (p=1.000)' and logit["jsNodeId"] == "L_5-0"
    feature = by_id["0_0_0"]
    assert feature["feature_type"] == "cross layer transcoder" and feature["jsNodeId"] == "0_0-0"
    assert feature["influence"] == pytest.approx(0.8125 / 2.0625)  # its cumulative influence share
    assert by_id["E_7_0"]["feature_type"] == "embedding" and by_id["E_7_0"]["layer"] == "E"
    links = {(link["source"], link["target"]): link["weight"] for link in document["links"]}
    assert links == {
        ("0_0_0", "2_5_0"): 3.0,
        ("0_1_0", "2_5_0"): -1.0,
        ("E_7_0", "0_0_0"): 3.0,
        ("E_7_0", "0_1_0"): 3.0,
    }
    # tc export on the JSON file writes the same document
    pruned = circuit_files.from_json(circuit_files.to_json(graph_files.to_networkx(graph, METADATA, ["x"], [7])))
    assert json.loads(circuit_files.render(pruned, "neuronpedia")) == document


def test_pt_holds_the_whole_unpruned_adjacency(graph):
    data = torch.load(io.BytesIO(graph_files.to_pt(graph, METADATA)), weights_only=True)
    assert json.loads(data["metadata_json"]) == METADATA
    crow, col, value = data["crow"], data["col"], data["value"]
    dense = torch.zeros(5, 5, dtype=torch.float64)
    for r, node in enumerate(data["row_nodes"].tolist()):
        dense[node, col[crow[r] : crow[r + 1]].long()] = value[crow[r] : crow[r + 1]]
    assert dense[4].tolist() == [3.0, -1.0, 0.0, 0.0, 0.0] and dense[0].tolist() == [0.0, 0.0, 1.0, 3.0, 0.0]
    assert int(data["edge_mask"].sum()) == 4 and data["node_mask"].tolist() == [True, True, False, True, True]
    assert data["influence"].tolist() == [0.8125, 0.25, 0.203125, 0.796875, 0.0]


def test_dot_is_valid_graphviz(graph):
    text = graph_files.render(graph, METADATA, ["x"], [7], "dot").decode()
    assert '"mlp0.f0@0" -> "logit5@0"' in text
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed; the DOT text was checked, not rendered")
    svg = subprocess.run(["dot", "-Tsvg"], input=text.encode(), capture_output=True, check=True).stdout
    assert b"<svg" in svg


def test_info_summary(graph, tmp_path):
    from tccli.cli import info

    path = tmp_path / "g.json"
    path.write_text(circuit_files.to_json(graph_files.to_networkx(graph, METADATA, ["x"], [7])))
    summary = info.describe(path)
    assert summary["kind"] == "attribution-graph" and summary["replacement_score"] == 0.796875
    text = info.render(summary)
    assert "replacement 0.7969" in text and "2 with rows, 2 kept" in text
