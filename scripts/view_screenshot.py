"""A screenshot of the `tc view` page of a graph, as headless Chromium draws it (docs/images/view.png).

    .venv/bin/python scripts/view_screenshot.py GRAPH.json [--features FEATURES] [--select NODE_ID]
        [--out docs/images/view.png] [--size 1600x1000] [--zoom 2]

Runs `tc view` into a temporary page and opens it with `chromium --headless --screenshot`, the page's
`#select=NODE_ID&zoom=2` clicking a node on opening (its edges and card show; default the feature node
with the largest |influence|, or |path_contribution|) and showing it twice as close as the whole graph.
Needs Debian's chromium (apt-get install -y chromium).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]


def strongest_feature(graph_path: Path) -> str | None:
    from tccli.view.graph_files import read_any_graph

    graph = read_any_graph(graph_path)
    features = [(n, a) for n, a in graph.nodes(data=True) if a.get("kind") == "feature"]
    if not features:
        return None
    return max(features, key=lambda f: abs(f[1].get("influence") or f[1].get("path_contribution") or 0.0))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graph")
    parser.add_argument("--features")
    parser.add_argument("--select", help="the node clicked on opening (default: the strongest feature)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "images" / "view.png"))
    parser.add_argument("--size", default="1600x1000")
    parser.add_argument("--zoom", type=float, default=2.0, help="this much closer than the whole graph, on the node")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium is not installed (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as folder:
        page = Path(folder) / "view.html"
        command = [sys.executable, "-m", "tccli", "view", args.graph, "--out", str(page)]
        subprocess.run(command + (["--features", args.features] if args.features else []), check=True)
        select = args.select or strongest_feature(Path(args.graph))
        url = page.as_uri() + f"#zoom={args.zoom:g}" + (f"&select={quote(select, safe='')}" if select else "")
        out = Path(args.out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={folder}/profile", f"--screenshot={out}", f"--window-size={args.size.replace('x', ',')}",
             "--virtual-time-budget=3000", url],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    if not out.is_file() or out.stat().st_size == 0:
        sys.exit("chromium wrote no screenshot")
    print(out)


if __name__ == "__main__":
    main()
