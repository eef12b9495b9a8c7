"""`tc info PATH`: say what a tc file or folder holds.

A small dispatcher: each kind of artefact registers a ``detect(path) -> bool`` and a
``summarize(path) -> dict`` (the dict is what ``--json`` prints; it must carry ``kind`` and ``path``),
optionally a ``lines(summary) -> list[str]`` for the human view. Kinds are tried in registration order.
Registered here: activation caches (HDF5), cross-layer transcoders, transcoder folders and sets, circuit
graphs (`tc circuit`) and attribution graphs (`tc graph`); each kind's module is imported only when a file
is asked about. `tc info -` describes what stdin holds, among the kinds registered ``from_stdin`` (graphs;
HDF5 is refused: it needs seeking). ``register_kind`` adds another kind.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tccli.errors import fail
from tccli.runtime import inputs


@dataclass
class InfoKind:
    name: str
    detect: Callable[[Path], bool]
    summarize: Callable[[Path], dict]
    lines: Optional[Callable[[dict], list[str]]] = None
    from_stdin: bool = False  # whether detect and summarize read stdin for the path `-`


KINDS: list[InfoKind] = []


def register_kind(
    name: str,
    detect: Callable[[Path], bool],
    summarize: Callable[[Path], dict],
    lines: Optional[Callable[[dict], list[str]]] = None,
    from_stdin: bool = False,
) -> None:
    """Teach `tc info` a new kind of file; registering a name again replaces the earlier entry. A kind
    ``from_stdin`` is also looked for on stdin (`tc info -`): its functions then get the path `-`."""
    KINDS[:] = [k for k in KINDS if k.name != name]
    KINDS.append(InfoKind(name, detect, summarize, lines, from_stdin))


def describe(path: str | Path) -> dict:
    """The summary dict of whatever tc artefact ``path`` is (`-`: what stdin holds); TcError when it is none."""
    path = Path(path)
    if inputs.is_stdin(path):
        found = inputs.sniff(inputs.stdin_bytes("the file to describe"))
        kind = next((k for k in KINDS if k.from_stdin and k.detect(path)), None)
        if kind is None:  # HDF5 (a cache, a features file) among them: refused with the reason
            names = ", ".join(k.name for k in KINDS if k.from_stdin)
            raise inputs.refusal(found, f"something tc reads from a pipe ({names})")
        return kind.summarize(path)
    if not path.exists():
        raise fail(f"{path} does not exist")
    for kind in KINDS:
        if kind.detect(path):
            return kind.summarize(path)
    raise fail(f"{path} is not something tc knows ({', '.join(k.name for k in KINDS)})")


def render(summary: dict) -> str:
    """The human view of a summary: the kind's own lines, or key: value lines."""
    for kind in KINDS:
        if kind.name == summary.get("kind") and kind.lines is not None:
            return "\n".join(kind.lines(summary))
    return "\n".join(f"{key}: {_short(value)}" for key, value in summary.items())


