"""Greedy beam path search over exact direct attributions (docs/method.md section 5, Algorithms 1 and 2).

Pure: a FrozenForward and a Target in, a networkx DiGraph out.

A path starts at the target and walks upstream; each step's contribution is the direct contribution of
the new node to the previous node's vector, which equals the path's attribution (the product of the
input-invariant weights along it times the first node's activation). Every iteration extends every
path in the beam by its ``branches`` best upstream candidates (transcoder features of earlier layers
at the same token (a cross-layer transcoder's feature: through its writes to every MLP output between it
and the path's vector, summed; docs/method.md section 11), the skip connections of earlier skip
transcoders at the same token (``skip8@5``: the
linear term x W_skip, continued upstream through the norm like an OV circuit), (attention head, source
token) pairs, token and position embeddings), then keeps the
``branches`` extended paths whose last contribution is largest. No capping is applied.

Graph (Algorithm 2): the union of all paths the beams held; an edge upstream -> downstream carries the
sum of the contributions of the distinct path prefixes ending in that edge (each prefix counted once).
For every node that was expanded, its per-layer transcoder error terms are added as ``err{L}@{t}``
nodes, so what the transcoders do not explain stays visible.

Each node carries two figures (the attribute names ``tccli.circuit.files`` documents):
- ``path_contribution``: the sum, over the distinct paths the search found from this node to the
  target, of each path's attribution (the sum of the node's out-edge weights). It depends on which
  paths the beam kept, and counts a node that feeds the target through several others several times.
- ``direct_contribution``: the node's own direct contribution to the target, the term it adds to the
  target's value through the residual stream alone (zero for a component at another token than the
  target's, which reaches it only through attention). Exact and independent of the search: the
  direct contributions of all components plus the biases and the target's constant sum to its value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import networkx as nx
import torch

from tccli.nodes import NodeRef
from tccli.replacement import attribution
from tccli.replacement.attribution import Rows
from tccli.replacement.frozen import FrozenForward
from tccli.replacement.targets import Target

TERMINAL_KINDS = ("embed", "pos", "error")


@dataclass
class SearchParams:
    iters: int = 3
    branches: int = 15
    min_contribution: float = 0.0
    both_signs: bool = False
    include_bos: bool = False


@dataclass
class Path:
    nodes: tuple  # NodeRef, target first
    contributions: tuple  # contribution of each node along the path (target: its value)
    vector: Optional[torch.Tensor]  # the last node's vector upstream (None: terminal)
    position: int
    read_point: tuple[int, int]

    @property
    def expandable(self) -> bool:
        return self.vector is not None and self.nodes[-1].kind not in TERMINAL_KINDS


@dataclass
class SearchResult:
    paths: list[Path]  # every path any beam held, target first
    errors: dict = field(default_factory=dict)  # node-path prefix -> {layer: error contribution}


def _candidates(frozen: FrozenForward, rows: Rows):
    """All direct contributions of the rows, flattened: (scores [P, N], decode(n) -> (kind, layer,
    index, source or -1 for the row's own token))."""
    blocks, segments = [], []
    max_mlp = int(rows.n_mlp.max())
    max_attn = int(rows.n_attn.max())
    for layer in range(max_mlp):
        if frozen.layers[layer].transcoder is None:
            continue
        indices, contributions = attribution.feature_contributions(frozen, rows, layer)
        blocks.append(contributions)
        segments.append(("feature", layer, indices, None))
        if frozen.layers[layer].skip_out is not None:  # a skip transcoder's linear path: one node per token
            blocks.append(attribution.skip_contributions(frozen, rows, layer).unsqueeze(1))
            segments.append(("skip", layer, None, None))
    T = frozen.n_tokens
    for layer in range(max_attn):
        heads = attribution.head_contributions(frozen, rows, layer)  # [P, H, T]
        blocks.append(heads.reshape(len(rows), -1))
        segments.append(("head", layer, heads.shape[1], T))
    embed, pos = attribution.embed_contributions(frozen, rows)
    blocks.append(embed.unsqueeze(1))
    segments.append(("embed", -1, None, None))
    if pos is not None:
        blocks.append(pos.unsqueeze(1))
        segments.append(("pos", -1, None, None))
    offsets, total = [], 0
    for block in blocks:
        offsets.append(total)
        total += block.shape[1]

    def decode(n: int) -> tuple[str, int, int, int]:
        k = max(i for i, start in enumerate(offsets) if start <= n)
        kind, layer, extra, T_ = segments[k]
        local = n - offsets[k]
        if kind == "feature":
            return kind, layer, int(extra[local]), -1
        if kind == "head":
            return kind, layer, local // T_, local % T_
        if kind == "skip":
            return kind, layer, -1, -1
        return kind, -1, -1, -1

    source_positions = []  # for BOS exclusion: the token each candidate is read from
    for block, (kind, _layer, extra, T_) in zip(blocks, segments):
        if kind == "head":
            source_positions.append(
                torch.arange(T_, device=block.device).repeat(extra).unsqueeze(0).expand(len(rows), -1)
            )
        else:
            source_positions.append(rows.positions.unsqueeze(1).expand(-1, block.shape[1]))
    return torch.cat(blocks, dim=1), torch.cat(source_positions, dim=1), decode


def _extend(
    frozen: FrozenForward, path: Path, kind: str, layer: int, index: int, source: int, contribution: float
) -> Path:
    t = path.position
    if kind == "feature":
        # the feature's writes to every MLP output the path's vector reads after (one for a per-layer
        # transcoder; each later layer's for a cross-layer one: docs/method.md section 11), through the output map
        coefficient = attribution.feature_coefficient(frozen, layer, index, t, path.vector, path.read_point[1])
        vector, read_point, _ = attribution.feature_upstream(frozen, layer, index, t, coefficient)
        key, position = NodeRef("feature", layer, index, t), t
    elif kind == "head":
        vector, read_point = attribution.head_upstream(frozen, layer, index, source, t, path.vector)
        key, position = NodeRef("head", layer, index, source), source
    elif kind == "skip":
        vector, read_point, _ = attribution.skip_upstream(frozen, layer, t, path.vector)
        key, position = NodeRef("skip", layer, -1, t), t
    else:
        vector, read_point, key, position = None, (0, 0), NodeRef(kind, -1, -1, t), t
    return Path(
        nodes=path.nodes + (key,),
        contributions=path.contributions + (contribution,),
        vector=vector,
        position=position,
        read_point=read_point,
    )


def greedy_search(frozen: FrozenForward, target: Target, params: SearchParams) -> SearchResult:
    """The paper's Algorithm 1 (beam over paths); returns every path the beams held."""
    start = Path(
        nodes=(NodeRef("target", position=target.position),),
        contributions=(target.value,),
        vector=target.vector,
        position=target.position,
        read_point=target.read_point,
    )
    beam, found, errors = [start], [], {}
    for _ in range(params.iters):
        expandable = [p for p in beam if p.expandable]
        if not expandable:
            break
        rows = Rows(
            vectors=torch.stack([p.vector for p in expandable]),
            positions=torch.tensor([p.position for p in expandable]),
            n_attn=torch.tensor([p.read_point[0] for p in expandable]),
            n_mlp=torch.tensor([p.read_point[1] for p in expandable]),
        )
        for layer in range(int(rows.n_mlp.max())):
            per_row = attribution.error_contributions(frozen, rows, layer)
            for p, value in zip(expandable, per_row.tolist()):
                if layer < p.read_point[1]:
                    errors.setdefault(p.nodes, {})[layer] = value
        scores, sources, decode = _candidates(frozen, rows)
        ranked = scores.abs() if params.both_signs else scores.clone()
        excluded = ranked <= max(params.min_contribution, 0.0)
        if not params.include_bos:
            excluded |= sources == 0
        ranked[excluded] = float("-inf")
        k = min(params.branches, ranked.shape[1])
        top_scores, top_index = ranked.topk(k, dim=1)
        extended = []
        for p, path in enumerate(expandable):
            for score, n in zip(top_scores[p].tolist(), top_index[p].tolist()):
                if score == float("-inf"):
                    break
                kind, layer, index, source = decode(n)
                extended.append((score, _extend(frozen, path, kind, layer, index, source, float(scores[p, n]))))
        extended.sort(key=lambda item: -item[0])
        beam = [path for _, path in extended[: params.branches]]
        found.extend(beam)
    return SearchResult(paths=found, errors=errors)


# ----------------------------------------------------------------------------- graph


def _node_attributes(
    frozen: FrozenForward,
    key: NodeRef,
    tokens: list[str],
    direct: attribution.DirectContributions,
    target_position: int,
) -> dict:
    attrs = {
        "kind": key.kind,
        "layer": key.layer,
        "feature": None,
        "head": None,
        "position": key.position,
        "token": tokens[key.position] if 0 <= key.position < len(tokens) else "",
        "activation": None,
        "path_contribution": 0.0,
        "direct_contribution": _direct_to_target(key, direct, target_position),
    }
    if key.kind == "feature":
        attrs["feature"] = key.index
        attrs["activation"] = float(frozen.layers[key.layer].z[key.position, key.index])
    elif key.kind == "head":
        attrs["head"] = key.index
    elif key.kind in ("embed", "pos"):
        attrs["token_id"] = int(frozen.tokens[key.position])
    return attrs


def _direct_to_target(key: NodeRef, direct: attribution.DirectContributions, target_position: int) -> Optional[float]:
    """``key``'s term in the target's direct decomposition (None for the target itself)."""
    if key.kind == "target":
        return None
    if key.kind == "head":  # the head reading token key.position, written into the target's token
        heads = direct.heads.get(key.layer)
        return 0.0 if heads is None else float(heads[key.index, key.position])
    if key.position != target_position:
        return 0.0
    if key.kind == "feature":
        features = direct.features.get(key.layer)
        return 0.0 if features is None else float(features[key.index])
    if key.kind == "error":
        error = direct.errors.get(key.layer)
        return 0.0 if error is None else float(error)
    if key.kind == "skip":
        skip = direct.skips.get(key.layer)
        return 0.0 if skip is None else float(skip)
    if key.kind == "embed":
        return float(direct.embed)
    if key.kind == "pos":
        return 0.0 if direct.pos_embed is None else float(direct.pos_embed)
    raise ValueError(f"unknown node kind {key.kind!r}")


def paths_to_graph(
    frozen: FrozenForward, target: Target, result: SearchResult, tokens: list[str], min_contribution: float = 0.0
) -> nx.DiGraph:
    """Merge the paths into one DiGraph (Algorithm 2: each distinct path prefix counted once)."""
    graph = nx.DiGraph()
    direct = attribution.direct_contributions(frozen, target.vector, target.position, target.read_point)
    root = NodeRef("target", position=target.position)
    graph.add_node(root.id, **_node_attributes(frozen, root, tokens, direct, target.position))
    graph.nodes[root.id].update(
        activation=target.value,
        path_contribution=None,
        layer=target.description.get("layer", frozen.n_layers),
        constant=target.constant,
        **{f"target_{k}": v for k, v in target.description.items() if k != "layer"},
    )
    seen = set()

    def add_edge(upstream: NodeRef, downstream: NodeRef, contribution: float) -> None:
        if upstream.id not in graph:
            graph.add_node(upstream.id, **_node_attributes(frozen, upstream, tokens, direct, target.position))
        graph.nodes[upstream.id]["path_contribution"] += contribution
        if graph.has_edge(upstream.id, downstream.id):
            graph.edges[upstream.id, downstream.id]["weight"] += contribution
        else:
            graph.add_edge(upstream.id, downstream.id, weight=contribution)

    for path in result.paths:
        for k in range(2, len(path.nodes) + 1):
            prefix = path.nodes[:k]
            if prefix in seen:
                continue
            seen.add(prefix)
            add_edge(prefix[-1], prefix[-2], path.contributions[k - 1])
    for prefix, per_layer in result.errors.items():
        if prefix[-1].id not in graph:
            continue
        position = prefix[-1].position
        for layer, value in per_layer.items():
            if value != 0.0 and abs(value) >= min_contribution:
                add_edge(NodeRef("error", layer, -1, position), prefix[-1], value)
    return graph


def explained(graph: nx.DiGraph) -> tuple[float, float]:
    """(sum of the target's direct in-graph contributions other than errors, total error into it)."""
    into = graph.in_edges("target", data="weight")
    kept = sum(w for u, _, w in into if graph.nodes[u]["kind"] != "error")
    error = sum(w for u, _, w in into if graph.nodes[u]["kind"] == "error")
    return float(kept), float(error)
