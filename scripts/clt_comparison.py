"""The table of examples/clt.sh: a cross-layer transcoder against a per-layer set on the same model.

    python scripts/clt_comparison.py OUT

reads OUT/eval_per_layer.json and OUT/eval_clt.json (`tc eval --json`) and OUT/graphs/{per_layer,clt}_N.json
(`tc graph` on the same prompts) and prints, for each, the per-layer FVU and CE loss recovered (zero
ablation), the same with every MLP replaced at once, and over the prompts the mean replacement score,
completeness score and number of feature nodes kept (with the prompts on which the CLT's replacement score
is the higher).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import mean

KINDS = (("per_layer", "per-layer set"), ("clt", "cross-layer transcoder"))


def graph_figures(folder: Path, name: str) -> list[dict]:
    files = sorted(folder.glob(f"{name}_*.json"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    out = []
    for file in files:
        meta = json.loads(file.read_text())["graph"]["metadata"]
        out.append(
            {
                "replacement": meta["replacement_score"],
                "completeness": meta["completeness_score"],
                "kept": meta["kept_features"],
                "active": meta["active_features"],
            }
        )
    return out


def main(out: Path) -> None:
    evals = {name: json.loads((out / f"eval_{name}.json").read_text()) for name, _ in KINDS}
    graphs = {name: graph_figures(out / "graphs", name) for name, _ in KINDS}
    layers = [row["layer"] for row in evals["per_layer"]["layers"]]
    print("| | " + " | ".join(label for _, label in KINDS) + " |")
    print("|---|" + "---|" * len(KINDS))
    for i, layer in enumerate(layers):
        cells = [
            f"{evals[n]['layers'][i]['fvu']:.3f} / {evals[n]['layers'][i]['recovered_zero']:.3f}" for n, _ in KINDS
        ]
        print(f"| layer {layer}: FVU / CE recovered | " + " | ".join(cells) + " |")
    cells = [f"{evals[n]['all_layers']['recovered_zero']:.3f}" for n, _ in KINDS]
    print("| every MLP replaced at once: CE recovered | " + " | ".join(cells) + " |")
    cells = [f"{mean(row['l0'] for row in evals[n]['layers']):.1f}" for n, _ in KINDS]
    print("| mean L0 per layer | " + " | ".join(cells) + " |")
    for key, label in (("replacement", "replacement score"), ("completeness", "completeness score")):
        cells = [f"{mean(g[key] for g in graphs[n]):.3f}" for n, _ in KINDS]
        print(f"| mean {label} ({len(graphs['clt'])} prompts) | " + " | ".join(cells) + " |")
    cells = [
        f"{mean(g['kept'] for g in graphs[n]):.1f} of {mean(g['active'] for g in graphs[n]):.0f}" for n, _ in KINDS
    ]
    print("| mean feature nodes kept, of active | " + " | ".join(cells) + " |")
    higher = sum(c["replacement"] > p["replacement"] for c, p in zip(graphs["clt"], graphs["per_layer"]))
    print(f"\nThe CLT's replacement score is the higher on {higher} of {len(graphs['clt'])} prompts.")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/clt_comparison.py OUT")
    main(Path(sys.argv[1]))
