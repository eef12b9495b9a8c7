"""What an attribution graph (`tc graph --heads`, JSON) holds that the greedy circuit (`tc circuit`, JSON) on the
same prompt and target does not: the graph's scores, its features by influence (marking those the circuit
also found), the features only the graph has, per layer and token, and which heads carry the edges that
cross tokens (the per-head parts of the kept edges, summed by (layer, head) over the edges into the target's
token from each other token).

    python scripts/graph_vs_circuit.py GRAPH.json CIRCUIT.json [--top 15]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graph")
    parser.add_argument("circuit")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    graph, circuit = json.load(open(args.graph)), json.load(open(args.circuit))
    meta = graph["graph"]["metadata"]
    nodes = {n["id"]: n for n in graph["nodes"]}
    in_circuit = {n["id"] for n in circuit["nodes"]}
    print(
        f"graph: replacement {meta['replacement_score']:.3f}, completeness {meta['completeness_score']:.3f}; "
        f"{meta['kept_features']} features kept of {meta['active_features']} active; "
        f"{sum(n['kind'] == 'error' for n in nodes.values())} error nodes kept; circuit: "
        f"{sum(n['kind'] == 'feature' for n in circuit['nodes'])} features"
    )
    ranked = sorted((n for n in nodes.values() if n["kind"] in ("feature", "error")), key=lambda n: -n["influence"])
    print(f"top {args.top} features and errors by influence ('*': also in the greedy circuit):")
    for n in ranked[: args.top]:
        print(
            f"  {'*' if n['id'] in in_circuit else ' '} {n['id']:<16} {json.dumps(n['token']):<10} {n['influence']:.4f}"
        )
    only = [n for n in ranked if n["kind"] == "feature" and n["id"] not in in_circuit]
    share = sum(n["influence"] for n in only) / max(
        sum(n["influence"] for n in ranked if n["kind"] == "feature"), 1e-30
    )
    where: dict = defaultdict(int)
    for n in only:
        where[f"L{n['layer']}@{n['position']} {json.dumps(n['token'])}"] += 1
    print(
        f"features only in the graph: {len(only)} ({share:.0%} of the kept features' influence): "
        + ", ".join(f"{k} x{v}" for k, v in sorted(where.items()))
    )
    target_position = meta["targets"][0]["position"]
    by_source: dict = defaultdict(lambda: defaultdict(float))
    for link in graph["links"]:
        source, target = nodes.get(link["source"]), nodes.get(link["target"])
        if (
            "heads" not in link
            or source is None
            or target is None
            or source["position"] == target_position
            or target["position"] != target_position
        ):
            continue
        for head, part in link["heads"].items():
            by_source[(source["position"], source["token"])][head] += part
    print("heads carrying the kept edges into the target's token, by source token (top 3 each):")
    for (position, token), heads in sorted(by_source.items()):
        top = sorted(heads.items(), key=lambda kv: -abs(kv[1]))[:3]
        print(f"  from {json.dumps(token)}@{position}: " + ", ".join(f"{h} {v:+.3g}" for h, v in top))


if __name__ == "__main__":
    main()
