"""Attribution graphs to files: tc's JSON (networkx node-link, read back by `tc export`, `tc info` and the
intervention commands), Neuronpedia's attribution-graph JSON (the schema circuit-tracer writes:
tccli.circuit.neuronpedia), DOT (through tccli.circuit.files' layout, as `tc circuit` draws) and a torch
file with the whole unpruned sparse adjacency for scripts.

The JSON and DOT graphs hold the pruned graph: the nodes and edges pruning kept. Node ids follow
`tc circuit`: `mlp8.f1234@5`, `err8@5`, `embed@5`, `attn3.h2@4` (head nodes, with --heads); a single
chosen target is `target`, the logit targets of --target logits are `logit{token id}@{position}`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import networkx as nx
import torch

from tccli.graph.attribution_graph import AttributionGraph
from tccli.graph.heads import HeadSplit
from tccli.graph.nodes import NodeTable
from tccli.nodes import NodeRef, head_name, target_id

if TYPE_CHECKING:
    from tccli.config.circuit import PictureOptions

GRAPH_KIND = "attribution-graph"


def node_ids(table: NodeTable, targets: list[dict]) -> list[str]:
    """The id of every node of ``table`` (in table order)."""
    ids = [
        NodeRef("feature", layer, feature, position).id
        for layer, feature, position in zip(
            table.feature_layer.tolist(), table.feature_index.tolist(), table.feature_position.tolist()
        )
    ]
    ids += [
        NodeRef("error", layer, -1, position).id
        for layer in range(table.n_layers)
        for position in range(table.n_tokens)
    ]
    ids += [NodeRef("embed", -1, -1, position).id for position in range(table.n_tokens)]
    ids += [target_id(target, len(targets)) for target in targets]
    return ids


def to_networkx(
    graph: AttributionGraph, metadata: dict, strings: list[str], token_ids: list[int], heads: Optional[HeadSplit] = None
) -> nx.DiGraph:
    """The pruned graph with tc circuit's node attribute conventions and the run's metadata.

    With ``heads`` (heads.head_split of the kept edges) every kept edge also carries its
    ``residual`` part and its parts per head (``heads``: {"L3.H2": part} for the heads holding at least 1%
    of the edge's absolute mass, ``other_heads``: the rest), and each (layer, head, token) part of at least
    ``heads.share`` of that mass is routed through a head node `attn{L}.h{H}@{token}`: the direct edge's
    ``weight`` is then what is not routed (``total`` keeps the whole edge)."""
    table = graph.table
    targets = metadata["targets"]
    ids = node_ids(table, targets)
    out = nx.DiGraph()
    influence, cumulative = graph.influence.tolist(), graph.cumulative.tolist()
    for node in torch.nonzero(graph.node_mask).reshape(-1).tolist():
        out.add_node(
            ids[node],
            **node_attributes(table, node, targets, strings, token_ids, metadata),
            influence=influence[node],
            cumulative_influence=cumulative[node],
        )
    sources, target_nodes, weights = (t.tolist() for t in graph.kept_edges())
    for source, target, weight in zip(sources, target_nodes, weights):
        out.add_edge(ids[source], ids[target], weight=weight)
    if heads is not None:
        add_head_nodes(out, ids, heads, strings)
    kept_features = int(graph.node_mask[: table.n_features].sum())
    out.graph["metadata"] = {
        **metadata,
        "replacement_score": graph.replacement,
        "completeness_score": graph.completeness,
        "active_features": graph.n_active_features,
        "graph_features": table.n_features,
        "kept_features": kept_features,
        "kept_nodes": int(graph.node_mask.sum()),
        "kept_edges": len(weights),
        "head_share": None if heads is None else heads.share,
        **{key: value for key, value in graph.stats.items()},
    }
    return out


def node_attributes(
    table: NodeTable, node: int, targets: list[dict], strings: list[str], token_ids: list[int], metadata: dict
) -> dict:
    kind = table.kind(node)
    attrs: dict = {
        "kind": kind,
        "layer": -1,
        "feature": None,
        "head": None,
        "position": None,
        "token": "",
        "activation": None,
    }
    if kind == "feature":
        attrs.update(
            layer=int(table.feature_layer[node]),
            feature=int(table.feature_index[node]),
            position=int(table.feature_position[node]),
            activation=float(table.feature_activation[node]),
        )
    elif kind == "error":
        layer, position = divmod(node - table.error_start, table.n_tokens)
        attrs.update(layer=layer, position=position)
    elif kind == "embed":
        position = node - table.embed_start
        attrs.update(position=position, token_id=token_ids[position])
    else:
        target = targets[node - table.target_start]
        attrs.update(
            layer=target.get("layer", table.n_layers),
            position=target["position"],
            activation=target["value"],
            constant=target["constant"],
            weight=target["weight"],
            **{
                f"target_{key}": value
                for key, value in target.items()
                if key not in ("layer", "position", "value", "constant", "weight")
            },
        )
    if attrs["position"] is not None:
        attrs["token"] = strings[attrs["position"]]
    return attrs


def add_head_nodes(out: nx.DiGraph, ids: list[str], heads: HeadSplit, strings: list[str]) -> None:
    """Per-head parts on the kept edges, and head nodes for the large (layer, head, token) parts."""
    by_head = heads.by_head.tolist()
    for e, (source, target) in enumerate(zip(heads.sources.tolist(), heads.targets.tolist())):
        u, v = ids[source], ids[target]
        if not out.has_edge(u, v):
            continue
        edge = out.edges[u, v]
        residual = float(heads.residual[e])
        mass = abs(residual) + sum(abs(p) for layer in by_head[e] for p in layer)
        shown = {
            head_name(layer, head): part
            for layer, per_head in enumerate(by_head[e])
            for head, part in enumerate(per_head)
            if part != 0.0 and abs(part) >= 0.01 * mass
        }
        edge.update(
            total=edge["weight"],
            residual=residual,
            heads=shown,
            other_heads=sum(p for layer in by_head[e] for p in layer) - sum(shown.values()),
        )
        for (layer, head, position), part in heads.parts[e].items():
            key = NodeRef("head", layer, head, position)
            if key.id not in out:
                out.add_node(
                    key.id,
                    kind="head",
                    layer=layer,
                    feature=None,
                    head=head,
                    position=position,
                    token=strings[position],
                    activation=None,
                    influence=None,
                )
            edge["weight"] -= part
            for a, b in ((u, key.id), (key.id, v)):
                if out.has_edge(a, b):
                    out.edges[a, b]["weight"] += part
                else:
                    out.add_edge(a, b, weight=part)


# ----------------------------------------------------------------------------- tc info / tc export


def is_attribution_graph_file(path: Path) -> bool:
    from tccli.circuit.files import graph_json, is_attribution_graph

    data = graph_json(path)
    return data is not None and is_attribution_graph(data.get("graph", {}))


def attribution_graph_file_summary(path: Path) -> dict:
    from tccli.circuit.files import read_graph
    from tccli.runtime.inputs import display_name

    return summary(read_graph(path), display_name(path))


def summary(graph: nx.DiGraph, path: str) -> dict:
    meta = graph.graph.get("metadata", {})
    kinds: dict[str, int] = {}
    for _, kind in graph.nodes(data="kind"):
        kinds[kind] = kinds.get(kind, 0) + 1
    keys = (
        "model",
        "transcoders",
        "prompt",
        "targets",
        "replacement_score",
        "completeness_score",
        "active_features",
        "graph_features",
        "kept_features",
        "dropped_share_total",
        "tc_version",
    )
    return {
        "kind": GRAPH_KIND,
        "path": path,
        "nodes": graph.number_of_nodes(),
        "edges": graph.number_of_edges(),
        "node_kinds": kinds,
        **{key: meta.get(key) for key in keys},
        "node_threshold": meta.get("config", {}).get("node_threshold"),
        "edge_threshold": meta.get("config", {}).get("edge_threshold"),
    }


def summary_lines(s: dict) -> list[str]:
    targets = ", ".join(
        f"{t.get('token_string', t.get('kind'))!r} (p={t['weight']:.3g})"
        if t.get("kind") == "logit"
        else f"{t.get('kind')} = {t.get('value'):.4g}"
        for t in s["targets"] or []
    )
    return [
        f"{s['path']}: tc attribution graph (pruned), {s['nodes']} nodes, {s['edges']} edges "
        f"({', '.join(f'{n} {k}' for k, n in sorted(s['node_kinds'].items()))})",
        f"  model        {s['model']}; transcoders {s['transcoders']}",
        f"  prompt       {json.dumps(s['prompt'], ensure_ascii=False)}",
        f"  targets      {targets}",
        f"  scores       replacement {s['replacement_score']:.4f}, completeness {s['completeness_score']:.4f}",
        f"  features     {s['active_features']} active, {s['graph_features']} with rows, {s['kept_features']} kept "
        f"(node threshold {s['node_threshold']}, edge threshold {s['edge_threshold']})",
        f"  written by   tc {s['tc_version']}",
    ]


# ----------------------------------------------------------------------------- torch file


def to_pt(graph: AttributionGraph, metadata: dict) -> bytes:
    """The whole computed graph for scripts (``torch.load(path, weights_only=True)``): node table,
    unpruned sparse adjacency (CSR rows in computation order, ``row_nodes`` says whose), per-row
    bias/value/dropped sums, influence, pruning masks and the metadata as JSON."""
    adjacency, table = graph.adjacency, graph.table
    crow = [torch.zeros(1, dtype=torch.long)]
    total = 0
    for chunk in adjacency.chunks:
        crow.append(chunk.crow[1:].cpu() + total)
        total += chunk.nnz
    data = {
        "format": "tc-attribution-graph",
        "metadata_json": json.dumps(metadata, default=float),
        "n_layers": table.n_layers,
        "n_tokens": table.n_tokens,
        "feature_layer": table.feature_layer.cpu(),
        "feature_position": table.feature_position.cpu(),
        "feature_index": table.feature_index.cpu(),
        "feature_activation": table.feature_activation.cpu(),
        "target_weight": table.target_weight.cpu(),
        "row_nodes": adjacency.nodes.cpu(),
        "crow": torch.cat(crow),
        "col": adjacency.cat("col").cpu(),
        "value": adjacency.cat("value").cpu(),
        "bias": adjacency.cat("bias").cpu(),
        "row_value": adjacency.cat("target_value").cpu(),
        "dropped": adjacency.cat("dropped").cpu(),
        "dropped_abs": adjacency.cat("dropped_abs").cpu(),
        "total_abs": adjacency.cat("total_abs").cpu(),
        "influence": graph.influence.cpu(),
        "cumulative_influence": graph.cumulative.cpu(),
        "node_mask": graph.node_mask.cpu(),
        "edge_mask": torch.cat(graph.edge_mask).cpu(),
        "replacement_score": graph.replacement,
        "completeness_score": graph.completeness,
    }
    buffer = io.BytesIO()
    torch.save(data, buffer)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- all formats


def render(
    graph: AttributionGraph,
    metadata: dict,
    strings: list[str],
    token_ids: list[int],
    fmt: str,
    heads: Optional[HeadSplit] = None,
    picture: Optional[PictureOptions] = None,
) -> bytes:
    """The graph in ``fmt`` (json, neuronpedia, dot, pt) as bytes; ``picture`` says how dot draws it."""
    from tccli.circuit import files as circuit_files

    if fmt == "pt":
        return to_pt(graph, metadata)
    pruned = to_networkx(graph, metadata, strings, token_ids, heads)
    if fmt == "json":
        return circuit_files.to_json(pruned).encode()
    if fmt == "neuronpedia":
        from tccli.circuit import neuronpedia

        return neuronpedia.attribution_graph_to_neuronpedia(pruned).encode()
    if fmt == "dot":
        from tccli.circuit.picture import to_dot

        return to_dot(pruned, picture).encode()
    raise ValueError(f"unknown format {fmt!r}")
