"""Speed of `tc score`'s scoring pass against its floor: forward + every layer's encoder, no statistics.

    python benchmarks/score_throughput.py [--tokens-stories 131072] [--tokens-gpt2 4096] [--repeats 3] [--threads N]
                                        [--device auto|cpu|cuda] [--profile]

Models ($TC_SHARED instead of ../shared where the checkout has none beside it): ../shared/models/stories260K
with 4,096 random features on each of its 5 layers, and a random GPT-2-small-shaped model (d_model 768, 12
layers, 12 heads; built as in cache_throughput.py) with 24,576 random features on each of its 12 layers. A
random feature has a unit-norm encoder column and a bias that makes it fire on about --density of tokens, like
a trained one (the script prints the density it measured). Text: the TinyStories excerpt in ../shared, rows of
--context tokens, --batch-size rows a forward pass (tc score's defaults). Three timings, interleaved (capture,
floor, pass, capture, floor, pass, ...) in one process, best of --repeats each:

- capture: tc score's forward pass alone (the native engine: the plain HuggingFace model with hooks,
  stopped after the last scored layer's MLP input);
- floor: the capture, then every layer's encoder on the same [features x tokens] tiles tc score uses:
  matmul, bias and ReLU, i.e. every activation, and nothing done with them. Any scorer that computes
  every feature's activation exactly does at least this;
- scoring pass: the capture and `tccli.features.scoring.stream_layers`, i.e. what `tc score` runs between
  loading and finishing: encoding plus every streaming statistic (counts, sums, maxima, exact top and
  sampled examples with their windows).

Ratio = floor time / scoring pass time (target >= 0.75). Timings are wall-clock: run it on a quiet
machine; the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_throughput import CORPUS, STORIES, build_gpt2_small  # noqa: E402


def random_transcoders(info, n_features: int, density: float, seed: int = 0):
    from tccli.config.transcoders import TranscoderConfig
    from tccli.transcoders.transcoder import Transcoder

    out = {}
    # the MLP input is a normalised residual with |x| ~ sqrt(d); a unit-norm encoder column then gives a
    # pre-activation ~ N(0, 1), so a bias of -Phi^-1(1 - density) makes a feature fire on ~density of tokens
    threshold = float(torch.distributions.Normal(0, 1).icdf(torch.tensor(1 - density)))
    for layer in range(info.n_layers):
        torch.manual_seed(seed + layer)
        tc = Transcoder(TranscoderConfig(d_in=info.d_model, d_out=info.d_model, n_features=n_features, layer=layer))
        with torch.no_grad():
            tc.W_enc.normal_().div_(tc.W_enc.norm(dim=0, keepdim=True))  # unit-norm columns
            tc.W_dec.normal_()
            tc.b_enc.fill_(-threshold)
        out[layer] = tc
    return out


def measure(model_dir: Path, n_features: int, n_tokens: int, args) -> dict:
    import tccli.features.scoring as scoring
    from tccli.data.text import load_rows
    from tccli.model.loading import MlpCapture, load_model

    loaded = load_model(str(model_dir), args.device)
    info = loaded.info
    packed = load_rows([str(CORPUS)], loaded.tokenizer, info.bos_token_id, args.context, n_tokens, seed=0)
    rows = packed.tokens
    transcoders = {
        layer: tc.to(loaded.device) for layer, tc in random_transcoders(info, n_features, args.density).items()
    }
    layers = sorted(transcoders)
    settings = scoring.ScoreSettings(batch_size=args.batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        capture = MlpCapture(loaded, layers, "native", release_bridge=True)
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)

    def batches():
        return scoring.model_batches(capture, scoring.array_row_batches(rows, packed.doc_ids, args.batch_size))

    def capture_only() -> None:
        for _ in batches():
            pass
        sync()

    def floor() -> None:
        encoders = {layer: scoring.feature_major_encoder(transcoders[layer]) for layer in layers}
        rows_per_tile = max(1, scoring.tile_values(loaded.device) // (n_features * args.context))
        tile = rows_per_tile * args.context
        for _, _, inputs in batches():
            for layer in layers:
                mlp_in = inputs[layer][0]
                for t0 in range(0, mlp_in.shape[0], tile):
                    encoders[layer](mlp_in[t0 : t0 + tile]).relu_()
        sync()

    streams: list = []

    def scoring_pass() -> None:
        encoders = {layer: scoring.feature_major_encoder(transcoders[layer]) for layer in layers}
        streams.append(
            scoring.stream_layers(
                encoders, batches(), {layer: n_features for layer in layers}, settings, device=loaded.device
            )[0]
        )
        sync()

    seconds: dict[str, list[float]] = {"capture": [], "floor": [], "pass": []}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in seconds}
    with torch.no_grad():
        capture_only()  # warm-up: first-call costs (allocations, the statistics kernel's compilation)
        scoring.stream_layers(
            {layers[0]: scoring.feature_major_encoder(transcoders[layers[0]])},
            scoring.model_batches(
                capture, scoring.array_row_batches(rows[: args.batch_size], packed.doc_ids, args.batch_size)
            ),
            {layers[0]: n_features},
            settings,
            device=loaded.device,
        )
        for _ in range(args.repeats):
            for name, fn in (("capture", capture_only), ("floor", floor), ("pass", scoring_pass)):
                start, cpu_start = time.perf_counter(), time.process_time()
                fn()
                seconds[name].append(time.perf_counter() - start)
                cpu_seconds[name].append(time.process_time() - cpu_start)
                streams[1:] = []  # keep one result (for the density), not one per repeat
        if args.profile:
            import profiling

            profiling.profile(f"{model_dir.name}: one scoring pass", scoring_pass, loaded.device)
            streams[1:] = []
    density = sum(float(s.active_count.sum()) for s in streams[0].values()) / (rows.size * n_features * len(layers))
    best = {name: min(values) for name, values in seconds.items()}
    return dict(
        tokens=rows.size,
        layers=len(layers),
        density=density,
        best=best,
        all=seconds,
        cpu=cpu_seconds,
        device=str(loaded.device),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens-stories", type=int, default=131072, help="0 skips stories260K")
    parser.add_argument("--tokens-gpt2", type=int, default=4096, help="0 skips the GPT-2-small-shaped model")
    parser.add_argument("--features-stories", type=int, default=4096)
    parser.add_argument("--features-gpt2", type=int, default=24576)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--density", type=float, default=0.02)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--profile", action="store_true", help="then profile one scoring pass (benchmarks/profiling.py)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not STORIES.exists():
        raise SystemExit(f"{STORIES} is absent: this benchmark needs ../shared")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average before: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    print(
        f"{'model':<20}{'tokens':>8}{'features':>14}{'density':>9}{'capture':>10}{'floor':>10}{'pass':>10}"
        f"{'ratio':>7}   (tokens/s; ratio = floor time / pass time, target >= 0.75)",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        models = [
            ("stories260K", lambda: STORIES, args.features_stories, args.tokens_stories),
            ("gpt2-small-shaped", lambda: build_gpt2_small(Path(tmp) / "gpt2s"), args.features_gpt2, args.tokens_gpt2),
        ]
        for name, make_folder, n_features, n_tokens in models:
            if n_tokens <= 0:
                continue
            f = measure(make_folder(), n_features, n_tokens, args)
            rate = {key: f["tokens"] / value for key, value in f["best"].items()}
            shape = f"{n_features:,} x {f['layers']}"
            print(
                f"{name:<20}{f['tokens']:>8}{shape:>14}"
                f"{f['density']:>9.4f}{rate['capture']:>10,.0f}{rate['floor']:>10,.0f}{rate['pass']:>10,.0f}"
                f"{f['best']['floor'] / f['best']['pass']:>7.2f}",
                flush=True,
            )
            print(
                "  every run (s): "
                + "; ".join(f"{key} " + " ".join(f"{v:.2f}" for v in values) for key, values in f["all"].items()),
                flush=True,
            )
            cpu = {key: min(values) for key, values in f["cpu"].items()}
            print(
                "  CPU time, best (s): "
                + "; ".join(f"{key} {value:.2f}" for key, value in cpu.items())
                + f"; ratio by CPU time {cpu['floor'] / cpu['pass']:.2f} (with --threads 1 it does not count "
                "other processes' share of the cores, unlike wall time)",
                flush=True,
            )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
