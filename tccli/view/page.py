"""`tc view`: a graph as one self-contained HTML page (inline script, style and data; no request leaves
the page, which works opened from disk).

Python decides what the page shows: every node's place (``grid_layout``, as tc's pictures lay a graph
out: a band per layer, a column per token, targets on top), its short name, and with a features file
(`tc score`) each feature node's label and card (``tccli.features.show.html_card``, as `tc show --html`
draws it). The page (``page.html``, ``page.css``, ``page.js`` beside this module, plain JavaScript, no
library) draws nodes as SVG elements, one per node carrying ``data-node-id``, and edges on a canvas
under them, which stays fast at 50,000 edges; it pans, zooms, filters edges by a threshold, shows a
node's figures on hover and its edges and card on click, searches, pins nodes, groups them into
supernodes and saves the pinned subgraph as a tc circuit-graph JSON that `tc validate` reads.

A ``PageAddon`` (what `tc serve` adds: tccli.serve) puts more controls into the bar and the side panel and
a second script after the page's; it may let the page talk to the server it came from (``connect``) and
fetch feature cards from ``card_url`` instead of carrying them all.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any, Optional

import networkx as nx

from tccli.circuit.files import GRAPH_FORMAT
from tccli.circuit.picture import NODE_HEIGHT, TOKEN_ROW_Y, grid_layout, reference_value
from tccli.errors import fail
from tccli.features.files import FeaturesFile
from tccli.nodes import feature_name, quoted_token, short_label

PIXELS_PER_INCH = 96.0
LABEL_TOKENS = 3  # de-embedding and promoted tokens in a feature's short label
FIGURES = ("activation", "influence", "cumulative_influence", "path_contribution", "direct_contribution")


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities made None: JSON.parse refuses them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def script_json(value: Any) -> str:
    """JSON safe inside a <script> element: no `</script>`, no `<!--` can end or bend it."""
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False, default=float)
    except ValueError:
        text = json.dumps(_finite(value), allow_nan=False, ensure_ascii=False, default=float)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# ----------------------------------------------------------------------------- features


def _check_features_match_graph(features: FeaturesFile, graph: nx.DiGraph) -> None:
    from tccli.model.loading import known_different_models

    meta = graph.graph.get("metadata") or {}
    scored = features.meta.get("model_info") or {}
    for key in ("architecture", "n_layers"):
        if meta.get(key) is not None and scored.get(key) is not None and meta[key] != scored[key]:
            raise fail(
                f"{features.path} was scored on another model than the graph: {key} {scored[key]!r} "
                f"there, {meta[key]!r} in the graph"
            )
    if known_different_models(meta.get("model"), scored.get("name")):
        raise fail(f"{features.path} was scored on {scored.get('name')}, the graph traced on {meta.get('model')}")


def feature_label(features: FeaturesFile, record: dict) -> str:
    """A feature's short label: its top de-embedding tokens and the tokens it promotes most."""
    tokens_in = " ".join(quoted_token(features.token_text(int(t))) for t, _ in record["deembedding"][:LABEL_TOKENS])
    tokens_out = " ".join(quoted_token(features.token_text(int(t))) for t, _ in record["logit_promoted"][:LABEL_TOKENS])
    return f"{tokens_in} → {tokens_out}"


def feature_texts(graph: nx.DiGraph, features: FeaturesFile, n_examples: int, cards: bool = True) -> tuple[dict, dict]:
    """({`L2.F57`: short label}, {`L2.F57`: card HTML}) for the graph's feature nodes in layers the
    features file scored (a feature index the file's layer does not have is refused); no cards unless
    ``cards``."""
    from tccli.features.show import html_card

    _check_features_match_graph(features, graph)
    wanted = sorted(
        {
            (a["layer"], a["feature"])
            for _, a in graph.nodes(data=True)
            if a.get("kind") == "feature" and isinstance(a.get("feature"), int) and a.get("layer") in features.layers
        }
    )
    labels, card_html, frequencies = {}, {}, {}
    for layer, index in wanted:
        features.check_feature(layer, index)
        if layer not in frequencies:
            frequencies[layer] = features.frequencies(layer)
        record = features.feature(layer, index)
        key = feature_name(layer, index)
        labels[key] = feature_label(features, record)
        if cards:
            card_html[key] = html_card(features, record, n_examples, frequencies[layer])
    return labels, card_html


