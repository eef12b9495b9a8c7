"""Whole attribution graphs of the local replacement model (METHOD.md section 9). Pure math.

Tensors in (a FrozenForward, targets), node tables and sparse rows out; no model, no files.

**Nodes**, in circuit-tracer's order: every active transcoder feature (ordered by layer, token,
feature), one error node per (layer, token) (layer-major), one input node per token (its token
embedding plus, for learned positions, its position embedding: everything the residual stream starts
with), then the targets.

**Edges.** ``A[t, s]`` is the direct effect of node s on node t in the local replacement model:
patterns, norm scales and every node's value frozen; effects pass through the residual stream and the
frozen attention of the layers between (any number of hops, every head), never through another
node. A row of A is one linear backward pass: the target's read vector is injected at its token and
read point, carried down the residual stream (the MLPs are cut; attention moves it to earlier tokens)
and dotted, at every layer's MLP output, with each node's write there (a feature's ``z * f_dec``, an
error term) and, at the bottom, with the input. Everything else that reaches the target is a constant
(encoder constant, attention ``b_O`` and value biases, transcoder ``b_dec``, ``b_U``): a row's
**bias**, so that ``sum(row) + bias == the target's value`` (its pre-activation, or logit) to rounding.

**Which features get rows** (circuit-tracer's rule): the targets' rows first; then features ranked by
their influence on the targets estimated from the rows computed so far, computed most-influential-first
``rank_every`` rows at a time (circuit-tracer's 4 batches of 512) and re-ranked, up to
``max_feature_nodes``. Features left out keep no column in the final graph either (their edges count
as dropped mass).

**Sparse rows.** A row is stored as its nonzero entries (CSR: ``crow``, int32 ``col``, values), after
dropping its smallest entries while their absolute sum stays within ``drop_mass`` of the row's absolute
sum; the dropped entries' signed and absolute sums are kept per row, so nothing is lost silently and the
identity ``sum(row) + dropped + bias == value`` still holds exactly.

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

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from tccli.replacement.attribution import Rows
from tccli.replacement.frozen import FrozenForward
from tccli.replacement.targets import Target
from tccli.replacement.frozen import FrozenForward

# node kinds, in layout order
FEATURE, ERROR, EMBED, TARGET = "feature", "error", "embed", "target"


# ----------------------------------------------------------------------------- nodes


@dataclass
class NodeTable:
    """The graph's nodes: features, then errors (layer-major), then inputs (one per token), then targets."""

    n_layers: int
    n_tokens: int
    feature_layer: torch.Tensor  # [F] int64
    feature_position: torch.Tensor  # [F] int64
    feature_index: torch.Tensor  # [F] int64 (index within its transcoder)
    feature_activation: torch.Tensor  # [F]
    target_weight: torch.Tensor  # [K] (logit probabilities; 1 for a single target)

    @property
    def n_features(self) -> int:
        return int(self.feature_layer.shape[0])

    @property
    def n_targets(self) -> int:
        return int(self.target_weight.shape[0])

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def embed_start(self) -> int:
        return self.n_features + self.n_layers * self.n_tokens

    @property
    def target_start(self) -> int:
        return self.embed_start + self.n_tokens

    @property
    def n_nodes(self) -> int:
        return self.target_start + self.n_targets

    def error_node(self, layer: int, position: int) -> int:
        return self.error_start + layer * self.n_tokens + position

    def embed_node(self, position: int) -> int:
        return self.embed_start + position

    def target_node(self, k: int) -> int:
        return self.target_start + k

    def kind(self, node: int) -> str:
        if node < self.error_start:
            return FEATURE
        if node < self.embed_start:
            return ERROR
        return EMBED if node < self.target_start else TARGET

    def weights(self) -> torch.Tensor:
        """[N]: the target weights at the targets' nodes, 0 elsewhere (circuit-tracer's logit_weights)."""
        out = torch.zeros(self.n_nodes, dtype=self.target_weight.dtype, device=self.target_weight.device)
        out[self.target_start:] = self.target_weight
        return out

    def select_features(self, keep: torch.Tensor) -> "NodeTable":
        """The same table with only the features ``keep`` (sorted indices into this table's features)."""
        return NodeTable(n_layers=self.n_layers, n_tokens=self.n_tokens,
                         feature_layer=self.feature_layer[keep], feature_position=self.feature_position[keep],
                         feature_index=self.feature_index[keep], feature_activation=self.feature_activation[keep],
                         target_weight=self.target_weight)


