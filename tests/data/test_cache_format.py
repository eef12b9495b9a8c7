"""tc cache's file format: bfloat16 storage round trip, the write plan, the disk estimate."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from tccli.config.data import CacheConfig
from tccli.data.cache_format import attribute_bytes, from_storage, make_plan, to_storage


def test_bfloat16_storage_round_trips_bit_exact():
    values = torch.randn(64, 16) * torch.logspace(-30, 30, 16)
    values[0, :4] = torch.tensor([0.0, -0.0, float("inf"), 1e-40])  # signed zero, inf, subnormal
    bf16 = values.to(torch.bfloat16)
    stored = to_storage(values, "bfloat16")
    assert stored.dtype == np.uint16
    back = torch.from_numpy(from_storage(stored, "bfloat16-as-uint16"))
    assert torch.equal(back.to(torch.bfloat16).view(torch.int16), bf16.view(torch.int16))
    assert torch.equal(back, bf16.float())


def test_plan_commits_on_batch_boundaries_and_chunks_divide_batches():
    config = CacheConfig(model="x", data=["d"], context=128, batch_size=24, dtype="float16", commit_every=50)
    plan = make_plan(config, [0, 1, 2], n_rows=1000, d_model=768)
    assert plan.commit_rows == 72  # 50 rounded up to whole batches
    assert config.batch_size % plan.chunk_rows == 0
    assert plan.chunk_rows * 128 * 768 * 2 <= 2**20
    assert plan.expected_bytes == 1000 * (128 * 768 * 2 * 2 * 3 + 128 * 12)


@pytest.mark.parametrize(
    "n_rows, context, d_model, layers, dtype, batch_size",
    [
        (10, 64, 128, [0, 1], "float16", 32),  # one chunk, mostly padding and attributes
        (1563, 64, 128, [0, 1, 2, 3], "float16", 32),  # the built-in model's 100k-token demo cache
        (7, 128, 768, [0], "float32", 5),
        (3000, 16, 32, [0, 1], "bfloat16", 2),  # thousands of chunks: the index is what counts
        (100, 128, 64, list(range(12)), "float16", 32),  # the last chunk mostly past the data
    ],
)
def test_disk_estimate_bounds_the_real_file_tightly(tmp_path, n_rows, context, d_model, layers, dtype, batch_size):
    from tccli.data.cache_writer import create_file

    config = CacheConfig(model="x", data=["d"], context=context, batch_size=batch_size, dtype=dtype)
    plan = make_plan(config, layers, n_rows=n_rows, d_model=d_model)
    attrs = {
        "model_info": json.dumps({"layers": ["blocks.0.ln2.hook_normalized"] * 300}),
        "complete": False,
        "layers": np.array(layers),
        "tokens_written": 0,
    }
    path = tmp_path / "acts.h5"
    create_file(path, plan, attrs, np.zeros((n_rows, context), np.int32), np.zeros((n_rows, context), np.int64), "none")
    with h5py.File(path, "r+") as f:  # what a finished run writes on top
        f.attrs["complete"] = True
        f.attrs["tokens_written"] = plan.n_tokens
    real = path.stat().st_size
    estimate = plan.file_bytes(attribute_bytes(attrs))
    assert real <= estimate <= 1.05 * real + 128 * 1024, (real, estimate)
