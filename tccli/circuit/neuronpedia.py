"""Graphs as circuit-tracer writes them for its local viewer and Neuronpedia (its
``utils/create_graph_files.py`` and ``frontend/graph_models.py``), and the folder its local server reads.

A graph file: ``metadata`` (``slug``, ``scan``, ``transcoder_list``, ``prompt_tokens``, ``prompt``,
``node_threshold``, ``schema_version`` 1; tc adds its own metadata under ``tc``), ``qParams``, ``nodes``,
``links``. Each node's ``feature`` is what the viewers look the node up by: for a transcoder feature the
Cantor pairing of (layer, feature index) (tccli.nodes.neuronpedia_feature_id), which they decode back into
the layer and the index to fetch the feature's examples from the files of the graph's ``scan``; for an
embedding its position, for a logit its token, -1 for an error. ``scan`` names the transcoder set
(tccli.transcoders.set_id; --scan overrides it).

Two choices differ from circuit-tracer's first releases, on purpose: error nodes are ``{layer}_-1_{pos}``
(its ``0_{layer}_{pos}`` collides with a layer-0 feature's id; its current release writes tc's form too),
and logit nodes carry their value as ``activation`` (and, in `tc graph`'s files, their influence) where
circuit-tracer leaves them empty.

A folder of graphs (``tc graph --format neuronpedia --out DIR/``): ``DIR/{slug}.json`` per graph and
``DIR/graph-metadata.json``, ``{"graphs": [metadata, ...]}`` with each graph's metadata (``tc`` left
out), the list circuit-tracer's local server shows; a graph written again under its slug replaces its
entry.
"""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx

from tccli.errors import fail
from tccli.nodes import neuronpedia_feature_id, node_label
from tccli.runtime import outputs

GRAPH_INDEX = "graph-metadata.json"

# circuit-tracer's Metadata fields: what a graph file's metadata and its graph-metadata.json entry hold.
METADATA_KEYS = ("slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold", "schema_version")

QPARAMS = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}

# How long a writer waits for another to finish updating graph-metadata.json (each holds it for a moment).
INDEX_WAIT_SECONDS = 30.0


def viewer_token(text: str) -> str:
    """A token as circuit-tracer writes it for the viewer: newline, tab and carriage return as visible marks."""
    return text.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def render(graph: nx.DiGraph) -> str:
    """The graph file of a `tc graph` attribution graph or of a `tc circuit` graph."""
    if graph.graph.get("metadata", {}).get("kind") == "attribution-graph":
        return attribution_graph_to_neuronpedia(graph)
    return to_neuronpedia(graph)


def name_graph(graph: nx.DiGraph, scan: str | None, slug: str | None) -> None:
    """Record --scan and --slug in the graph's metadata (`tc export`), over what it recorded."""
    meta = graph.graph.setdefault("metadata", {})
    if scan:
        meta["scan"] = scan
    if slug:
        meta["slug"] = slug


def _metadata(meta: dict, default_slug: str, node_threshold) -> dict:
    scan = meta.get("scan")
    if not scan:
        raise fail(
            "the graph records no transcoder set id (scan): it was written by an older tc; pass --scan ID "
            "(the hub id of its transcoders, or the id tc score --format neuronpedia-features used)"
        )
    return {
        "slug": meta.get("slug") or default_slug,
        "scan": scan,
        "transcoder_list": meta.get("transcoder_list", []),
        "prompt_tokens": [viewer_token(token) for token in meta.get("tokens", [])],
        "prompt": meta.get("prompt", ""),
        "node_threshold": node_threshold,
        "schema_version": 1,
        "tc": meta,
    }


# Nodes that are linear paths in circuit-tracer's graphs (folded away in its JSON).
LINEAR_PATH_KINDS = ("head", "skip")


def _circuit_node_id(node: str, attrs: dict, n_layers: int) -> str:
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
    ids = {n: _circuit_node_id(n, a, n_layers) for n, a in graph.nodes(data=True)}
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
            "feature": neuronpedia_feature_id(attrs["layer"], attrs["feature"]) if kind == "feature" else -1,
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
                    feature=neuronpedia_feature_id(description["layer"], description["feature"]),
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
        "metadata": _metadata(meta, "tc-circuit", None),
        "qParams": dict(QPARAMS),
        "nodes": nodes,
        "links": [{"source": s, "target": t, "weight": w} for (s, t), w in links.items()],
    }
    return json.dumps(document, indent=1, default=float) + "\n"


