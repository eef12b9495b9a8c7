"""`tc train`: transcoders (and MLP-output SAEs) trained from an activation cache (METHOD.md section 2).

Three parts, kept apart:
- the training math: pure functions of tensors (losses, the decoder-norm constraint, dead-feature
  losses, the learning-rate schedule);
- the data stream: a deterministic shuffle buffer over the HDF5 cache (``ShuffleSchedule`` decides
  which rows go into which window and in what token order; ``WindowLoader`` reads them);
- the run: ``train(config)`` builds one transcoder per layer, feeds every layer from the same window
  (so the cache is read once per step whatever the number of layers), logs, checkpoints and saves.

Determinism: everything random derives from ``--seed`` (the initial weights from a torch generator,
the token order of each window from numpy's SeedSequence of (seed, epoch, window)). The data position
is a function of the step alone, so a checkpoint needs only the step, the weights, the optimiser
state and the dead-feature counters to resume to bit-identical final weights on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from tccli.config.fields import from_json_dict, parse_layers, to_json_dict
from tccli.runtime import allocator
from tccli.runtime import distributed
from tccli.runtime import interrupts
from tccli.runtime import outputs
from tccli.runtime import progress
from tccli.training import sparse_coding
from tccli.errors import TcError, fail
from tccli.training.optim import ScheduleFreeSign
from tccli.transcoders.transcoder import Transcoder
from tccli.config.transcoders import K_ACTIVATIONS, THRESHOLD_ACTIVATIONS, TranscoderConfig
from tccli.transcoders.files import layer_folder_name, save_transcoder
from tccli.config.training import TrainConfig

CHECKPOINT_FILE = "checkpoint.tcstate"  # not .pt: a set folder's .pt files are read as paper transcoders
LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "train_config.json"


# ----------------------------------------------------------------------------- configuration


# Fields that may differ between a run and its resumption without changing the result.
RESUME_FREE_FIELDS = ("device", "autocast", "threads", "checkpoint_every", "log_every", "resume", "force", "quiet",
                      "out", "cache")


# ----------------------------------------------------------------------------- training math (pure)


def init_transcoder(config: TranscoderConfig, input_mean: torch.Tensor, target_mean: torch.Tensor,
                    generator: torch.Generator) -> Transcoder:
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


def ghost_grad_loss(pre: torch.Tensor, target: torch.Tensor, output: torch.Tensor, W_dec: torch.Tensor,
                    dead: torch.Tensor, mse: torch.Tensor) -> torch.Tensor:
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


def auxk_loss(values: torch.Tensor, entries: sparse_coding.Entries, target: torch.Tensor, output: torch.Tensor,
              W_dec: torch.Tensor) -> torch.Tensor:
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


def transcoder_loss(transcoder: Transcoder, x: torch.Tensor, y: torch.Tensor, dead: torch.Tensor,
                    config: TrainConfig, step: int, scales: LossScales = LossScales()) -> StepResult:
    """The training loss of one batch: reconstruction + (L1 and ghost grads | AuxK, and JumpReLU's L0)."""
    if transcoder.config.activation == "relu":
        return dense_loss(transcoder, x, y, dead, config, step)
    return sparse_loss(transcoder, x, y, dead, config, scales)


def skip_term(transcoder: Transcoder, x: torch.Tensor) -> torch.Tensor | int:
    return 0 if transcoder.W_skip is None else x @ transcoder.W_skip


def dense_loss(transcoder: Transcoder, x: torch.Tensor, y: torch.Tensor, dead: torch.Tensor,
               config: TrainConfig, step: int) -> StepResult:
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


def sparse_loss(transcoder: Transcoder, x: torch.Tensor, y: torch.Tensor, dead: torch.Tensor,
                config: TrainConfig, scales: LossScales) -> StepResult:
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

    values, groups = sparse_coding.encode_selected(x, transcoder.W_enc, transcoder.b_enc, transcoder.b_pre, select,
                                                   compute_dtype=autocast_dtype(config, x.device))
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
    return StepResult(loss, mse, output, z.sum() / n, active.sum().float() / n, aux, fires,
                      cutoff[0] if cutoff else None)


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


# ----------------------------------------------------------------------------- the data stream


@dataclass(frozen=True)
class Window:
    """One fill of the shuffle buffer: which cache rows it holds and the token order within it."""

    index: int  # windows counted from the start of training
    epoch: int
    row_ranges: tuple[tuple[int, int], ...]  # sorted, merged [start, stop) row ranges
    first_step: int
    n_steps: int
    seed: tuple[int, int, int]

    def token_order(self, n_tokens: int) -> np.ndarray:
        return np.random.default_rng(list(self.seed)).permutation(n_tokens)


class ShuffleSchedule:
    """Which cache rows fill each window of the shuffle buffer, decided by the seed and nothing else.

    Rows are grouped into chunks of about 1,024 tokens (contiguous, so reads are sequential); each
    epoch visits the chunks in a fresh random order, ``window_chunks`` of them per window; a window's
    tokens are permuted and cut into batches (tokens left over at the end of a window are skipped).
    """

    def __init__(self, n_rows: int, context: int, batch_size: int, buffer_tokens: int, seed: int):
        self.n_rows, self.context, self.batch_size, self.seed = n_rows, context, batch_size, seed
        self.rows_per_chunk = max(1, 1024 // context)
        self.n_chunks = math.ceil(n_rows / self.rows_per_chunk)
        rows_per_window = max(1, buffer_tokens // context, math.ceil(batch_size / context))
        self.window_chunks = max(1, rows_per_window // self.rows_per_chunk)
        if self._chunk_rows(range(self.n_chunks)) * context < batch_size:
            raise fail(f"the cache holds {n_rows * context} tokens, fewer than one batch of {batch_size}")

    def _chunk_rows(self, chunks) -> int:
        return sum(min(self.n_rows, (c + 1) * self.rows_per_chunk) - c * self.rows_per_chunk for c in chunks)

    def windows(self, start_step: int = 0) -> Iterator[Window]:
        """Windows in training order, starting with the one that contains ``start_step``."""
        step, index, epoch = 0, 0, 0
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n_chunks)
            for w, first in enumerate(range(0, self.n_chunks, self.window_chunks)):
                chunks = sorted(int(c) for c in order[first:first + self.window_chunks])
                n_steps = self._chunk_rows(chunks) * self.context // self.batch_size
                if n_steps and step + n_steps > start_step:
                    yield Window(index, epoch, self._merge(chunks), step, n_steps, (self.seed, epoch, w))
                step += n_steps
                index += 1
            epoch += 1

    def _merge(self, chunks: list[int]) -> tuple[tuple[int, int], ...]:
        ranges: list[list[int]] = []
        for c in chunks:
            start, stop = c * self.rows_per_chunk, min(self.n_rows, (c + 1) * self.rows_per_chunk)
            if ranges and ranges[-1][1] == start:
                ranges[-1][1] = stop
            else:
                ranges.append([start, stop])
        return tuple((a, b) for a, b in ranges)


class WindowLoader:
    """Reads windows from a cache (``tccli.data.cache.ActivationCache`` or anything with its ``read``) and
    returns, per layer, the window's inputs and targets already in shuffled order; the next window is
    read in a background thread while the current one trains.

    The window travels to the device unshuffled and is shuffled there (a gather). On a GPU it is read
    into pinned host memory and copied on a stream of its own, so the copy overlaps the steps running on
    the compute stream, which waits for the copy (an event) only when it reaches the window; the gather
    runs on the GPU too, rather than as a random-access copy by this one host thread (on an H200 that
    copy took longer than the steps it fed)."""

    def __init__(self, cache: Any, layers: list[int], kind: str, context: int, device: torch.device,
                 share: Optional[Any] = None):
        self.cache, self.layers, self.kind, self.context, self.device = cache, layers, kind, context, device
        self.share = share  # (token order, window) -> the positions this rank trains on (data parallel)
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._copied: dict[int, Any] = {}  # window index -> the CUDA event marking its copy done

    def _read(self, layer: int, which: str, window: Window) -> torch.Tensor:
        """The window's rows of one array, in cache order, in pinned host memory when bound for a GPU."""
        parts = [self.cache.read(layer, which, a * self.context, b * self.context) for a, b in window.row_ranges]
        rows = sum(len(part) for part in parts)
        host = torch.empty((rows, parts[0].shape[1]), dtype=torch.float32, pin_memory=self._copy_stream is not None)
        np.concatenate(parts, out=host.numpy())
        return host

    def _shuffled(self, host: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        if self._copy_stream is None:
            return host[order]
        with torch.cuda.stream(self._copy_stream):
            return host.to(self.device, non_blocking=True)[order.to(self.device, non_blocking=True)]

    def load(self, window: Window) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        order = None
        out = {}
        for layer in self.layers:
            parts = {which: self._read(layer, which, window)
                     for which in (("mlp_out",) if self.kind == "sae" else ("mlp_in", "mlp_out"))}
            if order is None:
                order = window.token_order(len(parts["mlp_out"]))
                if self.share is not None:
                    order = self.share(order, window)
                order = torch.from_numpy(np.ascontiguousarray(order, dtype=np.int64))
            target = self._shuffled(parts["mlp_out"], order)
            source = target if self.kind == "sae" else self._shuffled(parts["mlp_in"], order)
            out[layer] = (source, target)
        if self._copy_stream is not None:
            event = torch.cuda.Event()
            event.record(self._copy_stream)
            self._copied[window.index] = event
        return out

    def _ready(self, window: Window, data: dict) -> dict:
        """Make the compute stream wait for the window's copy, and tell the allocator it uses the tensors."""
        event = self._copied.pop(window.index, None)
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for pair in data.values():
                for tensor in pair:
                    tensor.record_stream(compute)
        return data

    def stream(self, windows: Iterator[Window]) -> Iterator[tuple[Window, dict]]:
        """(window, data) pairs, prefetching one window ahead."""
        current = next(windows)
        pending = self._pool.submit(self.load, current)
        for upcoming in windows:
            data = self._ready(current, pending.result())
            pending = self._pool.submit(self.load, upcoming)
            yield current, data
            current = upcoming

    def close(self) -> None:
        # wait for a read in flight: a worker still inside h5py/torch while the process (or its
        # process group) shuts down can abort it
        self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class DataStats:
    input_mean: torch.Tensor
    target_mean: torch.Tensor
    input_sample: torch.Tensor  # the first few thousand cached tokens, to calibrate the initial encoder
    target_sample: torch.Tensor
    target_variance: float = 1.0  # mean over tokens of ||y - mean y||^2


def data_stats(cache: Any, layers: list[int], kind: str, max_tokens: int = 262_144,
               sample_tokens: int = 8192) -> dict[int, DataStats]:
    """Per layer: the means of inputs and targets and the targets' variance (computed in float64) over the
    first ``max_tokens`` cached tokens, and a sample of them for ``calibrate_encoder_``."""
    stop = min(cache.n_tokens, max_tokens)
    out = {}
    for layer in layers:
        target = torch.from_numpy(cache.read(layer, "mlp_out", 0, stop)).double()
        source = target if kind == "sae" else torch.from_numpy(cache.read(layer, "mlp_in", 0, stop)).double()
        if not bool(torch.isfinite(target).all() and torch.isfinite(source).all()):
            raise fail(f"the cache holds non-finite activations in layer {layer}")
        target_mean = target.mean(dim=0)
        variance = float((target - target_mean).pow(2).sum(dim=-1).mean())
        out[layer] = DataStats(source.mean(dim=0).float(), target_mean.float(), source[:sample_tokens].float(),
                               target[:sample_tokens].float(), max(variance, 1e-12))
    return out


# ----------------------------------------------------------------------------- the run


@dataclass
class LayerState:
    transcoder: Transcoder
    optimizer: torch.optim.Optimizer  # Adam or ScheduleFreeSign
    steps_since_fired: torch.Tensor  # [m] long
    fire_counts: torch.Tensor  # [m] long: tokens fired on during the frequency window
    frequency_tokens: int = 0
    scales: LossScales = LossScales()


def open_cache(path: str) -> Any:
    from tccli.data.cache_reader import ActivationCache

    return ActivationCache.open(path)


def check_cache(cache: Any, path: str, layer_spec: str) -> list[int]:
    """The layers to train, after checking the cache is complete, not empty and holds them."""
    if not cache.complete:
        raise fail(f"cache {path} is incomplete (its writer stopped before the end); finish or rebuild it "
                   f"with tc cache before training")
    if cache.n_tokens == 0:
        raise fail(f"cache {path} holds no tokens")
    n_layers = int(cache.model_info.get("n_layers", max(cache.layers) + 1))
    layers = sorted(cache.layers) if str(layer_spec).strip().lower() == "all" else parse_layers(layer_spec, n_layers)
    missing = [layer for layer in layers if layer not in cache.layers]
    if missing:
        raise fail(f"cache {path} holds layers {sorted(cache.layers)}, not layer {missing[0]}")
    return layers


def transcoder_config(config: TrainConfig, cache: Any, layer: int) -> TranscoderConfig:
    from tccli.model.loading import model_identity

    info = cache.model_info
    model_name = info.get("name")
    if model_identity(model_name) == "builtin":  # not this machine's install path: it means nothing elsewhere
        model_name = "builtin"
    hooks = info["layers"][layer]
    d_model = int(cache.d_model)
    return TranscoderConfig(
        d_in=d_model, d_out=d_model, n_features=config.n_features(d_model), activation=config.activation,
        k=config.k if config.activation in K_ACTIVATIONS else None, skip=config.skip, kind=config.kind, layer=layer,
        input_space="mlp_out" if config.kind == "sae" else "normalized", output_space="mlp_out",
        model_name=model_name, model_architecture=info.get("architecture"),
        weight_processing=dict(info.get("weight_processing") or {}),
        input_hook=hooks["mlp_out"] if config.kind == "sae" else hooks["mlp_in"], output_hook=hooks["mlp_out"],
        training=to_json_dict(config),
    )


def new_layer_state(tc_config: TranscoderConfig, stats: DataStats, config: TrainConfig,
                    generator: torch.Generator, device: torch.device) -> LayerState:
    transcoder = init_transcoder(tc_config, stats.input_mean, stats.target_mean, generator)
    init_thresholds_(transcoder, stats.input_sample, config.k)
    calibrate_encoder_(transcoder, stats.input_sample, stats.target_sample)
    bandwidth = threshold_scale = 1.0
    if tc_config.activation == "jumprelu":  # relative to the initial thresholds' scale
        threshold_scale = max(float(transcoder.threshold.detach().mean()), 1e-8)
        bandwidth = config.bandwidth * threshold_scale
    transcoder = transcoder.to(device)
    if tc_config.activation != "relu":
        # feature-major storage of W_enc [d_in, m] (strides (1, d_in)): the sparse encoder gradient is built
        # per feature, so the weight, its gradient and the optimiser's state share this layout
        transcoder.W_enc = torch.nn.Parameter(transcoder.W_enc.detach().t().contiguous().t())
    if tc_config.activation == "batchtopk":  # estimated, not trained (finish_layer)
        transcoder.threshold.requires_grad_(False)
    weights = [p for name, p in transcoder.named_parameters() if p.requires_grad and name != "threshold"]
    groups = [dict(params=weights, lr_scale=1.0)]
    if tc_config.activation == "jumprelu":
        # JumpReLU's thresholds step in units of their own initial size, so that a step changes a
        # threshold by about lr of itself (as training log thresholds would) whatever the activations' scale
        groups.append(dict(params=[transcoder.threshold], lr_scale=threshold_scale))
    lr = config.learning_rate_for(tc_config.n_features)
    optimizer = (ScheduleFreeSign(groups, lr=lr) if config.optimizer == "signum"
                 else torch.optim.Adam(groups, lr=lr, fused=True))  # one pass over each tensor (half the time)
    m = tc_config.n_features
    return LayerState(transcoder, optimizer, torch.zeros(m, dtype=torch.long, device=device),
                      torch.zeros(m, dtype=torch.long, device=device),
                      scales=LossScales(stats.target_variance, bandwidth, threshold_scale))


def finish_layer(state: LayerState, stats: DataStats) -> Transcoder:
    """The transcoder to save once the steps are done: the averaged weights (schedule-free), BatchTopK's
    inference threshold estimated with those weights on the sample of training tokens (the cut-off of
    the sample's k x n largest pre-activations, so that the threshold gives k active features per token
    on average), and W_enc back in the ordinary layout."""
    transcoder = state.transcoder
    if isinstance(state.optimizer, ScheduleFreeSign):
        state.optimizer.use_average()
    with torch.no_grad():
        if transcoder.config.activation == "batchtopk":
            x = stats.input_sample.to(transcoder.W_enc.device)
            transcoder.threshold.fill_(float(batch_cutoff(transcoder.pre_activation(x), int(transcoder.config.k))))
        transcoder.W_enc = torch.nn.Parameter(transcoder.W_enc.detach().contiguous(),
                                              requires_grad=transcoder.W_enc.requires_grad)
    return transcoder


def save_checkpoint(out: Path, step: int, config: TrainConfig, states: dict[int, LayerState],
                    name: str = CHECKPOINT_FILE) -> None:
    """Replace ``out/name`` atomically; a failed write (full disk, read-only folder) removes its temporary
    file, keeps the previous checkpoint and raises one line naming the file and the cause."""
    payload = {
        "step": step,
        "config": to_json_dict(config),
        "layers": {layer: {"transcoder": s.transcoder.state_dict(), "optimizer": s.optimizer.state_dict(),
                           "steps_since_fired": s.steps_since_fired, "fire_counts": s.fire_counts,
                           "frequency_tokens": s.frequency_tokens}
                   for layer, s in states.items()},
        "torch_rng": torch.get_rng_state(),
    }

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            recording = outputs.RecordingFile(handle)
            try:
                torch.save(payload, recording)
            except RuntimeError as exc:  # torch reports a full disk as "unexpected pos ..."
                if recording.error is None:
                    raise
                raise recording.error from exc

    outputs.atomic_write(out / name, write)


def load_checkpoint(out: Path, config: TrainConfig, states: dict[int, LayerState], d_model: int,
                    name: str = CHECKPOINT_FILE) -> int:
    """Restore ``states`` from ``out/name``; the step it was saved at."""
    path = out / name
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        saved_config = payload["config"]
        saved_layers = payload["layers"]
    except Exception as exc:  # a truncated or foreign file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise fail(f"cannot read checkpoint {path}: {reason}; start again with --force") from None
    check_same_run(saved_config, config, d_model, f"the checkpointed run")
    if sorted(saved_layers) != sorted(states):
        raise fail(f"--resume: the checkpoint holds layers {sorted(saved_layers)}, not {sorted(states)}")
    for layer, state in states.items():
        saved_layer = saved_layers[layer]
        state.transcoder.load_state_dict(saved_layer["transcoder"])
        state.optimizer.load_state_dict(saved_layer["optimizer"])
        device = state.steps_since_fired.device
        state.steps_since_fired = saved_layer["steps_since_fired"].to(device)
        state.fire_counts = saved_layer["fire_counts"].to(device)
        state.frequency_tokens = int(saved_layer["frequency_tokens"])
    torch.set_rng_state(payload["torch_rng"])
    return int(payload["step"])


def check_same_run(saved: dict, config: TrainConfig, d_model: int, what: str) -> None:
    """Refuse to continue a run whose options would change the result. Compared by meaning: the layer
    lists are compared once resolved (by the caller), and --features / --expansion by the width they give."""
    saved_config = from_json_dict(TrainConfig, saved)
    for name, value in to_json_dict(config).items():
        if name in RESUME_FREE_FIELDS or name in ("layers", "expansion", "features"):
            continue
        if getattr(saved_config, name) != value:
            raise fail(f"--resume: --{name.replace('_', '-')} is {value!r} but {what} used "
                       f"{getattr(saved_config, name)!r}")
    if saved_config.n_features(d_model) != config.n_features(d_model):
        raise fail(f"--resume: this run would have {config.n_features(d_model)} features per layer but {what} "
                   f"has {saved_config.n_features(d_model)}")


class Reporter:
    """Metric lines in the JSONL log, and on a terminal (not --quiet) a progress bar with them above it."""

    def __init__(self, out: Path, quiet: bool, total_steps: int, start_step: int = 0):
        try:
            self.log = open(out / LOG_FILE, "a")
        except OSError as exc:
            raise outputs.write_error(out / LOG_FILE, exc) from None
        self.total_steps = total_steps
        self._bar = progress.bar(quiet, "steps")
        self.update = self._bar.__enter__()
        self.console = progress.stderr_console() if self.update is not progress.no_progress else None
        self.update("training", start_step, total_steps)
        self.started = time.time()

    def record(self, entry: dict) -> None:
        try:
            self.log.write(json.dumps(entry) + "\n")
            self.log.flush()
        except OSError as exc:
            raise outputs.write_error(Path(self.log.name), exc) from None
        if self.console is not None:
            m = entry
            self.console.print(
                f"step {m['step']}/{self.total_steps} layer {m['layer']} lr {m['lr']:.2e} loss {m['loss']:.4g} "
                f"mse {m['mse']:.4g} L1 {m['l1']:.3g} L0 {m['l0']:.1f} FVU {m['fvu']:.4f} "
                f"dead {m['dead_fraction']:.3f} ({time.time() - self.started:.0f}s)")

    def step(self, step: int) -> None:
        self.update("training", step, self.total_steps)

    def close(self) -> None:
        self._bar.__exit__(None, None, None)
        with contextlib.suppress(OSError):
            self.log.close()


def run_files(out: Path) -> list[Path]:
    """The files and folders tc train writes in ``out`` (what --force replaces; nothing else is touched)."""
    found = [out / name for name in (CONFIG_FILE, LOG_FILE) if (out / name).exists()]
    found += sorted(p for p in out.glob("checkpoint*.tcstate*"))
    found += sorted(p for p in out.glob(f"{CONFIG_FILE}.*{outputs.TEMP_SUFFIX}"))
    found += sorted(p for p in out.iterdir() if p.is_dir() and re.fullmatch(r"layer_\d+", p.name))
    return found


def remove_run_files(out: Path) -> None:
    """Remove a previous run's files from ``out`` (its transcoder folders only when they hold nothing else)."""
    try:
        for path in run_files(out):
            if path.is_dir():
                for inner in path.iterdir():
                    if inner.name in ("config.json", "transcoder.safetensors") or inner.name.endswith(
                            outputs.TEMP_SUFFIX):
                        inner.unlink()
                with contextlib.suppress(OSError):
                    path.rmdir()
            else:
                path.unlink()
    except OSError as exc:
        raise outputs.write_error(getattr(exc, "filename", None) or out, exc) from None


def prepare_out(out: Path, resume: bool, force: bool = False, log: Any = lambda message: None) -> bool:
    """Make ``out`` ready (the caller holds its lock); True when a started run is there to continue.

    A run is resumable from any moment: ``train_config.json`` is written before anything else, so a run
    killed before its first checkpoint continues from step 0; --resume where nothing was started yet
    simply starts.
    """
    entries = [p for p in out.iterdir()]
    started = (out / CONFIG_FILE).is_file() or any(out.glob("checkpoint*.tcstate"))
    if resume:
        if started:
            return True
        if not entries:
            log(f"nothing to resume in {out} yet; starting the run")
            return False
        raise fail(f"--resume: {out} holds no tc train run (no {CONFIG_FILE}); choose another folder, or "
                   "--force to start a run there")
    if force:
        remove_run_files(out)
        return False
    if entries:
        raise fail(f"--out {out} already exists and is not empty; pass --resume to continue the run there, "
                   "--force to start it again, or choose another folder")
    return False


def make_out_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise fail(f"--out {out} is a file; tc train writes a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise outputs.write_error(out, exc) from None


def trim_log(out: Path, step: int) -> None:
    """Drop log lines written after ``step`` (the point a resumed run continues from), so every step is
    logged once."""
    path = out / LOG_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry_step = int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError, TypeError):
            continue  # a line cut short by a kill
        if entry_step <= step:
            kept.append(line)
    outputs.atomic_write_text(path, "".join(line + "\n" for line in kept))


def train(config: TrainConfig, cache: Any = None) -> dict[int, Transcoder]:
    """Run `tc train`; returns the trained transcoders by layer (also saved under ``config.out``).

    ``cache`` may be passed in (an open ActivationCache or an object with the same API); otherwise
    ``config.cache`` is opened. Under torchrun the ranks train together (see ``tccli.runtime.distributed``).
    """
    config.validate()
    allocator.keep_freed_memory()  # the step's buffers are reused instead of page-faulted every step
    with distributed.session(config.dist_timeout, config.device, config.distribute_layers) as dist, \
            contextlib.ExitStack() as held:  # holds the lock on --out for the whole run
        return _train(config, cache, dist, held)


def _log(config: TrainConfig) -> Any:
    if config.quiet:
        return lambda message: None
    return lambda message: print(f"tc train: {message}", file=sys.stderr)


def _open_out(config: TrainConfig, cache: Any, layers: list[int], held: contextlib.ExitStack) -> bool:
    """Rank 0: create and lock --out (``held`` keeps the lock), check what it holds, write the run's config
    first of all (so the run is resumable from here on); whether a started run is continued."""
    out = Path(config.out)
    make_out_folder(out)
    held.enter_context(outputs.locked(out))
    continuing = prepare_out(out, config.resume, config.force, _log(config))
    if continuing and (out / CONFIG_FILE).is_file():
        saved = _read_run_config(out / CONFIG_FILE)
        check_same_run(saved, config, int(cache.d_model), "the run in --out")
        saved_layers = check_cache(cache, config.cache, saved.get("layers", "all"))
        if saved_layers != layers:
            raise fail(f"--resume: --layers gives {layers} but the run in --out trains {saved_layers}")
    if not continuing:
        outputs.atomic_write_text(out / CONFIG_FILE, json.dumps(to_json_dict(config), indent=2))
    return continuing


def _train(config: TrainConfig, cache: Any, dist: distributed.Distributed,
           held: contextlib.ExitStack) -> dict[int, Transcoder]:
    from tccli.model.loading import resolve_device

    device = resolve_device(config.device)
    out = Path(config.out)
    owns_cache = cache is None
    if cache is None:
        cache = open_cache(config.cache)
    try:
        layers = check_cache(cache, config.cache, config.layers)
        schedule = ShuffleSchedule(cache.n_rows, cache.context, config.batch_size, config.shuffle_buffer,
                                   config.seed)
        distributed.check_batch_split(config.batch_size, dist)
        mine = distributed.own_layers(layers, dist)
        continuing = dist.from_main(lambda: _open_out(config, cache, layers, held))
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        stats = data_stats(cache, mine, config.kind)
        tc_configs = {layer: transcoder_config(config, cache, layer) for layer in layers}
        states = {}
        for layer in layers:  # every rank draws every layer's initial weights: a layer starts the same anywhere
            if layer in stats:
                states[layer] = new_layer_state(tc_configs[layer], stats[layer], config, generator, device)
            else:
                init_transcoder(tc_configs[layer], torch.zeros(tc_configs[layer].d_in),
                                torch.zeros(tc_configs[layer].d_out), generator)
        checkpoint = distributed.checkpoint_name(CHECKPOINT_FILE, dist)
        start_step = 0
        if continuing and (out / checkpoint).is_file():
            start_step = load_checkpoint(out, config, states, int(cache.d_model), checkpoint)
        elif continuing:
            _log(config)(f"{out} holds no checkpoint yet; continuing the run from step 0")
        if continuing and dist.world == 1:
            trim_log(out, start_step)
        d_model = int(cache.d_model)
        with torch_threads(step_threads(config.threads, d_model * config.n_features(d_model) * config.batch_size)):
            run_steps(config, cache, mine, schedule, states, start_step, out, device, dist,
                      saved_step=start_step if start_step else None)
    finally:
        if owns_cache:
            cache.close()
    for layer, state in states.items():
        finish_layer(state, stats[layer])
        tc_config = state.transcoder.config
        tokens = max(1, state.frequency_tokens)
        tc_config.feature_frequency = (state.fire_counts.double() / tokens).cpu().tolist()
        if dist.writes_run_files:
            save_transcoder(state.transcoder.to("cpu"), out / layer_folder_name(layer))
    dist.barrier()  # every rank's layers are saved before rank 0 reports the run done
    return {layer: state.transcoder for layer, state in states.items()}


def _read_run_config(path: Path) -> dict:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise fail(f"cannot read {path}: {exc}; start again with --force") from None
    if not isinstance(saved, dict):
        raise fail(f"{path} is not a tc train config; start again with --force")
    return saved


def step_threads(requested: int, multiply_adds: int) -> int:
    """--threads, or automatically 1 for a step whose encoder product is under 2^30 multiply-adds (measured on
    stories260K's 64 -> 1,024 at batch 1,024 under a load average of 9 on 2 cores: 52 ms per step with one
    thread, 296 ms with two), else torch's default."""
    if requested:
        return requested
    return 1 if multiply_adds < 2**30 else torch.get_num_threads()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_steps(config: TrainConfig, cache: Any, layers: list[int], schedule: ShuffleSchedule,
              states: dict[int, LayerState], start_step: int, out: Path, device: torch.device,
              dist: distributed.Distributed = distributed.SINGLE_PROCESS, saved_step: Optional[int] = None) -> None:
    """Train from ``start_step`` to the end, checkpointing on the way (``saved_step``: the step of the
    checkpoint already in ``out``, if any). Ctrl-C / SIGTERM stop it between two steps with a checkpoint
    of the step reached; a non-finite loss stops it saying which checkpoint, if any, is left."""
    total = config.total_steps
    frequency_from = total - max(1, total // 10)  # feature frequencies over the last tenth of training
    reporter = (Reporter(out, config.quiet or not dist.is_main, total, start_step) if dist.writes_run_files
                else distributed.SilentReporter())
    checkpoint = distributed.checkpoint_name(CHECKPOINT_FILE, dist)
    batch_size = config.batch_size // dist.data_world  # this rank's share of every batch
    base_lr = config.learning_rate_for(next(iter(states.values())).transcoder.config.n_features) if states else 0.0
    loader = WindowLoader(cache, layers, config.kind, cache.context, device, share=lambda order, window:
                          distributed.batch_share(order, window.n_steps, config.batch_size, dist))
    step = start_step

    def checkpoint_now() -> None:
        nonlocal saved_step
        if dist.writes_run_files:
            save_checkpoint(out, step, config, states, checkpoint)
        saved_step = step

    try:
        with interrupts.deferred():
            for window, data in loader.stream(schedule.windows(start_step)):
                for batch_index in range(step - window.first_step, window.n_steps):
                    if step >= total:
                        break
                    lr = learning_rate(step, total, base_lr, config.warmup_steps, config.decay_fraction)
                    rows = slice(batch_index * batch_size, (batch_index + 1) * batch_size)
                    for layer, state in states.items():
                        x, y = data[layer][0][rows], data[layer][1][rows]
                        metrics = train_one_step(state, x, y, config, step, lr, layer, step >= frequency_from, dist)
                        if (step + 1) % config.log_every == 0 or step + 1 == total:
                            reporter.record(dict(step=step + 1, layer=layer, lr=lr, **metrics()))
                    step += 1
                    reporter.step(step)
                    dist.step_done()
                    if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
                        checkpoint_now()
                    if dist.any(interrupts.pending() is not None) and step < total:
                        if saved_step != step:
                            checkpoint_now()
                        raise interrupts.take(f"stopped at step {step} of {total} with a checkpoint; resume "
                                              "with --resume")
                if step >= total:
                    break
    except NonFiniteLoss as exc:
        kept = (f"its last checkpoint (step {saved_step}) is kept in {out}" if saved_step is not None
                else "no checkpoint had been written")
        raise fail(f"{exc}; training stopped and {kept}. A resumed run would diverge the same way: start "
                   f"again with a lower --lr (--force reuses {out})") from None
    finally:
        loader.close()
        reporter.close()
    checkpoint_now()


class NonFiniteLoss(TcError):
    """The loss became NaN or infinite (run_steps says which checkpoint is left)."""


def train_one_step(state: LayerState, x: torch.Tensor, y: torch.Tensor, config: TrainConfig, step: int,
                   lr: float, layer: int, count_frequency: bool,
                   dist: distributed.Distributed = distributed.SINGLE_PROCESS):
    """One optimiser step for one layer; returns a function computing the step's metrics on demand.
    Data parallel: gradients are averaged and firing counts summed over the ranks (``dist``)."""
    transcoder = state.transcoder
    dead = state.steps_since_fired >= config.dead_window
    result = transcoder_loss(transcoder, x, y, dead, config, step, state.scales)
    if not bool(torch.isfinite(result.loss)):
        raise NonFiniteLoss(f"the loss became {float(result.loss.detach())} at step {step + 1} (layer {layer})")
    for group in state.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    state.optimizer.zero_grad(set_to_none=True)
    result.loss.backward()
    dist.average_gradients([p for p in transcoder.parameters() if p.requires_grad])
    constrained_step(transcoder, state.optimizer, unit_decoder=config.decoder_norm == "unit")
    if transcoder.config.activation == "jumprelu":
        clamp_min_(transcoder.threshold, state.optimizer, 0.0)
    with torch.no_grad():
        fires = dist.sum_counts(result.fires)
        state.steps_since_fired += 1
        state.steps_since_fired.masked_fill_(fires > 0, 0)  # a boolean index would sync with the GPU
        if count_frequency:
            state.fire_counts += fires
            state.frequency_tokens += x.shape[0] * dist.data_world

    def metrics() -> dict:
        with torch.no_grad():
            return dict(loss=float(result.loss), mse=float(result.mse), l1=float(result.l1), l0=float(result.l0),
                        fvu=float(fraction_of_variance_unexplained(result.output, y)), aux=float(result.aux),
                        dead_fraction=float((state.steps_since_fired >= config.dead_window).float().mean()))

    return metrics
