"""Gemma Scope transcoders: ``layer_L/width_16k/average_l0_N/params.npz`` holding ``W_enc`` [d, m],
``W_dec`` [m, d], ``b_enc`` [m], ``b_dec`` [d] and ``threshold`` [m], float32 (google/gemma-scope-2b-pt-
transcoders). JumpReLU: ``z = pre * (pre > threshold)``, ``pre = x W_enc + b_enc``; no input bias, no skip.

Where they read and write, as circuit-tracer's Gemma config and SAELens's Gemma-2 transcoder loader both
say: input ``blocks.L.ln2.hook_normalized`` (the residual divided by the pre-MLP RMSNorm's scale, before its
(1 + w) weight: tc's normalized) and output ``blocks.L.hook_mlp_out`` (after the post-MLP RMSNorm: what
the MLP adds to the residual, tc's mlp_out). The layer is read from the path (``layer_L``).

An npz is opened with ``allow_pickle=False``: a file asking to unpickle an object array is refused.
A folder holding one ``params.npz`` per layer (any depth below ``layer_L``) is a set; a folder with several
for one layer (the hub repository itself, every L0 of every width) must be narrowed to one per layer.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import torch

from tccli.config.transcoders import TranscoderConfig
from tccli.errors import fail
from tccli.transcoders.formats.common import (
    filled,
    inference_threshold,
    input_bias_folded,
    layer_in_name,
    source,
    write_bytes,
)
from tccli.transcoders.transcoder import Transcoder

PARAMS = "params.npz"
KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def detect(path: Path) -> bool:
    """One Gemma Scope transcoder: a params.npz file, or a folder holding one."""
    return (path.is_file() and path.suffix == ".npz") or (path.is_dir() and (path / PARAMS).is_file())


def read_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: torch.from_numpy(np.array(archive[key], dtype=np.float32)) for key in archive.files}
    except zipfile.BadZipFile as exc:  # a truncated download: the zip's directory (at its end) is gone
        raise fail(f"cannot read {path}: not a complete npz archive, truncated? ({exc})") from None
    except (OSError, ValueError, EOFError) as exc:  # not an npz, a pickled object array, a truncated member
        raise fail(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def read(path: str | Path, layer: int | None = None) -> Transcoder:
    path = Path(path)
    file = path / PARAMS if path.is_dir() else path
    where = str(file)
    tensors = read_npz(file)
    missing = [key for key in KEYS if key not in tensors]
    if missing:
        raise fail(f"{where} is not a Gemma Scope transcoder: it lacks {missing[0]}")
    layer = layer if layer is not None else _layer_of_path(file)
    if layer is None:
        raise fail(f"{where}: no layer_L in its path, so its layer is unknown")
    d_in, m = tensors["W_enc"].shape
    config = TranscoderConfig(
        d_in=int(d_in),
        d_out=int(tensors["W_dec"].shape[1]),
        n_features=int(m),
        activation="jumprelu",
        layer=layer,
        input_space="normalized",
        output_space="mlp_out",
        input_hook=f"blocks.{layer}.ln2.hook_normalized",
        output_hook=f"blocks.{layer}.hook_mlp_out",
        source=source("gemma-scope", file, variant="/".join(file.parent.parts[-2:])),
    )
    weights = {**tensors, "b_pre": torch.zeros(int(d_in))}
    return filled(config, weights, where)


def _layer_of_path(file: Path) -> int | None:
    for part in reversed(file.parts):
        layer = layer_in_name(part)
        if layer is not None and part.startswith("layer"):
            return layer
    return None


def find_set(folder: Path) -> dict[int, Path]:
    """{layer: params.npz} under a folder of layer_L/... trees; one line if a layer has several."""
    found: dict[int, list[Path]] = {}
    for file in sorted(folder.rglob(PARAMS)):
        layer = _layer_of_path(file.relative_to(folder.parent))
        if layer is not None:
            found.setdefault(layer, []).append(file)
    for layer, files in found.items():
        if len(files) > 1:
            choices = ", ".join(str(f.parent.relative_to(folder)) for f in files[:4])
            raise fail(
                f"{folder} holds {len(files)} Gemma Scope transcoders for layer {layer} ({choices}"
                f"{', ...' if len(files) > 4 else ''}); pass a folder with one per layer"
            )
    return {layer: files[0] for layer, files in sorted(found.items())}


def is_set(path: Path) -> bool:
    return path.is_dir() and not (path / PARAMS).is_file() and any(path.glob(f"layer_*/**/{PARAMS}"))


def check(transcoder: Transcoder, where: str) -> None:
    """Refuse (one line) a transcoder a Gemma Scope npz cannot hold."""
    config = transcoder.config
    if (
        config.skip
        or (config.input_space, config.output_space) != ("normalized", "mlp_out")
        or config.kind != "transcoder"
    ):
        raise fail(
            f"{where}: Gemma Scope transcoders read normalized and write mlp_out without a skip "
            f"connection; this one is a {config.kind} from {config.input_space} to {config.output_space}"
            f"{' with a skip' if config.skip else ''}"
        )
    inference_threshold(transcoder, where)


def write(transcoder: Transcoder, folder: str | Path) -> Path:
    """``folder/params.npz``: JumpReLU (a relu transcoder is one with thresholds 0; batchtopk's threshold is
    its inference rule) without skip, reading normalized and writing mlp_out; ``b_pre`` folded into b_enc."""
    folder = Path(folder)
    where = f"writing {folder} as Gemma Scope"
    check(transcoder, where)
    W_enc, b_enc = input_bias_folded(transcoder)
    arrays = {
        "W_enc": W_enc,
        "W_dec": transcoder.W_dec.detach().float().cpu(),
        "b_enc": b_enc,
        "b_dec": transcoder.b_dec.detach().float().cpu(),
        "threshold": inference_threshold(transcoder, where),
    }
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **{key: value.numpy() for key, value in arrays.items()})
    write_bytes(folder / PARAMS, buffer.getvalue())
    return folder
