"""The HDF5 activation cache's file format, as `tc cache` writes it and `ActivationCache` reads it: the
layout, the root attributes, the storage dtypes, the write plan (rows per commit and per chunk, the size on
disk) and the progress file that marks a file still being written.

File layout (one HDF5 file)::

    /tokens                 int32  [n_rows, context]        token ids, every row starting with BOS
    /doc_ids                int64  [n_rows, context]        document (reading order) of each token
    /layers/{L}/mlp_in      dtype  [n_rows*context, d_model] MLP input (normalised residual) of layer L
    /layers/{L}/mlp_out     dtype  [n_rows*context, d_model] MLP output of layer L

Token ``n`` of the activation datasets is row ``n // context``, position ``n % context``. Root attributes
describe everything needed to use the file later (see ``static_attributes``). ``bfloat16`` has no HDF5
type: it is stored as ``uint16`` holding the upper 16 bits of each float32 (the bfloat16 bit pattern),
marked by the attribute ``storage = "bfloat16-as-uint16"``; `ActivationCache.read`
(``tccli.data.cache_reader``) turns it back into float32 exactly.

How a file is written crash-safely, and resumed: ``tccli.data.cache_writer``; a torchrun cache's shards
and the joined file over them: ``tccli.data.cache_shards``.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tccli import __version__
from tccli.config.data import CacheConfig
from tccli.config.fields import parse_layers, to_json_dict
from tccli.errors import TcError, fail
from tccli.runtime import outputs

FORMAT = "tc-activation-cache"
PROGRESS_FORMAT = "tc-activation-cache-progress"
WHICH = ("mlp_in", "mlp_out")
BF16_STORAGE = "bfloat16-as-uint16"
COMMIT_BYTES = 64 * 2**20  # bytes of activations per crash-safe commit (when --commit-every is 0)
CHUNK_BYTES = 2**20  # target size of one HDF5 chunk
# Options that decide what the file holds (a resumed run must match them); others (timeouts, --quiet) do not.
CONTENT_OPTIONS = (
    "model",
    "model_dtype",
    "engine",
    "data",
    "tokens",
    "context",
    "seed",
    "layers",
    "dtype",
    "batch_size",
    "compression",
)
# HDF5's own bytes, bounds measured on files tc writes (tests/data/test_cache_format.py checks them): a chunked
# dataset's B-tree costs under 100 bytes per chunk (a 64-entry node is about 2 KiB), its object header about
# 1 KiB; the superblock, root group and free space come to a few KiB. Attributes are counted from their values.
HDF5_BYTES_PER_CHUNK = 100
HDF5_BYTES_PER_DATASET = 4096
HDF5_FIXED_BYTES = 64 * 1024


def dataset_names(layers: list[int]) -> list[str]:
    """The activation datasets of a file holding ``layers``, in the order they are written and checksummed."""
    return [f"layers/{L}/{which}" for L in layers for which in WHICH]


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
    chunk_rows = max(
        d
        for d in range(1, config.batch_size + 1)
        if config.batch_size % d == 0 and (d == 1 or d * per_dataset_row <= CHUNK_BYTES)
    )
    return CachePlan(
        layers=layers,
        n_rows=n_rows,
        context=config.context,
        d_model=d_model,
        dtype=config.dtype,
        batch_size=config.batch_size,
        commit_rows=commit_rows,
        chunk_rows=min(chunk_rows, n_rows),
    )


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


# ============================================================================ file attributes


def config_fingerprint(config: CacheConfig, device: str, n_layers: Optional[int] = None) -> dict:
    """The arguments that decide the file's content, by meaning: the model as ``models.model_identity``
    names it, data paths resolved, the layer list resolved (given ``n_layers``). A resumed run must match."""
    saved = to_json_dict(config)
    fingerprint = {key: saved[key] for key in CONTENT_OPTIONS}
    fingerprint["device"] = device
    return fingerprint_meaning(fingerprint, n_layers)


def fingerprint_meaning(fingerprint: Optional[dict], n_layers: Optional[int]) -> Optional[dict]:
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
        out["data"] = [item if item == "-" else os.path.realpath(os.path.expanduser(str(item))) for item in out["data"]]
    layers = out.get("layers")
    if n_layers is not None and isinstance(layers, str):
        with contextlib.suppress(TcError):
            out["layers"] = parse_layers(layers, n_layers)
    return out


def static_attributes(
    config: CacheConfig,
    info: Any,
    plan: CachePlan,
    device: str,
    available_tokens: Optional[int],
    engine: str = "bridge",
    attention: str = "bridge-eager",
) -> dict:
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
