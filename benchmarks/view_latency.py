"""Seconds until a `tc view` page of a large graph is open and drawn in headless Chromium.

A synthetic attribution graph (default 5,000 nodes, 50,000 edges: 12 layers x 20 tokens, an embedding per
token, an error node per layer and token, features for the rest, one logit target; every edge runs from a
lower row to a higher one, weights heavy-tailed) is written as `tc view` writes a page (tc's node
conventions, so the page is the one a user gets). Chromium (the system's, through Playwright's
executable_path; nothing is downloaded) opens it from disk; the time runs from the navigation's start to
the end of the first animation frame after the page's script says it is ready (nodes placed, edges drawn
on the canvas). Then the threshold slider is moved to 0 (every edge drawn) and the redraw timed, and
a zoom step (a wheel event) is timed inside the page, to the frame after it is drawn, at the initial
threshold and with every edge shown (while the view moves the page draws the 4,000 strongest edges).

    .venv/bin/python benchmarks/view_latency.py [--nodes 5000] [--edges 50000] [--repeats 3] [--chromium PATH]

Prints one line per figure; the goal is an open page in under 3 s.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

import networkx as nx

N_LAYERS = 12
N_TOKENS = 20


def synthetic_graph(n_nodes: int = 5000, n_edges: int = 50000, seed: int = 0) -> nx.DiGraph:
    """An attribution-graph-shaped graph with tc's node ids and attributes (tccli.circuit.files)."""
    rng = random.Random(seed)
    graph = nx.DiGraph()
    tokens = ["<bos>"] + [f" w{i}" for i in range(1, N_TOKENS)]
    rows: dict[int, list[str]] = {}  # row (0 embeddings, 1 + layer, N_LAYERS + 1 target) -> nodes

    def add(node: str, row: int, **attrs) -> None:
        graph.add_node(node, token=tokens[attrs["position"]], head=None, **attrs)
        rows.setdefault(row, []).append(node)

    for position in range(N_TOKENS):
        add(f"embed@{position}", 0, kind="embed", layer=-1, feature=None, position=position, activation=None)
        for layer in range(N_LAYERS):
            add(f"err{layer}@{position}", 1 + layer, kind="error", layer=layer, feature=None, position=position,
                activation=None)  # fmt: skip
    add(
        "target",
        N_LAYERS + 1,
        kind="target",
        layer=N_LAYERS,
        feature=None,
        position=N_TOKENS - 1,
        activation=10.0,
        target_kind="logit",
        target_token=7,
        target_token_string=" w7",
    )
    while graph.number_of_nodes() < n_nodes:
        layer, position, feature = rng.randrange(N_LAYERS), rng.randrange(N_TOKENS), rng.randrange(16384)
        node = f"mlp{layer}.f{feature}@{position}"
        if node not in graph:
            add(node, 1 + layer, kind="feature", layer=layer, feature=feature, position=position,
                activation=rng.expovariate(1.0), influence=rng.random())  # fmt: skip
    ordered = sorted(rows)
    edges: dict[tuple[str, str], float] = {}  # counted here: networkx's number_of_edges() walks every node
    while len(edges) < n_edges:
        low, high = sorted(rng.sample(ordered, 2))
        source, target = rng.choice(rows[low]), rng.choice(rows[high])
        if graph.nodes[target]["position"] >= graph.nodes[source]["position"]:
            edges[source, target] = rng.choice((-1, 1)) * rng.paretovariate(1.5) * 0.01
    graph.add_weighted_edges_from((u, v, w) for (u, v), w in edges.items())
    graph.graph["metadata"] = {"kind": "attribution-graph", "tokens": tokens, "prompt": "".join(tokens[1:]),
                               "n_layers": N_LAYERS}  # fmt: skip
    return graph


ZOOM_FRAME = """() => new Promise((done) => {
  const start = performance.now(), stage = document.getElementById("stage");
  const wheel = {deltaY: -60, clientX: 500, clientY: 400, bubbles: true, cancelable: true};
  stage.dispatchEvent(new WheelEvent("wheel", wheel));
  requestAnimationFrame(() => requestAnimationFrame(() => done(performance.now() - start)));
})"""


def zoom_frame_ms(page, steps: int = 5) -> float:
    """Milliseconds from a wheel event to the frame after it is drawn (the median of ``steps``), measured
    inside the page: no Playwright round trip in it."""
    times = sorted(page.evaluate(ZOOM_FRAME) for _ in range(steps))
    return times[len(times) // 2]


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--edges", type=int, default=50000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chromium", default=find_chromium())
    args = parser.parse_args()
    if not args.chromium:
        raise SystemExit("chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    from tccli.view.page import render_page

    graph = synthetic_graph(args.nodes, args.edges)
    start = time.perf_counter()
    page_text = render_page(graph, title="synthetic")
    built = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "view.html"
        path.write_text(page_text, encoding="utf-8")
        print(f"graph: {graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges")
        print(f"tc view (Python) builds the page: {built:.2f} s, {path.stat().st_size / 1e6:.1f} MB")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium)
            for repeat in range(args.repeats):
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                start = time.perf_counter()
                page.goto(path.as_uri())
                page.wait_for_selector("body[data-ready='1']", state="attached", timeout=60000)
                page.evaluate("() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")
                opened = time.perf_counter() - start
                count = page.locator("[data-node-id]").count()
                initial = page.input_value("#threshold")
                zoom_initial = zoom_frame_ms(page)
                page.click("#fit")
                start = time.perf_counter()
                page.fill("#threshold", "0")
                page.evaluate("() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")
                every_edge = time.perf_counter() - start
                drawn = page.get_attribute("#edge-count", "data-visible")
                zoom_every = zoom_frame_ms(page)
                page.fill("#threshold", initial)
                print(
                    f"run {repeat + 1}: page open and drawn in {opened:.2f} s ({count} node elements); "
                    f"threshold to 0, all {drawn} edges drawn in {every_edge:.2f} s; a zoom step's frame "
                    f"{zoom_initial:.0f} ms at the initial threshold, {zoom_every:.0f} ms with every edge shown"
                )
                page.close()
            browser.close()


if __name__ == "__main__":
    main()
