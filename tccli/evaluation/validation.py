"""`tc validate`: test a circuit graph against the model it claims to explain (docs/method.md section 10).

For a circuit C (the graph's feature and head nodes) and its target T (clean value T0), on the graph's
prompt or on many prompts, in the replacement model (`tccli.replacement.intervention`):

- **necessity** = 1 - T(C ablated) / T0: the share of the target lost without the circuit;
- **sufficiency** = T(every other feature of every transcoder layer ablated, at every position) / T0:
  the share kept by the circuit's features alone (heads, error terms and MLPs without a transcoder are
  left as they are);
- **per-node faithfulness**: each node's predicted ablation effect against its measured one, as a
  Spearman rank correlation, and the nodes where the two disagree most. Two predictions: the graph's
  (minus the node's total attribution along the graph's paths; for a mean-ablated feature scaled by
  1 - mean / activation) and the unpruned local replacement model's (the node's derivative over every
  path, one backward pass per prompt, times the change the ablation makes);
- the same for random circuits of equal size and layers (features drawn among those active at the same
  layer and position, heads among the same layer's (head, source) pairs), the baseline.

Over many prompts each figure is a ratio of means over prompts (per-prompt ratios explode where T0 is
near zero); nodes are matched by layer and index and their positions by offset from the end (BOS stays
BOS). With ``task='greater-than'`` the paper's probability difference is reported too.

The top half of this module is pure math; ``run_validation`` is the glue, on the graph, model, transcoders
(and feature means and prompts) its command loaded with the helpers beside it.
"""

from __future__ import annotations

import json
import math
import random as random_module
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from tccli.circuit.files import is_attribution_graph
from tccli.config.evaluation import ValidateConfig
from tccli.errors import fail
from tccli.evaluation.validation_math import (
    largest_disagreements,
    necessity,
    sample_random_circuit,
    spearman,
    sufficiency,
)
from tccli.nodes import Intervention, NodeRef
from tccli.replacement.model import RowSpec
from tccli.replacement.targets import TargetSpec
from tccli.runtime import inputs
from tccli.runtime.progress import no_progress

CIRCUIT_KINDS = ("feature", "head")
GRADIENT_PROMPTS = 8  # prompts per backward pass of the unpruned prediction


# ============================================================================ reading a graph


@dataclass
class CircuitNode:
    ref: NodeRef  # at its position on the graph's prompt
    attribution: float  # the node's total attribution to the target along the graph's paths
    activation: Optional[float]  # a feature's activation on the graph's prompt


# Node attributes of `tc circuit` graphs that hold a node's total (path-summed) attribution to the target,
# newest name first (graphs written before path_contribution called it contribution).
ATTRIBUTION_KEYS = ("path_contribution", "contribution")


def node_attribution(attrs: dict) -> float:
    """A node's total attribution along the graph's paths, under whichever name its writer used."""
    for key in ATTRIBUTION_KEYS:
        value = attrs.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 0.0


def whole_edge(data: dict) -> float:
    """An edge's full direct effect: `tc graph --heads` moves the parts through shown heads to head nodes."""
    return float(data.get("weight") or 0.0) + sum(float(v) for v in (data.get("heads") or {}).values())


def path_attributions(graph: Any, target: str) -> dict[str, float]:
    """Each node's total attribution to ``target`` over the paths of a graph whose edges are direct effects.

    attribution(n) = sum over edges n -> v of weight(n -> v) * D(v), with D(target) = 1 and, for a feature
    v, D(v) = attribution(v) / activation(v): an active feature passes a change of its pre-activation on one
    to one, and an edge into v is v's pre-activation change per the source's whole activation. Head nodes
    (`tc graph --heads`) carry parts of feature-to-node edges: those edges are made whole again for the
    features' recursion, and a head's own attribution is what its out-edges carry.
    """
    import networkx as nx

    slope = {target: 1.0}
    out: dict[str, float] = {}
    for node in reversed(list(nx.topological_sort(graph))):
        if node == target:
            continue
        attrs = graph.nodes[node]
        head = attrs.get("kind") == "head"
        total = 0.0
        for _, downstream, data in graph.out_edges(node, data=True):
            if downstream not in slope or (not head and graph.nodes[downstream].get("kind") == "head"):
                continue
            total += (float(data.get("weight") or 0.0) if head else whole_edge(data)) * slope[downstream]
        out[node] = total
        if attrs.get("kind") == "feature" and attrs.get("activation"):
            slope[node] = total / float(attrs["activation"])
    return out


