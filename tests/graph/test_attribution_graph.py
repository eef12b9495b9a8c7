"""Assembling attribution graphs: which features get rows, against circuit-tracer's ranking loop replayed on
dense matrices, and the mass dropped with the features left out."""

from __future__ import annotations

import torch
from graph_helpers import ALL, dense_row, frozen_for

from tccli.graph.attribution_graph import GraphParams, build_attribution_graph
from tccli.graph.nodes import NodeTable
from tccli.replacement.targets import salient_logit_targets


def circuit_tracer_selection(
    dense: torch.Tensor,
    target_nodes: list[int],
    weights: torch.Tensor,
    n_features: int,
    budget: int,
    batch_size: int,
    update_interval: int,
) -> list[int]:
    """circuit-tracer's attribute() loop replayed on a dense matrix of every row (rows: nodes)."""
    computed = list(target_nodes)
    visited: list[int] = []
    while len(visited) < budget:
        rows = dense[computed].abs()
        normalized = rows / rows.sum(1, keepdim=True).clamp(min=1e-10)
        weight_of_row = torch.zeros(len(computed), dtype=dense.dtype)
        weight_of_row[: len(target_nodes)] = weights
        current, total = weight_of_row, torch.zeros(dense.shape[1], dtype=dense.dtype)
        position = {node: i for i, node in enumerate(computed)}
        while True:
            flow = current @ normalized  # over all nodes
            if not bool(flow.any()):
                break
            total += flow
            current = torch.stack([flow[node] for node in computed])
        order = torch.argsort(total[:n_features], descending=True, stable=True).tolist()
        pending = [f for f in order if f not in visited][: min(update_interval * batch_size, budget - len(visited))]
        visited += pending
        computed += pending
        del position
    return sorted(visited)


def test_feature_selection_is_circuit_tracers(tiny_model_dirs, one_torch_thread):
    loaded, frozen = frozen_for(tiny_model_dirs["gpt2"], "float64")
    targets, weights = salient_logit_targets(frozen, 8, max_logits=5)
    full = build_attribution_graph(frozen, targets, weights, ALL)
    table = full.table
    dense = torch.stack([dense_row(full, node, missing_ok=True) for node in range(table.n_nodes)])
    assert float(dense[table.error_start : table.target_start].abs().sum()) == 0.0  # no rows for errors, inputs
    params = GraphParams(max_feature_nodes=40, batch_size=8, rank_every=16, drop_mass=0.0)
    partial = build_attribution_graph(frozen, targets, weights, params)
    expected = circuit_tracer_selection(
        dense, [table.target_node(k) for k in range(len(targets))], weights, table.n_features, 40, 8, 2
    )
    got = [full_index(full.table, partial.table, i) for i in range(partial.table.n_features)]
    assert got == expected and len(got) == 40
    # features without rows lose their columns; their edges are the budget's dropped mass
    assert partial.stats["dropped_budget_share"] > 0 and partial.stats["dropped_small_share"] == 0


def full_index(full: NodeTable, partial: NodeTable, i: int) -> int:
    key = (partial.feature_layer[i], partial.feature_position[i], partial.feature_index[i])
    match = (full.feature_layer == key[0]) & (full.feature_position == key[1]) & (full.feature_index == key[2])
    return int(torch.nonzero(match)[0])