def attribution_graph_to_neuronpedia(graph: nx.DiGraph) -> str:
    """circuit-tracer's graph file for Neuronpedia's viewer, from a pruned `tc graph` attribution graph
    (tccli.graph.files.to_networkx).

    As circuit-tracer writes it: `metadata` (slug, scan, transcoder_list, prompt_tokens, prompt,
    node_threshold; plus schema_version 1 and tc's own metadata under `tc`), `qParams`, `nodes`
    (feature `{layer}_{feature}_{pos}` with `feature` the Cantor pairing of (layer, feature), embedding
    `E_{token}_{pos}`, logit `{n_layers+1}_{token}_{pos}`, with `influence` = the node's cumulative
    influence share, `activation`, `token_prob`, `is_target_logit`), `links` (`source`, `target`,
    `weight`). Error nodes are `{layer}_-1_{pos}`, not circuit-tracer's first `0_{layer}_{pos}`, which
    collides with layer-0 feature ids. Head nodes (--heads) do not exist in this schema: their parts stay
    on the direct edges."""
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
                feature=neuronpedia_feature_id(attrs["layer"], attrs["feature"]),
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
            entry.update(_target_node(attrs, n_layers, position, top_probability))
        ids[node] = entry["node_id"]
        nodes.append(entry)
    links = [
        {"source": ids[u], "target": ids[v], "weight": w}
        for u, v, w in graph.edges(data="weight")
        if u in ids and v in ids
    ]
    document = {
        "metadata": _metadata(meta, "tc-graph", meta.get("config", {}).get("node_threshold")),
        "qParams": dict(QPARAMS),
        "nodes": nodes,
        "links": links,
    }
    return json.dumps(document, indent=1, default=float) + "\n"


def _target_node(attrs: dict, n_layers: int, position: int, top_probability: float) -> dict:
    kind = attrs.get("target_kind")
    if kind == "feature":
        layer, feature = attrs["layer"], attrs["target_feature"]
        return {
            "node_id": f"{layer}_{feature}_{position}",
            "feature": neuronpedia_feature_id(layer, feature),
            "layer": str(layer),
            "feature_type": "cross layer transcoder",
            "jsNodeId": f"{layer}_{feature}-0",
            "clerp": f"target: L{layer} F{feature} pre-activation",
        }
    token = attrs.get("target_token", -1) if kind in ("logit", "logit_diff") else -1
    text = viewer_token(attrs.get("target_token_string", ""))
    if kind == "logit_diff":
        text = f'{text}" - "{viewer_token(attrs.get("target_token_b_string", ""))}'
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


# ----------------------------------------------------------------------------- a folder of graphs


def read_graph_index(path: Path) -> dict:
    """graph-metadata.json as {"graphs": [...], ...}: empty when it does not exist; one line when it is not
    such a list (it is never written over then)."""
    if not path.exists():
        return {"graphs": []}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise fail(f"cannot read {path} ({reason}); move it away to start a new list") from None
    if not (
        isinstance(data, dict)
        and isinstance(data.get("graphs"), list)
        and all(isinstance(g, dict) and isinstance(g.get("slug"), str) for g in data["graphs"])
    ):
        raise fail(f'{path} is not a list of graphs ({{"graphs": [{{"slug": ...}}, ...]}}); move it away')
    return data


def index_entry(document: bytes | str) -> dict:
    """A graph file's graph-metadata.json entry: its metadata, circuit-tracer's fields only."""
    meta = json.loads(document)["metadata"]
    return {key: meta[key] for key in METADATA_KEYS if key in meta}


def add_to_graph_index(folder: Path, entry: dict) -> Path:
    """Add the graph ``entry`` describes to ``folder``'s graph-metadata.json (replacing the entry of the same
    slug), atomically and under the list's lock, so that graphs written at the same time are all listed."""
    path = Path(folder) / GRAPH_INDEX
    with outputs.locked(path, wait=INDEX_WAIT_SECONDS):
        index = read_graph_index(path)
        index["graphs"] = [g for g in index["graphs"] if g.get("slug") != entry["slug"]] + [entry]
        outputs.atomic_write_text(path, json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    return path