def circuit_nodes(graph: Any) -> list[CircuitNode]:
    """The graph's feature and head nodes (a networkx graph as tccli.circuit.files reads it), each with its total
    attribution to the target along the graph's paths."""
    from tccli.nodes import parse_node

    summed = (
        path_attributions(graph, graph_target(graph.graph.get("metadata", {}))[1])
        if is_attribution_graph(graph)
        else None
    )
    out = []
    for node_id, attrs in graph.nodes(data=True):
        kind = attrs.get("kind")
        if kind not in CIRCUIT_KINDS:
            continue
        index = attrs.get("feature") if kind == "feature" else attrs.get("head")
        if isinstance(attrs.get("layer"), int) and isinstance(index, int) and isinstance(attrs.get("position"), int):
            ref = NodeRef(kind, attrs["layer"], index, attrs["position"])
        else:
            ref = parse_node(str(node_id))
        activation = attrs.get("activation") if kind == "feature" else None
        attribution = summed.get(node_id, 0.0) if summed is not None else node_attribution(attrs)
        out.append(CircuitNode(ref, attribution, None if activation is None else float(activation)))
    return out


def map_position(position: int, n_graph: int, n_tokens: int) -> Optional[int]:
    """A graph position on another prompt: by offset from the end (BOS, position 0, stays 0); None when
    it falls before the prompt's first token."""
    if position == 0:
        return 0
    mapped = position + n_tokens - n_graph
    return mapped if 1 <= mapped < n_tokens else None


def graph_target(meta: dict) -> tuple[dict, str]:
    """(the target's description, its node id). A `tc graph` graph may have several logit targets: the most
    probable next token's is validated."""
    targets = meta.get("targets")
    if isinstance(targets, list) and targets:
        chosen = max(targets, key=lambda t: t.get("weight") or 0.0)
        node = (
            f"logit{chosen['token']}@{chosen['position']}"
            if chosen.get("kind") == "logit" and chosen.get("demeaned")
            else "target"
        )
        return dict(chosen), node
    return dict(meta.get("target") or {}), "target"


def target_from_metadata(meta: dict, loaded: Any) -> TargetSpec:
    """The graph's target, its position as an offset from the end of the prompt."""
    description, _ = graph_target(meta)
    kind = description.get("kind")
    n_graph = len(meta.get("token_ids") or [])
    position = description.get("position", meta.get("position"))
    if not isinstance(position, int) or n_graph == 0:
        raise fail("the graph's metadata names no target position and tokens (was it written by tc circuit?)")
    offset = position - n_graph
    if kind in ("logit", "logit_diff"):
        return TargetSpec(
            kind,
            offset,
            token=description.get("token"),
            token_b=description.get("token_b"),
            demeaned=bool(description.get("demeaned")),
            description=description,
        )
    if kind == "feature":
        return TargetSpec(
            kind, offset, layer=description.get("layer"), feature=description.get("feature"), description=description
        )
    if kind == "direction":
        from tccli.replacement.targets import load_direction

        path = (meta.get("config") or {}).get("direction")
        if not path or not Path(path).is_file():
            raise fail(f"the graph's target is a direction read from {path!r}, which is not here")
        return TargetSpec(
            kind,
            offset,
            layer=description.get("layer"),
            direction=load_direction(path, loaded.info.d_model),
            description=description,
        )
    raise fail(f"the graph's target kind {kind!r} is not one tc validate knows")


# ============================================================================ tc validate


def graph_model_name(meta: dict) -> Optional[str]:
    """The model a graph was traced on; the built-in model by name wherever tc is installed."""
    name = meta.get("model")
    if name and Path(name).parts[-3:] == ("tccli", "builtin", "model") and not Path(name).is_dir():
        return "builtin"
    return name


