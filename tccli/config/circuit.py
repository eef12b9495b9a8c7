"""Settings of `tc circuit`, `tc deembed` and `tc export`: targets, pictures, output formats."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Optional

from tccli.config.fields import ModelOptions, option
from tccli.errors import fail

EXPORT_FORMATS = ("dot", "svg", "png", "graphml", "json", "neuronpedia")

SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# The settings a default slug hashes besides the prompt: another model, set or target is another graph.
SLUG_SOURCES = ("model", "transcoders", "target", "feature", "logit", "logit_diff", "direction", "layer", "pos")


@dataclass
class ScanOption:
    """The transcoder set's id in Neuronpedia files (circuit-tracer's ``scan``)."""

    scan: Optional[str] = option(
        None,
        "Neuronpedia: the transcoder set's id (a graph's scan), which viewers find feature examples by "
        "(default: the hub id, a circuit-tracer config's scan, else tc- and a hash of the set).",
        metavar="ID",
        late=True,
    )

    def validate_scan(self) -> None:
        if self.scan is not None and (
            not self.scan.strip() or len(self.scan) > 200 or any(c.isspace() or ord(c) < 32 for c in self.scan)
        ):
            raise fail(f"--scan must be 1-200 characters without spaces or control characters, got {self.scan!r}")


@dataclass
class NeuronpediaOptions(ScanOption):
    """What names a graph in Neuronpedia files: its set's id and its slug."""

    slug: Optional[str] = option(
        None,
        "Neuronpedia: the graph's slug, its name in a viewer's list and its file name with --out DIR/ "
        "(default: the prompt's first words and a hash of the prompt, model, transcoders and target).",
        metavar="SLUG",
        late=True,
    )

    def validate_names(self) -> None:
        self.validate_scan()
        if self.slug is not None and not SLUG.fullmatch(self.slug):
            raise fail(
                f"--slug must be 1-100 letters, digits, '.', '_' or '-' starting with a letter or digit, "
                f"got {self.slug!r}"
            )

    def graph_slug(self, prompt: str) -> str:
        """--slug, else the prompt's first words and 8 hex digits of a hash of what made the graph."""
        if self.slug:
            return self.slug
        made_of = [prompt] + [getattr(self, name, None) for name in SLUG_SOURCES]
        digest = hashlib.sha256(json.dumps(made_of, default=str).encode()).hexdigest()[:8]
        words = "-".join(re.findall(r"[a-z0-9]+", prompt.lower())[:6])[:40].strip("-")
        return f"{words}-{digest}" if words else f"graph-{digest}"


@dataclass
class PictureOptions:
    """How a graph is drawn (dot, svg, png): which edges, and which weights are written."""

    min_edge: float = option(
        0.01,
        "Pictures (dot, svg, png): draw only edges whose |weight| is at least this "
        "fraction of the target's |value|; nodes left without an edge (mostly error "
        "nodes) are hidden. 0 draws everything.",
        metavar="FRACTION",
        late=True,
    )
    min_edge_label: float = option(
        0.05,
        "Pictures: write the weight (3 significant figures) on edges whose "
        "|weight| is at least this fraction of the target's |value|.",
        metavar="FRACTION",
        late=True,
    )

    def validate(self) -> None:
        for flag, value in (("--min-edge", self.min_edge), ("--min-edge-label", self.min_edge_label)):
            if not value >= 0:  # also refuses NaN
                raise fail(f"{flag} must be a fraction >= 0, got {value}")


