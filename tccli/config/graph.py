"""`tc graph`'s settings."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from tccli.config.circuit import NeuronpediaOptions, PictureOptions, TargetOptions
from tccli.config.fields import ModelOptions, option
from tccli.errors import fail

GRAPH_FORMATS = ("json", "neuronpedia", "dot", "pt")


def check_graph_budget(config) -> None:
    """The node budget, pruning thresholds and batch size `tc graph` and `tc serve` share."""
    if config.max_feature_nodes < 0:
        raise fail(f"--max-feature-nodes must be at least 0, got {config.max_feature_nodes}")
    for name in ("node_threshold", "edge_threshold"):
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise fail(f"--{name.replace('_', '-')} must be between 0 and 1, got {getattr(config, name)}")
    if config.batch_size < 1:
        raise fail(f"--batch-size must be at least 1, got {config.batch_size}")


@dataclass
class GraphConfig(PictureOptions, TargetOptions, NeuronpediaOptions, ModelOptions):
    """Options of `tc graph`: tc circuit's targets (TargetOptions, at --pos), or --target logits (the default)."""

    transcoders: str = option("", "Transcoder folder, or a folder of per-layer transcoder folders.", required=True)
    prompt: str = option("", "The prompt (BOS is prepended); - reads it from stdin.", required=True, stdio=True)
    target: Optional[str] = option(
        None,
        "Target: 'logits' (the default): the most likely next tokens at --pos "
        "until --logit-prob of probability, at most --max-logits, each weighted "
        "by its probability.",
        metavar="logits",
    )
    max_logits: int = option(10, "--target logits: at most this many logits.")
    logit_prob: float = option(0.95, "--target logits: stop adding logits once their probability reaches this.")
    max_feature_nodes: int = option(
        7500, "Features that get rows (computed most influential first); the others are left out of the graph."
    )
    node_threshold: float = option(0.8, "Pruning: keep the nodes that carry this share of the influence.")
    edge_threshold: float = option(0.98, "Pruning: keep the edges that carry this share of the edge influence.")
    heads: bool = option(
        False,
        "Split each kept edge's attention part by the head of its first attention hop "
        "(and show head nodes in dot/json).",
    )
    format: str = option("json", "Output: json, neuronpedia, dot or pt.")
    out: Optional[str] = option(
        None,
        "Write the graph here instead of stdout (- or no --out: stdout). With --format neuronpedia, a folder "
        "(DIR/) gets DIR/SLUG.json and the graph is added to DIR/graph-metadata.json, the list circuit-tracer's "
        "local viewer shows.",
        stdio=True,
    )
    force: bool = option(False, "Replace --out (or DIR/SLUG.json) if it exists.", save=False)
    batch_size: int = option(256, "Rows per backward pass (memory grows with it and with the prompt).")
    drop_mass: float = option(
        1e-3,
        "Per row, drop the smallest entries while their absolute sum stays within "
        "this share of the row's (0 keeps every nonzero entry); reported.",
    )
    quiet: bool = option(False, "No progress or summary on stderr.", save=False)

    def validate(self) -> None:
        ModelOptions.validate(self)
        PictureOptions.validate(self)
        self.validate_names()
        chosen = (["--target"] if self.target is not None else []) + self.chosen_targets()
        if len(chosen) > 1:
            raise fail(
                f"give at most one target ({', '.join(chosen)} given): --target logits (the default), "
                "--logit, --logit-diff A B, --feature or --direction FILE"
            )
        if self.target is not None and self.target != "logits":
            raise fail(f"--target must be 'logits' (other targets have flags of their own), got {self.target!r}")
        self.validate_target(required=False)
        if self.format not in GRAPH_FORMATS:
            raise fail(f"--format must be one of {', '.join(GRAPH_FORMATS)}, got {self.format!r}")
        if self.max_logits < 1:
            raise fail(f"--max-logits must be at least 1, got {self.max_logits}")
        if not 0.0 < self.logit_prob <= 1.0:
            raise fail(f"--logit-prob must be in (0, 1], got {self.logit_prob}")
        check_graph_budget(self)
        if not 0.0 <= self.drop_mass < 1.0:
            raise fail(f"--drop-mass must be in [0, 1), got {self.drop_mass}")
        if self.out_folder is not None and self.format != "neuronpedia":
            raise fail(f"--out {self.out} is a folder, which only --format neuronpedia writes into; name a file")

    @property
    def out_folder(self) -> Optional[str]:
        """--out when it names a folder (ends in / or is one): the graph goes in as SLUG.json."""
        if self.out and (self.out.endswith(("/", os.sep)) or os.path.isdir(os.path.expanduser(self.out))):
            return self.out
        return None

    @property
    def logits_target(self) -> bool:
        return not (self.logit or self.logit_diff or self.feature or self.direction)
