"""Step time of `tc train --kind clt` against its FLOP ceiling, on the CPU (or a GPU with --device cuda).

A CLT step is dense: per layer the encoder forward ``[n x d] x [d x m]`` and its weight gradient, per source
layer the decoder forward ``[n x m] x [m x (L - l) d]`` (one product covering all its target layers) and its two
gradients (weight and activations). Its matrix products therefore cost

    4 n d m L  +  3 n m d L (L + 1)        FLOP per step (n tokens, L layers, m features per layer)

and nothing can do the step faster than a plain matrix product of that many FLOPs. The ceiling is measured in
the same process, interleaved with the steps (the machine is shared): a ``[n x m] x [m x L d]`` product (the
step's largest shape), its FLOP/s applied to the step's FLOP count. The ratio printed is ceiling time / step
time (target >= 50%). The step is ``tccli.training.clt_train.train_clt_step`` on tensors already in memory:
the whole optimiser step (loss, backward, Adam, dead-feature counters), without the data stream.

    python benchmarks/clt_train_speed.py [--activation jumprelu relu topk batchtopk] [--layers 6] [--d 128]
        [--features 1024] [--batch-size 1024] [--k 16] [--rounds 5] [--threads N] [--device cpu|cuda]

Measured on the shared 2-core machine (ceiling = best of 3 products per round, median of the rounds), before
the pre-activation penalty stopped using torch.where over its random mask: with --threads 1, at the defaults
(6 layers, d 128, 1,024 features, batch 1,024) jumprelu 46%, relu 55%, topk 63%, batchtopk 56% of the ceiling;
at d 256 and 2,048 features jumprelu 68%, relu 74%, topk 80%, batchtopk 71% (the dense products grow with d
and L, the passes over the [n x m] activations do not). After it, jumprelu 47-67% and relu 62-70% at the
defaults (the figure moves with the load on the machine: see docs/pending/issue-25-bench.md). With two threads
and other processes on the cores the figures fall to 13-41%: OpenMP's threads wait for a core the other
processes hold.

Comparison with utahnlp/crosslayer-coding's trainer on the same shapes: clt_train_vs_crosslayer_coding.py.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tccli.config.training import TrainConfig
from tccli.runtime import distributed
from tccli.training import clt_step
from tccli.training.clt_train import initial_clt, new_state, settings_of, train_clt_step
from tccli.training.data_stream import DataStats


class Shapes:
    """What initial_clt reads of a cache."""

    def __init__(self, layers: int, d: int):
        self.d_model = d
        self.model_info = {
            "name": "benchmark",
            "architecture": "none",
            "n_layers": layers,
            "weight_processing": {},
            "layers": [{"mlp_in": f"in{i}", "mlp_out": f"out{i}"} for i in range(layers)],
        }


def step_flops(n: int, d: int, m: int, layers: int) -> float:
    return 4.0 * n * d * m * layers + 3.0 * n * m * d * layers * (layers + 1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_matmul(n: int, m: int, width: int, repeats: int, device: torch.device) -> float:
    """FLOP/s of [n x m] x [m x width], best of ``repeats`` after a warm-up."""
    a = torch.randn(n, m, device=device)
    b = torch.randn(m, width, device=device)
    out = torch.empty(n, width, device=device)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n * m * width / best


def tc_step(activation: str, n: int, d: int, m: int, n_layers: int, k: int, device: torch.device):
    """``step(i)``: one ``train_clt_step`` of a fresh CLT on random tensors already on ``device`` (seed 0)."""
    gen = torch.Generator().manual_seed(0)
    layers = list(range(n_layers))
    inputs = [torch.randn(n, d, generator=gen) for _ in layers]
    mixers = [torch.randn(d, d, generator=gen) / d**0.5 for _ in layers]
    targets = [torch.relu(x @ w) for x, w in zip(inputs, mixers)]
    stats = {
        j: DataStats(inputs[j].mean(0), targets[j].mean(0), inputs[j], targets[j], float(targets[j].var(0).sum()))
        for j in layers
    }
    inputs = [x.to(device) for x in inputs]
    targets = [y.to(device) for y in targets]
    config = TrainConfig(
        cache="none",
        out="none",
        kind="clt",
        activation=activation,
        features=m,
        k=k,
        batch_size=n,
        tokens=n * 1000,
        device=str(device),
        aux_k=0,  # the dead-feature path runs only when features die; timed without it
    )
    config.validate()
    whole, scales = initial_clt(config, Shapes(n_layers, d), layers, stats)
    state = new_state(whole, config, distributed.SINGLE_PROCESS, device, scales)
    settings = settings_of(config)

    def step(i: int) -> None:
        train_clt_step(
            state,
            inputs,
            targets,
            config,
            settings,
            scales,
            i,
            1e-4,
            clt_step.ONE_PROCESS,
            distributed.SINGLE_PROCESS,
            False,
        )

    return step


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The step's shape and activations, the same options in both CLT training benchmarks."""
    parser.add_argument("--activation", nargs="+", default=["jumprelu", "relu", "topk", "batchtopk"])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--k", type=int, default=16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of steps and ceiling")
    parser.add_argument("--steps", type=int, default=3, help="steps timed per round")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n, d, m, n_layers = args.batch_size, args.d, args.features, args.layers
    flops = step_flops(n, d, m, n_layers)
    print(
        f"CLT step: {n_layers} layers, d {d}, {m} features per layer, batch {n}, {torch.get_num_threads()} "
        f"thread(s), {device}; {flops / 1e9:.2f} GFLOP of matrix products per step"
    )
    for activation in args.activation:
        step = tc_step(activation, n, d, m, n_layers, args.k, device)
        step(0)  # warm-up
        step_times, ceilings = [], []
        for _ in range(args.rounds):
            ceilings.append(time_matmul(n, m, n_layers * d, 3, device))
            synchronize(device)
            start = time.perf_counter()
            for i in range(args.steps):
                step(i + 1)
            synchronize(device)
            step_times.append((time.perf_counter() - start) / args.steps)
        step_time = statistics.median(step_times)
        ceiling = statistics.median(ceilings)
        floor = flops / ceiling
        print(
            f"{activation:10s} step {step_time * 1e3:8.1f} ms   matmul ceiling {ceiling / 1e9:6.1f} GFLOP/s -> "
            f"floor {floor * 1e3:7.1f} ms   ratio {floor / step_time:5.1%}   "
            f"({n / step_time:,.0f} tokens/s)"
        )


if __name__ == "__main__":
    main()
