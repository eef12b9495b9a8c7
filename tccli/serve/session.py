"""What `tc serve` holds and computes: the model, the transcoders and the features file it loaded once, the
graphs it computed, and the three kinds of model work (a graph as `tc graph` computes it, an intervention as
`tc intervene` runs it, the pinned subgraph validated as `tc validate` does).

Requests are checked here, in the request's own thread, before anything is queued: a bad one is refused at
once with ``BadRequest`` (one line; the server answers 4xx). Checking a prompt needs the tokenizer, which the
worker thread may be using; the checks use a copy of it of their own, under a lock. The model work itself runs
in the worker thread only (tccli.serve.worker).
"""

from __future__ import annotations

import copy
import math
import threading
from types import SimpleNamespace
from typing import Any, Optional

import networkx as nx

from tccli.config.evaluation import ValidateConfig
from tccli.config.graph import GraphConfig
from tccli.config.replacement import ABLATIONS, MODES, InterveneConfig
from tccli.config.serve import ServeConfig
from tccli.errors import TcError
from tccli.nodes import OPS, parse_feature, target_description
from tccli.serve.worker import Job

INTERVENABLE = ("feature", "head", "error")  # node kinds tc intervene can change
VALIDATE_MODES = ("free", "frozen")
MAX_TOP = 100


