"""tccli.training.data_stream: the shuffle schedule and the window loader over a cache, and the cache's
values checked before training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from training_helpers import ArrayCache, small_config, toy_cache

from tccli.errors import TcError
from tccli.training.data_stream import ShuffleSchedule, WindowLoader
from tccli.training.train import train


def test_shuffle_schedule_mixes_rows_and_covers_the_cache_each_epoch():
    n_rows, context = 512, 16  # 8 chunks of 64 rows (1,024 tokens), 2 chunks per window
    schedule = ShuffleSchedule(n_rows, context, batch_size=64, buffer_tokens=2048, seed=3)
    windows = []
    for window in schedule.windows():
        if window.epoch > 0:
            break
        windows.append(window)
    rows = sorted(r for w in windows for a, b in w.row_ranges for r in range(a, b))
    assert rows == list(range(n_rows))  # every row once per epoch
    first = windows[0]
    assert len(windows) == 4 and [w.n_steps for w in windows] == [32] * 4
    assert [a for a, _ in first.row_ranges] != [0]  # not simply the first rows
    # one batch draws from many rows: tokens carry their row index as their value
    row_of_token = np.repeat(np.arange(n_rows), context).astype(np.float32)[:, None]
    cache = ArrayCache({0: (row_of_token, row_of_token)}, context)
    loader = WindowLoader(cache, [0], "transcoder", context, torch.device("cpu"))
    x, _ = loader.load(first)[0]
    batch_rows = set(x[:64, 0].int().tolist())
    assert len(batch_rows) >= 40  # 64 tokens from 128 rows
    assert sorted(x[:, 0].int().tolist()) == sorted(
        r for a, b in first.row_ranges for r in range(a, b) for _ in range(context)
    )
    # the step -> window mapping is a function of the step alone (what resume relies on)
    later = next(schedule.windows(start_step=first.n_steps + 1))
    assert later.first_step <= first.n_steps + 1 < later.first_step + later.n_steps
    loader.close()


def test_non_finite_cache_values_are_refused(tmp_path):
    cache = toy_cache(layers=(0,))
    cache.arrays[0][1][5, 2] = np.inf
    with pytest.raises(TcError, match="non-finite activations in layer 0"):
        train(small_config(tmp_path), cache)
