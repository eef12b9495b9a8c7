"""What the tc train tests share: an in-memory cache with the ActivationCache API (``ArrayCache``), a toy
cache of it, and a small training config, so that most tests do not depend on `tc cache`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tccli.config.training import TrainConfig

D = 8


class ArrayCache:
    """An in-memory stand-in for tccli.data.cache_reader.ActivationCache (same attributes and read())."""

    def __init__(self, arrays: dict[int, tuple[np.ndarray, np.ndarray]], context: int, complete: bool = True):
        self.arrays = arrays
        self.layers = sorted(arrays)
        self.context = context
        n = len(next(iter(arrays.values()))[0])
        self.n_rows = n // context
        self.n_tokens = self.n_rows * context
        self.d_model = next(iter(arrays.values()))[0].shape[1]
        self.complete = complete
        n_layers = max(self.layers) + 1
        self.model_info = {
            "name": "toy",
            "architecture": "ToyForCausalLM",
            "n_layers": n_layers,
            "weight_processing": {"fold_ln": True},
            "layers": [
                {"mlp_in": f"blocks.{i}.ln2.hook_normalized", "mlp_out": f"blocks.{i}.hook_mlp_out"}
                for i in range(n_layers)
            ],
        }
        self.attrs = {"complete": complete}
        self.reads = 0

    def read(self, layer: int, which: str, start: int, stop: int) -> np.ndarray:
        self.reads += 1
        return self.arrays[layer][0 if which == "mlp_in" else 1][start:stop]

    def close(self) -> None:
        pass


def toy_cache(n_rows: int = 64, context: int = 16, layers=(0, 1), seed: int = 0, complete: bool = True) -> ArrayCache:
    """Targets a fixed sparse-ish nonlinear function of the inputs, with offsets so means matter."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for layer in layers:
        x = rng.normal(size=(n_rows * context, D)).astype(np.float32) + 1.5
        W = rng.normal(size=(D, D)).astype(np.float32)
        y = (np.maximum(x @ W, 0) - 0.5 + layer).astype(np.float32)
        arrays[layer] = (x, y)
    return ArrayCache(arrays, context, complete)


def small_config(tmp_path: Path, name: str = "out", **overrides) -> TrainConfig:
    base = dict(
        cache="toy.h5",
        out=str(tmp_path / name),
        expansion=4,
        batch_size=64,
        tokens=64 * 40,
        shuffle_buffer=256,
        warmup_steps=5,
        log_every=10,
        checkpoint_every=0,
        quiet=True,
        k=4,
        dead_window=5,
    )
    base.update(overrides)
    return TrainConfig(**base)
