"""Greedy beam path search and graph merging (Algorithms 1 and 2)."""

from __future__ import annotations

import pytest
import torch

from circuit_helpers import paper_model, random_clt, random_transcoders
from tccli.circuit.search import Path, SearchParams, SearchResult, explained, greedy_search, paths_to_graph
from tccli.model.loading import load_model
from tccli.nodes import NodeRef
from tccli.replacement import attribution
from tccli.replacement.prompts import freeze_prompt
from tccli.replacement.targets import direction_target, unembed_target

TOKENS = ["<bos>", "x"]


def paper_target(frozen):
    return direction_target(frozen, torch.tensor([1.0, 1.0]), 1, 1)


def test_node_ids():
    assert NodeRef("feature", 8, 1234, 5).id == "mlp8.f1234@5"
    assert NodeRef("head", 3, 2, 4).id == "attn3.h2@4"
    assert NodeRef("embed", position=4).id == "embed@4"
    assert NodeRef("pos", position=4).id == "pos@4"
    assert NodeRef("error", 8, position=5).id == "err8@5"
    assert NodeRef("skip", 8, position=5).id == "skip8@5"
    assert NodeRef("target", position=9).id == "target"


def test_paper_model_search_worked_by_hand():
    """Target [1,1].resid_post[1] = 13. Direct: f1 6, f0 4, embed 1, head<-1 .5, head<-BOS 1 (excluded),
    error .5. Beam of 2 keeps f1, f0. Upstream of f1 (vector [0,4]): embed 4, head<-1 2. Upstream of
    f0 (vector [4,0]): only head<-BOS (4), excluded, so nothing."""
    frozen = paper_model()
    target = paper_target(frozen)
    result = greedy_search(frozen, target, SearchParams(iters=2, branches=2))
    found = {tuple(k.id for k in p.nodes[1:]): p.contributions[-1] for p in result.paths}
    assert found == {
        ("mlp0.f1@1",): 6.0,
        ("mlp0.f0@1",): 4.0,
        ("mlp0.f1@1", "embed@1"): 4.0,
        ("mlp0.f1@1", "attn0.h0@1"): 2.0,
    }
    graph = paths_to_graph(frozen, target, result, TOKENS)
    edges = {(u, v): w for u, v, w in graph.edges(data="weight")}
    assert edges == {
        ("mlp0.f1@1", "target"): 6.0,
        ("mlp0.f0@1", "target"): 4.0,
        ("embed@1", "mlp0.f1@1"): 4.0,
        ("attn0.h0@1", "mlp0.f1@1"): 2.0,
        ("err0@1", "target"): 0.5,
    }
    node = graph.nodes["mlp0.f1@1"]
    assert (node["kind"], node["layer"], node["feature"], node["position"], node["token"], node["activation"]) == (
        "feature",
        0,
        1,
        1,
        "x",
        3.0,
    )
    assert graph.nodes["target"]["activation"] == 13.0
    assert explained(graph) == (10.0, 0.5)
    # path contribution: through every path found; direct: the node's own term in the target's 13
    figures = {
        n: (graph.nodes[n]["path_contribution"], graph.nodes[n]["direct_contribution"]) for n in graph if n != "target"
    }
    assert figures == {
        "mlp0.f1@1": (6.0, 6.0),
        "mlp0.f0@1": (4.0, 4.0),
        "embed@1": (4.0, 1.0),
        "attn0.h0@1": (2.0, 0.5),
        "err0@1": (0.5, 0.5),
    }


def test_include_bos_and_both_signs():
    frozen = paper_model()
    target = paper_target(frozen)
    result = greedy_search(frozen, target, SearchParams(iters=2, branches=2, include_bos=True))
    found = {tuple(k.id for k in p.nodes[1:]) for p in result.paths}
    assert ("mlp0.f0@1", "attn0.h0@0") in found  # contribution 4 through the BOS source
    # a negative direction: nothing is positive, so nothing is followed unless both signs are
    negative = direction_target(frozen, torch.tensor([-1.0, -1.0]), 1, 1)
    assert greedy_search(frozen, negative, SearchParams(iters=1, branches=3)).paths == []
    both = greedy_search(frozen, negative, SearchParams(iters=1, branches=3, both_signs=True))
    assert [p.contributions[-1] for p in both.paths] == [-6.0, -4.0, -1.0]