# ----------------------------------------------------------------------------- the page


def page_data(
    graph: nx.DiGraph,
    features: Optional[FeaturesFile] = None,
    n_examples: int = 5,
    min_edge: float = 0.01,
    card_url: Optional[str] = None,
) -> dict:
    """Everything the page's script reads: the graph as tc writes it (node-link; a saved subgraph is cut
    from it), each node's place and name, the edge threshold's reference, feature labels and cards (or,
    with ``card_url``, where the page fetches a card: the URL with the feature's name, `L2.F57`, added)."""
    layout = grid_layout(graph)
    top = max([y for _, y in layout.positions.values()] + [y for _, y in layout.rows] + [0.0]) + NODE_HEIGHT

    def px(x: float) -> float:
        return round(x * PIXELS_PER_INCH, 2)

    def py(y: float) -> float:  # the layout's y grows upward, the page's downward
        return round((top - y) * PIXELS_PER_INCH, 2)

    labels, cards = (
        feature_texts(graph, features, n_examples, cards=card_url is None) if features is not None else ({}, {})
    )
    places = []
    for node, attrs in graph.nodes(data=True):
        x, y = layout.positions[node]
        key = feature_name(attrs["layer"], attrs["feature"]) if attrs.get("kind") == "feature" else ""
        places.append(
            {
                "x": px(x),
                "y": py(y),
                "w": round(layout.widths[node] * PIXELS_PER_INCH, 2),
                "name": short_label(attrs),
                "key": key,
            }
        )
    meta = graph.graph.get("metadata") or {}
    return {
        "graph": {"format": GRAPH_FORMAT, **nx.node_link_data(graph, edges="links")},
        "places": places,
        "node_height": NODE_HEIGHT * PIXELS_PER_INCH,
        "rows": [[name, py(y)] for name, y in layout.rows],
        "columns": [[position, px(x), quoted_token(token)] for position, x, token in layout.columns],
        "token_row_y": py(TOKEN_ROW_Y),
        "row_label_x": px(layout.left),
        "reference": reference_value(graph),
        "min_edge": min_edge,
        "prompt": meta.get("prompt"),
        "labels": labels,
        "cards": cards,
        "card_url": card_url,
        "figures": list(FIGURES),
    }


@dataclass
class PageAddon:
    """What a server adds to the page: HTML for the bar and the side panel, style, a script run after the
    page's (``window.tcView`` is its handle on the page), and whether the page may fetch from where it came
    from (its Content-Security-Policy otherwise lets no request leave)."""

    name: str = "tc view"  # the bar's and the title's first word
    bar: str = ""
    side: str = ""
    style: str = ""
    script: str = ""
    connect: bool = False
    card_url: Optional[str] = None


def _asset(name: str) -> str:
    return resources.files("tccli.view").joinpath(name).read_text(encoding="utf-8")


def render_page(
    graph: nx.DiGraph,
    features: Optional[FeaturesFile] = None,
    n_examples: int = 5,
    min_edge: float = 0.01,
    title: str = "graph",
    addon: Optional[PageAddon] = None,
) -> str:
    """The page: page.html with its style, script and ``page_data`` inlined (and ``addon``'s parts)."""
    from tccli.features.show import CSS as CARD_CSS

    addon = addon or PageAddon()
    data = script_json(page_data(graph, features, n_examples, min_edge, addon.card_url))
    page = _asset("page.html")
    parts = {
        "/*TC_CONNECT*/": "; connect-src 'self'" if addon.connect else "",
        "/*TC_STYLE*/": CARD_CSS + _asset("page.css") + addon.style,  # the page's own rules win
        "/*TC_ADDON_SCRIPT*/": addon.script,
        "/*TC_SCRIPT*/": _asset("page.js"),
        "<!--TC_ADDON_BAR-->": addon.bar,
        "<!--TC_ADDON_SIDE-->": addon.side,
        "__TC_NAME__": html.escape(addon.name),
        "__TC_TITLE__": html.escape(title),
    }
    for placeholder, content in parts.items():
        page = page.replace(placeholder, content)
    return page.replace("__TC_DATA__", data, 1)  # last: the data may hold anything
