"""A feature's examples as arrays (tccli.features.scoring keeps them as keys while it streams and turns them
into these at the end): the top activating tokens with their context windows, and the quantile sample
sorted into bands of activation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class ExampleArrays:
    """Examples of all features of a layer, as arrays [m, k, ...]; index -1 marks an empty slot."""

    activation: np.ndarray  # [m, k] float32
    token_index: np.ndarray  # [m, k] int64 (row * context + position)
    row: np.ndarray
    position: np.ndarray
    doc: np.ndarray
    window_tokens: np.ndarray  # [m, k, W] int64
    window_acts: np.ndarray  # [m, k, W] float32
    band: Optional[np.ndarray] = None  # [m, k] int64 for quantile examples: 1 (lowest) .. Q (highest)


def sort_into_bands(examples: ExampleArrays, quantiles: int) -> ExampleArrays:
    """Sort each feature's sample by activation (highest first) and label equal-count bands Q..1."""
    valid = examples.token_index >= 0
    order = np.argsort(np.where(valid, -examples.activation, np.inf), axis=1, kind="stable")

    def take(a: np.ndarray) -> np.ndarray:
        idx = order if a.ndim == 2 else order[:, :, None]
        return np.take_along_axis(a, idx, axis=1)

    out = ExampleArrays(
        *(
            take(getattr(examples, name))
            for name in ("activation", "token_index", "row", "position", "doc", "window_tokens", "window_acts")
        )
    )
    n_valid = valid.sum(1, keepdims=True)
    rank_from_bottom = n_valid - 1 - np.arange(order.shape[1])[None, :]
    band = np.where(rank_from_bottom >= 0, rank_from_bottom * max(quantiles, 1) // np.maximum(n_valid, 1) + 1, -1)
    out.band = band.astype(np.int64)
    return out
