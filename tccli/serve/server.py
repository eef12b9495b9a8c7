"""`tc serve`'s HTTP server: the standard library's ThreadingHTTPServer, one thread per request, JSON in and
out, and `tc view`'s page with the serve panel (``serve.html``, ``serve.css``, ``serve.js`` beside this
module) added.

Routes (every error is a 4xx or 5xx with a one-line ``{"error": "..."}``):

- ``GET /``: the page of the newest graph (an empty one before any); ``GET /graph/ID``: graph ID's page.
- ``POST /api/graph`` ``{"prompt", "target"?, "pos"?}``: queue a graph; 202 ``{"job", "ahead"}`` (with
  ``?wait=1``: wait, 200 with the finished job). ``GET /api/jobs/ID``: where a job stands.
- ``GET /api/graphs``: the graphs computed; ``GET /api/graphs/ID``: one as `tc graph --format json` writes it.
- ``POST /api/intervene`` and ``POST /api/validate``: run at their turn and answer with the result.
- ``GET /api/cards/L2.F57``: a feature's card (HTML in JSON), with --features; ``GET /api/info``.
"""

from __future__ import annotations

import errno
import json
import socket
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Optional
from urllib.parse import parse_qs, unquote, urlsplit

import networkx as nx

from tccli import __version__
from tccli.config.serve import ServeConfig
from tccli.errors import fail
from tccli.runtime import interrupts
from tccli.serve.session import BadRequest, Session
from tccli.serve.worker import ModelWorker, QueueFull
from tccli.view.page import PageAddon, render_page, script_json

MAX_BODY = 4 * 2**20  # bytes of a request body (a pinned subgraph's ids, a prompt)


def _asset(name: str) -> str:
    return resources.files("tccli.serve").joinpath(name).read_text(encoding="utf-8")


def one_line(text: str) -> str:
    return " ".join(str(text).split()) or "error"


class App:
    """The server's state: the session (model, graphs), the worker thread, and the rendered pages."""

    def __init__(self, session: Session, worker: ModelWorker):
        self.session = session
        self.worker = worker
        self._pages: dict[str, str] = {}
        self._side, self._bar, self._style, self._script = (
            _asset(n) for n in ("serve-side.html", "serve-bar.html", "serve.css", "serve.js")
        )

    def page(self, graph_id: Optional[str]) -> str:
        """A graph's page (cached: graphs never change), or the empty page before any graph."""
        if graph_id is not None and graph_id in self._pages:
            return self._pages[graph_id]
        if graph_id is None:
            graph = nx.DiGraph()
            graph.graph["metadata"] = {}
            title = "no graph yet: type a prompt"
        else:
            graph = self.session.graph(graph_id)
            title = f"graph {graph_id}"
        meta = graph.graph["metadata"]
        asked = {key: (meta.get("config") or {}).get(key) for key in ("logit", "logit_diff", "feature", "pos")}
        serve_data = {"graph": graph_id, "prompt": meta.get("prompt"), "target": asked, "version": __version__}
        addon = PageAddon(
            name="tc serve",
            bar=self._bar,
            side=self._side,
            style=self._style,
            script=f"const SERVE = {script_json(serve_data)};\n{self._script}",
            connect=True,
            card_url="/api/cards/" if self.session.features is not None else None,
        )
        config = self.session.config
        with self.session.lock:  # labels are read from the features file
            html = render_page(graph, self.session.features, config.examples, config.min_edge, title, addon)
        if graph_id is not None:
            self._pages[graph_id] = html
        return html

    def newest_graph(self) -> Optional[str]:
        return list(self.session.graphs)[-1] if self.session.graphs else None


