"""Tokens/s of `tc cache` (all layers, float16) against a plain HuggingFace forward pass.

The plain pass is the same model loaded with AutoModelForCausalLM, run on the same batches with no
hooks (full forward, logits included). The caching path is `tccli.data.cache_writer.write_cache` with its
default engine (native: the plain HF model with hooks), timed from its first forward pass to the durable end
of the file (model loading and tokenising excluded from both). Intermediate figures locate any gap: the
TransformerBridge forward alone (no hooks), the native capture without writing, and `tc cache
--engine bridge` (TransformerLens' own hooks) for comparison.

    python benchmarks/cache_throughput.py [--tokens-stories 65536] [--tokens-gpt2 16384] [--repeats 2] [--threads N]

Models: ../shared/models/stories260K, and a random GPT-2-small-shaped model (12 layers, d_model 768,
12 heads, vocab 50257) saved in a temp folder with stories260K's tokenizer (token ids only need to
exist). Run it on an otherwise idle machine: the figures are wall-clock times.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

# ../shared beside the checkout, or $TC_SHARED (a git worktree elsewhere)
SHARED = Path(os.environ.get("TC_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
STORIES = SHARED / "models" / "stories260K"
CORPUS = SHARED / "corpora" / "tinystories-valid-excerpt.txt"


def build_gpt2_small(folder: Path) -> Path:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    tokenizer.save_pretrained(folder)
    config = GPT2Config(
        vocab_size=50257,
        n_positions=1024,
        n_embd=768,
        n_layer=12,
        n_head=12,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(model_dir: Path, n_tokens: int, context: int, batch_size: int, repeats: int, workdir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from tccli.config.data import CacheConfig
    from tccli.data.cache_writer import cache_output, write_cache
    from tccli.data.text import load_rows
    from tccli.model.loading import MlpCapture, load_model

    loaded = load_model(str(model_dir), "cpu", "float32")
    rows = load_rows([str(CORPUS)], loaded.tokenizer, loaded.info.bos_token_id, context, n_tokens, seed=0)
    tokens = torch.from_numpy(rows.tokens)
    batches = [tokens[i : i + batch_size] for i in range(0, tokens.shape[0], batch_size)]
    n = tokens.numel()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()

    def plain() -> None:
        with torch.no_grad():
            for batch in batches:
                hf(batch)

    def plain_body() -> None:  # the same without the unembedding, which tc cache never computes
        with torch.no_grad():
            for batch in batches:
                hf.base_model(batch)

    def bridge_only() -> None:
        with torch.no_grad():
            for batch in batches:
                loaded.bridge(batch, return_type=None)

    native = MlpCapture(loaded, range(loaded.info.n_layers), "native")

    def capture_only() -> None:
        for batch in batches:
            for acts in native.capture(batch).values():
                acts["mlp_in"].half(), acts["mlp_out"].half()

    cache_seconds: dict = {"native": [], "bridge": []}

    def cache(engine: str) -> None:
        config = CacheConfig(
            model=str(model_dir),
            data=[str(CORPUS)],
            tokens=n_tokens,
            context=context,
            batch_size=batch_size,
            dtype="float16",
            device="cpu",
            out=str(workdir / "bench.h5"),
            force=True,
            quiet=True,
            engine=engine,
        )
        config.validate()
        with cache_output(config) as output:  # as `tc cache` runs it: a fresh model each time
            fresh_model = load_model(config.model, config.device, config.model_dtype)
            cache_seconds[engine].append(write_cache(output, fresh_model).seconds)

    plain()  # warm-up
    figures = {"tokens": n}
    timings = {"plain": [], "body": [], "bridge": [], "capture": []}
    for _ in range(repeats):  # interleaved so that load changes on a shared machine hit all paths alike
        timings["plain"].append(best_time(plain, 1))
        timings["body"].append(best_time(plain_body, 1))
        timings["bridge"].append(best_time(bridge_only, 1))
        timings["capture"].append(best_time(capture_only, 1))
        cache("native")
        cache("bridge")
    for name, values in timings.items():
        figures[name] = n / min(values)
    figures["cache"] = n / min(cache_seconds["native"])
    figures["cache_bridge"] = n / min(cache_seconds["bridge"])
    figures["file_bytes"] = (workdir / "bench.h5").stat().st_size
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens-stories", type=int, default=65536)
    parser.add_argument("--tokens-gpt2", type=int, default=16384)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32, help="rows per batch (tc cache's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default); 1 avoids OpenMP spin-waits on a busy machine",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not STORIES.exists():
        raise SystemExit(f"{STORIES} is absent: this benchmark needs ../shared")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu")
    print(
        f"{'model':<22}{'tokens':>8}{'plain HF':>12}{'HF body':>12}{'bridge':>12}{'native':>12}"
        f"{'cache -e br':>12}{'tc cache':>12}{'ratio':>8}{'vs body':>8}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        models = [
            ("stories260K", lambda: STORIES, args.tokens_stories),
            ("gpt2-small-shaped", lambda: build_gpt2_small(tmp_path / "gpt2s"), args.tokens_gpt2),
        ]
        for name, make_folder, n_tokens in models:
            if n_tokens <= 0:  # --tokens-X 0 skips that model
                continue
            folder = make_folder()
            f = measure(folder, n_tokens, args.context, args.batch_size, args.repeats, tmp_path)
            print(
                f"{name:<22}{f['tokens']:>8}{f['plain']:>12,.0f}{f['body']:>12,.0f}{f['bridge']:>12,.0f}"
                f"{f['capture']:>12,.0f}{f['cache_bridge']:>12,.0f}{f['cache']:>12,.0f}"
                f"{f['cache'] / f['plain']:>8.2f}{f['cache'] / f['body']:>8.2f}",
                flush=True,
            )
    print(
        "columns: tokens/s; bridge = TransformerBridge forward, no hooks; native = the native engine's "
        "capture of all MLP in/out converted to float16, no writing; cache -e br = tc cache --engine bridge; "
        "tc cache = the default (native) engine; ratio = tc cache / plain HF (target >= 0.85); vs body = "
        "tc cache / HF body (the plain pass without the unembedding, which tc cache skips)"
    )


if __name__ == "__main__":
    main()