def _short(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


# ============================================================================ activation caches


def _is_hdf5(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        head = handle.read(8)
    return head == b"\x89HDF\r\n\x1a\n" or path.suffix in (".h5", ".hdf5")


def _cache_summary(path: Path) -> dict:
    from tccli.data.cache_reader import ActivationCache, summarize

    with ActivationCache.open(path) as cache:
        return summarize(cache)


def _cache_lines(s: dict) -> list[str]:
    from tccli.data.cache_format import human_bytes

    state = (
        "complete"
        if s["complete"]
        else f"INCOMPLETE ({s['tokens_written']} of {s['tokens_total']} tokens; finish with tc cache --resume)"
    )
    return [
        f"{s['path']}: tc activation cache, {state}",
        f"  model        {s['model']}{' at ' + s['model_path'] if s.get('model_path') else ''} "
        f"({s['architecture']}), d_model {s['d_model']}",
        f"  layers       {', '.join(map(str, s['layers']))} (mlp_in and mlp_out each)",
        f"  tokens       {s['tokens_written']} in rows of {s['context']} (requested {s['tokens_requested']})",
        f"  storage      {s['storage']}, compression {s['compression']}; "
        f"{human_bytes(s['activation_bytes'])} of activations, file {human_bytes(s['file_bytes'])}",
        f"  data         {', '.join(s['data_sources'])} (seed {s['seed']})",
        f"  processing   {', '.join(k for k, v in s['weight_processing'].items() if v) or 'none'}",
        f"  engine       {s['engine']} (attention {s['attention']})",
        f"  written by   tc {s['tc_version']}",
    ]


# ============================================================================ transcoders


def _transcoder_summary(path: Path) -> dict:
    from tccli.transcoders.formats import format_of, load_transcoder_set, single_transcoder_path

    transcoders = load_transcoder_set(path)
    per_layer = []
    for layer, tc in transcoders.items():
        cfg = tc.config.to_dict()
        per_layer.append(
            {
                "layer": layer,
                **{
                    k: cfg.get(k)
                    for k in (
                        "kind",
                        "activation",
                        "k",
                        "skip",
                        "input_space",
                        "output_space",
                        "d_in",
                        "d_out",
                        "n_features",
                        "model_name",
                        "input_hook",
                        "output_hook",
                    )
                },
                "source": cfg.get("source") or {"format": "tc"},
            }
        )
    return {
        "kind": "transcoder",
        "path": str(path),
        "format": format_of(path) or "folder of transcoders",
        "set": not (single_transcoder_path(path) and len(transcoders) == 1),
        "layers": sorted(transcoders),
        "transcoders": per_layer,
    }


def _is_transcoder_or_set(path: Path) -> bool:
    """A transcoder in any format tc reads, or a folder of them."""
    from tccli.transcoders.formats import format_of

    if format_of(path) is not None:
        return True
    return path.is_dir() and any(format_of(p) is not None for p in path.iterdir())


def _transcoder_lines(s: dict) -> list[str]:
    title = "transcoder" if not s["set"] else f"set of {len(s['transcoders'])} transcoders"
    lines = [f"{s['path']}: {title} ({s['format']})"]
    for t in s["transcoders"]:
        kind = t.get("activation") + (f" k={t['k']}" if t.get("k") else "") + (", skip" if t.get("skip") else "")
        lines.append(
            f"  layer {t['layer']}: {t.get('kind')} ({kind}) {t.get('d_in')} -> {t.get('n_features')} "
            f"features -> {t.get('d_out')}, reads {t.get('input_space')}, writes {t.get('output_space')} "
            f"({t.get('model_name')}; from {t['source'].get('format')})"
        )
    return lines


# ============================================================================ cross-layer transcoders


def _is_cross_layer(path: Path) -> bool:
    from tccli.transcoders.files import is_cross_layer_folder
    from tccli.transcoders.formats import circuit_tracer_clt

    return is_cross_layer_folder(path) or circuit_tracer_clt.is_clt(path)


def _cross_layer_summary(path: Path) -> dict:
    from tccli.transcoders.files import is_cross_layer_folder
    from tccli.transcoders.formats import load_cross_layer_any

    # decoders stay on disk: tc info reads a 426K-feature CLT's encoders and headers, not its decoders
    clt = load_cross_layer_any(path, lazy_decoders=True)
    config = clt.config
    source = config.source or {}
    return {
        "kind": "cross-layer-transcoder",
        "path": str(path),
        # the layout of this folder; a tc folder converted from another layout keeps that in "source"
        "format": "tc" if is_cross_layer_folder(path) else source.get("file_format") or source.get("format"),
        "layers": list(config.layers),
        "n_features": config.n_features,
        "total_features": config.n_features * len(config.layers),
        "decoder_blocks": len(config.layers) * (len(config.layers) + 1) // 2,
        **{
            key: getattr(config, key)
            for key in (
                "activation",
                "k",
                "skip",
                "input_space",
                "output_space",
                "d_in",
                "d_out",
                "model_name",
                "input_hooks",
                "output_hooks",
            )
        },
        "source": source or {"format": "tc"},
    }


def _cross_layer_lines(s: dict) -> list[str]:
    layers = s["layers"]
    span = (
        f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else ", ".join(map(str, layers))
    )
    activation = s["activation"] + (f" k={s['k']}" if s.get("k") else "")
    hooks = ""
    if s.get("input_hooks") and s["input_hooks"][0]:  # recorded per layer: shown as blocks.L.<hook>
        prefix = f"blocks.{layers[0]}."
        hook_in, hook_out = s["input_hooks"][0], (s.get("output_hooks") or [None])[0] or "?"
        hooks = f" (hooks {hook_in.replace(prefix, 'blocks.L.')} -> {hook_out.replace(prefix, 'blocks.L.')})"
    return [
        f"{s['path']}: cross-layer transcoder ({s['format']})",
        f"  layers       {span} ({len(layers)}; each layer's features write to it and every later one: "
        f"{s['decoder_blocks']} decoder blocks)",
        f"  features     {s['n_features']} per layer, {s['total_features']} in all; "
        f"d_in {s['d_in']} -> d_out {s['d_out']}",
        f"  activation   {activation}",
        f"  skip         {'yes' if s['skip'] else 'no'}",
        f"  spaces       reads {s['input_space']}, writes {s['output_space']}{hooks}",
        f"  model        {s.get('model_name') or 'not recorded'}",
    ] + _origin_lines(s)


def _origin_lines(s: dict) -> list[str]:
    """Where a tc CLT folder was converted from (tc convert keeps the source layout and path)."""
    source = s.get("source") or {}
    origin = source.get("file_format") or source.get("format")
    if s["format"] != "tc" or not origin or origin == "tc":
        return []
    return [f"  from         {origin} ({source.get('set') or source.get('path')})"]


# ============================================================================ graphs (their own modules say how)


def _circuit_files() -> Any:
    from tccli.circuit import files

    return files


def _graph_files() -> Any:
    from tccli.graph import files

    return files


register_kind("activation-cache", _is_hdf5, _cache_summary, _cache_lines)
register_kind("cross-layer-transcoder", _is_cross_layer, _cross_layer_summary, _cross_layer_lines)
register_kind("transcoder", _is_transcoder_or_set, _transcoder_summary, _transcoder_lines)
register_kind(
    "circuit-graph",
    lambda path: _circuit_files().is_circuit_graph_file(path),
    lambda path: _circuit_files().circuit_graph_summary(path),
    lambda summary: _circuit_files().circuit_graph_summary_lines(summary),
    from_stdin=True,
)
register_kind(
    "attribution-graph",
    lambda path: _graph_files().is_attribution_graph_file(path),
    lambda path: _graph_files().attribution_graph_file_summary(path),
    lambda summary: _graph_files().summary_lines(summary),
    from_stdin=True,
)
