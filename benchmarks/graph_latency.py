"""Seconds and peak memory per `tc graph`, beside the floor of the backward passes it must do.

A random GPT-2 (12 layers, d_model 768, 12 heads, context 1024; the tiny test tokenizer, vocabulary 320)
with random transcoders of 24,576 features on all 12 layers, encoder biases shifted so that about --l0
features fire per token (as circuit_latency.py does: trained GPT-2 transcoders have L0 of tens to ~100).
Prompts of --tokens tokens (BOS + random token ids), --max-feature-nodes 4096, --target logits (10 logits
of this random model), everything else tc graph's defaults. Each prompt length runs in a child process of
its own, so its peak memory (max RSS) is its own; the model and transcoders are loaded before the clock
starts, and their RSS is printed apart.

Timed: everything `tc graph` does after loading (the forward pass and freezing, the targets, the rows,
the ranking, influence, pruning, scores), as in tccli.graph.trace.attribution_graph. The floor: the FLOP of the
matmuls of the backward passes it did (tccli.graph.rows.dense_rows counts them: per layer 4 a P d^2 for
the OV circuits, 2 a P^2 d for the patterns, 2 a P d (1 + k) for the writes, with a rows and P tokens
carried) divided by the float32 matmul rate measured in the same process on the shape those matmuls have.
On a GPU (--device cuda) the same, with CUDA's peak allocated memory.

    .venv/bin/python benchmarks/graph_latency.py [--tokens 32 64 128 256] [--l0 100] [--threads 2]

--clt: each prompt length runs twice, with the per-layer set and with the cross-layer transcoder (docs/method.md
section 11) that has the same encoders (so the same active features) and own-layer decoders plus random decoders
to every later layer (78 decoder blocks for 12 layers), at the same node budget; the table gains the CLT's
seconds and memory and the ratio of its seconds to the per-layer set's (the CLT's weights load before the
clock starts, as the set's do). --features sets the width (24,576 by default: the CLT then holds 5.9 GB of
decoders).

    .venv/bin/python benchmarks/graph_latency.py --clt --tokens 64

--lazy: the CLT is saved to a temporary folder (in a child process of its own) and each prompt length runs
twice on it, loaded whole (tc's eager load) and with its decoders left on disk (what `tc graph` does: only the
active features' decoder rows are read); the table gains, per load, the peak RSS, the RSS after loading, the
decoders' size and how much of it was read, and the bytes the lazy load never held (the per-layer set's run is
left out).

    .venv/bin/python benchmarks/graph_latency.py --lazy --features 4096 --tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from circuit_helpers import random_transcoders  # noqa: E402
from circuit_latency import build_model, sparsify  # noqa: E402
from tccli.graph.attribution_graph import GraphParams, build_attribution_graph  # noqa: E402
from tccli.model.loading import load_model  # noqa: E402
from tccli.replacement.prompts import freeze_prompt  # noqa: E402
from tccli.replacement.targets import salient_logit_targets
from tccli.transcoders.cross_layer import CrossLayerTranscoder  # noqa: E402
from tccli.transcoders.files import save_cross_layer  # noqa: E402
from tccli.transcoders.formats import load_transcoders  # noqa: E402


def matmul_rate(device: str, rows: int, d: int = 768, repeats: int = 5) -> float:
    """float32 FLOP/s of [rows, d] @ [d, d], the shape of the backward pass's OV matmuls (best of repeats)."""
    a = torch.randn(rows, d, device=device)
    b = torch.randn(d, d, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * rows * d * d / best


def current_rss_gib() -> float:
    """This process's resident memory now (not its peak), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def cross_layer_of(transcoders: dict, seed: int = 1) -> CrossLayerTranscoder:
    """The per-layer set as a CLT's own-layer part, with random decoders (norm about the own-layer ones') to
    every later layer, filled block by block (no second full-size random tensor)."""
    clt = CrossLayerTranscoder.from_transcoders(transcoders)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in clt.layers:
            W = clt.W_dec[str(layer)]
            scale = float(W[:, 0].norm(dim=-1).mean()) / W.shape[-1] ** 0.5
            for offset in range(1, W.shape[1]):
                W[:, offset].normal_(0.0, scale, generator=generator)
    return clt


def one_length(
    folder: str,
    n_tokens: int,
    l0: int,
    budget: int,
    batch_size: int,
    device: str,
    features: int = 24576,
    clt: bool = False,
    clt_folder: str | None = None,
    lazy: bool = False,
) -> dict:
    loaded = load_model(folder, device, "float32")
    tokens = prompt_of(loaded, n_tokens)
    extra: dict = {}
    if clt_folder:  # the saved CLT (save_clt), whole or with its decoders on disk
        transcoders = load_transcoders(clt_folder, loaded.device, lazy_decoders=lazy)
        mean_l0 = float("nan")
        extra = decoder_bytes(transcoders, lazy)
    else:
        transcoders = {layer: t.to(loaded.device) for layer, t in random_transcoders(loaded.info, features, 0).items()}
        mean_l0 = sparsify(loaded, transcoders, tokens, l0)
    if clt and not clt_folder:  # the same encoders (sparsified), so the same active features as the per-layer run
        transcoders = cross_layer_of(transcoders).to(loaded.device)
    import gc

    gc.collect()
    rss_loaded = current_rss_gib()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated() / 2**30
    start, cpu_start = time.perf_counter(), time.process_time()
    frozen = freeze_prompt(loaded, transcoders, tokens)
    targets, weights = salient_logit_targets(frozen, n_tokens - 1)
    graph = build_attribution_graph(
        frozen, targets, weights, GraphParams(max_feature_nodes=budget, batch_size=batch_size)
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    rate = matmul_rate(device, batch_size * n_tokens)
    out = {
        "tokens": n_tokens,
        "l0": mean_l0,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_after_loading_gib": rss_loaded,
        "matmul_gflops": rate / 1e9,
        "floor_seconds": graph.stats["backward_flop"] / rate,
        "active_features": graph.n_active_features,
        "rows": graph.stats["rows"],
        "replacement": graph.replacement,
        "completeness": graph.completeness,
        "load_average": os.getloadavg()[0],
        **{k: v for k, v in graph.stats.items() if k.startswith(("seconds", "backward", "stored", "dropped"))},
    }
    out.update({key: value() if callable(value) else value for key, value in extra.items()})
    if device.startswith("cuda"):
        out["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["cuda_after_loading_gib"] = cuda_base
    return out


def prompt_of(loaded, n_tokens: int) -> torch.Tensor:
    """BOS and n_tokens - 1 random token ids, the same for every run of a length."""
    generator = torch.Generator().manual_seed(n_tokens)
    return torch.cat(
        [
            torch.tensor([loaded.info.bos_token_id]),
            torch.randint(1, loaded.info.d_vocab, (n_tokens - 1,), generator=generator),
        ]
    )


def save_clt(folder: str, n_tokens: int, l0: int, features: int, out: str) -> dict:
    """The benchmark's CLT for this prompt length (sparsified encoders, random later decoders) saved to
    ``out``, so that the runs that load it do not count building it in their peak memory."""
    loaded = load_model(folder, "cpu", "float32")
    transcoders = dict(random_transcoders(loaded.info, features, 0))
    mean_l0 = sparsify(loaded, transcoders, prompt_of(loaded, n_tokens), l0)
    save_cross_layer(cross_layer_of(transcoders), Path(out))
    return {"l0": mean_l0}


def decoder_bytes(clt: CrossLayerTranscoder, lazy: bool) -> dict:
    """The decoders' size in GiB and, for a lazy CLT, a counter of the GiB of rows it reads (read when the
    run ends)."""
    n, d, m = len(clt.layers), clt.config.d_out, clt.n_features
    total = 4 * m * d * n * (n + 1) // 2
    read = [0]
    if lazy:
        rows = clt.W_dec.rows

        def counted(layer, features):
            out = rows(layer, features)
            read[0] += out.numel() * 4
            return out

        clt.W_dec.rows = counted
    return {"decoders_gib": total / 2**30, "decoders_read_gib": (lambda: read[0] / 2**30) if lazy else total / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--l0", type=int, default=100)
    parser.add_argument("--max-feature-nodes", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--features", type=int, default=24576, help="features per layer")
    parser.add_argument("--clt", action="store_true", help="also a cross-layer transcoder; print the time ratio")
    parser.add_argument("--model-folder", help="reuse a model built by an earlier run (else a temporary one)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--lazy", action="store_true", help="a saved CLT, loaded whole and with decoders on disk")
    parser.add_argument("--child-clt", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-save", help=argparse.SUPPRESS)
    parser.add_argument("--child-from", help=argparse.SUPPRESS)
    parser.add_argument("--child-lazy", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child and args.child_save:
        print(json.dumps(save_clt(args.model_folder, args.child, args.l0, args.features, args.child_save)))
        return
    if args.child:
        print(
            json.dumps(
                one_length(
                    args.model_folder,
                    args.child,
                    args.l0,
                    args.max_feature_nodes,
                    args.batch_size,
                    args.device,
                    args.features,
                    args.child_clt,
                    args.child_from,
                    args.child_lazy,
                )
            )
        )
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model_folder or tmp
        if not (Path(folder) / "config.json").exists():
            build_model(Path(folder))
        print(
            f"model: GPT-2-small shape (12 layers, d_model 768, 12 heads); transcoders {args.features:,} features x 12 "
            f"layers, target L0 {args.l0}; --max-feature-nodes {args.max_feature_nodes}, --batch-size "
            f"{args.batch_size}; device {args.device}, {args.threads} threads",
            flush=True,
        )
        print(
            "| tokens | L0 | active features | seconds | CPU s | floor s (GFLOP/s) | rows / ranking / finish s "
            "| peak RSS GiB | after loading GiB | graph's own GiB | stored entries | load avg |",
            flush=True,
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
        if args.lazy:
            for n_tokens in args.tokens:
                lazy_rows(args, folder, n_tokens)
            return
        for n_tokens in args.tokens:
            r = run_child(args, folder, n_tokens, False)
            if r is None:
                continue
            print_row(r)
            if args.clt:
                c = run_child(args, folder, n_tokens, True)
                if c is None:
                    continue
                print_row(c, "CLT ")
                print(
                    f"| {n_tokens} | CLT / per-layer: {c['seconds'] / r['seconds']:.2f}x seconds "
                    f"(rows {c['seconds_rows'] / max(r['seconds_rows'], 1e-9):.2f}x), graph's own memory "
                    f"{c['peak_rss_gib'] - c['rss_after_loading_gib']:.2f} vs "
                    f"{r['peak_rss_gib'] - r['rss_after_loading_gib']:.2f} GiB, backward FLOP "
                    f"{c['backward_flop'] / r['backward_flop']:.2f}x, same active features: "
                    f"{c['active_features'] == r['active_features']} |",
                    flush=True,
                )


def lazy_rows(args, folder: str, n_tokens: int) -> None:
    """--lazy: the CLT saved by a child, then the graph with it loaded whole and lazily, a child each."""
    with tempfile.TemporaryDirectory() as clt_folder:
        saved = run_child(args, folder, n_tokens, False, ["--child-save", clt_folder])
        if saved is None:
            return
        results = {}
        for label, extra in (("eager", []), ("lazy", ["--child-lazy"])):
            r = run_child(args, folder, n_tokens, False, ["--child-from", clt_folder, *extra])
            if r is None:
                return
            r["l0"] = saved["l0"]
            print_row(r, f"CLT {label} ")
            results[label] = r
    eager, lazy = results["eager"], results["lazy"]
    scores = lambda r: (r["replacement"], r["completeness"])  # noqa: E731
    print(
        f"| {n_tokens} | lazy vs eager: peak RSS {lazy['peak_rss_gib']:.2f} vs {eager['peak_rss_gib']:.2f} GiB, "
        f"after loading {lazy['rss_after_loading_gib']:.2f} vs {eager['rss_after_loading_gib']:.2f} GiB; decoders "
        f"{eager['decoders_gib']:.2f} GiB, of which the lazy run read {lazy['decoders_read_gib']:.3f} GiB and never "
        f"held {lazy['decoders_gib'] - lazy['decoders_read_gib']:.2f} GiB; seconds {lazy['seconds']:.1f} vs "
        f"{eager['seconds']:.1f}; same active features: {lazy['active_features'] == eager['active_features']}, "
        f"same scores: {scores(lazy) == scores(eager)} |",
        flush=True,
    )


def run_child(args, folder: str, n_tokens: int, clt: bool, extra: list[str] | None = None) -> dict | None:
    """One prompt length in a child process of its own (its own peak memory); None if it failed."""
    command = (
        [
            sys.executable,
            __file__,
            "--child",
            str(n_tokens),
            "--model-folder",
            folder,
            "--l0",
            str(args.l0),
            "--max-feature-nodes",
            str(args.max_feature_nodes),
            "--batch-size",
            str(args.batch_size),
            "--threads",
            str(args.threads),
            "--device",
            args.device,
            "--features",
            str(args.features),
        ]
        + (["--child-clt"] if clt else [])
        + (extra or [])
    )
    child = subprocess.run(command, capture_output=True, text=True)
    if child.returncode != 0:
        lines = child.stderr.strip().splitlines() or ["no output"]
        print(f"| {n_tokens} | failed{' (CLT)' if clt else ''}: {lines[-1]} |", flush=True)
        return None
    return json.loads(child.stdout.strip().splitlines()[-1])


def print_row(r: dict, label: str = "") -> None:
    memory = f"{r['cuda_peak_gib']:.2f} (CUDA)" if "cuda_peak_gib" in r else f"{r['peak_rss_gib']:.2f}"
    print(
        f"| {label}{r['tokens']} | {r['l0']:.0f} | {r['active_features']:,} | {r['seconds']:.1f} | "
        f"{r['cpu_seconds']:.1f} | {r['floor_seconds']:.1f} ({r['matmul_gflops']:.0f}) | "
        f"{r['seconds_rows']:.1f} / {r['seconds_ranking']:.1f} / {r['seconds_finish']:.1f} | {memory} | "
        f"{r['rss_after_loading_gib']:.2f} | {r['peak_rss_gib'] - r['rss_after_loading_gib']:.2f} | "
        f"{r['stored_entries']:,} | {r['load_average']:.1f} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
