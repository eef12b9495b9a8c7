"""Circuit graphs to and from files: DOT (Graphviz), JSON (networkx node-link + metadata),
Neuronpedia's attribution-graph JSON (as circuit-tracer writes it), GraphML, and SVG/PNG via `dot`."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import networkx as nx

from tccli.config import option
from tccli.errors import fail

GRAPH_FORMAT = "tc-circuit-graph"
EXPORT_FORMATS = ("dot", "svg", "png", "graphml", "json", "neuronpedia")


# ----------------------------------------------------------------------------- labels and ranks


def _quote(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def node_label(attrs: dict) -> str:
    """`L8 F1234 "Paris" @5`, `L3 H2 "cat" @4`, `embed "cat" @4`, `err L8 @5`, `target ...`."""
    token = json.dumps(attrs.get("token", ""), ensure_ascii=False)
    where = f"{token} @{attrs.get('position')}"
    kind = attrs.get("kind")
    if kind == "feature":
        return f"L{attrs['layer']} F{attrs['feature']} {where}"
    if kind == "head":
        return f"L{attrs['layer']} H{attrs['head']} {where}"
    if kind == "error":
        return f"err L{attrs['layer']} @{attrs.get('position')}"
    if kind == "target":
        return f"target {attrs.get('target_kind', '')} = {attrs.get('activation', 0.0):.4g} {where}"
    return f"{kind} {where}"


def rank_of(attrs: dict, parallel: bool = False) -> float:
    """Vertical order: embeddings, then per layer attention before MLP (side by side when parallel)."""
    kind, layer = attrs.get("kind"), attrs.get("layer", -1)
    if kind in ("embed", "pos"):
        return -1.0
    if kind == "head":
        return float(layer)
    if kind in ("feature", "error"):
        return float(layer) + (0.0 if parallel else 0.5)
    return 10_000.0  # target last


def to_dot(graph: nx.DiGraph) -> str:
    """Valid Graphviz: one rank per component level, edge width by |weight|, colour by sign."""
    parallel = bool(graph.graph.get("metadata", {}).get("parallel_attn_mlp", False))
    weights = [abs(w) for _, _, w in graph.edges(data="weight")] or [1.0]
    largest = max(weights) or 1.0
    colours = {"feature": "lightblue", "head": "khaki", "embed": "palegreen", "pos": "palegreen",
               "error": "lightgrey", "target": "salmon"}
    lines = ["digraph circuit {", "  rankdir=BT;", '  node [shape=box, style="rounded,filled", fontsize=10];']
    ranks: dict[float, list[str]] = {}
    for node, attrs in graph.nodes(data=True):
        ranks.setdefault(rank_of(attrs, parallel), []).append(node)
        contribution = attrs.get("contribution") or 0.0
        lines.append(f"  {_quote(node)} [label={_quote(node_label(attrs))}, "
                     f"fillcolor={colours.get(attrs.get('kind'), 'white')}, "
                     f"tooltip={_quote(f'contribution {contribution:.4g}')}];")
    for rank in sorted(ranks):
        lines.append("  { rank=same; " + " ".join(_quote(n) for n in ranks[rank]) + " }")
    for u, v, w in graph.edges(data="weight"):
        width = 0.5 + 4.5 * abs(w) / largest
        colour = "#1f5fbf" if w >= 0 else "#c0392b"
        lines.append(f"  {_quote(u)} -> {_quote(v)} [penwidth={width:.2f}, color={_quote(colour)}, "
                     f"label={_quote(f'{w:.3g}')}, fontsize=8];")
    lines.append("}")
    return "\n".join(lines) + "\n"


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
    return nx.node_link_graph(data, directed=True, edges="links")


def read_graph(path: str | Path) -> nx.DiGraph:
    path = Path(path)
    if not path.is_file():
        raise fail(f"graph file {path} does not exist")
    return from_json(path.read_text(), str(path))


# ----------------------------------------------------------------------------- Neuronpedia


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

    circuit-tracer freezes attention, so its graphs have no head nodes: each attention head node is
    folded away, its upstream edges relinked to its downstream nodes with the upstream weight (that
    weight already is the attribution through the head). A feature target becomes a feature node; a
    logit, logit-difference or direction target a logit node. influence = |contribution| / |target|.
    """
    meta = graph.graph.get("metadata", {})
    n_layers = int(meta.get("n_layers", 0))
    target_value = abs(graph.nodes["target"].get("activation") or 0.0) or 1.0
    ids = {n: _neuronpedia_id(n, a, n_layers) for n, a in graph.nodes(data=True)}
    nodes = []
    for node, attrs in graph.nodes(data=True):
        kind = attrs.get("kind")
        if kind == "head":
            continue
        entry = {"node_id": ids[node], "jsNodeId": ids[node], "layer": str(attrs.get("layer")),
                 "ctx_idx": attrs.get("position"), "feature": attrs.get("feature") if kind == "feature" else -1,
                 "feature_type": {"feature": "cross layer transcoder", "error": "mlp reconstruction error",
                                  "embed": "embedding", "pos": "embedding", "target": "logit"}[kind],
                 "activation": attrs.get("activation"), "token_prob": 0.0, "is_target_logit": kind == "target",
                 "run_idx": 0, "reverse_ctx_idx": 0, "clerp": node_label(attrs),
                 "influence": abs(attrs.get("contribution") or 0.0) / target_value}
        if kind in ("embed", "pos"):
            entry["layer"] = "E"
        if kind == "target":
            description = meta.get("target", {})
            if description.get("kind") == "feature":
                entry.update(feature_type="cross layer transcoder", feature=description.get("feature"),
                             layer=str(description.get("layer")), is_target_logit=False,
                             node_id=f"{description.get('layer')}_{description.get('feature')}_{attrs.get('position')}")
                entry["jsNodeId"] = entry["node_id"]
                ids[node] = entry["node_id"]
            else:
                entry["layer"] = str(n_layers + 1)
        nodes.append(entry)
    links: dict[tuple[str, str], float] = {}

    def downstream_of(node: str):
        for _, v in graph.out_edges(node):
            if graph.nodes[v].get("kind") == "head":
                yield from downstream_of(v)
            else:
                yield v

    for u, v, w in graph.edges(data="weight"):
        if graph.nodes[u].get("kind") == "head":
            continue
        targets = [v] if graph.nodes[v].get("kind") != "head" else list(downstream_of(v))
        for t in targets:
            key = (ids[u], ids[t])
            links[key] = links.get(key, 0.0) + w
    document = {
        "metadata": {"slug": meta.get("slug", "tc-circuit"), "scan": meta.get("model", ""),
                     "transcoder_list": meta.get("transcoder_list", []),
                     "prompt_tokens": meta.get("tokens", []), "prompt": meta.get("prompt", ""),
                     "node_threshold": None, "schema_version": 1, "tc": meta},
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": [{"source": s, "target": t, "weight": w} for (s, t), w in links.items()],
    }
    return json.dumps(document, indent=1, default=float) + "\n"


