"""`tc cache`: run a model over text and store each chosen layer's MLP input and output in HDF5.

File layout (one HDF5 file)::

    /tokens                 int32  [n_rows, context]        token ids, every row starting with BOS
    /doc_ids                int64  [n_rows, context]        document (reading order) of each token
    /layers/{L}/mlp_in      dtype  [n_rows*context, d_model] MLP input (normalised residual) of layer L
    /layers/{L}/mlp_out     dtype  [n_rows*context, d_model] MLP output of layer L

Token ``n`` of the activation datasets is row ``n // context``, position ``n % context``. Root attributes
describe everything needed to use the file later (see ``static_attributes``). ``bfloat16`` has no HDF5
type: it is stored as ``uint16`` holding the upper 16 bits of each float32 (the bfloat16 bit pattern),
marked by the attribute ``storage = "bfloat16-as-uint16"``; `ActivationCache.read` turns it back into
float32 exactly.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from tccli import __version__
from tccli.config.fields import parse_layers, to_json_dict
from tccli.runtime.distributed import Shard, launched, session, shard_path
from tccli.runtime import outputs
from tccli.errors import TcError, fail
from tccli.config.data import CacheConfig

FORMAT = "tc-activation-cache"
PROGRESS_FORMAT = "tc-activation-cache-progress"
WHICH = ("mlp_in", "mlp_out")
BF16_STORAGE = "bfloat16-as-uint16"
COMMIT_BYTES = 64 * 2**20  # bytes of activations per crash-safe commit (when --commit-every is 0)
COMMIT_SECONDS = 10.0  # ... or sooner, once this long has passed since the last commit
CHUNK_BYTES = 2**20  # target size of one HDF5 chunk
# Options that decide what the file holds (a resumed run must match them); others (timeouts, --quiet) do not.
CONTENT_OPTIONS = ("model", "model_dtype", "engine", "data", "tokens", "context", "seed", "layers", "dtype", "batch_size",
                   "compression")
FLOAT16_OVERFLOW = 65520.0  # the smallest magnitude float16 rounds to inf
WRITE_QUEUE_BATCHES = 4  # batches the forward pass may run ahead of the disk
# HDF5's own bytes, bounds measured on files tc writes (tests/test_cache.py checks them): a chunked dataset's
# B-tree costs under 100 bytes per chunk (a 64-entry node is about 2 KiB), its object header about 1 KiB;
# the superblock, root group and free space come to a few KiB. Attributes are counted from their values.
HDF5_BYTES_PER_CHUNK = 100
HDF5_BYTES_PER_DATASET = 4096
HDF5_FIXED_BYTES = 64 * 1024


# ============================================================================ storage dtype conversion


def to_storage(tensor: Any, dtype: str) -> np.ndarray:
    """A float tensor [n, d] -> the numpy array stored on disk (bfloat16 as its uint16 bit pattern)."""
    import torch

    if dtype == "bfloat16":
        return tensor.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return tensor.to(torch.float16 if dtype == "float16" else torch.float32).cpu().numpy()


def from_storage(array: np.ndarray, storage: str) -> np.ndarray:
    """Stored array -> float32 (exact: every float16 and bfloat16 value is a float32)."""
    if storage == BF16_STORAGE:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32, copy=False)


def numpy_storage_dtype(dtype: str) -> np.dtype:
    return np.dtype({"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}[dtype])


# ============================================================================ planning


@dataclass
class CachePlan:
    """What a run will write, decided before any forward pass."""

    layers: list[int]
    n_rows: int
    context: int
    d_model: int
    dtype: str
    batch_size: int
    commit_rows: int
    chunk_rows: int

    @property
    def n_tokens(self) -> int:
        return self.n_rows * self.context

    @property
    def bytes_per_row(self) -> int:
        return self.context * self.d_model * numpy_storage_dtype(self.dtype).itemsize * 2 * len(self.layers)

    @property
    def expected_bytes(self) -> int:
        """Uncompressed size of the file's data (tokens, doc ids, activations)."""
        return self.n_rows * (self.bytes_per_row + self.context * (4 + 8))

    @property
    def n_chunks(self) -> int:
        """Chunks per dataset (every dataset is cut into chunks of ``chunk_rows`` rows)."""
        return -(-self.n_rows // max(1, self.chunk_rows))

    def file_bytes(self, attribute_bytes: int = 0) -> int:
        """An upper bound on the file's size as HDF5 lays it out: every chunk is stored whole (the last one
        too, past the end of the data), each chunk costs an entry in its dataset's B-tree index, and the
        attributes and object headers come on top."""
        itemsize = numpy_storage_dtype(self.dtype).itemsize
        rows = self.n_chunks * self.chunk_rows  # the rows the chunks can hold
        activations = rows * self.context * self.d_model * itemsize * 2 * len(self.layers)
        token_rows = rows * self.context * (4 + 8)
        n_datasets = 2 + 2 * len(self.layers)
        index = n_datasets * (self.n_chunks * HDF5_BYTES_PER_CHUNK + HDF5_BYTES_PER_DATASET)
        return activations + token_rows + index + 2 * attribute_bytes + HDF5_FIXED_BYTES


def make_plan(config: CacheConfig, layers: list[int], n_rows: int, d_model: int) -> CachePlan:
    itemsize = numpy_storage_dtype(config.dtype).itemsize
    row_bytes = config.context * d_model * itemsize * 2 * len(layers)
    if config.commit_every:
        commit_rows = config.commit_every
    else:
        commit_rows = max(1, COMMIT_BYTES // max(row_bytes, 1))
    # commits fall on batch boundaries, so a resumed run feeds the model exactly the same batches
    commit_rows = max(config.batch_size, -(-commit_rows // config.batch_size) * config.batch_size)
    # a chunk holds whole rows and divides the batch, so batch writes never split a (compressed) chunk
    per_dataset_row = config.context * d_model * itemsize
    chunk_rows = max(d for d in range(1, config.batch_size + 1)
                     if config.batch_size % d == 0 and (d == 1 or d * per_dataset_row <= CHUNK_BYTES))
    return CachePlan(layers=layers, n_rows=n_rows, context=config.context, d_model=d_model, dtype=config.dtype,
                     batch_size=config.batch_size, commit_rows=commit_rows, chunk_rows=min(chunk_rows, n_rows))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def attribute_bytes(attrs: dict) -> int:
    """Bytes the root attributes' values take (strings, numbers and arrays)."""
    total = 0
    for key, value in attrs.items():
        total += len(key) + (np.asarray(value).nbytes if not isinstance(value, str) else len(value.encode()))
    return total


def check_disk_room(path: Path, needed: int, reclaimable: int = 0) -> None:
    """Refuse before starting when the disk holding ``path`` has less free space than ``needed``, or when
    this process may not write a file that large (``ulimit -f``). Both are checked up front because HDF5
    can crash the process (a segmentation fault in h5py's close) when a write fails while it creates the
    file's structure."""
    free = shutil.disk_usage(path.parent).free + reclaimable
    if free < needed:
        raise fail(f"not enough disk space for {path}: needs {human_bytes(needed)}, "
                   f"{human_bytes(free)} free on its disk")
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < needed:
        raise fail(f"cannot write {path}: File too large: it needs {human_bytes(needed)} and this shell limits "
                   f"files to {human_bytes(limit)} (ulimit -f)")


# ============================================================================ file attributes


def config_fingerprint(config: CacheConfig, device: str, n_layers: Optional[int] = None) -> dict:
    """The arguments that decide the file's content, by meaning: the model as ``models.model_identity``
    names it, data paths resolved, the layer list resolved (given ``n_layers``). A resumed run must match."""
    saved = to_json_dict(config)
    fingerprint = {key: saved[key] for key in CONTENT_OPTIONS}
    fingerprint["device"] = device
    return _meaning(fingerprint, n_layers)


def _meaning(fingerprint: Optional[dict], n_layers: Optional[int]) -> Optional[dict]:
    """A fingerprint (recorded by any tc version, or made now) in comparable terms: caches from before
    --engine were all made by the bridge; `--model builtin`, the default and the install path are one
    model; `0-0` and `0` are one layer list; a relative and an absolute path are one file."""
    from tccli.model.loading import model_identity

    if not isinstance(fingerprint, dict):
        return fingerprint
    out = dict(fingerprint)
    out.setdefault("engine", "bridge")
    out["model"] = model_identity(out.get("model"))
    if isinstance(out.get("data"), list):
        out["data"] = [item if item == "-" else os.path.realpath(os.path.expanduser(str(item)))
                       for item in out["data"]]
    layers = out.get("layers")
    if n_layers is not None and isinstance(layers, str):
        with contextlib.suppress(TcError):
            out["layers"] = parse_layers(layers, n_layers)
    return out


def static_attributes(config: CacheConfig, info: Any, plan: CachePlan, device: str,
                      available_tokens: Optional[int], engine: str = "bridge", attention: str = "bridge-eager") -> dict:
    """Root attributes fixed at creation (``complete`` and ``tokens_written`` change later)."""
    layer_hooks = {str(L): {"mlp_in": info.mlp_in_hook(L), "mlp_out": info.mlp_out_hook(L)} for L in plan.layers}
    return {
        "format": FORMAT,
        "format_version": 1,
        "tc_version": __version__,
        "model": config.model or "builtin",  # the name given; model_path is where it was loaded from
        "model_path": info.name,
        "architecture": info.architecture,
        "model_info": json.dumps(info.to_dict()),
        "weight_processing": json.dumps(info.weight_processing),
        "model_dtype": config.model_dtype,
        "device": device,
        "hook_names": json.dumps(layer_hooks),
        "engine": engine,  # which engine produced the values (see tccli.model.loading.MlpCapture)
        "attention": attention,  # the attention kernel that ran (sdpa, eager, bridge-eager)
        "layers": np.array(plan.layers, dtype=np.int64),
        "d_model": plan.d_model,
        "context": plan.context,
        "n_rows": plan.n_rows,
        "dtype": plan.dtype,
        "storage": BF16_STORAGE if plan.dtype == "bfloat16" else plan.dtype,
        "batch_size": plan.batch_size,
        "compression": config.compression,
        "tokens_requested": config.tokens,
        "tokens_available": -1 if available_tokens is None else int(available_tokens),
        "data_sources": json.dumps(list(config.data)),
        "seed": config.seed,
        "bos_token_id": info.bos_token_id,
        "config": json.dumps(config_fingerprint(config, device, info.n_layers), sort_keys=True),
        "complete": False,
        "tokens_written": 0,
    }


# ============================================================================ the progress file


def progress_path(out: Path) -> Path:
    return out.with_name(out.name + ".progress")


def creating_path(out: Path) -> Path:
    return out.with_name(out.name + ".creating")


def write_progress(out: Path, fingerprint: dict, units: list[tuple[int, str]]) -> None:
    """Atomically replace the progress file: temp file, fsync, rename, fsync the folder."""
    text = json.dumps({"format": PROGRESS_FORMAT, "config": fingerprint, "units": [list(u) for u in units]})
    outputs.atomic_write_text(progress_path(out), text)


def read_progress(out: Path) -> Optional[dict]:
    path = progress_path(out)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise fail(f"{path} is damaged; start again with --force") from None
    if not isinstance(data, dict) or data.get("format") != PROGRESS_FORMAT:
        raise fail(f"{path} is not a tc progress file; start again with --force")
    return data


# ============================================================================ writing


def _dataset_names(layers: list[int]) -> list[str]:
    return [f"layers/{L}/{which}" for L in layers for which in WHICH]


def create_file(path: Path, plan: CachePlan, attrs: dict, tokens: np.ndarray, doc_ids: np.ndarray,
                compression: str) -> None:
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
        for name in _dataset_names(plan.layers):
            dcpl = None
            if compression == "none":
                # all chunks allocated now: later data writes change no HDF5 metadata
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dset = f.create_dataset(name, shape=(plan.n_tokens, plan.d_model), dtype=dtype,
                                    chunks=(chunk_tokens, plan.d_model), dcpl=dcpl, **filters)
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
            checksum.update(name, dset[lo:min(stop_token, lo + step)])
    return checksum.digest()


class _Writer(threading.Thread):
    """Takes finished batches off a bounded queue and writes them, committing units durably.

    Runs beside the forward pass so that disk writes do not stall the model.
    """

    def __init__(self, f: Any, out: Path, plan: CachePlan, fingerprint: dict, units: list[tuple[int, str]],
                 start_row: int, on_rows: Callable[[int], None]):
        super().__init__(daemon=True)
        self.f = f
        self.out = out
        self.plan = plan
        self.fingerprint = fingerprint
        self.units = list(units)
        self.names = _dataset_names(plan.layers)
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


@dataclass
class CacheResult:
    path: Path
    n_tokens: int
    resumed_from_row: int
    seconds: float


def run_cache(config: CacheConfig, log: Callable[[str], None] = lambda s: None,
              progress: Optional[Callable[[int, int], None]] = None, stdin: Any = None,
              shard: Any = None) -> CacheResult:
    """The whole `tc cache` job. ``log`` gets one-line messages for stderr; ``progress(done, total)`` tokens.

    Under torchrun this rank writes its shard and rank 0 joins them (``tccli.runtime.distributed``); ``shard`` (a
    ``tccli.runtime.distributed.Shard``) makes this run write only that shard's rows.
    """
    if shard is None and launched():
        return run_sharded_cache(config, log, progress, stdin)

    out = Path(config.out).expanduser()
    if out.is_dir():
        raise fail(f"--out {out} is a folder, not a file")
    if not out.parent.is_dir():
        raise fail(f"output folder {out.parent} does not exist")
    outputs.check_not_input(out, [*config.data, config.model])
    with outputs.locked(out):
        return _run_cache(config, out, log, progress, stdin, shard)


def _run_cache(config: CacheConfig, out: Path, log: Callable[[str], None], progress: Optional[Callable[[int, int], None]],
               stdin: Any, shard: Any) -> CacheResult:
    """`run_cache` once ``out`` is locked."""
    from tccli.model.loading import MlpCapture, check_context, load_model
    from tccli.data.text import load_rows

    prior = _check_output(out, config)
    loaded = load_model(config.model, config.device, config.model_dtype)
    info = loaded.info
    check_context(config.context, info)
    layers = parse_layers(config.layers, info.n_layers)
    rows = load_rows(config.data, loaded.tokenizer, info.bos_token_id, config.context, config.tokens, config.seed,
                     stdin=stdin)
    if rows.available_tokens is not None:
        log(f"the data holds only {rows.available_tokens} tokens ({rows.tokens.shape[0]} full rows of "
            f"{config.context}), fewer than --tokens {config.tokens}: storing {rows.n_tokens} tokens")
    shard_attrs: dict = {}
    if shard is not None:
        rows, shard_attrs = shard.select(rows, config.batch_size)
    plan = make_plan(config, layers, rows.tokens.shape[0], info.d_model)
    device = str(loaded.device)
    fingerprint = config_fingerprint(config, device, info.n_layers)
    capture = MlpCapture(loaded, layers, config.engine, release_bridge=True)
    if capture.fallback_reason:
        log(capture.fallback_reason)
    attrs = {**static_attributes(config, info, plan, device, rows.available_tokens, capture.engine_used,
                                 capture.attention), **shard_attrs}

    start_row, units = 0, []
    if prior == "resume":
        start_row, units = _verify_for_resume(out, fingerprint, rows.tokens, plan, log, info.n_layers)
    if start_row is None:  # complete already
        return CacheResult(out, plan.n_tokens, plan.n_rows, 0.0)
    if not units and start_row == 0:
        reclaim = out.stat().st_size if out.exists() else 0
        needed = plan.file_bytes(attribute_bytes(attrs))
        log(f"writing {plan.n_tokens} tokens x {len(layers)} layers x (mlp_in, mlp_out) x {info.d_model} in "
            f"{config.dtype}: expected file size {'at most ' if config.compression != 'none' else ''}"
            f"{human_bytes(needed)}")
        check_disk_room(out, needed, reclaimable=reclaim)
        _start_file(out, plan, attrs, rows, config.compression, fingerprint)
    else:
        log(f"resuming at token {start_row * plan.context} of {plan.n_tokens}")

    import h5py

    began = time.monotonic()
    with h5py.File(out, "r+") as f:
        writer = _Writer(f, out, plan, fingerprint, units, start_row,
                         on_rows=(lambda r: progress(r * plan.context, plan.n_tokens)) if progress else (lambda r: None))
        writer.start()
        try:
            _forward_batches(capture, rows.tokens, plan, start_row, writer,
                             on_batch=shard.heartbeat if shard is not None else None)
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


def _verify_for_resume(out: Path, fingerprint: dict, tokens: np.ndarray, plan: CachePlan,
                       log: Callable[[str], None], n_layers: Optional[int] = None) -> tuple[Optional[int], list]:
    """Row to resume at and the units kept; (None, []) when already complete; (0, []) means start again.

    Without a progress file, ``out`` must be a readable tc cache (it is never overwritten otherwise). With
    one, an unreadable ``out`` is what a kill during an HDF5 metadata write leaves: start again.
    """
    import h5py

    progress = read_progress(out)
    if progress is not None and _meaning(progress.get("config"), n_layers) != fingerprint:
        raise fail(f"--resume: {out} was started with other arguments "
                   f"({_difference(progress['config'], fingerprint)}); use the same arguments, or --force")
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
            recorded = _meaning(json.loads(f.attrs["config"]), n_layers)
            if recorded != fingerprint:
                raise fail(f"--resume: {out} was written with other arguments "
                           f"({_difference(recorded, fingerprint)}); use the same arguments, or --force")
            if not np.array_equal(f["tokens"][:], tokens):
                raise fail(f"--resume: the data now gives other tokens than {out} was started with; "
                           "use the same data, or --force to start again")
            if progress is None:
                if bool(f.attrs["complete"]):
                    log(f"{out} is already complete")
                    return None, []
                raise fail(f"--resume: {out} is incomplete but its progress file {progress_path(out).name} "
                           "is gone, so its rows cannot be trusted; use --force to start again")
            return _verified_units(f, progress["units"], plan, out, log)
    except TcError:
        raise
    except Exception as exc:  # HDF5 structure damaged by a kill during a metadata write
        if progress is None:
            raise fail(f"--resume: {out} is a damaged tc activation cache ({type(exc).__name__}); "
                       "use --force to start again") from None
        log(f"{out} was damaged by the interruption ({type(exc).__name__}); starting again from the beginning")
        return 0, []


def _verified_units(f: Any, units: list, plan: CachePlan, out: Path, log: Callable[[str], None]) -> tuple[int, list]:
    """Keep committed units, in order, while their bytes match their checksums."""
    names = _dataset_names(plan.layers)
    kept: list = []
    start = 0
    for end, digest in units:
        if unit_checksum(f, names, start * plan.context, end * plan.context) != digest:
            log(f"rows {start}-{end - 1} of {out} do not match their checksum (damaged by the interruption); "
                f"rewriting from row {start}")
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
        return fail(f"{outputs.write_error(out, exc)}; the rows committed so far are kept: free space and run "
                    "again with --resume")
    return fail(f"writing {out} failed: {type(exc).__name__}: {exc}")


def _forward_batches(capture: Any, tokens: np.ndarray, plan: CachePlan, start_row: int, writer: _Writer,
                     on_batch: Optional[Callable[[], None]] = None) -> None:
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
            raise fail(f"{name} holds values beyond float16's range (max |x| = {float(largest):.4g}); "
                       "use --dtype bfloat16 or float32")
    return to_storage(acts, plan.dtype)


# ============================================================================ reading


class ActivationCache:
    """Read access to a cache file. ``n_tokens`` counts only rows written (all rows once complete)."""

    def __init__(self, path: Path, handle: Any):
        self.path = path
        self._f = handle
        self.attrs = {k: _plain(v) for k, v in handle.attrs.items()}
        self.layers = [int(x) for x in np.atleast_1d(handle.attrs["layers"])]
        self.context = int(handle.attrs["context"])
        self.d_model = int(handle.attrs["d_model"])
        self.complete = bool(handle.attrs["complete"])
        self.n_tokens = int(handle.attrs["tokens_written"])
        self.n_rows = self.n_tokens // self.context
        self.storage = str(handle.attrs.get("storage", handle.attrs.get("dtype")))
        self.model_info = json.loads(handle.attrs["model_info"])
        self.hook_names = json.loads(handle.attrs["hook_names"])

    @classmethod
    def open(cls, path: str | Path) -> "ActivationCache":
        import h5py

        path = Path(path)
        if not path.exists():
            raise fail(f"cache {path} does not exist")
        if path.is_dir():
            raise fail(f"{path} is a folder, not an activation cache file")
        try:
            handle = h5py.File(path, "r")
        except OSError:
            raise fail(f"{path} is not a readable HDF5 file (corrupt, or not HDF5)") from None
        try:
            if handle.attrs.get("format") != FORMAT:
                raise fail(f"{path} is an HDF5 file but not a tc activation cache")
            cache = cls(path, handle)
            for name in _dataset_names(cache.layers) + ["tokens"]:
                if name not in handle:
                    raise fail(f"{path} lacks dataset /{name}: corrupt cache")
            check_joined_sources(handle, path)  # a torchrun cache: its shards must all be there
            return cache
        except TcError:
            handle.close()
            raise
        except Exception as exc:
            handle.close()
            raise fail(f"{path} is a damaged tc activation cache ({type(exc).__name__})") from None

    def read(self, layer: int, which: str, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """Activations of tokens [start, stop) at ``layer``: float32 [stop - start, d_model]."""
        if which not in WHICH:
            raise fail(f"unknown activation {which!r}: use mlp_in or mlp_out")
        if layer not in self.layers:
            raise fail(f"{self.path} holds no layer {layer} (has {', '.join(map(str, self.layers))})")
        stop = self.n_tokens if stop is None else stop
        if not 0 <= start <= stop <= self.n_tokens:
            raise fail(f"token range {start}:{stop} is outside the {self.n_tokens} tokens of {self.path}")
        return from_storage(self._f[f"layers/{layer}/{which}"][start:stop], self.storage)

    def tokens(self) -> np.ndarray:
        """Token ids of the rows written: int32 [n_rows, context]."""
        return self._f["tokens"][: self.n_rows]

    def doc_ids(self) -> np.ndarray:
        return self._f["doc_ids"][: self.n_rows]

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "ActivationCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _plain(value: Any) -> Any:
    """HDF5 attribute -> plain Python value."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


def summarize(cache: ActivationCache) -> dict:
    """What `tc info` shows for a cache."""
    a = cache.attrs
    per_token = cache.d_model * numpy_storage_dtype(a["dtype"]).itemsize * 2 * len(cache.layers)
    return {
        "kind": "activation-cache",
        "path": str(cache.path),
        "complete": cache.complete,
        "model": a.get("model"),
        "model_path": a.get("model_path"),  # caches before it recorded the path alone, as "model"
        "architecture": a.get("architecture"),
        "layers": cache.layers,
        "d_model": cache.d_model,
        "context": cache.context,
        "tokens_written": cache.n_tokens,
        "tokens_total": int(a.get("n_rows", 0)) * cache.context,
        "tokens_requested": a.get("tokens_requested"),
        "dtype": a.get("dtype"),
        "storage": cache.storage,
        "compression": a.get("compression"),
        "activation_bytes": cache.n_tokens * per_token,
        "file_bytes": cache.path.stat().st_size,
        "data_sources": json.loads(a.get("data_sources", "[]")),
        "seed": a.get("seed"),
        "weight_processing": json.loads(a.get("weight_processing", "{}")),
        "hook_names": cache.hook_names,
        "engine": a.get("engine", "bridge"),  # caches from before --engine were all made by the bridge
        "attention": a.get("attention", "bridge-eager"),
        "tc_version": a.get("tc_version"),
    }


# ============================================================================ torchrun: shards and the joined file
# (how the ranks split the rows and step together: tccli/runtime/distributed.py's docstring)


SHARD_ATTRS = ("shard_rank", "shard_count", "shard_first_row", "total_rows")
ROW_DATASETS = ("tokens", "doc_ids")


def run_sharded_cache(config: Any, log: Callable[[str], None], progress: Any, stdin: Any) -> Any:
    """`tc cache` under torchrun: this rank's shard, then (rank 0) the joined virtual-dataset file."""
    if "-" in config.data:
        raise fail("--data - (stdin) cannot be shared among torchrun ranks; give files")
    out = Path(config.out).expanduser()
    if (out.exists() or out.is_symlink()) and not (config.resume or config.force):
        raise fail(f"{out} already exists: pass --resume to complete an interrupted run or --force to overwrite it")
    with session(config.dist_timeout, config.device) as context:
        shard_out = shard_path(out, context.rank, context.world)
        shard_config = dataclasses.replace(config, out=str(shard_out))
        prefix = f"rank {context.rank}/{context.world}: "
        began = time.monotonic()
        result = run_cache(shard_config, log=lambda message: log(prefix + message),
                           progress=progress if context.is_main else None, stdin=stdin,
                           shard=Shard(context.rank, context.world, heartbeat=lambda: context.vote(True)))
        while context.vote(False):  # step with the ranks still caching until every shard is complete
            pass
        if context.is_main:
            n_tokens = write_joined_cache(out, [shard_path(out, r, context.world) for r in range(context.world)])
            log(f"joined {context.world} shards into {out}")
            result = CacheResult(out, n_tokens, result.resumed_from_row, time.monotonic() - began)
        context.barrier()
        return result


def _shard_summary(path: Path) -> dict:
    """Root attributes and dataset descriptions of a complete shard; TcError otherwise."""
    import h5py

    if not path.is_file():
        raise fail(f"shard {path} is missing")
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs.items())
            datasets = {}
            f.visititems(lambda name, obj: datasets.__setitem__(name, (obj.shape, obj.dtype, dict(obj.attrs)))
                         if isinstance(obj, h5py.Dataset) else None)
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
    if row_starts != list(np.cumsum([0] + row_counts[:-1])) or sum(row_counts) != total_rows or any(
            s["attrs"]["config"] != first["config"] for s in summaries):
        raise fail(f"the shards {shards[0].name} ... do not belong to one run; run again with --force")
    attrs = {k: v for k, v in first.items() if k not in SHARD_ATTRS}
    attrs.update(n_rows=total_rows, tokens_written=total_rows * context, complete=True,
                 shards=json.dumps([{"file": p.name, "first_row": a, "n_rows": n}
                                    for p, a, n in zip(shards, row_starts, row_counts)]))
    tmp = out.with_name(out.name + ".joining")
    with h5py.File(tmp, "w") as f:
        for name, (shape, dtype, dataset_attrs) in summaries[0]["datasets"].items():
            per_row = 1 if name in ROW_DATASETS else context  # /tokens and /doc_ids hold rows, the rest tokens
            layout = h5py.VirtualLayout(shape=(total_rows * per_row,) + shape[1:], dtype=dtype)
            for path, start, count in zip(shards, row_starts, row_counts):
                layout[start * per_row:(start + count) * per_row] = h5py.VirtualSource(
                    path.name, name, shape=(count * per_row,) + shape[1:])
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
        if summary["config"] != handle.attrs["config"] or int(summary["n_rows"]) != int(entry["n_rows"]) or int(
                summary["shard_first_row"]) != int(entry["first_row"]):
            raise fail(f"shard {entry['file']} of {path} is from another run; run the torchrun cache again")
