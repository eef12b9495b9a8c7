"""Attribution graphs: every row's identity (incoming edges + bias == value), every edge against autograd
on an independently written replacement model, a graph whose influence, pruning and scores are worked
out by hand, circuit-tracer's feature ranking replayed on dense matrices, and sparse storage."""

from __future__ import annotations

import pytest
import torch

from circuit_helpers import loaded_model, random_transcoders
from tccli.graph import attribution_graph as ag
from tccli.replacement.frozen import FrozenForward
from tccli.replacement.prompts import freeze_prompt
from tccli.transcoders.transcoder import Transcoder
from tccli.config.transcoders import TranscoderConfig
from tccli.replacement.targets import Target, direction_target, feature_target, unembed_target

PROMPT_IDS = [0, 37, 90, 151, 12, 200, 64, 7, 99]


def with_kind(transcoder: Transcoder, activation: str, skip: bool = False, seed: int = 0) -> Transcoder:
    """The same weights as another kind of transcoder (thresholds and W_skip random)."""
    config = TranscoderConfig(**{**transcoder.config.to_dict(), "activation": activation, "skip": skip,
                                 # signed_topk keeps 30 of 48: most tokens then keep negative values too
                                 "k": {"topk": 6, "batchtopk": 6, "signed_topk": 30}.get(activation)})
    out = Transcoder(config).to(transcoder.W_enc.dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in transcoder.tensor_names():
            getattr(out, name).copy_(getattr(transcoder, name))
        if out.threshold is not None:
            out.threshold.copy_(torch.rand(out.threshold.shape, generator=generator) * 0.2)
        if out.W_skip is not None:
            out.W_skip.copy_(torch.randn(out.W_skip.shape, generator=generator) / out.W_skip.shape[0] ** 0.5)
    return out


def frozen_for(path, dtype: str = "float32", kind: str = "relu", skip: bool = False, n_features: int = 48,
               decoder_scale: float = 1.0):
    loaded = loaded_model(path, dtype)
    torch_dtype = torch.float64 if dtype == "float64" else torch.float32
    transcoders = random_transcoders(loaded.info, n_features, 0, torch_dtype, bias_shift=-0.1)
    with torch.no_grad():
        for transcoder in transcoders.values():
            transcoder.W_dec.mul_(decoder_scale)
    if kind != "relu" or skip:
        transcoders = {layer: with_kind(t, kind, skip, layer) for layer, t in transcoders.items()}
    return loaded, freeze_prompt(loaded, transcoders, torch.tensor(PROMPT_IDS))


def every_target(frozen: FrozenForward, d_model: int) -> list[tuple[list[Target], torch.Tensor]]:
    """(targets, weights) for each kind of target tc graph takes."""
    last = frozen.n_layers - 1
    direction = torch.randn(d_model, generator=torch.Generator().manual_seed(1), dtype=frozen.embed.dtype)
    one = torch.ones(1, dtype=frozen.embed.dtype)
    active = torch.nonzero(frozen.layers[last].z[8]).reshape(-1)
    return [
        ag.salient_logit_targets(frozen, 8, max_logits=4, probability=0.95),
        ([feature_target(frozen, last, int(active[0]), 8)], one),
        ([unembed_target(frozen, 40, 20, 6)], one),
        ([direction_target(frozen, direction, last, 7)], one),
    ]


def dense_row_sums(graph: ag.AttributionGraph):
    for chunk in graph.adjacency.chunks:
        yield chunk, chunk.row_sums(chunk.value), chunk.row_sums(chunk.value.abs())


ALL = ag.GraphParams(max_feature_nodes=10**9, batch_size=64, drop_mass=0.0)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_rows_plus_bias_equal_values(tiny_model_dirs, arch, one_torch_thread):
    """Every feature row and every target: sum of incoming edges + bias terms == pre-activation or
    target value, to 1e-5 of the terms' magnitude in float32; nothing dropped with drop_mass 0."""
    loaded, frozen = frozen_for(tiny_model_dirs[arch])
    for targets, weights in every_target(frozen, loaded.info.d_model):
        graph = ag.build_graph(frozen, targets, weights, ALL)
        n_rows = 0
        for chunk, total, magnitude in dense_row_sums(graph):
            assert float(chunk.dropped_abs.abs().max()) == 0.0
            scale = magnitude + chunk.bias.abs()
            error = (total + chunk.bias - chunk.target_value).abs()
            assert bool((error <= 1e-5 * scale).all()), (targets[0].description, float((error / scale).max()))
            n_rows += chunk.n_rows
        reachable = graph.table.n_features  # every feature upstream of the targets has a row
        assert n_rows == reachable + len(targets) and reachable > 20
        # the feature rows' values are the real pre-activations
        feature_rows = graph.adjacency.nodes < graph.table.n_features
        features = graph.adjacency.nodes[feature_rows]
        pre = torch.stack([frozen.layers[int(layer)].pre[int(position), int(index)] for layer, position, index in zip(
            graph.table.feature_layer[features], graph.table.feature_position[features],
            graph.table.feature_index[features])])
        assert torch.equal(graph.adjacency.cat("target_value")[feature_rows], pre)


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama", "gemma2", "qwen3"])
@pytest.mark.parametrize("spaces", [("mlp_input", "mlp_output"), ("resid_mid", "mlp_out")])
def test_identity_in_other_spaces_with_skip(all_model_dirs, arch, spaces, one_torch_thread):
    """JumpReLU skip transcoders reading mlp_input or resid_mid and writing either output space, on all five
    architectures (Gemma-2's post-norms): every row's edges + bias == its value; the skip connection is a
    linear path between nodes (METHOD.md section 9), not an error."""
    loaded = loaded_model(all_model_dirs[arch])
    transcoders = random_transcoders(loaded.info, 48, 0, bias_shift=-0.1, activation="jumprelu", skip=True,
                                     input_space=spaces[0], output_space=spaces[1])
    frozen = freeze_prompt(loaded, transcoders, torch.tensor(PROMPT_IDS))
    for targets, weights in every_target(frozen, loaded.info.d_model)[:3]:
        graph = ag.build_graph(frozen, targets, weights, ALL)
        assert graph.table.n_features > 10
        for chunk, total, magnitude in dense_row_sums(graph):
            scale = magnitude + chunk.bias.abs()
            error = (total + chunk.bias - chunk.target_value).abs()
            assert bool((error <= 1e-5 * scale).all()), (arch, spaces, float((error / scale).max()))


@pytest.mark.parametrize("kind, skip", [("topk", False), ("signed_topk", False), ("batchtopk", False),
                                        ("jumprelu", False), ("relu", True)])
def test_identity_for_every_transcoder_kind(tiny_model_dirs, kind, skip, one_torch_thread):
    loaded, frozen = frozen_for(tiny_model_dirs["llama"], kind=kind, skip=skip)
    targets, weights = ag.salient_logit_targets(frozen, 8, max_logits=3)
    graph = ag.build_graph(frozen, targets, weights, ALL)
    assert graph.table.n_features > 10
    if kind == "signed_topk":  # active features with negative activations are nodes like any other
        assert int((graph.table.feature_activation < 0).sum()) > 10
    for chunk, total, magnitude in dense_row_sums(graph):
        error = (total + chunk.bias - chunk.target_value).abs()
        assert bool((error <= 1e-5 * (magnitude + chunk.bias.abs())).all())


def test_stories260k_identity(stories_dir, one_torch_thread):
    loaded = loaded_model(stories_dir)
    transcoders = random_transcoders(loaded.info, 256, 3, bias_shift=-0.2)
    tokens = torch.tensor([loaded.info.bos_token_id] + loaded.tokenizer.encode(
        "Once upon a time there was a little girl named Lily", add_special_tokens=False))
    frozen = freeze_prompt(loaded, transcoders, tokens)
    targets, weights = ag.salient_logit_targets(frozen, frozen.n_tokens - 1)
    graph = ag.build_graph(frozen, targets, weights, ag.GraphParams(max_feature_nodes=300, drop_mass=0.0))
    for chunk in graph.adjacency.chunks:
        total = chunk.row_sums(chunk.value) + chunk.dropped + chunk.bias
        scale = chunk.row_sums(chunk.value.abs()) + chunk.dropped_abs + chunk.bias.abs()
        assert bool(((total - chunk.target_value).abs() <= 1e-5 * scale).all())
    assert 0.0 < graph.replacement < 1.0 and 0.0 < graph.completeness < 1.0


# ----------------------------------------------------------------------------- autograd


def replacement_value(frozen: FrozenForward, target_row: dict, leaves: dict) -> torch.Tensor:
    """A row's value recomputed from leaves (inputs, feature activations, error terms) through the frozen
    model: patterns and norm scales held, each MLP output = z W_dec + b_dec + error from the leaves (+ a
    skip transcoder's x W_skip from the MLP's input), never recomputed. Written from the model's
    definition, not from attribution_graph."""
    position, (n_attn, n_mlp) = target_row["position"], target_row["read_point"]

    def normalized(x, scale):
        if frozen.layernorm:
            x = x - x.mean(-1, keepdim=True)
        return x / scale.unsqueeze(-1)

    resid = leaves["inputs"]
    for index, layer in enumerate(frozen.layers):
        if (n_attn, n_mlp) == (index, index):
            break
        values = normalized(resid, layer.attn_scale) @ layer.W_V  # [H, T, dh]
        if layer.b_V is not None:
            values = values + layer.b_V.unsqueeze(1)
        attn = torch.einsum("hts,hse,hed->td", layer.pattern, values, layer.W_O) + layer.b_O
        mlp = leaves["z", index] @ layer.transcoder.W_dec + layer.transcoder.b_dec + leaves["error", index]
        if layer.transcoder.W_skip is not None:  # a linear path from the MLP's input (normalized -> mlp_out)
            assert (layer.input_space, layer.transcoder.config.output_space) == ("normalized", "mlp_out")
        if frozen.parallel:  # the MLP reads resid_pre
            if layer.transcoder.W_skip is not None:
                mlp = mlp + normalized(resid, layer.mlp_scale) @ layer.transcoder.W_skip
            resid = resid + attn + mlp
        else:
            resid = resid + attn
            if (n_attn, n_mlp) == (index + 1, index):
                break
            if layer.transcoder.W_skip is not None:  # the MLP reads resid_mid
                mlp = mlp + normalized(resid, layer.mlp_scale) @ layer.transcoder.W_skip
            resid = resid + mlp
    return target_row["read"](resid[position])


def row_of(frozen: FrozenForward, graph: ag.AttributionGraph, targets, node: int) -> dict:
    """How node ``node`` (a target or a feature) reads the residual: its token, read point and read function."""
    table = graph.table
    if node >= table.target_start:
        target = targets[node - table.target_start]
        kind = target.description["kind"]
        if kind == "feature":
            layer_index, f = target.description["layer"], target.description["feature"]
        elif kind in ("logit", "logit_diff"):
            a, b, t = target.description["token"], target.description.get("token_b"), target.position
            demeaned = target.description.get("demeaned", False)

            def read(x, a=a, b=b, t=t, demeaned=demeaned):
                x = x - x.mean() if frozen.layernorm else x
                logits = (x / frozen.final_scale[t]) @ frozen.W_U + frozen.b_U
                return logits[a] - (logits[b] if b is not None else logits.mean() if demeaned else 0)
            return {"node": node, "position": target.position, "read_point": target.read_point, "read": read}
        else:
            return {"node": node, "position": target.position, "read_point": target.read_point,
                    "read": lambda x, v=target.vector: x @ v}
        t = target.position
    else:
        layer_index, t, f = (int(table.feature_layer[node]), int(table.feature_position[node]),
                             int(table.feature_index[node]))
    layer = frozen.layers[layer_index]

    def read(x, layer=layer, f=f, t=t):
        x = x - x.mean() if frozen.layernorm else x
        return layer.transcoder.pre_activation(x / layer.mlp_scale[t])[f]
    return {"node": node, "position": t, "read_point": frozen.mlp_read_point(layer_index), "read": read}


def rows_to_check(frozen: FrozenForward, graph: ag.AttributionGraph, targets) -> list[dict]:
    """Each target row and a few feature rows."""
    table = graph.table
    nodes = [table.target_node(k) for k in range(len(targets))]
    nodes += list(range(0, table.n_features, max(1, table.n_features // 6)))
    return [row_of(frozen, graph, targets, node) for node in nodes]


def dense_row(graph: ag.AttributionGraph, node: int, missing_ok: bool = False) -> torch.Tensor:
    for chunk in graph.adjacency.chunks:
        hit = torch.nonzero(chunk.nodes == node).reshape(-1)
        if hit.numel():
            r = int(hit[0])
            row = torch.zeros(graph.table.n_nodes, dtype=chunk.value.dtype)
            lo, hi = int(chunk.crow[r]), int(chunk.crow[r + 1])
            row[chunk.col[lo:hi].long()] = chunk.value[lo:hi]
            return row
    if missing_ok:
        return torch.zeros(graph.table.n_nodes, dtype=graph.influence.dtype)
    raise KeyError(node)


@pytest.mark.parametrize("arch, kind, skip", [("gpt2", "relu", False), ("neox", "relu", False), ("llama", "relu", False),
                                              ("llama", "topk", False), ("gpt2", "jumprelu", True)])
def test_edges_equal_autograd(tiny_model_dirs, arch, kind, skip, one_torch_thread):
    """Each edge == d(row's value)/d(source's amount) x amount on the frozen replacement model (the kind only
    decides which features are active; a skip term is a linear path from its MLP's input, not a node)."""
    loaded, frozen = frozen_for(tiny_model_dirs[arch], "float64", kind=kind, skip=skip)
    inputs = frozen.embed + (frozen.pos_embed if frozen.pos_embed is not None else 0)
    for targets, weights in every_target(frozen, loaded.info.d_model):
        graph = ag.build_graph(frozen, targets, weights, ALL)
        table = graph.table
        for row in rows_to_check(frozen, graph, targets):
            leaves = {"inputs": inputs.clone().requires_grad_()}
            for index, layer in enumerate(frozen.layers):
                leaves["z", index] = layer.z.clone().requires_grad_()
                leaves["error", index] = layer.error.clone().requires_grad_()
            value = replacement_value(frozen, row, leaves)
            value.backward()
            expected = torch.zeros(table.n_nodes, dtype=torch.float64)
            for feature in range(table.n_features):
                layer, t, f = (int(table.feature_layer[feature]), int(table.feature_position[feature]),
                               int(table.feature_index[feature]))
                grad = leaves["z", layer].grad
                expected[feature] = 0.0 if grad is None else grad[t, f] * frozen.layers[layer].z[t, f]
            for layer in range(table.n_layers):
                grad = leaves["error", layer].grad
                if grad is not None:
                    for t in range(table.n_tokens):
                        expected[table.error_node(layer, t)] = grad[t] @ frozen.layers[layer].error[t]
            for t in range(table.n_tokens):
                expected[table.embed_node(t)] = leaves["inputs"].grad[t] @ inputs[t]
            got = dense_row(graph, row["node"])
            scale = float(expected.abs().sum())
            assert scale > 0
            assert torch.allclose(got, expected, atol=1e-10 * scale, rtol=0), (arch, row["node"])
            # the leaves reproduce the real value: the model above is the replacement model itself (Llama's
            # attention is float32 inside HF's eager kernel: exact to ~1e-7, see test_attribution)
            index = graph.adjacency.nodes == row["node"]
            real, bias = graph.adjacency.cat("target_value")[index], graph.adjacency.cat("bias")[index]
            tolerance = 1e-7 if arch == "llama" else 1e-10
            assert abs(float(value) - float(real[0])) < tolerance * (scale + abs(float(bias[0])))


# ----------------------------------------------------------------------------- worked by hand


def hand_graph() -> tuple[ag.NodeTable, ag.Adjacency]:
    """Nodes f0, f1 (features), e (error), x (input), t (target, weight 1); edges into
    t: f0 3, f1 -1;  into f0: x 3, e 1;  into f1: f0 1, x 3."""
    table = ag.NodeTable(n_layers=1, n_tokens=1, feature_layer=torch.tensor([0, 0]),
                         feature_position=torch.tensor([0, 0]), feature_index=torch.tensor([0, 1]),
                         feature_activation=torch.tensor([1.0, 1.0], dtype=torch.float64),
                         target_weight=torch.tensor([1.0], dtype=torch.float64))
    f0, f1, e, x, t = 0, 1, table.error_node(0, 0), table.embed_node(0), table.target_node(0)
    assert (e, x, t) == (2, 3, 4)
    rows = {t: {f0: 3.0, f1: -1.0}, f0: {x: 3.0, e: 1.0}, f1: {f0: 1.0, x: 3.0}}
    chunks = []
    for node, entries in rows.items():  # one chunk per row: chunk boundaries must not matter
        values = torch.tensor(list(entries.values()), dtype=torch.float64)
        zero = torch.zeros(1, dtype=torch.float64)
        chunks.append(ag.SparseRows(
            nodes=torch.tensor([node]), crow=torch.tensor([0, len(entries)]),
            col=torch.tensor(list(entries), dtype=torch.int32), value=values, bias=zero, target_value=values.sum(0, True),
            dropped=zero, dropped_abs=zero, total_abs=values.abs().sum(0, True)))
    return table, ag.Adjacency(chunks)


def test_influence_pruning_and_scores_by_hand():
    table, adjacency = hand_graph()
    # Â rows: t: f0 3/4, f1 1/4; f0: x 3/4, e 1/4; f1: f0 1/4, x 3/4.
    # wÂ = f0 .75, f1 .25; wÂ² = f0 .0625, x .75, e .1875; wÂ³ = x .046875, e .015625; wÂ⁴ = 0
    influence = ag.influence(adjacency, table.n_nodes, table.weights())
    assert influence.tolist() == [0.8125, 0.25, 0.203125, 0.796875, 0.0]
    normalized = adjacency.normalized()
    replacement, completeness = ag.graph_scores(adjacency, table, influence, normalized)
    assert replacement == 0.796875  # x / (x + e) = 51/64
    # (influence + w): f0 .8125, f1 .25, e .203125, x .796875, t 1 (sum 3.0625); error share of f0's row 1/4
    assert completeness == pytest.approx((0.8125 * 0.75 + 0.25 + 0.203125 + 0.796875 + 1) / 3.0625, abs=1e-15)
    # nodes by influence f0 .8125, x .796875, f1 .25, e .203125, t 0 (sum 2.0625): cumulative shares
    # .394, .780, .902, 1, 1 reach 0.8 at f1: e is pruned. On the pruned matrix Â': t: f0 .75, f1 .25;
    # f0: x 1; f1: f0 .25, x .75; influence' f0 .8125, f1 .25, x 1, + w (t 1). Edge scores:
    # t<-f0 .75, t<-f1 .25, f0<-x .8125, f1<-f0 .0625, f1<-x .1875 (sum 2.0625), cumulative from the
    # largest .394, .758, .879, .970, 1.
    cases = {0.98: ([True, True, False, True, True], 5), 0.9: ([True, True, False, True, True], 4),
             0.8: ([True, False, False, True, True], 2)}
    for edge_threshold, (nodes, n_edges) in cases.items():
        node_mask, edge_mask = ag.prune(adjacency, table, influence, normalized, 0.8, edge_threshold)
        assert node_mask.tolist() == nodes, edge_threshold
        assert sum(int(m.sum()) for m in edge_mask) == n_edges, edge_threshold
    # 0.8: t<-f1 and f1's inputs fall below .25, f1 keeps no input, so t<-f1 goes with it
    node_mask, edge_mask = ag.prune(adjacency, table, influence, normalized, 0.8, 0.8)
    kept = [(int(chunk.nodes[0]), int(c)) for chunk, m in zip(adjacency.chunks, edge_mask) for c in chunk.col[m]]
    assert sorted(kept) == [(0, 3), (4, 0)]
    # 0.9 drops f1<-f0 (.0625) only
    node_mask, edge_mask = ag.prune(adjacency, table, influence, normalized, 0.8, 0.9)
    kept = [(int(chunk.nodes[0]), int(c)) for chunk, m in zip(adjacency.chunks, edge_mask) for c in chunk.col[m]]
    assert sorted(kept) == [(0, 3), (1, 3), (4, 0), (4, 1)]


def test_find_threshold_matches_circuit_tracer_rule():
    scores = torch.tensor([0.1, 0.4, 0.2, 0.3])  # sorted .4 .3 .2 .1: cumulative .4 .7 .9 1
    assert float(ag.find_threshold(scores, 0.7)) == pytest.approx(0.3)  # reached exactly at .3
    assert float(ag.find_threshold(scores, 0.71)) == pytest.approx(0.2)
    assert float(ag.find_threshold(scores, 1.0)) == pytest.approx(0.1)
    assert float(ag.find_threshold(scores, 0.0)) == pytest.approx(0.4)


# ----------------------------------------------------------------------------- which features get rows


def circuit_tracer_selection(dense: torch.Tensor, target_nodes: list[int], weights: torch.Tensor, n_features: int,
                             budget: int, batch_size: int, update_interval: int) -> list[int]:
    """circuit-tracer's attribute() loop replayed on a dense matrix of every row (rows: nodes)."""
    computed = list(target_nodes)
    visited: list[int] = []
    while len(visited) < budget:
        rows = dense[computed].abs()
        normalized = rows / rows.sum(1, keepdim=True).clamp(min=1e-10)
        weight_of_row = torch.zeros(len(computed), dtype=dense.dtype)
        weight_of_row[:len(target_nodes)] = weights
        current, total = weight_of_row, torch.zeros(dense.shape[1], dtype=dense.dtype)
        position = {node: i for i, node in enumerate(computed)}
        while True:
            flow = current @ normalized  # over all nodes
            if not bool(flow.any()):
                break
            total += flow
            current = torch.stack([flow[node] for node in computed])
        order = torch.argsort(total[:n_features], descending=True, stable=True).tolist()
        pending = [f for f in order if f not in visited][:min(update_interval * batch_size, budget - len(visited))]
        visited += pending
        computed += pending
        del position
    return sorted(visited)


def test_feature_selection_is_circuit_tracers(tiny_model_dirs, one_torch_thread):
    loaded, frozen = frozen_for(tiny_model_dirs["gpt2"], "float64")
    targets, weights = ag.salient_logit_targets(frozen, 8, max_logits=5)
    full = ag.build_graph(frozen, targets, weights, ALL)
    table = full.table
    dense = torch.stack([dense_row(full, node, missing_ok=True) for node in range(table.n_nodes)])
    assert float(dense[table.error_start:table.target_start].abs().sum()) == 0.0  # no rows for errors, inputs
    params = ag.GraphParams(max_feature_nodes=40, batch_size=8, rank_every=16, drop_mass=0.0)
    partial = ag.build_graph(frozen, targets, weights, params)
    expected = circuit_tracer_selection(dense, [table.target_node(k) for k in range(len(targets))], weights,
                                        table.n_features, 40, 8, 2)
    got = [full_index(full.table, partial.table, i) for i in range(partial.table.n_features)]
    assert got == expected and len(got) == 40
    # features without rows lose their columns; their edges are the budget's dropped mass
    assert partial.stats["dropped_budget_share"] > 0 and partial.stats["dropped_small_share"] == 0


def full_index(full: ag.NodeTable, partial: ag.NodeTable, i: int) -> int:
    key = (partial.feature_layer[i], partial.feature_position[i], partial.feature_index[i])
    match = (full.feature_layer == key[0]) & (full.feature_position == key[1]) & (full.feature_index == key[2])
    return int(torch.nonzero(match)[0])


# ----------------------------------------------------------------------------- sparse storage


def test_dropped_mass_is_bounded_and_accounted(tiny_model_dirs, one_torch_thread):
    loaded, frozen = frozen_for(tiny_model_dirs["llama"])
    targets, weights = ag.salient_logit_targets(frozen, 8, max_logits=3)
    exact = ag.build_graph(frozen, targets, weights, ALL)
    drop = ag.GraphParams(max_feature_nodes=10**9, batch_size=64, drop_mass=0.02)
    lossy = ag.build_graph(frozen, targets, weights, drop)
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


# ----------------------------------------------------------------------------- heads


def gated_value(frozen: FrozenForward, row: dict, inputs: torch.Tensor, gates: torch.Tensor, source: dict):
    """The row's value as a function of the source's amount (1 at its real value) in the frozen replacement
    model with head h of layer l scaled by gates[l, h]; every other node held at its value."""
    amount = torch.ones((), dtype=torch.float64, requires_grad=True)
    leaves = {"inputs": inputs.clone()}
    for index, layer in enumerate(frozen.layers):
        leaves["z", index], leaves["error", index] = layer.z.clone(), layer.error.clone()
    kind, layer, position = source["kind"], source["layer"], source["position"]
    key = ("z", layer) if kind == "feature" else ("error", layer) if kind == "error" else "inputs"
    mask = torch.zeros_like(leaves[key])
    mask[(position, source["index"]) if kind == "feature" else position] = 1
    leaves[key] = leaves[key] * (1 + (amount - 1) * mask)  # the source's entry times `amount`
    saved = [layer.pattern for layer in frozen.layers]
    try:
        for index, layer in enumerate(frozen.layers):
            layer.pattern = saved[index] * gates[index].reshape(-1, 1, 1)  # a head's whole output scales
        value = replacement_value(frozen, row, leaves)
    finally:
        for index, layer in enumerate(frozen.layers):
            layer.pattern = saved[index]
    (grad,) = torch.autograd.grad(value, amount)
    return float(grad)


def source_description(table: ag.NodeTable, node: int) -> dict:
    kind = table.kind(node)
    if kind == "feature":
        return {"kind": kind, "layer": int(table.feature_layer[node]), "position": int(table.feature_position[node]),
                "index": int(table.feature_index[node])}
    if kind == "error":
        layer, position = divmod(node - table.error_start, table.n_tokens)
        return {"kind": kind, "layer": layer, "position": position}
    return {"kind": kind, "layer": -1, "position": node - table.embed_start}


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_head_split_is_exact_and_matches_gated_autograd(tiny_model_dirs, arch, one_torch_thread):
    """residual + every head part == the edge; the part of head h of layer l == the edge with attention above l
    off and only head h of layer l on, minus the edge with attention from l up off (autograd, float64)."""
    loaded, frozen = frozen_for(tiny_model_dirs[arch], "float64")
    targets, weights = ag.salient_logit_targets(frozen, 8, max_logits=3)
    graph = ag.build_graph(frozen, targets, weights, ALL)
    sources, edge_targets, edge_weights = graph.kept_edges()
    split = ag.head_split(frozen, graph.table, targets, sources, edge_targets, share=0.05)
    total = split.residual + split.by_head.sum((1, 2))
    assert torch.allclose(total, edge_weights, atol=1e-10 * float(edge_weights.abs().max()), rtol=0)
    assert float(split.by_head.abs().sum()) > 0  # attention plays a part
    inputs = frozen.embed + (frozen.pos_embed if frozen.pos_embed is not None else 0)
    L, H = frozen.n_layers, frozen.layers[0].n_heads
    checked = 0
    for e in torch.argsort(split.by_head.abs().sum((1, 2)), descending=True)[:4].tolist():
        target, source = int(edge_targets[e]), int(sources[e])
        row, described = row_of(frozen, graph, targets, target), source_description(graph.table, source)
        off = torch.zeros(L, H, dtype=torch.float64)
        assert gated_value(frozen, row, inputs, off, described) == pytest.approx(float(split.residual[e]), abs=1e-10)
        for layer in range(L):
            below = torch.ones(L, H, dtype=torch.float64)
            below[layer:] = 0
            without = gated_value(frozen, row, inputs, below, described)
            for head in range(H):
                only = below.clone()
                only[layer, head] = 1
                part = gated_value(frozen, row, inputs, only, described) - without
                assert part == pytest.approx(float(split.by_head[e, layer, head]), abs=1e-9 * float(edge_weights.abs().max()))
                checked += 1
    assert checked == 4 * L * H
    # the parts listed per (layer, head, token) are the large ones, and they add up within their (layer, head)
    for e, parts in enumerate(split.parts):
        mass = float(split.residual[e].abs() + split.by_head[e].abs().sum())
        for (layer, head, token), part in parts.items():
            assert abs(part) >= 0.05 * mass and token <= int(graph.table.n_tokens)


@pytest.mark.parametrize("arch, target_kind, decoder_scale, branches, head_steps", [
    ("gpt2", "feature", 0.3, 30, 10),  # weak features, so that the beam keeps paths through heads
    ("llama", "logit", 1.0, 8, 0), ("neox", "logit", 1.0, 8, 0)])
def test_greedy_paths_are_paths_of_the_graph(tiny_model_dirs, arch, target_kind, decoder_scale, branches, head_steps,
                                             one_torch_thread):
    """tc circuit's greedy paths, step by step, carry the weights of the unpruned graph: a step to a node at the
    same token is the residual part of that graph edge, a step through head h of layer l reading token s is
    the edge's part for that first hop (where the upstream node writes right below layer l, so that hop is
    the path's only one); each step's contribution = the path's weight so far x that part."""
    from tccli.circuit.search import SearchParams, greedy_search

    loaded, frozen = frozen_for(tiny_model_dirs[arch], "float64", decoder_scale=decoder_scale)
    target = (feature_target(frozen, 1, 5, 8) if target_kind == "feature"
              else unembed_target(frozen, 40, None, 8))
    graph = ag.build_graph(frozen, [target], torch.ones(1, dtype=torch.float64), ALL)
    table = graph.table
    result = greedy_search(frozen, target, SearchParams(iters=3, branches=branches, both_signs=True))

    def node_of(key) -> int:
        if key.kind == "target":
            return table.target_node(0)
        if key.kind == "embed":
            return table.embed_node(key.position)
        match = ((table.feature_layer == key.layer) & (table.feature_index == key.index)
                 & (table.feature_position == key.position))
        return int(torch.nonzero(match)[0])

    steps = []  # (path, index of the upstream node, downstream node, upstream node, head or None)
    for path in result.paths:
        nodes, k = path.nodes, 1
        while k < len(nodes):
            down, key = nodes[k - 1], nodes[k]
            if key.kind in ("feature", "embed") and down.kind in ("target", "feature"):
                steps.append((path, k, down, key, None))
                k += 1
            elif key.kind == "head" and k + 1 < len(nodes) and nodes[k + 1].kind in ("feature", "embed"):
                up = nodes[k + 1]
                first = 0 if up.kind == "embed" else up.layer + 1  # the first attention layer that sees it
                if first != key.layer:
                    break  # earlier hops would be folded into this one: not one graph quantity
                steps.append((path, k + 1, down, up, key))
                k += 2
            else:
                break
    if frozen.pos_embed is not None:  # greedy splits token and position embeddings, the graph's input holds both
        steps = [step for step in steps if step[3].kind != "embed"]
    pairs = torch.tensor([[node_of(down), node_of(up)] for _, _, down, up, _ in steps])
    assert len(steps) >= 10 and sum(step[4] is not None for step in steps) >= head_steps
    split = ag.head_split(frozen, table, [target], pairs[:, 1], pairs[:, 0], share=0.0)
    for (path, k, down, up, head), e in zip(steps, range(len(steps))):
        weight_so_far = 1.0  # the product of the input-invariant factors up to ``down``
        for j in range(1, path.nodes.index(down) + 1):
            if path.nodes[j].kind == "feature":
                activation = float(frozen.layers[path.nodes[j].layer].z[path.nodes[j].position, path.nodes[j].index])
                weight_so_far = path.contributions[j] / activation
        if head is None:
            part = float(split.residual[e])
        else:
            part = split.parts[e].get((head.layer, head.index, head.position), 0.0)
        assert path.contributions[k] == pytest.approx(weight_so_far * part, rel=1e-8, abs=1e-12), (path.nodes[:k + 1])