class BadRequest(Exception):
    """A request the server refuses: ``status`` (4xx) and a one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _field(body: dict, name: str, kinds: type | tuple[type, ...], default: Any = ..., what: str = "") -> Any:
    """``body[name]``, checked to be of ``kinds`` (bools are not numbers); missing: ``default`` or refused."""
    if name not in body or body[name] is None:
        if default is ...:
            raise BadRequest(f"the request has no {name!r} field{what}")
        return default
    value = body[name]
    numbers = (int, float)
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise BadRequest(f"{name!r} must be {_kind_names(kinds)}, got {json_type(value)}")
    if not isinstance(value, kinds):
        raise BadRequest(f"{name!r} must be {_kind_names(kinds)}, got {json_type(value)}")
    if kinds == numbers:
        try:
            value = float(value)  # JSON's NaN, Infinity and integers beyond a float are refused
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise BadRequest(f"{name!r} must be a finite number, got {body[name]!r:.40}")
    return value


def _kind_names(kinds: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "a number", float: "a number", list: "a list", dict: "an object", bool: "true/false"}
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(dict.fromkeys(names[k] for k in kinds))


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "true/false", int: "a number", float: "a number", str: "a string", list: "a list"}.get(
        type(value), "an object"
    )


def _unknown_fields(body: dict, known: tuple[str, ...]) -> None:
    extra = sorted(set(body) - set(known))
    if extra:
        raise BadRequest(f"unknown field {extra[0]!r}; this request takes {', '.join(known)}")


class Session:
    """The loaded model, transcoders and features, the graphs computed so far, and the work on them."""

    def __init__(self, config: ServeConfig, loaded: Any, transcoders: Any, features: Any = None):
        self.config = config
        self.loaded = loaded
        self.transcoders = transcoders
        self.features = features
        self.graphs: dict[str, nx.DiGraph] = {}
        self._graphs_lock = threading.Lock()
        self._means: Optional[dict] = None  # the features' mean activations, read once (worker thread)
        # the request threads' own tokenizer (the worker's may be busy) and the lock for it and the features file
        try:
            tokenizer = copy.deepcopy(loaded.tokenizer)
        except Exception:  # a tokenizer that cannot be copied: shared, under the lock
            tokenizer = loaded.tokenizer
        self._checker = SimpleNamespace(info=loaded.info, tokenizer=tokenizer)
        self.lock = threading.Lock()

    # ------------------------------------------------------------------ graphs

    def graph(self, graph_id: str) -> nx.DiGraph:
        with self._graphs_lock:
            graph = self.graphs.get(str(graph_id))
        if graph is None:
            raise BadRequest(
                f"no graph {graph_id!r} on this server (graphs: {', '.join(self.graphs) or 'none yet'})", 404
            )
        return graph

    def graph_list(self) -> list[dict]:
        with self._graphs_lock:
            items = list(self.graphs.items())
        return [
            {
                "id": graph_id,
                "prompt": graph.graph["metadata"].get("prompt"),
                "nodes": graph.number_of_nodes(),
                "edges": graph.number_of_edges(),
            }
            for graph_id, graph in items
        ]

    def graph_config(self, body: Any) -> GraphConfig:
        """A `tc graph` config for a request ``{"prompt": ..., "target": {...}, "pos": -1}``, checked as far as
        can be without the model: the prompt's tokens, the target's tokens and feature. ``target`` is
        absent (the most likely next tokens, as `tc graph`'s default), {"logit": " Paris"},
        {"logit_diff": [" 17", " 16"]} or {"feature": "L2.F57"}."""
        if not isinstance(body, dict):
            raise BadRequest('the request body must be a JSON object such as {"prompt": "..."}')
        _unknown_fields(body, ("prompt", "target", "pos"))
        prompt = _field(body, "prompt", str)
        pos = _field(body, "pos", int, -1)
        target = _field(body, "target", dict, {})
        _unknown_fields(target, ("logit", "logit_diff", "feature"))
        chosen = {key: value for key, value in target.items() if value not in (None, "", [])}
        if len(chosen) > 1:
            raise BadRequest(f"give at most one target, got {', '.join(chosen)}")
        c = self.config
        config = GraphConfig(
            transcoders=c.transcoders,
            prompt=prompt,
            model=c.model,
            device=c.device,
            model_dtype=c.model_dtype,
            max_feature_nodes=c.max_feature_nodes,
            node_threshold=c.node_threshold,
            edge_threshold=c.edge_threshold,
            batch_size=c.batch_size,
            pos=pos,
            quiet=True,
            logit=_field(chosen, "logit", str, None),
            logit_diff=list(_field(chosen, "logit_diff", list, [])),
            feature=_field(chosen, "feature", str, None),
        )
        if any(not isinstance(token, str) for token in config.logit_diff):
            raise BadRequest("'logit_diff' must be two strings [A, B]")
        try:
            config.validate()
            self._check_prompt(prompt, pos)
            with self.lock:
                from tccli.replacement.prompts import single_token

                for text in ([config.logit] if config.logit is not None else []) + config.logit_diff:
                    single_token(self._checker.tokenizer, text)
            if config.feature is not None:
                from tccli.replacement.model import layer_views
                from tccli.transcoders.files import check_feature

                check_feature(layer_views(self.transcoders), *parse_feature(config.feature))
        except TcError as exc:
            raise BadRequest(str(exc)) from None
        return config

    def _check_prompt(self, prompt: str, pos: int) -> None:
        from tccli.replacement.prompts import prompt_tokens, resolve_position

        with self.lock:
            tokens = prompt_tokens(self._checker, prompt)  # type: ignore[arg-type]
        resolve_position(pos, int(tokens.shape[0]))

    def compute_graph(self, config: GraphConfig, job: Job) -> dict:
        """(worker thread) The graph `tc graph` computes for ``config``, kept under a new id."""
        from tccli.circuit.files import from_json
        from tccli.graph import files as graph_files
        from tccli.graph.trace import attribution_graph

        job.progress("freezing the forward pass", 0, 1)
        run = attribution_graph(
            self.loaded,
            self.transcoders,
            config.prompt,
            config,
            lambda done, total: job.progress("feature rows", done, total),
        )
        job.progress("pruning and writing the graph", 0, 1)
        data = graph_files.render(run.graph, run.metadata, run.strings, run.tokens, "json", run.heads, config)
        graph = from_json(data.decode("utf-8"), "the computed graph")  # exactly what `tc graph` writes
        with self._graphs_lock:
            graph_id = str(len(self.graphs) + 1)
            self.graphs[graph_id] = graph
        return {"graph": graph_id, "nodes": graph.number_of_nodes(), "edges": graph.number_of_edges()}

    # ------------------------------------------------------------------ interventions

    def _nodes(self, graph: nx.DiGraph, ids: Any, name: str, kinds: tuple[str, ...]) -> list[str]:
        if not isinstance(ids, list) or not ids:
            raise BadRequest(f"{name!r} must be a non-empty list of node ids")
        out = []
        for node in ids:
            if not isinstance(node, str):
                raise BadRequest(f"{name!r} holds {json_type(node)}, not a node id")
            if node not in graph:
                raise BadRequest(f"unknown node id {node!r}: not in this graph")
            kind = graph.nodes[node].get("kind")
            if kind not in kinds:
                raise BadRequest(f"node {node!r} is a {kind} node; only {', '.join(kinds)} nodes can be used here")
            out.append(node)
        return out

    def _ablation(self, body: dict) -> str:
        ablation = _field(body, "ablation", str, "zero")
        if ablation not in ABLATIONS:
            raise BadRequest(f"'ablation' must be one of {', '.join(ABLATIONS)}, got {ablation!r}")
        if ablation == "mean" and self.features is None:
            raise BadRequest("mean ablation needs the features' mean activations: start tc serve with --features")
        return ablation

    def intervene_request(self, body: Any) -> tuple[nx.DiGraph, InterveneConfig]:
        """``{"graph": "1", "interventions": [{"node": "mlp0.f3@2", "op": "ablate"}, {"node": ...,
        "op": "scale", "value": 2}], "mode": "free", "ablation": "zero", "top": 10}``, checked."""
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object with 'graph' and 'interventions'")
        _unknown_fields(body, ("graph", "interventions", "mode", "ablation", "top"))
        graph = self.graph(_field(body, "graph", (str, int)))
        items = _field(body, "interventions", list)
        if not items:
            raise BadRequest("'interventions' is empty: name at least one node to ablate, set or scale")
        ops: dict[str, list[str]] = {op: [] for op in OPS}
        for item in items:
            if not isinstance(item, dict):
                raise BadRequest(f"each intervention must be an object {{node, op, value}}, got {json_type(item)}")
            _unknown_fields(item, ("node", "op", "value"))
            (node,) = self._nodes(graph, [_field(item, "node", str)], "node", INTERVENABLE)
            op = _field(item, "op", str)
            if op not in OPS:
                raise BadRequest(f"'op' must be one of {', '.join(OPS)}, got {op!r}")
            if op == "ablate":
                ops[op].append(node)
            else:
                value = _field(
                    item, "value", (int, float), what=f" for {op} (the {'activation' if op == 'set' else 'factor'})"
                )
                ops[op].append(f"{node}={float(value)!r}")
        mode = _field(body, "mode", str, "free")
        if mode not in MODES:
            raise BadRequest(f"'mode' must be one of {', '.join(MODES)}, got {mode!r}")
        top = _field(body, "top", int, 10)
        if not 1 <= top <= MAX_TOP:
            raise BadRequest(f"'top' must be in 1-{MAX_TOP}, got {top}")
        meta = graph.graph["metadata"]
        config = InterveneConfig(
            transcoders=self.config.transcoders,
            prompt=meta["prompt"],
            model=self.config.model,
            device=self.config.device,
            model_dtype=self.config.model_dtype,
            ablate=ops["ablate"],
            set=ops["set"],
            scale=ops["scale"],
            mode=mode,
            ablation=self._ablation(body),
            features=self.config.features,
            top=top,
            pos=int(meta["position"]),
        )
        return graph, config

    def intervene(self, graph: nx.DiGraph, config: InterveneConfig, job: Job) -> dict:
        """(worker thread) `tc intervene` on the graph's prompt, watching the graph's target (for a graph of
        logit targets, the most likely token's, as `tc validate` does)."""
        from tccli.evaluation.validation import graph_target, target_from_metadata
        from tccli.replacement.intervention import run_intervene

        meta = graph.graph["metadata"]
        job.progress("running the replacement model", 0, 1)
        watched = target_from_metadata(meta, self.loaded)
        result = run_intervene(config, self.loaded, self.transcoders, config.prompt, watched, self.means())
        node = graph_target(meta)[1]
        result["target_node"] = node
        if node in graph:  # what it measures, as the graph's target node says: `logit(" 40") - logit(" 20")`
            attrs = graph.nodes[node]
            demeaned = " - mean logit" if attrs.get("target_demeaned") else ""
            result["target_label"] = f"{target_description(attrs)}{demeaned} at {attrs.get('position')}"
        return result

    def means(self) -> Optional[dict]:
        """(worker thread) The features' mean activations (mean ablation), read on first use."""
        if self.features is None:
            return None
        if self._means is None:
            from tccli.replacement.intervention import feature_means
            from tccli.replacement.model import layer_views

            self._means = feature_means(self.config.features, self.loaded, layer_views(self.transcoders))
        return self._means

    # ------------------------------------------------------------------ validation

    def validate_request(self, body: Any) -> tuple[nx.DiGraph, ValidateConfig]:
        """``{"graph": "1", "nodes": [pinned node ids], "mode": "free", "ablation": "zero"}``: the subgraph of
        those nodes and the graph's targets (as the page saves it), and the `tc validate` config."""
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object with 'graph' and 'nodes'")
        _unknown_fields(body, ("graph", "nodes", "mode", "ablation"))
        graph_id = str(_field(body, "graph", (str, int)))
        graph = self.graph(graph_id)
        nodes = self._nodes(
            graph, _field(body, "nodes", list), "nodes", tuple({k for _, k in graph.nodes(data="kind")})
        )
        if not any(graph.nodes[n].get("kind") in ("feature", "head") for n in nodes):
            raise BadRequest("the pinned nodes hold no feature or head node to validate")
        mode = _field(body, "mode", str, "free")
        if mode not in VALIDATE_MODES:
            raise BadRequest(f"'mode' must be one of {', '.join(VALIDATE_MODES)}, got {mode!r}")
        # the page's saved subgraph, node for node and edge for edge in the graph's order (the random circuits
        # `tc validate` draws depend on the order, so that the figures are those of `tc validate` on that file)
        keep = set(nodes) | {n for n, kind in graph.nodes(data="kind") if kind == "target"}
        subgraph = nx.DiGraph()
        subgraph.add_nodes_from((n, copy.deepcopy(a)) for n, a in graph.nodes(data=True) if n in keep)
        subgraph.add_edges_from((u, v, dict(a)) for u, v, a in graph.edges(data=True) if u in keep and v in keep)
        subgraph.graph = copy.deepcopy(graph.graph)
        meta = subgraph.graph.setdefault("metadata", {})
        meta.update(
            pinned=list(nodes), subgraph_of={"nodes": graph.number_of_nodes(), "edges": graph.number_of_edges()}
        )
        c = self.config
        config = ValidateConfig(
            graph=f"graph {graph_id}'s pinned subgraph",
            model=c.model,
            device=c.device,
            model_dtype=c.model_dtype,
            transcoders=c.transcoders,
            features=c.features,
            ablation=self._ablation(body),
            mode=mode,
            random=c.random,
        )
        return subgraph, config

    def validate(self, subgraph: nx.DiGraph, config: ValidateConfig, job: Job) -> dict:
        """(worker thread) `tc validate`'s figures for the subgraph, and the lines it prints."""
        import json

        from tccli.evaluation.validation import results_json, run_validation, summary_lines

        results = run_validation(
            config, subgraph, self.loaded, self.transcoders, self.means() if config.ablation == "mean" else None,
            update=job.progress,
        )  # fmt: skip
        return {"results": json.loads(results_json(results)), "summary": summary_lines(results)}

    # ------------------------------------------------------------------ feature cards

    def card(self, key: str) -> str:
        """A feature's card (`L2.F57`) as `tc show --html` draws it."""
        from tccli.features.show import html_card

        if self.features is None:
            raise BadRequest("no feature cards: start tc serve with --features FEATURES.h5", 404)
        try:
            layer, index = parse_feature(key)
            with self.lock:
                if layer not in self.features.layers:
                    raise BadRequest(
                        f"{key} is not in the features file (it scored layers {self.features.layers})", 404
                    )
                self.features.check_feature(layer, index)
                record = self.features.feature(layer, index)
                return html_card(self.features, record, self.config.examples, self.features.frequencies(layer))
        except TcError as exc:
            raise BadRequest(str(exc), 404) from None
