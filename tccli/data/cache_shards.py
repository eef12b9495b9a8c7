"""`tc cache` under torchrun: the process group around each rank's shard, and the joined file over the shards.

How the ranks split the rows and step together is told in ``tccli.runtime.distributed``'s docstring. Each
rank writes its shard with ``tccli.data.cache_writer`` (which enters `sharded_run` when torchrun launched
it); when every shard is complete, rank 0 writes ``OUT``: root attributes those of a single-process cache
of the same arguments (plus ``shards``), every dataset an HDF5 virtual dataset over the shards in rank
order. `check_joined_sources` is what `ActivationCache.open` (``tccli.data.cache_reader``) runs on a joined
file, because HDF5 would silently read a missing shard as zeros.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tccli.config.data import CacheConfig
from tccli.data.cache_format import FORMAT, progress_path
from tccli.errors import fail
from tccli.runtime.distributed import Distributed, Shard, session, shard_path

SHARD_ATTRS = ("shard_rank", "shard_count", "shard_first_row", "total_rows")
ROW_DATASETS = ("tokens", "doc_ids")


# ============================================================================ the ranks' run


@dataclass
class ShardedRun:
    """One rank of a torchrun `tc cache`: the joined file ``out``, and this rank's shard to write."""

    context: Distributed
    out: Path  # the joined file rank 0 writes at the end
    shard_config: CacheConfig  # the command's settings with --out this rank's shard
    shard: Shard
    began: float  # time.monotonic() when the ranks had joined: the joined run's seconds count from here

    @property
    def log_prefix(self) -> str:
        return f"rank {self.context.rank}/{self.context.world}: "


@contextlib.contextmanager
def sharded_run(config: CacheConfig) -> Iterator[ShardedRun]:
    """Refuse what cannot be sharded, then join the process group for the block; yields this rank's part."""
    if "-" in config.data:
        raise fail("--data - (stdin) cannot be shared among torchrun ranks; give files")
    out = Path(config.out).expanduser()
    if (out.exists() or out.is_symlink()) and not (config.resume or config.force):
        raise fail(f"{out} already exists: pass --resume to complete an interrupted run or --force to overwrite it")
    with session(config.dist_timeout, config.device) as context:
        shard_config = dataclasses.replace(config, out=str(shard_path(out, context.rank, context.world)))
        shard = Shard(context.rank, context.world, heartbeat=lambda: context.vote(True))
        yield ShardedRun(context, out, shard_config, shard, time.monotonic())


def join_shards(run: ShardedRun, log: Callable[[str], None]) -> Optional[tuple[int, float]]:
    """After this rank's shard is complete: step with the ranks still caching until every shard is, then
    rank 0 writes the joined file. (tokens, seconds since the ranks joined) on rank 0, None on the others."""
    context = run.context
    while context.vote(False):  # step with the ranks still caching until every shard is complete
        pass
    joined = None
    if context.is_main:
        n_tokens = write_joined_cache(run.out, [shard_path(run.out, r, context.world) for r in range(context.world)])
        log(f"joined {context.world} shards into {run.out}")
        joined = (n_tokens, time.monotonic() - run.began)
    context.barrier()
    return joined


# ============================================================================ the joined file


def _shard_summary(path: Path) -> dict:
    """Root attributes and dataset descriptions of a complete shard; TcError otherwise."""
    import h5py

    if not path.is_file():
        raise fail(f"shard {path} is missing")
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs.items())
            datasets = {}
            f.visititems(
                lambda name, obj: (
                    datasets.__setitem__(name, (obj.shape, obj.dtype, dict(obj.attrs)))
                    if isinstance(obj, h5py.Dataset)
                    else None
                )
            )
    except OSError:
        raise fail(f"shard {path} is not a readable HDF5 file") from None
    if attrs.get("format") != FORMAT or "shard_rank" not in attrs:
        raise fail(f"{path} is not a tc cache shard")
    if not bool(attrs.get("complete")) or progress_path(path).exists():
        raise fail(f"shard {path} is incomplete; run the same torchrun command again with --resume")
    return {"attrs": attrs, "datasets": datasets}


def write_joined_cache(out: Path, shards: list[Path]) -> int:
    """Write ``out``: virtual datasets over the complete ``shards`` (in order), root attributes those of a
    single-process cache of the same arguments. Written under a temporary name, then renamed."""
    import h5py

    summaries = [_shard_summary(path) for path in shards]
    first = summaries[0]["attrs"]
    context = int(first["context"])
    total_rows = int(first["total_rows"])
    row_starts = [int(s["attrs"]["shard_first_row"]) for s in summaries]
    row_counts = [int(s["attrs"]["n_rows"]) for s in summaries]
    if (
        row_starts != list(np.cumsum([0] + row_counts[:-1]))
        or sum(row_counts) != total_rows
        or any(s["attrs"]["config"] != first["config"] for s in summaries)
    ):
        raise fail(f"the shards {shards[0].name} ... do not belong to one run; run again with --force")
    attrs = {k: v for k, v in first.items() if k not in SHARD_ATTRS}
    attrs.update(
        n_rows=total_rows,
        tokens_written=total_rows * context,
        complete=True,
        shards=json.dumps(
            [{"file": p.name, "first_row": a, "n_rows": n} for p, a, n in zip(shards, row_starts, row_counts)]
        ),
    )
    tmp = out.with_name(out.name + ".joining")
    with h5py.File(tmp, "w") as f:
        for name, (shape, dtype, dataset_attrs) in summaries[0]["datasets"].items():
            per_row = 1 if name in ROW_DATASETS else context  # /tokens and /doc_ids hold rows, the rest tokens
            layout = h5py.VirtualLayout(shape=(total_rows * per_row,) + shape[1:], dtype=dtype)
            for path, start, count in zip(shards, row_starts, row_counts):
                layout[start * per_row : (start + count) * per_row] = h5py.VirtualSource(
                    path.name, name, shape=(count * per_row,) + shape[1:]
                )
            dataset = f.create_virtual_dataset(name, layout)
            for key, value in dataset_attrs.items():
                dataset.attrs[key] = value
        for key, value in attrs.items():
            f.attrs[key] = value
        f.flush()
        os.fsync(f.id.get_vfd_handle())
    os.replace(tmp, out)
    return total_rows * context


def check_joined_sources(handle: Any, path: Path) -> None:
    """For a joined cache: every shard it names is there, complete and from the same run (HDF5 would
    silently read a missing shard as zeros)."""
    if "shards" not in handle.attrs:
        return
    for entry in json.loads(handle.attrs["shards"]):
        summary = _shard_summary(path.parent / entry["file"])["attrs"]
        if (
            summary["config"] != handle.attrs["config"]
            or int(summary["n_rows"]) != int(entry["n_rows"])
            or int(summary["shard_first_row"]) != int(entry["first_row"])
        ):
            raise fail(f"shard {entry['file']} of {path} is from another run; run the torchrun cache again")