def test_min_contribution_filters_candidates():
    frozen = paper_model()
    result = greedy_search(frozen, paper_target(frozen), SearchParams(iters=1, branches=10, min_contribution=4.5))
    assert [p.nodes[-1].id for p in result.paths] == ["mlp0.f1@1"]


def test_each_path_prefix_counted_once():
    frozen = paper_model()
    target = paper_target(frozen)
    T, A, B, C = (
        NodeRef("target", position=1),
        NodeRef("feature", 0, 1, 1),
        NodeRef("head", 0, 0, 1),
        NodeRef("embed", position=1),
    )

    def path(nodes, contributions):
        return Path(nodes=nodes, contributions=(13.0,) + contributions, vector=None, position=1, read_point=(0, 0))

    paths = [
        path((T, A), (6.0,)),
        path((T, B), (0.5,)),
        path((T, A, C), (6.0, 4.0)),
        path((T, B, A), (0.5, 1.0)),
        path((T, B, A, C), (0.5, 1.0, 0.7)),
        path((T, A, C), (6.0, 4.0)),
    ]  # the last repeats a path
    graph = paths_to_graph(frozen, target, SearchResult(paths=paths), TOKENS)
    assert graph.edges[C.id, A.id]["weight"] == 4.7  # via (T,A,C) once and via (T,B,A,C)
    assert graph.edges[A.id, T.id]["weight"] == 6.0 and graph.edges[A.id, B.id]["weight"] == 1.0
    assert graph.nodes[A.id]["path_contribution"] == 7.0


@pytest.mark.parametrize("clt", [False, True], ids=["per-layer", "cross-layer"])
def test_search_on_tiny_model_paths_are_exact(tiny_model_dirs, clt):
    """Each step's contribution is exact: a first step is the node's direct term, and everything upstream of
    a feature sums to its contribution. For a cross-layer transcoder the feature's weight to the path's
    vector sums its writes to every MLP output that vector reads after (docs/method.md section 11)."""
    loaded = load_model(str(tiny_model_dirs["gpt2"]), "cpu", "float64")
    if clt:
        transcoders = random_clt(loaded.info, 48, 2, dtype=torch.float64)
    else:
        transcoders = random_transcoders(loaded.info, 48, 2, torch.float64)
    frozen = freeze_prompt(loaded, transcoders, torch.tensor([0, 37, 90, 151, 12, 200, 64]))
    with torch.no_grad():
        target = unembed_target(frozen, 17, None, 6)
        params = SearchParams(iters=3, branches=5)
        result = greedy_search(frozen, target, params)
        direct = attribution.direct_contributions(frozen, target.vector, 6, target.read_point)
        lengths = [len(p.nodes) for p in result.paths]
        assert lengths == sorted(lengths) and all(lengths.count(k) <= 5 for k in set(lengths))
        for p in result.paths:
            assert p.contributions[-1] > 0
            assert all(k.position != 0 for k in p.nodes[1:])  # BOS never a source by default
            first = p.nodes[1]
            if len(p.nodes) == 2 and first.kind == "feature":
                assert abs(p.contributions[-1] - float(direct.features[first.layer][first.index])) < 1e-12
            if len(p.nodes) == 2 and first.kind == "head":
                assert abs(p.contributions[-1] - float(direct.heads[first.layer][first.index, first.position])) < 1e-12
            if p.vector is not None and p.nodes[-1].kind == "feature":
                # everything upstream of a feature node sums to its contribution (up to the encoder
                # constant's share): the step upstream is exact
                key = p.nodes[-1]
                z = float(frozen.layers[key.layer].z[key.position, key.index])
                coefficient = p.contributions[-1] / z
                _, _, constant = attribution.feature_upstream(
                    frozen, key.layer, key.index, key.position, torch.tensor(coefficient, dtype=torch.float64)
                )
                upstream = attribution.direct_contributions(frozen, p.vector, p.position, p.read_point)
                assert abs(float(upstream.total()) + float(constant) - p.contributions[-1]) < 1e-9
        graph = paths_to_graph(frozen, target, result, [str(t) for t in range(7)])
        assert any(graph.nodes[n]["kind"] == "error" for n in graph)
        assert graph.number_of_nodes() > 5
        for node, attrs in graph.nodes(data=True):  # each node's direct figure is its term in `direct`
            kind, layer, position = attrs["kind"], attrs["layer"], attrs["position"]
            expected = {
                "feature": lambda layer=layer, attrs=attrs, position=position: (
                    direct.features[layer][attrs["feature"]] if position == 6 else 0.0
                ),
                "head": lambda layer=layer, attrs=attrs, position=position: direct.heads[layer][
                    attrs["head"], position
                ],
                "error": lambda layer=layer, position=position: direct.errors[layer] if position == 6 else 0.0,
                "embed": lambda position=position: direct.embed if position == 6 else 0.0,
                "pos": lambda position=position: direct.pos_embed if position == 6 else 0.0,
            }
            if kind != "target":
                assert attrs["direct_contribution"] == pytest.approx(float(expected[kind]()), abs=1e-12)
                assert attrs["path_contribution"] == pytest.approx(
                    sum(w for _, _, w in graph.out_edges(node, data="weight")), abs=1e-12
                )