def read_prompts(path: str) -> list[str]:
    """The prompts of a file (stdin for `-`), one a line; blank lines skipped."""
    if inputs.is_stdin(path):
        lines = inputs.read_stdin("prompts, one a line", ("text", "json", "jsonl")).decode("utf-8").splitlines()
    elif not Path(path).exists():
        raise fail(f"prompts file {path} does not exist")
    elif Path(path).is_dir():
        raise fail(f"prompts file {path} is a folder; name a file of prompts, one a line")
    else:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise fail(f"prompts file {path} is not UTF-8 text") from None
        except OSError as exc:
            raise fail(f"cannot read prompts from {path}: {exc.strerror}") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise fail(f"{inputs.display_name(path)} holds no prompts (one a line)")
    return prompts


@dataclass
class _Group:
    """Prompts of one length, their replacement model, and each circuit's nodes mapped onto them."""

    model: Any
    prompt_indices: list[int]  # into the full prompt list
    years: Optional[list[int]]


def input_paths(config: ValidateConfig, meta: dict) -> list[Optional[str]]:
    """Every file or folder `tc validate` reads (its --out must be none of them): the graph, the prompts,
    the features, and the transcoders and model given or named by the graph's metadata ``meta``."""
    return [
        config.graph,
        config.prompts,
        config.features,
        config.transcoders or meta.get("transcoders"),
        config.model or meta.get("model"),
    ]


def transcoders_path(config: ValidateConfig, meta: dict) -> str:
    """--transcoders, or the transcoders the graph's metadata names; refused unless they are here."""
    path = config.transcoders or meta.get("transcoders")
    if not path or not Path(path).exists():
        raise fail(f"the graph's transcoders {path!r} are not here; pass --transcoders PATH")
    return path


def check_fits_model(meta: dict, loaded: Any, transcoders: Any) -> None:
    """Refuse transcoders (a set or a cross-layer transcoder) made for another model (or SAEs), and a graph
    traced on another architecture."""
    from tccli.replacement.model import layer_views
    from tccli.transcoders.files import check_transcoders

    check_transcoders(layer_views(transcoders), loaded)
    if meta.get("architecture") and meta["architecture"] != loaded.info.architecture:
        raise fail(f"the graph was traced on a {meta['architecture']} model, not this {loaded.info.architecture}")


def load_validation_inputs(config: ValidateConfig, meta: dict) -> tuple[Any, Any, Optional[dict], Optional[list]]:
    """What `tc validate` reads besides the graph (whose ``meta`` names the model and transcoders when the
    flags do not): (the model, the transcoders checked against it: a per-layer set or a cross-layer
    transcoder, the --features means or None, the --prompts or None)."""
    from tccli.model.loading import load_model
    from tccli.replacement.intervention import feature_means
    from tccli.replacement.model import layer_views
    from tccli.transcoders.formats import load_transcoders

    loaded = load_model(config.model or graph_model_name(meta), config.device, config.model_dtype)
    transcoders = load_transcoders(transcoders_path(config, meta), loaded.device)
    check_fits_model(meta, loaded, transcoders)
    means = feature_means(config.features, loaded, layer_views(transcoders)) if config.features else None
    prompts = read_prompts(config.prompts) if config.prompts else None
    return loaded, transcoders, means, prompts


