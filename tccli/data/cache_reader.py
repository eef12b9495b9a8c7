"""Reading an activation cache: `ActivationCache` (activations as float32, token rows, attributes) and
`summarize`, what `tc info` shows for one. The file format: ``tccli.data.cache_format``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tccli.data.cache_format import FORMAT, WHICH, dataset_names, from_storage, numpy_storage_dtype
from tccli.data.cache_shards import check_joined_sources
from tccli.errors import TcError, fail
from tccli.runtime import inputs


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
    def open(cls, path: str | Path) -> ActivationCache:
        import h5py

        if inputs.is_stdin(path):
            raise inputs.cannot_seek("an activation cache")
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
            for name in dataset_names(cache.layers) + ["tokens"]:
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

    def __enter__(self) -> ActivationCache:
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
