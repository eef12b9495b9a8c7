"""Writing an activation cache (`tc cache`): the output checked and locked before the model loads
(`cache_output`), then the model run batch by batch into the file (`write_cache`), crash-safe and resumable.
The file format: ``tccli.data.cache_format``; under torchrun each rank writes a shard
(``tccli.data.cache_shards``).

Crash safety (why this works under SIGKILL at any moment):

1. The file is first built complete in structure (all datasets at full size, static attributes) under a
   temporary name, flushed and fsynced, and only then renamed to the output name, after a progress file
   ``OUT.progress`` recording zero committed rows has been written. So ``OUT`` never exists half-created.
2. Rows are written in order. At a *commit* (every ``--commit-every`` rows, by default about 64 MiB, and at
   least every 10 s) the HDF5 file is flushed and fsynced, then the progress file is atomically replaced
   (write temp, fsync, rename) with the list of committed units, each with a CRC-32 of every dataset's
   bytes over the unit's rows. Uncompressed datasets are allocated in full when created, so data writes
   never touch HDF5 metadata; compressed ones do, and that is what the checksums guard.
3. ``--resume`` trusts nothing it has not checked: it recomputes the token rows and compares them with
   ``/tokens``, re-reads every committed unit and compares checksums, and continues after the last unit
   that verifies. If the HDF5 file cannot be opened at all (a kill during a metadata write), it says so and
   starts again from scratch. Batches are the same as in an uninterrupted run (commits fall on batch
   boundaries), so the resumed file's datasets and attributes are equal to an uninterrupted run's.
4. Completion sets ``complete = True`` and ``tokens_written``, flushes, fsyncs, then deletes the progress
   file. No attribute holds a timestamp, so complete files of the same arguments are equal in content.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import shutil
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tccli.config.data import CacheConfig
from tccli.config.fields import parse_layers
from tccli.data.cache_format import (
    BF16_STORAGE,
    FORMAT,
    WHICH,
    CachePlan,
    attribute_bytes,
    config_fingerprint,
    creating_path,
    dataset_names,
    fingerprint_meaning,
    human_bytes,
    make_plan,
    numpy_storage_dtype,
    progress_path,
    read_progress,
    static_attributes,
    to_storage,
    write_progress,
)
from tccli.data.cache_shards import ShardedRun, join_shards, sharded_run
from tccli.errors import TcError, fail
from tccli.runtime import outputs
from tccli.runtime.distributed import Shard, launched

COMMIT_SECONDS = 10.0  # commit at least this often, however few rows came since the last commit
FLOAT16_OVERFLOW = 65520.0  # the smallest magnitude float16 rounds to inf
WRITE_QUEUE_BATCHES = 4  # batches the forward pass may run ahead of the disk


# ============================================================================ the output (before the model loads)


@dataclass
class CacheOutput:
    """A `tc cache` output checked and locked by `cache_output`, what `write_cache` writes into."""

    config: CacheConfig  # the settings this file is written by (under torchrun: --out is this rank's shard)
    out: Path
    prior: str  # 'new', 'resume' or 'force': what to do with what is at ``out`` already
    shard: Optional[Shard] = None  # write only this shard's rows
    sharded: Optional[ShardedRun] = None  # under torchrun: this rank's place in the run, joined at the end


@contextlib.contextmanager
def cache_output(config: CacheConfig, shard: Optional[Shard] = None) -> Iterator[CacheOutput]:
    """Check ``config.out`` and hold its lock for the block: every refusal that needs no model (a folder,
    a missing output folder, an input as output, an existing file without --resume or --force) comes from
    here, so the caller loads the model inside the block and then calls `write_cache`.

    Under torchrun this rank joins the process group first and checks and locks its shard (the block then
    runs inside the group, so each rank loads the model on its own device); ``shard`` (a
    ``tccli.runtime.distributed.Shard``) makes a single process write only that shard's rows.
    """
    if shard is None and launched():
        with sharded_run(config) as run:
            with cache_output(run.shard_config, run.shard) as output:
                yield dataclasses.replace(output, sharded=run)
        return
    outputs.refuse_stdout(
        config.out, "an activation cache", "HDF5 is written by seeking in a file, which a pipe cannot do"
    )
    out = Path(config.out).expanduser()
    if out.is_dir():
        raise fail(f"--out {out} is a folder, not a file")
    if not out.parent.is_dir():
        raise fail(f"output folder {out.parent} does not exist")
    outputs.check_not_input(out, [*config.data, config.model])
    with outputs.locked(out):
        yield CacheOutput(config, out, _check_output(out, config), shard)


def _check_output(out: Path, config: CacheConfig) -> str:
    """'new', 'resume' or 'force'; refuses to touch an existing output without --resume/--force."""
    exists = out.exists() or progress_path(out).exists()
    if out.is_dir():
        raise fail(f"--out {out} is a folder, not a file")
    if not exists:
        return "new"
    if config.force:
        return "force"
    if config.resume:
        return "resume"
    raise fail(f"{out} already exists: pass --resume to complete an interrupted run or --force to overwrite it")


# ============================================================================ the run


@dataclass
class CacheResult:
    path: Path
    n_tokens: int
    resumed_from_row: int
    seconds: float


def write_cache(
    output: CacheOutput,
    loaded: Any,
    log: Callable[[str], None] = lambda s: None,
    progress: Optional[Callable[[int, int], None]] = None,
    stdin: Any = None,
) -> CacheResult:
    """The `tc cache` job on ``loaded`` (a ``tccli.model.loading.LoadedModel`` of ``output.config.model``),
    inside `cache_output`'s block. ``log`` gets one-line messages for stderr; ``progress(done, total)`` tokens.

    Under torchrun this rank writes its shard (its messages prefixed with its rank, the progress bar rank
    0's alone), then rank 0 joins the shards into ``OUT``.
    """
    run = output.sharded
    if run is None:
        return _write_file(output, loaded, log, progress, stdin)
    result = _write_file(
        output, loaded, lambda message: log(run.log_prefix + message), progress if run.context.is_main else None, stdin
    )
    joined = join_shards(run, log)
    if joined is None:
        return result
    n_tokens, seconds = joined
    return CacheResult(run.out, n_tokens, result.resumed_from_row, seconds)


def _write_file(
    output: CacheOutput,
    loaded: Any,
    log: Callable[[str], None],
    progress: Optional[Callable[[int, int], None]],
    stdin: Any,
) -> CacheResult:
    """`write_cache` for one file: the whole cache, or one rank's shard."""
    from tccli.data.text import load_rows
    from tccli.model.loading import MlpCapture, check_context

    config, out, prior, shard = output.config, output.out, output.prior, output.shard
    info = loaded.info
    check_context(config.context, info)
    layers = parse_layers(config.layers, info.n_layers)
    rows = load_rows(
        config.data, loaded.tokenizer, info.bos_token_id, config.context, config.tokens, config.seed, stdin=stdin
    )
    if rows.available_tokens is not None:
        log(
            f"the data holds only {rows.available_tokens} tokens ({rows.tokens.shape[0]} full rows of "
            f"{config.context}), fewer than --tokens {config.tokens}: storing {rows.n_tokens} tokens"
        )
    shard_attrs: dict = {}
    if shard is not None:
        rows, shard_attrs = shard.select(rows, config.batch_size)
    plan = make_plan(config, layers, rows.tokens.shape[0], info.d_model)
    device = str(loaded.device)
    fingerprint = config_fingerprint(config, device, info.n_layers)
    capture = MlpCapture(loaded, layers, config.engine, release_bridge=True)
    if capture.fallback_reason:
        log(capture.fallback_reason)
    attrs = {
        **static_attributes(config, info, plan, device, rows.available_tokens, capture.engine_used, capture.attention),
        **shard_attrs,
    }

    start_row, units = 0, []
    if prior == "resume":
        start_row, units = _verify_for_resume(out, fingerprint, rows.tokens, plan, log, info.n_layers)
    if start_row is None:  # complete already
        return CacheResult(out, plan.n_tokens, plan.n_rows, 0.0)
    if not units and start_row == 0:
        reclaim = out.stat().st_size if out.exists() else 0
        needed = plan.file_bytes(attribute_bytes(attrs))
        log(
            f"writing {plan.n_tokens} tokens x {len(layers)} layers x (mlp_in, mlp_out) x {info.d_model} in "
            f"{config.dtype}: expected file size {'at most ' if config.compression != 'none' else ''}"
            f"{human_bytes(needed)}"
        )
        check_disk_room(out, needed, reclaimable=reclaim)
        _start_file(out, plan, attrs, rows, config.compression, fingerprint)
    else:
        log(f"resuming at token {start_row * plan.context} of {plan.n_tokens}")

    import h5py

    began = time.monotonic()
    with h5py.File(out, "r+") as f:
        writer = _Writer(
            f,
            out,
            plan,
            fingerprint,
            units,
            start_row,
            on_rows=(lambda r: progress(r * plan.context, plan.n_tokens)) if progress else (lambda r: None),
        )
        writer.start()
        try:
            _forward_batches(
                capture, rows.tokens, plan, start_row, writer, on_batch=shard.heartbeat if shard is not None else None
            )
        finally:
            writer.queue.put(None)
            writer.join()
        if writer.error is not None:
            raise _write_error(writer.error, out)
        f.attrs["tokens_written"] = plan.n_tokens
        f.attrs["complete"] = True
        _durable_flush(f)
    progress_path(out).unlink(missing_ok=True)
    outputs.fsync_folder(out.parent)
    return CacheResult(out, plan.n_tokens, start_row, time.monotonic() - began)


def _start_file(out: Path, plan: CachePlan, attrs: dict, rows: Any, compression: str, fingerprint: dict) -> None:
    """Create the full-size file under a temporary name, then put it in place behind a progress file."""
    tmp = creating_path(out)
    try:
        create_file(tmp, plan, attrs, rows.tokens, rows.doc_ids, compression)
        write_progress(out, fingerprint, [])
        os.replace(tmp, out)
    except OSError as exc:
        raise outputs.write_error(out, exc) from None
    finally:  # also on Ctrl-C: no half-created file is left behind
        tmp.unlink(missing_ok=True)
    outputs.fsync_folder(out.parent)


def _verify_for_resume(
    out: Path,
    fingerprint: dict,
    tokens: np.ndarray,
    plan: CachePlan,
    log: Callable[[str], None],
    n_layers: Optional[int] = None,
) -> tuple[Optional[int], list]:
    """Row to resume at and the units kept; (None, []) when already complete; (0, []) means start again.

    Without a progress file, ``out`` must be a readable tc cache (it is never overwritten otherwise). With
    one, an unreadable ``out`` is what a kill during an HDF5 metadata write leaves: start again.
    """
    import h5py

    progress = read_progress(out)
    if progress is not None and fingerprint_meaning(progress.get("config"), n_layers) != fingerprint:
        raise fail(
            f"--resume: {out} was started with other arguments "
            f"({_difference(progress['config'], fingerprint)}); use the same arguments, or --force"
        )
    if not out.exists():
        return 0, []
    try:
        f = h5py.File(out, "r")
    except Exception:
        if progress is None:
            raise fail(f"--resume: {out} is not a readable HDF5 file; refusing to touch it") from None
        log(f"{out} was damaged by the interruption (it cannot be opened); starting again from the beginning")
        return 0, []
    try:
        with f:
            if f.attrs.get("format") != FORMAT:
                raise fail(f"--resume: {out} is not a tc activation cache; refusing to touch it")
            recorded = fingerprint_meaning(json.loads(f.attrs["config"]), n_layers)
            if recorded != fingerprint:
                raise fail(
                    f"--resume: {out} was written with other arguments "
                    f"({_difference(recorded, fingerprint)}); use the same arguments, or --force"
                )
            if not np.array_equal(f["tokens"][:], tokens):
                raise fail(
                    f"--resume: the data now gives other tokens than {out} was started with; "
                    "use the same data, or --force to start again"
                )
            if progress is None:
                if bool(f.attrs["complete"]):
                    log(f"{out} is already complete")
                    return None, []
                raise fail(
                    f"--resume: {out} is incomplete but its progress file {progress_path(out).name} "
                    "is gone, so its rows cannot be trusted; use --force to start again"
                )
            return _verified_units(f, progress["units"], plan, out, log)
    except TcError:
        raise
    except Exception as exc:  # HDF5 structure damaged by a kill during a metadata write
        if progress is None:
            raise fail(
                f"--resume: {out} is a damaged tc activation cache ({type(exc).__name__}); use --force to start again"
            ) from None
        log(f"{out} was damaged by the interruption ({type(exc).__name__}); starting again from the beginning")
        return 0, []


def _verified_units(f: Any, units: list, plan: CachePlan, out: Path, log: Callable[[str], None]) -> tuple[int, list]:
    """Keep committed units, in order, while their bytes match their checksums."""
    names = dataset_names(plan.layers)
    kept: list = []
    start = 0
    for end, digest in units:
        if unit_checksum(f, names, start * plan.context, end * plan.context) != digest:
            log(
                f"rows {start}-{end - 1} of {out} do not match their checksum (damaged by the interruption); "
                f"rewriting from row {start}"
            )
            break
        kept.append((end, digest))
        start = end
    return start, kept


def _difference(recorded: dict, now: dict) -> str:
    keys = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
    return ", ".join(f"{k}: {recorded.get(k)!r} then, {now.get(k)!r} now" for k in keys[:3])


def _write_error(exc: BaseException, out: Path) -> TcError:
    if isinstance(exc, TcError):
        return fail(f"{exc}; the rows committed so far are kept: fix that and run again with --resume")
    if isinstance(exc, OSError) or "No space" in str(exc):
        return fail(
            f"{outputs.write_error(out, exc)}; the rows committed so far are kept: free space and run "
            "again with --resume"
        )
    return fail(f"writing {out} failed: {type(exc).__name__}: {exc}")


def _forward_batches(
    capture: Any,
    tokens: np.ndarray,
    plan: CachePlan,
    start_row: int,
    writer: _Writer,
    on_batch: Optional[Callable[[], None]] = None,
) -> None:
    """Run the model (a ``tccli.model.loading.MlpCapture``) batch by batch up to the last requested layer; hand
    the activations to the writer (``on_batch`` runs after each batch: the heartbeat of a sharded run)."""
    import torch

    for lo in range(start_row, plan.n_rows, plan.batch_size):
        if writer.error is not None:
            return
        hi = min(plan.n_rows, lo + plan.batch_size)
        captured = capture.capture(torch.from_numpy(tokens[lo:hi]))
        # Converted here, not in the writer: torch ops on a second thread contend for the intra-op thread
        # pool with the next forward pass (on 2 cores, that cost 30% of throughput); the writer does disk work only.
        arrays = {}
        for L in plan.layers:
            for which in WHICH:
                name = f"layers/{L}/{which}"
                arrays[name] = storage_array(name, captured[L][which], plan)
        writer.queue.put((lo, arrays))
        if on_batch is not None:
            on_batch()


def storage_array(name: str, acts: Any, plan: CachePlan) -> np.ndarray:
    """Captured activations [batch, pos, d] -> the [tokens, d] array stored, refusing float16 overflow."""
    import torch

    acts = acts.reshape(-1, plan.d_model)
    if plan.dtype == "float16":
        largest = acts.abs().max()  # NaN/inf already in the model's output are stored as they are
        if torch.isfinite(largest) and largest >= FLOAT16_OVERFLOW:
            raise fail(
                f"{name} holds values beyond float16's range (max |x| = {float(largest):.4g}); "
                "use --dtype bfloat16 or float32"
            )
    return to_storage(acts, plan.dtype)


# ============================================================================ the file on disk


def check_disk_room(path: Path, needed: int, reclaimable: int = 0) -> None:
    """Refuse before starting when the disk holding ``path`` has less free space than ``needed``, or when
    this process may not write a file that large (``ulimit -f``). Both are checked up front because HDF5
    can crash the process (a segmentation fault in h5py's close) when a write fails while it creates the
    file's structure."""
    free = shutil.disk_usage(path.parent).free + reclaimable
    if free < needed:
        raise fail(
            f"not enough disk space for {path}: needs {human_bytes(needed)}, {human_bytes(free)} free on its disk"
        )
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < needed:
        raise fail(
            f"cannot write {path}: File too large: it needs {human_bytes(needed)} and this shell limits "
            f"files to {human_bytes(limit)} (ulimit -f)"
        )


def create_file(
    path: Path, plan: CachePlan, attrs: dict, tokens: np.ndarray, doc_ids: np.ndarray, compression: str
) -> None:
    """Write the file's full structure (datasets at full size, tokens, attributes), flush and fsync."""
    import h5py

    dtype = numpy_storage_dtype(plan.dtype)
    chunk_tokens = plan.chunk_rows * plan.context
    filters: dict[str, Any] = {}
    if compression != "none":
        filters = {"compression": compression}
    with h5py.File(path, "w") as f:
        f.create_dataset("tokens", data=tokens.astype(np.int32), chunks=(plan.chunk_rows, plan.context))
        f.create_dataset("doc_ids", data=doc_ids.astype(np.int64), chunks=(plan.chunk_rows, plan.context))
        for name in dataset_names(plan.layers):
            dcpl = None
            if compression == "none":
                # all chunks allocated now: later data writes change no HDF5 metadata
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dset = f.create_dataset(
                name,
                shape=(plan.n_tokens, plan.d_model),
                dtype=dtype,
                chunks=(chunk_tokens, plan.d_model),
                dcpl=dcpl,
                **filters,
            )
            if plan.dtype == "bfloat16":
                dset.attrs["storage"] = BF16_STORAGE
        for key, value in attrs.items():
            f.attrs[key] = value
        f.flush()
        os.fsync(f.id.get_vfd_handle())


def _durable_flush(f: Any) -> None:
    f.flush()
    os.fsync(f.id.get_vfd_handle())


class _UnitChecksum:
    """CRC-32 of each dataset's bytes over one commit unit, fed batch by batch in row order."""

    def __init__(self, names: list[str]):
        self.names = names
        self.crcs = {n: 0 for n in names}

    def update(self, name: str, array: np.ndarray) -> None:
        self.crcs[name] = zlib.crc32(np.ascontiguousarray(array).view(np.uint8), self.crcs[name])

    def digest(self) -> str:
        return ",".join(f"{self.crcs[n]:08x}" for n in self.names)


def unit_checksum(f: Any, names: list[str], start_token: int, stop_token: int) -> str:
    checksum = _UnitChecksum(names)
    step = max(1, (64 * 2**20) // max(1, f[names[0]].shape[1] * f[names[0]].dtype.itemsize))
    for name in names:
        dset = f[name]
        for lo in range(start_token, stop_token, step):
            checksum.update(name, dset[lo : min(stop_token, lo + step)])
    return checksum.digest()


class _Writer(threading.Thread):
    """Takes finished batches off a bounded queue and writes them, committing units durably.

    Runs beside the forward pass so that disk writes do not stall the model.
    """

    def __init__(
        self,
        f: Any,
        out: Path,
        plan: CachePlan,
        fingerprint: dict,
        units: list[tuple[int, str]],
        start_row: int,
        on_rows: Callable[[int], None],
    ):
        super().__init__(daemon=True)
        self.f = f
        self.out = out
        self.plan = plan
        self.fingerprint = fingerprint
        self.units = list(units)
        self.names = dataset_names(plan.layers)
        self.queue: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE_BATCHES)
        self.error: Optional[BaseException] = None
        self.unit_start = start_row
        self.rows_done = start_row
        self.checksum = _UnitChecksum(self.names)
        self.last_commit = time.monotonic()
        self.on_rows = on_rows

    def run(self) -> None:
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    break
                start_row, arrays = item
                self._write(start_row, arrays)
            if self.rows_done > self.unit_start:
                self._commit()
        except BaseException as exc:  # reported to the forward thread, which stops
            self.error = exc
            while True:  # drain so the producer never blocks forever
                try:
                    if self.queue.get_nowait() is None:
                        break
                except queue.Empty:
                    time.sleep(0.01)

    def _write(self, start_row: int, arrays: dict[str, np.ndarray]) -> None:
        n_rows = next(iter(arrays.values())).shape[0] // self.plan.context
        lo = start_row * self.plan.context
        hi = lo + n_rows * self.plan.context
        for name in self.names:
            self.f[name][lo:hi] = arrays[name]
            self.checksum.update(name, arrays[name])
        self.rows_done = start_row + n_rows
        self.on_rows(self.rows_done)
        due = self.rows_done - self.unit_start >= self.plan.commit_rows
        if due or time.monotonic() - self.last_commit >= COMMIT_SECONDS:
            self._commit()

    def _commit(self) -> None:
        self.f.attrs["tokens_written"] = self.rows_done * self.plan.context
        _durable_flush(self.f)
        self.units.append((self.rows_done, self.checksum.digest()))
        write_progress(self.out, self.fingerprint, self.units)
        self.unit_start = self.rows_done
        self.checksum = _UnitChecksum(self.names)
        self.last_commit = time.monotonic()
