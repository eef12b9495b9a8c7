"""`tc graph`: glue between the model, the transcoders and the attribution-graph math.

Runs the model once on the prompt, freezes the forward pass (attribution.freeze, as `tc circuit`
does), builds the targets (circuit-tracer's salient logits by default, or one of `tc circuit`'s
targets), computes the graph (attribution_graph.build_graph) and describes it for the file formats
(attribution_graph_io). No math and no file formats here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from tccli.replacement import attribution
from tccli.graph.attribution_graph import (AttributionGraph, GraphParams, HeadSplit, build_graph, head_split,
                                     salient_logit_targets)
from tccli.circuit.trace import TargetOptions, build_target, frozen_prompt, token_strings
from tccli.config.fields import ModelOptions, option
from tccli.errors import fail
from tccli.circuit.files import PictureOptions
from tccli.model.loading import LoadedModel
from tccli.transcoders.transcoder import Transcoder

FORMATS = ("json", "neuronpedia", "dot", "pt")


@dataclass
class GraphConfig(PictureOptions, TargetOptions, ModelOptions):
    """Options of `tc graph`: tc circuit's targets (TargetOptions, at --pos), or --target logits (the default)."""

    transcoders: str = option("", "Transcoder folder, or a folder of per-layer transcoder folders.",
                              required=True)
    prompt: str = option("", "The prompt (BOS is prepended); - reads it from stdin.", required=True)
    target: Optional[str] = option(None, "Target: 'logits' (the default): the most likely next tokens at --pos "
                                   "until --logit-prob of probability, at most --max-logits, each weighted "
                                   "by its probability.", metavar="logits")
    max_logits: int = option(10, "--target logits: at most this many logits.")
    logit_prob: float = option(0.95, "--target logits: stop adding logits once their probability reaches this.")
    max_feature_nodes: int = option(7500, "Features that get rows (computed most influential first); the "
                                    "others are left out of the graph.")
    node_threshold: float = option(0.8, "Pruning: keep the nodes that carry this share of the influence.")
    edge_threshold: float = option(0.98, "Pruning: keep the edges that carry this share of the edge influence.")
    heads: bool = option(False, "Split each kept edge's attention part by the head of its first attention hop "
                         "(and show head nodes in dot/json).")
    format: str = option("json", "Output: json, neuronpedia, dot or pt.")
    out: Optional[str] = option(None, "Write the graph here instead of stdout.")
    force: bool = option(False, "Replace --out if it exists.", save=False)
    batch_size: int = option(256, "Rows per backward pass (memory grows with it and with the prompt).")
    drop_mass: float = option(1e-3, "Per row, drop the smallest entries while their absolute sum stays within "
                              "this share of the row's (0 keeps every nonzero entry); reported.")
    quiet: bool = option(False, "No progress or summary on stderr.", save=False)

    def validate(self) -> None:
        ModelOptions.validate(self)
        PictureOptions.validate(self)
        chosen = (["--target"] if self.target is not None else []) + self.chosen_targets()
        if len(chosen) > 1:
            raise fail(f"give at most one target ({', '.join(chosen)} given): --target logits (the default), "
                       "--logit, --logit-diff A B, --feature or --direction FILE")
        if self.target is not None and self.target != "logits":
            raise fail(f"--target must be 'logits' (other targets have flags of their own), got {self.target!r}")
        self.validate_target(required=False)
        if self.format not in FORMATS:
            raise fail(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.max_logits < 1:
            raise fail(f"--max-logits must be at least 1, got {self.max_logits}")
        if not 0.0 < self.logit_prob <= 1.0:
            raise fail(f"--logit-prob must be in (0, 1], got {self.logit_prob}")
        if self.max_feature_nodes < 0:
            raise fail(f"--max-feature-nodes must be at least 0, got {self.max_feature_nodes}")
        for name in ("node_threshold", "edge_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise fail(f"--{name.replace('_', '-')} must be between 0 and 1, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise fail(f"--batch-size must be at least 1, got {self.batch_size}")
        if not 0.0 <= self.drop_mass < 1.0:
            raise fail(f"--drop-mass must be in [0, 1), got {self.drop_mass}")

    @property
    def logits_target(self) -> bool:
        return not (self.logit or self.logit_diff or self.feature or self.direction)

    def params(self) -> GraphParams:
        return GraphParams(max_feature_nodes=self.max_feature_nodes, batch_size=self.batch_size,
                           drop_mass=self.drop_mass, node_threshold=self.node_threshold,
                           edge_threshold=self.edge_threshold)


@dataclass
class GraphRun:
    """What `tc graph` computed, with what the file formats need to describe it."""

    graph: AttributionGraph
    frozen: attribution.FrozenForward
    targets: list[attribution.Target]
    tokens: list[int]
    strings: list[str]
    position: int
    metadata: dict
    heads: Optional[HeadSplit] = None  # --heads: the kept edges split by the head of their first hop


def attribution_graph(loaded: LoadedModel, transcoders: dict[int, Transcoder], prompt: str, config: GraphConfig,
                      progress: Optional[Callable[[int, int], None]] = None) -> GraphRun:
    """Everything `tc graph` computes."""
    from tccli import __version__
    from tccli.config.fields import to_json_dict

    if not transcoders:
        raise fail(f"no transcoders in {config.transcoders}")
    tokens, position, transcoders, frozen = frozen_prompt(loaded, transcoders, prompt, config.pos)
    with torch.no_grad():
        if config.logits_target:
            targets, weights = salient_logit_targets(frozen, position, config.max_logits, config.logit_prob)
        else:
            targets = [build_target(config, loaded, transcoders, frozen, position)]
            weights = torch.ones(1, dtype=frozen.embed.dtype, device=frozen.embed.device)
    graph = build_graph(frozen, targets, weights, config.params(), progress)
    heads = None
    if config.heads:
        sources, edge_targets, _ = graph.kept_edges()
        heads = head_split(frozen, graph.table, targets, sources, edge_targets)
    strings = token_strings(loaded.tokenizer, tokens.tolist())
    described = []
    for target, weight in zip(targets, weights.tolist()):
        description = dict(target.description)
        for key in ("token", "token_b"):
            if description.get(key) is not None:
                description[key + "_string"] = loaded.tokenizer.decode([description[key]])
        described.append({**description, "position": target.position, "value": target.value,
                          "constant": target.constant, "weight": weight})
    metadata = {
        "kind": "attribution-graph", "tc_version": __version__, "model": loaded.info.name,
        "architecture": loaded.info.architecture, "n_layers": loaded.info.n_layers,
        "parallel_attn_mlp": loaded.info.parallel_attn_mlp, "transcoders": config.transcoders,
        "transcoder_list": [f"layer_{layer}" for layer in sorted(transcoders)],
        "prompt": prompt, "tokens": strings, "token_ids": tokens.tolist(), "position": position,
        "targets": described, "config": to_json_dict(config),
    }
    return GraphRun(graph=graph, frozen=frozen, targets=targets, tokens=tokens.tolist(), strings=strings,
                    position=position, metadata=metadata, heads=heads)

