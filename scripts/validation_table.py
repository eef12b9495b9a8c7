#!/usr/bin/env python3
"""One table from several `tc validate --json` results: a column per result file.

    python3 scripts/validation_table.py demo-out/validate_greater_than_free_zero.json ... [--nodes N]

The README's "Validating circuits" figures are this table, printed for the files examples/validate.sh
writes (scripts/readme_figures.py regenerates them). Rows: the probability difference (greater-than
task only), the target's necessity and sufficiency, the per-node Spearman correlations, each against the
random circuits (mean [min, max]); then, per file, the `--nodes` nodes whose measured ablation effect is
farthest from the graph's prediction, with the unpruned local replacement model's prediction beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LABEL = 30  # width of the row labels
COLUMN = 24  # width of each result's column (the widest cell, "-0.414 [-0.471,-0.368]", and two spaces)


def number(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.3f}"


def with_random(result: dict, key: str) -> tuple[str, str]:
    """(the circuit's figure, the random circuits' mean [min, max]) for ``key``."""
    base = result["random"]["summary"].get(key)
    spread = f"{number(base['mean'])} [{number(base['min'])},{number(base['max'])}]" if base else "n/a"
    return number(result["circuit"].get(key)), spread


def heading(result: dict) -> str:
    return f"{result['mode']}, {result['ablation']}"


def table(results: list[dict], nodes: int) -> list[str]:
    first = results[0]
    size = first["circuit_size"]
    lines = [
        f"{first['graph']}: {size['feature']} features and {size['head']} head terms, over "
        f"{first['prompts']} prompt(s) ({first['prompt_source']}); target {target_name(first)}; "
        f"{first['random']['draws']} random circuits of equal size and layers, mean [min,max]"
    ]

    def row(label: str, cells: list[str]) -> None:
        lines.append(f"{label:<{LABEL}}" + "".join(f"{cell:>{COLUMN}}" for cell in cells).rstrip())

    row("", [heading(r) for r in results])
    if all("metric" in r for r in results):
        row("probability difference, clean", [number(r["metric"]["clean"]) for r in results])
        for key, label in (("metric_ablated", "circuit ablated"), ("metric_kept", "only the circuit kept")):
            pairs = [with_random(r, key) for r in results]
            row(f"  {label}", [p[0] for p in pairs])
            row("    random circuits", [p[1] for p in pairs])
    row("target, clean", [number(r["target_clean"]) for r in results])
    for key, label in (("necessity", "necessity (circuit ablated)"), ("sufficiency", "sufficiency (only it kept)")):
        pairs = [with_random(r, key) for r in results]
        row(f"  {label}", [p[0] for p in pairs])
        row("    random circuits", [p[1] for p in pairs])
    row("per-node Spearman, graph", [number(r["circuit"]["spearman_graph"]) for r in results])
    pairs = [with_random(r, "spearman_total") for r in results]
    row("per-node Spearman, unpruned", [p[0] for p in pairs])
    row("    random circuits", [p[1] for p in pairs])
    for r in results:
        if r["circuit"].get("nodes_dropped"):
            lines.append(
                f"{heading(r)}: {r['circuit']['nodes_dropped']} node-prompt pairs fell before a "
                f"prompt's start and were left out"
            )
    if nodes:
        for r in results:
            lines.append(
                f"{heading(r)}: single-node ablations farthest from the graph's prediction "
                f"(graph / unpruned total / measured):"
            )
            by_id = {n["id"]: n for n in r["circuit"]["nodes"]}
            for d in r["circuit"]["disagreements"][:nodes]:
                total = by_id[d["id"]]["predicted_total"]
                lines.append(f"  {d['id']:<16} {d['predicted']:+.3f} / {total:+.3f} / {d['measured']:+.3f}")
    return lines


def target_name(result: dict) -> str:
    target = result.get("target") or {}
    kind = target.get("kind")
    if kind == "logit_diff":
        return f"logit({json.dumps(target.get('token_string'))}) - logit({json.dumps(target.get('token_b_string'))})"
    if kind == "logit":
        return f"logit({json.dumps(target.get('token_string'))})"
    return str(kind)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="`tc validate --json` outputs, one column each")
    parser.add_argument("--nodes", type=int, default=3, help="largest disagreements listed per file")
    args = parser.parse_args(argv)
    results = []
    for path in args.results:
        try:
            results.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            print(f"validation_table: cannot read {path}: {exc}", file=sys.stderr)
            return 1
    print("\n".join(table(results, args.nodes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