# ----------------------------------------------------------------------------- export


def render(graph: nx.DiGraph, fmt: str) -> bytes:
    """The graph in ``fmt`` (dot, json, neuronpedia, graphml, svg, png) as bytes."""
    if fmt == "dot":
        return to_dot(graph).encode()
    if fmt == "json":
        return to_json(graph).encode()
    if fmt == "neuronpedia":
        if _attribution_graph(graph):
            from tccli import attribution_graph_io

            return attribution_graph_io.to_neuronpedia(graph).encode()
        return to_neuronpedia(graph).encode()
    if fmt == "graphml":
        return _graphml(graph)
    if fmt in ("svg", "png"):
        return run_dot(to_dot(graph), fmt)
    raise fail(f"unknown format {fmt!r}: use {', '.join(EXPORT_FORMATS)}")


def run_dot(dot_text: str, fmt: str) -> bytes:
    program = shutil.which("dot")
    if program is None:
        raise fail(f"rendering {fmt} needs Graphviz's `dot` program, which is not installed "
                   f"(Debian: apt-get install graphviz); `--format dot` works without it")
    result = subprocess.run([program, f"-T{fmt}"], input=dot_text.encode(), capture_output=True)
    if result.returncode != 0:
        raise fail(f"dot failed: {result.stderr.decode(errors='replace').strip()[:300]}")
    return result.stdout


def _graphml(graph: nx.DiGraph) -> bytes:
    """GraphML keeps scalar attributes only: None is dropped, dicts and lists become JSON strings."""
    clean = nx.DiGraph()

    def scalars(attrs: dict) -> dict[str, Any]:
        return {k: (json.dumps(v) if isinstance(v, (dict, list)) else v)
                for k, v in attrs.items() if v is not None}

    clean.graph.update(scalars(graph.graph.get("metadata", {})))
    for node, attrs in graph.nodes(data=True):
        clean.add_node(node, **scalars(attrs))
    for u, v, attrs in graph.edges(data=True):
        clean.add_edge(u, v, **scalars(attrs))
    return "\n".join(nx.generate_graphml(clean)).encode() + b"\n"


@dataclass
class ExportConfig:
    """Options of `tc export`."""

    graph: str = option("", "A graph written by `tc circuit --format json`.", argument=True, required=True,
                        metavar="GRAPH.json")
    format: str = option("dot", "Output: dot, svg, png, graphml, json or neuronpedia.")
    out: Optional[str] = option(None, "Write here instead of stdout.")

    def validate(self) -> None:
        if self.format not in EXPORT_FORMATS:
            raise fail(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {self.format!r}")


# ----------------------------------------------------------------------------- tc info


def _is_graph_file(path: Path) -> bool:
    if not path.is_file() or path.suffix.lower() != ".json":
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return (isinstance(data, dict) and data.get("format") == GRAPH_FORMAT
            and not _attribution_graph(data.get("graph", {})))


def _attribution_graph(graph: nx.DiGraph | dict) -> bool:
    """Written by `tc graph` (attribution_graph_io, which `tc info` asks about such files), not `tc circuit`."""
    attrs = graph.graph if isinstance(graph, nx.DiGraph) else graph
    return attrs.get("metadata", {}).get("kind") == "attribution-graph"


def graph_summary(path: Path) -> dict:
    graph = read_graph(path)
    meta = graph.graph.get("metadata", {})
    kinds: dict[str, int] = {}
    for _, kind in graph.nodes(data="kind"):
        kinds[kind] = kinds.get(kind, 0) + 1
    return {"kind": "circuit-graph", "path": str(path), "nodes": graph.number_of_nodes(),
            "edges": graph.number_of_edges(), "node_kinds": kinds, "model": meta.get("model"),
            "transcoders": meta.get("transcoders"), "prompt": meta.get("prompt"),
            "target": meta.get("target"), "position": meta.get("position"),
            "target_value": meta.get("target_value"), "explained": meta.get("explained"),
            "error_into_target": meta.get("error_into_target"), "search": meta.get("search"),
            "tc_version": meta.get("tc_version")}


def graph_summary_lines(s: dict) -> list[str]:
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


def _register_info_kind() -> None:
    from tccli import info

    info.register_kind("circuit-graph", _is_graph_file, graph_summary, graph_summary_lines)


_register_info_kind()
