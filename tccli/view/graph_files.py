"""The graphs `tc view` reads: tc's own JSON (tccli.circuit.files), and Neuronpedia / circuit-tracer
attribution-graph JSON read into a graph with tc's node attributes, so `tc view` shows such a graph as it
shows tc's own (tccli.circuit.neuronpedia writes that schema; this reads it).

The schema, as circuit-tracer writes it and `tc export --format neuronpedia` writes it: ``metadata``
(``prompt_tokens``, ``prompt``, ``scan``, ...), ``nodes`` (``node_id``, ``feature_type``, ``layer``
(a string: ``E`` for embeddings, n_layers + 1 for logits), ``ctx_idx``, ``feature``, ``activation``,
``influence``, ``clerp``, ...) and ``links`` (``source``, ``target``, ``weight``). Node ids are kept as
they are: a page's ``data-node-id`` and a saved subgraph name nodes as the file does.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import networkx as nx

from tccli.circuit.files import GRAPH_FORMAT, from_json
from tccli.errors import fail
from tccli.runtime import inputs

_KINDS = {
    "cross layer transcoder": "feature",
    "transcoder": "feature",
    "mlp reconstruction error": "error",
    "embedding": "embed",
    "logit": "target",
}
_FEATURE_ID = re.compile(r"^(-?\d+)_(-?\d+)_(\d+)$")  # {layer}_{feature}_{position}


def is_neuronpedia(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and isinstance(data.get("nodes"), list)
        and isinstance(data.get("links"), list)
        and all(isinstance(n, dict) and "node_id" in n and "feature_type" in n for n in data["nodes"][:50])
    )


def _unpaired(number: Any, layer: int, where: str) -> int:
    """The feature index in ``number``, the Cantor pairing of (layer, feature) circuit-tracer names a
    feature by (tccli.nodes.neuronpedia_feature_id), for node ids that do not spell it out."""
    if not isinstance(number, int) or number < 0:
        raise fail(f"{where}: a feature node has no feature number ({number!r})")
    total = (math.isqrt(8 * number + 1) - 1) // 2
    feature = number - total * (total + 1) // 2
    if total - feature != layer:
        raise fail(f"{where}: feature number {number} is not of layer {layer} (circuit-tracer's Cantor pairing)")
    return feature


def from_neuronpedia(data: dict, where: str = "graph") -> nx.DiGraph:
    """A networkx graph with tc's attribute conventions from a parsed Neuronpedia graph document."""
    meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    tokens = [str(t) for t in meta.get("prompt_tokens") or []]
    layers = []
    for node in data["nodes"]:
        try:
            if node.get("feature_type") in ("cross layer transcoder", "transcoder", "mlp reconstruction error"):
                layers.append(int(node["layer"]))
        except (TypeError, ValueError, KeyError):
            raise fail(f"{where}: node {node.get('node_id')!r} has no layer number") from None
    n_layers = max(layers, default=-1) + 1
    for node in data["nodes"]:  # a logit sits in layer n_layers + 1, though no feature be in the last layers
        if node.get("feature_type") == "logit" and str(node.get("layer")).isdigit():
            n_layers = max(n_layers, int(node["layer"]) - 1)
    graph = nx.DiGraph()
    for node in data["nodes"]:
        node_id = str(node["node_id"])
        kind = _KINDS.get(node.get("feature_type"))
        if kind is None:
            raise fail(f"{where}: node {node_id!r} has an unknown feature_type {node.get('feature_type')!r}")
        position = node.get("ctx_idx")
        if not isinstance(position, int) or position < 0:
            raise fail(f"{where}: node {node_id!r} has no token position (ctx_idx)")
        attrs: dict[str, Any] = {
            "kind": kind,
            "layer": -1,
            "feature": None,
            "head": None,
            "position": position,
            "token": tokens[position] if position < len(tokens) else "",
            "activation": node.get("activation"),
            "influence": node.get("influence"),
            "clerp": node.get("clerp") or "",
        }
        if kind in ("feature", "error"):
            attrs["layer"] = int(node["layer"])
        if kind == "feature":
            match = _FEATURE_ID.match(node_id)
            attrs["feature"] = int(match.group(2)) if match else _unpaired(node.get("feature"), attrs["layer"], where)
        if kind == "target":
            attrs.update(layer=n_layers, target_kind="logit", target_token=node.get("feature"))
            attrs["is_target_logit"] = bool(node.get("is_target_logit"))
            attrs["token_prob"] = node.get("token_prob")
        graph.add_node(node_id, **attrs)
    for link in data["links"]:
        if not isinstance(link, dict) or link.get("source") not in graph or link.get("target") not in graph:
            raise fail(f"{where}: a link joins nodes the file does not list ({str(link)[:120]})")
        weight = link.get("weight")
        if not isinstance(weight, (int, float)):
            raise fail(f"{where}: a link's weight is not a number ({str(link)[:120]})")
        graph.add_edge(str(link["source"]), str(link["target"]), weight=float(weight))
    params = data.get("qParams") if isinstance(data.get("qParams"), dict) else {}
    pinned = [str(n) for n in params.get("pinnedIds") or [] if str(n) in graph]
    supernodes = [  # Neuronpedia's [name, member, ...] lists, as tc view saves them: {name, members}
        {"name": str(group[0]), "members": [str(n) for n in group[1:] if str(n) in graph]}
        for group in params.get("supernodes") or []
        if isinstance(group, list) and len(group) > 1
    ]
    graph.graph["metadata"] = {
        "source_format": "neuronpedia",
        "pinned": pinned,
        "supernodes": [s for s in supernodes if s["members"]],
        "tokens": tokens,
        "prompt": meta.get("prompt"),
        "scan": meta.get("scan"),
        "slug": meta.get("slug"),
        "n_layers": n_layers,
        **({"tc": meta["tc"]} if isinstance(meta.get("tc"), dict) else {}),
    }
    return graph


GRAPH_WHAT = "a graph (JSON from tc graph / tc circuit, or a Neuronpedia graph)"


def read_any_graph(path: str | Path) -> nx.DiGraph:
    """A tc graph JSON (tc graph, tc circuit) or a Neuronpedia / circuit-tracer graph JSON; `-` reads
    either from stdin."""
    from tccli.circuit.files import read_graph

    if inputs.is_stdin(path):
        text = inputs.read_stdin(GRAPH_WHAT, (GRAPH_FORMAT, inputs.NEURONPEDIA)).decode("utf-8")
        return _parse(text, "stdin")
    path = Path(path)
    if path.is_dir() or not path.is_file():
        return read_graph(path)  # its one-line refusals of folders and missing files
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise fail(f"{path} is not a graph (not even text: JSON from tc graph, tc circuit or Neuronpedia)") from None
    return _parse(text, str(path))


def _parse(text: str, where: str) -> nx.DiGraph:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(f"{where} is not JSON: {exc}") from None
    if isinstance(data, dict) and data.get("format") == GRAPH_FORMAT:
        return from_json(text, where)
    if is_neuronpedia(data):
        return from_neuronpedia(data, where)
    raise fail(
        f"{where} is not a tc circuit graph nor a Neuronpedia graph "
        f"(JSON written by tc graph / tc circuit --format json, or circuit-tracer)"
    )
