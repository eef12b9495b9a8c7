"""The math of a cross-layer transcoder's training step (docs/method.md section 11), pure functions of tensors.

A step sees one *shard* of the CLT: a ``CrossLayerTranscoder`` holding this process's slice of every
layer's features (all of them in a single process). With ``L`` layers, ``x_l`` / ``y_l`` the MLP input /
output of layer ``l`` and ``a_l`` the activations of layer ``l``'s features:

    pre_l  = (x_l - b_pre^l) W_enc^l + b_enc^l
    yhat_t = sum over l <= t of a_l W_dec^(l -> t) + b_dec^t (+ x_t W_skip^t)
    loss   = sum_t mean_tokens ||yhat_t - y_t||^2 / var_t                       (per-layer normalised MSE)
           + lambda * mean_tokens sum_(l,i) tanh(c * a_(l,i) * ||W_dec^(l -> .)_i||)    (relu, jumprelu)
           + pre_act_coef * mean_tokens sum_(l,i) ReLU(-pre_(l,i))                    (relu, jumprelu)
           + aux_coef * AuxK (dead features reconstruct the residual)                 (every activation)

``var_t`` is the mean over tokens of ||y_t - mean y_t||^2, so each layer's term is its FVU and no layer
dominates; ``||W_dec^(l -> .)_i||`` is the norm of the concatenation of feature i's decoders to every
later layer (a feature pays for everything it writes). The decoder of a source layer is one product
``a_l [n, m] x W_dec^l [m, (L - l) d]`` (all its targets at once).

Sharding (features split across processes): every process computes its features' part of every
reconstruction; the parts are summed by ``Comm.sum`` (one all-reduce per step, of every layer's part
at once) and the gradient flows back into each part unchanged (the sum's derivative is the identity).
Selections that rank features against each other (TopK per layer and token, BatchTopK over every layer's
features of the batch, AuxK's dead features) find their global cut-off from each process's own
candidates gathered by ``Comm.gather``, then keep the local entries at or above it: the same entries a
single process keeps. The penalties are sums over features, so each process adds its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from tccli.transcoders.cross_layer import CrossLayerTranscoder


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass(frozen=True)
class Comm:
    """How a shard reaches the others: ``sum`` (elementwise sum over processes, a new tensor) and ``gather``
    (the processes' tensors concatenated along the last dimension in rank order). Identities for one process."""

    sum: Callable[[torch.Tensor], torch.Tensor] = _identity
    gather: Callable[[torch.Tensor], torch.Tensor] = _identity
    world: int = 1


ONE_PROCESS = Comm()


@dataclass(frozen=True)
class CLTSettings:
    """What the loss needs from the run's options."""

    activation: str  # relu, jumprelu, topk or batchtopk
    k: int = 0  # topk: per layer and token; batchtopk: per token over every layer
    pre_act_coef: float = 0.0
    aux_k: int = 0
    aux_coef: float = 0.0


@dataclass(frozen=True)
class CLTScales:
    """Constants measured once from the data at initialisation."""

    target_variance: tuple[float, ...]  # per layer: mean over tokens of ||y - mean y||^2
    tanh_scale: float = 1.0  # c of the tanh penalty, in activation x decoder-norm units
    bandwidth: tuple[float, ...] = ()  # jumprelu, per layer: the estimators' kernel width
    threshold_scale: tuple[float, ...] = ()  # jumprelu, per layer: the mean initial threshold


@dataclass
class CLTStepResult:
    loss: torch.Tensor  # what this process differentiates: reconstruction + its own penalties + aux
    reconstruction: torch.Tensor  # sum over layers of the normalised MSE (the same on every process)
    layer_mse: list[torch.Tensor]  # per layer: mean over tokens of ||yhat - y||^2
    outputs: list[torch.Tensor]  # per layer: the whole reconstruction yhat
    penalty: torch.Tensor  # this process's sparsity and pre-activation penalties (summed over processes: all)
    aux: torch.Tensor
    fires: torch.Tensor  # [L, m_local] long: tokens each feature fired on
    active: torch.Tensor  # [L] this process's active features summed over tokens
    selected_min: Optional[torch.Tensor] = None  # batchtopk [L, m_local]: smallest selected activation (inf: none)
    cutoff: Optional[torch.Tensor] = None  # batchtopk: the batch's cut-off (the smallest selected value)


# ----------------------------------------------------------------------------- loss terms


def kept(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` (broadcastable to ``mask``) where ``mask`` (bool) holds, else zero: the value of
    ``torch.where(mask, values, 0.0)`` up to the sign of a zero (and NaN where a masked-out value is infinite or
    NaN), computed as a product into a float copy of the mask because on the CPU torch.where branches per entry:
    over a mask that holds on about half the entries at random (the negative pre-activations) it is 5-10x slower
    than the copy and the product together (over a sparse mask the two cost the same)."""
    return mask.to(values.dtype).mul_(values)


def decoder_norms(W_dec: torch.Tensor) -> torch.Tensor:
    """[m]: the norm of each feature's decoders to all later layers together (W_dec: [m, n_later, d_out])."""
    return W_dec.pow(2).sum(dim=(1, 2)).sqrt()


class _TanhPenalty(torch.autograd.Function):
    """sum over entries of tanh(a * w) (a: [n, m], w: [m]); the backward pass in four passes over [n, m]."""

    @staticmethod
    def forward(ctx, activations, weights):
        t = torch.mul(activations, weights).tanh_()
        ctx.save_for_backward(activations, weights, t)
        return t.sum()

    @staticmethod
    def backward(ctx, grad):
        activations, weights, t = ctx.saved_tensors
        slope = torch.addcmul(t.new_ones(()), t, t, value=-1.0)  # sech^2 = 1 - tanh^2 (the 1 broadcast, not filled)
        grad_weights = torch.mul(slope, activations).sum(dim=0) * grad if ctx.needs_input_grad[1] else None
        return slope.mul_(weights * grad), grad_weights


def tanh_penalty(activations: torch.Tensor, norms: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean over tokens of sum_i tanh(scale * a_i * norms_i) (activations: [n, m], norms: [m])."""
    return _TanhPenalty.apply(activations, scale * norms) / activations.shape[0]


class _NegativePart(torch.autograd.Function):
    """sum of ReLU(-pre), with one pass each way (a boolean mask kept for the backward pass)."""

    @staticmethod
    def forward(ctx, pre):
        negative = pre < 0
        ctx.save_for_backward(negative)
        # the same entries as where(negative, pre, 0), in one vectorised pass (a NaN pre-activation, which only
        # NaN weights or inputs give, makes this NaN where where() skipped it)
        return -pre.clamp_max(0.0).sum()

    @staticmethod
    def backward(ctx, grad):
        (negative,) = ctx.saved_tensors
        return kept(-grad, negative)


def pre_activation_penalty(pre: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of sum_i ReLU(-pre_i)."""
    return _NegativePart.apply(pre) / pre.shape[0]


def normalized_mse(
    outputs: list[torch.Tensor], targets: list[torch.Tensor], variances: tuple[float, ...]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(sum over layers of mean_tokens ||yhat_t - y_t||^2 / var_t, the per-layer mean squared errors)."""
    per_layer = [(o - y).pow(2).sum(dim=-1).mean() for o, y in zip(outputs, targets)]
    return sum(mse / v for mse, v in zip(per_layer, variances)), per_layer


def lambda_at(step: int, total_steps: int, coef: float, ramp_fraction: float) -> float:
    """lambda ramped linearly from coef / ramp_steps at step 0 to coef over the first ``ramp_fraction`` of the run."""
    ramp_steps = int(round(ramp_fraction * total_steps))
    return coef * min(1.0, (step + 1) / ramp_steps) if ramp_steps > 0 else coef


class _DenseJumpReLU(torch.autograd.Function):
    """pre * H(pre - threshold) over a dense [n, m] matrix (threshold [m]), with the straight-through estimator
    of tccli.training.sparse_coding.jump_relu: d/d pre = H(pre - threshold), d/d threshold = -threshold /
    bandwidth * K((pre - threshold) / bandwidth), K the unit rectangle. Only two boolean masks are kept for
    the backward pass, and the threshold's gradient is summed over tokens in one pass."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        gap = pre - threshold
        active = gap > 0
        near = gap.abs_() < bandwidth / 2
        ctx.save_for_backward(active, near, threshold)
        ctx.bandwidth = bandwidth
        # where, not kept(): ``active`` is sparse (about k of m entries), which torch.where's per-entry branch
        # handles as fast as a product, with no float copy of the mask, and the zeros keep their sign
        return torch.where(active, pre, 0.0)

    @staticmethod
    def backward(ctx, grad):
        active, near, threshold = ctx.saved_tensors
        grad_threshold = -(threshold / ctx.bandwidth) * torch.where(near, grad, 0.0).sum(dim=0)
        return torch.where(active, grad, 0.0), grad_threshold, None


def jump_relu(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return _DenseJumpReLU.apply(pre, threshold, bandwidth)


# ----------------------------------------------------------------------------- selections across shards


def kth_largest(values: torch.Tensor, k: int, comm: Comm = ONE_PROCESS) -> torch.Tensor:
    """[..., 1]: the k-th largest entry along the last dimension of ``values`` concatenated over processes
    (each process sends only its own k largest). k must not exceed the total number of entries."""
    local = values.topk(min(k, values.shape[-1]), dim=-1, sorted=False).values
    return comm.gather(local).topk(k, dim=-1, sorted=False).values.min(dim=-1, keepdim=True).values


def topk_masks(pres: list[torch.Tensor], k: int, comm: Comm = ONE_PROCESS) -> list[torch.Tensor]:
    """Per layer [n, m_local] bool: each token's k largest pre-activations of that layer (over every process)."""
    m_total = pres[0].shape[-1] * comm.world
    stacked = torch.stack([p.detach() for p in pres])  # [L, n, m_local]
    cutoff = kth_largest(stacked, min(k, m_total), comm)
    return list((stacked >= cutoff).unbind(0))


def batchtopk_masks(
    pres: list[torch.Tensor], k: int, comm: Comm = ONE_PROCESS
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(per layer [n, m_local] bool, the cut-off): the k x n largest pre-activations of the batch over every
    layer's features on every process (a token may get more or fewer than k; a layer more or fewer than others)."""
    stacked = torch.stack([p.detach() for p in pres])  # [L, n, m_local]
    n = stacked.shape[1]
    total = min(k * n, stacked.numel() * comm.world)
    cutoff = kth_largest(stacked.reshape(-1), total, comm).reshape(())
    return list((stacked >= cutoff).unbind(0)), cutoff


def auxk_masks(
    pres: list[torch.Tensor], dead: torch.Tensor, aux_k: int, comm: Comm = ONE_PROCESS
) -> list[torch.Tensor]:
    """Per layer [n, m_local] bool: each token's ``aux_k`` largest pre-activations among that layer's dead
    features (``dead``: [L, m_local] bool) over every process (all of them where fewer are dead)."""
    stacked = torch.stack([p.detach() for p in pres])
    candidates = stacked.masked_fill(~dead[:, None, :], float("-inf"))
    cutoff = kth_largest(candidates, min(aux_k, stacked.shape[-1] * comm.world), comm)
    return list(((candidates >= cutoff) & dead[:, None, :]).unbind(0))


# ----------------------------------------------------------------------------- the step


def decode_parts(
    clt: CrossLayerTranscoder, activations: list[torch.Tensor], features: Optional[list[torch.Tensor]] = None
) -> torch.Tensor:
    """[n, L, d_out]: this shard's features' part of every layer's reconstruction (no biases, no skip); one
    product per source layer, covering all its targets, added into the slice of the layers it writes to (so
    the backward pass hands each product its gradient as one slice, not one copy per target). With
    ``features`` (per layer, the indices of the features ``activations`` hold, in their order), only those
    features' decoders are used (AuxK's dead features: a product as small as they are few)."""
    n_layers, n = len(activations), activations[0].shape[0]
    W_first = clt.W_dec[str(clt.layers[0])]
    parts = W_first.new_zeros(n, n_layers, W_first.shape[-1])
    for j, (layer, z) in enumerate(zip(clt.layers, activations)):
        W = clt.W_dec[str(layer)]
        if features is not None:
            W = W.index_select(0, features[j])
        parts[:, j:] += (z @ W.reshape(W.shape[0], W.shape[1] * W.shape[2])).view(n, n_layers - j, W.shape[-1])
    return parts


def summed(parts: torch.Tensor, comm: Comm) -> torch.Tensor:
    """``parts`` summed over processes in one all-reduce; the gradient of the sum reaches this process's parts
    as it is (value: the all-reduced sum exactly, the same on every process)."""
    if comm.world == 1:
        return parts
    total = comm.sum(parts.detach())
    return total + (parts - parts.detach())


def pre_activations(clt: CrossLayerTranscoder, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [
        torch.addmm(clt.b_enc[str(layer)], x - clt.b_pre[str(layer)], clt.W_enc[str(layer)])
        for layer, x in zip(clt.layers, inputs)
    ]


def activations_of(
    clt: CrossLayerTranscoder,
    pres: list[torch.Tensor],
    settings: CLTSettings,
    scales: CLTScales,
    comm: Comm = ONE_PROCESS,
) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
    """(per layer [n, m_local] activations with the training rule, BatchTopK's cut-off or None)."""
    activation = settings.activation
    if activation == "relu":
        return [torch.relu(p) for p in pres], None
    if activation == "jumprelu":
        return [
            jump_relu(p, clt.threshold[str(layer)], scales.bandwidth[j])
            for j, (layer, p) in enumerate(zip(clt.layers, pres))
        ], None
    if activation == "topk":
        masks, cutoff = topk_masks(pres, settings.k, comm), None
    else:
        masks, cutoff = batchtopk_masks(pres, settings.k, comm)
    return [torch.where(mask, torch.relu(p), 0.0) for p, mask in zip(pres, masks)], cutoff


def outputs_of(clt: CrossLayerTranscoder, inputs: list[torch.Tensor], parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """The whole reconstruction from the summed parts: + b_dec^t (+ x_t W_skip^t), held whole by every process."""
    outputs = []
    for layer, x, part in zip(clt.layers, inputs, parts):
        out = part + clt.b_dec[str(layer)]
        if clt.W_skip is not None:
            out = out + x @ clt.W_skip[str(layer)]
        outputs.append(out)
    return outputs


def clt_loss(
    clt: CrossLayerTranscoder,
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    dead: torch.Tensor,
    settings: CLTSettings,
    scales: CLTScales,
    sparsity_lambda: float,
    comm: Comm = ONE_PROCESS,
    use_aux: bool = False,
) -> CLTStepResult:
    """One batch's loss on this shard (see the module docstring). ``dead``: [L, m_local] bool; ``use_aux``:
    whether AuxK runs this step (every process must pass the same value: it takes part in a gather)."""
    pres = pre_activations(clt, inputs)
    zs, cutoff = activations_of(clt, pres, settings, scales, comm)
    parts = decode_parts(clt, zs)
    n_layers = len(zs)
    gap = parts.new_zeros(())
    if use_aux:
        masks = auxk_masks(pres, dead, settings.aux_k, comm)
        dead_features = [torch.nonzero(d).squeeze(1) for d in dead]
        aux_values = [
            p.index_select(1, f) * mask.index_select(1, f) for p, mask, f in zip(pres, masks, dead_features)
        ]  # the selected entries' pre-activations as they are (no ReLU: a dead feature's are mostly negative)
        parts = torch.cat([parts, decode_parts(clt, aux_values, dead_features)], dim=1)
        if settings.activation == "jumprelu":
            gap = threshold_gap(clt, aux_values, masks, dead_features, settings.aux_k, scales)
    together = summed(parts, comm).unbind(1)  # one all-reduce for the reconstruction and AuxK's
    outputs = outputs_of(clt, inputs, list(together[:n_layers]))
    reconstruction, layer_mse = normalized_mse(outputs, targets, scales.target_variance)
    penalty = reconstruction.new_zeros(())
    if settings.activation in ("relu", "jumprelu"):
        for layer, z, pre in zip(clt.layers, zs, pres):
            if sparsity_lambda:
                norms = decoder_norms(clt.W_dec[str(layer)])
                penalty = penalty + sparsity_lambda * tanh_penalty(z, norms, scales.tanh_scale)
            if settings.pre_act_coef:
                penalty = penalty + settings.pre_act_coef * pre_activation_penalty(pre)
    aux = reconstruction.new_zeros(())
    if use_aux:
        aux = auxk_loss(list(together[n_layers:]), targets, outputs) + gap
    loss = reconstruction + penalty + settings.aux_coef * aux
    with torch.no_grad():
        fires = torch.stack([torch.count_nonzero(z, dim=0) for z in zs])  # [L, m_local]
        selected_min = None
        if settings.activation == "batchtopk":
            selected_min = torch.stack([torch.where(z > 0, z, float("inf")).amin(dim=0) for z in zs])
    return CLTStepResult(
        loss,
        reconstruction,
        layer_mse,
        outputs,
        penalty,
        aux,
        fires,
        fires.sum(dim=1),
        selected_min,
        cutoff,
    )


def auxk_loss(
    aux_outputs: list[torch.Tensor], targets: list[torch.Tensor], outputs: list[torch.Tensor]
) -> torch.Tensor:
    """AuxK for a CLT: the dead features' selected pre-activations, through their decoders to every later layer,
    reconstruct each layer's residual ``y_t - yhat_t``; the mean over layers of each layer's squared error
    divided by its residual's variance (the per-layer AuxK of tccli.training.step_math, averaged)."""
    terms = []
    for aux_out, y, out in zip(aux_outputs, targets, outputs):
        residual = (y - out).detach()
        variance = (residual - residual.mean(dim=0)).pow(2).sum(dim=-1).mean().clamp_min(1e-12)
        terms.append((aux_out - residual).pow(2).sum(dim=-1).mean() / variance)
    return torch.stack(terms).mean()


def threshold_gap(
    clt: CrossLayerTranscoder,
    aux_values: list[torch.Tensor],
    masks: list[torch.Tensor],
    dead_features: list[torch.Tensor],
    aux_k: int,
    scales: CLTScales,
) -> torch.Tensor:
    """JumpReLU's addition to AuxK (as in the per-layer jumprelu kind): a dead feature fires again only above
    its threshold, so the gap between its AuxK entries and its threshold is closed from both sides: the sum
    over layers of mean over (token, AuxK slot) of ReLU(threshold - pre), in units of the layer's mean initial
    threshold. Divided by n x aux_k, not by the number of entries, so that shards add up to one process's."""
    total = aux_values[0].new_zeros(())
    for j, (layer, values, mask, features) in enumerate(zip(clt.layers, aux_values, masks, dead_features)):
        threshold = clt.threshold[str(layer)].index_select(0, features)
        selected = mask.index_select(1, features)
        below = torch.where(selected, torch.relu(threshold - values), 0.0).sum()
        total = total + below / (values.shape[0] * aux_k * scales.threshold_scale[j])
    return total


def fraction_of_variance_unexplained(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    residual = (output - target).pow(2).sum()
    return residual / (target - target.mean(dim=0)).pow(2).sum().clamp_min(1e-12)


def batchtopk_thresholds(min_sum: torch.Tensor, min_count: torch.Tensor, mean_cutoff: float) -> torch.Tensor:
    """BatchTopK -> JumpReLU thresholds: per feature the mean, over the batches where it was selected, of its
    smallest selected activation; a feature never selected gets the mean cut-off of the batches."""
    fallback = torch.full_like(min_sum, float(mean_cutoff))
    return torch.where(min_count > 0, min_sum / min_count.clamp_min(1), fallback)


# ----------------------------------------------------------------------------- initialisation


def init_clt_(
    clt: CrossLayerTranscoder,
    input_means: list[torch.Tensor],
    target_means: list[torch.Tensor],
    generators: list[torch.Generator],
) -> None:
    """Initialise a whole CLT in place: each feature's decoders to all later layers a random direction whose
    combined norm is 1 / sqrt(L) (small, and the same for every feature whatever the number of layers it writes
    to: the combined norm is what the tanh penalty charges); the encoder column its own-layer decoder's
    direction (random unit columns when d_in != d_out); b_pre and b_dec at the means; b_enc, W_skip 0.
    Each layer draws from its own generator, so its weights do not depend on the world size."""
    n_layers = len(clt.layers)
    with torch.no_grad():
        for j, (layer, gen) in enumerate(zip(clt.layers, generators)):
            key = str(layer)
            W_dec = torch.randn(clt.W_dec[key].shape, generator=gen)
            W_dec *= 1 / (decoder_norms(W_dec)[:, None, None].clamp_min(1e-12) * n_layers**0.5)
            clt.W_dec[key].copy_(W_dec)
            if clt.config.d_in == clt.config.d_out:
                own = W_dec[:, 0, :]
                clt.W_enc[key].copy_((own / own.norm(dim=-1, keepdim=True).clamp_min(1e-12)).T)
            else:
                W_enc = torch.randn(clt.W_enc[key].shape, generator=gen)
                clt.W_enc[key].copy_(W_enc / W_enc.norm(dim=0, keepdim=True))
            clt.b_pre[key].copy_(input_means[j])
            clt.b_dec[key].copy_(target_means[j])


def init_thresholds_(clt: CrossLayerTranscoder, inputs: list[torch.Tensor], k: int) -> None:
    """JumpReLU: each feature's threshold at its own (1 - k/m) quantile of the sample, so that every feature
    starts firing on k/m of the tokens (about k per layer and token)."""
    with torch.no_grad():
        for layer, pre in zip(clt.layers, pre_activations(clt, inputs)):
            n = pre.shape[0]
            above = max(1, round(n * k / clt.n_features))
            clt.threshold[str(layer)].copy_(torch.kthvalue(pre, max(1, n - above), dim=0).values.clamp_min(0))


def spread(values: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of ||values - mean||^2."""
    return (values - mean).pow(2).sum()


def calibrate_encoders_(
    clt: CrossLayerTranscoder,
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    settings: CLTSettings,
    scales: CLTScales,
    ratio: float = 0.5,
) -> None:
    """Scale every encoder (and threshold) by one factor so that the initial outputs' spread around b_dec,
    over every layer together, is ``ratio`` times the targets' spread (exact: with b_enc = 0 every activation
    rule here is positively homogeneous in the encoder scale, thresholds scaled with it)."""
    with torch.no_grad():
        pres = pre_activations(clt, inputs)
        zs, _ = activations_of(clt, pres, settings, scales)
        produced = float(decode_parts(clt, zs).pow(2).sum()) ** 0.5
        wanted = sum(float(spread(y, y.mean(dim=0))) for y in targets) ** 0.5
        if produced > 0:
            factor = ratio * wanted / produced
            for layer in clt.layers:
                clt.W_enc[str(layer)].mul_(factor)
                if clt.threshold is not None:
                    clt.threshold[str(layer)].mul_(factor)


def shard_of(clt: CrossLayerTranscoder, shard: CrossLayerTranscoder, rank: int) -> None:
    """Copy rank ``rank``'s slice of every layer's features of the whole ``clt`` into ``shard`` (whose
    n_features is the slice's width); the biases and W_skip that every process holds whole are copied whole."""
    width = shard.n_features
    features = slice(rank * width, (rank + 1) * width)
    with torch.no_grad():
        for layer in clt.layers:
            key = str(layer)
            shard.W_enc[key].copy_(clt.W_enc[key][:, features])
            shard.b_enc[key].copy_(clt.b_enc[key][features])
            shard.W_dec[key].copy_(clt.W_dec[key][features])
            shard.b_pre[key].copy_(clt.b_pre[key])
            shard.b_dec[key].copy_(clt.b_dec[key])
            if shard.threshold is not None:
                shard.threshold[key].copy_(clt.threshold[key][features])
            if shard.W_skip is not None:
                shard.W_skip[key].copy_(clt.W_skip[key])