def test_skip_nodes_are_searched_and_exact(tiny_model_dirs):
    """With skip transcoders (reading mlp_input, writing mlp_output) the search offers skip{L}@t nodes; a
    skip node's contribution is its direct term and the path continues upstream through the norm exactly."""
    loaded = load_model(str(tiny_model_dirs["gpt2"]), "cpu", "float64")
    transcoders = random_transcoders(
        loaded.info,
        48,
        2,
        torch.float64,
        skip=True,
        input_space="mlp_input",
        output_space="mlp_output",
        bias_shift=-0.3,
    )
    with torch.no_grad():
        for transcoder in transcoders.values():
            transcoder.W_skip.mul_(8.0)  # a strong linear path, so the beam keeps it
    frozen = freeze_prompt(loaded, transcoders, torch.tensor([0, 37, 90, 151, 12, 200, 64]))
    with torch.no_grad():
        target = unembed_target(frozen, 17, None, 6)
        result = greedy_search(frozen, target, SearchParams(iters=3, branches=10, both_signs=True))
        direct = attribution.direct_contributions(frozen, target.vector, 6, target.read_point)
        skips = [p for p in result.paths if p.nodes[-1].kind == "skip"]
        assert skips
        for p in skips:
            key = p.nodes[-1]
            if len(p.nodes) == 2:
                assert abs(p.contributions[-1] - float(direct.skips[key.layer])) < 1e-12
            previous_vector = target.vector if len(p.nodes) == 2 else None
            if previous_vector is not None:
                vector, read_point, constant = attribution.skip_upstream(
                    frozen, key.layer, key.position, previous_vector
                )
                assert torch.equal(vector, p.vector) and read_point == p.read_point
                upstream = attribution.direct_contributions(frozen, p.vector, p.position, p.read_point)
                assert abs(float(upstream.total()) + float(constant) - p.contributions[-1]) < 1e-9
        graph = paths_to_graph(frozen, target, result, [str(t) for t in range(7)])
        skip_nodes = [n for n in graph if graph.nodes[n]["kind"] == "skip"]
        assert skip_nodes
        for node in skip_nodes:
            attrs = graph.nodes[node]
            expected = float(direct.skips[attrs["layer"]]) if attrs["position"] == 6 else 0.0
            assert attrs["direct_contribution"] == expected
