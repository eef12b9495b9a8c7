"""Whole attribution graphs of the local replacement model (docs/method.md section 9): assembling one. Pure math.

Tensors in (a FrozenForward, targets and their weights), an ``AttributionGraph`` out; no model, no
files. The parts live beside this module: nodes.py (the node table), rows.py (rows of the adjacency
by batched backward passes), adjacency.py (their sparse storage), influence.py (influence, pruning,
scores), heads.py (the kept edges split by attention head).

**Which features get rows** (circuit-tracer's rule): the targets' rows first; then features ranked by
their influence on the targets estimated from the rows computed so far, computed most-influential-first
``rank_every`` rows at a time (circuit-tracer's 4 batches of 512) and re-ranked, up to
``max_feature_nodes``. Features left out keep no column in the final graph either (their edges count
as dropped mass).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch

from tccli.graph.adjacency import Adjacency, SparseRows
from tccli.graph.influence import graph_scores, influence, prune
from tccli.graph.nodes import NodeTable, node_table
from tccli.graph.rows import NodeWrites, RowsToCompute, compute_rows, feature_rows, target_rows
from tccli.replacement.frozen import FrozenForward
from tccli.replacement.targets import Target


@dataclass
class GraphParams:
    max_feature_nodes: int = 7500
    batch_size: int = 256  # rows per backward pass
    rank_every: int = 2048  # feature rows computed between re-rankings (circuit-tracer: 4 batches of 512)
    drop_mass: float = 1e-3
    node_threshold: float = 0.8
    edge_threshold: float = 0.98


@dataclass
class AttributionGraph:
    """The computed graph (unpruned rows, over the selected features), its influence, pruning and scores."""

    table: NodeTable  # selected features only
    adjacency: Adjacency  # columns numbered as ``table``
    influence: torch.Tensor  # [N]
    cumulative: torch.Tensor  # [N] each node's cumulative share in descending influence order
    node_mask: torch.Tensor  # [N] bool, kept by pruning
    edge_mask: list[torch.Tensor]  # per chunk [nnz] bool, kept by pruning
    replacement: float
    completeness: float
    n_active_features: int  # before the node budget
    stats: dict = field(default_factory=dict)

    def kept_edges(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(source nodes, target nodes, weights) of the edges pruning kept."""
        sources, targets, weights = [], [], []
        for chunk, mask in zip(self.adjacency.chunks, self.edge_mask):
            sources.append(chunk.col[mask].long())
            targets.append(chunk.nodes[chunk.row_ids()[mask]])
            weights.append(chunk.value[mask])
        return torch.cat(sources), torch.cat(targets), torch.cat(weights)


def rank_features(adjacency: Adjacency, table: NodeTable, visited: torch.Tensor) -> torch.Tensor:
    """Unvisited features, most influential first (influence estimated from the rows so far)."""
    estimate = influence(adjacency, table.n_nodes, table.weights())[: table.n_features]
    order = torch.argsort(estimate, descending=True, stable=True)
    return order[~visited[order]]


class ColumnMap:
    """The final graph keeps the columns of the features that got rows (circuit-tracer's rule): the other
    features' entries go to the rows' dropped sums, and nodes are renumbered to the final table."""

    def __init__(self, table: NodeTable, selected: torch.Tensor):
        keep = torch.nonzero(selected).reshape(-1)
        self.table = table.select_features(keep)
        device = keep.device
        self.new_index = torch.full((table.n_nodes,), -1, dtype=torch.long, device=device)
        self.new_index[keep] = torch.arange(keep.shape[0], device=device)
        shift = table.n_features - self.table.n_features
        self.new_index[table.n_features :] = torch.arange(table.n_features, table.n_nodes, device=device) - shift
        self.dropped_abs = 0.0  # absolute sum of the entries removed so far

    def __call__(self, chunk: SparseRows) -> SparseRows:
        keep = self.new_index.index_select(0, chunk.col) >= 0
        self.dropped_abs += float(chunk.value[~keep].abs().sum())
        restricted = chunk.filter_entries(keep, self.new_index)
        restricted.nodes = self.new_index[chunk.nodes]
        return restricted


