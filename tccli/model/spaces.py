"""Where a transcoder reads and writes, as maps between its spaces and the residual stream (docs/method.md
section 8). Pure math: tensors in, tensors out.

With ``r`` the residual stream the norm in front of the MLP reads (compatibility mode's residual: for a
LayerNorm model every write is centred, so ``r`` is centred too), ``s`` that norm's scale
``sqrt(mean(r_c^2) + eps)`` (``r_c`` = ``r`` centred for LayerNorm, ``r`` for RMSNorm), ``g`` and ``beta``
the norm's unprocessed weight and bias (Gemma's RMSNorm multiplies by ``1 + w``: ``g`` is that sum):

    input space   the transcoder reads x =
    normalized    r_c / s              compatibility mode's ln2.hook_normalized (the weight lives in W_in)
    mlp_input     g * r_c / s + beta   the MLP module's input in the unprocessed model
    resid_mid     r_c                  the residual itself (resid_pre for a parallel block), centred for
                                       LayerNorm

    output space  the transcoder writes y =
    mlp_out       what the MLP adds to the residual stream (compatibility mode's hook_mlp_out: centred
                  for LayerNorm models; after the post-MLP norm in Gemma-2)
    mlp_output    the MLP module's own output (uncentred; before Gemma-2's post-MLP norm)

and an SAE reads and writes one of the output spaces.

A LayerNorm model's residual matters only up to its mean, which every reader removes: its norms, and a
transcoder reading resid_mid (``r_c`` exactly, as tc cache's native engine computes it; compatibility
mode's own residual is centred only to about 1e-8 of its size). So a transcoder's output enters the residual
as it is, mean included, and nothing downstream sees that mean.

With every norm scale frozen at its value on the prompt, each of these is affine in ``r`` or in ``y``
(``NormMap``): a vector ``v`` dotted with ``x`` is the vector ``P (g * v) / s`` dotted with ``r`` plus the
constant ``v . beta`` (resid_mid: ``P v``), ``P`` the mean-centring projection for LayerNorm and the identity
for RMSNorm; and an output ``y`` enters the residual stream as ``g_post * P y / s_post`` (Gemma-2's post-norm:
``P`` identity; a LayerNorm model's raw MLP output: ``g_post`` 1 and ``s_post`` 1, only the centring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def centre(vectors: torch.Tensor) -> torch.Tensor:
    """P v: each vector less its mean over the last dimension."""
    return vectors - vectors.mean(dim=-1, keepdim=True)


@dataclass
class LayerSpaces:
    """One layer's unprocessed weights that tell its spaces apart (read before compatibility mode folds them).

    ``norm_weight``/``norm_bias``: the norm in front of the MLP (g, beta; bias None for RMSNorm).
    ``post_weight``/``post_eps``: a norm after the MLP (Gemma-2's post_feedforward_layernorm), else None.
    ``attn_post_weight``/``attn_post_eps``: the norm after attention (Gemma-2), else None.
    ``output_mean_weight``/``output_mean_bias``: for LayerNorm models, whose processed MLP output is centred,
    the mean over d_model of the unprocessed W_out rows [d_mlp] and of b_out: the raw output's mean is
    ``hidden @ output_mean_weight + output_mean_bias``.
    """

    layernorm: bool
    norm_weight: Optional[torch.Tensor] = None
    norm_bias: Optional[torch.Tensor] = None
    post_weight: Optional[torch.Tensor] = None
    post_eps: float = 0.0
    attn_post_weight: Optional[torch.Tensor] = None
    attn_post_eps: float = 0.0
    output_mean_weight: Optional[torch.Tensor] = None
    output_mean_bias: float = 0.0

    def to(self, device, dtype) -> LayerSpaces:
        move = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
        return LayerSpaces(
            self.layernorm,
            move(self.norm_weight),
            move(self.norm_bias),
            move(self.post_weight),
            self.post_eps,
            move(self.attn_post_weight),
            self.attn_post_eps,
            move(self.output_mean_weight),
            self.output_mean_bias,
        )


# ============================================================================ activations in each space


def transcoder_input(space: str, normalized: torch.Tensor, residual: torch.Tensor, spaces: LayerSpaces) -> torch.Tensor:
    """The activation a transcoder reading ``space`` sees, from compatibility mode's ``normalized``
    (ln2.hook_normalized) and ``residual`` (what the norm reads) of the same tokens."""
    if space == "normalized":
        return normalized
    if space == "resid_mid":  # centred for LayerNorm: what the norm sees (module docstring)
        return centre(residual) if spaces.layernorm else residual
    if space == "mlp_input":
        out = normalized * spaces.norm_weight.to(normalized.dtype)
        return out if spaces.norm_bias is None else out + spaces.norm_bias.to(normalized.dtype)
    raise ValueError(f"not an input space: {space!r}")


def mlp_output(processed: torch.Tensor, hidden: Optional[torch.Tensor], spaces: LayerSpaces) -> torch.Tensor:
    """The MLP module's raw output from the processed model's (mlp.hook_out; centred for LayerNorm models,
    whose mean is restored from the hidden activations ``hidden`` = mlp.hook_post)."""
    if spaces.output_mean_weight is None:
        return processed
    mean = hidden.to(spaces.output_mean_weight.dtype) @ spaces.output_mean_weight + spaces.output_mean_bias
    return processed + mean.unsqueeze(-1).to(processed.dtype)


def post_norm(y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma-2's RMSNorm after a sublayer, computed as HuggingFace does (in float32, then cast back)."""
    y32 = y.float()
    out = y32 * torch.rsqrt(y32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return out.to(y.dtype)


def written_to_residual(space: str, y: torch.Tensor, spaces: LayerSpaces) -> torch.Tensor:
    """What enters the residual stream (hook_mlp_out) when the MLP outputs ``y`` in ``space``; the
    post-norm's scale is recomputed from ``y``, as the model would with its MLP replaced."""
    if space == "mlp_out":
        return y
    if space != "mlp_output":
        raise ValueError(f"not an output space: {space!r}")
    if spaces.post_weight is not None:
        return post_norm(y, spaces.post_weight, spaces.post_eps)
    return centre(y) if spaces.layernorm else y


# ============================================================================ frozen maps (attribution)


@dataclass
class NormMap:
    """A norm with its per-token scale frozen: the linear map ``y -> weight * P y / scale[t]``.

    ``scale`` [T] (None: 1), ``weight`` [d] (None: 1), ``centred``: P is the centring projection.
    ``push`` maps vectors written at tokens ``positions`` through it; ``pull`` is its adjoint, taking a
    vector dotted with the map's output to the vector dotted with its input (``P (weight * v) / scale``).
    """

    scale: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None
    centred: bool = False

    @property
    def identity(self) -> bool:
        return self.scale is None and self.weight is None and not self.centred

    def _divide(self, vectors: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
        if self.scale is None:
            return vectors
        scale = self.scale if positions is None else self.scale[positions]
        return vectors / scale.to(vectors.dtype).unsqueeze(-1)

    def push(self, vectors: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[P, d] (or [T, d] with positions None) -> their images."""
        out = centre(vectors) if self.centred else vectors
        out = self._divide(out, positions)
        return out if self.weight is None else out * self.weight.to(out.dtype)

    def pull(self, vectors: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Adjoint of ``push``: v . push(y) == pull(v) . y."""
        out = vectors if self.weight is None else vectors * self.weight.to(vectors.dtype)
        out = centre(out) if self.centred else out
        return self._divide(out, positions)


def input_map(space: str, spaces: LayerSpaces, scale: torch.Tensor) -> tuple[NormMap, Optional[torch.Tensor]]:
    """(map, constant vector) with ``x = map.push(r) + constant`` for a transcoder reading ``space``; ``scale``
    [T] is the frozen scale of the norm in front of the MLP. A vector v dotted with x is
    ``map.pull(v) . r + v . constant``."""
    if space == "resid_mid":
        return NormMap(centred=spaces.layernorm), None
    if space == "normalized":
        return NormMap(scale=scale, centred=spaces.layernorm), None
    if space == "mlp_input":
        return NormMap(scale=scale, weight=spaces.norm_weight, centred=spaces.layernorm), spaces.norm_bias
    raise ValueError(f"not an input space: {space!r}")


def output_map(space: str, spaces: LayerSpaces, post_scale: Optional[torch.Tensor]) -> NormMap:
    """The map taking a transcoder's output in ``space`` to what enters the residual stream, with the
    post-MLP norm's scale frozen at ``post_scale`` [T] (Gemma-2; the real MLP output's scale)."""
    if space == "mlp_out":
        return NormMap()
    if spaces.post_weight is not None:
        return NormMap(scale=post_scale, weight=spaces.post_weight)
    return NormMap(centred=spaces.layernorm)
