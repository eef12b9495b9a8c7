"""`tc cache` in-process, in the command's steps (check and lock the output, load the model, write), and a
file's whole content for comparing caches."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import h5py
import numpy as np

from tccli.config.data import CacheConfig
from tccli.data.cache_writer import CacheResult, cache_output, write_cache
from tccli.model.loading import load_model


def cache_in_process(
    config: CacheConfig,
    log: Callable[[str], None] = lambda s: None,
    progress: Optional[Callable[[int, int], None]] = None,
    stdin: Any = None,
    shard: Any = None,
) -> CacheResult:
    """What `tc cache` (tccli.cli.app.cache_command) does with ``config``, here in this process; ``shard``
    (a ``tccli.runtime.distributed.Shard``) writes only that shard's rows."""
    with cache_output(config, shard) as output:
        loaded = load_model(config.model, config.device, config.model_dtype)
        return write_cache(output, loaded, log=log, progress=progress, stdin=stdin)


def file_content(path: Path) -> dict:
    """Every dataset's bytes and every attribute (root and datasets) of an HDF5 file."""
    content = {}
    with h5py.File(path, "r") as f:
        content["/"] = {k: np.asarray(v).tolist() for k, v in f.attrs.items()}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                content[name] = (
                    obj.dtype.str,
                    obj.shape,
                    hashlib.sha256(obj[()].tobytes()).hexdigest(),
                    {k: np.asarray(v).tolist() for k, v in obj.attrs.items()},
                )

        f.visititems(visit)
    return content
