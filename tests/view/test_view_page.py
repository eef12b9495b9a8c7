"""tc view: the page's data (places, labels, cards, the graph itself), Neuronpedia graphs read back, the
command's refusals; and the page driven in headless Chromium (Playwright with the system chromium, never
a downloaded browser): node elements, hover, click, the threshold slider, search, pins, supernodes, and a
saved subgraph that tc validate reads."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path
from urllib.parse import quote

import networkx as nx
import pytest

from circuit_helpers import small_circuit_graph
from conftest import TOKENIZER_TEXT, run_tc
from tccli.circuit.files import read_graph
from tccli.circuit.neuronpedia import attribution_graph_to_neuronpedia, to_neuronpedia
from tccli.circuit.picture import grid_layout, reference_value
from tccli.errors import TcError
from tccli.features.files import FeaturesFile
from tccli.nodes import feature_name, neuronpedia_feature_id, quoted_token
from tccli.view.graph_files import from_neuronpedia, read_any_graph
from tccli.view.page import PIXELS_PER_INCH, feature_label, render_page, script_json

PROMPT = "The war lasted from 1735 to 17"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def made(tiny_model_dirs, random_transcoder_folder, tmp_path_factory):
    """A `tc graph` attribution graph (with head nodes) of the tiny GPT-2 with random transcoders, the
    same transcoders' features scored by `tc score`, and the `tc view` page of both."""
    root = tmp_path_factory.mktemp("view")
    model = str(tiny_model_dirs["gpt2"])
    transcoders = str(random_transcoder_folder("gpt2", bias_shift=-0.3))
    graph_path, features_path, page_path = root / "g.json", root / "features.h5", root / "page.html"
    result = run_tc(
        "graph", "--model", model, "--transcoders", transcoders, "--prompt", PROMPT, "--heads",
        "--node-threshold", "0.9", "--format", "json", "--out", str(graph_path), "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (root / "corpus.txt").write_text("\n\n".join(f"Tale {i}. " + TOKENIZER_TEXT[i % 4] for i in range(30)))
    result = run_tc(
        "score", "--model", model, "--transcoders", transcoders, "--data", str(root / "corpus.txt"),
        "--tokens", "640", "--context", "32", "--top", "4", "--quantiles", "3", "--per-quantile", "2",
        "--out", str(features_path), "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    result = run_tc("view", str(graph_path), "--features", str(features_path), "--out", str(page_path))
    assert result.returncode == 0, result.stderr
    return dict(root=root, graph=graph_path, features=features_path, page=page_path, model=model, tcs=transcoders)


def js_number(value: float) -> str:
    """What the page writes for a figure: JavaScript's Number(value.toPrecision(4)).toString()."""
    rounded = float(f"{value:.4g}")
    if rounded.is_integer() and abs(rounded) < 1e21:
        return str(int(rounded))
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", repr(rounded)).replace("e+", "e+")


def embedded_data(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="tc-data">(.*?)</script>', page, re.S)
    assert match is not None
    return json.loads(match.group(1))


# ---------------------------------------------------------------------------- the page's data


def test_page_places_every_node_as_tc_pictures_do(made):
    graph = read_graph(made["graph"])
    data = embedded_data(made["page"].read_text(encoding="utf-8"))
    layout = grid_layout(graph)
    ids = [str(n["id"]) for n in data["graph"]["nodes"]]
    assert ids == [str(n) for n in graph.nodes] and len(data["places"]) == graph.number_of_nodes()
    assert {"head", "feature", "target"} <= {a["kind"] for _, a in graph.nodes(data=True)}
    top = max(y for _, y in layout.positions.values())
    tops = []
    for node, place in zip(graph.nodes, data["places"]):
        x, y = layout.positions[node]
        assert place["x"] == pytest.approx(x * PIXELS_PER_INCH, abs=0.01)
        assert place["w"] == pytest.approx(layout.widths[node] * PIXELS_PER_INCH, abs=0.01)
        tops.append((place["y"], -y))
    # the page's y runs downward: the same order as the layout's, reversed, one offset for every node
    offsets = {round(page_y - PIXELS_PER_INCH * layout_y, 6) for page_y, layout_y in tops}
    assert len(offsets) == 1 and min(p["y"] for p in data["places"]) == pytest.approx(
        (offsets.pop() - top * PIXELS_PER_INCH), abs=0.02
    )
    # the graph inside the page is the file's: every edge and attribute as tc wrote them
    assert nx.utils.graphs_equal(nx.node_link_graph(data["graph"], directed=True, edges="links"), graph)
    assert data["reference"] == reference_value(graph)


def test_feature_nodes_get_labels_and_the_cards_tc_show_draws(made):
    from tccli.features.show import html_card

    graph = read_graph(made["graph"])
    features = FeaturesFile.open(made["features"])
    data = embedded_data(made["page"].read_text(encoding="utf-8"))
    keys = {feature_name(a["layer"], a["feature"]) for _, a in graph.nodes(data=True) if a["kind"] == "feature"}
    assert keys and set(data["labels"]) == keys == set(data["cards"])
    layer, index = min((a["layer"], a["feature"]) for _, a in graph.nodes(data=True) if a["kind"] == "feature")
    record = features.feature(layer, index)
    label = data["labels"][feature_name(layer, index)]
    tokens_in, tokens_out = label.split(" → ")
    assert tokens_in == " ".join(quoted_token(features.token_text(t)) for t, _ in record["deembedding"][:3])
    assert tokens_out == " ".join(quoted_token(features.token_text(t)) for t, _ in record["logit_promoted"][:3])
    assert label == feature_label(features, record)
    assert data["cards"][feature_name(layer, index)] == html_card(features, record, 5, features.frequencies(layer))


def test_script_json_cannot_close_its_script_element():
    graph = small_circuit_graph()
    graph.graph["metadata"]["prompt"] = "</script><script>alert(1)</script> <!-- & nan"
    graph.nodes["err0@1"]["activation"] = math.nan
    page = render_page(graph)
    assert "</script><script>alert" not in page
    data = embedded_data(page)
    assert data["prompt"] == graph.graph["metadata"]["prompt"] and data["graph"]["nodes"][5]["activation"] is None
    assert json.loads(script_json({"a": "</b>"})) == {"a": "</b>"}


def test_neuronpedia_graphs_are_read_back(made):
    graph = read_graph(made["graph"])
    document = json.loads(attribution_graph_to_neuronpedia(graph))
    back = from_neuronpedia(document)
    kept = [n for n, a in graph.nodes(data=True) if a["kind"] != "head"]
    assert back.number_of_nodes() == len(kept) == len(document["nodes"])
    assert back.number_of_edges() == len(document["links"])
    for entry in document["nodes"]:
        attrs = back.nodes[entry["node_id"]]
        assert attrs["position"] == entry["ctx_idx"] and attrs["activation"] == entry["activation"]
    features = {(a["layer"], a["feature"], a["position"]) for _, a in graph.nodes(data=True) if a["kind"] == "feature"}
    read = {(a["layer"], a["feature"], a["position"]) for _, a in back.nodes(data=True) if a["kind"] == "feature"}
    assert read == features
    # a node id that does not spell the feature out: the feature from circuit-tracer's Cantor pairing
    entry = next(e for e in document["nodes"] if e["feature_type"] == "cross layer transcoder")
    layer, feature, position = (int(part) for part in entry["node_id"].split("_"))
    assert entry["feature"] == neuronpedia_feature_id(layer, feature)
    renamed = json.loads(json.dumps(document).replace(f'"{entry["node_id"]}"', '"renamed"'))
    assert from_neuronpedia(renamed).nodes["renamed"]["feature"] == feature
    renamed["nodes"][[e["node_id"] for e in renamed["nodes"]].index("renamed")]["layer"] = str(layer + 1)
    with pytest.raises(TcError, match="is not of layer"):
        from_neuronpedia(renamed)
    assert back.graph["metadata"]["tokens"] == graph.graph["metadata"]["tokens"]
    assert back.graph["metadata"]["n_layers"] == graph.graph["metadata"]["n_layers"]  # from the logits' layer
    # Neuronpedia's pins and supernodes ([name, member, ...]) come along as tc view saves them
    first, second = (entry["node_id"] for entry in document["nodes"][:2])
    document["qParams"].update(pinnedIds=[first, "gone"], supernodes=[["pair", first, second], ["empty"]])
    meta = from_neuronpedia(document).graph["metadata"]
    assert meta["pinned"] == [first] and meta["supernodes"] == [{"name": "pair", "members": [first, second]}]
    # and tc circuit's export: its error and embedding nodes too
    circuit = small_circuit_graph()
    back = from_neuronpedia(json.loads(to_neuronpedia(circuit)))
    kinds = sorted(a["kind"] for _, a in back.nodes(data=True))
    assert kinds == sorted(a["kind"] for _, a in circuit.nodes(data=True) if a["kind"] not in ("head", "skip"))


def test_view_reads_a_neuronpedia_file_and_refuses_foreign_json(made, tmp_path):
    path = tmp_path / "np.json"
    path.write_text(attribution_graph_to_neuronpedia(read_graph(made["graph"])))
    assert read_any_graph(path).number_of_nodes() == len(json.loads(path.read_text())["nodes"])
    result = run_tc("view", str(path), "--out", str(tmp_path / "np.html"))
    assert result.returncode == 0, result.stderr
    assert len(embedded_data((tmp_path / "np.html").read_text())["places"]) == len(
        json.loads(path.read_text())["nodes"]
    )
    (tmp_path / "other.json").write_text('{"nodes": [], "edges": []}')
    with pytest.raises(TcError, match="is not a tc circuit graph nor a Neuronpedia graph"):
        read_any_graph(tmp_path / "other.json")
    broken = json.loads(path.read_text())
    broken["links"].append({"source": "nowhere", "target": broken["nodes"][0]["node_id"], "weight": 1.0})
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    result = run_tc("view", str(tmp_path / "broken.json"), "--out", str(tmp_path / "b.html"))
    assert result.returncode == 2 and "a link joins nodes the file does not list" in result.stderr
    assert not (tmp_path / "b.html").exists()


def test_view_reads_stdin_and_writes_stdout(made, tmp_path):
    graph = read_graph(made["graph"])
    for text in (made["graph"].read_text(), attribution_graph_to_neuronpedia(graph)):
        result = run_tc("view", "-", "--out", "-", input=text)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("<!DOCTYPE html>") and "<title>tc view: stdin</title>" in result.stdout
        assert len(embedded_data(result.stdout)["places"]) == len(json.loads(text)["nodes"])
    result = run_tc("view", "-", "--out", str(tmp_path / "v.html"), input="just words")
    assert result.returncode == 2 and "stdin holds" in result.stderr and not (tmp_path / "v.html").exists()
    result = run_tc("view", "-", "--features", "-", "--out", "-", input="")
    assert result.returncode == 2 and "GRAPH and --features each say -" in result.stderr and result.stdout == ""


def test_view_command_refusals(made, tmp_path):
    out = tmp_path / "p.html"
    out.write_text("mine")
    result = run_tc("view", str(made["graph"]), "--out", str(out))
    assert result.returncode == 2 and "--force" in result.stderr and out.read_text() == "mine"
    assert run_tc("view", str(made["graph"]), "--out", str(out), "--force").returncode == 0
    assert len(embedded_data(out.read_text())["places"]) == read_graph(made["graph"]).number_of_nodes()
    result = run_tc("view", str(made["graph"]), "--out", str(tmp_path / "p.txt"))
    assert result.returncode == 2 and "--out must name an .html file" in result.stderr
    (tmp_path / "f.jsonl").write_text('{"labels": 1}\n')
    result = run_tc(
        "view", str(made["graph"]), "--features", str(tmp_path / "f.jsonl"), "--out", str(tmp_path / "q.html")
    )
    assert result.returncode == 2 and "is not a tc features file" in result.stderr
    # features scored on another model than the graph's
    graph, features = read_graph(made["graph"]), FeaturesFile.open(made["features"])
    features.meta["model_info"]["n_layers"] += 1
    with pytest.raises(TcError, match="scored on another model than the graph: n_layers"):
        render_page(graph, features)
    assert not (tmp_path / "q.html").exists() and not (tmp_path / "p.txt").exists()


# ---------------------------------------------------------------------------- in the browser


def _browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; it drives the system chromium)")
    return sync_playwright


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _browser()
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


def open_page(browser, path: Path):
    """The page opened from disk, ready; with the list of every request it made and every script error."""
    page = browser.new_page(viewport={"width": 1400, "height": 900}, accept_downloads=True)
    requests, errors = [], []
    page.on("request", lambda request: requests.append(request.url))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready='1']", state="attached")
    page.evaluate("() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")
    return page, requests, errors


@pytest.mark.process
def test_page_in_chromium(made, browser, tmp_path):
    graph = read_graph(made["graph"])
    page, requests, errors = open_page(browser, made["page"])
    # one element per node, named by the graph's id; nothing fetched but the file itself
    ids = page.eval_on_selector_all("[data-node-id]", "els => els.map(e => e.getAttribute('data-node-id'))")
    assert sorted(ids) == sorted(graph.nodes) and requests == [made["page"].as_uri()]

    # hover a feature node: its figures and label
    feature = max(
        (n for n, a in graph.nodes(data=True) if a["kind"] == "feature"),
        key=lambda n: (graph.in_degree(n) + graph.out_degree(n), n),
    )
    attrs = graph.nodes[feature]
    key = feature_name(attrs["layer"], attrs["feature"])
    element = page.locator(f'[data-node-id="{feature}"]')
    element.hover()
    tip = page.inner_text("#tooltip")
    assert f"kind feature, layer {attrs['layer']}, position {attrs['position']}" in tip
    assert f"activation {js_number(attrs['activation'])}" in tip and f"influence {js_number(attrs['influence'])}" in tip
    labels = embedded_data(made["page"].read_text())["labels"]
    assert labels[key] in tip and labels[key][:8] in element.text_content()  # the label, also on the canvas

    # click: its inputs and outputs with weights, and its card
    element.click()
    panel = page.inner_text("#node-edges")
    assert f"inputs ({graph.in_degree(feature)})" in panel and f"outputs ({graph.out_degree(feature)})" in panel
    strongest = max(graph.in_edges(feature, data="weight"), key=lambda e: abs(e[2]), default=None)
    if strongest is not None:
        first_row = page.locator("#node-edges table.edges").first.locator("tr").first.inner_text()
        assert strongest[0] in first_row and js_number(strongest[2]) in first_row
    assert page.inner_text("#card h2") == key and page.locator("#card .ex").count() > 0
    assert "top activations" in page.inner_text("#card")

    # the threshold slider: the edges drawn are those at least the threshold
    weights = [abs(w) for _, _, w in graph.edges(data="weight")]
    seen = set()
    for value in ("0", "40", "70", "100"):
        page.fill("#threshold", value)
        count = page.locator("#edge-count")
        threshold = float(count.get_attribute("data-threshold"))
        visible = int(count.get_attribute("data-visible"))
        assert visible == sum(w >= threshold for w in weights)
        seen.add(visible)
    assert max(seen) == graph.number_of_edges() and len(seen) > 1

    # search by feature id and by token
    found = page.evaluate(f"() => tcView.search({json.dumps(key)})")
    assert set(found) == {n for n, a in graph.nodes(data=True) if a["kind"] == "feature" and
                          feature_name(a["layer"], a["feature"]) == key}  # fmt: skip
    page.fill("#search", "")
    assert page.locator(".node.match").count() == 0

    # pin two nodes (through the panel's button), group them, save through the download
    pins = sorted((n for n, a in graph.nodes(data=True) if a["kind"] == "feature"), key=lambda n: -graph.degree(n))[:2]
    for node in pins:
        page.locator(f'[data-node-id="{node}"]').click()
        page.click("#pin")
    assert page.inner_text("#pinned-count") == "(2)"
    for tick in page.locator("#pinned .tick").all():
        tick.check()
    page.fill("#supernode-name", "pair")
    page.click("#group")
    with page.expect_download() as download:
        page.click("#save")
    saved = tmp_path / "subgraph.json"
    download.value.save_as(saved)
    assert errors == []
    page.close()
    # a link can open the page with a node clicked and a search made
    page = browser.new_page()
    page.goto(made["page"].as_uri() + f"#select={quote(feature, safe='')}&search={quote(key, safe='')}&zoom=3")
    page.wait_for_selector("body[data-ready='1']", state="attached")
    page.evaluate("() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")
    assert page.inner_text("#node-panel h3").startswith(feature) and page.inner_text("#card h2") == key
    assert page.locator(".node.match").count() == len(found)
    stage, box = page.locator("#stage").bounding_box(), page.locator(f'[data-node-id="{feature}"]').bounding_box()
    centre = (box["x"] + box["width"] / 2 - stage["x"], box["y"] + box["height"] / 2 - stage["y"])
    assert centre == pytest.approx((stage["width"] / 2, stage["height"] / 2), abs=1.0)  # zoomed in on it
    page.close()

    data = json.loads(saved.read_text())
    targets = {n for n, a in graph.nodes(data=True) if a["kind"] == "target"}
    assert {n["id"] for n in data["nodes"]} == set(pins) | targets
    assert data["graph"]["metadata"]["supernodes"] == [{"name": "pair", "members": pins}]
    sub = read_graph(saved)  # a tc circuit graph: node attributes and the edges among the kept nodes unchanged
    assert sorted(sub.edges(data="weight")) == sorted(graph.subgraph(set(pins) | targets).edges(data="weight"))
    assert all(sub.nodes[n] == graph.nodes[n] for n in sub.nodes)
    result = run_tc("validate", str(saved), "--random", "1", "--mode", "frozen", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["circuit_size"]["feature"] == 2
    # tc view of the saved subgraph opens with its pins and supernodes
    assert run_tc("view", str(saved), "--out", str(tmp_path / "sub.html")).returncode == 0
    page, _, errors = open_page(browser, tmp_path / "sub.html")
    assert page.inner_text("#pinned-count") == "(2)" and errors == []
    assert page.evaluate("() => tcView.subgraph().graph.metadata.supernodes") == [{"name": "pair", "members": pins}]
    page.close()
    # and tc intervene takes a supernode's members as they are
    members = data["graph"]["metadata"]["supernodes"][0]["members"]
    result = run_tc(
        "intervene", "--model", made["model"], "--transcoders", made["tcs"], "--prompt", PROMPT,
        "--logit-diff", "1", "0", "--ablate", *members, "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["interventions"] == [f"ablate {member}" for member in members]


@pytest.mark.process
def test_a_large_graph_opens_with_every_node(browser, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from view_latency import synthetic_graph

    graph = synthetic_graph(5000, 50000)
    path = tmp_path / "large.html"
    path.write_text(render_page(graph), encoding="utf-8")
    page, _, errors = open_page(browser, path)
    assert page.locator("[data-node-id]").count() == 5000
    page.fill("#threshold", "0")
    assert int(page.get_attribute("#edge-count", "data-visible")) == 50000 and errors == []
    # names too small to read are left out at this scale, and come back when zoomed in
    assert "tiny" in page.get_attribute("#nodes", "class")
    page.mouse.move(700, 450)
    page.mouse.wheel(0, -2000)
    page.wait_for_function("() => !document.getElementById('nodes').classList.contains('tiny')")
    assert page.locator("#nodes .name").first.is_visible() and errors == []
    page.close()