def active_features(frozen: FrozenForward) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(layer, position, feature, activation) of every nonzero activation, ordered by layer, token, feature."""
    parts = []
    for layer, frozen_layer in enumerate(frozen.layers):
        if frozen_layer.transcoder is None:
            continue
        position, feature = torch.nonzero(frozen_layer.z, as_tuple=True)  # row-major: token, then feature
        parts.append((torch.full_like(position, layer), position, feature, frozen_layer.z[position, feature]))
    if not parts:
        empty = torch.zeros(0, dtype=torch.long, device=frozen.embed.device)
        return empty, empty, empty, torch.zeros(0, dtype=frozen.embed.dtype, device=frozen.embed.device)
    return tuple(torch.cat(column) for column in zip(*parts))  # type: ignore[return-value]


def node_table(frozen: FrozenForward, target_weight: torch.Tensor) -> NodeTable:
    layer, position, feature, activation = active_features(frozen)
    return NodeTable(n_layers=frozen.n_layers, n_tokens=frozen.n_tokens, feature_layer=layer,
                     feature_position=position, feature_index=feature, feature_activation=activation,
                     target_weight=target_weight.to(frozen.embed.dtype))


# ----------------------------------------------------------------------------- targets and feature rows


def salient_logit_targets(frozen: FrozenForward, position: int, max_logits: int = 10,
                          probability: float = 0.95) -> tuple[list[Target], torch.Tensor]:
    """circuit-tracer's logit targets: the most likely next tokens at ``position`` until their cumulative
    probability reaches ``probability`` (at most ``max_logits``), each as ``logit_a - mean_b logit_b``
    (the unembedding column minus the mean column, through the frozen final norm). Returns the targets and
    their probabilities (the weights)."""
    normalized = frozen.final_normalized[position]
    logits = normalized @ frozen.W_U + frozen.b_U
    probs = torch.softmax(logits.double(), dim=-1)
    top = probs.topk(min(max_logits, probs.shape[0]))
    count = int(torch.searchsorted(top.values.cumsum(0), torch.tensor(probability, dtype=torch.float64,
                                                                      device=probs.device))) + 1
    tokens, weights = top.indices[:count], top.values[:count]
    mean_column, mean_bias = frozen.W_U.mean(dim=1), frozen.b_U.mean()
    scale = frozen.final_scale[position:position + 1]
    targets = []
    for token, weight in zip(tokens.tolist(), weights.tolist()):
        direction = frozen.W_U[:, token] - mean_column
        constant = frozen.b_U[token] - mean_bias
        targets.append(Target(vector=frozen.to_raw(direction.unsqueeze(0), scale)[0], position=position,
                              read_point=(frozen.n_layers, frozen.n_layers), constant=float(constant),
                              value=float(normalized @ direction + constant),
                              description={"kind": "logit", "token": token, "demeaned": True,
                                           "probability": weight}))
    return targets, weights.to(frozen.embed.dtype)


@dataclass
class RowSpec:
    """Rows to compute: what each is read with, where, and its real value and constant part."""

    rows: Rows
    constant: torch.Tensor  # [R] the part of the value no node writes (encoder constant, b_U)
    value: torch.Tensor  # [R] the real value (pre-activation, logit), from the forward pass
    nodes: torch.Tensor  # [R] int64 node index of each row

    def __len__(self) -> int:
        return len(self.rows)


def target_rows(targets: list[Target], table: NodeTable) -> RowSpec:
    device = targets[0].vector.device
    rows = Rows(vectors=torch.stack([t.vector for t in targets]),
                positions=torch.tensor([t.position for t in targets], device=device),
                n_attn=torch.tensor([t.read_point[0] for t in targets], device=device),
                n_mlp=torch.tensor([t.read_point[1] for t in targets], device=device))
    dtype = rows.vectors.dtype
    return RowSpec(rows=rows, constant=torch.tensor([t.constant for t in targets], dtype=dtype, device=device),
                   value=torch.tensor([t.value for t in targets], dtype=dtype, device=device),
                   nodes=torch.arange(len(targets), device=device) + table.target_start)


def feature_rows(frozen: FrozenForward, table: NodeTable, features: torch.Tensor) -> RowSpec:
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
        # frozen scale, its weight and bias for mlp_input, nothing for resid_mid
        vectors[mask], norm_bias = frozen.read_mlp_input(layer, encoder, p)
        constant[mask] = (transcoder.b_enc[f] - transcoder.b_pre @ transcoder.W_enc[:, f]).to(dtype) + norm_bias
        value[mask] = frozen_layer.pre[p, f].to(dtype)
        n_attn[mask] = frozen.mlp_read_point(layer)[0]
    rows = Rows(vectors=vectors, positions=positions, n_attn=n_attn, n_mlp=layers.clone())
    return RowSpec(rows=rows, constant=constant, value=value, nodes=features.to(device))


# ----------------------------------------------------------------------------- the linear backward


class NodeWrites:
    """What every node writes into the residual stream, arranged for the batched backward pass.

    Per layer and token: the error term in slot 0, then the active features' writes ``z * f_dec`` in
    feature order ([T, 1 + k_max, d]), so one batched matmul per layer dots every row's gradient with
    every write of that layer. Writes are as they enter the residual stream (``write_mlp_output``: the
    transcoder's output space, Gemma-2's frozen post-norm), and so is ``b_dec`` (``bias_writes``)."""

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
        start = 0
        for layer in range(frozen.n_layers):
            count = int((table.feature_layer == layer).sum())
            positions = table.feature_position[start:start + count]
            counts = torch.bincount(positions, minlength=T)
            cumulative = torch.zeros(T + 1, dtype=torch.long, device=device)
            cumulative[1:] = counts.cumsum(0)
            k_max = int(counts.max()) if count else 0
            padded = torch.zeros(T, 1 + k_max, frozen.embed.shape[1], dtype=dtype, device=device)
            padded[:, 0] = frozen.layers[layer].error
            valid = torch.zeros(T, 1 + k_max, dtype=torch.bool, device=device)
            if count:
                slots = 1 + torch.arange(count, device=device) - cumulative[positions]
                decoder = frozen.layers[layer].transcoder.W_dec
                indices = table.feature_index[start:start + count]
                activations = table.feature_activation[start:start + count]
                written = frozen.write_mlp_output(layer, decoder[indices].to(dtype), positions)
                padded[positions, slots] = written * activations.unsqueeze(1)
                valid[positions, slots] = True
            transcoder = frozen.layers[layer].transcoder
            self.bias_writes.append(None if transcoder is None else frozen.write_mlp_output(
                layer, transcoder.b_dec.to(dtype).expand(T, -1), torch.arange(T, device=device)))
            self.layer_start.append(start)
            self.per_token.append(cumulative)
            self.padded.append(padded)
            self.slot_valid.append(valid)
            start += count

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

    def input_edges(self, grad: torch.Tensor) -> torch.Tensor:
        P = grad.shape[1]
        return torch.bmm(grad.transpose(0, 1), self.inputs[:P].unsqueeze(2))[:, :, 0].T

    def batch_columns(self, n_tokens: int) -> torch.Tensor:
        """Node indices of the columns ``dense_rows`` fills for rows at tokens < n_tokens: each layer's
        features there, then errors (layer by layer), then inputs."""
        device = self.inputs.device
        parts = [torch.arange(self.layer_start[layer], self.layer_start[layer] + self.feature_columns(layer, n_tokens),
                              device=device) for layer in range(self.frozen.n_layers)]
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
    order: torch.Tensor  # [R] row i here is row order[i] of the RowSpec
    n_tokens: int  # P
    flop: int  # multiply-adds x 2 of the pass's matmuls


def dense_rows(writes: NodeWrites, spec: RowSpec) -> DenseBatch:
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
            grad.index_put_((torch.arange(n_active, end, device=grad.device), rows.positions[index]),
                            rows.vectors[index], accumulate=True)
        return end

    feature_offset = [0]
    for layer in range(frozen.n_layers):
        feature_offset.append(feature_offset[-1] + writes.feature_columns(layer, P))
    error_offset = feature_offset[-1]
    L = frozen.n_layers
    n_active = inject(2 * L)
    for layer in reversed(range(L)):
        a = n_active
        skip = None  # a skip transcoder's linear path: the gradient it carries to the MLP's input
        if a:
            g = grad[:a]
            features, errors = writes.layer_edges(layer, g)
            out[:a, feature_offset[layer]:feature_offset[layer + 1]] = features
            out[:a, error_offset + layer * P:error_offset + (layer + 1) * P] = errors
            flop += 2 * a * P * d * writes.padded[layer].shape[1]
            if writes.bias_writes[layer] is not None:
                bias[:a] += (g * writes.bias_writes[layer][:P]).sum((1, 2))
            if frozen.layers[layer].skip_out is not None:
                skip, skip_constant = frozen.skip_backward(layer, g)
                bias[:a] += skip_constant
        if not frozen.parallel:
            if skip is not None:  # the MLP reads resid_mid: before rows reading there join
                grad[:skip.shape[0]] += skip
            n_active = a = inject(2 * layer + 1)
        if a:
            g = grad[:a]
            bias[:a] += frozen.attention_bias(layer, g)
            g += frozen.attention_backward(layer, g)
            flop += 4 * a * P * d * d + 2 * a * P * P * d
        if frozen.parallel and skip is not None:  # the MLP reads resid_pre, beside attention
            grad[:skip.shape[0]] += skip
        n_active = inject(2 * layer)
    if n_active:
        out[:n_active, error_offset + L * P:] = writes.input_edges(grad[:n_active])
        flop += 2 * n_active * P * d
    if n_active != R:
        raise ValueError(f"{R - n_active} rows read from no point of the residual stream")
    return DenseBatch(rows=out, bias=bias, order=order, n_tokens=P, flop=flop)


# ----------------------------------------------------------------------------- sparse rows


@dataclass
class SparseRows:
    """A chunk of computed rows of the adjacency, stored sparsely (CSR over the table's node indices).

    For every row: sum(entries) + dropped + bias == value (up to float rounding)."""

    nodes: torch.Tensor  # [R] int64: the node each row belongs to
    crow: torch.Tensor  # [R+1] int64
    col: torch.Tensor  # [nnz] int32: source node
    value: torch.Tensor  # [nnz]
    bias: torch.Tensor  # [R] constant terms
    target_value: torch.Tensor  # [R] the row's real value
    dropped: torch.Tensor  # [R] signed sum of entries not stored
    dropped_abs: torch.Tensor  # [R] their absolute sum
    total_abs: torch.Tensor  # [R] absolute sum of the whole row (stored + dropped)
    entry_rows: Optional[torch.Tensor] = None  # [nnz] int32 row of each entry, kept where cheap to keep

    @property
    def n_rows(self) -> int:
        return int(self.nodes.shape[0])

    @property
    def nnz(self) -> int:
        return int(self.col.shape[0])

    def row_ids(self) -> torch.Tensor:
        """[nnz]: the row (within this chunk) of every entry."""
        if self.entry_rows is not None:
            return self.entry_rows
        return torch.repeat_interleave(torch.arange(self.n_rows, device=self.crow.device), self.crow.diff(),
                                       output_size=self.nnz)

    def row_sums(self, values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.n_rows, dtype=values.dtype, device=values.device).index_add_(0, self.row_ids(), values)

    def nbytes(self) -> int:
        held = (self.crow, self.col, self.value) + ((self.entry_rows,) if self.entry_rows is not None else ())
        return sum(t.numel() * t.element_size() for t in held)

    def filter_entries(self, keep: torch.Tensor, new_col: Optional[torch.Tensor] = None) -> "SparseRows":
        """Only the entries ``keep`` [nnz] (the others are added to the dropped sums); columns renumbered
        by ``new_col`` [old node -> new node] when given. The result keeps its entries' rows (the filtered
        rows are the smaller ones, used many times after)."""
        rows = self.row_ids()
        lost = ~keep
        lost_values = self.value[lost]
        dropped = self.dropped.clone().index_add_(0, rows[lost], lost_values)
        dropped_abs = self.dropped_abs.clone().index_add_(0, rows[lost], lost_values.abs_())
        kept_rows = rows[keep].to(torch.int32)
        crow = torch.zeros_like(self.crow)
        crow[1:] = torch.bincount(kept_rows, minlength=self.n_rows).cumsum(0)
        col = self.col[keep]
        if new_col is not None:
            col = new_col.index_select(0, col).to(torch.int32)
        return SparseRows(nodes=self.nodes, crow=crow, col=col, value=self.value[keep], bias=self.bias,
                          target_value=self.target_value, dropped=dropped, dropped_abs=dropped_abs,
                          total_abs=self.total_abs, entry_rows=kept_rows)


class Adjacency:
    """The computed rows as a list of chunks (one per backward batch), never concatenated: the whole
    is as large as the rows themselves, never twice that. Rows are numbered across chunks in order."""

    def __init__(self, chunks: list[SparseRows]):
        self.chunks = chunks

    @property
    def nodes(self) -> torch.Tensor:
        return torch.cat([chunk.nodes for chunk in self.chunks])

    @property
    def n_rows(self) -> int:
        return sum(chunk.n_rows for chunk in self.chunks)

    @property
    def nnz(self) -> int:
        return sum(chunk.nnz for chunk in self.chunks)

    def nbytes(self) -> int:
        return sum(chunk.nbytes() for chunk in self.chunks)

    def cat(self, name: str) -> torch.Tensor:
        """A per-row field of every chunk, concatenated."""
        return torch.cat([getattr(chunk, name) for chunk in self.chunks])

    def normalized(self) -> list[torch.Tensor]:
        """Per chunk [nnz]: |A| with each row divided by its sum (circuit-tracer's normalize_matrix)."""
        out = []
        for chunk in self.chunks:
            magnitude = chunk.value.abs()
            out.append(magnitude / chunk.row_sums(magnitude).clamp(min=1e-10).index_select(0, chunk.row_ids()))
        return out

    def consume(self, fn: Callable[[SparseRows], SparseRows]) -> "Adjacency":
        """A new adjacency of ``fn(chunk)`` for every chunk; this one is emptied as it goes, so at most one
        chunk exists twice."""
        mapped = []
        for index in range(len(self.chunks)):
            mapped.append(fn(self.chunks[index]))
            self.chunks[index] = None  # type: ignore[call-overload]
        self.chunks = []
        return Adjacency(mapped)


def sparsify(dense: torch.Tensor, columns: torch.Tensor, drop_mass: float) -> tuple[torch.Tensor, ...]:
    """Dense rows [R, C] (columns: their node indices) -> (crow, col, value, dropped, dropped_abs, total_abs).
    ``dense`` is overwritten.

    Entries are grouped by the power of two of their share of the row's absolute sum; the groups of the
    smallest entries are dropped while their total share stays <= ``drop_mass`` (0: keep every nonzero)."""
    magnitude = dense.abs()
    total = magnitude.sum(1)
    keep = dense != 0
    if drop_mass > 0:
        share = magnitude.div_(total.clamp(min=torch.finfo(dense.dtype).tiny).unsqueeze(1))
        group = torch.frexp(share).exponent.neg_().clamp_(0, 199).long()  # share in [2^-g-1, 2^-g); zeros: 0
        mass = torch.zeros(dense.shape[0], 200, dtype=share.dtype, device=share.device).scatter_add_(1, group, share)
        from_smallest = mass.flip(1).cumsum(1).flip(1)  # [R, g]: share of the entries in groups >= g
        droppable = from_smallest <= drop_mass
        first_dropped = torch.where(droppable.any(1), droppable.int().argmax(1),
                                    torch.full_like(group[:, 0], 200))
        keep &= group < first_dropped.unsqueeze(1)
        del share, group
    row, column = torch.nonzero(keep, as_tuple=True)
    value = dense[row, column]
    if drop_mass > 0:
        lost = dense.masked_fill_(keep, 0)  # the caller's rows are not needed any more
        dropped, dropped_abs = lost.sum(1), lost.abs_().sum(1)
    else:
        dropped, dropped_abs = torch.zeros_like(total), torch.zeros_like(total)
    crow = torch.zeros(dense.shape[0] + 1, dtype=torch.long, device=dense.device)
    crow[1:] = torch.bincount(row, minlength=dense.shape[0]).cumsum(0)
    return crow, columns[column].to(torch.int32), value, dropped, dropped_abs, total


def compute_rows(writes: NodeWrites, spec: RowSpec, drop_mass: float, stats: Optional[dict] = None) -> SparseRows:
    """The rows of ``spec`` (in the order the backward pass carried them), stored sparsely."""
    batch = dense_rows(writes, spec)
    crow, col, value, dropped, dropped_abs, total = sparsify(batch.rows, writes.batch_columns(batch.n_tokens),
                                                            drop_mass)
    if stats is not None:
        stats["backward_flop"] = stats.get("backward_flop", 0) + batch.flop
    return SparseRows(nodes=spec.nodes[batch.order], crow=crow, col=col, value=value, bias=batch.bias,
                      target_value=spec.value[batch.order], dropped=dropped, dropped_abs=dropped_abs,
                      total_abs=total)


# ----------------------------------------------------------------------------- influence


def influence(adjacency: Adjacency, n_nodes: int, weights: torch.Tensor,
              normalized: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
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
        out.index_add_(0, chunk.col, values * flow[offset:offset + chunk.n_rows].index_select(0, chunk.row_ids()))
        offset += chunk.n_rows
    return out


def find_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The score of the entry at which the descending cumulative share first reaches ``threshold``
    (circuit-tracer's find_threshold; the last entry when rounding never reaches it)."""
    ordered = torch.sort(scores, descending=True).values
    cumulative = ordered.double().cumsum(0) / ordered.double().sum()
    index = int(torch.searchsorted(cumulative, torch.tensor(threshold, dtype=torch.float64, device=scores.device)))
    return ordered[min(index, ordered.shape[0] - 1)]


# ----------------------------------------------------------------------------- the graph


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
    estimate = influence(adjacency, table.n_nodes, table.weights())[:table.n_features]
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
        self.new_index[table.n_features:] = torch.arange(table.n_features, table.n_nodes, device=device) - shift
        self.dropped_abs = 0.0  # absolute sum of the entries removed so far

    def __call__(self, chunk: SparseRows) -> SparseRows:
        keep = self.new_index.index_select(0, chunk.col) >= 0
        self.dropped_abs += float(chunk.value[~keep].abs().sum())
        restricted = chunk.filter_entries(keep, self.new_index)
        restricted.nodes = self.new_index[chunk.nodes]
        return restricted


def build_graph(frozen: FrozenForward, targets: list[Target], target_weight: torch.Tensor,
                params: GraphParams, progress: Optional[Callable[[int, int], None]] = None) -> AttributionGraph:
    """Everything `tc graph` computes from a frozen forward pass and its targets.

    Rows keep every active feature's column until the last ranking; from then on the graph's features
    are known and every row, stored or new, keeps only theirs."""
    stats = {"seconds_rows": 0.0, "seconds_ranking": 0.0, "backward_flop": 0, "dropped_small_abs": 0.0}
    columns: Optional[ColumnMap] = None

    def store(spec: RowSpec) -> None:
        start = time.perf_counter()
        chunk = compute_rows(writes, spec, params.drop_mass, stats)
        stats["dropped_small_abs"] += float(chunk.dropped_abs.sum())
        adjacency.chunks.append(chunk if columns is None else columns(chunk))
        stats["seconds_rows"] += time.perf_counter() - start

    with torch.no_grad():
        table = node_table(frozen, target_weight)
        writes = NodeWrites(frozen, table)
        adjacency = Adjacency([])
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
                pending = ranked[:min(params.rank_every, budget - n_visited)]
                if n_visited + pending.shape[0] == budget:  # the last ranking: the graph's features are known
                    chosen = visited & reachable
                    chosen[pending] = True
                    columns = ColumnMap(table, chosen)
                    adjacency = adjacency.consume(columns)
                stats["seconds_ranking"] += time.perf_counter() - start
            # the set computed before the next ranking is fixed; batching rows of nearby tokens and
            # layers together only makes each backward pass smaller
            pending = pending[torch.argsort(table.feature_position[pending] * (frozen.n_layers + 1)
                                            + table.feature_layer[pending], stable=True)]
            for start_row in range(0, pending.shape[0], params.batch_size):
                batch = pending[start_row:start_row + params.batch_size]
                store(feature_rows(frozen, table, batch))
                visited[batch] = True
                n_visited += int(batch.shape[0])
                if progress:
                    progress(n_visited, budget)
        del writes
        if columns is None:  # no feature rows at all
            columns = ColumnMap(table, torch.zeros_like(reachable))
            adjacency = adjacency.consume(columns)
        start = time.perf_counter()
        stats["dropped_budget_abs"] = columns.dropped_abs
        graph = finish_graph(adjacency, columns.table, params, stats)
        graph.n_active_features = table.n_features
        stats["seconds_finish"] = time.perf_counter() - start
        return graph


def finish_graph(adjacency: Adjacency, table: NodeTable, params: GraphParams,
                 stats: Optional[dict] = None) -> AttributionGraph:
    """Influence, pruning and scores of rows over ``table``'s nodes (columns already restricted)."""
    stats = {} if stats is None else stats
    weights = table.weights()
    normalized = adjacency.normalized()
    node_influence = influence(adjacency, table.n_nodes, weights, normalized)
    node_mask, edge_mask = prune(adjacency, table, node_influence, normalized, params.node_threshold,
                                 params.edge_threshold)
    replacement, completeness = graph_scores(adjacency, table, node_influence, normalized)
    ordered, order = torch.sort(node_influence, descending=True)
    cumulative = torch.zeros_like(node_influence)
    cumulative[order] = (ordered.double().cumsum(0) / ordered.double().sum()).to(node_influence.dtype)
    total_abs, dropped_abs = adjacency.cat("total_abs"), adjacency.cat("dropped_abs")
    whole = float(total_abs.sum().clamp(min=1e-30))
    small, budget = stats.pop("dropped_small_abs", 0.0), stats.pop("dropped_budget_abs", 0.0)
    stats.update({
        "rows": adjacency.n_rows, "stored_entries": adjacency.nnz, "stored_bytes": adjacency.nbytes(),
        # shares of sum |A| over all rows: dropped as small (drop_mass), from features without rows
        "dropped_small_share": small / whole, "dropped_budget_share": budget / whole,
        "dropped_share_total": float(dropped_abs.sum()) / whole,
        "dropped_share_max_row": float((dropped_abs / total_abs.clamp(min=1e-30)).max())})
    return AttributionGraph(table=table, adjacency=adjacency, influence=node_influence, cumulative=cumulative,
                            node_mask=node_mask, edge_mask=edge_mask, replacement=replacement,
                            completeness=completeness, n_active_features=table.n_features, stats=stats)


# ----------------------------------------------------------------------------- pruning and scores


def prune(adjacency: Adjacency, table: NodeTable, node_influence: torch.Tensor, normalized: list[torch.Tensor],
          node_threshold: float, edge_threshold: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """circuit-tracer's prune_graph: (node mask [N], per chunk edge mask [nnz])."""
    if not 0.0 <= node_threshold <= 1.0 or not 0.0 <= edge_threshold <= 1.0:
        raise ValueError("node_threshold and edge_threshold must be between 0 and 1")
    weights = table.weights()
    node_mask = node_influence >= find_threshold(node_influence, node_threshold)
    node_mask[table.embed_start:] = True  # inputs and targets are always kept
    ends = [(chunk.nodes.index_select(0, chunk.row_ids()), chunk.col) for chunk in adjacency.chunks]
    in_pruned = [node_mask[target] & node_mask[source] for target, source in ends]
    pruned = Adjacency([chunk.filter_entries(keep) for chunk, keep in zip(adjacency.chunks, in_pruned)])
    pruned_normalized = pruned.normalized()
    pruned_influence = influence(pruned, table.n_nodes, weights, pruned_normalized) + weights
    scores = [values * pruned_influence[chunk.nodes.index_select(0, chunk.row_ids())]
              for chunk, values in zip(pruned.chunks, pruned_normalized)]
    all_scores = torch.cat(scores)
    threshold = find_threshold(all_scores, edge_threshold) if all_scores.numel() else all_scores.new_tensor(0.0)
    edge_mask = []
    for chunk, keep, score in zip(adjacency.chunks, in_pruned, scores):
        mask = torch.zeros(chunk.nnz, dtype=torch.bool, device=keep.device)
        mask[keep] = score >= threshold
        edge_mask.append(mask)
    # feature and error nodes need an outgoing kept edge, features an incoming one; repeat until stable
    prunable = torch.zeros(table.n_nodes, dtype=torch.bool, device=node_mask.device)
    prunable[:table.embed_start] = True
    while True:
        has_out = torch.zeros_like(node_mask)
        has_in = torch.zeros_like(node_mask)
        for (target, source), mask in zip(ends, edge_mask):
            mask &= node_mask[target] & node_mask[source]
            has_out[source[mask]] = True
            has_in[target[mask]] = True
        new_mask = node_mask & ~(prunable & ~has_out)
        new_mask[:table.n_features] &= has_in[:table.n_features]
        if bool((new_mask == node_mask).all()):
            return node_mask, edge_mask
        node_mask = new_mask


def graph_scores(adjacency: Adjacency, table: NodeTable, node_influence: torch.Tensor,
                 normalized: list[torch.Tensor]) -> tuple[float, float]:
    """circuit-tracer's compute_graph_scores on the unpruned graph: (replacement, completeness)."""
    inputs = float(node_influence[table.embed_start:table.target_start].sum())
    errors = float(node_influence[table.error_start:table.embed_start].sum())
    replacement = inputs / (inputs + errors) if inputs + errors > 0 else float("nan")
    error_share = torch.zeros(table.n_nodes, dtype=node_influence.dtype, device=node_influence.device)
    for chunk, values in zip(adjacency.chunks, normalized):
        col = chunk.col.long()
        is_error = (col >= table.error_start) & (col < table.embed_start)
        error_share.index_add_(0, chunk.nodes.index_select(0, chunk.row_ids())[is_error], values[is_error])
    output = node_influence + table.weights()
    completeness = float(((1 - error_share) * output).sum() / output.sum())
    return replacement, completeness


# ----------------------------------------------------------------------------- heads


@dataclass
class HeadSplit:
    """Kept edges split by the attention head of their first hop (seen from the edge's target).

    Frozen attention is a sum over heads and source tokens, so with F_l the image of the source's write
    at layer l's input (every path up to there: residual and any earlier hops), the edge is

        A[t, s] = residual + sum over l, h, q of A_l[h, t's token, q] / s_l[q] (F_l[q] . P W_V[h] W_O[h] u_t)

    where ``residual`` = u_t . w_s on the same token (no attention at all) and the (l, h, q) term is every
    path whose last attention hop before the target is head h of layer l reading token q."""

    sources: torch.Tensor  # [E] node indices
    targets: torch.Tensor  # [E]
    residual: torch.Tensor  # [E]
    by_head: torch.Tensor  # [E, L, H] summed over the hop's source token
    parts: list[dict]  # per edge: {(layer, head, token): part} for the parts of at least ``share`` of its mass
    share: float


def read_rows(frozen: FrozenForward, table: NodeTable, targets: list[Target], nodes: torch.Tensor) -> Rows:
    """How each node of ``nodes`` (features or targets) reads the residual, as a Rows."""
    is_target = nodes >= table.target_start
    rows = Rows(vectors=torch.empty(len(nodes), frozen.embed.shape[1], dtype=frozen.embed.dtype,
                                    device=frozen.embed.device),
                positions=torch.empty_like(nodes), n_attn=torch.empty_like(nodes), n_mlp=torch.empty_like(nodes))
    if bool((~is_target).any()):
        spec = feature_rows(frozen, table, nodes[~is_target])
        for name in ("vectors", "positions", "n_attn", "n_mlp"):
            getattr(rows, name)[~is_target] = getattr(spec.rows, name)
    for i in torch.nonzero(is_target).reshape(-1).tolist():
        target = targets[int(nodes[i]) - table.target_start]
        rows.vectors[i], rows.positions[i] = target.vector, target.position
        rows.n_attn[i], rows.n_mlp[i] = target.read_point[0], target.read_point[1]
    return rows


def node_writes(frozen: FrozenForward, table: NodeTable, nodes: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(writes [S, d], tokens [S], first attention layer that sees each write [S]) of features, errors,
    inputs."""
    dtype, device = frozen.embed.dtype, frozen.embed.device
    writes = torch.empty(len(nodes), frozen.embed.shape[1], dtype=dtype, device=device)
    positions, first = torch.empty_like(nodes), torch.empty_like(nodes)
    inputs = frozen.embed + (frozen.pos_embed if frozen.pos_embed is not None else 0)
    for i, node in enumerate(nodes.tolist()):
        kind = table.kind(node)
        if kind == FEATURE:
            layer, position = int(table.feature_layer[node]), int(table.feature_position[node])
            decoder = frozen.layers[layer].transcoder.W_dec[int(table.feature_index[node])].to(dtype)
            writes[i] = table.feature_activation[node] * decoder
        elif kind == ERROR:
            layer, position = divmod(node - table.error_start, table.n_tokens)
            writes[i] = frozen.layers[layer].error[position]
        elif kind == EMBED:
            layer, position = -1, node - table.embed_start
            writes[i] = inputs[position]
        else:
            raise ValueError(f"node {node} is a target: it writes nothing")
        positions[i], first[i] = position, layer + 1  # written after MLP `layer`: attention layer+1 sees it
    return writes, positions, first


@torch.no_grad()
def head_split(frozen: FrozenForward, table: NodeTable, targets: list[Target], sources: torch.Tensor,
               edge_targets: torch.Tensor, share: float = 0.25, batch_size: int = 64) -> HeadSplit:
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
    writes, write_positions, first_layer = node_writes(frozen, table, unique_sources)
    residual = torch.where(write_positions[source_of_edge] == reads.positions[target_of_edge],
                           (writes[source_of_edge] * reads.vectors[target_of_edge]).sum(-1),
                           torch.zeros(E, dtype=dtype, device=device))
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
        image = torch.zeros(len(batch), T, writes.shape[1], dtype=dtype, device=device)
        for layer in range(L):
            enters = batch[first_layer[batch] == layer]
            image[enters - start, write_positions[enters]] += writes[enters]
            W_O, mix, W_V = frozen._attention_backward_weights(layer)
            live = edges[(first_layer[source_of_edge[edges]] <= layer) & (reads.n_attn[target_of_edge[edges]] > layer)]
            for chunk in (live.split(256) if live.numel() else ()):
                t = target_of_edge[chunk]
                # P W_V[h] W_O[h] u_t per head: u_t through W_O^T, then through W_V (centred for LayerNorm)
                through_o = (reads.vectors[t] @ W_O.T).reshape(len(chunk), H, -1)  # [e, H, dh]
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
    return HeadSplit(sources=sources, targets=edge_targets, residual=residual, by_head=by_head, parts=parts_list,
                     share=share)
