"""Graph files for circuit-tracer's viewer and Neuronpedia (tccli.circuit.neuronpedia), read back with the
viewers' own rules (tests/viewer_rules.py): every feature node decodes to its own feature, the scan and
slug are what the graph recorded (or --scan / --slug), and graph-metadata.json lists the graphs written
into a folder."""

from __future__ import annotations

import json
import threading
import time

import networkx as nx
import pytest

from tccli.circuit import neuronpedia
from tccli.errors import TcError
from tccli.nodes import neuronpedia_feature_id
from tccli.runtime import outputs
from viewer_rules import cantor_pair, feature_lookups, node_feature, viewer_unpair

# (layer, feature) pairs the viewers must tell apart: layer 0 (where the raw index and the pairing differ
# only from feature 1 on), a feature index equal to another node's layer, and a 24,576-feature layer's last.
FEATURES = [(0, 0), (0, 1), (1, 0), (0, 5), (5, 0), (3, 7), (11, 24575), (25, 16383)]


def circuit_graph(features=FEATURES, feature_target=None) -> nx.DiGraph:
    """A `tc circuit` graph: each feature feeds the target at its own token."""
    graph = nx.DiGraph()
    target = {"kind": "feature", "layer": 26, "feature": 9} if feature_target else {"kind": "logit"}
    graph.graph["metadata"] = {"n_layers": 26, "target": target, "scan": "org/set", "tokens": ["<bos>", "a\nb"]}
    graph.add_node("target", kind="target", layer=26, position=1, token="x", activation=2.0, path_contribution=2.0)
    for position, (layer, index) in enumerate(features):
        node = f"mlp{layer}.f{index}@{position}"
        graph.add_node(node, kind="feature", layer=layer, feature=index, position=position, activation=1.0)
        graph.add_edge(node, "target", weight=0.5)
    return graph


def test_pairing_is_the_viewers():
    for layer, index in FEATURES:
        assert neuronpedia_feature_id(layer, index) == cantor_pair(layer, index)
        assert viewer_unpair(neuronpedia_feature_id(layer, index)) == (layer, index)
    with pytest.raises(ValueError):
        neuronpedia_feature_id(-1, 3)


def test_every_feature_node_finds_its_own_feature():
    document = json.loads(neuronpedia.to_neuronpedia(circuit_graph()))
    lookups = feature_lookups(document)
    assert sorted(node_feature(node) for node, _ in lookups) == sorted(FEATURES)
    for node, feature_index in lookups:
        assert viewer_unpair(feature_index) == node_feature(node)
    assert document["metadata"]["scan"] == "org/set"
    assert document["metadata"]["prompt_tokens"] == ["<bos>", "a⏎b"]  # as circuit-tracer writes tokens


def test_a_feature_target_finds_its_feature_too():
    document = json.loads(neuronpedia.to_neuronpedia(circuit_graph([(2, 4)], feature_target=True)))
    by_id = {node["node_id"]: node for node in document["nodes"]}
    assert viewer_unpair(by_id["26_9_1"]["feature"]) == (26, 9)


def test_attribution_graph_feature_target_finds_its_feature():
    graph = nx.DiGraph()
    graph.graph["metadata"] = {"kind": "attribution-graph", "n_layers": 4, "scan": "s", "targets": []}
    graph.add_node("mlp3.f40@2", kind="feature", layer=3, feature=40, position=2, cumulative_influence=0.5)
    graph.add_node("target", kind="target", layer=3, position=2, target_kind="feature", target_feature=41)
    graph.add_edge("mlp3.f40@2", "target", weight=1.0)
    document = json.loads(neuronpedia.render(graph))
    assert [viewer_unpair(feature) for _, feature in feature_lookups(document)] == [(3, 40), (3, 41)]


def test_scan_and_slug():
    graph = circuit_graph()
    graph.graph["metadata"].pop("scan")
    with pytest.raises(TcError, match="records no transcoder set id"):
        neuronpedia.render(graph)
    neuronpedia.name_graph(graph, "hub/other", "my-graph")
    metadata = json.loads(neuronpedia.render(graph))["metadata"]
    assert (metadata["scan"], metadata["slug"]) == ("hub/other", "my-graph")
    neuronpedia.name_graph(graph, None, None)  # nothing given: what was recorded stays
    assert json.loads(neuronpedia.render(graph))["metadata"]["scan"] == "hub/other"


def entry(slug: str, prompt: str = "p") -> dict:
    return {"slug": slug, "scan": "s", "transcoder_list": [], "prompt_tokens": [prompt], "prompt": prompt}


def test_the_index_lists_every_graph_once(tmp_path):
    (tmp_path / "graph-metadata.json").write_text(json.dumps({"graphs": [entry("old")], "note": "kept"}))
    neuronpedia.add_to_graph_index(tmp_path, entry("a"))
    neuronpedia.add_to_graph_index(tmp_path, entry("b"))
    neuronpedia.add_to_graph_index(tmp_path, entry("a", "again"))
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert [g["slug"] for g in index["graphs"]] == ["old", "b", "a"] and index["note"] == "kept"
    assert index["graphs"][-1]["prompt"] == "again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph-metadata.json"]  # no lock or temp left


def test_index_entry_holds_circuit_tracers_fields():
    document = neuronpedia.to_neuronpedia(circuit_graph())
    assert set(neuronpedia.index_entry(document)) == set(neuronpedia.METADATA_KEYS)


@pytest.mark.parametrize("text", ["{", "[]", '{"graphs": [1]}', '{"graphs": [{"scan": "s"}]}'])
def test_an_index_tc_cannot_read_is_left_alone(tmp_path, text):
    path = tmp_path / "graph-metadata.json"
    path.write_text(text)
    with pytest.raises(TcError, match="graph-metadata.json"):
        neuronpedia.add_to_graph_index(tmp_path, entry("a"))
    assert path.read_text() == text


def test_a_writer_waits_for_another_to_finish_the_index(tmp_path):
    path = tmp_path / "graph-metadata.json"
    held, done = threading.Event(), threading.Event()

    def other_writer():
        with outputs.locked(path):
            held.set()
            time.sleep(0.4)
            path.write_text(json.dumps({"graphs": [entry("other")]}))
        done.set()

    thread = threading.Thread(target=other_writer)
    thread.start()
    held.wait()
    neuronpedia.add_to_graph_index(tmp_path, entry("mine"))
    thread.join()
    assert done.is_set()
    assert [g["slug"] for g in json.loads(path.read_text())["graphs"]] == ["other", "mine"]
