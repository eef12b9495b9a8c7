"""The greater-than task (Hanna et al. 2023; the transcoder paper's first case study).

Prompt: "The war lasted from the year 17YY to the year 17". A model that has learnt the task puts its
next-token probability on two-digit continuations greater than YY. The paper's score is the
**probability difference**: the mass on the two-digit tokens "ZZ" with ZZ > YY minus the mass on those
with ZZ <= YY, averaged over the prompts (GPT-2 small: 0.883; with MLP10 replaced by its transcoder: 0.798).

The prompt set: 100 prompts with YY spread evenly over 02..98, ``YY_i = 2 + round(96 * i / 99)``,
i = 0..99. Those are all 97 values from 02 to 98, three of them (26, 50, 74) twice, so the set has
the issue's size (100) and range (02-98, Hanna et al.'s range: 00/01 leave nothing below, 99 nothing above)
with the single noun "war" of the paper's case study.

Pure functions take token ids and probabilities; `probability_difference_of_model` runs a loaded model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from tccli.config.evaluation import GreaterThanConfig
from tccli.data.text import display_token
from tccli.errors import TcError, fail
from tccli.nodes import feature_name, head_name
from tccli.runtime import inputs

TEMPLATE = "The {noun} lasted from the year 17{yy:02d} to the year 17"
N_PROMPTS = 100
YY_MIN, YY_MAX = 2, 98


def prompt_years(n_prompts: int = N_PROMPTS, low: int = YY_MIN, high: int = YY_MAX) -> list[int]:
    """YY values spread evenly over [low, high], ``n_prompts`` of them (every value once when n >= range)."""
    if n_prompts < 1 or not 0 <= low <= high <= 99:
        raise fail(f"bad greater-than prompt range: {n_prompts} prompts over {low}..{high}")
    if n_prompts == 1:
        return [low]
    return [low + round((high - low) * i / (n_prompts - 1)) for i in range(n_prompts)]


def prompts(years: Optional[Sequence[int]] = None, noun: str = "war") -> list[str]:
    """The prompt texts for the given YY values (default: the 100-prompt set)."""
    years = prompt_years() if years is None else years
    return [TEMPLATE.format(noun=noun, yy=yy) for yy in years]


def two_digit_token_ids(tokenizer: Any) -> list[int]:
    """Token ids of "00".."99" (no leading space), in numeric order. TcError if one is not a single token."""
    ids = []
    for value in range(100):
        text = f"{value:02d}"
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) != 1:
            raise fail(
                f"the tokenizer splits {text!r} into {len(encoded)} tokens; the greater-than task "
                "needs every two-digit number to be one token"
            )
        ids.append(int(encoded[0]))
    return ids


def probability_difference(year_probs: torch.Tensor, years: Sequence[int]) -> torch.Tensor:
    """Per-prompt probability difference.

    year_probs: [n_prompts, 100], the next-token probability of "00".."99" for each prompt.
    years: the prompts' YY. Returns [n_prompts]: sum_{ZZ > YY} p(ZZ) - sum_{ZZ <= YY} p(ZZ).
    """
    if year_probs.ndim != 2 or year_probs.shape[1] != 100 or year_probs.shape[0] != len(years):
        raise fail(f"year_probs must be [{len(years)}, 100], got {list(year_probs.shape)}")
    values = torch.arange(100, device=year_probs.device)
    yy = torch.as_tensor(list(years), device=year_probs.device).unsqueeze(1)
    sign = torch.where(values.unsqueeze(0) > yy, 1.0, -1.0).to(year_probs.dtype)
    return (year_probs * sign).sum(dim=1)


def encode_prompts(tokenizer: Any, texts: Iterable[str], bos_token_id: int) -> torch.Tensor:
    """[n, seq] token ids, BOS first (how `tc` feeds every row). All prompts must have the same length."""
    rows = [[bos_token_id] + list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise fail(f"greater-than prompts tokenise to different lengths {sorted(lengths)}")
    return torch.tensor(rows, dtype=torch.long)


@dataclass
class GreaterThanResult:
    years: list[int]
    per_prompt: torch.Tensor  # [n] probability differences
    year_probs: torch.Tensor  # [n, 100]

    @property
    def mean(self) -> float:
        return float(self.per_prompt.mean())


def probability_difference_from_logits(
    final_logits: torch.Tensor, year_ids: Sequence[int], years: Sequence[int]
) -> GreaterThanResult:
    """final_logits: [n, vocab] logits at the last prompt position."""
    probs = torch.softmax(final_logits.double(), dim=-1)[:, list(year_ids)]
    return GreaterThanResult(years=list(years), per_prompt=probability_difference(probs, years), year_probs=probs)


def probability_difference_of_logits_fn(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Any,
    bos_token_id: int,
    years: Optional[Sequence[int]] = None,
    noun: str = "war",
) -> GreaterThanResult:
    """Run ``logits_fn(tokens [n, seq]) -> logits [n, seq, vocab]`` on the prompt set and score it."""
    years = prompt_years() if years is None else list(years)
    tokens = encode_prompts(tokenizer, prompts(years, noun), bos_token_id)
    with torch.no_grad():
        logits = logits_fn(tokens)
    return probability_difference_from_logits(logits[:, -1, :], two_digit_token_ids(tokenizer), years)


def probability_difference_of_model(
    loaded: Any, years: Optional[Sequence[int]] = None, extra_hooks: Iterable[tuple[str, Any]] = (), noun: str = "war"
) -> GreaterThanResult:
    """The probability difference of a `tccli.model.loading.LoadedModel`, optionally with hooks spliced in
    (e.g. an MLP replaced by its transcoder)."""
    from tccli.model.loading import run_logits

    hooks = list(extra_hooks)
    return probability_difference_of_logits_fn(
        lambda tokens: run_logits(loaded, tokens, extra_hooks=hooks)[0].cpu(),
        loaded.tokenizer,
        loaded.info.bos_token_id,
        years,
        noun,
    )


# ----------------------------------------------------------------------------- the command


def load_greater_than_inputs(config: GreaterThanConfig) -> tuple[Any, dict, Any]:
    """What `tc greater-than` reads: (the model, the transcoders of --transcoders (a set or a cross-layer
    transcoder) or {}, the --graph or None), each checked against the model."""
    from tccli.circuit.files import check_graph_matches_model, read_graph
    from tccli.evaluation.evaluate import load_checked
    from tccli.model.loading import load_model

    loaded = load_model(config.model, config.device, config.model_dtype)
    transcoders = load_checked(config.transcoders, loaded, config.layers) if config.transcoders else {}
    graph = read_graph(config.graph) if config.graph else None
    if graph is not None:
        check_graph_matches_model(graph, loaded.info, inputs.display_name(config.graph))
    return loaded, transcoders, graph


def run_greater_than(
    config: GreaterThanConfig,
    loaded: Any,
    transcoders: dict,
    graph: Any = None,
    progress: Optional[Callable[[str, int, Optional[int]], None]] = None,
) -> dict:
    """The model's probability difference on the prompt set, clean and with MLPs replaced by transcoders.

    ``loaded``, ``transcoders`` ({layer: Transcoder} or a CrossLayerTranscoder, checked against that model;
    empty when none were given; a CLT's output at a layer sums the writes of every CLT layer up to it) and
    ``graph`` (read from ``--graph`` and checked against the model, or None) are what the command loaded.
    Returns {"prompts": n, "clean": float, "replaced": {layer: float}, "all_replaced": float | None}.
    ``progress(stage, done, total)`` counts the model runs.
    """
    update = progress or (lambda stage, done, total: None)
    from tccli.evaluation.evaluate import chosen_layers, replacement_hooks
    from tccli.replacement.model import layer_views

    layers = chosen_layers(config, loaded, transcoders) if config.transcoders else []

    out: dict = {
        "model": loaded.info.name,
        "prompts": N_PROMPTS,
        "clean": None,
        "replaced": {},
        "all_replaced": None,
        "not_applicable": None,
    }
    try:
        two_digit_token_ids(loaded.tokenizer)
    except TcError as exc:  # e.g. a tokenizer with single digits: the task is undefined, the graph is not
        out["not_applicable"] = str(exc)
    applicable = out["not_applicable"] is None
    runs = (1 + len(layers) + (len(layers) > 1)) if applicable else 0
    done = 0
    update("model runs", done, runs)
    if applicable:
        out["clean"] = probability_difference_of_model(loaded, noun=config.noun).mean
        done += 1
        update("model runs", done, runs)
    if config.transcoders:
        for layer in layers if applicable else ():
            hooks = replacement_hooks(loaded, transcoders, [layer])
            out["replaced"][layer] = probability_difference_of_model(loaded, extra_hooks=hooks, noun=config.noun).mean
            done += 1
            update("model runs", done, runs)
        if len(layers) > 1 and applicable:
            out["all_replaced"] = probability_difference_of_model(
                loaded, extra_hooks=replacement_hooks(loaded, transcoders, layers), noun=config.noun
            ).mean
            update("model runs", done + 1, runs)
        if graph is not None:
            out["top_nodes"] = top_nodes(graph_nodes(graph), loaded, layer_views(transcoders), config.top)
    return out


def graph_nodes(graph: Any) -> list[dict]:
    """Node attribute dicts of a circuit graph (networkx graph or its node-link dict)."""
    if isinstance(graph, dict):
        return list(graph["nodes"])
    return [{"id": node, **attrs} for node, attrs in graph.nodes(data=True)]


def top_nodes(nodes: list[dict], loaded: Any, transcoders: dict, top: int) -> list[dict]:
    """The ``top`` feature and head nodes by path contribution, best first; features get their
    de-embedding."""
    from tccli.features.deembed import feature_deembedding

    chosen = sorted(
        (n for n in nodes if n.get("kind") in ("feature", "head")),
        key=lambda n: -float(n.get("path_contribution") or 0.0),
    )[:top]
    out = []
    for node in chosen:
        row = {
            k: node.get(k)
            for k in (
                "id",
                "kind",
                "layer",
                "feature",
                "head",
                "position",
                "token",
                "activation",
                "path_contribution",
                "direct_contribution",
            )
        }
        if node["kind"] == "feature" and node["layer"] in transcoders:
            n_features = transcoders[node["layer"]].n_features
            if not (isinstance(node.get("feature"), int) and 0 <= node["feature"] < n_features):
                raise fail(
                    f"the graph's node {node['id']} is feature {node.get('feature')!r}, but layer "
                    f"{node['layer']}'s transcoder has features 0-{n_features - 1}: not the transcoders "
                    "it was traced with"
                )
            scores = feature_deembedding(loaded, transcoders[node["layer"]], node["layer"], node["feature"])
            # Byte tokens that are never whole characters (shown <0xE2>) carry no meaning to show.
            texts = (display_token(loaded.tokenizer, i) for i in scores.argsort(descending=True).tolist())
            row["deembedding"] = [t for t in texts if t.isprintable() and "<0x" not in t][:top]
        out.append(row)
    return out


def result_lines(result: dict) -> list[str]:
    if result["not_applicable"]:
        lines = [f"greater-than task not applicable to {result['model']}: {result['not_applicable']}"]
    else:
        lines = [
            f"greater-than probability difference over {result['prompts']} prompts (model {result['model']}):",
            f"  {'clean model':<24} {result['clean']:.3f}",
        ]
    for layer, value in result["replaced"].items():
        lines.append(f"  {f'MLP {layer} -> transcoder':<24} {value:.3f}")
    if result["all_replaced"] is not None:
        lines.append(f"  {'all MLPs -> transcoders':<24} {result['all_replaced']:.3f}")
    if result.get("top_nodes"):
        lines.append("top features and heads of the circuit by path contribution (path: the summed attribution of")
        lines.append("the paths found from the node to the target; direct: the node's own term in the target):")
        for node in result["top_nodes"]:
            token = f"{json.dumps(node['token'], ensure_ascii=False)}@{node['position']}"
            direct = node.get("direct_contribution")  # None in graphs written before it existed
            figures = f"path {node['path_contribution']:<7.3g} direct " + (
                "n/a" if direct is None else f"{direct:<7.3g}"
            )
            if node["kind"] == "feature":
                name, where = feature_name(node["layer"], node["feature"]), f"at {token}"
                detail = f"z {node['activation']:.3g}; de-embeds to " + " ".join(
                    json.dumps(t, ensure_ascii=False) for t in node.get("deembedding", [])
                )
            else:
                name, where, detail = head_name(node["layer"], node["head"]), f"reads {token}", ""
            lines.append(f"  {name:<9} {where:<18} {figures}  {detail}".rstrip())
    return lines