def run_validation(
    config: ValidateConfig,
    graph: Any,
    loaded: Any,
    transcoders: Any,
    means: Optional[dict] = None,
    prompts: Optional[list[str]] = None,
    log=lambda message: None,
    update: Any = no_progress,
) -> dict:
    """Everything `tc validate` computes, as a results dict, on what its command loaded: ``graph`` (read from
    ``config.graph``), ``loaded`` and ``transcoders`` (a per-layer set {layer: Transcoder} or a
    CrossLayerTranscoder, checked by `check_fits_model`), the feature means of
    ``--features`` (or None) and the prompts of ``--prompts`` (or None: the graph's own prompt, or the task's).
    ``update(stage, done, total)`` follows the forward passes and the backward passes of each group of prompts."""
    from tccli.replacement.model import ReplacementModel
    from tccli.replacement.prompts import prompt_tokens

    meta = graph.graph.get("metadata", {})
    target = target_from_metadata(meta, loaded)
    nodes = circuit_nodes(graph)
    if not nodes:
        raise fail(f"{inputs.display_name(config.graph)} has no feature or head nodes to validate")
    graph_ids = [int(t) for t in meta["token_ids"]]
    n_graph = len(graph_ids)

    # prompts
    years = None
    if config.task == "greater-than":
        from tccli.evaluation import greater_than

        years = greater_than.prompt_years()
        texts = greater_than.prompts(years, config.noun)
        greater_than.two_digit_token_ids(loaded.tokenizer)
    else:
        texts = prompts
    token_rows = [torch.tensor(graph_ids)] if texts is None else [prompt_tokens(loaded, t) for t in texts]

    # random circuits, drawn on the graph's own prompt
    circuit = [n.ref for n in nodes]
    graph_model = ReplacementModel(loaded, transcoders, torch.tensor([graph_ids]), means)
    active = {}
    for layer in graph_model.transcoders:
        z = graph_model.clean_activations(layer)[0]
        for p in range(1, n_graph):
            active[(layer, p)] = torch.nonzero(z[p]).reshape(-1).tolist()
    target_position = graph_model.position(target.position)
    rng = random_module.Random(config.seed)
    randoms = [
        sample_random_circuit(circuit, active, loaded.info.n_heads, range(1, target_position + 1), rng)
        for _ in range(config.random)
    ]
    circuits = [circuit] + randoms  # circuit 0 is the graph's

    by_length: dict[int, list[int]] = {}
    for i, row in enumerate(token_rows):
        by_length.setdefault(int(row.shape[0]), []).append(i)
    n_prompts = len(token_rows)
    clean_t = [0.0] * n_prompts
    ablated_t = [[0.0] * n_prompts for _ in circuits]
    kept_t = [[0.0] * n_prompts for _ in circuits]
    metric = {key: [[0.0] * n_prompts for _ in circuits] for key in ("ablated", "kept")}
    metric_clean = [0.0] * n_prompts
    single = [[[] for _ in c] for c in circuits]  # per circuit, per node: measured effects over prompts
    predicted_total = [[[] for _ in c] for c in circuits]
    dropped = [0] * len(circuits)
    for n_tokens, indices in sorted(by_length.items()):
        model = ReplacementModel(loaded, transcoders, torch.stack([token_rows[i] for i in indices]), means)
        model.position(target.position)  # a prompt too short for the target is refused here
        log(f"{len(indices)} prompt(s) of {n_tokens} tokens")
        mapped = []
        for c, nodes_c in enumerate(circuits):
            refs = [n.at(map_position(n.position, n_graph, n_tokens)) for n in nodes_c]
            dropped[c] += sum(r.position is None for r in refs) * len(indices)
            mapped.append(refs)
        rows: list[RowSpec] = []
        layout = []  # (what, circuit, node) per block of len(indices) rows
        for p in range(len(indices)):
            rows.append(RowSpec(p))
        layout.append(("clean", -1, -1))
        for c, refs in enumerate(mapped):
            present = [r for r in refs if r.position is not None]
            ablate = tuple(Intervention(r, "ablate") for r in present)
            keep = frozenset((r.layer, r.index, r.position) for r in present if r.kind == "feature")
            rows += [RowSpec(p, ablate) for p in range(len(indices))]
            layout.append(("ablated", c, -1))
            rows += [RowSpec(p, (), keep) for p in range(len(indices))]
            layout.append(("kept", c, -1))
            for k, r in enumerate(refs):
                if r.position is not None:
                    rows += [RowSpec(p, (Intervention(r, "ablate"),)) for p in range(len(indices))]
                    layout.append(("single", c, k))
        group_years = [years[i] for i in indices] if years is not None else None
        stage = f"{len(indices)} prompt(s) of {n_tokens} tokens: model runs"
        values = model.run_rows(
            rows,
            _reducer(model, target, group_years),
            config.mode,
            config.ablation,
            target.capture_names(model),
            config.batch_size,
            lambda done, total, stage=stage: update(stage, done, total),  # called within this iteration
        )
        blocks = values.reshape(len(layout), len(indices), -1)
        for (what, c, k), block in zip(layout, blocks):
            t_values = block[:, 0].tolist()
            m_values = block[:, 1].tolist() if block.shape[1] > 1 else None
            for j, i in enumerate(indices):
                if what == "clean":
                    clean_t[i] = t_values[j]
                    if m_values:
                        metric_clean[i] = m_values[j]
                elif what in ("ablated", "kept"):
                    (ablated_t if what == "ablated" else kept_t)[c][i] = t_values[j]
                    if m_values:
                        metric[what][c][i] = m_values[j]
                else:
                    single[c][k].append(t_values[j] - clean_t[i])
        # one backward pass per few prompts: its probes hold every feature of every layer at every position
        for lo in range(0, len(indices), GRADIENT_PROMPTS):
            update(f"{len(indices)} prompt(s) of {n_tokens} tokens: gradients", lo, len(indices))
            gradients = model.node_gradients(target, range(lo, min(lo + GRADIENT_PROMPTS, len(indices))))
            for c, refs in enumerate(mapped):
                for k, r in enumerate(refs):
                    if r.position is not None:
                        predicted_total[c][k] += _linear_predictions(model, gradients, r, config.ablation)
        update(f"{len(indices)} prompt(s) of {n_tokens} tokens: gradients", len(indices), len(indices))
    results = _summarise(
        config,
        meta,
        nodes,
        circuits,
        clean_t,
        ablated_t,
        kept_t,
        metric_clean,
        metric,
        single,
        predicted_total,
        dropped,
        n_prompts,
        years is not None,
        graph_model.transcoders,
        means,
    )
    return results


