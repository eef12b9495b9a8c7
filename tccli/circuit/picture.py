"""Pictures of circuit and attribution graphs: DOT for Graphviz, and SVG and PNG.

``grid_layout`` places every node from its kind, layer and position alone, as circuits are read: one
band per layer (attention below the MLP within it), embeddings at the bottom, targets at the top, one
column per token with the prompt's tokens written under the columns. Nodes that share a cell sit side
by side, four to a line. Edges point upstream -> downstream, their width by |weight|, blue positive and
red negative; those below ``--min-edge`` x |target| are left out, and so are nodes left without an edge
(mostly error nodes); weights of at least ``--min-edge-label`` x |target| are written on their edges to
3 significant figures (the 40 largest, in a dense graph). Edges are curved (parallel ones stay apart)
up to 120 of them, straight beyond (curves of a dense graph bulge across the token labels).

``picture_plan`` decides all of that once; ``to_dot`` writes it as DOT that pins every node
(``layout=neato``, ``pos="x,y!"``), so ``dot -Tsvg`` draws the same picture, and ``to_svg`` writes it
as SVG directly, for machines without Graphviz (straight edges, no other difference in what is drawn).
``draw`` makes SVG or PNG: with Graphviz's ``dot`` when it is installed, else SVG by ``to_svg``.
"""

from __future__ import annotations

import html
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import networkx as nx

from tccli.config.circuit import PictureOptions
from tccli.errors import fail
from tccli.nodes import quoted_token, short_label

# ----------------------------------------------------------------------------- DOT


def _quote(text: str) -> str:
    """A DOT quoted string, always quoted. Not the graphviz package's quoting: it leaves a valid ID bare
    (``target``, ``6.12``), reads a ``:`` in an edge's end as a port and ``<...>`` as an HTML label."""
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


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


def reference_value(graph: nx.DiGraph) -> float:
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


@dataclass
class PicturePlan:
    """What a picture draws, decided once for every writer."""

    nodes: list[str]  # drawn nodes: targets, and nodes with a drawn edge
    layout: GridLayout
    edges: list[tuple[str, str, float]]  # drawn edges (upstream, downstream, weight)
    labelled: set[tuple[str, str]]  # drawn edges whose weight is written on them
    largest: float  # the largest |weight| drawn: edge widths are relative to it
    caption: str


def picture_plan(graph: nx.DiGraph, options: Optional[PictureOptions] = None) -> PicturePlan:
    """The nodes, edges, layout and caption a picture of ``graph`` shows under ``options``."""
    options = options or PictureOptions()
    reference = reference_value(graph)
    edges = [(u, v, w) for u, v, w in graph.edges(data="weight") if abs(w) >= options.min_edge * reference]
    ends = {n for u, v, _ in edges for n in (u, v)}
    nodes = [n for n, a in graph.nodes(data=True) if a.get("kind") == "target" or n in ends]
    labelled = sorted(
        ((u, v) for u, v, w in edges if abs(w) >= options.min_edge_label * reference),
        key=lambda e: -abs(graph.edges[e]["weight"]),
    )[:MAX_EDGE_LABELS]
    return PicturePlan(
        nodes=nodes,
        layout=grid_layout(graph, nodes),
        edges=edges,
        labelled=set(labelled),
        largest=max([abs(w) for _, _, w in edges] or [1.0]) or 1.0,
        caption=_caption(graph, graph.number_of_edges() - len(edges), graph.number_of_nodes() - len(nodes), options),
    )


def _edge_style(weight: float, largest: float) -> tuple[float, str]:
    """(width in points, colour) of an edge."""
    return 0.5 + 4.5 * abs(weight) / largest, "#1f5fbf" if weight >= 0 else "#c0392b"


TOKEN_ROW_Y = -NODE_HEIGHT - 0.25  # the prompt's tokens, under the embeddings


def to_dot(graph: nx.DiGraph, options: Optional[PictureOptions] = None) -> str:
    """Graphviz DOT of the graph laid out as ``grid_layout`` says (every node pinned)."""
    plan = picture_plan(graph, options)
    layout = plan.layout
    lines = [
        "digraph circuit {",
        f"  graph [layout=neato, splines={'curved' if len(plan.edges) <= CURVED_EDGES else 'false'}, "
        f"outputorder=edgesfirst, pad=0.4, fontname=Helvetica, fontsize=11, "
        f"labelloc=t, labeljust=l, label={_quote(plan.caption)}];",
        '  node [shape=box, style="rounded,filled", fontname=Helvetica, fontsize=10, fixedsize=true, '
        f"height={NODE_HEIGHT}, penwidth=0.6];",
        "  edge [fontname=Helvetica, fontsize=8, arrowsize=0.5];",
    ]
    for n in plan.nodes:
        attrs = graph.nodes[n]
        x, y = layout.positions[n]
        lines.append(
            f'  {_quote(n)} [label={_quote(short_label(attrs))}, pos="{x:.3f},{y:.3f}!", '
            f'width={layout.widths[n]:.3f}, fillcolor="{COLOURS.get(attrs.get("kind"), "white")}", '
            f"tooltip={_quote(_tooltip(n, attrs))}];"
        )
    for position, x, token in layout.columns:
        lines.append(
            f'  "token:{position}" [shape=plaintext, style="", fixedsize=false, fontsize=9, '
            f'label={_quote(quoted_token(token) + chr(10) + str(position))}, pos="{x:.3f},{TOKEN_ROW_Y:.3f}!"];'
        )
    for index, (name, y) in enumerate(layout.rows):
        lines.append(
            f'  "row:{index}" [shape=plaintext, style="", fixedsize=false, fontsize=9, '
            f'fontcolor="#666666", label={_quote(name)}, pos="{layout.left:.3f},{y:.3f}!"];'
        )
    for u, v, w in plan.edges:
        width, colour = _edge_style(w, plan.largest)
        label = f", label={_quote(f'{w:.3g}')}" if (u, v) in plan.labelled else ""
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


