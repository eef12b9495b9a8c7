"""Training throughput of `tc train`'s step loop at GPT-2-small dimensions, against the floor every method shares.

Prints tokens/s of the real step loop (tccli.training.data_stream's WindowLoader with its prefetch thread,
tccli.training.train's train_one_step) fed from memory and from an HDF5 activation cache, for each kind
asked for, beside the ceiling measured in the same process: the matrix-multiply FLOP/s of the encoder
product's own shape ([batch x d] x [d x m], the weight in the layout tc trains it in) divided by 2·d·m
FLOP per token. That product (the encoder forward) is the one dense product any trainer must do; tc's
sparse step does no other (the encoder gradient is summed over the k selected features only, the b_pre
gradient is a vector-matrix product, the decoder is k-sparse). The ceiling is re-measured before and
after every timed loop and averaged, because the machine is shared.

    python benchmarks/train_throughput.py [--activation topk batchtopk jumprelu] [--steps 4]
        [--batch-size 4096] [--threads N] [--device cpu|cuda] [--autocast bfloat16] [--default-malloc] [--profile]

Targets (issue 12): >= 60% of the ceiling from memory and >= 55% from HDF5, at 768 -> 24,576, k 32,
batch 4,096, for topk, batchtopk and jumprelu. The HDF5 file is written to a temporary folder first and
is then probably in the page cache, so the "HDF5" figure measures h5py reading and the overlap of reading
with compute, not a cold disk.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tccli.config.training import TrainConfig
from tccli.runtime import allocator
from tccli.training.data_stream import DataStats, ShuffleSchedule, WindowLoader
from tccli.training.train import new_layer_state, train_one_step, transcoder_config


class MemorySource:
    """Activations held in RAM, served through the same read() the HDF5 cache offers."""

    def __init__(self, x: np.ndarray, y: np.ndarray, context: int):
        self.x, self.y, self.context = x, y, context
        self.n_tokens, self.d_model = x.shape
        self.n_rows = self.n_tokens // context
        self.layers = [0]
        self.model_info = {
            "name": "benchmark",
            "architecture": "none",
            "n_layers": 1,
            "weight_processing": {},
            "layers": [{"mlp_in": "mlp_in", "mlp_out": "mlp_out"}],
        }

    def read(self, layer: int, which: str, start: int, stop: int) -> np.ndarray:
        return (self.x if which == "mlp_in" else self.y)[start:stop]

    def close(self) -> None:
        pass


def write_hdf5(path: Path, x: np.ndarray, y: np.ndarray, context: int) -> None:
    """A minimal file in the tc activation-cache layout (only what ActivationCache.open reads)."""
    import h5py

    from tccli.data.cache_format import FORMAT

    n, d = x.shape
    with h5py.File(path, "w") as f:
        f["tokens"] = np.zeros((n // context, context), dtype=np.int32)
        f["doc_ids"] = np.zeros((n // context, context), dtype=np.int64)
        f["layers/0/mlp_in"] = x
        f["layers/0/mlp_out"] = y
        f.attrs.update(
            format=FORMAT,
            complete=True,
            tokens_written=n,
            context=context,
            d_model=d,
            dtype="float32",
            storage="float32",
            layers=[0],
            model_info=json.dumps(MemorySource(x, y, context).model_info),
            hook_names=json.dumps({"0": {"mlp_in": "mlp_in", "mlp_out": "mlp_out"}}),
        )


class MatmulProbe:
    """Times [batch x d] x [d x m] with the weight stored feature-major, as tc train stores W_enc."""

    def __init__(self, batch: int, d: int, m: int, device: torch.device, dtype: torch.dtype):
        self.a = torch.randn(batch, d, device=device, dtype=dtype)
        self.b = torch.randn(m, d, device=device, dtype=dtype).t()
        self.out = torch.empty(batch, m, device=device, dtype=dtype)
        self.flops = 2 * batch * d * m
        self.device = device
        self()

    def __call__(self) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        torch.mm(self.a, self.b, out=self.out)
        synchronize(self.device)
        return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(
    source, config: TrainConfig, steps: int, device: torch.device, probe: MatmulProbe
) -> tuple[list[float], list[float]]:
    """(seconds of each of ``steps`` training steps, window loading included, after two warm-up steps;
    seconds of the probe product timed just before each of them). Interleaving the two makes their
    ratio fair on a machine whose load changes from minute to minute."""
    tc_config = transcoder_config(config, source, 0)
    sample = min(8192, source.n_tokens)
    x0 = torch.from_numpy(source.read(0, "mlp_in", 0, sample))
    y0 = torch.from_numpy(source.read(0, "mlp_out", 0, sample))
    stats = DataStats(x0.mean(0), y0.mean(0), x0, y0, float((y0 - y0.mean(0)).pow(2).sum(-1).mean()))
    state = new_layer_state(tc_config, stats, config, torch.Generator().manual_seed(0), device)
    schedule = ShuffleSchedule(source.n_rows, source.context, config.batch_size, config.shuffle_buffer, 0)
    loader = WindowLoader(source, [0], config.kind, source.context, device)
    lr = config.learning_rate_for(tc_config.n_features)
    step_times: list[float] = []
    probe_times: list[float] = []
    done, warmup, window, data = 0, 2, None, None
    try:
        stream = loader.stream(schedule.windows())
        while True:
            if done >= warmup:
                probe_times.append(probe())
            start = time.perf_counter()
            # as in run_steps: the next window comes from the loader (prefetched) when the current one ends
            if window is None or done - window.first_step >= window.n_steps:
                window, data = next(stream)
            batch_index = done - window.first_step
            rows = slice(batch_index * config.batch_size, (batch_index + 1) * config.batch_size)
            train_one_step(state, data[0][0][rows], data[0][1][rows], config, done, lr, 0, False)
            synchronize(device)
            if done >= warmup:
                step_times.append(time.perf_counter() - start)
            done += 1
            if done == steps + warmup:
                return step_times, probe_times
    finally:
        loader.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--activation",
        nargs="+",
        choices=("topk", "batchtopk", "jumprelu", "relu"),
        default=["topk", "batchtopk", "jumprelu"],
    )
    parser.add_argument("--optimizer", choices=("adam", "signum"), default=None, help="default: tc train's")
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--features", type=int, default=24_576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per source (after two warm-up steps)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=("none", "bfloat16"), default="none")
    parser.add_argument("--no-hdf5", action="store_true", help="only the in-memory loop")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc settings as they are (tc train changes them: tccli.runtime.allocator)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="then profile 4 more steps from memory per kind (benchmarks/profiling.py)",
    )
    args = parser.parse_args()
    if not args.default_malloc:
        allocator.keep_freed_memory()  # as tc train does
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    d, m, batch, context = args.d_model, args.features, args.batch_size, 128
    # three windows' worth of tokens, so the timed steps cross a window boundary and the prefetch matters
    buffer_tokens = batch * max(2, (args.steps + 2) // 2 + 1)
    n_tokens = 2 * buffer_tokens
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n_tokens, d), dtype=np.float32)
    y = rng.standard_normal((n_tokens, d), dtype=np.float32)
    dtype = torch.bfloat16 if args.autocast == "bfloat16" and device.type == "cuda" else torch.float32
    print(
        f"d_model {d} -> {m} features, k {args.k}, batch {batch}, {torch.get_num_threads()} threads, "
        f"device {device}, encoder product in {dtype}; ceiling = matmul FLOP/s / (2 d m) per token"
    )
    tmp = tempfile.TemporaryDirectory()
    path = Path(tmp.name) / "bench.h5"
    if not args.no_hdf5:
        write_hdf5(path, x, y, context)
    from tccli.data.cache_reader import ActivationCache

    probe = MatmulProbe(batch, d, m, device, dtype)
    for activation in args.activation:
        overrides = {} if args.optimizer is None else {"optimizer": args.optimizer}
        config = TrainConfig(
            cache="-",
            out="-",
            activation=activation,
            features=m,
            k=args.k,
            batch_size=batch,
            tokens=10**12,
            shuffle_buffer=buffer_tokens,
            aux_k=0,
            ghost_grads=False,
            device=args.device,
            autocast=args.autocast,
            threads=torch.get_num_threads(),
            **overrides,
        )
        flops_per_token = (10 if activation == "relu" else 2) * d * m  # relu: dense, every product counted
        sources = [("memory", lambda: MemorySource(x, y, context))]
        if not args.no_hdf5:
            sources.append(("HDF5", lambda: ActivationCache.open(path)))
        for label, open_source in sources:
            source = open_source()
            try:
                step_times, probe_times = timed_steps(source, config, args.steps, device, probe)
            finally:
                source.close()
            rate = args.steps * batch / sum(step_times)
            peak = probe.flops * len(probe_times) / sum(probe_times)
            ceiling = peak / flops_per_token
            target = 60 if label == "memory" else 55
            print(
                f"{activation:9s} {label:6s}: {rate:9,.0f} tokens/s; matmul {peak / 1e9:.1f} GFLOP/s -> ceiling "
                f"{ceiling:,.0f} tokens/s; {100 * rate / ceiling:.0f}% (target >= {target}%); steps "
                f"{' '.join(f'{t:.2f}' for t in step_times)} s, "
                f"products {' '.join(f'{t:.2f}' for t in probe_times)} s; load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        if args.profile:
            import profiling

            source = MemorySource(x, y, context)
            profiling.profile(
                f"{activation}, 4 steps from memory after 2 warm-up steps",
                lambda source=source, config=config: timed_steps(source, config, 4, device, probe),
                device,
            )
    tmp.cleanup()


if __name__ == "__main__":
    main()
