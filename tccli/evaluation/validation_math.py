"""The figures of `tc validate` as pure functions (docs/method.md section 10): necessity and sufficiency of a
circuit, rank correlations between predicted and measured effects, the nodes where they disagree most,
and random circuits of the same size and layers as a baseline. Pure math."""

from __future__ import annotations

import math
import random as random_module
from collections.abc import Sequence

from tccli.errors import fail
from tccli.nodes import NodeRef


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing the average of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    n = len(x)
    if n < 2:
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's of average ranks); NaN for fewer than 2 points or a constant."""
    if len(x) != len(y):
        raise ValueError("spearman: x and y differ in length")
    return pearson(average_ranks(list(x)), average_ranks(list(y)))


def necessity(clean: Sequence[float], ablated: Sequence[float]) -> float:
    """1 - mean(T with the circuit ablated) / mean(T0)."""
    total = sum(clean)
    return 1.0 - sum(ablated) / total if total else float("nan")


def sufficiency(clean: Sequence[float], kept: Sequence[float]) -> float:
    """mean(T with only the circuit's features kept) / mean(T0)."""
    total = sum(clean)
    return sum(kept) / total if total else float("nan")


def largest_disagreements(
    ids: Sequence[str], predicted: Sequence[float], measured: Sequence[float], top: int
) -> list[dict]:
    """The ``top`` nodes with the largest |measured - predicted|, largest first."""
    rows = [{"id": i, "predicted": p, "measured": m, "difference": m - p} for i, p, m in zip(ids, predicted, measured)]
    rows.sort(key=lambda row: -abs(row["difference"]))
    return rows[:top]


def sample_random_circuit(
    circuit: Sequence[NodeRef],
    active: dict[tuple[int, int], list[int]],
    n_heads: int,
    sources: Sequence[int],
    rng: random_module.Random,
) -> list[NodeRef]:
    """A random circuit of the same size and layers as ``circuit``.

    Each feature node (layer l, position p) is replaced by a feature active at (l, p) (``active``:
    (layer, position) -> active feature indices) that neither circuit holds; failing that, one active at
    layer l at any position; failing that, any feature index seen at layer l. Each head node of layer l
    by a (head, source) pair of layer l, sources from ``sources``, that neither holds; failing that (a graph
    with head nodes on every head and token of the layer, as tc graph --heads can give a tiny model), by
    such a pair of another layer that held head nodes.
    """
    head_layers = sorted({node.layer for node in circuit if node.kind != "feature"})
    taken = set(circuit)
    out = []
    for node in circuit:
        if node.kind == "feature":
            here = [
                NodeRef("feature", node.layer, f, node.position) for f in active.get((node.layer, node.position), [])
            ]
            anywhere = [
                NodeRef("feature", node.layer, f, p)
                for (layer, p), fs in active.items()
                if layer == node.layer
                for f in fs
            ]
            candidates = [c for c in here if c not in taken] or [c for c in anywhere if c not in taken]
        else:
            candidates = [NodeRef("head", node.layer, h, s) for h in range(n_heads) for s in sources]
            candidates = [c for c in candidates if c not in taken] or [
                c
                for layer in head_layers
                for c in (NodeRef("head", layer, h, s) for h in range(n_heads) for s in sources)
                if c not in taken
            ]
        if not candidates:
            raise fail(f"cannot draw a random stand-in for {node.id}: every candidate is taken")
        pick = rng.choice(sorted(candidates, key=lambda c: (c.index, c.position)))
        taken.add(pick)
        out.append(pick)
    return out
