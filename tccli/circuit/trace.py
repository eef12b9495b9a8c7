"""`tc circuit`: glue between the model, the transcoders and the greedy path search.

Freezes the forward pass on the prompt (tccli.replacement.prompts), builds the target
(tccli.replacement.targets), runs the greedy path search (search.py) and returns the graph with its
metadata; tccli.circuit.files writes it. No file formats here.
"""

from __future__ import annotations

import torch

from tccli.config.circuit import CircuitConfig
from tccli.data.text import display_token
from tccli.model.loading import LoadedModel, recorded_model_name
from tccli.replacement.model import layer_views
from tccli.replacement.prompts import frozen_prompt, token_strings
from tccli.replacement.targets import build_target
from tccli.transcoders.cross_layer import CrossLayerTranscoder
from tccli.transcoders.formats import recorded_path
from tccli.transcoders.set_id import transcoder_set_id
from tccli.transcoders.transcoder import Transcoder

# ----------------------------------------------------------------------------- tc circuit


def circuit_graph(
    loaded: LoadedModel, transcoders: dict[int, Transcoder] | CrossLayerTranscoder, prompt: str, config: CircuitConfig
):
    """Everything `tc circuit` computes: (graph, summary dict). ``transcoders``: a per-layer set or a
    cross-layer transcoder (docs/method.md section 11)."""
    from tccli import __version__
    from tccli.circuit.search import SearchParams, explained, greedy_search, paths_to_graph
    from tccli.config.fields import to_json_dict

    scan = config.scan or transcoder_set_id(config.transcoders, transcoders)  # before freezing changes dtypes
    tokens, position, transcoders, frozen = frozen_prompt(loaded, transcoders, prompt, config.pos)
    with torch.no_grad():
        target = build_target(config, loaded, transcoders, frozen, position)
        params = SearchParams(
            iters=config.iters,
            branches=config.branches,
            min_contribution=config.min_contribution,
            both_signs=config.both_signs,
            include_bos=config.include_bos,
        )
        result = greedy_search(frozen, target, params)
        strings = token_strings(loaded.tokenizer, tokens.tolist())
        graph = paths_to_graph(frozen, target, result, strings, config.min_contribution)
    kept, error = explained(graph)
    description = dict(target.description)
    for key in ("token", "token_b"):
        if description.get(key) is not None:
            description[key + "_string"] = display_token(loaded.tokenizer, description[key])
            graph.nodes["target"][f"target_{key}_string"] = description[key + "_string"]
    graph.graph["metadata"] = {
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
        "transcoder_spaces": {
            str(layer): {
                "input": t.config.input_space,
                "output": t.config.output_space,
                "skip": t.config.skip,
                "activation": t.config.activation,
            }
            for layer, t in sorted(layer_views(transcoders).items())
        },
        # a logit target is the logit before the final soft-cap c tanh(logit / c), which is not linear
        "final_logit_softcap": loaded.info.final_logit_softcap,
        "prompt": prompt,
        "tokens": strings,
        "token_ids": tokens.tolist(),
        "position": position,
        "target": description,
        "target_value": target.value,
        "target_constant": target.constant,
        "explained": kept,
        "error_into_target": error,
        "search": {
            "iters": params.iters,
            "branches": params.branches,
            "min_contribution": params.min_contribution,
            "both_signs": params.both_signs,
            "include_bos": params.include_bos,
        },
        "config": to_json_dict(config),
    }
    summary = {
        "nodes": graph.number_of_nodes(),
        "edges": graph.number_of_edges(),
        "value": target.value,
        "explained": kept,
        "fraction": kept / target.value if target.value else float("nan"),
        "error": error,
    }
    return graph, summary


# ----------------------------------------------------------------------------- tc deembed
