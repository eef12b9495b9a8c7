"""A screenshot of the `tc serve` page after a typed prompt's graph and one ablation (docs/images/serve.png).

    .venv/bin/python scripts/serve_screenshot.py --transcoders TCS [--features FEATURES] [--model M]
        [--prompt TEXT] [--logit-diff A B] [--out docs/images/serve.png] [--size 1600x1000]

Starts `tc serve` on a free loopback port, opens its page in headless Chromium (Playwright driving Debian's
chromium: no browser download), types the prompt and target into the page, waits for the graph, clicks the
feature with the strongest edge into the target, ablates it from the page, pins it with its strongest input
and validates them, and saves the page as it then looks. Needs chromium (apt-get install -y chromium) and
playwright (pip install playwright).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVING = "tc serve: serving "


def strongest_into(graph: dict, target: str, kind: str = "feature") -> str | None:
    kinds = {node["id"]: node["kind"] for node in graph["nodes"]}
    edges = [link for link in graph["links"] if link["target"] == target and kinds[link["source"]] == kind]
    return max(edges, key=lambda link: abs(link["weight"]))["source"] if edges else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transcoders", required=True)
    parser.add_argument("--features")
    parser.add_argument("--model")
    parser.add_argument("--prompt", default="The war lasted from the year 1735 to the year 17")
    parser.add_argument("--logit-diff", nargs=2, default=["40", "20"], metavar=("A", "B"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "images" / "serve.png"))
    parser.add_argument("--size", default="1600x1000")
    args = parser.parse_args()
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        sys.exit("chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    command = [sys.executable, "-m", "tccli", "serve", "--transcoders", args.transcoders, "--port", "0"]
    command += ["--device", "cpu"] + (["--features", args.features] if args.features else [])
    command += ["--model", args.model] if args.model else []
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        for line in server.stderr:
            if line.startswith(SERVING):
                url = line[len(SERVING) :].split()[0]
                break
            print(line, end="", file=sys.stderr)
        else:
            sys.exit("tc serve did not start")
        width, height = (int(v) for v in args.size.split("x"))
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=browser_path)
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            page.wait_for_selector("body[data-serve-ready='1']", state="attached")
            page.fill("#serve-prompt", args.prompt)
            page.select_option("#serve-target-kind", "logit_diff")
            page.fill("#serve-target-a", args.logit_diff[0])
            page.fill("#serve-target-b", args.logit_diff[1])
            page.click("#serve-run")
            page.wait_for_url("**/graph/*", timeout=600_000)
            page.wait_for_selector("body[data-serve-ready='1']", state="attached")
            graph_id = page.url.rstrip("/").rsplit("/", 1)[1]
            with urllib.request.urlopen(f"{url}api/graphs/{graph_id}") as answer:
                graph = json.loads(answer.read())
            node = strongest_into(graph, "target")
            if node is not None:
                page.evaluate("(id) => window.tcView.select(id)", node)
                page.click("#serve-add")
                page.click("#serve-intervene")
                page.wait_for_selector("#serve-intervene-result[data-after]", state="attached", timeout=600_000)
                page.evaluate("(id) => window.tcView.pin(id)", node)
                upstream = strongest_into(graph, node)
                if upstream is not None:
                    page.evaluate("(id) => window.tcView.pin(id)", upstream)
                page.click("#serve-validate")
                page.wait_for_selector("#serve-validate-result[data-necessity]", state="attached", timeout=600_000)
                page.evaluate("(id) => window.tcView.select(id)", node)  # its card and edges in view again
                page.wait_for_timeout(1000)
            out = Path(args.out).resolve()
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(out)


if __name__ == "__main__":
    main()
