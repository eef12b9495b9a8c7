"""Rows of an attribution graph's adjacency, computed by batched linear backward passes (docs/method.md
section 9). Pure math: a FrozenForward and a node table in, rows (dense, then sparse) out.

**Edges.** ``A[t, s]`` is the direct effect of node s on node t in the local replacement model:
patterns, norm scales and every node's value frozen; effects pass through the residual stream and the
frozen attention of the layers between (any number of hops, every head), never through another
node. A row of A is one linear backward pass: the target's read vector is injected at its token and
read point, carried down the residual stream (the MLPs are cut; attention moves it to earlier tokens)
and dotted, at every layer's MLP output, with each node's write there (a feature's ``z * f_dec``, an
error term; a cross-layer transcoder's feature writes at its own and every later MLP output, and its
edge is the sum of those dot products: docs/method.md section 11) and, at the bottom, with the input.
Everything else that reaches the target is a constant
(encoder constant, attention ``b_O`` and value biases, transcoder ``b_dec``, ``b_U``): a row's
**bias**, so that ``sum(row) + bias == the target's value`` (its pre-activation, or logit) to rounding.

Here: what each row reads (``RowsToCompute``, for targets and features), what each node writes
(``NodeWrites``), one batched backward pass over many rows (``dense_rows``), and its rows stored
sparse (``compute_rows``, through ``adjacency.sparsify``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from tccli.graph.adjacency import SparseRows, sparsify
from tccli.graph.nodes import NodeTable
from tccli.replacement.attribution import Rows
from tccli.replacement.frozen import FrozenForward
from tccli.replacement.targets import Target

# ----------------------------------------------------------------------------- rows to compute


@dataclass
class RowsToCompute:
    """Rows to compute: what each is read with, where, and its real value and constant part."""

    rows: Rows
    constant: torch.Tensor  # [R] the part of the value no node writes (encoder constant, b_U)
    value: torch.Tensor  # [R] the real value (pre-activation, logit), from the forward pass
    nodes: torch.Tensor  # [R] int64 node index of each row

    def __len__(self) -> int:
        return len(self.rows)


def target_rows(targets: list[Target], table: NodeTable) -> RowsToCompute:
    device = targets[0].vector.device
    rows = Rows(
        vectors=torch.stack([t.vector for t in targets]),
        positions=torch.tensor([t.position for t in targets], device=device),
        n_attn=torch.tensor([t.read_point[0] for t in targets], device=device),
        n_mlp=torch.tensor([t.read_point[1] for t in targets], device=device),
    )
    dtype = rows.vectors.dtype
    return RowsToCompute(
        rows=rows,
        constant=torch.tensor([t.constant for t in targets], dtype=dtype, device=device),
        value=torch.tensor([t.value for t in targets], dtype=dtype, device=device),
        nodes=torch.arange(len(targets), device=device) + table.target_start,
    )


def feature_rows(frozen: FrozenForward, table: NodeTable, features: torch.Tensor) -> RowsToCompute:
    """Rows for the features ``features`` (indices into the table): each read with its encoder vector
    through its MLP's frozen norm scale; value = its pre-activation."""
    device, dtype = frozen.embed.device, frozen.embed.dtype
    layers = table.feature_layer[features]
    positions = table.feature_position[features]
    indices = table.feature_index[features]
    vectors = torch.empty(len(features), frozen.embed.shape[1], dtype=dtype, device=device)
    constant = torch.empty(len(features), dtype=dtype, device=device)
    value = torch.empty(len(features), dtype=dtype, device=device)
    n_attn = torch.empty_like(layers)
    for layer in layers.unique().tolist():
        mask = layers == layer
        frozen_layer = frozen.layers[layer]
        transcoder = frozen_layer.transcoder
        f, p = indices[mask], positions[mask]
        encoder = transcoder.W_enc[:, f].T.to(dtype)
        # through the transcoder's input space (FrozenForward.read_mlp_input): the norm's
        # frozen scale, its weight and bias for mlp_input, only the centring (LayerNorm) for resid_mid
        vectors[mask], norm_bias = frozen.read_mlp_input(layer, encoder, p)
        constant[mask] = (transcoder.b_enc[f] - transcoder.b_pre @ transcoder.W_enc[:, f]).to(dtype) + norm_bias
        value[mask] = frozen_layer.pre[p, f].to(dtype)
        n_attn[mask] = frozen.mlp_read_point(layer)[0]
    rows = Rows(vectors=vectors, positions=positions, n_attn=n_attn, n_mlp=layers.clone())
    return RowsToCompute(rows=rows, constant=constant, value=value, nodes=features.to(device))


