"""Exact direct attributions through a frozen forward pass (docs/method.md sections 5 and 8). Pure math.

The frozen forward pass is the ORIGINAL model's forward pass on one prompt: its residual stream,
attention patterns and normalisation scales are the real ones. Each MLP output is split into the
transcoder's part (feature activations z times decoder rows, plus b_dec, plus a skip transcoder's
x W_skip), computed from the MLP's real input in the transcoder's input space and written to the
residual through its output space (tccli.model.spaces), and an error term ``mlp_out - written(transcoder_out)``.
With patterns and scales frozen, a target ``v . resid(t)`` is linear in every upstream write, so

    target = constant + sum(features) + sum(skips) + sum(head, source) + embed + pos + sum(biases) + sum(errors)

holds to floating-point precision (tests/replacement/test_attribution.py checks it for every space pair).

Normalisation: a vector ``w`` dotted with a normalised residual equals ``(P w / scale) . x`` with
``x`` the raw residual, ``P`` the mean-centring projection for LayerNorm (identity for RMSNorm).
Applying ``P`` to the vector makes this exact whether or not the residual writes are centred, so
nothing relies on compatibility mode's centring of writing weights. The other maps (a transcoder's input
and output spaces, Gemma-2's post-attention and post-MLP norms with frozen scales, the skip path) are
``FrozenForward`` methods, so every consumer moves vectors through them the same way.

Read points: a vector is dotted with the residual stream that includes the attention outputs of
layers ``< n_attn`` and the MLP outputs of layers ``< n_mlp``. The MLP of layer l reads
``(l + 1, l)`` in a sequential block and ``(l, l)`` in a parallel one (it cannot see attention l).

Logit targets are the logits before any final soft-cap (Gemma-2's ``c tanh(logit / c)`` is not linear).

All functions are batched over "rows": a row is one vector [d] at one token with one read point.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from tccli.replacement.frozen import FrozenForward, encoder_constant, encoder_read
from tccli.replacement.targets import Target

# ----------------------------------------------------------------------------- targets


# ----------------------------------------------------------------------------- direct contributions


@dataclass
class Rows:
    """P vectors to attribute, each at a token and a read point."""

    vectors: torch.Tensor  # [P, d] dotted with the raw residual
    positions: torch.Tensor  # [P] int64
    n_attn: torch.Tensor  # [P] int64: attention layers < n_attn are upstream
    n_mlp: torch.Tensor  # [P] int64: MLP layers < n_mlp are upstream

    @classmethod
    def single(cls, vector: torch.Tensor, position: int, read_point: tuple[int, int]) -> Rows:
        device = vector.device
        return cls(
            vectors=vector.reshape(1, -1),
            positions=torch.tensor([position], device=device),
            n_attn=torch.tensor([read_point[0]], device=device),
            n_mlp=torch.tensor([read_point[1]], device=device),
        )

    @classmethod
    def from_target(cls, target: Target) -> Rows:
        return cls.single(target.vector, target.position, target.read_point)

    def __len__(self) -> int:
        return int(self.vectors.shape[0])


def feature_contributions(
    frozen: FrozenForward, rows: Rows, layer: int, only_active: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transcoder features of ``layer``: (feature indices [k], contributions [P, k]).

    contribution[p, i] = z_i(t_p) * sum over the layers l' the feature writes to and row p reads after of
    W_l'(f_dec^(layer -> l')(i)) . v_p, W_l' the map from the transcoder's output space to the residual after
    MLP l' (one term, l' = layer, for a per-layer transcoder; docs/method.md section 11 for a cross-layer
    one); zero where layer is not upstream of row p. Only features active somewhere in the prompt are
    computed (the rest contribute 0); without ``only_active`` they are returned as zeros of all features.
    """
    frozen_layer = frozen.layers[layer]
    indices, z = frozen_layer.active, frozen_layer.z_active
    read = frozen.read_mlp_output(layer, rows.vectors, rows.positions)
    dots = read @ frozen_layer.decoder_active.T
    for target, block in frozen_layer.decoder_blocks.items():
        if target != layer:  # a cross-layer transcoder's write to a later MLP, for rows reading after it
            later = frozen.read_mlp_output(target, rows.vectors, rows.positions) @ block.T
            dots = dots + later * (rows.n_mlp > target).to(later.dtype).unsqueeze(1)
    contributions = z[rows.positions] * dots
    upstream = (rows.n_mlp > layer).to(contributions.dtype).unsqueeze(1)
    contributions = contributions * upstream
    if not only_active:
        full = torch.zeros(len(rows), frozen_layer.z.shape[1], dtype=contributions.dtype, device=contributions.device)
        full[:, indices] = contributions
        indices, contributions = torch.arange(full.shape[1], device=full.device), full
    return indices, contributions


