"""Rows of attribution graphs: every row's identity (incoming edges + bias == value) for every target kind,
transcoder kind, input and output space and architecture, and every edge against autograd on an
independently written replacement model (graph_helpers.replacement_value)."""

from __future__ import annotations

import pytest
import torch
from graph_helpers import ALL, PROMPT_IDS, cross_layer, dense_row, frozen_for, replacement_value, row_of

from circuit_helpers import loaded_model, random_transcoders
from conftest import build_tiny_model
from tccli.graph.attribution_graph import AttributionGraph, GraphParams, build_attribution_graph
from tccli.replacement.frozen import FrozenForward
from tccli.replacement.prompts import freeze_prompt
from tccli.replacement.targets import Target, direction_target, feature_target, salient_logit_targets, unembed_target


def every_target(frozen: FrozenForward, d_model: int) -> list[tuple[list[Target], torch.Tensor]]:
    """(targets, weights) for each kind of target tc graph takes."""
    last = frozen.n_layers - 1
    direction = torch.randn(d_model, generator=torch.Generator().manual_seed(1), dtype=frozen.embed.dtype)
    one = torch.ones(1, dtype=frozen.embed.dtype)
    active = torch.nonzero(frozen.layers[last].z[8]).reshape(-1)
    return [
        salient_logit_targets(frozen, 8, max_logits=4, probability=0.95),
        ([feature_target(frozen, last, int(active[0]), 8)], one),
        ([unembed_target(frozen, 40, 20, 6)], one),
        ([direction_target(frozen, direction, last, 7)], one),
    ]


def dense_row_sums(graph: AttributionGraph):
    for chunk in graph.adjacency.chunks:
        yield chunk, chunk.row_sums(chunk.value), chunk.row_sums(chunk.value.abs())


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("clt", [False, True], ids=["per-layer", "cross-layer"])
@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_rows_plus_bias_equal_values(tiny_model_dirs, arch, clt, one_torch_thread):
    """Every feature row and every target: sum of incoming edges + bias terms == pre-activation or
    target value, to 1e-5 of the terms' magnitude in float32; nothing dropped with drop_mass 0. With a
    cross-layer transcoder too (docs/method.md section 11: its features write to every later MLP output)."""
    loaded, frozen = frozen_for(tiny_model_dirs[arch], clt=clt)
    if clt:  # the cross-layer writes are there to test
        assert all(len(frozen.writes_into(layer)) == layer + 1 for layer in range(frozen.n_layers))
    for targets, weights in every_target(frozen, loaded.info.d_model):
        graph = build_attribution_graph(frozen, targets, weights, ALL)
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
        pre = torch.stack(
            [
                frozen.layers[int(layer)].pre[int(position), int(index)]
                for layer, position, index in zip(
                    graph.table.feature_layer[features],
                    graph.table.feature_position[features],
                    graph.table.feature_index[features],
                )
            ]
        )
        assert torch.equal(graph.adjacency.cat("target_value")[feature_rows], pre)


@pytest.mark.parametrize("clt", [False, True], ids=["per-layer", "cross-layer"])
@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama", "gemma2", "qwen3", "gemma3"])
@pytest.mark.parametrize("spaces", [("mlp_input", "mlp_output"), ("resid_mid", "mlp_out")])
def test_identity_in_other_spaces_with_skip(all_model_dirs, arch, spaces, clt, one_torch_thread):
    """JumpReLU skip transcoders reading mlp_input or resid_mid and writing either output space, on all five
    architectures (Gemma-2's post-norms): every row's edges + bias == its value; the skip connection is a
    linear path between nodes (docs/method.md section 9), not an error. The same for a cross-layer
    transcoder, whose writes to later layers pass through those layers' output maps."""
    loaded = loaded_model(all_model_dirs[arch])
    transcoders = random_transcoders(
        loaded.info,
        48,
        0,
        bias_shift=-0.1,
        activation="jumprelu",
        skip=True,
        input_space=spaces[0],
        output_space=spaces[1],
    )
    frozen = freeze_prompt(loaded, cross_layer(transcoders) if clt else transcoders, torch.tensor(PROMPT_IDS))
    for targets, weights in every_target(frozen, loaded.info.d_model)[:3]:
        graph = build_attribution_graph(frozen, targets, weights, ALL)
        assert graph.table.n_features > 10
        for chunk, total, magnitude in dense_row_sums(graph):
            scale = magnitude + chunk.bias.abs()
            error = (total + chunk.bias - chunk.target_value).abs()
            assert bool((error <= 1e-5 * scale).all()), (arch, spaces, float((error / scale).max()))


