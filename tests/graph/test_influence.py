"""Influence, pruning and scores of attribution graphs on a five-node graph worked out by hand, and
circuit-tracer's threshold rule."""

from __future__ import annotations

import pytest
import torch
from graph_helpers import hand_graph

from tccli.graph import influence as graph_influence


def test_influence_pruning_and_scores_by_hand():
    table, adjacency = hand_graph()
    # Â rows: t: f0 3/4, f1 1/4; f0: x 3/4, e 1/4; f1: f0 1/4, x 3/4.
    # wÂ = f0 .75, f1 .25; wÂ² = f0 .0625, x .75, e .1875; wÂ³ = x .046875, e .015625; wÂ⁴ = 0
    influence = graph_influence.influence(adjacency, table.n_nodes, table.weights())
    assert influence.tolist() == [0.8125, 0.25, 0.203125, 0.796875, 0.0]
    normalized = adjacency.normalized()
    replacement, completeness = graph_influence.graph_scores(adjacency, table, influence, normalized)
    assert replacement == 0.796875  # x / (x + e) = 51/64
    # (influence + w): f0 .8125, f1 .25, e .203125, x .796875, t 1 (sum 3.0625); error share of f0's row 1/4
    assert completeness == pytest.approx((0.8125 * 0.75 + 0.25 + 0.203125 + 0.796875 + 1) / 3.0625, abs=1e-15)
    # nodes by influence f0 .8125, x .796875, f1 .25, e .203125, t 0 (sum 2.0625): cumulative shares
    # .394, .780, .902, 1, 1 reach 0.8 at f1: e is pruned. On the pruned matrix Â': t: f0 .75, f1 .25;
    # f0: x 1; f1: f0 .25, x .75; influence' f0 .8125, f1 .25, x 1, + w (t 1). Edge scores:
    # t<-f0 .75, t<-f1 .25, f0<-x .8125, f1<-f0 .0625, f1<-x .1875 (sum 2.0625), cumulative from the
    # largest .394, .758, .879, .970, 1.
    cases = {
        0.98: ([True, True, False, True, True], 5),
        0.9: ([True, True, False, True, True], 4),
        0.8: ([True, False, False, True, True], 2),
    }
    for edge_threshold, (nodes, n_edges) in cases.items():
        node_mask, edge_mask = graph_influence.prune(adjacency, table, influence, normalized, 0.8, edge_threshold)
        assert node_mask.tolist() == nodes, edge_threshold
        assert sum(int(m.sum()) for m in edge_mask) == n_edges, edge_threshold
    # 0.8: t<-f1 and f1's inputs fall below .25, f1 keeps no input, so t<-f1 goes with it
    node_mask, edge_mask = graph_influence.prune(adjacency, table, influence, normalized, 0.8, 0.8)
    kept = [(int(chunk.nodes[0]), int(c)) for chunk, m in zip(adjacency.chunks, edge_mask) for c in chunk.col[m]]
    assert sorted(kept) == [(0, 3), (4, 0)]
    # 0.9 drops f1<-f0 (.0625) only
    node_mask, edge_mask = graph_influence.prune(adjacency, table, influence, normalized, 0.8, 0.9)
    kept = [(int(chunk.nodes[0]), int(c)) for chunk, m in zip(adjacency.chunks, edge_mask) for c in chunk.col[m]]
    assert sorted(kept) == [(0, 3), (1, 3), (4, 0), (4, 1)]


def test_find_threshold_matches_circuit_tracer_rule():
    scores = torch.tensor([0.1, 0.4, 0.2, 0.3])  # sorted .4 .3 .2 .1: cumulative .4 .7 .9 1
    assert float(graph_influence.find_threshold(scores, 0.7)) == pytest.approx(0.3)  # reached exactly at .3
    assert float(graph_influence.find_threshold(scores, 0.71)) == pytest.approx(0.2)
    assert float(graph_influence.find_threshold(scores, 1.0)) == pytest.approx(0.1)
    assert float(graph_influence.find_threshold(scores, 0.0)) == pytest.approx(0.4)
