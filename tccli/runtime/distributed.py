"""Running `tc cache` and `tc train` on several processes, launched by torchrun (issue 7).

    torchrun --nproc-per-node N -m tccli cache ...     sharded caching
    torchrun --nproc-per-node N -m tccli train ...     data-parallel (or, with --distribute-layers,
                                                      layer-parallel) training

A process is one rank of a distributed run when torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``) says the world has more than one process; otherwise everything here is a no-op and the
commands run exactly as in a single process. The process group uses ``nccl`` when the command runs on
CUDA (each rank on ``cuda:LOCAL_RANK``) and ``gloo`` otherwise. Every collective goes through
``Distributed``, which turns any failure of one (a peer that closed its connection because it died, or
no answer within ``--dist-timeout`` seconds because it stalled) into one ``tc: error:`` line, so a dead
rank makes the others exit instead of hang. Only rank 0 writes data on stdout.

Sharded caching. The packed rows are cut into batches of ``--batch-size`` rows (as a single process would
run them); rank r of N takes the contiguous batches ``[r * n_batches // N, (r + 1) * n_batches // N)``
and writes them, with the crash-safe machinery of `tc cache`, to its shard ``OUT.rank{r}-of-{N}.h5``
(same stem and suffix as ``OUT``). Each batch is the same batch a single process would run, so the
stored numbers are the same. When every shard is complete, rank 0 writes ``OUT``: the same root
attributes as a single-process cache (plus ``shards``, the shard files and their rows), and every dataset
an HDF5 virtual dataset over the shards in rank order, i.e. exactly the single-process row order.
Shard files are named relative to ``OUT``'s folder, so the folder can be moved as a whole. ``--resume``
resumes each shard separately. The ranks step together (one tiny all-reduce per batch, a heartbeat),
so a rank that dies is noticed by the others within ``--dist-timeout``. (That code, the shards and the
joined file, is in ``tccli/data/cache_shards.py``, which imports this module; this module imports no part of
tc's I/O.)

Data-parallel training. ``--batch-size`` stays the global batch (tokens per optimiser step, all ranks
together); it must divide by N. Every rank follows the same shuffle schedule and keeps, of every batch,
its 1/N slice (positions ``[r * B/N, (r + 1) * B/N)``), so N ranks together see exactly the batches one
process sees. After the backward pass the gradients (and the loss) are averaged across ranks in one
all-reduce, and the per-feature firing counts that decide dead features and measure feature frequency
are summed, so every rank keeps identical weights and dead-feature state. Rank 0 writes the log, the
checkpoints and the transcoders. With ``--distribute-layers`` each rank instead trains whole layers on
whole batches: layer ``layers[i]`` goes to rank ``i % N``; each rank writes its layers' folders, log lines
and its own checkpoint ``checkpoint.rank{r}-of-{N}.tcstate``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from tccli.config.runtime import DEFAULT_TIMEOUT
from tccli.errors import TcError, fail

# ============================================================================ the process group


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise fail("RANK, WORLD_SIZE and LOCAL_RANK must be integers (they are set by torchrun)") from None
    return rank, world, local_rank


def launched() -> bool:
    """True in a process started by torchrun with more than one process in the world."""
    return world_from_env()[1] > 1


@dataclass
class Distributed:
    """This process's place in the run, and the collectives tc uses (identities in a single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    timeout: float = DEFAULT_TIMEOUT
    device: Optional[torch.device] = None  # where collective tensors live (cuda for nccl)
    distribute_layers: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_world(self) -> int:
        """Ranks that split each batch: all of them in data-parallel training, none in layer-parallel."""
        return 1 if self.distribute_layers else self.world

    @property
    def writes_run_files(self) -> bool:
        """Whether this rank writes logs, checkpoints and transcoders."""
        return self.is_main or self.distribute_layers

    def _collective(self, what: str, run: Callable[[], Any]) -> Any:
        try:
            return run()
        except (RuntimeError, TimeoutError, ConnectionError, ValueError) as exc:  # gloo/nccl/store: long texts
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
            raise fail(
                f"rank {self.rank} of {self.world}: {what} failed, another rank died or stalled (no "
                f"answer within --dist-timeout {self.timeout:g} s, or its connection closed): {detail}"
            ) from None

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``tensor`` over all ranks (a new tensor; ``tensor`` is left alone)."""
        if self.world == 1:
            return tensor
        import torch.distributed as dist

        buffer = tensor.detach().clone().to(self.device)
        self._collective("all-reduce", lambda: dist.all_reduce(buffer))
        return buffer.to(tensor.device)

    def vote(self, flag: bool) -> int:
        """How many ranks voted True (every rank must call this the same number of times)."""
        if self.world == 1:
            return int(flag)
        return int(self.all_reduce_sum(torch.tensor([int(flag)], dtype=torch.int64)).item())

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (every rank must call this at the same points)."""
        return self.vote(flag) > 0 if self.world > 1 else flag

    def barrier(self) -> None:
        if self.world > 1:
            self.vote(True)

    def step_done(self) -> None:
        """Layer-parallel ranks share no gradients; this heartbeat keeps them in step, so a rank that
        dies is noticed within --dist-timeout and none waits long at the end."""
        if self.distribute_layers and self.world > 1:
            self.vote(True)

    def from_main(self, action: Callable[[], Any]) -> Any:
        """Run ``action`` on rank 0 only and share its result (or its TcError) with every rank."""
        if self.world == 1:
            return action()
        import torch.distributed as dist

        box: list = [None]
        if self.is_main:
            try:
                box[0] = ("ok", action())
            except TcError as exc:
                box[0] = ("error", str(exc))
        self._collective("broadcast", lambda: dist.broadcast_object_list(box, src=0))
        status, value = box[0]
        if status == "error":
            raise TcError(value)
        return value

    def average_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Average every parameter's gradient over the ranks that split the batch, in one all-reduce. Each
        rank's loss is a mean over its B/N tokens, so the average is the gradient of the whole batch."""
        if self.data_world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = self.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / self.data_world
        offset = 0
        for p, g in zip(parameters, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
            offset += g.numel()

    def sum_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Per-feature counts summed over the ranks that split the batch."""
        return counts if self.data_world == 1 else self.all_reduce_sum(counts)


SINGLE_PROCESS = Distributed()


def _collective_device(device: str) -> tuple[str, Optional[torch.device]]:
    """(backend, device for collective tensors); under CUDA each rank uses cuda:LOCAL_RANK."""
    if device.startswith("cuda:"):
        raise fail(f"--device {device}: under torchrun use --device cuda (or auto); rank r runs on cuda:LOCAL_RANK")
    if device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(world_from_env()[2])
        return "nccl", torch.device("cuda", torch.cuda.current_device())
    return "gloo", torch.device("cpu")  # --device cuda without a GPU fails later, with the usual message


@contextlib.contextmanager
def session(timeout: float, device: str, distribute_layers: bool = False) -> Iterator[Distributed]:
    """The process group for one command: joined on entry, left on exit; a single process yields
    ``Distributed()`` without touching torch.distributed."""
    rank, world, local_rank = world_from_env()
    if world <= 1:
        yield dataclasses.replace(SINGLE_PROCESS, distribute_layers=distribute_layers)
        return
    import torch.distributed as dist

    backend, collective_device = _collective_device(device)
    context = Distributed(rank, world, local_rank, timeout, collective_device, distribute_layers)
    if not dist.is_available():
        raise fail("this torch build has no torch.distributed; run without torchrun")
    owns_group = not dist.is_initialized()
    if backend == "nccl":  # a timed-out NCCL collective then raises here (caught below) instead of aborting
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    if owns_group:
        context._collective(
            f"joining the process group ({backend})",
            lambda: dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout)),
        )
    if rank != 0:  # stdout carries data: one copy, from rank 0
        sys.stdout = open(os.devnull, "w")
    failed = False
    try:
        yield context
    except BaseException:
        failed = True
        raise
    finally:
        # after a failed collective the group may be unusable; leaving it is the process's exit
        if owns_group and not failed:
            # all ranks leave together: a rank tearing gloo down while another still works or is
            # mid-collective can abort that other rank ("terminate called without an active exception")
            context.barrier()
            dist.destroy_process_group()


# ============================================================================ layer-parallel training


def own_layers(layers: list[int], context: Distributed) -> list[int]:
    """The layers this rank trains: all of them, or with --distribute-layers layers[i] for i % N == rank."""
    if not context.distribute_layers or context.world == 1:
        return list(layers)
    if len(layers) < context.world:
        raise fail(
            f"--distribute-layers: {len(layers)} layer(s) to train but {context.world} ranks; give "
            f"every rank at least one layer (fewer processes, or data parallel without the flag)"
        )
    return [layer for i, layer in enumerate(layers) if i % context.world == context.rank]


def checkpoint_name(default: str, context: Distributed) -> str:
    """One checkpoint for data-parallel runs (rank 0's), one per rank for layer-parallel runs."""
    if context.distribute_layers and context.world > 1:
        stem, dot, suffix = default.partition(".")
        return f"{stem}.rank{context.rank}-of-{context.world}{dot}{suffix}"
    return default


def check_batch_split(batch_size: int, context: Distributed) -> None:
    if batch_size % context.data_world:
        raise fail(
            f"--batch-size {batch_size} does not divide among {context.data_world} ranks; "
            f"use a multiple of {context.data_world}"
        )


def batch_share(order: np.ndarray, n_steps: int, batch_size: int, context: Distributed) -> np.ndarray:
    """Of a window's token order, the positions this rank trains on: its slice of every batch, batch
    after batch (so batch b of this rank is rows [b * B/N, (b + 1) * B/N) of the result)."""
    if context.data_world == 1:
        return order
    local = batch_size // context.data_world
    positions = np.arange(n_steps)[:, None] * batch_size + context.rank * local + np.arange(local)[None, :]
    return order[positions.reshape(-1)]


class SilentReporter:
    """Stands in for train's Reporter on ranks that do not write the log."""

    def record(self, entry: dict) -> None:
        pass

    def step(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


# ============================================================================ sharded caching


def shard_path(out: Path, rank: int, world: int) -> Path:
    """acts.h5 -> acts.rank0-of-2.h5"""
    return out.with_name(f"{out.stem}.rank{rank}-of-{world}{out.suffix}")


def shard_rows(n_rows: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) rows of rank ``rank``: a contiguous run of whole batches."""
    n_batches = -(-n_rows // batch_size)
    if n_batches < world:
        raise fail(
            f"{n_rows} rows make only {n_batches} batch(es) of --batch-size {batch_size}, too few to "
            f"share among {world} ranks: use a smaller --batch-size, more --tokens or fewer processes"
        )
    first, last = rank * n_batches // world, (rank + 1) * n_batches // world
    return first * batch_size, min(n_rows, last * batch_size)


@dataclass
class Shard:
    """What `tccli.data.cache_writer.write_cache` needs to write one rank's shard."""

    rank: int
    world: int
    heartbeat: Callable[[], None] = lambda: None  # called after every batch

    def select(self, rows: Any, batch_size: int) -> tuple[Any, dict]:
        """This rank's rows of the packed ``rows`` and the attributes that mark the file as a shard."""
        start, stop = shard_rows(rows.tokens.shape[0], batch_size, self.rank, self.world)
        selected = dataclasses.replace(rows, tokens=rows.tokens[start:stop], doc_ids=rows.doc_ids[start:stop])
        attrs = {
            "shard_rank": self.rank,
            "shard_count": self.world,
            "shard_first_row": start,
            "total_rows": rows.tokens.shape[0],
        }
        return selected, attrs