def _reducer(model: Any, target: TargetSpec, years: Optional[list[int]]):
    """A run's output -> [rows, 1 or 2]: the target, and the probability difference for greater-than."""
    from tccli.evaluation import greater_than

    year_ids = greater_than.two_digit_token_ids(model.loaded.tokenizer) if years is not None else None

    def reduce(output) -> torch.Tensor:
        columns = [target.values(model, output).double().cpu()]
        if years is not None:
            row_years = [years[int(p)] for p in output.prompts]
            final = output.logits[:, -1].double().cpu()
            columns.append(greater_than.probability_difference_from_logits(final, year_ids, row_years).per_prompt)
        return torch.stack(columns, dim=1)

    return reduce


def _linear_predictions(model: Any, gradients: Any, ref: NodeRef, ablation: str) -> list[float]:
    """Per prompt: the first-order effect of ablating ``ref`` in the frozen replacement model."""
    if ref.kind == "feature":
        z = gradients.activations[ref.layer][:, ref.position, ref.index]
        ablated = model.means[ref.layer][ref.index] if ablation == "mean" else torch.zeros(())
        slope = gradients.feature[ref.layer][:, ref.position, ref.index]
        return ((ablated.to(z) - z) * slope).tolist()
    return (-gradients.head[ref.layer][:, ref.index, ref.position]).tolist()


def _graph_prediction(node: CircuitNode, ablation: str, means: Optional[dict]) -> float:
    """The graph's predicted ablation effect: minus the node's attribution (linear in its activation)."""
    if node.ref.kind == "feature" and ablation == "mean":
        if not node.activation:
            return 0.0
        mean = float(means[node.ref.layer][node.ref.index])
        return (mean / node.activation - 1.0) * node.attribution
    return -node.attribution


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _summarise(
    config,
    meta,
    nodes,
    circuits,
    clean_t,
    ablated_t,
    kept_t,
    metric_clean,
    metric,
    single,
    predicted_total,
    dropped,
    n_prompts,
    has_metric,
    transcoders,
    means,
) -> dict:
    def circuit_summary(c: int) -> dict:
        measured = [_mean(v) for v in single[c]]
        total = [_mean(v) for v in predicted_total[c]]
        usable = [k for k, v in enumerate(single[c]) if v]
        out = {
            "necessity": necessity(clean_t, ablated_t[c]),
            "sufficiency": sufficiency(clean_t, kept_t[c]),
            "target_ablated": _mean(ablated_t[c]),
            "target_kept": _mean(kept_t[c]),
            "spearman_total": spearman([total[k] for k in usable], [measured[k] for k in usable]),
            "nodes_dropped": dropped[c],
        }
        if has_metric:
            out["metric_ablated"] = _mean(metric["ablated"][c])
            out["metric_kept"] = _mean(metric["kept"][c])
        return out

    measured = [_mean(v) for v in single[0]]
    total = [_mean(v) for v in predicted_total[0]]
    graph_predicted = [_graph_prediction(n, config.ablation, means) for n in nodes]
    usable = [k for k, v in enumerate(single[0]) if v]
    circuit = circuit_summary(0)
    circuit["spearman_graph"] = spearman([graph_predicted[k] for k in usable], [measured[k] for k in usable])
    circuit["disagreements"] = largest_disagreements(
        [nodes[k].ref.id for k in usable],
        [graph_predicted[k] for k in usable],
        [measured[k] for k in usable],
        config.top,
    )
    circuit["nodes"] = [
        {
            "id": nodes[k].ref.id,
            "attribution": nodes[k].attribution,
            "predicted_graph": graph_predicted[k],
            "predicted_total": total[k],
            "measured": measured[k],
        }
        for k in usable
    ]
    randoms = [circuit_summary(c) for c in range(1, len(circuits))]
    baseline = {}
    for key in (
        "necessity",
        "sufficiency",
        "spearman_total",
        "target_ablated",
        "target_kept",
        "metric_ablated",
        "metric_kept",
    ):
        values = [r[key] for r in randoms if key in r and not math.isnan(r[key])]
        if values:
            baseline[key] = {"mean": _mean(values), "min": min(values), "max": max(values)}
    from tccli import __version__

    results = {
        "tc_version": __version__,
        "graph": inputs.display_name(config.graph),
        "mode": config.mode,
        "ablation": config.ablation,
        "prompts": n_prompts,
        "prompt_source": config.task or config.prompts or "graph",
        "features": config.features,
        "transcoder_layers": sorted(transcoders),
        "target": graph_target(meta)[0],
        "target_clean": _mean(clean_t),
        "circuit_size": {kind: sum(n.ref.kind == kind for n in nodes) for kind in CIRCUIT_KINDS},
        "circuit": circuit,
        "random": {"draws": len(randoms), "seed": config.seed, "summary": baseline, "circuits": randoms},
    }
    if has_metric:
        results["metric"] = {"name": "probability_difference", "clean": _mean(metric_clean)}
    return results


