"""`tc cache`'s settings and the storage choices they validate against."""

from __future__ import annotations

from dataclasses import dataclass

from tccli.config.fields import CaptureOptions, DataOptions, ModelOptions, option
from tccli.config.runtime import DistributedOptions
from tccli.errors import fail

STORAGE_DTYPES = ("float16", "bfloat16", "float32")


COMPRESSIONS = ("none", "lzf", "gzip")


@dataclass
class CacheConfig(ModelOptions, CaptureOptions, DataOptions, DistributedOptions):
    """Options of `tc cache`."""

    layers: str = option("all", "Layers to cache: all, 2, or a list like 0,3-5.")
    out: str = option("acts.h5", "Output HDF5 file.", flags=("--out", "-o"))
    dtype: str = option(
        "float16", "Storage dtype of activations: float16, bfloat16 (kept bit-exact as uint16) or float32."
    )
    batch_size: int = option(32, "Rows per forward pass.")
    compression: str = option("none", "HDF5 compression: none, lzf or gzip.")
    commit_every: int = option(0, "Rows per crash-safe commit; 0 picks about 64 MiB of activations.", save=False)
    resume: bool = option(False, "Complete an interrupted run of the same arguments.", save=False)
    force: bool = option(False, "Overwrite an existing output file.", save=False)
    quiet: bool = option(False, "No progress on stderr.", save=False)

    def validate(self) -> None:
        ModelOptions.validate(self)
        CaptureOptions.validate(self)
        DataOptions.validate(self)
        DistributedOptions.validate(self)
        if self.dtype not in STORAGE_DTYPES:
            raise fail(f"--dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.dtype!r}")
        if self.compression not in COMPRESSIONS:
            raise fail(f"--compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}")
        if self.batch_size < 1:
            raise fail(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.commit_every < 0:
            raise fail(f"--commit-every must be 0 (auto) or positive, got {self.commit_every}")
        if self.resume and self.force:
            raise fail("--resume and --force contradict each other: pick one")