class Handler(BaseHTTPRequestHandler):
    server_version = f"tc-serve/{__version__}"
    app: App  # set on the subclass serve() makes

    # ------------------------------------------------------------------ answers

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value: Any) -> None:
        body = json.dumps(value, allow_nan=False, ensure_ascii=False, default=float).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8")

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """http.server's own refusals (a malformed request line, an unknown method) as JSON too; an unknown
        method is the client's mistake (405), not a server's missing feature (501)."""
        self.close_connection = True
        code = HTTPStatus.METHOD_NOT_ALLOWED if code == HTTPStatus.NOT_IMPLEMENTED else code
        try:
            self._json(code, {"error": one_line(message or HTTPStatus(code).phrase)})
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # requests are not logged: stderr stays quiet
        pass

    # ------------------------------------------------------------------ dispatch

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        try:
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.split("/") if p]
            if parts[:1] == ["api"]:
                name, args = "api/" + (parts[1] if len(parts) > 1 else ""), parts[2:]
            else:
                name, args = (parts[0] if parts else ""), parts[1:]
            handler = ROUTES.get((method, name, len(args)))
            if handler is None:
                if any(key[1:] == (name, len(args)) for key in ROUTES):
                    raise BadRequest(f"{method} is not allowed on {url.path}", 405)
                raise BadRequest(f"no such page or endpoint: {url.path}", 404)
            handler(self, *args, query=parse_qs(url.query))
        except BadRequest as exc:
            self._json(exc.status, {"error": one_line(str(exc))})
        except QueueFull as exc:
            self._json(503, {"error": one_line(str(exc))})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
        except Exception as exc:  # a bug of ours: this request fails, the server goes on
            print(f"tc serve: internal error on {method} {self.path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            try:
                self._json(500, {"error": one_line(f"internal error: {type(exc).__name__}: {exc}")})
            except OSError:
                pass

    def body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None:
            raise BadRequest("the request has no body (Content-Length): send a JSON object", 411)
        try:
            size = int(length)
        except ValueError:
            raise BadRequest(f"bad Content-Length {length!r}") from None
        if size > MAX_BODY:
            raise BadRequest(f"the request body is {size} bytes, more than the {MAX_BODY} taken", 413)
        raw = self.rfile.read(size)
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise BadRequest("the request body is not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise BadRequest(
                f"the request body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            ) from None

    # ------------------------------------------------------------------ routes

    def page_root(self, query: dict) -> None:
        self._send(200, self.app.page(self.app.newest_graph()).encode("utf-8"), "text/html; charset=utf-8")

    def page_graph(self, graph_id: str, query: dict) -> None:
        self._send(200, self.app.page(graph_id).encode("utf-8"), "text/html; charset=utf-8")

    def api_info(self, query: dict) -> None:
        s = self.app.session
        self._json(
            200,
            {
                "tc_version": __version__,
                "model": s.loaded.info.name,
                "transcoders": s.config.transcoders,
                "layers": sorted(s.transcoders),
                "features": s.config.features,
                "graphs": s.graph_list(),
            },
        )

    def api_graphs(self, query: dict) -> None:
        self._json(200, {"graphs": self.app.session.graph_list()})

    def api_graph_file(self, graph_id: str, query: dict) -> None:
        from tccli.circuit.files import to_json

        self._send(200, to_json(self.app.session.graph(graph_id)).encode("utf-8"), "application/json; charset=utf-8")

    def api_job(self, job_id: str, query: dict) -> None:
        job = self.app.worker.get(job_id)
        if job is None:
            raise BadRequest(f"no job {job_id!r} on this server", 404)
        self._json(200, self.app.worker.describe(job))

    def api_card(self, key: str, query: dict) -> None:
        self._json(200, {"feature": key, "html": self.app.session.card(key)})

    def post_graph(self, query: dict) -> None:
        session = self.app.session
        config = session.graph_config(self.body())
        job = self.app.worker.submit("graph", lambda job: session.compute_graph(config, job))
        if query.get("wait", ["0"])[0] not in ("", "0", "false"):
            self._finished(job, self.app.worker.describe)
        else:
            self._json(202, {"job": job.id, "ahead": self.app.worker.ahead(job)})

    def post_intervene(self, query: dict) -> None:
        session = self.app.session
        graph, config = session.intervene_request(self.body())
        self._finished(self.app.worker.submit("intervene", lambda job: session.intervene(graph, config, job)))

    def post_validate(self, query: dict) -> None:
        session = self.app.session
        subgraph, config = session.validate_request(self.body())
        self._finished(self.app.worker.submit("validate", lambda job: session.validate(subgraph, config, job)))

    def _finished(self, job: Any, answer: Any = lambda job: job.result) -> None:
        """Wait for ``job`` and answer with ``answer(job)`` (its result), or its error (the request's fault: 400;
        ours: 500)."""
        job.finished.wait()
        if job.state == "done":
            self._json(200, answer(job))
        else:
            self._json(500 if job.internal else 400, {"error": one_line(job.error or "failed")})


# (method, name, number of path parts after it) -> handler; the name is /api/NAME's or the first part's
ROUTES = {
    ("GET", "", 0): Handler.page_root,
    ("GET", "graph", 1): Handler.page_graph,
    ("GET", "api/info", 0): Handler.api_info,
    ("GET", "api/graphs", 0): Handler.api_graphs,
    ("GET", "api/graphs", 1): Handler.api_graph_file,
    ("GET", "api/jobs", 1): Handler.api_job,
    ("GET", "api/cards", 1): Handler.api_card,
    ("POST", "api/graph", 0): Handler.post_graph,
    ("POST", "api/intervene", 0): Handler.post_intervene,
    ("POST", "api/validate", 0): Handler.post_validate,
}


# ============================================================================ running it


def _listening_server(host: str, port: int) -> ThreadingHTTPServer:
    """The server bound to (host, port), or one clear error (a port in use, a host that is not this machine's)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except (socket.gaierror, UnicodeError) as exc:
        raise fail(f"--host {host!r} is not an address of this machine ({getattr(exc, 'strerror', exc)})") from None

    class Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True

    try:
        return Server((host, port), type("BoundHandler", (Handler,), {}))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise fail(f"port {port} on {host} is in use (another server?); pick another with --port") from None
        if exc.errno == errno.EACCES:
            raise fail(
                f"no permission to listen on port {port} (ports below 1024 need root); pick another with --port"
            ) from None
        raise fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def url_of(server: ThreadingHTTPServer, host: str) -> str:
    port = server.server_address[1]
    shown = host.strip("[]")
    return f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"


def serve(config: ServeConfig, log=lambda message: print(f"tc serve: {message}", file=sys.stderr)) -> None:
    """Listen, load the model, transcoders and features, and answer requests until SIGINT or SIGTERM, which
    ends in ``Interrupted`` (exit 130 / 143) with the line `tc: interrupted; the server stopped`."""
    from tccli.model.loading import load_model
    from tccli.replacement.model import layer_views
    from tccli.transcoders.files import check_transcoders
    from tccli.transcoders.formats import load_transcoders

    server = _listening_server(config.host, config.port)  # a port in use is refused before the model loads
    if not config.loopback:
        print(
            f"tc serve: warning: --host {config.host} is not a loopback address and the server has no "
            "authentication: anyone who can reach it can run the model",
            file=sys.stderr,
        )
    try:
        features = None
        if config.features:
            from tccli.features.files import FeaturesFile

            features = FeaturesFile.open(config.features)
        if sys.stderr.isatty():  # a person waits; a script reads one error line or the serving line
            log("loading the model and transcoders")
        loaded = load_model(config.model, config.device, config.model_dtype)
        transcoders = load_transcoders(config.transcoders, loaded.device)  # a per-layer set or a CLT
        check_transcoders(layer_views(transcoders), loaded)
        if features is not None:
            from tccli.features.files import check_features_match_model

            check_features_match_model(features, loaded.info)
        session = Session(config, loaded, transcoders, features)
        server.RequestHandlerClass.app = App(session, ModelWorker(config.queue))  # type: ignore[attr-defined]
        log(f"serving {url_of(server, config.host)} (Ctrl-C stops it)")
        server.serve_forever()
    except interrupts.Interrupted as exc:
        raise interrupts.Interrupted(exc.signum, "the server stopped") from None
    finally:
        server.server_close()