def build_attribution_graph(
    frozen: FrozenForward,
    targets: list[Target],
    target_weight: torch.Tensor,
    params: GraphParams,
    progress: Optional[Callable[[int, int], None]] = None,
) -> AttributionGraph:
    """Everything `tc graph` computes from a frozen forward pass and its targets.

    Rows keep every active feature's column until the last ranking; from then on the graph's features
    are known and every row, stored or new, keeps only theirs."""
    stats = {"seconds_rows": 0.0, "seconds_ranking": 0.0, "backward_flop": 0, "dropped_small_abs": 0.0}
    columns: Optional[ColumnMap] = None
    table = node_table(frozen, target_weight)
    writes = NodeWrites(frozen, table)
    adjacency = Adjacency([])

    def store(spec: RowsToCompute) -> None:
        start = time.perf_counter()
        chunk = compute_rows(writes, spec, params.drop_mass, stats)
        stats["dropped_small_abs"] += float(chunk.dropped_abs.sum())
        adjacency.chunks.append(chunk if columns is None else columns(chunk))
        stats["seconds_rows"] += time.perf_counter() - start

    with torch.no_grad():
        store(target_rows(targets, table))
        # features that cannot reach any target (too late a layer or token) never get rows
        reads_after = max(t.read_point[1] for t in targets)
        last_token = max(t.position for t in targets)
        reachable = (table.feature_layer < reads_after) & (table.feature_position <= last_token)
        n_reachable = int(reachable.sum())
        budget = min(params.max_feature_nodes, n_reachable)
        visited = ~reachable
        n_visited = 0
        if progress:
            progress(0, budget)
        if budget == n_reachable:
            columns = ColumnMap(table, reachable)
            adjacency = adjacency.consume(columns)
        while n_visited < budget:
            if budget == n_reachable:
                pending = torch.nonzero(reachable).reshape(-1)
            else:
                start = time.perf_counter()
                ranked = rank_features(adjacency, table, visited)
                pending = ranked[: min(params.rank_every, budget - n_visited)]
                if n_visited + pending.shape[0] == budget:  # the last ranking: the graph's features are known
                    chosen = visited & reachable
                    chosen[pending] = True
                    columns = ColumnMap(table, chosen)
                    adjacency = adjacency.consume(columns)
                stats["seconds_ranking"] += time.perf_counter() - start
            # the set computed before the next ranking is fixed; batching rows of nearby tokens and
            # layers together only makes each backward pass smaller
            pending = pending[
                torch.argsort(
                    table.feature_position[pending] * (frozen.n_layers + 1) + table.feature_layer[pending], stable=True
                )
            ]
            for start_row in range(0, pending.shape[0], params.batch_size):
                batch = pending[start_row : start_row + params.batch_size]
                store(feature_rows(frozen, table, batch))
                visited[batch] = True
                n_visited += int(batch.shape[0])
                if progress:
                    progress(n_visited, budget)
        writes = None  # every row is computed: free the upstream writes before finishing the graph
        if columns is None:  # no feature rows at all
            columns = ColumnMap(table, torch.zeros_like(reachable))
            adjacency = adjacency.consume(columns)
        start = time.perf_counter()
        stats["dropped_budget_abs"] = columns.dropped_abs
        graph = finish_graph(adjacency, columns.table, params, stats)
        graph.n_active_features = table.n_features
        stats["seconds_finish"] = time.perf_counter() - start
        return graph


def finish_graph(
    adjacency: Adjacency, table: NodeTable, params: GraphParams, stats: Optional[dict] = None
) -> AttributionGraph:
    """Influence, pruning and scores of rows over ``table``'s nodes (columns already restricted)."""
    stats = {} if stats is None else stats
    weights = table.weights()
    normalized = adjacency.normalized()
    node_influence = influence(adjacency, table.n_nodes, weights, normalized)
    node_mask, edge_mask = prune(
        adjacency, table, node_influence, normalized, params.node_threshold, params.edge_threshold
    )
    replacement, completeness = graph_scores(adjacency, table, node_influence, normalized)
    ordered, order = torch.sort(node_influence, descending=True)
    cumulative = torch.zeros_like(node_influence)
    cumulative[order] = (ordered.double().cumsum(0) / ordered.double().sum()).to(node_influence.dtype)
    total_abs, dropped_abs = adjacency.cat("total_abs"), adjacency.cat("dropped_abs")
    whole = float(total_abs.sum().clamp(min=1e-30))
    small, budget = stats.pop("dropped_small_abs", 0.0), stats.pop("dropped_budget_abs", 0.0)
    stats.update(
        {
            "rows": adjacency.n_rows,
            "stored_entries": adjacency.nnz,
            "stored_bytes": adjacency.nbytes(),
            # shares of sum |A| over all rows: dropped as small (drop_mass), from features without rows
            "dropped_small_share": small / whole,
            "dropped_budget_share": budget / whole,
            "dropped_share_total": float(dropped_abs.sum()) / whole,
            "dropped_share_max_row": float((dropped_abs / total_abs.clamp(min=1e-30)).max()),
        }
    )
    return AttributionGraph(
        table=table,
        adjacency=adjacency,
        influence=node_influence,
        cumulative=cumulative,
        node_mask=node_mask,
        edge_mask=edge_mask,
        replacement=replacement,
        completeness=completeness,
        n_active_features=table.n_features,
        stats=stats,
    )
