"""The training experiments behind the `tc train` tables and Pareto figure of docs/commands/train.md, on stories260K.

Protocol (issue 12): the first 700,000 bytes of ../shared/corpora/tinystories-valid-excerpt.txt are cached
for training (`tc cache --tokens 10M --context 128 --layers all --dtype float32`: 341,248 tokens), the rest
(94,375 bytes, 46,592 tokens) is held out and every trained set is evaluated on it by splicing (`tc eval`).
Each run is `tc train` with the listed flags, then `tc eval --json`; results (and the run's wall time and
CPU time) go to WORK/results.jsonl, one line per (run, layer), so an interrupted sweep continues where it
stopped and `table` re-prints from what is there.

    python scripts/train_experiments.py run GROUP [--layers 2,4] [--seeds 0,1]   # trains and evaluates
    python scripts/train_experiments.py table GROUP                             # markdown table on stdout
    python scripts/train_experiments.py pareto defaults kinds pareto --layers 4  # the docs' Pareto figure

Groups: see GROUPS below. Runs are sequential and niced; each prints a line on stderr when done.
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
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" if (ROOT.parent / "shared").is_dir() else Path("/work/shared")
MODEL = SHARED / "models" / "stories260K"
CORPUS = SHARED / "corpora" / "tinystories-valid-excerpt.txt"
TRAIN_BYTES = 700_000
EQUAL_BUDGET = ["--tokens", "4M", "--batch-size", "1024"]  # the comparison with sparsify
# the dead window of the defaults before issue 12, spelled out where a run measured it (the default is now 50)
OLD_WINDOW = ["--dead-window", "500"]

# name -> (flags of tc train, default layers, default seeds)
GROUPS: dict[str, dict[str, list[str]]] = {
    # finding the defaults: one change at a time from the old defaults (Adam 1e-3, unit decoder, decay 0.3)
    "optim": {
        "adam-1e-3": ["--optimizer", "adam", "--lr", "1e-3"] + OLD_WINDOW + EQUAL_BUDGET,
        "adam-rule": ["--optimizer", "adam", "--lr", "8e-4"] + OLD_WINDOW + EQUAL_BUDGET,  # Gao et al.: 2e-4 at 16,384
        "adam-3e-3": ["--optimizer", "adam", "--lr", "3e-3"] + OLD_WINDOW + EQUAL_BUDGET,
        "adam-6e-3": ["--optimizer", "adam", "--lr", "6e-3"] + OLD_WINDOW + EQUAL_BUDGET,
        "adam-1e-2": ["--optimizer", "adam", "--lr", "1e-2"] + OLD_WINDOW + EQUAL_BUDGET,
        "adam-3e-3-dw50": ["--optimizer", "adam", "--lr", "3e-3", "--dead-window", "50"] + EQUAL_BUDGET,
        "adam-6e-3-dw50": ["--optimizer", "adam", "--lr", "6e-3", "--dead-window", "50"] + EQUAL_BUDGET,
        "adam-1e-2-dw50": ["--optimizer", "adam", "--lr", "1e-2", "--dead-window", "50"] + EQUAL_BUDGET,
        "adam-6e-3-b4096-dw12": [
            "--optimizer",
            "adam",
            "--lr",
            "6e-3",
            "--dead-window",
            "12",
            "--tokens",
            "4M",
            "--batch-size",
            "4096",
        ],
        "adam-1e-3-free": ["--optimizer", "adam", "--lr", "1e-3", "--decoder-norm", "free"] + OLD_WINDOW + EQUAL_BUDGET,
        "signum-rule-free": ["--optimizer", "signum", "--decoder-norm", "free"] + OLD_WINDOW + EQUAL_BUDGET,
        "signum-rule-unit": ["--optimizer", "signum", "--decoder-norm", "unit"] + OLD_WINDOW + EQUAL_BUDGET,
        "signum-half-free": ["--optimizer", "signum", "--lr", "1e-2", "--decoder-norm", "free"]
        + OLD_WINDOW
        + EQUAL_BUDGET,
        "signum-double-free": ["--optimizer", "signum", "--lr", "4e-2", "--decoder-norm", "free"]
        + OLD_WINDOW
        + EQUAL_BUDGET,
    },
    # the defaults at the equal budget, every layer (--layers 0,1,2,3,4 --seeds 0,1)
    "defaults": {"defaults-4M": ["--tokens", "4M"]},
    # `tc train --layers 4` with no other flag
    "bare": {"bare": []},
    # the kinds at L0 ~16 (--layers 2,4); topk itself is the defaults-4M run
    "kinds": {
        "topk-skip": ["--tokens", "4M", "--skip"],
        "batchtopk": ["--tokens", "4M", "--activation", "batchtopk"],
        "batchtopk-skip": ["--tokens", "4M", "--activation", "batchtopk", "--skip"],
        "jumprelu": ["--tokens", "4M", "--activation", "jumprelu", "--l0-coef", "JUMPRELU_COEF"],
        "jumprelu-skip": ["--tokens", "4M", "--activation", "jumprelu", "--l0-coef", "JUMPRELU_COEF", "--skip"],
        "relu": ["--tokens", "4M", "--activation", "relu", "--l1", "RELU_L1"],
        "relu-skip": ["--tokens", "4M", "--activation", "relu", "--l1", "RELU_L1", "--skip"],
        "sae-topk": ["--tokens", "4M", "--kind", "sae"],
    },
    # the Pareto figure's sweeps (--layers 4): k for TopK, lambda for L1 and JumpReLU, transcoders and SAEs
    "pareto": {
        **{f"topk-k{k}": ["--tokens", "4M", "--k", str(k)] for k in (8, 32)},
        **{f"relu-l1-{c}": ["--tokens", "4M", "--activation", "relu", "--l1", c] for c in ("0.3", "0.7", "1.5")},
        **{
            f"jumprelu-{c}": ["--tokens", "4M", "--activation", "jumprelu", "--l0-coef", c]
            for c in ("1e-3", "3e-3", "1e-2")
        },
        **{f"sae-topk-k{k}": ["--tokens", "4M", "--kind", "sae", "--k", str(k)] for k in (8, 32)},
        **{
            f"sae-relu-l1-{c}": ["--tokens", "4M", "--kind", "sae", "--activation", "relu", "--l1", c]
            for c in ("0.3", "1.5")
        },
    },
    # layer 2's MLP writes less than layer 4's, so the paper's unnormalised L1 at layer 4's lambda (0.7) kills
    # almost every feature there (L0 0.6): smaller lambdas for the layer-2 rows of the kinds table
    "relu-layer2": {
        **{f"relu-l1-{c}": ["--tokens", "4M", "--activation", "relu", "--l1", c] for c in ("0.05", "0.15")},
        **{
            f"relu-skip-l1-{c}": ["--tokens", "4M", "--activation", "relu", "--l1", c, "--skip"]
            for c in ("0.05", "0.15")
        },
    },
}
# the L0 ~16 coefficients of the kinds table, read off the pareto sweep on layer 4
CHOSEN = {"JUMPRELU_COEF": "3e-3", "RELU_L1": "0.7"}
GROUPS["kinds"] = {name: [CHOSEN.get(flag, flag) for flag in flags] for name, flags in GROUPS["kinds"].items()}


def split_corpus(work: Path) -> tuple[Path, Path]:
    text = CORPUS.read_bytes()
    train, heldout = work / "train.txt", work / "heldout.txt"
    if not train.exists():
        train.write_bytes(text[:TRAIN_BYTES])
        heldout.write_bytes(text[TRAIN_BYTES:])
    return train, heldout


def tc(*args: str, **kwargs) -> subprocess.CompletedProcess:
    # one thread: on this shared 2-core machine two threads per process were several times slower (OpenMP
    # threads waiting for each other while the other agents' processes hold the cores)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run(
        ["nice", "-n", "10", str(Path(sys.executable).parent / "tc"), *args],
        text=True,
        capture_output=True,
        env=env,
        **kwargs,
    )


def ensure_cache(work: Path) -> Path:
    train, _ = split_corpus(work)
    cache = work / "acts.h5"
    if not cache.exists():
        result = tc(
            "cache",
            "--model",
            str(MODEL),
            "--data",
            str(train),
            "--tokens",
            "10M",
            "--context",
            "128",
            "--layers",
            "all",
            "--dtype",
            "float32",
            "--out",
            str(cache),
            "--quiet",
        )
        if result.returncode:
            sys.exit(result.stderr)
    return cache


def done_runs(results: Path) -> set[tuple[str, int, int]]:
    if not results.exists():
        return set()
    return {(r["run"], r["layer"], r["seed"]) for r in map(json.loads, results.read_text().splitlines())}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_one(work: Path, name: str, flags: list[str], layers: list[int], seed: int) -> None:
    results = work / "results.jsonl"
    if all((name, layer, seed) in done_runs(results) for layer in layers):
        return
    cache = ensure_cache(work)
    _, heldout = split_corpus(work)
    out = work / "runs" / f"{name}-L{'_'.join(map(str, layers))}-s{seed}"
    if out.exists() and not (out / f"layer_{layers[-1]}").exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    cpu0, wall0, load0 = children_cpu(), time.time(), os.getloadavg()[0]
    timing = out / "timing.json"
    if not out.exists():
        result = tc(
            "train",
            "--cache",
            str(cache),
            "--out",
            str(out),
            "--layers",
            ",".join(map(str, layers)),
            "--seed",
            str(seed),
            "--quiet",
            *flags,
        )
        if result.returncode:
            sys.exit(f"{name}: {result.stderr}")
        timing.write_text(
            json.dumps(dict(wall=time.time() - wall0, cpu=children_cpu() - cpu0, load=[load0, os.getloadavg()[0]]))
        )
    measured = json.loads(timing.read_text()) if timing.exists() else dict(wall=0.0, cpu=0.0, load=[0.0, 0.0])
    train_wall, train_cpu, (load0, load1) = measured["wall"], measured["cpu"], measured["load"]
    if not (out / "eval.json").exists():
        result = tc(
            "eval", "--model", str(MODEL), "--transcoders", str(out), "--data", str(heldout), "--tokens", "1M", "--json"
        )
        if result.returncode:
            sys.exit(f"{name} eval: {result.stderr}")
        (out / "eval.json").write_text(result.stdout)
    evaluation = json.loads((out / "eval.json").read_text())
    with results.open("a") as f:
        for row in evaluation["layers"]:
            f.write(
                json.dumps(
                    dict(
                        run=name,
                        flags=flags,
                        seed=seed,
                        layers=layers,
                        train_wall_s=round(train_wall, 1),
                        train_cpu_s=round(train_cpu, 1),
                        load=[round(load0, 2), round(load1, 2)],
                        **row,
                    )
                )
                + "\n"
            )
    print(
        f"{name} layers {layers} seed {seed}: "
        + ", ".join(
            f"L{r['layer']} FVU {r['fvu']:.3f} CE rec {r['recovered_zero']:.3f} L0 {r['l0']:.1f} "
            f"dead {r['dead_features'] / r['n_features']:.1%}"
            for r in evaluation["layers"]
        )
        + f" ({train_wall:.0f} s, {train_cpu:.0f} CPU s, load {load0:.1f}-{load1:.1f})",
        file=sys.stderr,
    )


def table(work: Path, names: list[str], layers: Optional[list[int]] = None) -> str:
    rows = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    rows = [r for r in rows if layers is None or r["layer"] in layers]
    lines = [
        "| run | layer | seeds | L0 | FVU | CE recovered | dead on held-out | train s (CPU s) |",
        "|---|---:|---|---:|---|---|---:|---|",
    ]
    for name in names:
        for layer in sorted({r["layer"] for r in rows if r["run"] == name}):
            mine = sorted((r for r in rows if r["run"] == name and r["layer"] == layer), key=lambda r: r["seed"])
            dead = [r["dead_features"] / r["n_features"] for r in mine]
            fvu = " / ".join(f"{r['fvu']:.3f}" for r in mine)
            recovered = " / ".join(f"{r['recovered_zero']:.3f}" for r in mine)
            times = " / ".join(
                f"{r['train_wall_s']:.0f} ({r['train_cpu_s']:.0f})" if r["train_cpu_s"] else "-" for r in mine
            )
            seeds = ",".join(str(r["seed"]) for r in mine)
            l0 = sum(r["l0"] for r in mine) / len(mine)
            dead_range = f"{min(dead):.1%}" if min(dead) == max(dead) else f"{min(dead):.1%}-{max(dead):.1%}"
            lines.append(f"| {name} | {layer} | {seeds} | {l0:.1f} | {fvu} | {recovered} | {dead_range} | {times} |")
    return "\n".join(lines)


def pareto(work: Path, names: list[str], layers: list[int], out: Path) -> None:
    """`tc plot pareto` over the evaluated runs of ``names`` (seed 0), restricted to ``layers``."""
    evals = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for folder in sorted((work / "runs").glob(f"{name}-L*-s0")):
                if folder.name.rsplit("-L", 1)[0] != name or not (folder / "eval.json").exists():
                    continue
                evaluation = json.loads((folder / "eval.json").read_text())
                evaluation["layers"] = [row for row in evaluation["layers"] if row["layer"] in layers]
                if evaluation["layers"]:
                    evals.append(Path(tmp) / f"{folder.name}.json")
                    evals[-1].write_text(json.dumps(evaluation))
        if not evals:
            sys.exit("no evaluated runs to plot")
        result = tc(
            "plot",
            "pareto",
            *map(str, evals),
            "-o",
            str(out),
            "--force",
            "--title",
            "stories260K: CE loss recovered against L0 (held-out text, 1,024 features, 4M tokens)",
        )
        if result.returncode:
            sys.exit(result.stderr)
    print(f"{out}: {len(evals)} runs", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("run", "table", "pareto"))
    parser.add_argument("group", nargs="+")
    parser.add_argument("-o", "--out", default=str(ROOT / "docs" / "pareto-stories260k.svg"), help="pareto: the figure")
    parser.add_argument("--work", default=str(ROOT / "runs" / "train-experiments"))
    parser.add_argument(
        "--layers",
        default=None,
        help="comma-separated; one tc train per run covers them all "
        "(run and pareto: default 4; table: default every layer measured)",
    )
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--only", default=None, help="comma-separated run names within the group(s)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs = {name: flags for group in args.group for name, flags in GROUPS[group].items()}
    if args.only:
        runs = {name: runs[name] for name in args.only.split(",")}
    layers = [int(layer) for layer in args.layers.split(",")] if args.layers else None
    if args.action == "run":
        layers = layers or [4]
        for seed in (int(s) for s in args.seeds.split(",")):
            for name, flags in runs.items():
                run_one(work, name, flags, layers, seed)
    elif args.action == "pareto":
        pareto(work, list(runs), layers or [4], Path(args.out))
    else:
        print(table(work, list(runs), layers))


if __name__ == "__main__":
    main()
