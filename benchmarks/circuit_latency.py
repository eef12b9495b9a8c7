"""Seconds per `tc circuit` search and peak memory on a GPT-2-small-shaped model.

A random GPT-2 (12 layers, d_model 768, 12 heads, context 1024; the tiny test tokenizer, vocabulary
320, since the unembedding plays no part in the search's cost) with random transcoders of 24,576
features on every layer, a 32-token prompt, --iters 3 --branches 15. The model and transcoders are
loaded once; each timed search is everything `tc circuit` does after loading: the forward pass,
freezing, the target, the beam search and the graph.

Transcoder sparsity: encoder biases are shifted so that about --l0 features fire per token, like
trained transcoders (the paper's GPT-2 layer 8 has L0 of tens to ~100). --l0 0 keeps them dense
(about half of all features active), the worst case.

    .venv/bin/python benchmarks/circuit_latency.py [--repeats 5] [--l0 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from circuit_helpers import random_transcoders  # noqa: E402
from conftest import build_tokenizer  # noqa: E402
from tccli.circuit.trace import circuit_graph
from tccli.config.circuit import CircuitConfig
from tccli.model.loading import load_model  # noqa: E402
from tccli.replacement.prompts import freeze_prompt, prompt_tokens

PROMPT = (
    "The war lasted from 1735 to 1789. Once upon a time there was a little girl named Lily. "
    "She liked to play outside with the cat"
)


def build_model(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer(folder)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=1024, n_embd=768, n_layer=12, n_head=12, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def sparsify(loaded, transcoders, tokens, l0: int) -> float:
    """Shift each layer's encoder bias so that about ``l0`` features fire per token; return mean L0."""
    frozen = freeze_prompt(loaded, transcoders, tokens)
    l0s = []
    with torch.no_grad():
        for layer, transcoder in transcoders.items():
            pre = frozen.layers[layer].pre
            threshold = pre.quantile(1 - l0 / pre.shape[1], dim=1).mean() if pre.shape[1] < 2**24 else 0
            transcoder.b_enc.sub_(threshold)
        frozen = freeze_prompt(loaded, transcoders, tokens)
        for layer in transcoders:
            l0s.append(float((frozen.layers[layer].z > 0).sum(1).float().mean()))
    return sum(l0s) / len(l0s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--l0", type=int, default=100, help="target features per token; 0 = dense")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--features", type=int, default=24576)
    parser.add_argument("--build-only", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_only:
        build_model(Path(args.build_only))
        return
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        # built in a child process so that building it does not count in this process's peak memory
        subprocess.run([sys.executable, __file__, "--build-only", tmp], check=True, capture_output=True)
        loaded = load_model(tmp, "cpu", "float32")
    transcoders = random_transcoders(loaded.info, args.features, 0)
    ids = loaded.tokenizer.encode(PROMPT, add_special_tokens=False)[:31]
    prompt = loaded.tokenizer.decode(ids)
    n_tokens = int(prompt_tokens(loaded, prompt).shape[0])
    if args.l0:
        l0 = sparsify(loaded, transcoders, prompt_tokens(loaded, prompt), args.l0)
    else:
        frozen = freeze_prompt(loaded, transcoders, prompt_tokens(loaded, prompt))
        l0 = sum(float((layer.z > 0).sum(1).float().mean()) for layer in frozen.layers) / len(frozen.layers)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    config = CircuitConfig(transcoders="-", prompt=prompt, logit="1", pos=-1, iters=3, branches=15)
    timings = {"logit": [], "feature L11": []}
    cpu_times = {"logit": [], "feature L11": []}
    for name, cfg in (
        ("logit", config),
        ("feature L11", CircuitConfig(transcoders="-", prompt=prompt, feature="L11.F0", iters=3, branches=15)),
    ):
        for _ in range(args.repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            graph, summary = circuit_graph(loaded, transcoders, prompt, cfg)
            timings[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    freeze_wall, freeze_cpu = [], []
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        freeze_prompt(loaded, transcoders, prompt_tokens(loaded, prompt))
        freeze_wall.append(time.perf_counter() - start)
        freeze_cpu.append(time.process_time() - cpu_start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"model: GPT-2-small shape (12 layers, d_model 768, 12 heads), {n_tokens} tokens with BOS; "
        f"transcoders: {args.features} features x 12 layers, mean L0 {l0:.1f}; threads {args.threads}"
    )
    for name, values in timings.items():
        values = sorted(values)
        print(
            f"search ({name} target, iters 3, branches 15): median {values[len(values) // 2]:.3f} s, "
            f"min {values[0]:.3f} s, max {values[-1]:.3f} s over {len(values)} runs; "
            f"CPU time (all threads) median {sorted(cpu_times[name])[len(values) // 2]:.3f} s; "
            f"last graph {summary['nodes']} nodes"
        )
    print(
        f"of which the forward pass and freezing (12 transcoder encoders over the prompt): median "
        f"{sorted(freeze_wall)[len(freeze_wall) // 2]:.3f} s wall, {sorted(freeze_cpu)[len(freeze_cpu) // 2]:.3f} s CPU"
    )
    print(
        f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
        f"(wall time grows with other processes' load; CPU time much less)"
    )
    print(f"peak memory (max RSS): {peak:.2f} GiB (after loading model and transcoders: {rss_loaded:.2f} GiB)")


if __name__ == "__main__":
    main()
