"""Settings of `tc view`: an attribution or circuit graph as one self-contained, interactive HTML page."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tccli.config.fields import option
from tccli.errors import fail


@dataclass
class ViewConfig:
    """Options of `tc view`."""

    graph: str = option(
        "",
        "A graph: JSON written by `tc graph` or `tc circuit` (--format json), or a Neuronpedia / "
        "circuit-tracer graph JSON; - reads it from stdin.",
        argument=True,
        required=True,
        metavar="GRAPH.json",
    )
    out: Optional[str] = option(None, "Write the page here (.html); - writes it to stdout.", required=True)
    features: Optional[str] = option(
        None,
        "A features file from `tc score` (.h5 or .jsonl): feature nodes get a label (top de-embedding "
        "tokens and logit effects) and a card (examples, density, tables) as `tc show` draws it.",
        metavar="FEATURES.h5",
    )
    examples: int = option(5, "Examples per feature card (top and quantile each), with --features.")
    min_edge: float = option(
        0.01,
        "Where the page's edge threshold slider starts: edges whose |weight| is below this fraction "
        "of the target's |value| are hidden (the slider moves it in the page).",
        metavar="FRACTION",
    )
    force: bool = option(False, "Replace --out if it exists (never the input graph).", save=False)

    def validate(self) -> None:
        if not self.out:
            raise fail("--out PAGE.html is needed: tc view writes one HTML file")
        if self.out != "-" and not str(self.out).endswith((".html", ".htm")):
            raise fail(f"--out must name an .html file, got {self.out!r}")
        if self.examples < 1:
            raise fail(f"--examples must be at least 1, got {self.examples}")
        if not self.min_edge >= 0:  # also refuses NaN
            raise fail(f"--min-edge must be a fraction >= 0, got {self.min_edge}")
