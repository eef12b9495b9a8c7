"""Circuit graphs to and from files: DOT (Graphviz), JSON (networkx node-link + metadata),
Neuronpedia's attribution-graph JSON (as circuit-tracer writes it), GraphML, and SVG/PNG via `dot`.

Node attributes. Every graph tc writes (``tc circuit``'s path search, ``tc graph``'s attribution
graphs) names its nodes' attributes so; the picture, the exports and ``tc info`` read only these:

    kind                 embed, pos (learned position embedding), feature, head, error or target
    layer                feature, error: the MLP layer; head: the attention layer; target: where its
                         value is read (n_layers: after the last block; a feature target: its layer);
                         embed, pos: -1
    position             the token the node sits at; a head node: the source token it reads
    token                that token's text, bytes that are not whole characters written <0xE2>
    feature, head        the feature or head index; None for the other kinds
    activation           a feature's activation z; a target's value; None otherwise
    direct_contribution  the node's direct contribution to the target: its term in the target's value
                         through the residual stream alone (None for the target)
    path_contribution    the summed attribution of the paths found from the node to the target (the
                         sum of its out-edge weights); graphs from before tc 0.1.0's rename called it
                         ``contribution`` and are read as this
    target_kind          target nodes: logit, logit_diff, feature or direction; with target_token /
                         target_token_b (ids), target_token_string / target_token_b_string,
                         target_feature, and ``layer``, they say what the target is

Edge attribute: ``weight``. Graph attribute ``metadata``: ``tokens`` (the prompt's tokens, BOS first,
as ``token`` writes them), ``n_layers``, ``prompt``, ``target``, ``target_value``, ``explained``,
``error_into_target``, ``search``, ``tc_version``, ...

Pictures (DOT, SVG, PNG) are drawn by ``tccli.circuit.picture``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import networkx as nx

from tccli.circuit.picture import draw, to_dot
from tccli.config.circuit import EXPORT_FORMATS, PictureOptions
from tccli.errors import fail
from tccli.nodes import node_label

GRAPH_FORMAT = "tc-circuit-graph"


# ----------------------------------------------------------------------------- JSON


def to_json(graph: nx.DiGraph) -> str:
    data = {"format": GRAPH_FORMAT, **nx.node_link_data(graph, edges="links")}
    return json.dumps(data, indent=1, default=float) + "\n"


def from_json(text: str, where: str = "graph") -> nx.DiGraph:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(f"{where} is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != GRAPH_FORMAT:
        raise fail(f"{where} is not a tc circuit graph (JSON written by tc circuit --format json)")
    data = {k: v for k, v in data.items() if k != "format"}
    for node in data.get("nodes", []):  # written before the two contribution figures had their names
        if isinstance(node, dict) and "contribution" in node and "path_contribution" not in node:
            node["path_contribution"] = node.pop("contribution")
    try:
        graph = nx.node_link_graph(data, directed=True, edges="links")
    except (KeyError, TypeError, ValueError, AttributeError, nx.NetworkXError) as exc:
        raise fail(f"{where} is a damaged tc circuit graph ({type(exc).__name__}: {exc})") from None
    for node, attrs in graph.nodes(data=True):
        if not isinstance(attrs.get("kind"), str):
            raise fail(f"{where} is a damaged tc circuit graph (node {node!r} has no kind)")
    if not all(isinstance(w, (int, float)) for _, _, w in graph.edges(data="weight", default=0.0)):
        raise fail(f"{where} is a damaged tc circuit graph (an edge weight is not a number)")
    return graph


def read_graph(path: str | Path) -> nx.DiGraph:
    path = Path(path)
    if path.is_dir():
        raise fail(f"{path} is a folder, not a graph file (JSON written by tc circuit --format json)")
    if not path.is_file():
        raise fail(f"graph file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise fail(
            f"{path} is not a tc circuit graph (not even text: JSON written by tc circuit --format json is needed)"
        ) from None
    return from_json(text, str(path))


def check_graph_matches_model(graph: nx.DiGraph, info: Any, where: str) -> None:
    """Refuse a graph traced on another model than ``info`` (a models.ModelInfo), or one naming layers or
    heads this model does not have."""
    from tccli.model.loading import known_different_models

    meta = graph.graph.get("metadata") or {}
    recorded = (meta.get("model"), meta.get("architecture"), meta.get("n_layers"))
    if (
        known_different_models(meta.get("model"), info.name)
        or (recorded[1] not in (None, info.architecture))
        or recorded[2] not in (None, info.n_layers)
    ):
        raise fail(
            f"{where} was traced on the model {recorded[0]} ({recorded[1]}, {recorded[2]} layers), not on "
            f"{info.name} ({info.architecture}, {info.n_layers} layers)"
        )
    for node, attrs in graph.nodes(data=True):
        layer = attrs.get("layer")
        if attrs.get("kind") in ("feature", "head", "error") and not (
            isinstance(layer, int) and 0 <= layer < info.n_layers
        ):
            raise fail(f"{where}: node {node} is in layer {layer!r}; the model has layers 0-{info.n_layers - 1}")
        head = attrs.get("head")
        if attrs.get("kind") == "head" and not (isinstance(head, int) and 0 <= head < info.n_heads):
            raise fail(f"{where}: node {node} is head {head!r}; the model has heads 0-{info.n_heads - 1} per layer")


# ----------------------------------------------------------------------------- Neuronpedia


# Nodes that are linear paths in circuit-tracer's graphs (folded away in its JSON).
LINEAR_PATH_KINDS = ("head", "skip")


def _neuronpedia_id(node: str, attrs: dict, n_layers: int) -> str:
    kind, pos = attrs.get("kind"), attrs.get("position")
    if kind == "feature":
        return f"{attrs['layer']}_{attrs['feature']}_{pos}"
    if kind == "error":
        return f"{attrs['layer']}_-1_{pos}"
    if kind in ("embed", "pos"):
        return f"E_{attrs.get('token_id', -1)}_{pos}" + ("" if kind == "embed" else "_pos")
    if kind == "target":
        return f"{n_layers + 1}_{attrs.get('target_token', -1)}_{pos}"
    return node


def to_neuronpedia(graph: nx.DiGraph) -> str:
    """circuit-tracer's attribution-graph JSON (metadata, qParams, nodes, links).

    circuit-tracer freezes attention, so its graphs have no head nodes, and treats a skip connection as
    part of the linear paths: each attention head node and each skip node is folded away, its upstream
    edges relinked to its downstream nodes with the upstream weight (that weight already is the
    attribution through the head or skip). A feature target becomes a feature node; a
    logit, logit-difference or direction target a logit node. influence = |contribution| / |target|.
    """
    meta = graph.graph.get("metadata", {})
    n_layers = int(meta.get("n_layers", 0))
    target_value = abs(graph.nodes["target"].get("activation") or 0.0) or 1.0
    ids = {n: _neuronpedia_id(n, a, n_layers) for n, a in graph.nodes(data=True)}
    nodes = []
    for node, attrs in graph.nodes(data=True):
        kind = attrs.get("kind")
        if kind in LINEAR_PATH_KINDS:
            continue
        entry = {
            "node_id": ids[node],
            "jsNodeId": ids[node],
            "layer": str(attrs.get("layer")),
            "ctx_idx": attrs.get("position"),
            "feature": attrs.get("feature") if kind == "feature" else -1,
            "feature_type": {
                "feature": "cross layer transcoder",
                "error": "mlp reconstruction error",
                "embed": "embedding",
                "pos": "embedding",
                "target": "logit",
            }[kind],
            "activation": attrs.get("activation"),
            "token_prob": 0.0,
            "is_target_logit": kind == "target",
            "run_idx": 0,
            "reverse_ctx_idx": 0,
            "clerp": node_label(attrs),
            "influence": 1.0 if kind == "target" else abs(attrs.get("path_contribution") or 0.0) / target_value,
        }
        if kind in ("embed", "pos"):
            entry["layer"] = "E"
        if kind == "target":
            description = meta.get("target", {})
            if description.get("kind") == "feature":
                entry.update(
                    feature_type="cross layer transcoder",
                    feature=description.get("feature"),
                    layer=str(description.get("layer")),
                    is_target_logit=False,
                    node_id=f"{description.get('layer')}_{description.get('feature')}_{attrs.get('position')}",
                )
                entry["jsNodeId"] = entry["node_id"]
                ids[node] = entry["node_id"]
            else:
                entry["layer"] = str(n_layers + 1)
        nodes.append(entry)
    links: dict[tuple[str, str], float] = {}

    def downstream_of(node: str):
        for _, v in graph.out_edges(node):
            if graph.nodes[v].get("kind") in LINEAR_PATH_KINDS:
                yield from downstream_of(v)
            else:
                yield v

    for u, v, w in graph.edges(data="weight"):
        if graph.nodes[u].get("kind") in LINEAR_PATH_KINDS:
            continue
        targets = [v] if graph.nodes[v].get("kind") not in LINEAR_PATH_KINDS else list(downstream_of(v))
        for t in targets:
            key = (ids[u], ids[t])
            links[key] = links.get(key, 0.0) + w
    document = {
        "metadata": {
            "slug": meta.get("slug", "tc-circuit"),
            "scan": meta.get("model", ""),
            "transcoder_list": meta.get("transcoder_list", []),
            "prompt_tokens": meta.get("tokens", []),
            "prompt": meta.get("prompt", ""),
            "node_threshold": None,
            "schema_version": 1,
            "tc": meta,
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": [{"source": s, "target": t, "weight": w} for (s, t), w in links.items()],
    }
    return json.dumps(document, indent=1, default=float) + "\n"


def attribution_graph_to_neuronpedia(graph: nx.DiGraph) -> str:
    """circuit-tracer's graph file for Neuronpedia's viewer, from a pruned `tc graph` attribution graph
    (tccli.graph.files.to_networkx).

    As circuit-tracer writes it: `metadata` (slug, scan, transcoder_list, prompt_tokens, prompt,
    node_threshold; plus schema_version 1 and tc's own metadata under `tc`), `qParams`, `nodes`
    (feature `{layer}_{feature}_{pos}`, embedding `E_{token}_{pos}`, logit `{n_layers+1}_{token}_{pos}`,
    with `influence` = the node's cumulative influence share, `activation`, `token_prob`,
    `is_target_logit`), `links` (`source`, `target`, `weight`). Error nodes are `{layer}_-1_{pos}`, not
    circuit-tracer's `0_{layer}_{pos}`, which collides with layer-0 feature ids. Head nodes (--heads)
    do not exist in this schema: their parts stay on the direct edges."""
    meta = graph.graph.get("metadata", {})
    n_layers = int(meta.get("n_layers", 0))
    top_probability = max((t.get("weight", 0.0) for t in meta.get("targets", [])), default=0.0)
    ids: dict[str, str] = {}
    nodes = []
    for node, attrs in graph.nodes(data=True):
        kind, position = attrs.get("kind"), attrs.get("position")
        entry = {
            "feature": -1,
            "layer": str(attrs.get("layer")),
            "ctx_idx": position,
            "token_prob": 0.0,
            "is_target_logit": False,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
            "clerp": "",
            "influence": attrs.get("cumulative_influence"),
            "activation": attrs.get("activation"),
        }
        if kind == "head":
            continue
        if kind == "feature":
            entry.update(
                node_id=f"{attrs['layer']}_{attrs['feature']}_{position}",
                feature=attrs["feature"],
                feature_type="cross layer transcoder",
                jsNodeId=f"{attrs['layer']}_{attrs['feature']}-0",
            )
        elif kind == "error":
            entry.update(
                node_id=f"{attrs['layer']}_-1_{position}",
                feature_type="mlp reconstruction error",
                jsNodeId=f"{attrs['layer']}_{position}-0",
                activation=None,
            )
        elif kind == "embed":
            token = attrs.get("token_id", -1)
            entry.update(
                node_id=f"E_{token}_{position}",
                feature=position,
                layer="E",
                feature_type="embedding",
                jsNodeId=f"E_{token}-{position}",
                activation=None,
            )
        else:
            entry.update(_neuronpedia_target(attrs, n_layers, position, top_probability))
        ids[node] = entry["node_id"]
        nodes.append(entry)
    links = [
        {"source": ids[u], "target": ids[v], "weight": w}
        for u, v, w in graph.edges(data="weight")
        if u in ids and v in ids
    ]
    document = {
        "metadata": {
            "slug": meta.get("slug", "tc-graph"),
            "scan": meta.get("model", ""),
            "transcoder_list": meta.get("transcoder_list", []),
            "prompt_tokens": meta.get("tokens", []),
            "prompt": meta.get("prompt", ""),
            "node_threshold": meta.get("config", {}).get("node_threshold"),
            "schema_version": 1,
            "tc": meta,
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }
    return json.dumps(document, indent=1, default=float) + "\n"


def _neuronpedia_target(attrs: dict, n_layers: int, position: int, top_probability: float) -> dict:
    kind = attrs.get("target_kind")
    if kind == "feature":
        layer, feature = attrs["layer"], attrs["target_feature"]
        return {
            "node_id": f"{layer}_{feature}_{position}",
            "feature": feature,
            "layer": str(layer),
            "feature_type": "cross layer transcoder",
            "jsNodeId": f"{layer}_{feature}-0",
            "clerp": f"target: L{layer} F{feature} pre-activation",
        }
    token = attrs.get("target_token", -1) if kind in ("logit", "logit_diff") else -1
    text = attrs.get("target_token_string", "")
    if kind == "logit_diff":
        text = f'{text}" - "{attrs.get("target_token_b_string", "")}'
    elif kind == "direction":
        text = f"direction at layer {attrs.get('layer')}"
    probability = attrs.get("weight", 0.0) if kind == "logit" and attrs.get("target_demeaned") else 0.0
    return {
        "node_id": f"{n_layers + 1}_{token}_{position}",
        "feature": token,
        "layer": str(n_layers + 1),
        "feature_type": "logit",
        "jsNodeId": f"L_{token}-{position}",
        "token_prob": probability,
        "is_target_logit": probability == top_probability or kind != "logit",
        "clerp": f'Output "{text}" (p={probability:.3f})',
        "activation": attrs.get("activation"),
    }


# ----------------------------------------------------------------------------- export


def render(
    graph: nx.DiGraph, fmt: str, picture: Optional[PictureOptions] = None, log: Optional[Callable[[str], None]] = None
) -> bytes:
    """The graph in ``fmt`` (dot, json, neuronpedia, graphml, svg, png) as bytes; ``picture`` says
    how dot, svg and png draw it; ``log`` hears how a picture was drawn when Graphviz is missing."""
    if fmt == "dot":
        return to_dot(graph, picture).encode()
    if fmt == "json":
        return to_json(graph).encode()
    if fmt == "neuronpedia":
        if is_attribution_graph(graph):
            return attribution_graph_to_neuronpedia(graph).encode()
        return to_neuronpedia(graph).encode()
    if fmt == "graphml":
        return _graphml(graph)
    if fmt in ("svg", "png"):
        return draw(graph, fmt, picture, log) if log else draw(graph, fmt, picture)
    raise fail(f"unknown format {fmt!r}: use {', '.join(EXPORT_FORMATS)}")


def _graphml(graph: nx.DiGraph) -> bytes:
    """GraphML keeps scalar attributes only: None is dropped, dicts and lists become JSON strings."""
    clean = nx.DiGraph()

    def scalars(attrs: dict) -> dict[str, Any]:
        return {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in attrs.items() if v is not None}

    clean.graph.update(scalars(graph.graph.get("metadata", {})))
    for node, attrs in graph.nodes(data=True):
        clean.add_node(node, **scalars(attrs))
    for u, v, attrs in graph.edges(data=True):
        clean.add_edge(u, v, **scalars(attrs))
    return "\n".join(nx.generate_graphml(clean)).encode() + b"\n"


# ----------------------------------------------------------------------------- tc info


def graph_json(path: Path) -> Optional[dict]:
    """The parsed file when ``path`` is a tc graph JSON file (tc circuit's or tc graph's), else None."""
    if not path.is_file() or path.suffix.lower() != ".json":
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("format") == GRAPH_FORMAT else None


def is_circuit_graph_file(path: Path) -> bool:
    data = graph_json(path)
    return data is not None and not is_attribution_graph(data.get("graph", {}))


def is_attribution_graph(graph: nx.DiGraph | dict) -> bool:
    """Written by `tc graph` (tccli.graph.files), not `tc circuit`."""
    attrs = graph.graph if isinstance(graph, nx.DiGraph) else graph
    return attrs.get("metadata", {}).get("kind") == "attribution-graph"


def circuit_graph_summary(path: Path) -> dict:
    graph = read_graph(path)
    meta = graph.graph.get("metadata", {})
    kinds: dict[str, int] = {}
    for _, kind in graph.nodes(data="kind"):
        kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "kind": "circuit-graph",
        "path": str(path),
        "nodes": graph.number_of_nodes(),
        "edges": graph.number_of_edges(),
        "node_kinds": kinds,
        "model": meta.get("model"),
        "transcoders": meta.get("transcoders"),
        "prompt": meta.get("prompt"),
        "target": meta.get("target"),
        "position": meta.get("position"),
        "target_value": meta.get("target_value"),
        "explained": meta.get("explained"),
        "error_into_target": meta.get("error_into_target"),
        "search": meta.get("search"),
        "tc_version": meta.get("tc_version"),
    }


def circuit_graph_summary_lines(s: dict) -> list[str]:
    return [
        f"{s['path']}: tc circuit graph, {s['nodes']} nodes, {s['edges']} edges "
        f"({', '.join(f'{n} {k}' for k, n in sorted(s['node_kinds'].items()))})",
        f"  model        {s['model']}; transcoders {s['transcoders']}",
        f"  prompt       {json.dumps(s['prompt'], ensure_ascii=False)}",
        f"  target       {json.dumps(s['target'])} at token {s['position']} = {s['target_value']}",
        f"  explained    {s['explained']} by the target's direct inputs in the graph; "
        f"transcoder error into it {s['error_into_target']}",
        f"  search       {json.dumps(s['search'])}",
        f"  written by   tc {s['tc_version']}",
    ]
