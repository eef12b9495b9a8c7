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

import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from tccli.config import from_json_dict, option, parse_count, parse_layers, to_json_dict
from tccli import distributed
from tccli.errors import fail
from tccli.transcoder import KINDS, Transcoder, TranscoderConfig
from tccli.transcoder_io import layer_folder_name, save_transcoder

# The kinds of transcoder.ACTIVATIONS that tc can train (the others are read from other libraries' files).
TRAINABLE_ACTIVATIONS = ("topk", "relu")
CHECKPOINT_FILE = "checkpoint.tcstate"  # not .pt: a set folder's .pt files are read as paper transcoders
LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "train_config.json"


# ----------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig(distributed.TrainDistributedOptions):
    """Options of `tc train`; saved into every trained transcoder's config.json as ``training``."""

    cache: Optional[str] = option(None, "Activation cache written by `tc cache` (HDF5).", required=True)
    out: Optional[str] = option(None, "Output folder: one transcoder folder per layer (layer_L), the JSONL "
                                "log and the checkpoint.", required=True)
    layers: str = option("all", "Layers to train, one transcoder each, from one read of the cache: "
                         "2, 0-4, 0,3 or all (every cached layer).")
    kind: str = option("transcoder", "transcoder (MLP input -> MLP output) or sae (MLP output -> MLP output, "
                       "the paper's baseline).")
    expansion: int = option(16, "Features per model dimension (m = expansion x d_model); ignored with "
                            "--features.")
    features: Optional[int] = option(None, "Number of features m (overrides --expansion).")
    activation: str = option("topk", "topk (keep the k largest pre-activations) or relu (the paper's, "
                             "sparsity from the L1 penalty).")
    k: int = option(16, "Active features per token for --activation topk.")
    l1: float = option(1e-3, "L1 coefficient lambda for --activation relu (loss + lambda * sum |z|).")
    l1_warmup: int = option(0, "Steps over which the L1 coefficient ramps linearly from 0 (0: none, the paper).")
    normalize_mse: bool = option(False, "Divide each token's squared error by the norm of its target "
                                 "(the reference code's normalisation).")
    lr: float = option(1e-3, "Adam learning rate.")
    warmup_steps: int = option(100, "Steps of linear learning-rate warm-up from 0.")
    lr_decay: float = option(0.3, "Fraction of the run, at its end, over which the learning rate decays "
                             "linearly to 0 (0: constant after warm-up, the paper).")
    batch_size: int = option(4096, "Tokens per step.", parser=parse_count)
    tokens: int = option(12_000_000, "Training tokens (accepts 200k, 12M); the cache is read again, "
                         "reshuffled, as often as needed.", parser=parse_count)
    shuffle_buffer: int = option(262_144, "Tokens held in the shuffle buffer: each batch is drawn from this "
                                 "many tokens of randomly chosen rows (bounds memory).", parser=parse_count)
    dead_window: int = option(500, "A feature is dead after this many steps without firing.")
    ghost_grads: bool = option(True, "relu: train dead features on the residual target - output with "
                               "ghost gradients.", flags=("--ghost-grads/--no-ghost-grads",))
    aux_k: int = option(256, "topk: dead features used by the auxiliary loss (AuxK) that revives them; 0: off.")
    aux_coef: float = option(1 / 32, "topk: weight of the AuxK loss.")
    seed: int = option(0, "Seed for the initial weights and the shuffle order.")
    device: str = option("cpu", "Device: cpu, cuda, cuda:N or auto.")
    checkpoint_every: int = option(500, "Steps between checkpoints (0: only at the end).")
    log_every: int = option(50, "Steps between metric lines (stderr and the JSONL log).")
    resume: bool = option(False, "Continue the run in --out from its checkpoint.", save=False)
    quiet: bool = option(False, "No progress on stderr.", save=False)

    def validate(self) -> None:
        def finite_positive(name: str, value: float) -> None:
            if not (math.isfinite(value) and value > 0):
                raise fail(f"--{name} must be a finite number > 0, got {value}")

        finite_positive("lr", self.lr)
        distributed.DistributedOptions.validate(self)
        if self.activation not in TRAINABLE_ACTIVATIONS:
            raise fail(f"--activation must be one of {', '.join(TRAINABLE_ACTIVATIONS)}, got {self.activation!r}")
        if self.kind not in KINDS:
            raise fail(f"--kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.expansion < 1:
            raise fail(f"--expansion must be at least 1, got {self.expansion}")
        if self.features is not None and self.features < 1:
            raise fail(f"--features must be at least 1, got {self.features}")
        if self.activation == "topk" and self.k < 1:
            raise fail(f"--k must be at least 1, got {self.k}")
        if not (math.isfinite(self.l1) and self.l1 >= 0):
            raise fail(f"--l1 must be a finite number >= 0, got {self.l1}")
        if not (math.isfinite(self.aux_coef) and self.aux_coef >= 0):
            raise fail(f"--aux-coef must be a finite number >= 0, got {self.aux_coef}")
        if not 0 <= self.lr_decay <= 1:
            raise fail(f"--lr-decay is a fraction of the run, between 0 and 1, got {self.lr_decay}")
        for name in ("warmup_steps", "l1_warmup", "aux_k", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "dead_window", "log_every"):
            if getattr(self, name) < 1:
                raise fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.tokens < self.batch_size:
            raise fail(f"--tokens {self.tokens} is less than one batch of {self.batch_size}")

    @property
    def total_steps(self) -> int:
        return self.tokens // self.batch_size

    def n_features(self, d_model: int) -> int:
        return self.features if self.features is not None else self.expansion * d_model


# Fields that may differ between a run and its resumption without changing the result.
RESUME_FREE_FIELDS = ("device", "checkpoint_every", "log_every", "resume", "quiet", "out", "cache")


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


def calibrate_encoder_(transcoder: Transcoder, x: torch.Tensor, y: torch.Tensor, ratio: float = 0.5) -> None:
    """Scale the encoder so that the initial outputs' spread around ``b_dec`` is ``ratio`` times the
    targets' spread. With ``b_enc`` = 0 the output minus ``b_dec`` is proportional to the encoder
    scale (ReLU and TopK are positively homogeneous), so one measurement fixes it exactly. Without this
    a tied initialisation on unnormalised activations starts with outputs several times too large and
    spends its first hundreds of steps shrinking them."""
    with torch.no_grad():
        output, _ = transcoder(x)
        produced = spread(output, transcoder.b_dec)
        if produced > 0:
            transcoder.W_enc.mul_(ratio * spread(y, y.mean(dim=0)) / produced)


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


def topk_encode(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [n, k] after ReLU, indices [n, k]) of the k largest pre-activations per token."""
    top = pre.topk(min(k, pre.shape[-1]), dim=-1, sorted=False)
    return torch.relu(top.values), top.indices


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """sum_j values[:, j] W_dec[indices[:, j]] + b_dec: the decoder applied to a TopK code without
    building the dense [n, m] activation matrix. embedding_bag sums the rows in one fused kernel;
    gathering W_dec[indices] first would copy an [n, k, d] tensor (6x slower at GPT-2 sizes)."""
    return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum") + b_dec


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


def auxk_loss(pre: torch.Tensor, target: torch.Tensor, output: torch.Tensor, W_dec: torch.Tensor,
              dead: torch.Tensor, aux_k: int) -> torch.Tensor:
    """AuxK (Gao et al. 2024): the top ``aux_k`` dead features reconstruct the residual ``target - output``;
    the loss is normalised by the residual's variance so its scale does not depend on the layer.

    The dead features' pre-activations are used as they are, without the ReLU: a feature is usually dead
    because its pre-activation has gone negative on every token, and through a ReLU it would get no
    gradient at all (measured here: the AuxK loss then stays at 1.0 and 10% of features stay dead).
    """
    n_dead = int(dead.sum())
    if n_dead == 0 or aux_k == 0:
        return pre.new_zeros(())
    residual = (target - output).detach()
    dead_pre = pre[:, dead]
    top = dead_pre.topk(min(aux_k, n_dead), dim=-1, sorted=False)
    values, indices = top.values, top.indices
    aux_out = sparse_decode(values, indices, W_dec[dead], torch.zeros_like(W_dec[0]))
    variance = (residual - residual.mean(dim=0)).pow(2).sum(dim=-1).mean().clamp_min(1e-12)
    return (aux_out - residual).pow(2).sum(dim=-1).mean() / variance


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
    fired: torch.Tensor  # [m] bool: features active on at least one token of the batch
    output: torch.Tensor
    l1: torch.Tensor  # mean over tokens of sum |z|
    l0: torch.Tensor  # mean over tokens of the number of active features
    aux: torch.Tensor
    fires: torch.Tensor  # [m] number of tokens each feature fired on


def transcoder_loss(transcoder: Transcoder, x: torch.Tensor, y: torch.Tensor, dead: torch.Tensor,
                    config: TrainConfig, step: int) -> StepResult:
    """The training loss of one batch: reconstruction + (L1 and ghost grads | AuxK)."""
    pre = transcoder.pre_activation(x)
    if transcoder.config.activation == "topk":
        values, indices = topk_encode(pre, transcoder.config.k)
        output = sparse_decode(values, indices, transcoder.W_dec, transcoder.b_dec)
        active = values > 0
        fires = torch.zeros(pre.shape[-1], dtype=torch.long, device=pre.device)
        fires.index_add_(0, indices[active], torch.ones_like(indices[active]))
        l1 = values.sum(dim=-1).mean()
        l0 = active.sum(dim=-1).float().mean()
    else:
        z = torch.relu(pre)
        output = z @ transcoder.W_dec + transcoder.b_dec
        active = z > 0
        fires = active.sum(dim=0)
        l1 = z.sum(dim=-1).mean()
        l0 = active.sum(dim=-1).float().mean()
    mse = reconstruction_loss(output, y, config.normalize_mse)
    loss = mse
    if transcoder.config.activation == "topk":
        aux = auxk_loss(pre, y, output, transcoder.W_dec, dead, config.aux_k) if config.aux_k else mse.new_zeros(())
        loss = loss + config.aux_coef * aux
    else:
        loss = loss + l1_coefficient(step, config.l1, config.l1_warmup) * l1
        aux = ghost_grad_loss(pre, y, output, transcoder.W_dec, dead, mse) if config.ghost_grads else mse.new_zeros(())
        loss = loss + aux
    return StepResult(loss, mse, fires > 0, output, l1, l0, aux, fires)


def constrained_step(transcoder: Transcoder, optimizer: torch.optim.Optimizer) -> None:
    """Remove the decoder gradient parallel to each row, step, and renormalise the rows."""
    with torch.no_grad():
        if transcoder.W_dec.grad is not None:
            transcoder.W_dec.grad.copy_(remove_parallel_gradient(transcoder.W_dec, transcoder.W_dec.grad))
    optimizer.step()
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
    """Reads windows from a cache (``tccli.cache.ActivationCache`` or anything with its ``read``) and
    returns, per layer, the window's inputs and targets already in shuffled order; the next window is
    read in a background thread while the current one trains."""

    def __init__(self, cache: Any, layers: list[int], kind: str, context: int, device: torch.device,
                 share: Optional[Any] = None):
        self.cache, self.layers, self.kind, self.context, self.device = cache, layers, kind, context, device
        self.share = share  # (token order, window) -> the positions this rank trains on (data parallel)
        self._pool = ThreadPoolExecutor(max_workers=1)

    def load(self, window: Window) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        order = None
        out = {}
        for layer in self.layers:
            parts = {which: np.concatenate([self.cache.read(layer, which, a * self.context, b * self.context)
                                            for a, b in window.row_ranges])
                     for which in (("mlp_out",) if self.kind == "sae" else ("mlp_in", "mlp_out"))}
            if order is None:
                order = window.token_order(len(parts["mlp_out"]))
                if self.share is not None:
                    order = self.share(order, window)
            target = torch.from_numpy(np.ascontiguousarray(parts["mlp_out"][order], dtype=np.float32))
            source = target if self.kind == "sae" else torch.from_numpy(
                np.ascontiguousarray(parts["mlp_in"][order], dtype=np.float32))
            out[layer] = (source.to(self.device), target.to(self.device))
        return out

    def stream(self, windows: Iterator[Window]) -> Iterator[tuple[Window, dict]]:
        """(window, data) pairs, prefetching one window ahead."""
        current = next(windows)
        pending = self._pool.submit(self.load, current)
        for upcoming in windows:
            data = pending.result()
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


def data_stats(cache: Any, layers: list[int], kind: str, max_tokens: int = 262_144,
               sample_tokens: int = 8192) -> dict[int, DataStats]:
    """Per layer: the means of inputs and targets (computed in float64) over the first ``max_tokens``
    cached tokens, and a sample of them for ``calibrate_encoder_``."""
    stop = min(cache.n_tokens, max_tokens)
    out = {}
    for layer in layers:
        target = torch.from_numpy(cache.read(layer, "mlp_out", 0, stop)).double()
        source = target if kind == "sae" else torch.from_numpy(cache.read(layer, "mlp_in", 0, stop)).double()
        if not bool(torch.isfinite(target).all() and torch.isfinite(source).all()):
            raise fail(f"the cache holds non-finite activations in layer {layer}")
        out[layer] = DataStats(source.mean(dim=0).float(), target.mean(dim=0).float(),
                               source[:sample_tokens].float(), target[:sample_tokens].float())
    return out


# ----------------------------------------------------------------------------- the run


@dataclass
class LayerState:
    transcoder: Transcoder
    optimizer: torch.optim.Adam
    steps_since_fired: torch.Tensor  # [m] long
    fire_counts: torch.Tensor  # [m] long: tokens fired on during the frequency window
    frequency_tokens: int = 0


def open_cache(path: str) -> Any:
    from tccli.cache import ActivationCache

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
    info = cache.model_info
    hooks = info["layers"][layer]
    d_model = int(cache.d_model)
    return TranscoderConfig(
        d_in=d_model, d_out=d_model, n_features=config.n_features(d_model), activation=config.activation,
        k=config.k if config.activation == "topk" else None, kind=config.kind, layer=layer,
        input_space="mlp_out" if config.kind == "sae" else "normalized", output_space="mlp_out",
        model_name=info.get("name"), model_architecture=info.get("architecture"),
        weight_processing=dict(info.get("weight_processing") or {}),
        input_hook=hooks["mlp_out"] if config.kind == "sae" else hooks["mlp_in"], output_hook=hooks["mlp_out"],
        training=to_json_dict(config),
    )


def new_layer_state(tc_config: TranscoderConfig, stats: DataStats, config: TrainConfig,
                    generator: torch.Generator, device: torch.device) -> LayerState:
    transcoder = init_transcoder(tc_config, stats.input_mean, stats.target_mean, generator)
    calibrate_encoder_(transcoder, stats.input_sample, stats.target_sample)
    transcoder = transcoder.to(device)
    optimizer = torch.optim.Adam(transcoder.parameters(), lr=config.lr)
    m = tc_config.n_features
    return LayerState(transcoder, optimizer, torch.zeros(m, dtype=torch.long, device=device),
                      torch.zeros(m, dtype=torch.long, device=device))


def save_checkpoint(out: Path, step: int, config: TrainConfig, states: dict[int, LayerState],
                    name: str = CHECKPOINT_FILE) -> None:
    payload = {
        "step": step,
        "config": to_json_dict(config),
        "layers": {layer: {"transcoder": s.transcoder.state_dict(), "optimizer": s.optimizer.state_dict(),
                           "steps_since_fired": s.steps_since_fired, "fire_counts": s.fire_counts,
                           "frequency_tokens": s.frequency_tokens}
                   for layer, s in states.items()},
        "torch_rng": torch.get_rng_state(),
    }
    tmp = out / (name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, out / name)


def load_checkpoint(out: Path, config: TrainConfig, states: dict[int, LayerState],
                    name: str = CHECKPOINT_FILE) -> int:
    path = out / name
    if not path.is_file():
        raise fail(f"--resume: {out} holds no {name} to continue from")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise fail(f"cannot read checkpoint {path}: {exc}") from None
    saved = from_json_dict(TrainConfig, payload["config"])
    for name, value in to_json_dict(config).items():
        if name not in RESUME_FREE_FIELDS and getattr(saved, name) != value:
            raise fail(f"--resume: --{name.replace('_', '-')} is {value!r} but the checkpointed run used "
                       f"{getattr(saved, name)!r}")
    if sorted(payload["layers"]) != sorted(states):
        raise fail(f"--resume: the checkpoint holds layers {sorted(payload['layers'])}, not {sorted(states)}")
    for layer, state in states.items():
        saved_layer = payload["layers"][layer]
        state.transcoder.load_state_dict(saved_layer["transcoder"])
        state.optimizer.load_state_dict(saved_layer["optimizer"])
        device = state.steps_since_fired.device
        state.steps_since_fired = saved_layer["steps_since_fired"].to(device)
        state.fire_counts = saved_layer["fire_counts"].to(device)
        state.frequency_tokens = int(saved_layer["frequency_tokens"])
    torch.set_rng_state(payload["torch_rng"])
    return int(payload["step"])


class Reporter:
    """Metric lines on stderr (when it is a terminal and not --quiet) and in the JSONL log."""

    def __init__(self, out: Path, quiet: bool, total_steps: int):
        self.log = open(out / LOG_FILE, "a")
        self.total_steps = total_steps
        self.console = None
        if not quiet and sys.stderr.isatty():
            from rich.console import Console

            self.console = Console(stderr=True, highlight=False)
        self.started = time.time()

    def record(self, entry: dict) -> None:
        self.log.write(json.dumps(entry) + "\n")
        self.log.flush()
        if self.console is not None:
            m = entry
            self.console.print(
                f"step {m['step']}/{self.total_steps} layer {m['layer']} lr {m['lr']:.2e} loss {m['loss']:.4g} "
                f"mse {m['mse']:.4g} L1 {m['l1']:.3g} L0 {m['l0']:.1f} FVU {m['fvu']:.4f} "
                f"dead {m['dead_fraction']:.3f} ({time.time() - self.started:.0f}s)")

    def close(self) -> None:
        self.log.close()


def prepare_out(out: Path, resume: bool) -> None:
    if resume:
        if not out.is_dir():
            raise fail(f"--resume: {out} does not exist")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise fail(f"--out {out} already exists and is not empty; pass --resume to continue the run there "
                   f"or choose another folder")
    out.mkdir(parents=True, exist_ok=True)


def train(config: TrainConfig, cache: Any = None) -> dict[int, Transcoder]:
    """Run `tc train`; returns the trained transcoders by layer (also saved under ``config.out``).

    ``cache`` may be passed in (an open ActivationCache or an object with the same API); otherwise
    ``config.cache`` is opened. Under torchrun the ranks train together (see ``tccli.distributed``).
    """
    config.validate()
    with distributed.session(config.dist_timeout, config.device, config.distribute_layers) as dist:
        return _train(config, cache, dist)


def _train(config: TrainConfig, cache: Any, dist: distributed.Distributed) -> dict[int, Transcoder]:
    from tccli.models import resolve_device

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
        dist.from_main(lambda: prepare_out(out, config.resume))
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
        start_step = load_checkpoint(out, config, states, checkpoint) if config.resume else 0
        if not config.resume and dist.is_main:
            (out / CONFIG_FILE).write_text(json.dumps(to_json_dict(config), indent=2))
        run_steps(config, cache, mine, schedule, states, start_step, out, device, dist)
    finally:
        if owns_cache:
            cache.close()
    for layer, state in states.items():
        tc_config = state.transcoder.config
        tokens = max(1, state.frequency_tokens)
        tc_config.feature_frequency = (state.fire_counts.double() / tokens).cpu().tolist()
        if dist.writes_run_files:
            save_transcoder(state.transcoder.to("cpu"), out / layer_folder_name(layer))
    dist.barrier()  # every rank's layers are saved before rank 0 reports the run done
    return {layer: state.transcoder for layer, state in states.items()}


def run_steps(config: TrainConfig, cache: Any, layers: list[int], schedule: ShuffleSchedule,
              states: dict[int, LayerState], start_step: int, out: Path, device: torch.device,
              dist: distributed.Distributed = distributed.SINGLE_PROCESS) -> None:
    total = config.total_steps
    frequency_from = total - max(1, total // 10)  # feature frequencies over the last tenth of training
    reporter = Reporter(out, config.quiet, total) if dist.writes_run_files else distributed.SilentReporter()
    checkpoint = distributed.checkpoint_name(CHECKPOINT_FILE, dist)
    batch_size = config.batch_size // dist.data_world  # this rank's share of every batch
    loader = WindowLoader(cache, layers, config.kind, cache.context, device, share=lambda order, window:
                          distributed.batch_share(order, window.n_steps, config.batch_size, dist))
    step = start_step
    try:
        for window, data in loader.stream(schedule.windows(start_step)):
            for batch_index in range(step - window.first_step, window.n_steps):
                if step >= total:
                    break
                lr = learning_rate(step, total, config.lr, config.warmup_steps, config.lr_decay)
                rows = slice(batch_index * batch_size, (batch_index + 1) * batch_size)
                for layer, state in states.items():
                    x, y = data[layer][0][rows], data[layer][1][rows]
                    metrics = train_one_step(state, x, y, config, step, lr, layer, step >= frequency_from, dist)
                    if (step + 1) % config.log_every == 0 or step + 1 == total:
                        reporter.record(dict(step=step + 1, layer=layer, lr=lr, **metrics()))
                step += 1
                dist.step_done()
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
                    if dist.writes_run_files:
                        save_checkpoint(out, step, config, states, checkpoint)
            if step >= total:
                break
    finally:
        loader.close()
        reporter.close()
    if dist.writes_run_files:
        save_checkpoint(out, step, config, states, checkpoint)


def train_one_step(state: LayerState, x: torch.Tensor, y: torch.Tensor, config: TrainConfig, step: int,
                   lr: float, layer: int, count_frequency: bool,
                   dist: distributed.Distributed = distributed.SINGLE_PROCESS):
    """One optimiser step for one layer; returns a function computing the step's metrics on demand.
    Data parallel: gradients are averaged and firing counts summed over the ranks (``dist``)."""
    transcoder = state.transcoder
    dead = state.steps_since_fired >= config.dead_window
    result = transcoder_loss(transcoder, x, y, dead, config, step)
    if not bool(torch.isfinite(result.loss)):
        raise fail(f"the loss became {float(result.loss)} at step {step + 1} (layer {layer}); stopped, the last "
                   f"good checkpoint is kept in {config.out}. Try a lower --lr.")
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    state.optimizer.zero_grad(set_to_none=True)
    result.loss.backward()
    dist.average_gradients(list(transcoder.parameters()))
    constrained_step(transcoder, state.optimizer)
    with torch.no_grad():
        fires = dist.sum_counts(result.fires)
        state.steps_since_fired += 1
        state.steps_since_fired[fires > 0] = 0
        if count_frequency:
            state.fire_counts += fires
            state.frequency_tokens += x.shape[0] * dist.data_world

    def metrics() -> dict:
        with torch.no_grad():
            return dict(loss=float(result.loss), mse=float(result.mse), l1=float(result.l1), l0=float(result.l0),
                        fvu=float(fraction_of_variance_unexplained(result.output, y)), aux=float(result.aux),
                        dead_fraction=float((state.steps_since_fired >= config.dead_window).float().mean()))

    return metrics
