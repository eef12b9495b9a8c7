"""How circuit-tracer's local viewer and Neuronpedia read graph and feature files, written out again here
(not imported from tccli) so that tests check tc's files against the readers' own rules:

- ``cantor_pair`` / ``viewer_unpair``: a feature node's ``feature`` is the Cantor pairing of (layer,
  index); the viewers decode it as circuit-tracer's ``util.js`` ``cantorUnpair`` and Neuronpedia's
  ``getLayerFromCantorValue`` / ``getIndexFromCantorValue`` do, in JavaScript's float arithmetic.
- ``feature_lookups``: what ``formatData`` (``attribution_graph/util-cg.js``) keeps per transcoder node:
  ``featureIndex = feature``, which ``init-cg-feature-detail.js`` hands to ``loadFeature``.
- ``feature_url``: ``loadFeature``'s address for a feature file: ``{scan}/{feature}.json`` for a scan
  beginning with ``./``, else ``./features/{scan}/{feature}.json``.
- ``served_file``: where circuit-tracer's local server (``local_server.py``) finds an address: ``/data/``
  and ``/graph_data/`` in its graph folder; ``./features/`` is taken as the folder's ``features/`` (the
  layout a scan's files are published in).
- ``listed_graphs``: ``index.html`` reads ``./data/graph-metadata.json`` ``{"graphs": [...]}`` and loads
  each listed slug from ``./graph_data/{slug}.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def cantor_pair(layer: int, index: int) -> int:
    return (layer + index) * (layer + index + 1) // 2 + index


def viewer_unpair(z: float) -> tuple[int, int]:
    w = math.floor((math.sqrt(8 * z + 1) - 1) / 2)
    t = (w * w + w) / 2
    index = z - t
    layer = w - index
    return int(layer), int(index)


def feature_lookups(document: dict) -> list[tuple[dict, int]]:
    """(node, featureIndex) for every transcoder feature node, as formatData leaves them."""
    return [(node, node["feature"]) for node in document["nodes"] if node["feature_type"] == "cross layer transcoder"]


def node_feature(node: dict) -> tuple[int, int]:
    """(layer, index) a transcoder node's id ``{layer}_{index}_{pos}`` names."""
    layer, index, _ = node["node_id"].split("_")
    return int(layer), int(index)


def feature_url(scan: str, feature: int) -> str:
    if scan.startswith("./"):
        return f"{scan}/{feature}.json"
    return f"./features/{scan}/{feature}.json"


def served_file(folder: Path, url: str) -> Path:
    for prefix in ("./data/", "./graph_data/"):
        if url.startswith(prefix):
            return folder.joinpath(*[p for p in url[len(prefix) :].split("/") if p])
    assert url.startswith("./features/"), url
    return folder.joinpath(*[p for p in url[2:].split("/") if p])


def listed_graphs(folder: Path) -> dict[str, dict]:
    """slug -> the graph file the viewer opens for that entry of graph-metadata.json."""
    listing = json.loads(served_file(folder, "./data/graph-metadata.json").read_text())
    return {
        entry["slug"]: json.loads(served_file(folder, f"./graph_data/{entry['slug']}.json").read_text())
        for entry in listing["graphs"]
    }
