"""tc serve: a real `tc serve` process (tiny GPT-2, random transcoders, a `tc score` features file) driven
over HTTP and in headless Chromium (Playwright with the system chromium): a typed prompt's graph, an
ablation's changed target against `tc intervene`, the pinned subgraph's validation against `tc validate`,
feature cards fetched on demand, bad requests answered with a JSON 4xx while the server goes on; Ctrl-C, a
non-loopback host, a port in use. The worker queue on its own: one job at a time, the others queued."""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import TOKENIZER_TEXT, run_tc
from tccli.errors import fail

PROMPT = "The war lasted from 1735 to 17"
SERVING = "tc serve: serving "


class Served:
    """A `tc serve` process and its stderr lines (read by a thread as they come)."""

    def __init__(self, *args: str):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("TC_DEBUG", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tccli", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = ""

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip("\n"))
            self.lines.put(line.rstrip("\n"))
        self.lines.put("")  # end of stderr

    def wait_serving(self, timeout: float = 120) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line.startswith(SERVING):
                self.url = line[len(SERVING) :].split()[0]
                return self.url
            if line == "" and self.proc.poll() is not None:
                break
        self.stop()
        raise AssertionError(f"tc serve did not start: {self.stderr}")

    def stop(self, signum: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        code = self.proc.wait(timeout=60)
        time.sleep(0.2)  # the reader thread takes the last lines
        return code


def request(url: str, method: str = "GET", body: bytes | str | dict | None = None) -> tuple[int, dict | str]:
    """(status, JSON answer or text) of one HTTP request; 4xx and 5xx are answers too."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as response:
            status, raw, kind = response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        status, raw, kind = exc.code, exc.read(), exc.headers.get("Content-Type", "")
    return status, json.loads(raw) if kind.startswith("application/json") else raw.decode("utf-8")


@pytest.fixture(scope="module")
def inputs(tiny_model_dirs, random_transcoder_folder, tmp_path_factory):
    """The tiny GPT-2, random transcoders and their features scored by `tc score`."""
    root = tmp_path_factory.mktemp("serve")
    model = str(tiny_model_dirs["gpt2"])
    transcoders = str(random_transcoder_folder("gpt2", bias_shift=-0.3))
    (root / "corpus.txt").write_text("\n\n".join(f"Tale {i}. " + TOKENIZER_TEXT[i % 4] for i in range(30)))
    features = root / "features.h5"
    result = run_tc(
        "score", "--model", model, "--transcoders", transcoders, "--data", str(root / "corpus.txt"),
        "--tokens", "640", "--context", "32", "--top", "4", "--quantiles", "3", "--per-quantile", "2",
        "--out", str(features), "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return dict(root=root, model=model, tcs=transcoders, features=str(features))


@pytest.fixture(scope="module")
def server(inputs):
    served = Served(
        "--model", inputs["model"], "--transcoders", inputs["tcs"], "--features", inputs["features"],
        "--port", "0", "--device", "cpu", "--node-threshold", "0.9",
    )  # fmt: skip
    served.wait_serving()
    yield served
    served.stop()


def single_token_text(model_dir: str) -> str:
    """A token of the tiny tokenizer that is one token with its leading space."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for word in (" war", " the", " 17", " from"):
        if len(tokenizer.encode(word, add_special_tokens=False)) == 1:
            return word
    raise AssertionError("no single-token word in the tiny tokenizer")


# ---------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser():
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; it drives the system chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium)
        yield launched
        launched.close()


def strongest_feature_into_target(graph: dict, target: str) -> str:
    edges = [link for link in graph["links"] if link["target"] == target]
    kinds = {node["id"]: node["kind"] for node in graph["nodes"]}
    features = [link for link in edges if kinds[link["source"]] == "feature"]
    assert features, "no feature edge into the target"
    return max(features, key=lambda link: abs(link["weight"]))["source"]


