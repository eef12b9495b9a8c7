"""Data-parallel training throughput of `tc train` on 1 and 2 processes (torchrun), printed as a ratio.

    python benchmarks/distributed_scaling.py [--d-model 256] [--expansion 16] [--batch-size 4096]
                                             [--steps 30] [--device cpu|cuda] [--procs 1,2]

Writes a synthetic activation cache (one layer, random inputs, a fixed nonlinear target) to a temporary
folder, then for each process count runs `torchrun --standalone --nproc-per-node N` on this script in
worker mode, which times `tccli.training.train.train` (the whole run: statistics, initialisation, the step loop
with its all-reduces, saving) and prints tokens/s from rank 0. Every process runs one torch thread
(torchrun's OMP_NUM_THREADS=1); for comparison the 1-process run is repeated with as many threads as the
largest process count. On CPU, 2 processes share this machine's cores with each other (and with anyone
else using it), so the ratio says what data parallelism costs or gains here, not on separate machines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def write_cache(path: Path, d_model: int, n_tokens: int, context: int = 128) -> None:
    sys.path.insert(0, str(HERE))
    from train_throughput import write_hdf5  # the minimal cache layout the training benchmark uses

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n_tokens, d_model)).astype(np.float32)
    y = np.maximum(x @ rng.normal(size=(d_model, d_model)).astype(np.float32) / np.sqrt(d_model), 0)
    write_hdf5(path, x, y.astype(np.float32), context)


def worker(args: argparse.Namespace) -> None:
    import torch

    from tccli.config.training import TrainConfig
    from tccli.training.train import train

    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(
        cache=args.cache,
        out=args.out,
        expansion=args.expansion,
        k=32,
        batch_size=args.batch_size,
        tokens=args.batch_size * args.steps,
        shuffle_buffer=args.batch_size * 8,
        warmup_steps=5,
        checkpoint_every=0,
        log_every=10**9,
        quiet=True,
        device=args.device,
    )
    start = time.perf_counter()
    train(config)
    seconds = time.perf_counter() - start
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"seconds": seconds, "tokens": config.tokens}))


def launch(procs: int, threads: int, cache: Path, out: Path, args: argparse.Namespace) -> float:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(procs),
        str(Path(__file__).resolve()),
        "--worker",
        "--cache",
        str(cache),
        "--out",
        str(out),
        "--threads",
        str(threads),
        "--d-model",
        str(args.d_model),
        "--expansion",
        str(args.expansion),
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--device",
        args.device,
    ]
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), OMP_NUM_THREADS=str(threads))
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"torchrun with {procs} processes failed:\n{result.stderr[-3000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    return figures["tokens"] / figures["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--procs", default="1,2", help="process counts to compare, e.g. 1,2")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    counts = [int(n) for n in args.procs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "acts.h5"
        write_cache(cache, args.d_model, args.batch_size * 16)
        print(
            f"d_model {args.d_model}, {args.expansion * args.d_model} features (topk 32), batch "
            f"{args.batch_size} tokens, {args.steps} steps, device {args.device}, {os.cpu_count()} CPU cores"
        )
        rates = {}
        for procs in counts:
            rates[procs] = launch(procs, 1, cache, Path(tmp) / f"run{procs}", args)
            print(f"{procs} process(es), 1 thread each: {rates[procs]:,.0f} tokens/s")
        if max(counts) > 1 and args.device == "cpu":
            threaded = launch(1, max(counts), cache, Path(tmp) / "threads", args)
            print(f"1 process, {max(counts)} threads: {threaded:,.0f} tokens/s")
        base = rates[min(counts)]
        for procs in counts[1:]:
            print(f"ratio {procs} processes / {min(counts)}: {rates[procs] / base:.2f}")


if __name__ == "__main__":
    main()
