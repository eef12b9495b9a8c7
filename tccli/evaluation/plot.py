"""`tc plot`: figures from tc's own outputs, drawn with matplotlib.

- ``tc plot pareto EVAL.json... -o pareto.svg``: the sparsity-fidelity picture of the paper: CE recovered
  (``--metric recovered``, the default) or spliced CE (``--metric ce``) against L0, from `tc eval --json`
  files; one panel per layer, one series per kind of transcoder (activation, skip, transcoder or SAE).
- ``tc plot training tcs/train_log.jsonl... -o curves.svg``: loss, FVU, L0 and the dead fraction against
  training tokens, one line per layer (and per log).

The format follows the output's suffix (.svg, .png, .pdf). SVG output is deterministic (no date, fixed
ids), so a figure regenerated from the same inputs is byte-identical. I/O only; no maths here.

matplotlib is optional (``pip install 'tccli[plot]'``): without it `tc plot` stops with one line saying so,
before it reads or writes anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tccli.config.evaluation import METRICS, PlotConfig
from tccli.errors import fail
from tccli.runtime import inputs

TRAINING_PANELS = (("loss", "training loss"), ("fvu", "FVU (batch)"), ("l0", "L0"), ("dead_fraction", "dead fraction"))


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ParetoPoint:
    series: str
    layer: int
    l0: float
    value: float
    source: str


def series_name(kind: str, description: Optional[dict]) -> str:
    """'transcoder TopK', 'SAE ReLU+L1', 'skip transcoder JumpReLU', ...; from the per-layer description
    `tc eval --json` writes (older files have only the kind)."""
    names = {
        "topk": "TopK",
        "signed_topk": "signed TopK",
        "batchtopk": "BatchTopK",
        "jumprelu": "JumpReLU",
        "relu": "ReLU+L1",
    }
    who = "SAE" if kind == "sae" else "transcoder"
    if not description:
        return who
    if description.get("skip"):
        who = "skip " + who
    return f"{who} {names.get(description.get('activation'), description.get('activation'))}"


def _read_json(path: str) -> dict:
    if inputs.is_stdin(path):
        return json.loads(inputs.read_stdin("the output of `tc eval --json`", ("json",)))
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise fail(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(f"cannot read {path} as JSON: {exc}") from None


def read_pareto_points(paths: list[str], metric: str) -> list[ParetoPoint]:
    key = METRICS[metric][0]
    points = []
    for path in paths:
        data = _read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
            raise fail(f"{inputs.display_name(path)} is not the output of `tc eval --json` (no 'layers' list)")
        kinds = data.get("kinds") or {}
        descriptions = data.get("transcoder_kinds") or {}
        for row in data["layers"]:
            try:
                layer, l0, value = int(row["layer"]), float(row["l0"]), float(row[key])
            except (KeyError, TypeError, ValueError):
                raise fail(f"{path}: a layer entry lacks layer, l0 or {key}") from None
            series = series_name(kinds.get(str(layer), "transcoder"), descriptions.get(str(layer)))
            points.append(ParetoPoint(series, layer, l0, value, path))
    return points


def read_training_log(path: str) -> tuple[list[dict], Optional[int]]:
    """The log's entries and the run's batch size (from train_config.json beside it, when there)."""
    inputs.refuse_stdin(path, "a training log", "the plot reads train_config.json beside it")
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise fail(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"cannot read {path}: {exc}") from None
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            int(entry["step"]), int(entry["layer"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise fail(f"{path}:{number} is not a line of a tc train log") from None
        entries.append(entry)
    if not entries:
        raise fail(f"{path} holds no training log lines")
    batch_size = None
    config = Path(path).with_name("train_config.json")
    if config.is_file():
        try:
            batch_size = int(json.loads(config.read_text())["batch_size"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            batch_size = None
    return entries, batch_size


# ----------------------------------------------------------------------------- drawing


PLOT_EXTRA_HINT = "tc plot needs matplotlib: pip install 'tccli[plot]'"


def _matplotlib():
    """The matplotlib package, or the one-line TcError that says how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise fail(PLOT_EXTRA_HINT) from None
    return matplotlib


def _pyplot():
    matplotlib = _matplotlib()
    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "tc"  # fixed element ids: the same figure gives the same file
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str) -> Path:
    from tccli.runtime import outputs

    path = Path(out)
    metadata = {"Date": None} if path.suffix.lower() in (".svg", ".pdf") else {}
    outputs.atomic_write(
        path, lambda tmp: fig.savefig(tmp, format=path.suffix.lower()[1:], metadata=metadata, bbox_inches="tight")
    )
    return path


def plot_pareto(points: list[ParetoPoint], out: str, metric: str, title: Optional[str] = None) -> Path:
    plt = _pyplot()
    from matplotlib import ticker

    layers = sorted({p.layer for p in points})
    series = sorted({p.series for p in points})
    fig, axes = plt.subplots(1, len(layers), figsize=(4.6 * len(layers), 3.8), squeeze=False, sharey=True)
    markers = "osD^vP*X<>h"
    for ax, layer in zip(axes[0], layers):
        for i, name in enumerate(series):
            mine = sorted((p for p in points if p.layer == layer and p.series == name), key=lambda p: p.l0)
            if mine:
                ax.plot(
                    [p.l0 for p in mine],
                    [p.value for p in mine],
                    marker=markers[i % len(markers)],
                    label=name,
                    color=f"C{i}",
                )
        ax.set_xscale("log")
        # plain numbers on the log axis (L0 spans a few units to a few hundred; 1.6 x 10^1 reads badly)
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.set_xlabel("L0 (active features per token)")
        ax.set_title(f"layer {layer}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(METRICS[metric][1])
    axes[0][-1].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    path = _save(fig, out)
    plt.close(fig)
    return path


def plot_training(logs: list[tuple[str, list[dict], Optional[int]]], out: str, title: Optional[str] = None) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(TRAINING_PANELS), figsize=(4.2 * len(TRAINING_PANELS), 3.4))
    tokens_known = all(batch is not None for _, _, batch in logs)
    for path, entries, batch_size in logs:
        for layer in sorted({int(e["layer"]) for e in entries}):
            mine = [e for e in entries if int(e["layer"]) == layer]
            xs = [int(e["step"]) * (batch_size if tokens_known else 1) for e in mine]
            label = f"layer {layer}" if len(logs) == 1 else f"{Path(path).parent.name or path} layer {layer}"
            for ax, (key, _) in zip(axes, TRAINING_PANELS):
                if all(key in e for e in mine):
                    ax.plot(xs, [float(e[key]) for e in mine], label=label, linewidth=1.2)
    for ax, (key, name) in zip(axes, TRAINING_PANELS):
        ax.set_xlabel("training tokens" if tokens_known else "steps")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        if key in ("loss", "fvu"):
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", useOffset=False)
    axes[-1].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    path = _save(fig, out)
    plt.close(fig)
    return path


def run_plot(config: PlotConfig) -> Path:
    from tccli.runtime import outputs

    _matplotlib()  # a missing matplotlib is said before any input is read or output claimed
    try:
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise outputs.write_error(config.out, exc) from None
    inputs.one_stdin(**{f"FILE {number}": path for number, path in enumerate(config.inputs, 1)})
    with outputs.claim(config.out, config.force, config.inputs):
        if config.what == "pareto":
            return plot_pareto(
                read_pareto_points(config.inputs, config.metric), config.out, config.metric, config.title
            )
        logs = [(path, *read_training_log(path)) for path in config.inputs]
        return plot_training(logs, config.out, config.title)
