"""Interventions on the replacement model (docs/method.md section 10) and `tc intervene`.

**Nodes** (the ids of `tc circuit` / `tc graph`, tccli.nodes): ``mlp8.f1234@5`` a transcoder feature's
activation, ``attn3.h2@4`` head 2 of layer 3's term read from source token 4 (``pattern[h, t, 4] *
value(4) W_O^h`` at every destination t), ``err8@5`` an error term (the whole MLP output where the layer
has no transcoder); ``@*`` every position, a negative position counts from the end.

**Interventions.** ``ablate``: a feature to 0 (or, with mean ablation, to its mean activation over all
tokens from a `tc score` file), a head term or error term removed; ``set``: a feature's activation to a
value; ``scale``: a feature's activation, a head term or an error term times a factor.

**Modes.** ``free``: everything downstream recomputed (patterns, norm scales, later features).
``frozen``: attention patterns and every norm scale held at their clean values; later features respond
(the graph's local replacement model, whose only non-linearity left is the transcoders' activation).
``direct``: every node held at its clean value except the changed ones (every feature, every error term,
every MLP without a transcoder and every head's term), norm scales frozen: the residual stream is the
clean one plus the changed nodes' own writes, so a target changes by exactly those nodes' one-hop
edges into it (`tc circuit`'s edges). The model itself is tccli.replacement.model.

**Cross-layer transcoders** (docs/method.md section 11) run wherever a set does: a feature ``mlp3.f7@5`` is
feature 7 of the encoder reading layer 3, and changing it changes the MLP output of layer 3 and of every
later layer it writes to, at once; ``err8@5`` is everything the CLT misses at MLP 8.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from tccli.config.replacement import InterveneConfig
from tccli.errors import fail
from tccli.model.loading import LoadedModel
from tccli.nodes import Intervention, parse_assignment, parse_node, target_spec_label
from tccli.replacement.model import ReplacementModel, RowSpec, Transcoders, layer_views
from tccli.replacement.targets import TargetSpec, target_from_options
from tccli.transcoders.transcoder import Transcoder

# ============================================================================ means for mean ablation


def feature_means(path: str, loaded: LoadedModel, transcoders: dict[int, Transcoder]) -> dict[int, torch.Tensor]:
    """Each transcoder layer's features' mean activations over all tokens, from a `tc score` file."""
    from tccli.features.files import FeaturesFile, check_features_match_model

    features = FeaturesFile.open(path)
    check_features_match_model(features, loaded.info)
    out = {}
    for layer, transcoder in transcoders.items():
        if layer not in features.layers:
            continue
        if features.n_features(layer) != transcoder.n_features:
            raise fail(
                f"{path} has {features.n_features(layer)} features for layer {layer}; its transcoder "
                f"has {transcoder.n_features}: not scored with these transcoders"
            )
        out[layer] = torch.as_tensor(features.mean_activations(layer), dtype=torch.float32)
    return out


# ============================================================================ tc intervene


def top_tokens(probabilities: torch.Tensor, tokenizer: Any, k: int) -> list[dict]:
    top = probabilities.topk(min(k, probabilities.shape[-1]))
    return [
        {"token": tokenizer.decode([int(i)]), "id": int(i), "probability": float(p)}
        for p, i in zip(top.values, top.indices)
    ]


def kl_divergence(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """KL(p || q) in nats from log-probabilities [vocab]."""
    return float((p_log.exp() * (p_log - q_log)).sum())


def run_intervene(
    config: InterveneConfig,
    loaded: LoadedModel,
    transcoders: Transcoders,
    prompt: str,
    watched: Optional[TargetSpec] = None,
    means: Optional[dict[int, torch.Tensor]] = None,
) -> dict:
    """Everything `tc intervene` prints: the target and the next-token distribution, before and after.

    ``transcoders``: a per-layer set {layer: Transcoder} or a CrossLayerTranscoder. ``watched``: a target to
    read instead of the one ``config``'s target options name (`tc serve` watches a graph's own target);
    ``means``: the feature means of ``config.features``, when the caller has them."""
    from tccli.replacement.prompts import prompt_tokens, resolve_position, token_strings
    from tccli.transcoders.files import check_transcoders

    views = layer_views(transcoders)
    check_transcoders(views, loaded)
    interventions = parse_interventions(config)
    tokens = prompt_tokens(loaded, prompt)
    position = resolve_position(config.pos, int(tokens.shape[0]))
    target = watched if watched is not None else target_from_options(config, loaded, views)
    if means is None and config.features:
        means = feature_means(config.features, loaded, views)
    model = ReplacementModel(loaded, transcoders, tokens.unsqueeze(0), means)
    rows = [RowSpec(0), RowSpec(0, interventions)]
    capture = target.capture_names(model) if target is not None else []
    output = model.run(rows, config.mode, config.ablation, capture)
    log_probs = torch.log_softmax(output.logits[:, position].double(), dim=-1)
    result = {
        "prompt": prompt,
        "tokens": token_strings(loaded.tokenizer, tokens.tolist()),
        "position": position,
        "mode": config.mode,
        "ablation": config.ablation,
        "interventions": [i.describe() for i in interventions],
        "target": None,
        "top_before": top_tokens(log_probs[0].exp(), loaded.tokenizer, config.top),
        "top_after": top_tokens(log_probs[1].exp(), loaded.tokenizer, config.top),
        "kl": kl_divergence(log_probs[0], log_probs[1]),
    }
    if target is not None:
        before, after = (float(v) for v in target.values(model, output))
        description = dict(target.description)
        for key in ("token", "token_b"):
            if description.get(key) is not None:
                description[key + "_string"] = loaded.tokenizer.decode([description[key]])
        result["target"] = {**description, "before": before, "after": after, "change": after - before}
    return result


def intervene_lines(result: dict) -> list[str]:
    lines = [
        f"{'; '.join(result['interventions']) or 'no intervention'} ({result['mode']} mode, "
        f"{result['ablation']} ablation) at token {result['position']} "
        f"{result['tokens'][result['position']]!r}"
    ]
    target = result["target"]
    if target is not None:
        lines.append(
            f"target {target_spec_label(target)}: {target['before']:.6g} -> {target['after']:.6g} "
            f"(change {target['change']:+.6g})"
        )
    lines.append(f"KL(before || after) of the next-token distribution: {result['kl']:.6g} nats")
    lines.append(f"{'before':<32}after")
    for before, after in zip(result["top_before"], result["top_after"]):
        left = f"{before['token']!r} {before['probability']:.4f}"
        lines.append(f"  {left:<30}{after['token']!r} {after['probability']:.4f}")
    return lines


def parse_interventions(config: InterveneConfig) -> tuple[Intervention, ...]:
    """`tc intervene`'s --ablate, --set and --scale, in that order."""
    return (
        tuple(Intervention(parse_node(text), "ablate") for text in config.ablate)
        + tuple(parse_assignment(text, "set") for text in config.set)
        + tuple(parse_assignment(text, "scale") for text in config.scale)
    )