# ----------------------------------------------------------------------------- the linear backward


@dataclass
class CrossWrites:
    """The writes of earlier layers' features into one layer's MLP output (a cross-layer transcoder), per token
    in slots: each earlier layer's features at that token side by side."""

    writes: torch.Tensor  # [T, K, d]
    source: torch.Tensor  # [K] the layer of each slot
    local: torch.Tensor  # [T, K] the feature's index among its layer's features (table order), -1: empty slot

    @classmethod
    def join(cls, parts: list[tuple[int, torch.Tensor, torch.Tensor]]) -> CrossWrites:
        """From (source layer, [T, k, d] writes, [T, k] local indices) of each earlier layer."""
        source = torch.cat(
            [torch.full((local.shape[1],), s, dtype=torch.long, device=local.device) for s, _, local in parts]
        )
        return cls(
            writes=torch.cat([writes for _, writes, _ in parts], dim=1),
            source=source,
            local=torch.cat([local for _, _, local in parts], dim=1),
        )


class NodeWrites:
    """What every node writes into the residual stream, arranged for the batched backward pass.

    Per layer and token: the error term in slot 0, then the active features' writes ``z * f_dec`` in
    feature order ([T, 1 + k_max, d]), so one batched matmul per layer dots every row's gradient with
    every write of that layer. Writes are as they enter the residual stream (``write_mlp_output``: the
    transcoder's output space, Gemma-2's frozen post-norm), and so is ``b_dec`` (``bias_writes``).

    A cross-layer transcoder's feature of layer l also writes ``z * f_dec^(l -> l')`` into every later MLP
    output l' (docs/method.md section 11): per layer l', the writes of every earlier layer's features there
    are kept in one such layout without the error slot (``CrossWrites``: each earlier layer's slots side by
    side), so one more batched matmul per layer gives them all, and they add to the features' columns."""

    def __init__(self, frozen: FrozenForward, table: NodeTable):
        self.frozen, self.table = frozen, table
        T, dtype = frozen.n_tokens, frozen.embed.dtype
        device = frozen.embed.device
        self.inputs = frozen.embed + (frozen.pos_embed if frozen.pos_embed is not None else 0)
        self.layer_start: list[int] = []  # first feature (table index) of each layer
        self.per_token: list[torch.Tensor] = []  # [T+1] cumulative feature count per token
        self.padded: list[torch.Tensor] = []  # [T, 1 + k_max, d]
        self.slot_valid: list[torch.Tensor] = []  # [T, 1 + k_max] bool, feature slots only
        self.bias_writes: list[Optional[torch.Tensor]] = []  # [T, d] b_dec as written, None without a transcoder
        self.cross: list[Optional[CrossWrites]] = []  # per layer: earlier layers' writes into it (a CLT)
        start, placement = 0, []
        for layer in range(frozen.n_layers):
            count = int((table.feature_layer == layer).sum())
            positions = table.feature_position[start : start + count]
            counts = torch.bincount(positions, minlength=T)
            cumulative = torch.zeros(T + 1, dtype=torch.long, device=device)
            cumulative[1:] = counts.cumsum(0)
            slots = torch.arange(count, device=device) - cumulative[positions]
            indices = table.feature_index[start : start + count]
            in_active = torch.searchsorted(frozen.layers[layer].active, indices) if count else indices
            activations = table.feature_activation[start : start + count].unsqueeze(1)
            placement.append((positions, slots, in_active, activations, int(counts.max()) if count else 0))
            self.layer_start.append(start)
            self.per_token.append(cumulative)
            start += count
        for layer in range(frozen.n_layers):
            k_max = placement[layer][4]
            padded = torch.zeros(T, 1 + k_max, frozen.embed.shape[1], dtype=dtype, device=device)
            padded[:, 0] = frozen.layers[layer].error
            valid = torch.zeros(T, 1 + k_max, dtype=torch.bool, device=device)
            parts = []  # earlier layers' (source, [T, k_source, d] writes, valid, local index of each slot)
            for source, block in frozen.writes_into(layer):
                positions, slots, in_active, activations, k_source = placement[source]
                if not positions.numel():
                    continue
                written = frozen.write_mlp_output(layer, block[in_active], positions) * activations
                if source == layer:
                    padded[positions, slots + 1] = written
                    valid[positions, slots + 1] = True
                else:
                    cross = torch.zeros(T, k_source, written.shape[1], dtype=dtype, device=device)
                    local = torch.full((T, k_source), -1, dtype=torch.long, device=device)
                    cross[positions, slots] = written
                    local[positions, slots] = torch.arange(positions.shape[0], device=device)
                    parts.append((source, cross, local))
            self.cross.append(CrossWrites.join(parts) if parts else None)
            transcoder = frozen.layers[layer].transcoder
            self.bias_writes.append(
                None
                if transcoder is None
                else frozen.write_mlp_output(
                    layer, transcoder.b_dec.to(dtype).expand(T, -1), torch.arange(T, device=device)
                )
            )
            self.padded.append(padded)
            self.slot_valid.append(valid)

    def feature_columns(self, layer: int, n_tokens: int) -> int:
        """How many of ``layer``'s features sit at the first ``n_tokens`` tokens."""
        return int(self.per_token[layer][n_tokens])

    def layer_edges(self, layer: int, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``grad`` [R, P, d] at ``layer``'s MLP output dotted with every write of that layer at the first
        P tokens: (features [R, n] in table order, errors [R, P])."""
        P = grad.shape[1]
        per_token = torch.bmm(grad.transpose(0, 1), self.padded[layer][:P].transpose(1, 2))  # [P, R, 1+k]
        per_token = per_token.transpose(0, 1)  # [R, P, 1+k]
        return per_token[:, self.slot_valid[layer][:P]], per_token[:, :, 0]

    def cross_layer_edges(
        self, layer: int, grad: torch.Tensor, feature_offset: torch.Tensor
    ) -> Optional[tuple[torch.Tensor, torch.Tensor, int]]:
        """``grad`` [R, P, d] at ``layer``'s MLP output dotted with the writes there of earlier layers' features
        (a cross-layer transcoder) at the first P tokens: (their columns among ``dense_rows``'s, given each
        layer's first column ``feature_offset`` [L], the dot products [R, n], the multiply-adds x 2), or None."""
        cross = self.cross[layer]
        if cross is None:
            return None
        P = grad.shape[1]
        per_token = torch.bmm(grad.transpose(0, 1), cross.writes[:P].transpose(1, 2)).transpose(0, 1)  # [R, P, K]
        valid = cross.local[:P] >= 0
        columns = feature_offset[cross.source.expand(P, -1)[valid]] + cross.local[:P][valid]
        return columns, per_token[:, valid], 2 * grad.shape[0] * P * grad.shape[2] * cross.writes.shape[1]

    def input_edges(self, grad: torch.Tensor) -> torch.Tensor:
        P = grad.shape[1]
        return torch.bmm(grad.transpose(0, 1), self.inputs[:P].unsqueeze(2))[:, :, 0].T

    def batch_columns(self, n_tokens: int) -> torch.Tensor:
        """Node indices of the columns ``dense_rows`` fills for rows at tokens < n_tokens: each layer's
        features there, then errors (layer by layer), then inputs."""
        device = self.inputs.device
        parts = [
            torch.arange(
                self.layer_start[layer], self.layer_start[layer] + self.feature_columns(layer, n_tokens), device=device
            )
            for layer in range(self.frozen.n_layers)
        ]
        T = self.table.n_tokens
        for layer in range(self.frozen.n_layers):
            parts.append(self.table.error_start + layer * T + torch.arange(n_tokens, device=device))
        parts.append(self.table.embed_start + torch.arange(n_tokens, device=device))
        return torch.cat(parts)


def _level(n_attn: torch.Tensor, n_mlp: torch.Tensor) -> torch.Tensor:
    """Order of read points from the top of the residual stream down: resid_pre(l) -> 2l,
    resid_mid(l) (attention l included, MLP l not) -> 2l + 1."""
    return 2 * n_mlp + (n_attn - n_mlp)


@dataclass
class DenseBatch:
    """One backward pass's rows, in the order they were carried (sorted by read point)."""

    rows: torch.Tensor  # [R, C] over NodeWrites.batch_columns(P)
    bias: torch.Tensor  # [R]
    order: torch.Tensor  # [R] row i here is row order[i] of the RowsToCompute
    n_tokens: int  # P
    flop: int  # multiply-adds x 2 of the pass's matmuls


def dense_rows(writes: NodeWrites, spec: RowsToCompute) -> DenseBatch:
    """One batched linear backward pass over the rows of ``spec``.

    Rows are carried sorted by read point from the top down: a row joins the pass where it reads, so at
    each layer only the rows reading above it (a prefix) are carried, and only the first P tokens."""
    frozen = writes.frozen
    rows = spec.rows
    R, d = rows.vectors.shape
    P = int(rows.positions.max()) + 1
    level = _level(rows.n_attn, rows.n_mlp)
    order = torch.argsort(level, descending=True, stable=True)
    sorted_level = level[order]
    columns = writes.batch_columns(P)
    out = torch.zeros(R, columns.shape[0], dtype=rows.vectors.dtype, device=rows.vectors.device)
    bias = spec.constant[order].clone()
    grad = torch.zeros(R, P, d, dtype=rows.vectors.dtype, device=rows.vectors.device)
    n_active, flop = 0, 0

    def inject(at_level: int) -> int:
        end = n_active + int((sorted_level == at_level).sum())
        if end > n_active:
            index = order[n_active:end]
            grad.index_put_(
                (torch.arange(n_active, end, device=grad.device), rows.positions[index]),
                rows.vectors[index],
                accumulate=True,
            )
        return end

    feature_offset = [0]
    for layer in range(frozen.n_layers):
        feature_offset.append(feature_offset[-1] + writes.feature_columns(layer, P))
    error_offset = feature_offset[-1]
    offsets = torch.tensor(feature_offset[:-1], dtype=torch.long, device=out.device)
    L = frozen.n_layers
    n_active = inject(2 * L)
    for layer in reversed(range(L)):
        a = n_active
        skip = None  # a skip transcoder's linear path: the gradient it carries to the MLP's input
        if a:
            g = grad[:a]
            features, errors = writes.layer_edges(layer, g)
            # += : a cross-layer transcoder's features already hold their edges through later MLP outputs
            out[:a, feature_offset[layer] : feature_offset[layer + 1]] += features
            cross = writes.cross_layer_edges(layer, g, offsets)
            if cross is not None:
                columns, values, cross_flop = cross
                out[:a].index_add_(1, columns, values)
                flop += cross_flop
            out[:a, error_offset + layer * P : error_offset + (layer + 1) * P] = errors
            flop += 2 * a * P * d * writes.padded[layer].shape[1]
            if writes.bias_writes[layer] is not None:
                bias[:a] += (g * writes.bias_writes[layer][:P]).sum((1, 2))
            if frozen.layers[layer].skip_out is not None:
                skip, skip_constant = frozen.skip_backward(layer, g)
                bias[:a] += skip_constant
        if not frozen.parallel:
            if skip is not None:  # the MLP reads resid_mid: before rows reading there join
                grad[: skip.shape[0]] += skip
            n_active = a = inject(2 * layer + 1)
        if a:
            g = grad[:a]
            bias[:a] += frozen.attention_bias(layer, g)
            g += frozen.attention_backward(layer, g)
            flop += 4 * a * P * d * d + 2 * a * P * P * d
        if frozen.parallel and skip is not None:  # the MLP reads resid_pre, beside attention
            grad[: skip.shape[0]] += skip
        n_active = inject(2 * layer)
    if n_active:
        out[:n_active, error_offset + L * P :] = writes.input_edges(grad[:n_active])
        flop += 2 * n_active * P * d
    if n_active != R:
        raise ValueError(f"{R - n_active} rows read from no point of the residual stream")
    return DenseBatch(rows=out, bias=bias, order=order, n_tokens=P, flop=flop)


# ----------------------------------------------------------------------------- sparse rows


def compute_rows(writes: NodeWrites, spec: RowsToCompute, drop_mass: float, stats: Optional[dict] = None) -> SparseRows:
    """The rows of ``spec`` (in the order the backward pass carried them), stored sparsely."""
    batch = dense_rows(writes, spec)
    crow, col, value, dropped, dropped_abs, total = sparsify(
        batch.rows, writes.batch_columns(batch.n_tokens), drop_mass
    )
    if stats is not None:
        stats["backward_flop"] = stats.get("backward_flop", 0) + batch.flop
    return SparseRows(
        nodes=spec.nodes[batch.order],
        crow=crow,
        col=col,
        value=value,
        bias=batch.bias,
        target_value=spec.value[batch.order],
        dropped=dropped,
        dropped_abs=dropped_abs,
        total_abs=total,
    )
