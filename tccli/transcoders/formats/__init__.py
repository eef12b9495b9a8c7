"""Every transcoder format tc reads, and ``tc convert`` between them. I/O only (no model, no maths).

Readable (``load_transcoder_set`` takes any of these, a folder of single ones, or a hub id):

    tc              a folder with transcoder.safetensors + config.json (tccli.transcoders.files), or a folder of them
    saelens         cfg.json + sae_weights.safetensors (standard, topk, transcoder, skip_transcoder,
                    jumprelu_transcoder, jumprelu_skip_transcoder)
    sparsify        layers.N.mlp/ with cfg.json + sae.safetensors, or a sparsify run folder (config.json beside
                    those folders and the trainer's optimizer_*.pt, lr_scheduler_*.pt and state.pt, which are
                    left alone)
    paper-pt        the paper's GPT-2 .pt files (restricted unpickler)
    gemma-scope     params.npz (a file, a folder holding one, or a layer_L/... tree with one per layer)
    circuit-tracer  a set: config.yaml + layer_{i}.safetensors (or the files config.yaml lists)
    peek            the paper authors' Peek folders: sae_info.json + sae.json + sae.safetensors (their
                    Pythia-2.8B and re-packaged GPT-2 sets)

Writable (``tc convert --to``): tc, saelens, sparsify, gemma-scope, circuit-tracer, peek, where the format can
hold the transcoder (each writer refuses with one line what it cannot express).

Cross-layer transcoders (``load_transcoders``, ``convert``): tc's own CLT folder (tccli.transcoders.files),
circuit-tracer's CLT layout and Gemma Scope 2's CLT files listed by a circuit-tracer config
(formats.circuit_tracer_clt); they convert to tc or circuit-tracer only. Their decoders can stay on disk
(``lazy_decoders=True``, tccli.transcoders.lazy_decoders).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch

from tccli.config.transcoders import WRITE_FORMATS
from tccli.errors import TcError, fail
from tccli.transcoders.cross_layer import CrossLayerTranscoder
from tccli.transcoders.files import (
    is_cross_layer_folder,
    is_transcoder_folder,
    layer_folder_name,
    load_cross_layer,
    load_transcoder,
    save_cross_layer,
    save_transcoder,
)
from tccli.transcoders.formats import circuit_tracer, circuit_tracer_clt, gemma_scope, paper, peek, saelens, sparsify
from tccli.transcoders.formats.hub import download, looks_like_hub_id
from tccli.transcoders.lazy_decoders import load_tc_cross_layer_lazily
from tccli.transcoders.transcoder import Transcoder

# What a folder of single transcoders may hold, one per layer (said when one of its entries is unreadable).
FOLDER_MEMBERS = "tc, SAELens, sparsify or Peek folders, the paper's .pt files or Gemma Scope params.npz"

# One transcoder per path: (name, detect(path), read(path)), tried in this order.
SINGLE_FORMATS: list[tuple[str, Callable[[Path], bool], Callable[[Path], Transcoder]]] = [
    ("tc", is_transcoder_folder, load_transcoder),
    ("saelens", saelens.detect, saelens.read),
    ("sparsify", sparsify.detect, sparsify.read),
    ("paper-pt", paper.detect, paper.read),
    ("gemma-scope", gemma_scope.detect, gemma_scope.read),
    ("peek", peek.detect, peek.read),
]


def format_of(path: Path) -> Optional[str]:
    """The format of one transcoder or set at ``path``, or None."""
    if circuit_tracer.is_set(path):
        return "circuit-tracer"
    for name, detect, _ in SINGLE_FORMATS:
        if detect(path):
            return name
    if gemma_scope.is_set(path):
        return "gemma-scope"
    if sparsify.is_run(path):
        return "sparsify"
    return None


def single_transcoder_path(path: Path) -> bool:
    """Whether ``path`` is one transcoder in a readable single-transcoder format."""
    return any(detect(path) for _, detect, _ in SINGLE_FORMATS)


def load_any_transcoder(path: str | Path, device: str | torch.device = "cpu") -> Transcoder:
    path = Path(path)
    for _, detect, read in SINGLE_FORMATS:
        if detect(path):
            return read(path).to(device)
    raise fail(
        f"{path} is not a transcoder: expected a tc, SAELens, sparsify or Peek folder, a paper .pt file "
        "or a Gemma Scope params.npz"
    )


def resolve(path: str | Path) -> Path:
    """A local path, downloading a hub id first (formats.hub)."""
    text = str(path)
    if looks_like_hub_id(text):
        return download(text)
    path = Path(text).expanduser()
    if not path.exists():
        raise fail(f"transcoders {path} do not exist")
    return path


def recorded_path(path: str) -> str:
    """How a file tc writes records the transcoders it was made with: a local path made absolute (symlinks
    kept), so that the file still finds them when used from another folder; a hub id, or nothing, as given."""
    if not path or looks_like_hub_id(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def _read_all(path: Path, origin: str) -> dict[int, Transcoder]:
    if is_cross_layer_folder(path) or circuit_tracer_clt.is_clt(path):
        raise fail(f"{origin} is a cross-layer transcoder, which this command does not read yet")
    if circuit_tracer.is_set(path):
        return circuit_tracer.read_set(path, origin)
    if single_transcoder_path(path):
        transcoder = load_any_transcoder(path)
        if transcoder.config.layer is None:
            raise fail(f"{path}: config names no layer")
        return {transcoder.config.layer: transcoder}
    if gemma_scope.is_set(path):
        return {layer: gemma_scope.read(file, layer) for layer, file in gemma_scope.find_set(path).items()}
    if sparsify.is_run(path):
        return sparsify.read_run(path)
    if not path.is_dir():
        raise fail(
            f"{path} is not a transcoder: expected a tc, SAELens, sparsify or Peek folder, a paper .pt file, "
            "a Gemma Scope params.npz, a circuit-tracer set (config.yaml) or a folder of them"
        )
    out: dict[int, Transcoder] = {}
    children = sorted(p for p in path.iterdir() if single_transcoder_path(p))
    if not children:
        raise fail(f"{path} holds no transcoder folders: tc looked for {FOLDER_MEMBERS}, one per layer")
    for child in children:
        try:
            transcoder = load_any_transcoder(child)
        except TcError as exc:
            raise fail(f"{exc} (tc read {path} as a folder of transcoders, one per layer: {FOLDER_MEMBERS})") from None
        layer = transcoder.config.layer
        if layer is None:
            raise fail(f"{child}: config names no layer")
        if layer in out:
            raise fail(f"{path} holds two transcoders for layer {layer}")
        out[layer] = transcoder
    return out


def load_transcoder_set(
    path: str | Path, device: str | torch.device = "cpu", layers: Optional[list[int]] = None
) -> dict[int, Transcoder]:
    """A transcoder, a set, a folder of single transcoders in any readable format, or a hub id ->
    {layer: Transcoder}, restricted to ``layers`` when given (each must be there)."""
    local = resolve(path)
    everything = _read_all(local, str(path))
    if layers is not None:
        missing = [layer for layer in layers if layer not in everything]
        if missing:
            raise fail(f"no transcoder for layer {missing[0]} in {path} (has {sorted(everything) or 'none'})")
        everything = {layer: everything[layer] for layer in layers}
    return {layer: t.to(device) for layer, t in sorted(everything.items())}


def is_cross_layer(path: str | Path) -> bool:
    """Whether ``path`` (local or a hub id) holds a cross-layer transcoder in a readable format."""
    local = resolve(path)
    return is_cross_layer_folder(local) or circuit_tracer_clt.is_clt(local)


def load_cross_layer_any(
    path: str | Path, device: str | torch.device = "cpu", lazy_decoders: bool = False, origin: Optional[str] = None
) -> CrossLayerTranscoder:
    """A CLT in any readable layout (tc's folder, circuit-tracer's, Gemma Scope 2's via a circuit-tracer
    config) or a hub id; with ``lazy_decoders`` its decoders stay on disk and are read row by row."""
    local = resolve(path)
    if is_cross_layer_folder(local):
        return load_tc_cross_layer_lazily(local, device) if lazy_decoders else load_cross_layer(local, device)
    if circuit_tracer_clt.is_clt(local):
        return circuit_tracer_clt.read_clt(local, origin or str(path), lazy=lazy_decoders).to(device)
    raise fail(f"{path} is not a cross-layer transcoder (a tc CLT folder or a circuit-tracer CLT)")


def load_transcoders(
    path: str | Path,
    device: str | torch.device = "cpu",
    layers: Optional[list[int]] = None,
    lazy_decoders: bool = False,
) -> dict[int, Transcoder] | CrossLayerTranscoder:
    """What a command that reads per-layer sets and cross-layer transcoders calls: a CrossLayerTranscoder
    for a CLT (``layers``, when given, must be among its layers; the CLT is kept whole, because a
    layer's output depends on every earlier layer's features; ``lazy_decoders`` leaves its decoders on
    disk), else ``load_transcoder_set``."""
    local = resolve(path)
    if not (is_cross_layer_folder(local) or circuit_tracer_clt.is_clt(local)):
        return load_transcoder_set(local, device, layers)
    clt = load_cross_layer_any(local, device, lazy_decoders, origin=str(path))
    missing = [layer for layer in layers or [] if layer not in clt.layers]
    if missing:
        raise fail(f"no layer {missing[0]} in the cross-layer transcoder {path} (has layers {clt.layers})")
    return clt


# ----------------------------------------------------------------------------- conversion


# One transcoder per folder: format -> (check(transcoder, where), write(transcoder, folder)).
WRITERS: dict[str, tuple[Callable, Callable]] = {
    "tc": (lambda transcoder, where: None, save_transcoder),
    "saelens": (saelens.check, saelens.write),
    "sparsify": (sparsify.check, sparsify.write),
    "gemma-scope": (gemma_scope.check, gemma_scope.write),
    "peek": (peek.check, peek.write),
}


def write_transcoder(transcoder: Transcoder, folder: str | Path, fmt: str) -> Path:
    if fmt not in WRITERS:
        raise fail(f"unknown output format {fmt!r}: use {', '.join(WRITE_FORMATS)}")
    return WRITERS[fmt][1](transcoder, folder)


def _member_name(fmt: str, layer: int) -> str:
    return sparsify.folder_name(layer) if fmt == "sparsify" else layer_folder_name(layer)


# Formats whose TopK keeps the k largest pre-activations as they are (tc's signed_topk): tc's own topk
# written there differs on tokens with fewer than k positive pre-activations.
SIGNED_TOPK_FORMATS = ("circuit-tracer", "peek")


def convert(source: str | Path, destination: str | Path, fmt: str, notes: Optional[list[str]] = None) -> list[Path]:
    """Convert a transcoder or a set (any readable format) to ``fmt`` under ``destination``.

    A single transcoder becomes one folder at ``destination``; a set becomes ``destination/layer_L``
    (sparsify: ``layers.L.mlp``; circuit-tracer: config.yaml + layer_L.safetensors). Refuses to write into
    an existing non-empty folder, and checks the whole set can be written before writing any of it.
    Where the written file computes something other than the transcoder (tc's topk in a signed-TopK
    format), one line saying so is appended to ``notes``. A cross-layer transcoder converts to tc or
    circuit-tracer (its own layouts), whole.
    """
    from tccli.runtime import outputs

    if fmt not in WRITE_FORMATS:
        raise fail(f"unknown output format {fmt!r}: use {', '.join(WRITE_FORMATS)}")
    destination = Path(destination).expanduser()
    outputs.check_not_input(destination, [source])

    def refuse_existing() -> None:
        if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
            raise fail(f"{destination} already exists and is not an empty folder; choose another --out")

    refuse_existing()
    local = resolve(source)
    if is_cross_layer_folder(local) or circuit_tracer_clt.is_clt(local):
        return _convert_cross_layer(local, str(source), destination, fmt, refuse_existing)
    transcoders = load_transcoder_set(local)
    single = fmt != "circuit-tracer" and single_transcoder_path(local) and len(transcoders) == 1
    if (
        notes is not None
        and fmt in SIGNED_TOPK_FORMATS
        and any(t.config.activation == "topk" for t in transcoders.values())
    ):
        notes.append(
            f"{fmt}'s TopK keeps the k largest pre-activations even when negative; tc's topk applies "
            "ReLU after the selection, so the two differ on tokens with fewer than k positive "
            f"pre-activations when {fmt} runs the files"
        )
    members = {layer: Path() if single else Path(_member_name(fmt, layer)) for layer in transcoders}
    # every layer must be expressible before anything is written (errors name the destination, not the
    # staging folder below)
    if fmt == "circuit-tracer":
        circuit_tracer.check_set(transcoders, f"writing {destination} as a circuit-tracer set")
    else:
        for layer, member in members.items():
            WRITERS[fmt][0](transcoders[layer], f"writing {destination / member} as {fmt}")

    def write(staging: Path) -> list[Path]:
        if fmt == "circuit-tracer":
            return circuit_tracer.write_set(transcoders, staging)
        return [write_transcoder(transcoders[layer], staging / member, fmt) for layer, member in members.items()]

    return _staged_write(destination, refuse_existing, write)


# The formats a cross-layer transcoder converts to (the others hold one transcoder per layer).
CROSS_LAYER_FORMATS = ("tc", "circuit-tracer")


def _convert_cross_layer(local: Path, origin: str, destination: Path, fmt: str, refuse_existing) -> list[Path]:
    if fmt not in CROSS_LAYER_FORMATS:
        raise fail(
            f"{origin} is a cross-layer transcoder: it converts to {' or '.join(CROSS_LAYER_FORMATS)} only "
            f"(--to {fmt} holds one transcoder per layer)"
        )
    clt = load_cross_layer_any(local, origin=origin)
    if fmt == "circuit-tracer":  # refused before anything is written
        circuit_tracer_clt.check_clt(clt, f"writing {destination} as a circuit-tracer cross-layer transcoder")

    def write(staging: Path) -> list[Path]:
        if fmt == "circuit-tracer":
            return circuit_tracer_clt.write_clt(clt, staging)
        save_cross_layer(clt, staging)
        return sorted(staging.iterdir())

    return _staged_write(destination, refuse_existing, write)


def _staged_write(destination: Path, refuse_existing, write: Callable[[Path], list[Path]]) -> list[Path]:
    """Run ``write(staging)`` into a staging folder that becomes ``destination`` in one rename, so a failure
    (a full disk, Ctrl-C) leaves no half-converted set behind; returns the written paths at ``destination``."""
    import shutil

    from tccli.runtime import outputs

    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise outputs.write_error(destination, exc) from None
    staging = outputs.temp_path(destination)
    with outputs.locked(destination):
        refuse_existing()
        try:
            written = write(staging)
            if destination.is_dir():
                destination.rmdir()  # empty: checked above
            os.replace(staging, destination)
        except OSError as exc:
            raise outputs.write_error(destination, exc) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return [destination / Path(path).relative_to(staging) for path in written]


def load_checked_transcoders(path: str, loaded, layers: Optional[str] = None) -> dict:
    """The transcoders at ``path`` on ``loaded``'s device, only those of ``layers`` (e.g. "0,2-3", read
    against the model) when given, each refused unless it was made for this model (hooks, width, weight
    processing): how `tc eval`, `tc score` and `tc greater-than` load theirs, so that a mismatch ends the
    command before any text is read."""
    from tccli.config.fields import parse_layers
    from tccli.transcoders.files import check_matches_model, check_model_named

    chosen = parse_layers(layers, loaded.info.n_layers) if layers else None
    transcoders = load_transcoder_set(path, loaded.device, chosen)
    for transcoder in transcoders.values():
        check_matches_model(transcoder, loaded.info)
        check_model_named(transcoder, loaded)
        transcoder.eval()
    return transcoders
