"""What every `tc train` run sets up the same way, per-layer kinds (``train``) and CLTs (``clt_train``) alike: the
--out folder opened, locked and checked (``open_out``), the progress messages (``run_log``), each layer's
generator of initial weights (``layer_generator``) and the step's CPU threads (``step_threads``).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tccli.config.fields import to_json_dict
from tccli.config.training import TrainConfig
from tccli.errors import fail
from tccli.runtime import outputs
from tccli.training.data_stream import check_cache
from tccli.training.run_folder import CONFIG_FILE, check_same_run, make_out_folder, prepare_out, read_run_config


def run_log(config: TrainConfig) -> Any:
    if config.quiet:
        return lambda message: None
    return lambda message: print(f"tc train: {message}", file=sys.stderr)


def open_out(config: TrainConfig, cache: Any, layers: list[int], held: contextlib.ExitStack) -> bool:
    """Rank 0: create and lock --out (``held`` keeps the lock), check what it holds, write the run's config
    first of all (so the run is resumable from here on); whether a started run is continued."""
    out = Path(config.out)
    make_out_folder(out)
    held.enter_context(outputs.locked(out))
    continuing = prepare_out(out, config.resume, config.force, run_log(config))
    if continuing and (out / CONFIG_FILE).is_file():
        saved = read_run_config(out / CONFIG_FILE)
        check_same_run(saved, config, int(cache.d_model), "the run in --out")
        saved_layers = check_cache(cache, config.cache, saved.get("layers", "all"))
        if saved_layers != layers:
            raise fail(f"--resume: --layers gives {layers} but the run in --out trains {saved_layers}")
    if not continuing:
        outputs.atomic_write_text(out / CONFIG_FILE, json.dumps(to_json_dict(config), indent=2))
    return continuing


def layer_generator(seed: int, layer: int) -> torch.Generator:
    """The generator of one layer's initial weights, seeded from (seed, layer) alone (numpy's SeedSequence
    mixes the pair into 64 well-spread bits): a layer starts from the same weights whichever other layers
    the run trains, on whichever rank trains it, and in a resumed run (which draws them again before the
    checkpoint replaces them)."""
    import numpy as np

    state = np.random.SeedSequence([seed, layer]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


def step_threads(requested: int, multiply_adds: int) -> int:
    """--threads, or automatically 1 for a step whose encoder product is under 2^30 multiply-adds (measured on
    stories260K's 64 -> 1,024 at batch 1,024 under a load average of 9 on 2 cores: 52 ms per step with one
    thread, 296 ms with two), else torch's default."""
    if requested:
        return requested
    return 1 if multiply_adds < 2**30 else torch.get_num_threads()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
