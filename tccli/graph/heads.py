"""The kept edges of an attribution graph split by the attention head of their first hop (docs/method.md
section 9; `tc graph --heads`). Pure math: a FrozenForward, the node table and edges in, a HeadSplit out.

Each source's write is carried up the frozen model (attention only, MLPs cut) and every layer's
per-head output is read at the target's token with the target's read vector; the residual part (same
token, no attention) and the per-(layer, head, token) parts sum to the edge exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tccli.graph.nodes import EMBED, ERROR, FEATURE, NodeTable
from tccli.graph.rows import feature_rows
from tccli.replacement.attribution import Rows
from tccli.replacement.frozen import FrozenForward
from tccli.replacement.targets import Target


@dataclass
class HeadSplit:
    """Kept edges split by the attention head of their first hop (seen from the edge's target).

    Frozen attention is a sum over heads and source tokens, so with F_l the image of the source's write
    at layer l's input (every path up to there: residual and any earlier hops), the edge is

        A[t, s] = residual + sum over l, h, q of A_l[h, t's token, q] / s_l[q] (F_l[q] . P W_V[h] W_O[h] R_l(u_t))

    where ``residual`` = u_t . w_s on the same token (no attention at all), R_l the adjoint of Gemma-2's
    frozen post-attention norm at t's token (the identity elsewhere), w_s the source's write as it enters the
    residual, and the (l, h, q) term is every path whose last attention hop before the target is head h of
    layer l reading token q."""

    sources: torch.Tensor  # [E] node indices
    targets: torch.Tensor  # [E]
    residual: torch.Tensor  # [E]
    by_head: torch.Tensor  # [E, L, H] summed over the hop's source token
    parts: list[dict]  # per edge: {(layer, head, token): part} for the parts of at least ``share`` of its mass
    share: float


def read_rows(frozen: FrozenForward, table: NodeTable, targets: list[Target], nodes: torch.Tensor) -> Rows:
    """How each node of ``nodes`` (features or targets) reads the residual, as a Rows."""
    is_target = nodes >= table.target_start
    rows = Rows(
        vectors=torch.empty(len(nodes), frozen.embed.shape[1], dtype=frozen.embed.dtype, device=frozen.embed.device),
        positions=torch.empty_like(nodes),
        n_attn=torch.empty_like(nodes),
        n_mlp=torch.empty_like(nodes),
    )
    if bool((~is_target).any()):
        spec = feature_rows(frozen, table, nodes[~is_target])
        for name in ("vectors", "positions", "n_attn", "n_mlp"):
            getattr(rows, name)[~is_target] = getattr(spec.rows, name)
    for i in torch.nonzero(is_target).reshape(-1).tolist():
        target = targets[int(nodes[i]) - table.target_start]
        rows.vectors[i], rows.positions[i] = target.vector, target.position
        rows.n_attn[i], rows.n_mlp[i] = target.read_point[0], target.read_point[1]
    return rows


@dataclass
class Writes:
    """What source nodes write into the residual: one entry per (node, MLP output it writes to); a
    cross-layer transcoder's feature has one per layer it writes to (docs/method.md section 11), every other
    node one."""

    vectors: torch.Tensor  # [W, d] as it enters the residual
    positions: torch.Tensor  # [W] token
    first: torch.Tensor  # [W] first attention layer that sees it (written after MLP first - 1)
    owner: torch.Tensor  # [W] index into the nodes given


def node_writes(frozen: FrozenForward, table: NodeTable, nodes: torch.Tensor) -> Writes:
    """The writes of features, errors and inputs, each as it enters the residual."""
    dtype, device = frozen.embed.dtype, frozen.embed.device
    vectors, positions, first, owner = [], [], [], []
    inputs = frozen.embed + (frozen.pos_embed if frozen.pos_embed is not None else 0)
    for i, node in enumerate(nodes.tolist()):
        kind = table.kind(node)
        if kind == FEATURE:
            layer, position = int(table.feature_layer[node]), int(table.feature_position[node])
            frozen_layer = frozen.layers[layer]
            slot = torch.searchsorted(frozen_layer.active, table.feature_index[node])
            at = torch.tensor([position], device=device)
            for target, block in frozen_layer.decoder_blocks.items():
                # as it enters the residual, as the edges have it (centred for LayerNorm; Gemma-2's post-norm)
                written = frozen.write_mlp_output(target, block[slot].to(dtype).unsqueeze(0), at)
                vectors.append(table.feature_activation[node] * written[0])
                positions.append(position), first.append(target + 1), owner.append(i)
            continue
        if kind == ERROR:
            layer, position = divmod(node - table.error_start, table.n_tokens)
            vectors.append(frozen.layers[layer].error[position])
        elif kind == EMBED:
            layer, position = -1, node - table.embed_start
            vectors.append(inputs[position])
        else:
            raise ValueError(f"node {node} is a target: it writes nothing")
        positions.append(position), first.append(layer + 1), owner.append(i)  # after MLP `layer`
    if not vectors:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return Writes(torch.zeros(0, frozen.embed.shape[1], dtype=dtype, device=device), empty, empty, empty)
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return Writes(torch.stack(vectors), as_long(positions), as_long(first), as_long(owner))


@torch.no_grad()
def head_split(
    frozen: FrozenForward,
    table: NodeTable,
    targets: list[Target],
    sources: torch.Tensor,
    edge_targets: torch.Tensor,
    share: float = 0.25,
    batch_size: int = 64,
) -> HeadSplit:
    """Split the edges (sources[e] -> edge_targets[e]) by the head of their first attention hop, by carrying
    each source's write up the frozen model (attention only, MLPs cut) and reading every layer's per-head
    output at the target's token with the target's read vector. ``parts`` lists, per edge, the (layer,
    head, token) parts of at least ``share`` of the edge's absolute mass (|residual| + sum |parts|)."""
    device, dtype = frozen.embed.device, frozen.embed.dtype
    E, L, T = len(sources), frozen.n_layers, frozen.n_tokens
    H = frozen.layers[0].n_heads
    unique_targets, target_of_edge = torch.unique(edge_targets, return_inverse=True)
    reads = read_rows(frozen, table, targets, unique_targets)
    unique_sources, source_of_edge = torch.unique(sources, return_inverse=True)
    writes = node_writes(frozen, table, unique_sources)
    # the residual part: the source's writes at the target's token from MLP outputs the target reads after
    residual = torch.zeros(E, dtype=dtype, device=device)
    source_position = torch.zeros(len(unique_sources), dtype=torch.long, device=device)
    source_position[writes.owner] = writes.positions
    same_token = source_position[source_of_edge] == reads.positions[target_of_edge]
    for first in writes.first.unique().tolist():  # one write per source at most enters at each layer
        entries = writes.first == first
        at_first = torch.zeros(len(unique_sources), writes.vectors.shape[1], dtype=dtype, device=device)
        at_first[writes.owner[entries]] = writes.vectors[entries]
        seen = same_token & (reads.n_mlp[target_of_edge] >= first)
        dots = (at_first[source_of_edge] * reads.vectors[target_of_edge]).sum(-1)
        residual += torch.where(seen, dots, torch.zeros_like(dots))
    first_layer = torch.full((len(unique_sources),), L, dtype=torch.long, device=device)
    first_layer.scatter_reduce_(0, writes.owner, writes.first, reduce="amin")
    by_head = torch.zeros(E, L, H, dtype=dtype, device=device)
    mass = residual.abs().clone()
    # at most 1/share parts of one layer can each hold `share` of the edge's mass: keep that many per layer
    keep = min(H * T, int(1.0 / share) + 1) if share > 0 else H * T
    candidates: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []
    for start in range(0, len(unique_sources), batch_size):
        stop = min(start + batch_size, len(unique_sources))
        edges = torch.nonzero((source_of_edge >= start) & (source_of_edge < stop)).reshape(-1)
        if edges.numel() == 0:
            continue
        batch = torch.arange(start, stop, device=device)
        image = torch.zeros(len(batch), T, writes.vectors.shape[1], dtype=dtype, device=device)
        in_batch = (writes.owner >= start) & (writes.owner < stop)
        for layer in range(L):
            enters = torch.nonzero(in_batch & (writes.first == layer)).reshape(-1)
            image.index_put_(
                (writes.owner[enters] - start, writes.positions[enters]), writes.vectors[enters], accumulate=True
            )
            W_O, mix, W_V = frozen._attention_backward_weights(layer)
            live = edges[(first_layer[source_of_edge[edges]] <= layer) & (reads.n_attn[target_of_edge[edges]] > layer)]
            for chunk in live.split(256) if live.numel() else ():
                t = target_of_edge[chunk]
                # P W_V[h] W_O[h] R(u_t) per head, R the adjoint of Gemma-2's frozen post-attention norm at
                # the target's token: through W_O^T, then through W_V (centred for LayerNorm)
                read = frozen.read_attn_output(layer, reads.vectors[t], reads.positions[t])
                through_o = (read @ W_O.T).reshape(len(chunk), H, -1)  # [e, H, dh]
                ov = torch.einsum("ehk,dhk->ehd", through_o, W_V.reshape(W_V.shape[0], H, -1))
                coefficient = mix[:, :, reads.positions[t]].permute(2, 0, 1)  # [e, H, q] = A[h, t, q] / s[q]
                parts = torch.einsum("eqd,ehd->ehq", image[source_of_edge[chunk] - start], ov) * coefficient
                by_head[chunk, layer] = parts.sum(-1)
                flat = parts.reshape(len(chunk), H * T)
                mass[chunk] += flat.abs().sum(-1)
                top = flat.abs().topk(keep, dim=-1).indices
                candidates.append((chunk, layer, top, flat.gather(1, top)))
            if layer + 1 < L and bool((first_layer[batch] <= layer).any()):
                image += frozen.attention_forward(layer, image)
    parts_list: list[dict] = [{} for _ in range(E)]
    for chunk, layer, top, values in candidates:
        big = values.abs() >= share * mass[chunk].unsqueeze(1)
        for row, column in torch.nonzero(big).tolist():
            head, token = divmod(int(top[row, column]), T)
            parts_list[int(chunk[row])][(layer, head, token)] = float(values[row, column])
    return HeadSplit(
        sources=sources, targets=edge_targets, residual=residual, by_head=by_head, parts=parts_list, share=share
    )
