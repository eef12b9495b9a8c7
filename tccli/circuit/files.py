"""Circuit graphs to and from files: DOT (Graphviz), JSON (networkx node-link + metadata),
Neuronpedia's attribution-graph JSON (as circuit-tracer writes it: tccli.circuit.neuronpedia), GraphML.

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
from tccli.runtime import inputs

GRAPH_FORMAT = "tc-circuit-graph"
GRAPH_WHAT = "a tc graph (JSON written by tc circuit or tc graph --format json)"


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
        if inputs.sniff(text.encode("utf-8")) == inputs.NEURONPEDIA:
            raise fail(f"{where} is {inputs.kind_name(inputs.NEURONPEDIA)}; pass {GRAPH_WHAT}")
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
    """The graph in a tc graph JSON file (``tc circuit`` or ``tc graph --format json``), or on stdin for `-`."""
    if inputs.is_stdin(path):
        return from_json(inputs.read_stdin(GRAPH_WHAT, (GRAPH_FORMAT,)).decode("utf-8"), "stdin")
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
        from tccli.circuit import neuronpedia

        return neuronpedia.render(graph).encode()
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
    """The parsed file when ``path`` is a tc graph JSON file (tc circuit's or tc graph's; `-`: on stdin), else None."""
    stdin = inputs.is_stdin(path)
    if not stdin and (not path.is_file() or path.suffix.lower() != ".json"):
        return None
    try:
        data = json.loads(inputs.stdin_bytes(GRAPH_WHAT) if stdin else path.read_bytes())
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
        "path": inputs.display_name(path),
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
