"""Sparse storage of attribution graphs: the mass dropped as small is bounded and accounted, and what is
kept is exact."""

from __future__ import annotations

import torch
from graph_helpers import ALL, dense_row, frozen_for

from tccli.graph.attribution_graph import GraphParams, build_attribution_graph
from tccli.replacement.targets import salient_logit_targets


def test_dropped_mass_is_bounded_and_accounted(tiny_model_dirs, one_torch_thread):
    loaded, frozen = frozen_for(tiny_model_dirs["llama"])
    targets, weights = salient_logit_targets(frozen, 8, max_logits=3)
    exact = build_attribution_graph(frozen, targets, weights, ALL)
    drop = GraphParams(max_feature_nodes=10**9, batch_size=64, drop_mass=0.02)
    lossy = build_attribution_graph(frozen, targets, weights, drop)
    assert lossy.adjacency.nnz < exact.adjacency.nnz
    for chunk in lossy.adjacency.chunks:
        assert bool((chunk.dropped_abs <= 0.02 * chunk.total_abs + 1e-12).all())
        # stored + dropped + bias is still the value
        total = chunk.row_sums(chunk.value) + chunk.dropped + chunk.bias
        scale = chunk.row_sums(chunk.value.abs()) + chunk.dropped_abs + chunk.bias.abs()
        assert bool(((total - chunk.target_value).abs() <= 1e-5 * scale).all())
    assert 0 < lossy.stats["dropped_small_share"] <= 0.02
    # what is kept is exactly what the exact graph holds at those entries
    exact_rows = {int(n): dense_row(exact, int(n)) for n in exact.adjacency.nodes}
    for chunk in lossy.adjacency.chunks:
        for r in range(chunk.n_rows):
            lo, hi = int(chunk.crow[r]), int(chunk.crow[r + 1])
            reference = exact_rows[int(chunk.nodes[r])]
            assert torch.equal(chunk.value[lo:hi], reference[chunk.col[lo:hi].long()])
            smallest_kept = float(chunk.value[lo:hi].abs().min())
            dropped = reference.clone()
            dropped[chunk.col[lo:hi].long()] = 0
            assert float(dropped.abs().max()) <= smallest_kept  # only the smallest entries go