def feature_coefficient(
    frozen: FrozenForward, layer: int, feature: int, position: int, vector: torch.Tensor, n_mlp: int
) -> torch.Tensor:
    """The input-invariant weight from feature ``feature`` of ``layer`` at ``position`` to a vector read
    after MLP ``n_mlp - 1``: sum over the layers l' < n_mlp it writes to of W_l'(f_dec^(layer -> l')) . v
    (its contribution divided by its activation; docs/method.md sections 5 and 11)."""
    frozen_layer = frozen.layers[layer]
    slot = int(torch.searchsorted(frozen_layer.active, torch.tensor(feature, device=frozen_layer.active.device)))
    positions = torch.tensor([position], device=vector.device)
    total = None
    for target, block in frozen_layer.decoder_blocks.items():
        if target < n_mlp:
            term = frozen.read_mlp_output(target, vector.unsqueeze(0), positions)[0] @ block[slot].to(vector.dtype)
            total = term if total is None else total + term
    return total if total is not None else torch.zeros((), dtype=vector.dtype, device=vector.device)


def skip_contributions(frozen: FrozenForward, rows: Rows, layer: int) -> torch.Tensor:
    """[P]: the skip term x W_skip of ``layer`` at row p's token, written to the residual, dotted with v_p
    (zero where the layer is not upstream or has no skip connection)."""
    frozen_layer = frozen.layers[layer]
    if frozen_layer.skip_out is None:
        return torch.zeros(len(rows), dtype=rows.vectors.dtype, device=rows.vectors.device)
    read = frozen.read_mlp_output(layer, rows.vectors, rows.positions)
    upstream = (rows.n_mlp > layer).to(read.dtype)
    return (read * frozen_layer.skip_out[rows.positions]).sum(-1) * upstream


def head_contributions(frozen: FrozenForward, rows: Rows, layer: int) -> torch.Tensor:
    """[P, H, T]: head h of ``layer`` reading source token s, written into row p's token.

    contribution = A[h, t, s] * ((x_norm1(s) W_V + b_V) W_O[h]) . R(v), R the adjoint of Gemma-2's frozen
    post-attention norm at t (the identity elsewhere)
    """
    frozen_layer = frozen.layers[layer]
    read = frozen.read_attn_output(layer, rows.vectors, rows.positions)
    read_back = torch.einsum("pd,hed->phe", read, frozen_layer.W_O)  # W_O v per head
    per_source = torch.einsum("phe,she->phs", read_back, frozen_layer.values)
    pattern = frozen_layer.pattern[:, rows.positions, :].permute(1, 0, 2)  # [P, H, T]
    upstream = (rows.n_attn > layer).to(per_source.dtype).reshape(-1, 1, 1)
    return pattern * per_source * upstream


def dot_rows(rows: Rows, per_token: torch.Tensor) -> torch.Tensor:
    """[P]: v_p . per_token[t_p] (per_token [T, d])."""
    return (rows.vectors * per_token[rows.positions]).sum(-1)


def embed_contributions(frozen: FrozenForward, rows: Rows) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """([P] token embedding, [P] position embedding or None)."""
    pos = dot_rows(rows, frozen.pos_embed) if frozen.pos_embed is not None else None
    return dot_rows(rows, frozen.embed), pos


def error_contributions(frozen: FrozenForward, rows: Rows, layer: int) -> torch.Tensor:
    """[P]: v . (mlp_out - transcoder_out) of ``layer`` where that layer is upstream."""
    upstream = (rows.n_mlp > layer).to(rows.vectors.dtype)
    return dot_rows(rows, frozen.layers[layer].error) * upstream


