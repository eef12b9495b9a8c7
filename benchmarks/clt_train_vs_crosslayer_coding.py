"""CLT step time of tc against utahnlp/crosslayer-coding's trainer on the same shapes, on the CPU, interleaved.

crosslayer-coding lives in its own virtual environment (it is not on PyPI; see docs/pending/issue-25-bench.md
for how it was installed); its step runs in a worker process under that environment's Python
(benchmarks/crosslayer_coding_worker.py), kept alive for the whole activation and asked for ``--steps`` steps
per round. Each round times, in an order that alternates between rounds: the matrix-product ceiling (as in
clt_train_speed.py), tc's step (``train_clt_step``) in this process, and crosslayer-coding's step in the
worker. Both use ``--threads`` threads. Printed per activation: the median step times, their ratio
(crosslayer-coding / tc: above 1, tc is faster) and each step's share of the FLOP ceiling: both against the
floor of tc's step FLOPs (the least the step needs), and crosslayer-coding's against the floor of the products
it does run (``clc_step_flops``: its step encodes every layer three times, see the doc).

    python benchmarks/clt_train_vs_crosslayer_coding.py --compare-clc /tmp/clc-venv/bin/python
        [--activation jumprelu relu topk batchtopk] [--layers 6] [--d 128] [--features 1024]
        [--batch-size 1024] [--k 16] [--rounds 7] [--steps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clt_train_speed import add_shape_arguments, step_flops, tc_step, time_matmul  # noqa: E402

WORKER = Path(__file__).resolve().parent / "crosslayer_coding_worker.py"


def clc_step_flops(n: int, d: int, m: int, layers: int) -> float:
    """crosslayer-coding's step: tc's products plus two more encoder passes per layer (the trainer's activations,
    ``model(inputs)`` in the loss, and the pre-activation loss each encode), each with its weight gradient."""
    return step_flops(n, d, m, layers) + 8.0 * n * d * m * layers


class Worker:
    """crosslayer-coding's step in a process of the other environment's Python."""

    def __init__(self, python: str, spec: dict):
        self.process = subprocess.Popen(
            [python, "-W", "ignore", str(WORKER), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._reply()  # {"ready": true} once its warm-up step is done

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"crosslayer-coding worker exited with {self.process.wait()}")
        return json.loads(line)

    def steps(self, count: int) -> list[float]:
        self.process.stdin.write(f"{count}\n")
        self.process.stdin.flush()
        return self._reply()["seconds"]

    def close(self) -> None:
        self.process.stdin.write("quit\n")
        self.process.stdin.close()
        self.process.wait()


def measure(activation: str, args: argparse.Namespace, device: torch.device) -> tuple[float, float, float]:
    """(tc's median step time, crosslayer-coding's, the median matrix-product FLOP/s), interleaved rounds."""
    n, d, m, n_layers = args.batch_size, args.d, args.features, args.layers
    spec = dict(activation=activation, layers=n_layers, d=d, features=m, batch_size=n, k=args.k, threads=args.threads)
    worker = Worker(args.compare_clc, spec)
    step = tc_step(activation, n, d, m, n_layers, args.k, device)
    step(0)  # warm-up
    tc_times, clc_times, ceilings = [], [], []
    step_index = 0
    for round_index in range(args.rounds):
        ceilings.append(time_matmul(n, m, n_layers * d, 3, device))
        for trainer in ("tc", "clc") if round_index % 2 == 0 else ("clc", "tc"):
            if trainer == "clc":
                clc_times.append(statistics.fmean(worker.steps(args.steps)))
                continue
            start = time.perf_counter()
            for _ in range(args.steps):
                step_index += 1
                step(step_index)
            tc_times.append((time.perf_counter() - start) / args.steps)
    worker.close()
    return statistics.median(tc_times), statistics.median(clc_times), statistics.median(ceilings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare-clc", required=True, help="Python of the environment holding crosslayer-coding")
    add_shape_arguments(parser)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="steps timed per round and trainer")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    n, d, m, n_layers = args.batch_size, args.d, args.features, args.layers
    flops = step_flops(n, d, m, n_layers)
    print(
        f"CLT step: {n_layers} layers, d {d}, {m} features per layer, batch {n}, {args.threads} thread(s); "
        f"{flops / 1e9:.2f} GFLOP of matrix products in tc's step, "
        f"{clc_step_flops(n, d, m, n_layers) / 1e9:.2f} in crosslayer-coding's; {args.rounds} interleaved rounds of "
        f"{args.steps} steps each"
    )
    columns = ("tc ms", "clc ms", "clc/tc", "tc ceil", "clc ceil", "clc own", "GFLOP/s")
    print(f"{'':10s} " + " ".join(f"{c:>8s}" for c in columns))
    for activation in args.activation:
        tc_time, clc_time, ceiling = measure(activation, args, device)
        floor = flops / ceiling
        print(
            f"{activation:10s} {tc_time * 1e3:8.1f} {clc_time * 1e3:8.1f} {clc_time / tc_time:8.2f} "
            f"{floor / tc_time:8.1%} {floor / clc_time:8.1%} "
            f"{clc_step_flops(n, d, m, n_layers) / ceiling / clc_time:8.1%} {ceiling / 1e9:8.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
