"""`tc intervene`'s settings and what an ablated feature becomes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tccli.config.circuit import TargetOptions
from tccli.config.fields import ModelOptions, option
from tccli.errors import fail

MODES = ("free", "frozen", "direct")


ABLATIONS = ("zero", "mean")


@dataclass
class AblationOptions:
    """What an ablated feature becomes (`tc intervene`, `tc validate`)."""

    ablation: str = option(
        "zero",
        "What an ablated feature becomes: zero, or mean (its mean activation over "
        "all tokens, from --features). Head and error terms are always removed.",
    )
    features: Optional[str] = option(
        None,
        "A features file from `tc score` (for --ablation mean); - reads a JSONL one from stdin.",
        metavar="PATH",
        stdio=True,
    )

    def validate_ablation(self) -> None:
        if self.ablation not in ABLATIONS:
            raise fail(f"--ablation must be one of {', '.join(ABLATIONS)}, got {self.ablation!r}")
        if self.ablation == "mean" and not self.features:
            raise fail("--ablation mean needs --features FILE (a tc score features file)")


@dataclass
class InterveneConfig(TargetOptions, AblationOptions, ModelOptions):
    """Options of `tc intervene`."""

    transcoders: str = option("", "Transcoder folder, or a folder of per-layer transcoder folders.", required=True)
    prompt: str = option("", "The prompt (BOS is prepended); - reads it from stdin.", required=True, stdio=True)
    ablate: list[str] = option(
        [],
        "Nodes to ablate: mlp8.f1234@5 (feature), attn3.h2@4 (head 2's term from "
        "source token 4), err8@5 (error term); @* every position.",
        metavar="NODE...",
        several=True,
    )
    set: list[str] = option([], "Set features' activations: NODE=VALUE.", metavar="NODE=VALUE...", several=True)
    scale: list[str] = option(
        [], "Scale features, head terms or error terms: NODE=FACTOR.", metavar="NODE=FACTOR...", several=True
    )
    mode: str = option(
        "free",
        "free (everything downstream recomputed), frozen (attention patterns and norm "
        "scales held at their clean values) or direct (every other node held too).",
    )
    top: int = option(10, "How many top next-token predictions to list before and after.")
    json: bool = option(False, "Print the result as JSON on stdout.")

    def validate(self) -> None:
        ModelOptions.validate(self)
        self.validate_target(required=False)
        self.validate_ablation()
        if self.mode not in MODES:
            raise fail(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.top < 1:
            raise fail(f"--top must be at least 1, got {self.top}")