def summary_lines(results: dict) -> list[str]:
    c, base = results["circuit"], results["random"]["summary"]
    size = results["circuit_size"]

    def versus(key: str, fmt: str = "{:.3f}") -> str:
        line = fmt.format(c[key]) if key in c else "n/a"
        if key in base:
            b = base[key]
            line += f"   random: {fmt.format(b['mean'])} (min {fmt.format(b['min'])}, max {fmt.format(b['max'])})"
        return line

    lines = [
        f"tc validate: {results['graph']} over {results['prompts']} prompt(s) ({results['prompt_source']}), "
        f"{results['mode']} mode, {results['ablation']} ablation; circuit of {size['feature']} features and "
        f"{size['head']} head terms against {results['random']['draws']} random circuit(s) of equal size",
        f"  target clean           {results['target_clean']:.4g}",
        f"  necessity              {versus('necessity')}",
        f"  sufficiency            {versus('sufficiency')}",
        f"  target, ablated        {versus('target_ablated', '{:.4g}')}",
        f"  target, only kept      {versus('target_kept', '{:.4g}')}",
    ]
    if "metric" in results:
        lines += [
            f"  probability difference clean {results['metric']['clean']:.3f}",
            f"    circuit ablated      {versus('metric_ablated')}",
            f"    only circuit kept    {versus('metric_kept')}",
        ]
    lines += [
        f"  per-node Spearman, graph attribution vs measured  {c['spearman_graph']:.3f}",
        f"  per-node Spearman, unpruned total vs measured     {versus('spearman_total')}",
    ]
    if c["nodes_dropped"]:
        lines.append(f"  {c['nodes_dropped']} node-prompt pairs fell before a prompt's start and were left out")
    lines.append("  largest disagreements (predicted by the graph -> measured):")
    for row in c["disagreements"]:
        lines.append(f"    {row['id']:<22} {row['predicted']:+.4g} -> {row['measured']:+.4g}")
    return lines


def write_validated_graph(graph: Any, results: dict, out: str) -> None:
    """The graph with ``results`` under metadata["validation"], written atomically (no temp file left on
    a full disk or a Ctrl-C; an existing ``out`` untouched by a failure), or to stdout for `-`."""
    from tccli.circuit.files import to_json
    from tccli.runtime.outputs import write_output

    graph.graph.setdefault("metadata", {})["validation"] = results
    write_output(to_json(graph).encode("utf-8"), out)


def results_json(results: dict) -> str:
    return json.dumps(results, indent=2, default=float)
