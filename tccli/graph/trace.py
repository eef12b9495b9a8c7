"""`tc graph`: glue between the model, the transcoders and the attribution-graph math.

Runs the model once on the prompt, freezes the forward pass (freeze, as `tc circuit`
does), builds the targets (circuit-tracer's salient logits by default, or one of `tc circuit`'s
targets), computes the graph (attribution_graph.build_attribution_graph) and describes it for the file
formats (tccli.graph.files). No math and no file formats here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from tccli.config.graph import GraphConfig
from tccli.errors import fail
from tccli.graph.attribution_graph import AttributionGraph, GraphParams, build_attribution_graph
from tccli.graph.heads import HeadSplit, head_split
from tccli.model.loading import LoadedModel, recorded_model_name
from tccli.replacement.frozen import FrozenForward
from tccli.replacement.model import layer_views
from tccli.replacement.prompts import frozen_prompt, token_strings
from tccli.replacement.targets import Target, build_target, salient_logit_targets
from tccli.transcoders.cross_layer import CrossLayerTranscoder
from tccli.transcoders.formats import recorded_path
from tccli.transcoders.set_id import transcoder_set_id
from tccli.transcoders.transcoder import Transcoder


@dataclass
class GraphRun:
    """What `tc graph` computed, with what the file formats need to describe it."""

    graph: AttributionGraph
    frozen: FrozenForward
    targets: list[Target]
    tokens: list[int]
    strings: list[str]
    position: int
    metadata: dict
    heads: Optional[HeadSplit] = None  # --heads: the kept edges split by the head of their first hop


def graph_params(config: GraphConfig) -> GraphParams:
    """The pure math's parameters from `tc graph`'s settings."""
    return GraphParams(
        max_feature_nodes=config.max_feature_nodes,
        batch_size=config.batch_size,
        drop_mass=config.drop_mass,
        node_threshold=config.node_threshold,
        edge_threshold=config.edge_threshold,
    )


def attribution_graph(
    loaded: LoadedModel,
    transcoders: dict[int, Transcoder] | CrossLayerTranscoder,
    prompt: str,
    config: GraphConfig,
    progress: Optional[Callable[[int, int], None]] = None,
) -> GraphRun:
    """Everything `tc graph` computes."""
    from tccli import __version__
    from tccli.config.fields import to_json_dict

    if not transcoders:
        raise fail(f"no transcoders in {config.transcoders}")
    scan = config.scan or transcoder_set_id(config.transcoders, transcoders)  # before freezing changes dtypes
    tokens, position, transcoders, frozen = frozen_prompt(loaded, transcoders, prompt, config.pos)
    with torch.no_grad():
        if config.logits_target:
            targets, weights = salient_logit_targets(frozen, position, config.max_logits, config.logit_prob)
        else:
            targets = [build_target(config, loaded, transcoders, frozen, position)]
            weights = torch.ones(1, dtype=frozen.embed.dtype, device=frozen.embed.device)
    graph = build_attribution_graph(frozen, targets, weights, graph_params(config), progress)
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
        described.append(
            {
                **description,
                "position": target.position,
                "value": target.value,
                "constant": target.constant,
                "weight": weight,
            }
        )
    metadata = {
        "kind": "attribution-graph",
        "tc_version": __version__,
        "model": recorded_model_name(loaded.info.name),
        "architecture": loaded.info.architecture,
        "n_layers": loaded.info.n_layers,
        "parallel_attn_mlp": loaded.info.parallel_attn_mlp,
        "transcoders": recorded_path(config.transcoders),  # absolute: tc validate may run elsewhere
        "transcoder_list": [f"layer_{layer}" for layer in sorted(layer_views(transcoders))],
        "cross_layer": isinstance(transcoders, CrossLayerTranscoder),
        "scan": scan,
        "slug": config.graph_slug(prompt),
        "prompt": prompt,
        "tokens": strings,
        "token_ids": tokens.tolist(),
        "position": position,
        "targets": described,
        "config": to_json_dict(config),
    }
    return GraphRun(
        graph=graph,
        frozen=frozen,
        targets=targets,
        tokens=tokens.tolist(),
        strings=strings,
        position=position,
        metadata=metadata,
        heads=heads,
    )
