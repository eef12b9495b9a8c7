"""Settings of `tc eval`, `tc greater-than`, `tc plot` and `tc validate`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tccli.config.fields import DataOptions, ModelOptions, option, parse_count
from tccli.config.replacement import AblationOptions
from tccli.errors import fail

MEAN_ABLATIONS = ("position", "global")


KIND_CHOICES = ("auto", "transcoder", "sae")


@dataclass
class EvalConfig(ModelOptions, DataOptions):
    """Options of `tc eval`."""

    transcoders: str = option(
        "",
        "Transcoders: a tc transcoder folder, a folder of them, a SAELens folder "
        "(cfg.json + sae_weights.safetensors) or a paper .pt file.",
        required=True,
    )
    layers: Optional[str] = option(
        None, "Layers to evaluate, e.g. 2, 0,3-4 or all (default: every layer the transcoders cover)."
    )
    kind: str = option(
        "auto",
        "What the files are: transcoder (MLP in -> MLP out, spliced at the MLP "
        "output), sae (MLP out -> MLP out) or auto (as their configs say).",
    )
    mean_ablation: str = option(
        "position",
        "Mean ablation replaces the MLP output by its mean over the "
        "evaluation tokens at each position (position) or over all tokens (global).",
    )
    dense_threshold: float = option(0.1, "A feature active on more than this fraction of tokens counts as dense.")
    batch_size: int = option(32, "Rows per forward pass.")
    tokens: int = option(100_000, "Evaluate on this many tokens (accepts 200k, 1M).", parser=parse_count)
    json: bool = option(False, "Print the results as JSON on stdout instead of a table.")
    wide: bool = option(
        False,
        "Show every metric in the table (MSE, dense features, each CE); needs about "
        "150 columns. The default table fits 80.",
        save=False,
    )
    quiet: bool = option(False, "No progress on stderr.", save=False)

    def validate(self) -> None:
        ModelOptions.validate(self)
        DataOptions.validate(self)
        if not self.transcoders:
            raise fail("no transcoders given: pass --transcoders PATH")
        if self.kind not in KIND_CHOICES:
            raise fail(f"--kind must be one of {', '.join(KIND_CHOICES)}, got {self.kind!r}")
        if self.mean_ablation not in MEAN_ABLATIONS:
            raise fail(f"--mean-ablation must be position or global, got {self.mean_ablation!r}")
        if not 0 <= self.dense_threshold <= 1 or math.isnan(self.dense_threshold):
            raise fail(f"--dense-threshold must be a fraction in [0, 1], got {self.dense_threshold}")
        if self.batch_size < 1:
            raise fail(f"--batch-size must be at least 1, got {self.batch_size}")


@dataclass
class GreaterThanConfig(ModelOptions):
    """Options of `tc greater-than`."""

    transcoders: Optional[str] = option(
        None,
        "Transcoders to splice in (a folder of per-layer transcoder folders, "
        "or one): each layer's MLP is replaced alone, then all together.",
    )
    layers: Optional[str] = option(
        None, "Layers whose MLP is replaced, e.g. 3 or 0,2-3 (default: every transcoder given)."
    )
    noun: str = option("war", "The noun of the prompt 'The NOUN lasted from the year 17YY to the year 17'.")
    graph: Optional[str] = option(
        None,
        "A graph written by `tc circuit --format json`: also list its top "
        "features and heads, with the tokens the features de-embed to; - reads it from stdin.",
        stdio=True,
    )
    top: int = option(8, "How many graph nodes (and de-embedding tokens) to list with --graph.")
    json: bool = option(False, "Print the results as JSON on stdout instead of lines of text.")

    def validate(self) -> None:
        ModelOptions.validate(self)
        if self.layers and not self.transcoders:
            raise fail("--layers given without --transcoders")
        if self.graph and not self.transcoders:
            raise fail("--graph needs --transcoders (the ones the graph was traced with), for de-embeddings")
        if self.top < 1:
            raise fail(f"--top must be at least 1, got {self.top}")
        if not self.noun.strip():
            raise fail("--noun must not be empty")


WHATS = ("pareto", "training")


METRICS = {
    "recovered": ("recovered_zero", "CE loss recovered (vs zero ablation)"),
    "ce": ("ce_spliced", "CE loss with the MLP spliced (nats)"),
}


PLOT_FORMATS = (".svg", ".png", ".pdf")


@dataclass
class PlotConfig:
    """Options of `tc plot`."""

    what: str = option(
        "",
        "pareto (from `tc eval --json` files) or training (from train_log.jsonl files).",
        argument=True,
        required=True,
        metavar="WHAT",
    )
    inputs: list[str] = option(
        [],
        "The files to plot (- reads one `tc eval --json` result from stdin).",
        argument=True,
        metavar="FILE...",
        stdio=True,
    )
    out: Optional[str] = option(None, "Output image: .svg, .png or .pdf.", flags=("-o", "--out"), required=True)
    metric: str = option("recovered", "pareto: the fidelity axis, recovered (CE loss recovered) or ce (spliced CE).")
    title: Optional[str] = option(None, "Title above the figure.")
    force: bool = option(False, "Replace --out if it exists (never one of the files plotted).", save=False)

    def validate(self) -> None:
        if self.what not in WHATS:
            raise fail(f"tc plot: the first argument must be one of {', '.join(WHATS)}, got {self.what!r}")
        if not self.inputs:
            raise fail(f"tc plot {self.what}: give at least one file to plot")
        if self.metric not in METRICS:
            raise fail(f"--metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if Path(self.out).suffix.lower() not in PLOT_FORMATS:
            raise fail(f"--out {self.out}: the suffix must be one of {', '.join(PLOT_FORMATS)}")


VALIDATE_MODES = ("free", "frozen")


TASKS = ("greater-than",)


@dataclass
class ValidateConfig(AblationOptions, ModelOptions):
    """Options of `tc validate`."""

    graph: str = option(
        "",
        "A graph written by `tc circuit --format json` or `tc graph --format json`; - reads it from stdin.",
        argument=True,
        required=True,
        metavar="GRAPH.json",
        stdio=True,
    )
    model: Optional[str] = option(
        None,
        "Model (default: the one the graph was traced on): a HuggingFace hub "
        "name, a local HuggingFace folder, or 'builtin'.",
    )
    transcoders: Optional[str] = option(
        None, "The transcoders the graph was traced with (default: the path its metadata names)."
    )
    prompts: Optional[str] = option(
        None,
        "A file of prompts, one a line (- reads them from stdin), instead of the graph's own prompt: "
        "nodes are matched by layer and index, positions by offset from the end.",
        metavar="PATH",
        stdio=True,
    )
    task: Optional[str] = option(
        None,
        "greater-than: the 100 greater-than prompts instead, with the paper's "
        "probability difference reported beside the target.",
    )
    noun: str = option("war", "The noun of the greater-than prompts (with --task greater-than).")
    mode: str = option(
        "free",
        "free (everything downstream recomputed) or frozen (attention patterns and norm "
        "scales held at their clean values).",
    )
    random: int = option(5, "Random circuits of equal size and layers drawn as the baseline.")
    seed: int = option(0, "Seed of the random circuits.")
    top: int = option(5, "How many nodes of largest disagreement to list.")
    batch_size: int = option(64, "Rows (prompt x intervention) per forward pass.")
    out: Optional[str] = option(
        None, "Write the graph with the results in its metadata here (- writes it to stdout).", stdio=True
    )
    force: bool = option(False, "Overwrite --out if it exists.")
    json: bool = option(False, "Print the results as JSON on stdout.")

    def validate(self) -> None:
        ModelOptions.validate(self)
        if self.mode not in VALIDATE_MODES:
            raise fail(f"--mode must be one of {', '.join(VALIDATE_MODES)}, got {self.mode!r}")
        self.validate_ablation()
        if self.task is not None and self.task not in TASKS:
            raise fail(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task and self.prompts:
            raise fail("give --prompts or --task, not both")
        for name in ("random", "top", "batch_size"):
            if getattr(self, name) < (0 if name == "random" else 1):
                raise fail(f"--{name.replace('_', '-')} must be at least {0 if name == 'random' else 1}")
        if self.out == "-" and self.json:
            raise fail("--out - and --json would both write to stdout; write the graph to a file")
        if self.out and self.out != "-":
            if Path(self.out).resolve() == Path(self.graph).resolve():
                raise fail(f"--out {self.out} is the graph being read; write the results elsewhere")
            if Path(self.out).exists() and not self.force:
                raise fail(f"{self.out} exists; pass --force to overwrite it")