@dataclass
class ExportConfig(PictureOptions, NeuronpediaOptions):
    """Options of `tc export`."""

    graph: str = option(
        "",
        "A graph written by `tc circuit` or `tc graph --format json`; - reads it from stdin.",
        argument=True,
        required=True,
        metavar="GRAPH.json",
        stdio=True,
    )
    format: str = option("dot", "Output: dot, svg, png, graphml, json or neuronpedia.")
    out: Optional[str] = option(None, "Write here instead of stdout (- or no --out: stdout).", stdio=True)
    force: bool = option(False, "Replace --out if it exists (never the input graph).", save=False)

    def validate(self) -> None:
        PictureOptions.validate(self)
        self.validate_names()
        if self.format not in EXPORT_FORMATS:
            raise fail(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {self.format!r}")


CIRCUIT_FORMATS = ("dot", "json", "neuronpedia")


@dataclass
class TargetOptions:
    """The scalar a command explains or watches (`tc circuit`, `tc intervene`): one of four kinds."""

    feature: Optional[str] = option(None, "Target: a transcoder feature's pre-activation, e.g. L8.F1234.")
    logit: Optional[str] = option(None, "Target: the logit of this token (must be a single token).")
    logit_diff: list[str] = option(
        [], "Target: logit(A) - logit(B), given as --logit-diff A B.", metavar="A B", several=True
    )
    direction: Optional[str] = option(
        None,
        "Target: a direction (.npy, [d_model]) dotted with the residual "
        "stream entering block --layer (--layer n_layers: after the last block).",
    )
    layer: Optional[int] = option(None, "The residual stream --direction is read from.")
    pos: int = option(-1, "Token position of the target (negative counts from the end).")

    def chosen_targets(self) -> list[str]:
        return [
            name
            for name, value in (
                ("--feature", self.feature),
                ("--logit", self.logit),
                ("--logit-diff", self.logit_diff or None),
                ("--direction", self.direction),
            )
            if value is not None
        ]

    def validate_target(self, required: bool = True) -> None:
        """At most one target (exactly one when ``required``), each well formed."""
        chosen = self.chosen_targets()
        if len(chosen) > 1 or (required and not chosen):
            raise fail(
                "give exactly one target: --feature, --logit, --logit-diff A B or --direction FILE "
                f"(got {', '.join(chosen) or 'none'})"
            )
        if self.logit_diff and len(self.logit_diff) != 2:
            raise fail(f"--logit-diff needs exactly two tokens A B, got {len(self.logit_diff)}")
        if self.direction is not None and self.layer is None:
            raise fail("--direction needs --layer L (the residual stream it is read from)")
        if self.direction == "-":  # graphs record the file's path: tc validate reads it again
            raise fail("--direction cannot be read from stdin (a graph records the .npy file's path); pass its path")


@dataclass
class CircuitConfig(PictureOptions, TargetOptions, NeuronpediaOptions, ModelOptions):
    """Options of `tc circuit`."""

    transcoders: str = option("", "Transcoder folder, or a folder of per-layer transcoder folders.", required=True)
    prompt: str = option("", "The prompt (BOS is prepended); - reads it from stdin.", required=True, stdio=True)
    iters: int = option(3, "Path search iterations (path length).")
    branches: int = option(15, "Paths kept per iteration, and candidates per path.")
    min_contribution: float = option(0.0, "Ignore candidates whose contribution is at most this.")
    both_signs: bool = option(False, "Follow negative contributions too (rank by absolute value).")
    include_bos: bool = option(False, "Allow the BOS position as a source.")
    format: str = option("dot", "Output: dot, json or neuronpedia.")
    out: Optional[str] = option(None, "Write the graph here instead of stdout (- or no --out: stdout).", stdio=True)
    force: bool = option(False, "Replace --out if it exists.", save=False)
    quiet: bool = option(False, "No summary on stderr.", save=False)

    def validate(self) -> None:
        ModelOptions.validate(self)
        PictureOptions.validate(self)
        self.validate_names()
        self.validate_target()
        if self.format not in CIRCUIT_FORMATS:
            raise fail(f"--format must be one of {', '.join(CIRCUIT_FORMATS)}, got {self.format!r}")
        if self.iters < 1 or self.branches < 1:
            raise fail("--iters and --branches must be at least 1")


@dataclass
class DeembedConfig(ModelOptions):
    """Options of `tc deembed`."""

    transcoders: str = option("", "Transcoder folder, or a folder of per-layer transcoder folders.", required=True)
    feature: str = option("", "The feature, e.g. L0.F17.", required=True)
    top: int = option(20, "How many tokens to list.")
    head: Optional[str] = option(None, "Go through this attention head's OV circuit, e.g. L0.H3.")

    def validate(self) -> None:
        ModelOptions.validate(self)
        if self.top < 1:
            raise fail("--top must be at least 1")