@pytest.mark.parametrize(
    "kind, skip, clt",
    [
        ("topk", False, False),
        ("signed_topk", False, False),
        ("batchtopk", False, False),
        ("jumprelu", False, False),
        ("relu", True, False),
        ("topk", False, True),
        ("topk", True, True),
        ("jumprelu", False, True),
        ("jumprelu", True, True),
    ],
)
def test_identity_for_every_transcoder_kind(tiny_model_dirs, kind, skip, clt, one_torch_thread):
    loaded, frozen = frozen_for(tiny_model_dirs["llama"], kind=kind, skip=skip, clt=clt)
    targets, weights = salient_logit_targets(frozen, 8, max_logits=3)
    graph = build_attribution_graph(frozen, targets, weights, ALL)
    assert graph.table.n_features > 10
    if kind == "signed_topk":  # active features with negative activations are nodes like any other
        assert int((graph.table.feature_activation < 0).sum()) > 10
    for chunk, total, magnitude in dense_row_sums(graph):
        error = (total + chunk.bias - chunk.target_value).abs()
        assert bool((error <= 1e-5 * (magnitude + chunk.bias.abs())).all())


def test_stories260k_identity(stories_dir, one_torch_thread):
    loaded = loaded_model(stories_dir)
    transcoders = random_transcoders(loaded.info, 256, 3, bias_shift=-0.2)
    tokens = torch.tensor(
        [loaded.info.bos_token_id]
        + loaded.tokenizer.encode("Once upon a time there was a little girl named Lily", add_special_tokens=False)
    )
    frozen = freeze_prompt(loaded, transcoders, tokens)
    targets, weights = salient_logit_targets(frozen, frozen.n_tokens - 1)
    graph = build_attribution_graph(frozen, targets, weights, GraphParams(max_feature_nodes=300, drop_mass=0.0))
    for chunk in graph.adjacency.chunks:
        total = chunk.row_sums(chunk.value) + chunk.dropped + chunk.bias
        scale = chunk.row_sums(chunk.value.abs()) + chunk.dropped_abs + chunk.bias.abs()
        assert bool(((total - chunk.target_value).abs() <= 1e-5 * scale).all())
    assert 0.0 < graph.replacement < 1.0 and 0.0 < graph.completeness < 1.0


# ----------------------------------------------------------------------------- autograd


def rows_to_check(frozen: FrozenForward, graph: AttributionGraph, targets) -> list[dict]:
    """Each target row and a few feature rows."""
    table = graph.table
    nodes = [table.target_node(k) for k in range(len(targets))]
    nodes += list(range(0, table.n_features, max(1, table.n_features // 6)))
    return [row_of(frozen, graph, targets, node) for node in nodes]


@pytest.mark.parametrize(
    "arch, kind, skip, clt, layers",
    [
        ("gpt2", "relu", False, False, None),
        ("neox", "relu", False, False, None),
        ("llama", "relu", False, False, None),
        ("llama", "topk", False, False, None),
        ("gpt2", "jumprelu", True, False, None),
        ("gpt2", "relu", False, True, None),
        ("neox", "jumprelu", True, True, None),
        ("llama", "topk", False, True, None),
        ("llama", "jumprelu", True, True, None),
        ("gpt2", "relu", False, True, [0, 2, 3]),  # a CLT on 3 of 4 layers: layer 1's MLP is all error
        ("neox", "topk", False, True, [0, 2, 3]),
    ],
)
def test_edges_equal_autograd(tiny_model_dirs, arch, kind, skip, clt, layers, tmp_path, one_torch_thread):
    """Each edge == d(row's value)/d(source's amount) x amount on the frozen replacement model (the kind only
    decides which features are active; a skip term is a linear path from its MLP's input, not a node). A
    cross-layer transcoder's feature writes its decoder to every later MLP output in that model, so its edge
    is the sum over those layers (docs/method.md section 11)."""
    # a CLT on some layers only: a model of 4 layers (the tiny models have 2), its layers 0, 2 and 3 replaced
    path = build_tiny_model(arch, tmp_path / arch, n_layers=4) if layers else tiny_model_dirs[arch]
    loaded, frozen = frozen_for(path, "float64", kind=kind, skip=skip, clt=clt, layers=layers)
    if layers:  # layer 0's features write to layers 2 and 3, past the unreplaced layer 1
        assert [source for source, _ in frozen.writes_into(3)] == [3, 0, 2] and frozen.layers[1].z is None
    inputs = frozen.embed + (frozen.pos_embed if frozen.pos_embed is not None else 0)
    for targets, weights in every_target(frozen, loaded.info.d_model):
        graph = build_attribution_graph(frozen, targets, weights, ALL)
        table = graph.table
        for row in rows_to_check(frozen, graph, targets):
            leaves = {"inputs": inputs.clone().requires_grad_()}
            for index, layer in enumerate(frozen.layers):
                if layer.z is not None:
                    leaves["z", index] = layer.z.clone().requires_grad_()
                leaves["error", index] = layer.error.clone().requires_grad_()
            value = replacement_value(frozen, row, leaves)
            value.backward()
            expected = torch.zeros(table.n_nodes, dtype=torch.float64)
            for feature in range(table.n_features):
                layer, t, f = (
                    int(table.feature_layer[feature]),
                    int(table.feature_position[feature]),
                    int(table.feature_index[feature]),
                )
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
