"""The Python API: the `tc` commands as functions, for notebooks and scripts (``import tccli``).

Each function here is a thin wrapper over the library code its command calls (see ``tccli.cli.app``): it
takes keyword arguments with the names and defaults of the command's settings dataclass in
``tccli.config`` (``tccli.train(tokens="200k")`` is `tc train --tokens 200k`), builds and validates that
dataclass, and calls the library. Where the library takes a loaded model and transcoders, the functions
take either names (loaded here) or the objects ``load_model`` and ``load_transcoders`` return, so a
notebook loads once and reuses them. They return the library's objects instead of printing. No math
lives here.

``tccli/__init__.py`` exports these names lazily, so ``import tccli`` stays free of torch.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from tccli.config.circuit import CircuitConfig
from tccli.config.data import CacheConfig
from tccli.config.evaluation import EvalConfig, GreaterThanConfig, ValidateConfig
from tccli.config.features import ScoreConfig
from tccli.config.graph import GraphConfig
from tccli.config.replacement import InterveneConfig
from tccli.config.training import TrainConfig
from tccli.errors import fail

# Settings that only choose how a command prints (a table or JSON, its width); a function returns data.
_PRINTING_ONLY = frozenset({"json", "wide"})


# ============================================================================ settings from keyword arguments


def _settings_parameters(config_cls: type, taken: set[str]) -> list[inspect.Parameter]:
    """One keyword-only parameter per field of ``config_cls``, in `tc COMMAND --help`'s order: the required
    ones (without a default), the others, the late ones, the ones only torchrun uses."""
    hints = typing.get_type_hints(config_cls)

    def group(f: dataclasses.Field) -> int:
        if f.metadata.get("required") or f.metadata.get("argument"):
            return 0
        return 3 if f.metadata.get("torchrun") else 2 if f.metadata.get("late") else 1

    parameters = []
    for f in sorted(dataclasses.fields(config_cls), key=group):
        if not f.metadata.get("cli", True) or f.name in taken or f.name in _PRINTING_ONLY:
            continue
        if f.metadata.get("required"):
            default: Any = inspect.Parameter.empty
        elif f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory()  # type: ignore[misc]
        parameters.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=hints[f.name])
        )
    return parameters


def _settings_help(config_cls: type, parameters: list[inspect.Parameter]) -> str:
    """The settings' help texts, as `tc COMMAND --help` shows them, for the function's docstring."""
    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(config_cls)}
    lines = ["", "    Settings (the command's flags, with underscores):"]
    lines += [f"        {p.name}: {helps[p.name]}" for p in parameters if p.name in helps]
    return "\n".join(lines)


def takes_settings(config_cls: type) -> Callable:
    """Give ``fn(leading..., *, own..., **settings)`` the fields of ``config_cls`` as keyword arguments.

    The signature (what ``help()``, ``inspect.signature`` and a notebook's completion show) is the function's
    own parameters with one keyword-only parameter per field in between, so the names and defaults are the
    settings' own and are written once; a misspelt or missing name is a TypeError, as for any function.
    """

    def decorate(fn: Callable) -> Callable:
        own = list(inspect.signature(fn).parameters.values())
        leading = [p for p in own if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD]
        trailing = [p for p in own if p.kind == inspect.Parameter.KEYWORD_ONLY]
        settings = _settings_parameters(config_cls, {p.name for p in own})
        signature = inspect.Signature(
            leading + settings + trailing, return_annotation=inspect.signature(fn).return_annotation
        )

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise TypeError(f"{fn.__name__}(): {exc}") from None
            return fn(*args, **kwargs)

        wrapper.__signature__ = signature  # type: ignore[attr-defined]
        wrapper.__doc__ = (fn.__doc__ or "").rstrip() + "\n" + _settings_help(config_cls, settings)
        return wrapper

    return decorate


def build_settings(config_cls: type, values: dict[str, Any]) -> Any:
    """``config_cls`` filled from keyword arguments and validated, as the command line fills it.

    Paths may be ``pathlib.Path``; a list setting (``data``) may be given one value; a count (``tokens``)
    may be written as on the command line ("200k").
    """
    hints = typing.get_type_hints(config_cls)
    known = {f.name: f for f in dataclasses.fields(config_cls)}
    filled = {}
    for name, value in values.items():
        field = known[name]
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if typing.get_origin(hints[name]) is list:
            value = (
                [value]
                if isinstance(value, str)
                else [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
            )
        parser = field.metadata.get("parser")
        if parser is not None and isinstance(value, str):
            try:
                value = parser(value)
            except Exception as exc:  # the parser's error is typer's, meant for a flag
                raise fail(f"{name}={value!r}: {exc}") from None
        filled[name] = value
    config = config_cls(**filled)
    config.validate()
    return config


def _stderr_log(command: str, quiet: bool) -> Callable[[str], None]:
    """What the command prints on stderr as it goes (nothing when ``quiet``)."""
    if quiet:
        return lambda message: None
    return lambda message: print(f"tc {command}: {message}", file=sys.stderr)


# ============================================================================ models and transcoders


def load_model(model: Optional[str | Path] = None, device: str = "auto", model_dtype: str = "float32") -> Any:
    """Load a language model: a HuggingFace hub name, a local HuggingFace folder, or None / 'builtin' for the
    model shipped with tc. Returns a ``LoadedModel`` (``.bridge``, ``.tokenizer``, ``.info``, ``.device``).

    Examples:
        >>> loaded = tccli.load_model("../shared/models/stories260K", device="cpu")
        >>> loaded.info.n_layers
        5
    """
    from tccli.model.loading import load_model as load

    return load(None if model is None else os.fspath(model), device, model_dtype)


def load_transcoders(path: str | Path, device: str = "cpu", layers: Optional[list[int]] = None) -> Any:
    """Load transcoders: a tc folder, a folder of per-layer folders, a file in another library's format, or a
    hub id (OWNER/REPO). Returns {layer: Transcoder}, only ``layers`` when given; a cross-layer transcoder
    (tc's or circuit-tracer's layout) comes back whole as a CrossLayerTranscoder (``layers`` must be among its
    layers), since each layer's output depends on every earlier layer's features.

    Examples:
        >>> transcoders = tccli.load_transcoders("runs/tcs", layers=[0, 1])
        >>> sorted(transcoders)
        [0, 1]
    """
    from tccli.transcoders.formats import load_transcoders as load

    return load(os.fspath(path), device, None if layers is None else list(layers))


def _is_loaded(transcoders: Any) -> bool:
    """Whether ``transcoders`` is what ``load_transcoders`` returns (a per-layer set or a CLT), not a path."""
    from tccli.transcoders.cross_layer import CrossLayerTranscoder

    return isinstance(transcoders, (dict, CrossLayerTranscoder))


def _object_settings(config_cls: type, model: Any, transcoders: Any, prompt: str, settings: dict) -> Any:
    """``config_cls`` from the settings, the prompt, and ``model`` and ``transcoders`` as the saved settings
    record them: a loaded model by its name, transcoders given as objects by no path."""
    from tccli.model.loading import LoadedModel

    names = {
        "model": model.info.name if isinstance(model, LoadedModel) else (None if model is None else os.fspath(model)),
        "transcoders": "" if _is_loaded(transcoders) else os.fspath(transcoders),
    }
    return build_settings(config_cls, {**settings, **names, "prompt": prompt})


def _model_and_transcoders(model: Any, transcoders: Any, config: Any, lazy_decoders: bool = False) -> tuple[Any, dict]:
    """The model and the transcoders: the objects given, or loaded from the names in ``config`` (a CLT with its
    decoders left on disk with ``lazy_decoders``: graphs and circuits read the active features' rows only)."""
    from tccli.model.loading import LoadedModel
    from tccli.transcoders.formats import load_transcoders as load

    loaded = model if isinstance(model, LoadedModel) else load_model(config.model, config.device, config.model_dtype)
    if _is_loaded(transcoders):
        return loaded, transcoders
    return loaded, load(config.transcoders, loaded.device, lazy_decoders=lazy_decoders)


def replacement_model(
    model: Any,
    transcoders: Any,
    prompt: str,
    features: Optional[str | Path] = None,
    device: str = "auto",
    model_dtype: str = "float32",
) -> Any:
    """The replacement model on one prompt (BOS prepended): every MLP replaced by its transcoder plus an error
    term, the clean run captured. ``model``: a name or folder, or ``load_model``'s result; ``transcoders``: a
    path, or ``load_transcoders``' result; ``features``: a `tc score` file, for mean ablation. Returns a
    ``tccli.replacement.model.ReplacementModel``: ``.clean_logits``, ``.clean_activations(layer)``
    [1, tokens, features], ``.run(rows, mode)`` for batched interventions (``intervene`` is the simple way).

    Examples:
        >>> rm = tccli.replacement_model(loaded, transcoders, "Once upon a time")
        >>> rm.clean_activations(0)[0, -1].topk(3)  # layer 0's most active features at the last token
    """
    from tccli.model.loading import LoadedModel
    from tccli.replacement.intervention import feature_means
    from tccli.replacement.model import ReplacementModel, layer_views
    from tccli.replacement.prompts import prompt_tokens
    from tccli.transcoders.files import check_transcoders

    if not isinstance(model, LoadedModel):
        model = load_model(model, device, model_dtype)
    loaded, loaded_transcoders = model, transcoders
    if not _is_loaded(transcoders):
        loaded_transcoders = load_transcoders(transcoders, loaded.device)
    check_transcoders(layer_views(loaded_transcoders), loaded)
    means = feature_means(os.fspath(features), loaded, layer_views(loaded_transcoders)) if features else None
    return ReplacementModel(loaded, loaded_transcoders, prompt_tokens(loaded, prompt).unsqueeze(0), means)


# ============================================================================ tc cache, train, eval, score


@takes_settings(CacheConfig)
def cache_activations(*, progress: Optional[Callable[[int, int], None]] = None, **settings: Any) -> Any:
    """`tc cache`: run the model over text and store each chosen layer's MLP input and output in HDF5.
    ``progress(done, total)`` counts tokens. Returns a ``CacheResult`` (``.path``, ``.n_tokens``, ``.seconds``).

    Examples:
        >>> result = tccli.cache_activations(model="../shared/models/stories260K", data="stories.txt",
        ...                                  tokens="8k", context=64, out="acts.h5", quiet=True)
        >>> result.n_tokens
        8000
    """
    from tccli.data.cache_writer import cache_output, write_cache
    from tccli.model.loading import load_model as load

    config = build_settings(CacheConfig, settings)
    with cache_output(config) as output:  # the output checked and locked before the model loads
        loaded = load(config.model, config.device, config.model_dtype)
        return write_cache(output, loaded, log=_stderr_log("cache", config.quiet), progress=progress)


@takes_settings(TrainConfig)
def train(**settings: Any) -> dict[int, Any]:
    """`tc train`: train one transcoder (or MLP-output SAE) per layer from an activation cache. Returns
    {layer: Transcoder}; each is also saved in ``out``/layer_L (with the log and the checkpoint).

    Examples:
        >>> transcoders = tccli.train(cache="acts.h5", out="tcs", tokens="200k", expansion=4, k=8)
        >>> sorted(transcoders)
        [0, 1, 2, 3, 4]
    """
    from tccli.training.train import train as train_transcoders

    return train_transcoders(build_settings(TrainConfig, settings))


@takes_settings(EvalConfig)
def evaluate(*, progress: Optional[Callable[[str, int, int], None]] = None, **settings: Any) -> Any:
    """`tc eval`: L0, FVU, dead and dense features, and next-token cross-entropy with each MLP replaced (and
    all at once). ``progress(stage, done, total)`` counts batches. Returns an ``EvalResult``: ``.layers`` (a
    dict of metrics per layer), ``.all_layers``, ``.to_dict()`` (what `tc eval --json` prints).

    Examples:
        >>> result = tccli.evaluate(model="../shared/models/stories260K", transcoders="tcs",
        ...                         data="held-out.txt", tokens="10k", context=64)
        >>> [(row["layer"], row["fvu"], row["recovered_zero"]) for row in result.layers]
    """
    from tccli.evaluation.evaluate import load_eval_inputs, run_eval

    config = build_settings(EvalConfig, settings)
    loaded, transcoders, tokens = load_eval_inputs(config)
    return run_eval(config, loaded, transcoders, tokens, progress)


@takes_settings(ScoreConfig)
def score_features(*, progress: Optional[Callable[[str, int, int], None]] = None, **settings: Any) -> dict:
    """`tc score`: describe every feature in one pass over text (density, top and quantile examples,
    de-embeddings, logit effects) into a features file. ``progress(stage, done, total)`` counts rows. Returns
    a summary ({"out", "layers", "tokens", ...}); read the file with ``tccli.features.files.FeaturesFile``.

    Examples:
        >>> summary = tccli.score_features(model="../shared/models/stories260K", transcoders="tcs",
        ...                                data="stories.txt", tokens="20k", context=64, out="features.h5")
        >>> summary["out"]
        'features.h5'
    """
    from tccli.features.score import load_score_inputs, run_score
    from tccli.runtime import outputs

    config = build_settings(ScoreConfig, settings)
    with outputs.claim(config.out, config.force, [*config.data, config.transcoders, config.model]):
        loaded, transcoders, rows = load_score_inputs(config)
        return run_score(config, loaded, transcoders, rows, progress, log=_stderr_log("score", config.quiet))


# ============================================================================ tc graph, circuit, intervene


@takes_settings(GraphConfig)
def attribution_graph(
    model: Any, transcoders: Any, prompt: str, *, progress: Optional[Callable[[int, int], None]] = None, **settings: Any
) -> Any:
    """`tc graph`: the whole attribution graph of the local replacement model on ``prompt``, pruned by
    influence and scored. ``model``: a name or folder, or ``load_model``'s result; ``transcoders``: a path,
    or ``load_transcoders``' result. Returns a ``GraphRun`` (``.graph``: ``.replacement``, ``.completeness``;
    ``.metadata``; ``tccli.graph.files.to_networkx`` gives the pruned graph); with ``out`` the graph is also
    written there in ``format``.

    Examples:
        >>> run = tccli.attribution_graph(loaded, transcoders, "Once upon a time", max_feature_nodes=200)
        >>> run.graph.replacement, run.graph.completeness  # the replacement and completeness scores
    """
    from tccli.graph import files as graph_files
    from tccli.graph.trace import attribution_graph as trace_graph
    from tccli.runtime import outputs

    config = _object_settings(GraphConfig, model, transcoders, prompt, settings)
    with outputs.claim(config.out, config.force, [config.transcoders, config.model]):
        loaded, loaded_transcoders = _model_and_transcoders(model, transcoders, config, lazy_decoders=True)
        run = trace_graph(loaded, loaded_transcoders, prompt, config, progress)
        if config.out:
            outputs.atomic_write_bytes(
                config.out,
                graph_files.render(run.graph, run.metadata, run.strings, run.tokens, config.format, run.heads, config),
            )
    return run


@takes_settings(CircuitConfig)
def circuit_graph(model: Any, transcoders: Any, prompt: str, **settings: Any) -> tuple[Any, dict]:
    """`tc circuit`: trace the paths into one target (``feature``, ``logit``, ``logit_diff`` or ``direction``)
    by greedy path search. ``model`` and ``transcoders`` as for ``attribution_graph``. Returns (a networkx
    DiGraph, a summary {"nodes", "edges", "value", "explained", "fraction", "error"}); with ``out`` the graph
    is also written there in ``format``.

    Examples:
        >>> graph, summary = tccli.circuit_graph(loaded, transcoders, "Lily was happy. Then", logit_diff=["she", "he"])
        >>> sorted(graph.in_edges("target", data="weight"), key=lambda edge: -abs(edge[2]))[:5]  # the largest
    """
    from tccli.circuit import files as circuit_files
    from tccli.circuit.trace import circuit_graph as trace_circuit
    from tccli.runtime import outputs

    config = _object_settings(CircuitConfig, model, transcoders, prompt, settings)
    with outputs.claim(config.out, config.force, [config.transcoders, config.direction, config.model]):
        loaded, loaded_transcoders = _model_and_transcoders(model, transcoders, config, lazy_decoders=True)
        graph, summary = trace_circuit(loaded, loaded_transcoders, prompt, config)
        if config.out:
            outputs.atomic_write_bytes(config.out, circuit_files.render(graph, config.format, config))
    return graph, summary


@takes_settings(InterveneConfig)
def intervene(model: Any, transcoders: Any, prompt: str, **settings: Any) -> dict:
    """`tc intervene`: ablate (``ablate``), set (``set``) or scale (``scale``) features, head terms and error
    terms in the replacement model, given as node ids ("mlp2.f17@5", "attn1.h3@4", "err2@5"; "@*" every
    position). ``model`` and ``transcoders`` as for ``attribution_graph``. Returns what `tc intervene --json`
    prints: the target before and after (when one is given), the top next tokens before and after, the KL.

    Examples:
        >>> result = tccli.intervene(loaded, transcoders, "Lily was happy. Then", ablate=["mlp3.f32@-1"],
        ...                          logit_diff=["she", "he"])
        >>> result["target"]["before"], result["target"]["after"]
    """
    from tccli.replacement.intervention import run_intervene

    config = _object_settings(InterveneConfig, model, transcoders, prompt, settings)
    loaded, loaded_transcoders = _model_and_transcoders(model, transcoders, config)
    return run_intervene(config, loaded, loaded_transcoders, prompt)


# ============================================================================ tc greater-than, validate


@takes_settings(GreaterThanConfig)
def greater_than(*, progress: Optional[Callable[[str, int, Optional[int]], None]] = None, **settings: Any) -> dict:
    """`tc greater-than`: the model's probability difference on the greater-than prompts, clean and with MLPs
    replaced by ``transcoders``. Returns what `tc greater-than --json` prints.

    Examples:
        >>> result = tccli.greater_than(model="gpt2", transcoders="tcs")
        >>> result["clean"], result["replaced"], result["all_replaced"]
    """
    from tccli.evaluation.greater_than import load_greater_than_inputs, run_greater_than

    config = build_settings(GreaterThanConfig, settings)
    loaded, transcoders, graph = load_greater_than_inputs(config)
    return run_greater_than(config, loaded, transcoders, graph, progress)


@takes_settings(ValidateConfig)
def validate_circuit(
    *, progress: Optional[Callable[[str, int, int], None]] = None, **settings: Any
) -> tuple[Any, dict]:
    """`tc validate`: test a circuit graph (a JSON file from ``circuit_graph`` or ``attribution_graph``)
    against the model: necessity, sufficiency, per-node faithfulness, a random baseline. Returns (the graph,
    the results); with ``out`` the graph annotated with the results is written there.

    Examples:
        >>> graph, results = tccli.validate_circuit(graph="g.json", task="greater-than")
        >>> results["circuit"], results["random"]["summary"]  # the circuit against random ones of its size
    """
    from tccli.circuit.files import read_graph
    from tccli.evaluation.validation import input_paths, load_validation_inputs, run_validation, write_validated_graph
    from tccli.runtime import outputs
    from tccli.runtime.progress import no_progress

    config = build_settings(ValidateConfig, settings)
    graph = read_graph(config.graph)  # its metadata names the model and transcoders to load
    meta = graph.graph.get("metadata", {})
    with outputs.claim(config.out, config.force, input_paths(config, meta) if config.out else ()):
        loaded, transcoders, means, prompts = load_validation_inputs(config, meta)
        results = run_validation(config, graph, loaded, transcoders, means, prompts, update=progress or no_progress)
        if config.out:
            write_validated_graph(graph, results, config.out)
    return graph, results