# ----------------------------------------------------------------------------- SVG without Graphviz

POINTS = 72.0  # per inch: the layout is in inches, SVG user units here are points
PAD = 0.4  # inches of margin, as the DOT picture's pad


def to_svg(graph: nx.DiGraph, options: Optional[PictureOptions] = None) -> str:
    """SVG of the same picture as ``to_dot`` (same plan, same positions), written without Graphviz.
    Edges are straight; a node's tooltip is its SVG <title>, as in Graphviz's SVG."""
    plan = picture_plan(graph, options)
    layout = plan.layout
    caption = plan.caption.split("\n") if plan.caption else []
    xs = [x for x, _ in layout.positions.values()] + [x for _, x, _ in layout.columns] + [layout.left]
    half = max(layout.widths.values(), default=0.8) / 2 + 0.5
    left, right = min(xs) - half - PAD, max(xs) + half + PAD
    top_y = max([y for _, y in layout.positions.values()] + [y for _, y in layout.rows] + [0.0]) + NODE_HEIGHT
    bottom_y = TOKEN_ROW_Y - 0.3 - PAD
    caption_height = 0.2 * len(caption) + (0.15 if caption else 0.0)
    width, height = (right - left) * POINTS, (top_y - bottom_y + caption_height + PAD) * POINTS

    def px(x: float) -> float:
        return (x - left) * POINTS

    def py(y: float) -> float:  # layout y grows upward, SVG's downward
        return (top_y + caption_height + PAD - y) * POINTS

    def text(x: float, y: float, content: str, size: float, anchor: str = "middle", fill: str = "#000000") -> str:
        return (
            f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size:g}" text-anchor="{anchor}" fill="{fill}">'
            f"{html.escape(content)}</text>"
        )

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}pt" height="{height:.0f}pt" '
        f'viewBox="0 0 {width:.1f} {height:.1f}" font-family="Helvetica, Arial, sans-serif">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="5" markerHeight="5" '
        'orient="auto-start-reverse" markerUnits="userSpaceOnUse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="context-stroke"/></marker></defs>',
        f'<rect width="{width:.1f}" height="{height:.1f}" fill="#ffffff"/>',
    ]
    for index, line in enumerate(caption):
        out.append(text(PAD * POINTS, (PAD + 0.2 * (index + 1)) * POINTS, line, 11, "start"))
    half_height = NODE_HEIGHT / 2
    for u, v, w in plan.edges:  # edges first, under the nodes; from the top of u to the bottom of v
        (x1, y1), (x2, y2) = layout.positions[u], layout.positions[v]
        y1, y2 = (y1 + half_height, y2 - half_height) if y2 >= y1 else (y1 - half_height, y2 + half_height)
        stroke, colour = _edge_style(w, plan.largest)
        out.append(
            f'<g class="edge"><title>{html.escape(u)} -&gt; {html.escape(v)}: {w:.4g}</title>'
            f'<line x1="{px(x1):.1f}" y1="{py(y1):.1f}" x2="{px(x2):.1f}" y2="{py(y2):.1f}" '
            f'stroke="{colour}" stroke-width="{stroke:.2f}" marker-end="url(#arrow)"/></g>'
        )
        if (u, v) in plan.labelled:
            out.append(text(px((x1 + x2) / 2) + 3, py((y1 + y2) / 2), f"{w:.3g}", 8, "start", colour))
    for n in plan.nodes:
        attrs = graph.nodes[n]
        x, y = layout.positions[n]
        box = layout.widths[n]
        out.append(
            f'<g class="node" id="{html.escape(n, quote=True)}"><title>{html.escape(_tooltip(n, attrs))}</title>'
            f'<rect x="{px(x - box / 2):.1f}" y="{py(y + half_height):.1f}" width="{box * POINTS:.1f}" '
            f'height="{NODE_HEIGHT * POINTS:.1f}" rx="4" fill="{COLOURS.get(attrs.get("kind"), "white")}" '
            f'stroke="#000000" stroke-width="0.6"/>' + text(px(x), py(y) + 3.5, short_label(attrs), 10) + "</g>"
        )
    for position, x, token in layout.columns:
        out.append(text(px(x), py(TOKEN_ROW_Y), quoted_token(token), 9))
        out.append(text(px(x), py(TOKEN_ROW_Y) + 11, str(position), 9))
    for name, y in layout.rows:
        out.append(text(px(layout.left), py(y) + 3, name, 9, "middle", "#666666"))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _note_on_stderr(message: str) -> None:
    print(f"tc: note: {message}", file=sys.stderr)


def draw(
    graph: nx.DiGraph,
    fmt: str,
    options: Optional[PictureOptions] = None,
    log: Callable[[str], None] = _note_on_stderr,
) -> bytes:
    """SVG or PNG of ``graph``: by Graphviz's ``dot`` when it is installed; otherwise SVG by ``to_svg``
    (``log`` is told so, in one line: by default on stderr, never on stdout, which may hold the picture)
    and PNG refused."""
    if shutil.which("dot") is None and fmt == "svg":
        log("Graphviz's dot is not installed: drawn by tc's own SVG writer (straight edges)")
        return to_svg(graph, options).encode()
    return run_dot(to_dot(graph, options), fmt)


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
