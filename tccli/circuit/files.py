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

Pictures (``to_dot``): ``grid_layout`` places every node from its kind, layer and position alone, as
circuits are read: one band per layer (attention below the MLP within it), embeddings at the bottom,
targets at the top, one column per token with the prompt's tokens written under the columns. Nodes
that share a cell sit side by side, four to a line. Edges point upstream -> downstream, their width
by |weight|, blue positive and red negative; those below ``--min-edge`` x |target| are left out, and
so are nodes left without an edge (mostly error nodes); weights of at least ``--min-edge-label`` x
|target| are written on their edges to 3 significant figures (the 40 largest, in a dense graph).
Edges are curved (parallel ones stay apart) up to 120 of them, straight beyond (curves of a dense
graph bulge across the token labels). The DOT file pins every node
(``layout=neato``, ``pos="x,y!"``), so ``dot -Tsvg`` draws the same picture.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import networkx as nx

from tccli.config.circuit import EXPORT_FORMATS, PictureOptions
from tccli.errors import fail
from tccli.nodes import node_label, quoted_token, short_label
from tccli.runtime import inputs

GRAPH_FORMAT = "tc-circuit-graph"
GRAPH_WHAT = "a tc graph (JSON written by tc circuit or tc graph --format json)"


# ----------------------------------------------------------------------------- labels


def _quote(text: str) -> str:
    """A DOT quoted string, always quoted. Not the graphviz package's quoting: it leaves a valid ID bare
    (``target``, ``6.12``), reads a ``:`` in an edge's end as a port and ``<...>`` as an HTML label."""
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


# ----------------------------------------------------------------------------- pictures


NODE_HEIGHT = 0.34  # inches
NODE_GAP = 0.1  # between nodes of one cell
ROW_GAP = 0.5  # between rows, room for the edges
COLUMN_GAP = 0.25
PER_LINE = 4  # nodes side by side in one cell before a new line starts
CURVED_EDGES = 120  # up to this many edges are drawn curved (parallel ones stay apart), more straight
MAX_EDGE_LABELS = 40  # more labels than this cover a dense graph's edges: only the largest are written
CHAR_WIDTH = 0.075  # inches per character at fontsize 10 (Helvetica, on average)
COLOURS = {
    "feature": "#cfe2f3",
    "head": "#fff2cc",
    "embed": "#d9ead3",
    "pos": "#d9ead3",
    "error": "#e0e0e0",
    "skip": "#e6d0ec",
    "target": "#f4cccc",
}
_CELL_ORDER = {"feature": 0, "head": 0, "embed": 0, "pos": 1, "skip": 2, "error": 3, "target": 0}


def row_of(attrs: dict) -> tuple[int, int]:
    """(band, sub-row) of a node: band 0 embeddings, band L+1 layer L (sub-row 0 attention, 1 MLP);
    targets get band -1, meaning above every layer."""
    kind, layer = attrs.get("kind"), attrs.get("layer")
    if kind in ("embed", "pos"):
        return 0, 0
    if kind == "target":
        return -1, 0
    return int(layer) + 1, 0 if kind == "head" else 1


def _text_width(text: str, char_width: float = CHAR_WIDTH) -> float:
    return max(len(line) for line in text.split("\n")) * char_width + 0.2


@dataclass
class GridLayout:
    """Where a picture puts things, in inches (y grows upward)."""

    positions: dict[str, tuple[float, float]] = field(default_factory=dict)  # node -> centre
    widths: dict[str, float] = field(default_factory=dict)  # node -> box width
    rows: list[tuple[str, float]] = field(default_factory=list)  # row label, centre y
    columns: list[tuple[int, float, str]] = field(default_factory=list)  # position, centre x, token
    left: float = 0.0  # x of the row labels


