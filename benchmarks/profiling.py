"""Where a benchmark's time goes: torch.profiler's table of the costliest operators, and on a GPU every
line of Python that made the host wait for the device (a synchronisation), counted.

Used by the benchmarks' --profile flag; prints to stdout.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable

import torch


def profile(label: str, run: Callable[[], None], device: torch.device, rows: int = 18) -> None:
    """Run ``run()`` once under the profiler and print what took the time and where the host waited."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    sync_sites: collections.Counter = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if on_gpu:
            torch.cuda.set_sync_debug_mode("warn")  # a warning at every synchronising call
        try:
            with torch_profile(activities=activities) as prof:
                run()
                if on_gpu:
                    torch.cuda.synchronize(device)
        finally:
            if on_gpu:
                torch.cuda.set_sync_debug_mode("default")
    for warning in caught:
        if "synchroniz" in str(warning.message):
            sync_sites[f"{warning.filename}:{warning.lineno}"] += 1
    sort_by = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    print(f"--- profile: {label} (sorted by {sort_by})")
    print(prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=60))
    if on_gpu:
        print(f"--- host waited for the GPU at {sum(sync_sites.values())} calls:")
        for site, count in sync_sites.most_common(20):
            print(f"  {count:5d}  {site}")
