"""Influence, pruning and the replacement and completeness scores of an attribution graph (docs/method.md
section 9). Pure math: sparse rows and a node table in, influence, masks and scores out.

**Influence, pruning, scores** exactly as circuit-tracer's ``graph.py`` defines them: ``Â = |A|`` with
each row divided by its sum; influence ``= w (Â + Â^2 + ...)`` with ``w`` the target weights; node
pruning keeps the nodes whose influence reaches ``node_threshold`` of the total (the sort runs over
every node, embeddings included; embeddings and targets are then always kept); edge pruning scores
each edge of the node-pruned matrix ``Â'[t, s] * (influence'_t + w_t)`` and keeps ``edge_threshold`` of
the total; then feature and error nodes without an outgoing kept edge and features without an incoming
one are dropped until nothing changes. replacement = influence of inputs / (inputs + errors);
completeness = sum over nodes of ``(1 - error share of the node's row) * (influence + w)`` over
``sum(influence + w)`` (both on the unpruned graph).
"""

from __future__ import annotations

from typing import Optional

import torch

from tccli.graph.adjacency import Adjacency
from tccli.graph.nodes import NodeTable


def influence(
    adjacency: Adjacency, n_nodes: int, weights: torch.Tensor, normalized: Optional[list[torch.Tensor]] = None
) -> torch.Tensor:
    """[n_nodes]: ``w (Â + Â^2 + ...)`` with Â the normalised rows (circuit-tracer's compute_influence).

    Influence travels on only through nodes that have rows, so the powers are taken on the square system
    rows x row nodes (small), and one product with the whole of Â then gives every node's total."""
    normalized = adjacency.normalized() if normalized is None else normalized
    nodes = adjacency.nodes
    device = nodes.device
    dtype = normalized[0].dtype if normalized else weights.dtype
    row_of_node = torch.full((n_nodes,), -1, dtype=torch.long, device=device)
    row_of_node[nodes] = torch.arange(nodes.shape[0], device=device)
    inner_from, inner_to, inner_value, offset = [], [], [], 0
    for chunk, values in zip(adjacency.chunks, normalized):
        source_rows = row_of_node.index_select(0, chunk.col)
        inner = source_rows >= 0
        inner_from.append(chunk.row_ids()[inner].long() + offset)
        inner_to.append(source_rows[inner])
        inner_value.append(values[inner])
        offset += chunk.n_rows
    inner_from, inner_to, inner_value = torch.cat(inner_from), torch.cat(inner_to), torch.cat(inner_value)
    current = weights[nodes].to(dtype)  # the flow arriving at each row's node
    flow = current.clone()
    for _ in range(nodes.shape[0] + 1):  # a DAG: the flow dies out within its depth
        step = torch.zeros_like(current).index_add_(0, inner_to, inner_value * current.index_select(0, inner_from))
        if not bool(step.any()):
            break
        flow += step
        current = step
    else:
        raise RuntimeError("influence did not converge: the rows are not acyclic")
    out = torch.zeros(n_nodes, dtype=dtype, device=device)
    offset = 0
    for chunk, values in zip(adjacency.chunks, normalized):
        out.index_add_(0, chunk.col, values * flow[offset : offset + chunk.n_rows].index_select(0, chunk.row_ids()))
        offset += chunk.n_rows
    return out


def find_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The score of the entry at which the descending cumulative share first reaches ``threshold``
    (circuit-tracer's find_threshold; the last entry when rounding never reaches it)."""
    ordered = torch.sort(scores, descending=True).values
    cumulative = ordered.double().cumsum(0) / ordered.double().sum()
    index = int(torch.searchsorted(cumulative, torch.tensor(threshold, dtype=torch.float64, device=scores.device)))
    return ordered[min(index, ordered.shape[0] - 1)]


# ----------------------------------------------------------------------------- pruning and scores


def prune(
    adjacency: Adjacency,
    table: NodeTable,
    node_influence: torch.Tensor,
    normalized: list[torch.Tensor],
    node_threshold: float,
    edge_threshold: float,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """circuit-tracer's prune_graph: (node mask [N], per chunk edge mask [nnz])."""
    if not 0.0 <= node_threshold <= 1.0 or not 0.0 <= edge_threshold <= 1.0:
        raise ValueError("node_threshold and edge_threshold must be between 0 and 1")
    weights = table.weights()
    node_mask = node_influence >= find_threshold(node_influence, node_threshold)
    node_mask[table.embed_start :] = True  # inputs and targets are always kept
    ends = [(chunk.nodes.index_select(0, chunk.row_ids()), chunk.col) for chunk in adjacency.chunks]
    in_pruned = [node_mask[target] & node_mask[source] for target, source in ends]
    pruned = Adjacency([chunk.filter_entries(keep) for chunk, keep in zip(adjacency.chunks, in_pruned)])
    pruned_normalized = pruned.normalized()
    pruned_influence = influence(pruned, table.n_nodes, weights, pruned_normalized) + weights
    scores = [
        values * pruned_influence[chunk.nodes.index_select(0, chunk.row_ids())]
        for chunk, values in zip(pruned.chunks, pruned_normalized)
    ]
    all_scores = torch.cat(scores)
    threshold = find_threshold(all_scores, edge_threshold) if all_scores.numel() else all_scores.new_tensor(0.0)
    edge_mask = []
    for chunk, keep, score in zip(adjacency.chunks, in_pruned, scores):
        mask = torch.zeros(chunk.nnz, dtype=torch.bool, device=keep.device)
        mask[keep] = score >= threshold
        edge_mask.append(mask)
    # feature and error nodes need an outgoing kept edge, features an incoming one; repeat until stable
    prunable = torch.zeros(table.n_nodes, dtype=torch.bool, device=node_mask.device)
    prunable[: table.embed_start] = True
    while True:
        has_out = torch.zeros_like(node_mask)
        has_in = torch.zeros_like(node_mask)
        for (target, source), mask in zip(ends, edge_mask):
            mask &= node_mask[target] & node_mask[source]
            has_out[source[mask]] = True
            has_in[target[mask]] = True
        new_mask = node_mask & ~(prunable & ~has_out)
        new_mask[: table.n_features] &= has_in[: table.n_features]
        if bool((new_mask == node_mask).all()):
            return node_mask, edge_mask
        node_mask = new_mask


def graph_scores(
    adjacency: Adjacency, table: NodeTable, node_influence: torch.Tensor, normalized: list[torch.Tensor]
) -> tuple[float, float]:
    """circuit-tracer's compute_graph_scores on the unpruned graph: (replacement, completeness)."""
    inputs = float(node_influence[table.embed_start : table.target_start].sum())
    errors = float(node_influence[table.error_start : table.embed_start].sum())
    replacement = inputs / (inputs + errors) if inputs + errors > 0 else float("nan")
    error_share = torch.zeros(table.n_nodes, dtype=node_influence.dtype, device=node_influence.device)
    for chunk, values in zip(adjacency.chunks, normalized):
        col = chunk.col.long()
        is_error = (col >= table.error_start) & (col < table.embed_start)
        error_share.index_add_(0, chunk.nodes.index_select(0, chunk.row_ids())[is_error], values[is_error])
    output = node_influence + table.weights()
    completeness = float(((1 - error_share) * output).sum() / output.sum())
    return replacement, completeness
