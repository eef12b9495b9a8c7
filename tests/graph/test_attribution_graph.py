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


# ----------------------------------------------------------------------------- cross-layer transcoders


def _cross_layer_twins(path, **kinds):
    """(loaded, frozen with a per-layer set, frozen with the CLT of the same weights and zero cross writes)."""
    from graph_helpers import PROMPT_IDS, cross_layer, with_kind

    from circuit_helpers import loaded_model, random_transcoders
    from tccli.replacement.prompts import freeze_prompt

    loaded = loaded_model(path)
    transcoders = random_transcoders(loaded.info, 48, 0, bias_shift=-0.1)
    if kinds:
        transcoders = {layer: with_kind(t, kinds["kind"], kinds["skip"], layer) for layer, t in transcoders.items()}
    tokens = torch.tensor(PROMPT_IDS)
    clt = cross_layer(transcoders, off_diagonal=0.0)
    return loaded, freeze_prompt(loaded, transcoders, tokens), freeze_prompt(loaded, clt, tokens)


def test_cross_layer_transcoder_without_cross_writes_gives_the_same_graph_bit_for_bit(tiny_model_dirs):
    """A CLT whose decoders to later layers are zero: the node table, every row (entries, biases, values),
    influence, pruning and scores are torch.equal to the per-layer set's, with a budget (ranking) and heads;
    and the greedy circuit is the same graph with the same figures."""
    from tccli.circuit.search import SearchParams, greedy_search, paths_to_graph
    from tccli.graph.heads import head_split

    for arch, kinds in (("gpt2", {}), ("llama", {"kind": "jumprelu", "skip": True})):
        _, per_layer, clt = _cross_layer_twins(tiny_model_dirs[arch], **kinds)
        assert clt.cross_layer is not None and per_layer.cross_layer is None
        for layer_set, layer_clt in zip(per_layer.layers, clt.layers):
            assert torch.equal(layer_set.error, layer_clt.error)
        graphs = []
        for frozen in (per_layer, clt):
            targets, weights = salient_logit_targets(frozen, 8, max_logits=3)
            graph = build_attribution_graph(frozen, targets, weights, GraphParams(max_feature_nodes=60, rank_every=20))
            sources, edge_targets, _ = graph.kept_edges()
            graphs.append((graph, head_split(frozen, graph.table, targets, sources, edge_targets)))
        (a, heads_a), (b, heads_b) = graphs
        for name in ("feature_layer", "feature_position", "feature_index", "feature_activation", "target_weight"):
            assert torch.equal(getattr(a.table, name), getattr(b.table, name)), name
        assert len(a.adjacency.chunks) == len(b.adjacency.chunks) and a.adjacency.nnz > 100
        for chunk_a, chunk_b in zip(a.adjacency.chunks, b.adjacency.chunks):
            for name in ("nodes", "crow", "col", "value", "bias", "target_value", "dropped", "total_abs"):
                assert torch.equal(getattr(chunk_a, name), getattr(chunk_b, name)), name
        for name in ("influence", "cumulative", "node_mask"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert all(torch.equal(x, y) for x, y in zip(a.edge_mask, b.edge_mask))
        assert (a.replacement, a.completeness) == (b.replacement, b.completeness)
        assert torch.equal(heads_a.residual, heads_b.residual) and torch.equal(heads_a.by_head, heads_b.by_head)
        circuits = []
        for frozen in (per_layer, clt):
            target = salient_logit_targets(frozen, 8, max_logits=1)[0][0]
            result = greedy_search(frozen, target, SearchParams(iters=3, branches=8, both_signs=True))
            circuits.append(paths_to_graph(frozen, target, result, [str(t) for t in range(frozen.n_tokens)]))
        assert circuits[0].number_of_nodes() > 10
        assert dict(circuits[0].nodes(data=True)) == dict(circuits[1].nodes(data=True))
        assert list(circuits[0].edges(data=True)) == list(circuits[1].edges(data=True))


def test_cross_layer_errors_are_what_the_clt_misses(tiny_model_dirs):
    """Each layer's error node is the MLP's output less the CLT's reconstruction yhat_l' (every earlier layer's
    features' writes there, b_dec, skip), computed here by the CLT's own forward pass; the graph's scores use
    them (they differ from the scores with only the own-layer decoders)."""
    from graph_helpers import frozen_for

    from tccli.replacement.frozen import layer_views
    from tccli.replacement.prompts import freeze_prompt

    loaded, frozen = frozen_for(tiny_model_dirs["gpt2"], clt=True)
    clt = frozen.cross_layer
    inputs = {layer: frozen.layers[layer].transcoder_input for layer in clt.layers}
    reconstruction, _ = clt(inputs)
    for layer in clt.layers:
        expected = frozen.layers[layer].mlp_out - reconstruction[layer]
        assert torch.allclose(frozen.layers[layer].error, expected, atol=1e-5, rtol=0)
    own_only = freeze_prompt(loaded, layer_views(clt), frozen.tokens)
    assert not torch.allclose(own_only.layers[-1].error, frozen.layers[-1].error, atol=1e-3)
    scores = []
    for each in (frozen, own_only):
        targets, weights = salient_logit_targets(each, 8, max_logits=3)
        graph = build_attribution_graph(each, targets, weights, ALL)
        error_nodes = torch.arange(graph.table.error_start, graph.table.embed_start)
        row = dense_row(graph, graph.table.target_node(0))
        scores.append((graph.replacement, graph.completeness, row[error_nodes]))
    assert scores[0][0] != scores[1][0] and scores[0][1] != scores[1][1]
    assert not torch.allclose(scores[0][2], scores[1][2])