@pytest.mark.process
def test_prompt_graph_ablation_and_validation_in_chromium(server, inputs, browser, tmp_path):
    token = single_token_text(inputs["model"])
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors, requests = [], []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(server.url)
    page.wait_for_selector("body[data-serve-ready='1']", state="attached")
    assert page.eval_on_selector_all("[data-node-id]", "els => els.length") == 0  # no graph yet

    # a prompt and a logit target typed in; the graph opens when it is computed
    page.fill("#serve-prompt", PROMPT)
    page.select_option("#serve-target-kind", "logit")
    page.fill("#serve-target-a", token)
    page.click("#serve-run")
    page.wait_for_url("**/graph/*", timeout=120_000)
    page.wait_for_selector("body[data-serve-ready='1']", state="attached")
    graph_id = page.url.rstrip("/").rsplit("/", 1)[1]
    status, graph = request(f"{server.url}api/graphs/{graph_id}")
    assert status == 200 and graph["graph"]["metadata"]["prompt"] == PROMPT
    assert graph["graph"]["metadata"]["targets"][0]["kind"] == "logit"
    # the form shows what the graph was asked for
    assert (page.input_value("#serve-prompt"), page.input_value("#serve-target-kind")) == (PROMPT, "logit")
    assert page.input_value("#serve-target-a") == token
    ids = page.eval_on_selector_all("[data-node-id]", "els => els.map(e => e.getAttribute('data-node-id'))")
    assert sorted(ids) == sorted(str(n["id"]) for n in graph["nodes"]) and len(ids) > 3

    # ablate the feature with the strongest edge into the target: the page shows tc intervene's numbers
    node = strongest_feature_into_target(graph, "target")
    page.evaluate("(id) => window.tcView.select(id)", node)
    page.click("#serve-add")
    page.click("#serve-intervene")
    result = page.wait_for_selector("#serve-intervene-result[data-after]", state="attached", timeout=120_000)
    before, after = float(result.get_attribute("data-before")), float(result.get_attribute("data-after"))
    cli = run_tc(
        "intervene", "--model", inputs["model"], "--transcoders", inputs["tcs"], "--prompt", PROMPT,
        "--logit", token, "--ablate", node, "--json", "--device", "cpu",
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout)["target"]
    assert before == pytest.approx(expected["before"], rel=1e-9, abs=1e-12)
    assert after == pytest.approx(expected["after"], rel=1e-9, abs=1e-12)
    assert after != pytest.approx(before, abs=1e-6)  # the strongest direct input moved the target
    assert page.text_content("#serve-after") == page.evaluate("(v) => String(Number(v.toPrecision(5)))", after)
    assert f'target logit("{token}") at ' in page.text_content("#serve-intervene-result")

    # pin two features and validate them: tc validate's figures for the same subgraph
    features = [n["id"] for n in graph["nodes"] if n["kind"] == "feature"][:2]
    for feature in features:
        page.evaluate("(id) => window.tcView.pin(id)", feature)
    page.click("#serve-validate")
    shown = page.wait_for_selector("#serve-validate-result[data-necessity]", state="attached", timeout=120_000)
    saved = tmp_path / "subgraph.json"
    saved.write_text(json.dumps(page.evaluate("() => window.tcView.subgraph()")))
    cli = run_tc(
        "validate", str(saved), "--model", inputs["model"], "--transcoders", inputs["tcs"], "--json",
        "--device", "cpu",
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    circuit = json.loads(cli.stdout)["circuit"]
    assert float(shown.get_attribute("data-necessity")) == pytest.approx(circuit["necessity"], rel=1e-9)
    assert float(shown.get_attribute("data-sufficiency")) == pytest.approx(circuit["sufficiency"], rel=1e-9)
    assert "necessity" in page.text_content("#serve-validate-result")
    status, answer = request(f"{server.url}api/validate", "POST", {"graph": graph_id, "nodes": features})
    assert status == 200 and answer["results"]["random"] == json.loads(cli.stdout)["random"]  # the same draws
    assert answer["summary"][1:] == [line for line in cli.stderr.splitlines() if line.startswith("  ")]

    # a feature's card comes from the server when the node is clicked: tc show's card
    from tccli.features.files import FeaturesFile
    from tccli.features.show import html_card

    feature = next(n for n in graph["nodes"] if n["kind"] == "feature")
    page.evaluate("(id) => window.tcView.select(id)", feature["id"])
    page.wait_for_function("() => !document.getElementById('card').textContent.includes('loading')")
    opened = FeaturesFile.open(inputs["features"])
    record = opened.feature(feature["layer"], feature["feature"])
    card = html_card(opened, record, 5, opened.frequencies(feature["layer"]))
    parsed = page.evaluate(
        "(html) => { const d = document.createElement('div'); d.innerHTML = html; return d.innerHTML; }", card
    )
    assert page.inner_html("#card") == parsed and "top activations" in page.inner_text("#card")
    assert errors == [] and all(url.startswith(server.url) for url in requests)
    page.close()


@pytest.mark.process
def test_a_queued_graph_is_followed_to_its_page(server):
    """POST /api/graph answers at once with a job; the job goes queued -> running -> done, and the graph's
    page (and /, the newest) is tc view's page of that graph, allowed to talk to its server only."""
    from tccli.circuit.files import from_json

    status, queued = request(f"{server.url}api/graph", "POST", {"prompt": PROMPT, "target": {"feature": "L1.F3"}})
    assert status == 202 and set(queued) == {"job", "ahead"}
    seen, deadline = [], time.time() + 300
    while time.time() < deadline:
        status, state = request(f"{server.url}api/jobs/{queued['job']}")
        assert status == 200 and state["job"] == queued["job"] and state["kind"] == "graph"
        if not seen or seen[-1] != state["state"]:
            seen.append(state["state"])
        if state["state"] == "running":
            assert state["stage"] and 0 <= state["done"] <= max(state["total"], 1)
        if state["state"] in ("done", "failed"):
            break
        time.sleep(0.05)
    assert seen[-1] == "done" and set(seen) <= {"queued", "running", "done"}, seen
    graph_id = state["result"]["graph"]
    status, text = request(f"{server.url}api/graphs/{graph_id}")
    graph = from_json(json.dumps(text), "served")
    assert (
        graph.graph["metadata"]["targets"][0] | {"kind": "feature", "layer": 1, "feature": 3}
        == graph.graph["metadata"]["targets"][0]
    )
    assert (graph.number_of_nodes(), graph.number_of_edges()) == (state["result"]["nodes"], state["result"]["edges"])
    status, page = request(f"{server.url}graph/{graph_id}")
    assert status == 200 and f'"graph": "{graph_id}"' in page and "connect-src 'self'" in page
    assert request(server.url)[1] == page  # / shows the newest graph


# ---------------------------------------------------------------------------- bad requests


@pytest.mark.process
def test_bad_requests_get_a_json_4xx_and_the_server_goes_on(server, inputs):
    base = server.url
    status, job = request(f"{base}api/graph?wait=1", "POST", {"prompt": PROMPT})  # the default target: logits
    assert status == 200 and job["state"] == "done", job
    graph_id = job["result"]["graph"]
    status, listed = request(f"{base}api/graphs")
    assert status == 200 and graph_id in [g["id"] for g in listed["graphs"]]
    cases = [
        ("POST", "api/graph", "{not json", 400, "not JSON"),
        ("POST", "api/graph", "[1, 2]", 400, "JSON object"),
        ("POST", "api/graph", {}, 400, "no 'prompt' field"),
        ("POST", "api/graph", {"prompt": "   "}, 400, "the prompt is empty"),
        ("POST", "api/graph", {"prompt": "x " * 5000}, 400, "longer than the model's context"),
        ("POST", "api/graph", {"prompt": PROMPT, "pos": 99}, 400, "outside the prompt"),
        ("POST", "api/graph", {"prompt": PROMPT, "target": {"logit": "a b c d"}}, 400, "not one"),
        ("POST", "api/graph", {"prompt": PROMPT, "target": {"feature": "L0.F9999"}}, 400, "out of range"),
        ("POST", "api/graph", {"prompt": PROMPT, "colour": "red"}, 400, "unknown field 'colour'"),
        ("POST", "api/graph", {"prompt": 7}, 400, "'prompt' must be a string"),
        ("POST", "api/intervene", {"graph": "999", "interventions": []}, 404, "no graph '999'"),
        ("POST", "api/validate", {"nodes": ["mlp0.f1@1"]}, 400, "no 'graph' field"),
        ("GET", "api/jobs/424242", None, 404, "no job"),
        ("GET", "api/cards/L0.F9999", None, 404, "no feature L0.F9999"),
        ("GET", "api/nothing", None, 404, "no such page"),
        ("DELETE", "api/graphs", None, 405, "not allowed"),
    ]
    _, graph = request(f"{base}api/graphs/{graph_id}")
    embed = next(n["id"] for n in graph["nodes"] if n["kind"] == "embed")
    feature = next(n["id"] for n in graph["nodes"] if n["kind"] == "feature")

    def intervene(*items: dict) -> dict:
        return {"graph": graph_id, "interventions": list(items)}

    cases += [
        ("POST", "api/intervene", intervene({"node": "mlp9.f1@1", "op": "ablate"}), 400, "unknown node id 'mlp9.f1@1'"),
        ("POST", "api/intervene", intervene({"node": embed, "op": "ablate"}), 400, "is a embed node"),
        ("POST", "api/intervene", intervene({"op": "ablate"}), 400, "no 'node' field"),
        ("POST", "api/intervene", intervene({"node": feature, "op": "scale"}), 400, "no 'value' field for scale"),
        ("POST", "api/intervene", intervene({"node": feature, "op": "boost"}), 400, "'op' must be one of"),
        ("POST", "api/intervene", intervene({"node": feature, "op": "set", "value": 10**400}), 400, "finite number"),
        (
            "POST",
            "api/intervene",
            json.dumps(intervene({"node": feature, "op": "set", "value": math.nan})),
            400,
            "finite",
        ),
        ("POST", "api/intervene", intervene({"node": feature, "op": "set", "value": True}), 400, "must be a number"),
        ("POST", "api/intervene", {**intervene({"node": feature, "op": "ablate"}), "mode": "x"}, 400, "'mode'"),
        ("POST", "api/validate", {"graph": graph_id, "nodes": ["nope@1"]}, 400, "unknown node id 'nope@1'"),
        ("POST", "api/validate", {"graph": graph_id, "nodes": [embed]}, 400, "no feature or head node"),
    ]
    for method, path, body, code, message in cases:
        status, answer = request(base + path, method, body)
        assert status == code, (path, body, answer)
        assert isinstance(answer, dict) and list(answer) == ["error"], answer
        assert message in answer["error"] and "\n" not in answer["error"], (path, answer)
    # http.server's own refusals are JSON too
    host, port = base.split("//")[1].rstrip("/").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        raw.sendall(b"BREW /pot HTTP/1.1\r\n\r\n")
        answer = raw.makefile("rb").read().decode()
    assert answer.startswith("HTTP/1.0 405") and answer.endswith('{"error": "Unsupported method (\'BREW\')"}')
    # still answering: an intervention that is fine runs after all that
    # (mean ablation and a scaling: the next tokens and KL are tc intervene's)
    err = next(n["id"] for n in graph["nodes"] if n["kind"] == "error")
    asked = intervene({"node": feature, "op": "ablate"}, {"node": err, "op": "scale", "value": 2})
    status, result = request(f"{base}api/intervene", "POST", {**asked, "ablation": "mean", "mode": "frozen"})
    assert status == 200 and result["interventions"] == [f"ablate {feature}", f"scale {err}=2"], result
    cli = run_tc(
        "intervene", "--model", inputs["model"], "--transcoders", inputs["tcs"], "--prompt", PROMPT, "--device", "cpu",
        "--ablate", feature, "--scale", f"{err}=2", "--ablation", "mean", "--features", inputs["features"],
        "--mode", "frozen", "--json",
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout)
    assert result["kl"] == pytest.approx(expected["kl"], rel=1e-9) and result["kl"] > 0
    assert result["top_after"] == expected["top_after"] and result["ablation"] == "mean"
    status, info = request(f"{base}api/info")
    assert status == 200 and info["layers"] == [0, 1]
    assert server.proc.poll() is None


# ---------------------------------------------------------------------------- the process


@pytest.mark.process
def test_ctrl_c_stops_the_server_with_130(inputs):
    served = Served("--model", inputs["model"], "--transcoders", inputs["tcs"], "--port", "0", "--device", "cpu")
    url = served.wait_serving()
    assert request(f"{url}api/info")[0] == 200
    assert served.stop(signal.SIGINT) == 130
    assert served.stderr[-1] == "tc: interrupted; the server stopped"
    assert not any("Traceback" in line for line in served.stderr)


@pytest.mark.process
def test_a_host_off_the_loopback_prints_a_warning(inputs):
    served = Served(
        "--model", inputs["model"], "--transcoders", inputs["tcs"], "--host", "0.0.0.0", "--port", "0",
        "--device", "cpu",
    )  # fmt: skip
    served.wait_serving()
    warnings = [line for line in served.stderr if "warning" in line]
    assert warnings == [
        "tc serve: warning: --host 0.0.0.0 is not a loopback address and the server has no authentication: "
        "anyone who can reach it can run the model"
    ]
    assert served.stop() == 130


@pytest.mark.process
def test_a_port_in_use_is_one_clear_error(inputs):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_tc("serve", "--model", inputs["model"], "--transcoders", inputs["tcs"], "--port", str(port))
    assert result.returncode != 0
    assert (
        result.stderr.strip()
        == f"tc: error: port {port} on 127.0.0.1 is in use (another server?); pick another with --port"
    )


def test_loopback_hosts():
    from tccli.config.serve import ServeConfig

    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        assert ServeConfig(transcoders="t", host=host).loopback, host
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        assert not ServeConfig(transcoders="t", host=host).loopback, host


# ---------------------------------------------------------------------------- the worker queue


def test_one_job_runs_at_a_time_and_the_others_wait():
    from tccli.serve.worker import ModelWorker, QueueFull

    worker = ModelWorker(max_waiting=2)
    release, running = threading.Event(), []

    def slow(job):
        running.append(job.id)
        job.progress("rows", 1, 4)
        release.wait(30)
        return "first"

    first = worker.submit("graph", slow)
    for _ in range(100):
        if first.state == "running":
            break
        time.sleep(0.01)
    second = worker.submit("graph", lambda job: (running.append(job.id), "second")[1])

    def refused(job):
        raise fail("bad node")

    third = worker.submit("intervene", refused)
    with pytest.raises(QueueFull):
        worker.submit("graph", lambda job: None)
    assert worker.describe(first) == {
        "job": first.id,
        "kind": "graph",
        "state": "running",
        "stage": "rows",
        "done": 1,
        "total": 4,
    }
    assert worker.describe(second)["ahead"] == 1 and worker.describe(third)["ahead"] == 2
    release.set()
    assert third.finished.wait(30)
    assert running == [first.id, second.id]  # in order, never two at once
    assert (first.result, second.result) == ("first", "second")
    assert worker.describe(third)["error"] == "bad node" and not third.internal
    broken = worker.submit("graph", lambda job: 1 / 0)
    assert broken.finished.wait(30) and broken.internal and broken.error.startswith("internal error: ZeroDivisionError")
    assert worker.submit("graph", lambda job: "alive").finished.wait(30)  # the worker goes on after both


@pytest.mark.process
def test_a_cross_layer_transcoder_is_served(inputs, random_clt_folder):
    """With a CLT, a typed prompt's graph and an ablation are those `tc graph` and `tc intervene` give."""
    clt = str(random_clt_folder("gpt2"))
    served = Served("--model", inputs["model"], "--transcoders", clt, "--port", "0", "--device", "cpu")
    try:
        served.wait_serving()
        token = single_token_text(inputs["model"])
        status, job = request(f"{served.url}api/graph?wait=1", "POST", {"prompt": PROMPT, "target": {"logit": token}})
        assert status == 200 and job["state"] == "done", job
        status, graph = request(f"{served.url}api/graphs/{job['result']['graph']}")
        assert graph["graph"]["metadata"]["cross_layer"] is True
        cli = run_tc(
            "graph", "--model", inputs["model"], "--transcoders", clt, "--prompt", PROMPT, "--logit", token,
            "--device", "cpu", "--quiet",
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        expected = json.loads(cli.stdout)
        assert sorted(n["id"] for n in graph["nodes"]) == sorted(n["id"] for n in expected["nodes"])
        node = strongest_feature_into_target(graph, "target")
        status, answer = request(
            f"{served.url}api/intervene", "POST",
            {"graph": job["result"]["graph"], "interventions": [{"node": node, "op": "ablate"}]},
        )  # fmt: skip
        assert status == 200, answer
        cli = run_tc(
            "intervene", "--model", inputs["model"], "--transcoders", clt, "--prompt", PROMPT, "--logit", token,
            "--ablate", node, "--json", "--device", "cpu",
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        assert answer["target"]["after"] == pytest.approx(json.loads(cli.stdout)["target"]["after"], rel=1e-9)
        assert answer["target"]["after"] != pytest.approx(answer["target"]["before"], abs=1e-6)
    finally:
        served.stop()
