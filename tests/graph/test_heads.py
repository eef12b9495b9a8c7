"""Head split of attribution graphs: exact, each head's part against autograd with the other heads gated
off, and tc circuit's greedy paths reproduced step by step from the unpruned graph's edges and head parts."""

from __future__ import annotations

import pytest
import torch
from graph_helpers import ALL, PROMPT_IDS, frozen_for, replacement_value, row_of

from circuit_helpers import loaded_model, random_transcoders
from tccli.graph.attribution_graph import build_attribution_graph
from tccli.graph.heads import head_split
from tccli.graph.nodes import NodeTable
from tccli.replacement.frozen import FrozenForward
from tccli.replacement.prompts import freeze_prompt
from tccli.replacement.targets import feature_target, salient_logit_targets, unembed_target


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


def source_description(table: NodeTable, node: int) -> dict:
    kind = table.kind(node)
    if kind == "feature":
        return {
            "kind": kind,
            "layer": int(table.feature_layer[node]),
            "position": int(table.feature_position[node]),
            "index": int(table.feature_index[node]),
        }
    if kind == "error":
        layer, position = divmod(node - table.error_start, table.n_tokens)
        return {"kind": kind, "layer": layer, "position": position}
    return {"kind": kind, "layer": -1, "position": node - table.embed_start}


@pytest.mark.parametrize(
    "arch, spaces",
    [
        ("gpt2", ("resid_mid", "mlp_out")),
        ("neox", ("resid_mid", "mlp_output")),
        ("gemma2", ("resid_mid", "mlp_output")),
    ],
)
def test_head_split_is_exact_in_other_spaces(all_model_dirs, arch, spaces, one_torch_thread):
    """residual + every head part == the edge when features write as they enter the residual
    (write_mlp_output: centred for LayerNorm, through Gemma-2's frozen post-MLP norm) and read resid_mid
    with encoder vectors that are not centred, and (Gemma-2) heads write through the post-attention norm."""
    loaded = loaded_model(all_model_dirs[arch], "float64")
    transcoders = random_transcoders(
        loaded.info, 48, 0, torch.float64, bias_shift=-0.1, input_space=spaces[0], output_space=spaces[1]
    )
    with torch.no_grad():
        for transcoder in transcoders.values():
            transcoder.W_dec.add_(0.5)  # decoder rows far from centred
    frozen = freeze_prompt(loaded, transcoders, torch.tensor(PROMPT_IDS))
    targets, weights = salient_logit_targets(frozen, 8, max_logits=3)
    graph = build_attribution_graph(frozen, targets, weights, ALL)
    sources, edge_targets, edge_weights = graph.kept_edges()
    split = head_split(frozen, graph.table, targets, sources, edge_targets, share=0.05)
    total = split.residual + split.by_head.sum((1, 2))
    assert torch.allclose(total, edge_weights, atol=1e-10 * float(edge_weights.abs().max()), rtol=0)


@pytest.mark.parametrize("clt", [False, True], ids=["per-layer", "cross-layer"])
@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_head_split_is_exact_and_matches_gated_autograd(tiny_model_dirs, arch, clt, one_torch_thread):
    """residual + every head part == the edge; the part of head h of layer l == the edge with attention above l
    off and only head h of layer l on, minus the edge with attention from l up off (autograd, float64). A
    cross-layer transcoder's feature enters the residual after every MLP it writes to: each of those writes is
    carried up, and only those the target reads after count in the residual part."""
    loaded, frozen = frozen_for(tiny_model_dirs[arch], "float64", clt=clt)
    targets, weights = salient_logit_targets(frozen, 8, max_logits=3)
    graph = build_attribution_graph(frozen, targets, weights, ALL)
    sources, edge_targets, edge_weights = graph.kept_edges()
    split = head_split(frozen, graph.table, targets, sources, edge_targets, share=0.05)
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
                assert part == pytest.approx(
                    float(split.by_head[e, layer, head]), abs=1e-9 * float(edge_weights.abs().max())
                )
                checked += 1
    assert checked == 4 * L * H
    # the parts listed per (layer, head, token) are the large ones, and they add up within their (layer, head)
    for e, parts in enumerate(split.parts):
        mass = float(split.residual[e].abs() + split.by_head[e].abs().sum())
        for (_layer, _head, token), part in parts.items():
            assert abs(part) >= 0.05 * mass and token <= int(graph.table.n_tokens)


@pytest.mark.parametrize(
    "arch, target_kind, decoder_scale, branches, head_steps",
    [
        ("gpt2", "feature", 0.3, 30, 10),  # weak features, so that the beam keeps paths through heads
        ("llama", "logit", 1.0, 8, 0),
        ("neox", "logit", 1.0, 8, 0),
    ],
)
def test_greedy_paths_are_paths_of_the_graph(
    tiny_model_dirs, arch, target_kind, decoder_scale, branches, head_steps, one_torch_thread
):
    """tc circuit's greedy paths, step by step, carry the weights of the unpruned graph: a step to a node at the
    same token is the residual part of that graph edge, a step through head h of layer l reading token s is
    the edge's part for that first hop (where the upstream node writes right below layer l, so that hop is
    the path's only one); each step's contribution = the path's weight so far x that part."""
    from tccli.circuit.search import SearchParams, greedy_search

    loaded, frozen = frozen_for(tiny_model_dirs[arch], "float64", decoder_scale=decoder_scale)
    target = feature_target(frozen, 1, 5, 8) if target_kind == "feature" else unembed_target(frozen, 40, None, 8)
    graph = build_attribution_graph(frozen, [target], torch.ones(1, dtype=torch.float64), ALL)
    table = graph.table
    result = greedy_search(frozen, target, SearchParams(iters=3, branches=branches, both_signs=True))

    def node_of(key) -> int:
        if key.kind == "target":
            return table.target_node(0)
        if key.kind == "embed":
            return table.embed_node(key.position)
        match = (
            (table.feature_layer == key.layer)
            & (table.feature_index == key.index)
            & (table.feature_position == key.position)
        )
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
    split = head_split(frozen, table, [target], pairs[:, 1], pairs[:, 0], share=0.0)
    for (path, k, down, _up, head), e in zip(steps, range(len(steps))):
        weight_so_far = 1.0  # the product of the input-invariant factors up to ``down``
        for j in range(1, path.nodes.index(down) + 1):
            if path.nodes[j].kind == "feature":
                activation = float(frozen.layers[path.nodes[j].layer].z[path.nodes[j].position, path.nodes[j].index])
                weight_so_far = path.contributions[j] / activation
        if head is None:
            part = float(split.residual[e])
        else:
            part = split.parts[e].get((head.layer, head.index, head.position), 0.0)
        assert path.contributions[k] == pytest.approx(weight_so_far * part, rel=1e-8, abs=1e-12), path.nodes[: k + 1]
