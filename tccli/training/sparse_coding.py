"""The training step of the sparse kinds (topk, batchtopk, jumprelu), doing only the work it needs.

A step's one unavoidable dense product is the encoder forward, ``pre = (x - b_pre) W_enc + b_enc``
([batch x d] x [d x m]). Everything after it touches only the entries the kind selects (a few per
token), so it is written here as sparse code:

- ``encode_selected`` computes ``pre`` once, lets a selection rule pick entries (token, feature) from
  it, and returns only those entries' pre-activations. Its backward is sparse: the gradient of
  ``W_enc`` is non-zero only in the columns of selected features and is summed entry by entry
  (``embedding_bag`` over the entries grouped by feature), and ``b_pre``'s gradient is the
  vector-matrix product ``-(sum of entry gradients per feature) W_enc^T``. Dense autograd would do two
  more [batch x d x m] products: the encoder weight gradient over every entry, and the gradient of
  ``x - b_pre`` (which exists only because ``b_pre`` sits inside the product).
- ``decode_entries`` sums ``value * W_dec[feature]`` per token with ``embedding_bag``.
- the selection rules: ``select_topk`` (k per token), ``select_batchtopk`` (k x batch over the batch,
  Bussmann et al. 2024), ``select_above`` (every entry above a per-feature level: JumpReLU) and
  ``select_auxk`` (the dead features' largest entries, for AuxK).
- JumpReLU's straight-through estimators (Rajamanoharan et al. 2024): ``jump_relu`` and ``step``,
  whose derivatives with respect to the threshold use a rectangle kernel of width ``bandwidth``.

Entries are always sorted by token (the order ``embedding_bag`` needs for bags given by offsets).
Pure math: tensors in, tensors out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class Entries:
    """Selected entries of a [n_tokens, m] activation matrix, sorted by token."""

    token: torch.Tensor  # [nnz] long
    feature: torch.Tensor  # [nnz] long

    def __len__(self) -> int:
        return int(self.token.numel())

    def offsets(self, n_tokens: int) -> torch.Tensor:
        """[n_tokens] start of each token's entries (embedding_bag's offsets)."""
        return offsets_of(self.token, n_tokens)


def counts_of(index: torch.Tensor, size: int, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[size] how often each value 0..size-1 occurs in ``index``, each occurrence counted ``weights`` (long)
    times or once (bincount's result, without bincount's wait for the GPU: bincount reads the largest
    value back to size its output, and a boolean index to pick the occurrences would wait likewise)."""
    weights = torch.ones_like(index) if weights is None else weights
    return torch.zeros(size, dtype=torch.long, device=index.device).index_add_(0, index, weights)


def offsets_of(index: torch.Tensor, size: int) -> torch.Tensor:
    """[size] where each value's run starts in ``index`` once sorted (embedding_bag's offsets)."""
    counts = counts_of(index, size)
    return torch.cumsum(counts, 0) - counts


