"""The data `tc train` trains on, from the HDF5 activation cache (``tccli.data.cache_reader``): opening it and
checking it holds the layers asked for, the per-layer statistics the initialisation needs, and the
deterministic shuffle buffer over it (``ShuffleSchedule`` decides from the seed alone which rows go into
which window and in what token order; ``WindowLoader`` reads the windows, one ahead of the steps, and
shuffles them on the device).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from tccli.config.fields import parse_layers
from tccli.errors import fail

# ----------------------------------------------------------------------------- the cache


def open_cache(path: str) -> Any:
    from tccli.data.cache_reader import ActivationCache

    return ActivationCache.open(path)


def check_cache(cache: Any, path: str, layer_spec: str) -> list[int]:
    """The layers to train, after checking the cache is complete, not empty and holds them."""
    if not cache.complete:
        raise fail(
            f"cache {path} is incomplete (its writer stopped before the end); finish or rebuild it "
            f"with tc cache before training"
        )
    if cache.n_tokens == 0:
        raise fail(f"cache {path} holds no tokens")
    n_layers = int(cache.model_info.get("n_layers", max(cache.layers) + 1))
    layers = sorted(cache.layers) if str(layer_spec).strip().lower() == "all" else parse_layers(layer_spec, n_layers)
    missing = [layer for layer in layers if layer not in cache.layers]
    if missing:
        raise fail(f"cache {path} holds layers {sorted(cache.layers)}, not layer {missing[0]}")
    return layers


@dataclass
class DataStats:
    input_mean: torch.Tensor
    target_mean: torch.Tensor
    input_sample: torch.Tensor  # the first few thousand cached tokens, to calibrate the initial encoder
    target_sample: torch.Tensor
    target_variance: float = 1.0  # mean over tokens of ||y - mean y||^2


def data_stats(
    cache: Any, layers: list[int], kind: str, max_tokens: int = 262_144, sample_tokens: int = 8192
) -> dict[int, DataStats]:
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
        out[layer] = DataStats(
            source.mean(dim=0).float(),
            target_mean.float(),
            source[:sample_tokens].float(),
            target[:sample_tokens].float(),
            max(variance, 1e-12),
        )
    return out


# ----------------------------------------------------------------------------- the shuffled stream


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
                chunks = sorted(int(c) for c in order[first : first + self.window_chunks])
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
    """Reads windows from a cache (``tccli.data.cache_reader.ActivationCache`` or anything with its ``read``) and
    returns, per layer, the window's inputs and targets already in shuffled order; the next window is
    read in a background thread while the current one trains.

    The window travels to the device unshuffled and is shuffled there (a gather). On a GPU it is read
    into pinned host memory and copied on a stream of its own, so the copy overlaps the steps running on
    the compute stream, which waits for the copy (an event) only when it reaches the window; the gather
    runs on the GPU too, rather than as a random-access copy by this one host thread (on an H200 that
    copy took longer than the steps it fed)."""

    def __init__(
        self, cache: Any, layers: list[int], kind: str, context: int, device: torch.device, share: Optional[Any] = None
    ):
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
            parts = {
                which: self._read(layer, which, window)
                for which in (("mlp_out",) if self.kind == "sae" else ("mlp_in", "mlp_out"))
            }
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