def bias_contributions(frozen: FrozenForward, rows: Rows, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([P] attention output bias b_O, [P] transcoder decoder bias b_dec) of ``layer``."""
    frozen_layer = frozen.layers[layer]
    attn_read = frozen.read_attn_output(layer, rows.vectors, rows.positions)
    attn = (attn_read @ frozen_layer.b_O) * (rows.n_attn > layer).to(rows.vectors.dtype)
    if frozen_layer.transcoder is None:
        dec = torch.zeros_like(attn)
    else:
        b_dec = frozen_layer.transcoder.b_dec.to(rows.vectors.dtype)
        read = frozen.read_mlp_output(layer, rows.vectors, rows.positions)
        dec = (read @ b_dec) * (rows.n_mlp > layer).to(rows.vectors.dtype)
    return attn, dec


@dataclass
class DirectContributions:
    """Every direct term of one row; ``total()`` is ``v . resid`` exactly."""

    features: dict[int, torch.Tensor]  # layer -> [m]
    heads: dict[int, torch.Tensor]  # layer -> [H, T]
    embed: torch.Tensor
    pos_embed: Optional[torch.Tensor]
    attn_bias: dict[int, torch.Tensor]
    decoder_bias: dict[int, torch.Tensor]
    errors: dict[int, torch.Tensor]
    skips: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> skip term (skip transcoders only)

    def total(self) -> torch.Tensor:
        parts = [self.embed] + ([self.pos_embed] if self.pos_embed is not None else [])
        parts += [t.sum() for t in self.features.values()] + [t.sum() for t in self.heads.values()]
        parts += list(self.attn_bias.values()) + list(self.decoder_bias.values()) + list(self.errors.values())
        parts += list(self.skips.values())
        return torch.stack([p.reshape(()) for p in parts]).sum()


def direct_contributions(
    frozen: FrozenForward, vector: torch.Tensor, position: int, read_point: tuple[int, int]
) -> DirectContributions:
    """All direct terms of ``vector . resid(position at read_point)``, for every upstream component."""
    rows = Rows.single(vector, position, read_point)
    n_attn, n_mlp = read_point
    features, skips = {}, {}
    for layer in range(n_mlp):
        if frozen.layers[layer].transcoder is not None:
            indices, contributions = feature_contributions(frozen, rows, layer, only_active=False)
            features[layer] = contributions[0]
        if frozen.layers[layer].skip_out is not None:
            skips[layer] = skip_contributions(frozen, rows, layer)[0]
    heads = {layer: head_contributions(frozen, rows, layer)[0] for layer in range(n_attn)}
    embed, pos = embed_contributions(frozen, rows)
    attn_bias, decoder_bias = {}, {}
    for layer in range(max(n_attn, n_mlp)):
        attn, dec = bias_contributions(frozen, rows, layer)
        if layer < n_attn:
            attn_bias[layer] = attn[0]
        if layer < n_mlp and frozen.layers[layer].transcoder is not None:
            decoder_bias[layer] = dec[0]
    errors = {layer: error_contributions(frozen, rows, layer)[0] for layer in range(n_mlp)}
    return DirectContributions(
        features=features,
        heads=heads,
        embed=embed[0],
        pos_embed=None if pos is None else pos[0],
        attn_bias=attn_bias,
        decoder_bias=decoder_bias,
        errors=errors,
        skips=skips,
    )


# ----------------------------------------------------------------------------- one step upstream


def feature_upstream(
    frozen: FrozenForward, layer: int, feature: int, position: int, coefficient: torch.Tensor
) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor]:
    """Continue upstream from feature ``feature`` of ``layer`` whose path weight is ``coefficient``
    (= W(f_dec) . v): the vector whose direct contributions sum to coefficient * (pre-activation -
    encoder constant), its read point, and that constant part (coefficient * encoder constant)."""
    vector = coefficient * encoder_read(frozen, layer, feature, position)
    constant = coefficient * encoder_constant(frozen, layer, feature)
    return vector, frozen.mlp_read_point(layer), constant


def head_upstream(
    frozen: FrozenForward, layer: int, head: int, source: int, destination: int, vector: torch.Tensor
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Continue upstream from head ``head`` of ``layer`` reading ``source`` for ``destination``:
    the vector A[t, s] * W_V W_O R(v) (R: Gemma-2's post-attention norm at t, read backwards) moved through
    ln1 at the source token, and its read point."""
    frozen_layer = frozen.layers[layer]
    weight = frozen_layer.pattern[head, destination, source]
    read = frozen.read_attn_output(layer, vector.unsqueeze(0), torch.tensor([destination], device=vector.device))[0]
    ov = frozen_layer.W_V[head] @ (frozen_layer.W_O[head] @ read)
    raw = frozen.to_raw((weight * ov).unsqueeze(0), frozen_layer.attn_scale[source : source + 1])[0]
    return raw, (layer, layer)


def skip_upstream(
    frozen: FrozenForward, layer: int, position: int, vector: torch.Tensor
) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor]:
    """Continue upstream through ``layer``'s skip connection at ``position`` (docs/method.md section 8): the
    vector W_skip W(v) moved through the norm, whose direct contributions sum to the skip term's
    contribution less the returned constant (the norm bias's part), and its read point."""
    raw, constant = frozen.read_skip(layer, vector.unsqueeze(0), torch.tensor([position], device=vector.device))
    return raw[0], frozen.mlp_read_point(layer), constant[0]