def sum_by_index(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """[size] the sum of ``values`` at each index. On a GPU index_add_ adds with atomics, in an order that
    changes from run to run (so do the float sums); index_put_ with accumulate sorts first and is
    deterministic there. On the CPU index_add_ is the deterministic one."""
    out = torch.zeros(size, dtype=values.dtype, device=values.device)
    if values.device.type == "cuda":
        return out.index_put_((index,), values, accumulate=True)
    return out.index_add_(0, index, values)


# A selection rule: dense pre-activations [n, m] -> groups of entries (each sorted by token).
Selector = Callable[[torch.Tensor], list[Entries]]


class _EncodeSelected(torch.autograd.Function):
    """pre-activations of the selected entries, with a sparse backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_pre, select, groups_out, compute_dtype):
        centred = x - b_pre
        if compute_dtype is None:
            pre = torch.addmm(b_enc, centred, W_enc)
        else:  # the product in a lower precision (bfloat16 on a GPU); selection sees its rounding
            pre = torch.addmm(b_enc.to(compute_dtype), centred.to(compute_dtype), W_enc.to(compute_dtype))
        groups = select(pre)
        token = torch.cat([g.token for g in groups])
        feature = torch.cat([g.feature for g in groups])
        values = pre[token, feature].to(x.dtype)
        del pre
        groups_out.extend(groups)
        ctx.save_for_backward(centred, W_enc, token, feature)
        return values

    @staticmethod
    def backward(ctx, grad_values):
        centred, W_enc, token, feature = ctx.saved_tensors
        m = W_enc.shape[1]
        grad_values = grad_values.contiguous()
        # d loss / d b_enc[j] = sum of the gradients of feature j's entries
        grad_b_enc = sum_by_index(grad_values, feature, m)
        grad_W_enc = None
        if ctx.needs_input_grad[1]:
            # column j of the W_enc gradient = sum over feature j's entries of gradient x centred input:
            # embedding_bag over the entries grouped by feature, in the layout of W_enc
            order = torch.argsort(feature, stable=True)
            per_feature = F.embedding_bag(
                token[order], centred, offsets_of(feature, m), mode="sum", per_sample_weights=grad_values[order]
            )  # [m, d]
            grad_W_enc = per_feature.t() if W_enc.stride(0) == 1 else per_feature.t().contiguous()
        grad_b_pre = -(W_enc @ grad_b_enc) if ctx.needs_input_grad[3] else None
        return None, grad_W_enc, grad_b_enc if ctx.needs_input_grad[2] else None, grad_b_pre, None, None, None


def encode_selected(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_pre: torch.Tensor,
    select: Selector,
    compute_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, list[Entries]]:
    """(pre-activations of the selected entries [nnz], the groups of entries ``select`` chose).

    The values of all groups are concatenated in the order of the groups; ``x`` gets no gradient.
    The dense [n, m] pre-activation matrix lives only inside this call. ``compute_dtype`` (e.g.
    bfloat16) runs the dense product in that dtype; the values and all gradients stay in x's dtype.
    """
    groups: list[Entries] = []
    values = _EncodeSelected.apply(x.detach(), W_enc, b_enc, b_pre, select, groups, compute_dtype)
    return values, groups


def split_values(values: torch.Tensor, groups: list[Entries]) -> list[torch.Tensor]:
    return list(values.split([len(g) for g in groups]))


def decode_entries(values: torch.Tensor, entries: Entries, W_dec: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """[n_tokens, d_out]: sum over each token's entries of value x W_dec[feature] (no bias)."""
    return F.embedding_bag(entries.feature, W_dec, entries.offsets(n_tokens), mode="sum", per_sample_weights=values)


# ----------------------------------------------------------------------------- selection rules


def select_topk(pre: torch.Tensor, k: int) -> Entries:
    """The k largest pre-activations of every token."""
    n, m = pre.shape
    k = min(k, m)
    indices = pre.topk(k, dim=-1, sorted=False).indices
    token = torch.arange(n, device=pre.device).repeat_interleave(k)
    return Entries(token, indices.reshape(-1))


def select_batchtopk(pre: torch.Tensor, k: int) -> tuple[Entries, torch.Tensor]:
    """The k x n largest pre-activations of the whole batch (a token may get more or fewer than k), and
    the smallest selected value (the batch's cut-off, from which the inference threshold is estimated).

    Exact, computed without sorting all n x m entries: the batch's top k x n are among each token's own
    top c, c = min(m, 4k), unless some token has all c of its candidates selected; then it is redone
    with every entry as a candidate.
    """
    n, m = pre.shape
    total = min(k * n, n * m)
    per_token = min(m, 4 * k)
    while True:
        top = pre.topk(per_token, dim=-1, sorted=False)
        chosen = top.values.reshape(-1).topk(total, sorted=False).indices
        token = chosen // per_token
        if per_token == m or int(counts_of(token, n).max()) < per_token:
            break
        per_token = m
    feature = top.indices.reshape(-1)[chosen]
    cutoff = top.values.reshape(-1)[chosen].min()
    order = torch.argsort(token * m + feature)
    return Entries(token[order], feature[order]), cutoff


def select_above(pre: torch.Tensor, level: torch.Tensor) -> Entries:
    """Every entry with pre > level[feature] (level: [m])."""
    token, feature = torch.nonzero(pre > level, as_tuple=True)
    return Entries(token, feature)


def select_auxk(pre: torch.Tensor, dead: torch.Tensor, aux_k: int) -> Entries:
    """Per token, the ``aux_k`` largest pre-activations among the ``dead`` features ([m] bool)."""
    dead_features = torch.nonzero(dead).squeeze(1)
    n = pre.shape[0]
    k = min(aux_k, int(dead_features.numel()))
    if k == 0:
        empty = torch.zeros(0, dtype=torch.long, device=pre.device)
        return Entries(empty, empty)
    top = pre.index_select(1, dead_features).topk(k, dim=-1, sorted=False).indices
    token = torch.arange(n, device=pre.device).repeat_interleave(k)
    return Entries(token, dead_features[top.reshape(-1)])


# ----------------------------------------------------------------------------- JumpReLU estimators


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        grad_threshold = -grad * threshold / eps * _rectangle((pre - threshold) / eps)
        return grad_pre, grad_threshold, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        return None, -grad / eps * _rectangle((pre - threshold) / eps), None


def jump_relu(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """pre x H(pre - threshold); gradient to pre where active, to the threshold through the kernel
    estimate -threshold / bandwidth x K((pre - threshold) / bandwidth) (K the unit rectangle)."""
    return _JumpReLU.apply(pre, threshold, bandwidth)


def step(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """H(pre - threshold) (counts active features: the L0 penalty); gradient only to the threshold,
    -1 / bandwidth x K((pre - threshold) / bandwidth)."""
    return _Step.apply(pre, threshold, bandwidth)
