"""Settings of `tc score` and `tc show`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tccli.config.circuit import ScanOption
from tccli.config.fields import CaptureOptions, DataOptions, ModelOptions, option
from tccli.errors import fail

SCORE_FORMATS = ("h5", "jsonl", "neuronpedia-features")


@dataclass
class ScoreConfig(ScanOption, ModelOptions, CaptureOptions, DataOptions):
    """Options of `tc score`."""

    transcoders: Optional[str] = option(
        None, "Transcoder folder, or a folder of layer_L transcoder folders.", required=True
    )
    layers: Optional[str] = option(None, "Layers to score, e.g. 2 or 0,3-4 (default: every transcoder given).")
    out: Optional[str] = option(
        None,
        "Features file to write: .h5 (HDF5) or .jsonl (one feature a line); with --format "
        "neuronpedia-features a folder (see --format).",
        required=True,
    )
    format: Optional[str] = option(
        None,
        "Output: h5 or jsonl (the default: from --out's suffix), or neuronpedia-features: one JSON file "
        "per feature as circuit-tracer's viewer loads them, in --out DIR/features/SCAN/ (see --scan).",
    )
    top: int = option(20, "Top-activating examples kept per feature.")
    quantiles: int = option(10, "Activation bands to sample examples from (0: none).")
    per_quantile: int = option(2, "Examples kept per band.")
    context_window: int = option(8, "Tokens shown on each side of an example.")
    top_tokens: int = option(10, "Tokens (and pullback features) listed per de-embedding / logit / pullback table.")
    batch_size: int = option(32, "Rows of --context tokens per forward pass.")
    force: bool = option(
        False, "Replace --out if it exists (it is still written to a temporary file first).", save=False
    )
    quiet: bool = option(False, "No progress on stderr.", save=False)

    def validate(self) -> None:
        ModelOptions.validate(self)
        CaptureOptions.validate(self)
        DataOptions.validate(self)
        self.validate_scan()
        if self.format is not None and self.format not in SCORE_FORMATS:
            raise fail(f"--format must be one of {', '.join(SCORE_FORMATS)}, got {self.format!r}")
        if self.format == "neuronpedia-features":
            if not self.out or str(self.out).endswith((".h5", ".hdf5", ".jsonl")):
                raise fail(f"--format neuronpedia-features writes into a folder: --out DIR/, got {self.out!r}")
        else:
            if self.scan is not None:
                raise fail("--scan names the feature files of --format neuronpedia-features")
            suffixes, named = {
                "h5": ((".h5", ".hdf5"), ".h5"),
                "jsonl": ((".jsonl",), ".jsonl"),
            }.get(self.format or "", ((".h5", ".hdf5", ".jsonl"), ".h5 or .jsonl"))
            if not self.out or not str(self.out).endswith(suffixes):
                raise fail(f"--out must end in {named}, got {self.out!r}")
        for name in ("top", "batch_size", "top_tokens"):
            if getattr(self, name) < 1:
                raise fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("quantiles", "per_quantile", "context_window"):
            if getattr(self, name) < 0:
                raise fail(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")


@dataclass
class ShowConfig:
    """Options of `tc show`."""

    features_file: Optional[str] = option(
        None,
        "Features file written by tc score (.h5 or .jsonl); - reads a .jsonl one from stdin.",
        argument=True,
        required=True,
        metavar="FEATURES_FILE",
        stdio=True,
    )
    feature: Optional[str] = option(
        None, "Feature to show in the terminal, e.g. L2.F57.", argument=True, metavar="FEATURE"
    )
    html: Optional[str] = option(
        None, "Write one self-contained HTML page with a card per feature here (-: to stdout).", stdio=True
    )
    features: Optional[str] = option(
        None, "Features for --html, e.g. L2.F57,L3.F1 (default: the first --limit features that fire)."
    )
    limit: int = option(50, "Cards in the HTML page when --features is not given.")
    examples: int = option(10, "Examples shown per feature (top and quantile each).")
    model: Optional[str] = option(None, "Refuse the file unless it was computed on this model (name or folder).")
    force: bool = option(False, "Replace --html if it exists.", save=False)

    def validate(self) -> None:
        if not self.feature and not self.html:
            raise fail("nothing to show: name a feature (e.g. L2.F57) or give --html OUT.html")
        if self.examples < 1 or self.limit < 1:
            raise fail("--examples and --limit must be at least 1")
        if self.html == "-" and self.feature:
            raise fail("--html - writes the page to stdout, where FEATURE would be shown too: give one of them")
        if self.html and self.html != "-" and not str(self.html).endswith((".html", ".htm")):
            raise fail(f"--html must name an .html file, got {self.html!r}")