def grid_layout(graph: nx.DiGraph, nodes: Optional[list[str]] = None) -> GridLayout:
    """Positions of ``nodes`` (default: all), from each node's kind, layer and position only."""
    nodes = list(graph.nodes) if nodes is None else list(nodes)
    attrs = {n: graph.nodes[n] for n in nodes}
    tokens = list(graph.graph.get("metadata", {}).get("tokens") or [])
    n_positions = max([len(tokens)] + [int(a.get("position", 0)) + 1 for a in attrs.values()])
    tokens += [""] * (n_positions - len(tokens))
    for a in attrs.values():  # a graph without metadata still names the tokens its nodes sit at
        if not tokens[int(a.get("position", 0))] and a.get("token"):
            tokens[int(a["position"])] = a["token"]
    others = [n for n in nodes if attrs[n].get("kind") != "target"]
    top_band = max([row_of(attrs[n])[0] for n in others], default=0)
    row_keys = [(0, 0)] + [(band, sub) for band in range(1, top_band + 1) for sub in (0, 1)] + [(-1, 0)]

    cells: dict[tuple[tuple[int, int], int], list[str]] = {}
    for n in nodes:
        cells.setdefault((row_of(attrs[n]), int(attrs[n].get("position", 0))), []).append(n)
    for members in cells.values():
        members.sort(
            key=lambda n: (
                _CELL_ORDER.get(attrs[n].get("kind"), 3),
                -abs(attrs[n].get("path_contribution") or attrs[n].get("influence") or 0.0),
                n,
            )
        )
    widths = {n: _text_width(short_label(attrs[n])) for n in nodes}
    box = max([widths[n] for n in others], default=0.8)
    for n in others:
        widths[n] = box  # one width for every box: a clean grid

    def cell_width(members: list[str]) -> float:
        if attrs[members[0]].get("kind") == "target":
            return 0.0  # targets may overhang their column: nothing else is in their row
        per_line = min(len(members), PER_LINE)
        return per_line * box + (per_line - 1) * NODE_GAP

    layout = GridLayout(widths=widths)
    x = 0.0
    column_x = []
    for position in range(n_positions):
        width = max(
            [_text_width(quoted_token(tokens[position]), 0.07)]
            + [cell_width(m) for (row, p), m in cells.items() if p == position]
        )
        column_x.append(x + width / 2)
        layout.columns.append((position, x + width / 2, tokens[position]))
        x += width + COLUMN_GAP
    y = 0.0
    for row in row_keys:
        lines = max([-(-len(m) // PER_LINE) for (r, _), m in cells.items() if r == row], default=1)
        height = lines * NODE_HEIGHT + (lines - 1) * NODE_GAP
        for (r, position), members in cells.items():
            if r != row:
                continue
            for line_start in range(0, len(members), PER_LINE):
                line = members[line_start : line_start + PER_LINE]  # centred on the column
                left = column_x[position] - (sum(widths[n] for n in line) + NODE_GAP * (len(line) - 1)) / 2
                line_y = y + (line_start // PER_LINE) * (NODE_HEIGHT + NODE_GAP) + NODE_HEIGHT / 2
                for n in line:
                    layout.positions[n] = (left + widths[n] / 2, line_y)
                    left += widths[n] + NODE_GAP
        band, sub = row
        name = "embed" if band == 0 else "target" if band == -1 else f"L{band - 1} {'attn' if sub == 0 else 'MLP'}"
        layout.rows.append((name, y + height / 2))
        y += height + ROW_GAP
    layout.left = -0.9
    return layout


def _reference_value(graph: nx.DiGraph) -> float:
    """|target value| (the largest, with several targets), or the largest |weight| when that is 0."""
    values = [abs(a.get("activation") or 0.0) for _, a in graph.nodes(data=True) if a.get("kind") == "target"]
    reference = max(values, default=0.0)
    if reference == 0.0:
        reference = max((abs(w) for _, _, w in graph.edges(data="weight")), default=1.0) or 1.0
    return reference


def _caption(graph: nx.DiGraph, hidden_edges: int, hidden_nodes: int, options: PictureOptions) -> str:
    meta = graph.graph.get("metadata", {})
    lines = []
    if meta.get("prompt") is not None:
        prompt = str(meta["prompt"])
        lines.append("prompt: " + quoted_token(prompt if len(prompt) <= 120 else prompt[:117] + "..."))
    if meta.get("explained") is not None and meta.get("target_value"):
        lines.append(
            f"the target's direct inputs in the graph explain {meta['explained']:.3g} "
            f"({meta['explained'] / meta['target_value']:.0%}); transcoder error into it "
            f"{meta.get('error_into_target', 0.0):.3g}"
        )
    if meta.get("replacement_score") is not None:  # a tc graph attribution graph
        lines.append(
            f"replacement score {meta['replacement_score']:.3f}, completeness score "
            f"{meta['completeness_score']:.3f}; {meta.get('kept_features')} features kept of "
            f"{meta.get('graph_features')} with rows ({meta.get('active_features')} active)"
        )
    if hidden_edges:
        lines.append(
            f"not drawn: {hidden_edges} edges below {options.min_edge:g} x |target| and "
            f"{hidden_nodes} nodes left without an edge"
        )
    return "\n".join(lines)


def to_dot(graph: nx.DiGraph, options: Optional[PictureOptions] = None) -> str:
    """Graphviz DOT of the graph laid out as ``grid_layout`` says (every node pinned)."""
    options = options or PictureOptions()
    reference = _reference_value(graph)
    drawn_edges = [(u, v, w) for u, v, w in graph.edges(data="weight") if abs(w) >= options.min_edge * reference]
    ends = {n for u, v, _ in drawn_edges for n in (u, v)}
    drawn = [n for n, a in graph.nodes(data=True) if a.get("kind") == "target" or n in ends]
    layout = grid_layout(graph, drawn)
    largest = max([abs(w) for _, _, w in drawn_edges] or [1.0]) or 1.0
    caption = _caption(graph, graph.number_of_edges() - len(drawn_edges), graph.number_of_nodes() - len(drawn), options)
    lines = [
        "digraph circuit {",
        f"  graph [layout=neato, splines={'curved' if len(drawn_edges) <= CURVED_EDGES else 'false'}, "
        f"outputorder=edgesfirst, pad=0.4, fontname=Helvetica, fontsize=11, "
        f"labelloc=t, labeljust=l, label={_quote(caption)}];",
        '  node [shape=box, style="rounded,filled", fontname=Helvetica, fontsize=10, fixedsize=true, '
        f"height={NODE_HEIGHT}, penwidth=0.6];",
        "  edge [fontname=Helvetica, fontsize=8, arrowsize=0.5];",
    ]
    for n in drawn:
        attrs = graph.nodes[n]
        x, y = layout.positions[n]
        tooltip = _tooltip(n, attrs)
        lines.append(
            f'  {_quote(n)} [label={_quote(short_label(attrs))}, pos="{x:.3f},{y:.3f}!", '
            f'width={layout.widths[n]:.3f}, fillcolor="{COLOURS.get(attrs.get("kind"), "white")}", '
            f"tooltip={_quote(tooltip)}];"
        )
    bottom = -NODE_HEIGHT - 0.25
    for position, x, token in layout.columns:
        lines.append(
            f'  "token:{position}" [shape=plaintext, style="", fixedsize=false, fontsize=9, '
            f'label={_quote(quoted_token(token) + chr(10) + str(position))}, pos="{x:.3f},{bottom:.3f}!"];'
        )
    for index, (name, y) in enumerate(layout.rows):
        lines.append(
            f'  "row:{index}" [shape=plaintext, style="", fixedsize=false, fontsize=9, '
            f'fontcolor="#666666", label={_quote(name)}, pos="{layout.left:.3f},{y:.3f}!"];'
        )
    labelled = sorted(
        ((u, v) for u, v, w in drawn_edges if abs(w) >= options.min_edge_label * reference),
        key=lambda e: -abs(graph.edges[e]["weight"]),
    )[:MAX_EDGE_LABELS]
    labelled = set(labelled)
    for u, v, w in drawn_edges:
        width = 0.5 + 4.5 * abs(w) / largest
        colour = "#1f5fbf" if w >= 0 else "#c0392b"
        label = f", label={_quote(f'{w:.3g}')}" if (u, v) in labelled else ""
        lines.append(f'  {_quote(u)} -> {_quote(v)} [penwidth={width:.2f}, color="{colour}"{label}];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _tooltip(node: str, attrs: dict) -> str:
    """What hovering a node in the SVG shows: its id, token and figures."""
    parts = [node, f"token {quoted_token(attrs.get('token', ''))} @{attrs.get('position')}"]
    for key in ("activation", "direct_contribution", "path_contribution", "influence"):
        if isinstance(attrs.get(key), (int, float)):
            parts.append(f"{key} {attrs[key]:.4g}")
    return "\n".join(parts)


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


def render(graph: nx.DiGraph, fmt: str, picture: Optional[PictureOptions] = None) -> bytes:
    """The graph in ``fmt`` (dot, json, neuronpedia, graphml, svg, png) as bytes; ``picture`` says
    how dot, svg and png draw it."""
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
        return run_dot(to_dot(graph, picture), fmt)
    raise fail(f"unknown format {fmt!r}: use {', '.join(EXPORT_FORMATS)}")


def run_dot(dot_text: str, fmt: str) -> bytes:
    program = shutil.which("dot")
    if program is None:
        raise fail(
            f"rendering {fmt} needs Graphviz's `dot` program, which is not installed "
            f"(Debian: apt-get install graphviz); `--format dot` works without it"
        )
    result = subprocess.run([program, f"-T{fmt}"], input=dot_text.encode(), capture_output=True)
    if result.returncode != 0:
        raise fail(f"dot failed: {result.stderr.decode(errors='replace').strip()[:300]}")
    return result.stdout


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
