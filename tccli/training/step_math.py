"""The math of a training step, pure functions of tensors (docs/method.md section 2): initialising a
transcoder (decoder rows, the encoder's scale, the biases at the data means, the starting thresholds),
the loss of every kind (reconstruction; L1 and ghost gradients for ReLU; AuxK, and JumpReLU's L0, for
the sparse kinds through ``sparse_coding``), the FVU, the learning-rate and L1 schedules, and the
optimiser step that keeps decoder rows unit-norm. Tensors in, tensors out: no files, no data stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from tccli.config.training import TrainConfig
from tccli.config.transcoders import THRESHOLD_ACTIVATIONS, TranscoderConfig
from tccli.training import sparse_coding
from tccli.transcoders.transcoder import Transcoder


def init_transcoder(
    config: TranscoderConfig, input_mean: torch.Tensor, target_mean: torch.Tensor, generator: torch.Generator
) -> Transcoder:
    """Random unit-norm decoder rows, the encoder initialised to the decoder's transpose (see
    ``calibrate_encoder_`` for its scale), and ``b_pre`` / ``b_dec`` set to the means of the inputs and
    of the targets (the paper's initialisation of the biases)."""
    transcoder = Transcoder(config)
    with torch.no_grad():
        W_dec = torch.randn(config.n_features, config.d_out, generator=generator)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        transcoder.W_dec.copy_(W_dec)
        if config.d_in == config.d_out:
            transcoder.W_enc.copy_(W_dec.T)
        else:
            W_enc = torch.randn(config.d_in, config.n_features, generator=generator)
            transcoder.W_enc.copy_(W_enc / W_enc.norm(dim=0, keepdim=True))
        transcoder.b_pre.copy_(input_mean)
        transcoder.b_dec.copy_(target_mean)
    return transcoder


def spread(values: torch.Tensor, mean: torch.Tensor) -> float:
    """Root mean squared distance of the rows of ``values`` from ``mean``."""
    return float((values - mean).pow(2).sum(dim=-1).mean().sqrt())


def init_thresholds_(transcoder: Transcoder, x: torch.Tensor, k: int) -> None:
    """Start the threshold kinds at about k active features per token on the sample ``x``: BatchTopK at the
    cut-off of the sample's k x n largest pre-activations, JumpReLU with each feature's threshold at its
    own (1 - k/m) quantile, so that every feature starts firing on k/m of the tokens."""
    config = transcoder.config
    if config.activation not in THRESHOLD_ACTIVATIONS:
        return
    with torch.no_grad():
        pre = transcoder.pre_activation(x)
        if config.activation == "batchtopk":
            transcoder.threshold.fill_(float(batch_cutoff(pre, k)))
        else:
            n = pre.shape[0]
            above = max(1, round(n * k / config.n_features))  # tokens each feature fires on
            transcoder.threshold.copy_(torch.kthvalue(pre, max(1, n - above), dim=0).values.clamp_min(0))


def calibrate_encoder_(transcoder: Transcoder, x: torch.Tensor, y: torch.Tensor, ratio: float = 0.5) -> None:
    """Scale the encoder so that the initial outputs' spread around ``b_dec`` is ``ratio`` times the
    targets' spread. With ``b_enc`` = 0 the output minus ``b_dec`` is proportional to the encoder
    scale (ReLU and TopK are positively homogeneous; the threshold kinds are when their thresholds are
    scaled with it), so one measurement fixes it exactly. Without this a tied initialisation on
    unnormalised activations starts with outputs several times too large and spends its first hundreds
    of steps shrinking them."""
    with torch.no_grad():
        output, _ = transcoder(x)  # (batchtopk's initial threshold gives the batch rule on this sample)
        produced = spread(output, transcoder.b_dec)
        if produced > 0:
            factor = ratio * spread(y, y.mean(dim=0)) / produced
            transcoder.W_enc.mul_(factor)
            if transcoder.threshold is not None:
                transcoder.threshold.mul_(factor)


def remove_parallel_gradient(W_dec: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient with each row's component along that (unit-norm) decoder row removed, so that a step
    moves the row tangentially to the unit sphere."""
    return grad - (grad * W_dec).sum(dim=-1, keepdim=True) * W_dec


def normalize_rows_(W_dec: torch.Tensor) -> None:
    """Rescale every decoder row to unit norm, in place."""
    with torch.no_grad():
        W_dec /= W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Mean over tokens of ||output - target||^2, or of ||output - target||^2 / ||target|| with ``normalize``."""
    squared = (output - target).pow(2).sum(dim=-1)
    if normalize:
        squared = squared / target.norm(dim=-1).clamp_min(1e-8)
    return squared.mean()


def fraction_of_variance_unexplained(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    residual = (output - target).pow(2).sum()
    total = (target - target.mean(dim=0)).pow(2).sum()
    return residual / total.clamp_min(1e-12)


def ghost_grad_loss(
    pre: torch.Tensor,
    target: torch.Tensor,
    output: torch.Tensor,
    W_dec: torch.Tensor,
    dead: torch.Tensor,
    mse: torch.Tensor,
) -> torch.Tensor:
    """Ghost gradients (Anthropic, Feb 2024) for the ``dead`` features.

    The dead features, with exp() of their pre-activations as activations, are asked to reconstruct the
    residual ``target - output`` (the reference code used ``input - output``, which for a transcoder is
    the wrong quantity). Their output is rescaled to half the residual's norm per token, and the loss
    is rescaled to the size of the main reconstruction loss ``mse`` (no gradient through the scales).
    """
    if not bool(dead.any()):
        return pre.new_zeros(())
    residual = (target - output).detach()
    ghost_out = torch.exp(pre[:, dead]) @ W_dec[dead]
    scale = residual.norm(dim=-1, keepdim=True) / (2 * ghost_out.norm(dim=-1, keepdim=True).clamp_min(1e-8))
    ghost_out = ghost_out * scale.detach()
    ghost_mse = (ghost_out - residual).pow(2).sum(dim=-1).mean()
    return (mse / (ghost_mse + 1e-6)).detach() * ghost_mse


def auxk_loss(
    values: torch.Tensor,
    entries: sparse_coding.Entries,
    target: torch.Tensor,
    output: torch.Tensor,
    W_dec: torch.Tensor,
) -> torch.Tensor:
    """AuxK (Gao et al. 2024): the dead features' largest entries (``entries``, chosen by
    ``sparse_coding.select_auxk``, with pre-activations ``values``) reconstruct the residual
    ``target - output``; the loss is normalised by the residual's variance so its scale does not depend
    on the layer.

    The dead features' pre-activations are used as they are, without the ReLU: a feature is usually dead
    because its pre-activation has gone negative on every token, and through a ReLU it would get no
    gradient at all (measured here: the AuxK loss then stays at 1.0 and 10% of features stay dead).
    """
    if len(entries) == 0:
        return output.new_zeros(())
    residual = (target - output).detach()
    aux_out = sparse_coding.decode_entries(values, entries, W_dec, target.shape[0])
    variance = (residual - residual.mean(dim=0)).pow(2).sum(dim=-1).mean().clamp_min(1e-12)
    return (aux_out - residual).pow(2).sum(dim=-1).mean() / variance


def batch_cutoff(pre: torch.Tensor, k: int) -> torch.Tensor:
    """The smallest of the k x n largest entries of ``pre`` [n, m] after the ReLU (BatchTopK's cut-off)."""
    return sparse_coding.select_batchtopk(pre, k)[1].clamp_min(0)


def learning_rate(step: int, total_steps: int, lr: float, warmup_steps: int, decay_fraction: float) -> float:
    """Linear warm-up from 0, constant, then linear decay to 0 over the last ``decay_fraction`` of the run."""
    factor = 1.0
    if warmup_steps > 0 and step < warmup_steps:
        factor = (step + 1) / warmup_steps
    decay_steps = int(round(decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if decay_steps > 0 and step >= decay_start:
        factor = min(factor, (total_steps - step) / decay_steps)
    return lr * factor


def l1_coefficient(step: int, l1: float, l1_warmup: int) -> float:
    return l1 * min(1.0, (step + 1) / l1_warmup) if l1_warmup > 0 else l1


@dataclass
class StepResult:
    loss: torch.Tensor
    mse: torch.Tensor
    output: torch.Tensor
    l1: torch.Tensor  # mean over tokens of sum |z|
    l0: torch.Tensor  # mean over tokens of the number of active features
    aux: torch.Tensor
    fires: torch.Tensor  # [m] number of tokens each feature fired on
    cutoff: Optional[torch.Tensor] = None  # batchtopk: the batch's cut-off (smallest selected value)


@dataclass(frozen=True)
class LossScales:
    """Per-layer constants of the sparse kinds' losses, measured once from the data at initialisation."""

    target_variance: float = 1.0  # mean over tokens of ||y - mean y||^2: the loss is mse / this (an FVU)
    bandwidth: float = 1.0  # jumprelu: the kernel width in pre-activation units
    threshold_scale: float = 1.0  # jumprelu: the mean initial threshold


def transcoder_loss(
    transcoder: Transcoder,
    x: torch.Tensor,
    y: torch.Tensor,
    dead: torch.Tensor,
    config: TrainConfig,
    step: int,
    scales: LossScales = LossScales(),
) -> StepResult:
    """The training loss of one batch: reconstruction + (L1 and ghost grads | AuxK, and JumpReLU's L0)."""
    if transcoder.config.activation == "relu":
        return dense_loss(transcoder, x, y, dead, config, step)
    return sparse_loss(transcoder, x, y, dead, config, scales)


def skip_term(transcoder: Transcoder, x: torch.Tensor) -> torch.Tensor | int:
    return 0 if transcoder.W_skip is None else x @ transcoder.W_skip


def dense_loss(
    transcoder: Transcoder, x: torch.Tensor, y: torch.Tensor, dead: torch.Tensor, config: TrainConfig, step: int
) -> StepResult:
    """ReLU with the L1 penalty and ghost gradients (the paper's recipe); dense autograd throughout."""
    pre = transcoder.pre_activation(x)
    z = torch.relu(pre)
    output = z @ transcoder.W_dec + transcoder.b_dec + skip_term(transcoder, x)
    active = z > 0
    l1 = z.sum(dim=-1).mean()
    mse = reconstruction_loss(output, y, config.normalize_mse)
    loss = mse + l1_coefficient(step, config.l1, config.l1_warmup) * l1
    aux = ghost_grad_loss(pre, y, output, transcoder.W_dec, dead, mse) if config.ghost_grads else mse.new_zeros(())
    return StepResult(loss + aux, mse, output, l1, active.sum(dim=-1).float().mean(), aux, active.sum(dim=0))


def sparse_loss(
    transcoder: Transcoder,
    x: torch.Tensor,
    y: torch.Tensor,
    dead: torch.Tensor,
    config: TrainConfig,
    scales: LossScales,
) -> StepResult:
    """TopK, BatchTopK and JumpReLU through ``sparse_coding``: one dense product (the encoder forward),
    everything else on the selected entries. The loss is mse / target variance (an FVU, so the other
    terms' weights do not depend on the layer's scale) + aux_coef x AuxK (+ l0_coef x L0 for jumprelu)."""
    tc_config = transcoder.config
    activation, n, m = tc_config.activation, x.shape[0], tc_config.n_features
    k = int(tc_config.k or 0)
    use_aux = config.aux_k > 0 and bool(dead.any())
    cutoff: list[torch.Tensor] = []
    if activation == "jumprelu":
        # the entries the estimators need: active ones and those within half a bandwidth below the threshold
        level = (transcoder.threshold - scales.bandwidth / 2).detach()

    def select(pre: torch.Tensor) -> list[sparse_coding.Entries]:
        if activation == "topk":
            groups = [sparse_coding.select_topk(pre, k)]
        elif activation == "batchtopk":
            entries, value = sparse_coding.select_batchtopk(pre, k)
            groups = [entries]
            cutoff.append(value)
        else:
            groups = [sparse_coding.select_above(pre, level)]
        if use_aux:
            groups.append(sparse_coding.select_auxk(pre, dead, config.aux_k))
        return groups

    values, groups = sparse_coding.encode_selected(
        x, transcoder.W_enc, transcoder.b_enc, transcoder.b_pre, select, compute_dtype=autocast_dtype(config, x.device)
    )
    values = sparse_coding.split_values(values, groups)
    entries = groups[0]
    l0_penalty = None
    if activation == "jumprelu":
        threshold = transcoder.threshold[entries.feature]
        z = sparse_coding.jump_relu(values[0], threshold, scales.bandwidth)
        l0_penalty = sparse_coding.step(values[0], threshold, scales.bandwidth).sum() / n
    else:
        z = torch.relu(values[0])
    output = sparse_coding.decode_entries(z, entries, transcoder.W_dec, n) + transcoder.b_dec + skip_term(transcoder, x)
    active = z > 0
    fires = sparse_coding.counts_of(entries.feature, m, active.long())
    mse = reconstruction_loss(output, y, config.normalize_mse)
    loss = mse / scales.target_variance
    aux = auxk_loss(values[1], groups[1], y, output, transcoder.W_dec) if use_aux else mse.new_zeros(())
    if activation == "jumprelu" and use_aux:
        # AuxK alone can reconstruct with a dead feature's pre-activations far below its threshold (even
        # negative); a JumpReLU feature fires again only above it, so the gap between its AuxK entries and
        # its threshold is closed from both sides (in units of the mean initial threshold): the entries
        # are pulled up and the threshold down. Pulling the entries alone left ~20% of layer 4's features
        # dead on stories260K (README: AuxK, and the Kinds table), the L0 penalty holding thresholds up
        gap = torch.relu(transcoder.threshold[groups[1].feature] - values[1])
        aux = aux + gap.mean() / scales.threshold_scale
    loss = loss + config.aux_coef * aux
    if l0_penalty is not None:
        loss = loss + config.l0_coef * l0_penalty
    return StepResult(
        loss, mse, output, z.sum() / n, active.sum().float() / n, aux, fires, cutoff[0] if cutoff else None
    )


def autocast_dtype(config: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    """The dtype of the encoder's dense product: bfloat16 with --autocast bfloat16 on a GPU, else float32."""
    return torch.bfloat16 if config.autocast == "bfloat16" and device.type == "cuda" else None


def clamp_min_(param: torch.Tensor, optimizer: torch.optim.Optimizer, low: float) -> None:
    """Clamp a parameter (and the schedule-free iterates that stand for it) to >= low, in place."""
    with torch.no_grad():
        param.clamp_(min=low)
        for key in ("z", "x"):
            if key in optimizer.state.get(param, {}):
                optimizer.state[param][key].clamp_(min=low)


def constrained_step(transcoder: Transcoder, optimizer: torch.optim.Optimizer, unit_decoder: bool = True) -> None:
    """Step; with ``unit_decoder``, first remove the decoder gradient parallel to each row and afterwards
    renormalise the rows."""
    with torch.no_grad():
        for param in transcoder.parameters():
            if param.grad is not None and param.grad.stride() != param.stride():
                # torch's fused Adam (2.13) steps over raw memory: a gradient laid out unlike its
                # parameter (feature-major W_enc after an all-reduce) would be applied to the wrong entries
                param.grad = torch.empty_like(param).copy_(param.grad)
        if unit_decoder and transcoder.W_dec.grad is not None:
            transcoder.W_dec.grad.copy_(remove_parallel_gradient(transcoder.W_dec, transcoder.W_dec.grad))
    optimizer.step()
    if unit_decoder:
        normalize_rows_(transcoder.W_dec)
