"""Reading an activation cache: missing, foreign and corrupt files are refused with one line."""

from __future__ import annotations

import h5py
import pytest

from tccli.data.cache_reader import ActivationCache
from tccli.errors import TcError


def test_reader_rejects_missing_foreign_and_corrupt_files(tmp_path):
    with pytest.raises(TcError, match="does not exist"):
        ActivationCache.open(tmp_path / "missing.h5")
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(TcError, match="not a readable HDF5"):
        ActivationCache.open(corrupt)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(TcError, match="not a tc activation cache"):
        ActivationCache.open(foreign)
