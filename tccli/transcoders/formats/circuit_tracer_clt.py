"""circuit-tracer's cross-layer transcoders (its ``transcoder/cross_layer_transcoder.py``: ``to_safetensors``,
``load_clt``, ``load_gemma_scope_2_clt``; and ``utils/hf_utils.py``), read and written exactly.

A folder (or hub repository) with ``config.yaml``::

    model_name: google/gemma-2-2b
    model_kind: cross_layer_transcoder
    feature_input_hook: hook_resid_mid     # any hook formats.common knows, as for per-layer sets
    feature_output_hook: hook_mlp_out
    transcoders: [...]                     # only for Gemma Scope 2's files (below)

and, for layers i = 0 .. L-1 (circuit-tracer counts the ``W_enc_*.safetensors`` files and reads 0 .. L-1):

    W_enc_{i}.safetensors   W_enc_{i} [m, d] (features by d_model), b_enc_{i} [m], b_dec_{i} [d] (the bias of
                            layer i's *output*), and threshold_{i} [m] when the CLT is JumpReLU
    W_dec_{i}.safetensors   W_dec_{i} [m, L - i, d]: entry [:, t - i] is the decoder from layer i to layer t

circuit-tracer computes ``pre_i = x_i W_enc_i^T + b_enc_i``, ``a_i = pre_i * (pre_i > threshold_i)``
(JumpReLU, when the threshold tensors exist) or ReLU (otherwise: its only two CLT activations), and
``yhat_t = sum over i <= t of a_i W_dec_i[:, t - i] + b_dec_t``: tc's CLT with ``b_pre = 0`` and W_enc
transposed. Its ``to_safetensors`` writes no skip connection and ``load_clt`` reads none, so a CLT with
skip, or with TopK, cannot be written in this layout (refused in one line); it writes tensors in the
module's dtype (bfloat16 by default), which tc reads into float32.

Gemma Scope 2's CLTs (``load_gemma_scope_2_clt``) are listed by ``transcoders:`` (one file per layer, in
order, paths or hf:// URIs), each file holding ``w_enc`` [d, m] (already tc's orientation), ``b_enc`` [m],
``b_dec`` [d], ``threshold`` [m] (always JumpReLU), ``w_dec`` [m, L, d] (decoders to every layer; the
entries before the file's own layer are not used) and optionally ``affine_skip_connection`` [d, d], applied
as ``x @ affine_skip_connection`` (tc's W_skip as it is). circuit-tracer's loader iterates
``range(max(paths.keys()))`` and so leaves out the last listed layer; tc reads every listed layer.

Hooks map to spaces and to ``blocks.{layer}.{hook}`` names as for circuit-tracer's per-layer sets
(formats.circuit_tracer). Decoders can be left on disk (``lazy=True``, tccli.transcoders.lazy_decoders), as
circuit-tracer's ``lazy_decoder=True`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from tccli.config.transcoders import CLT_KIND, CrossLayerConfig
from tccli.errors import fail
from tccli.transcoders.cross_layer import CrossLayerTranscoder
from tccli.transcoders.files import block_hook
from tccli.transcoders.formats.circuit_tracer import CONFIG, layer_files
from tccli.transcoders.formats.common import (
    hook_of_space,
    read_yaml,
    source,
    space_of_hook,
    write_safetensors,
    write_text,
)
from tccli.transcoders.lazy_decoders import DecoderLocation, build_cross_layer, read_tensors

# The activation names circuit-tracer's CLT takes (CrossLayerTranscoder(activation_function=...)) -> tc's.
ACTIVATIONS = {"relu": "relu", "jump_relu": "jumprelu", "jumprelu": "jumprelu"}


def is_clt(path: Path) -> bool:
    """A folder whose config.yaml says ``model_kind: cross_layer_transcoder``."""
    if not (path.is_dir() and (path / CONFIG).is_file()):
        return False
    try:
        return read_yaml(path / CONFIG).get("model_kind") == CLT_KIND
    except Exception:
        return False


def _numbered(folder: Path, prefix: str) -> dict[int, Path]:
    files = {}
    for file in folder.glob(f"{prefix}*.safetensors"):
        suffix = file.stem[len(prefix) :]
        if suffix.isdigit():
            files[int(suffix)] = file
    return files


def _native_layers(folder: Path) -> list[int]:
    """Layers 0 .. L-1 of a W_enc_{i}/W_dec_{i} folder, every file checked to exist (a gap named)."""
    encoders = _numbered(folder, "W_enc_")
    if not encoders:
        raise fail(
            f"{folder} holds no W_enc_0.safetensors: a circuit-tracer cross-layer transcoder needs "
            "W_enc_{i}.safetensors and W_dec_{i}.safetensors for each layer i"
        )
    layers = list(range(max(encoders) + 1))
    for layer in layers:
        for name in (f"W_enc_{layer}.safetensors", f"W_dec_{layer}.safetensors"):
            if not (folder / name).is_file():
                raise fail(
                    f"{folder / name} does not exist: a circuit-tracer cross-layer transcoder needs W_enc_i "
                    f"and W_dec_i files for every layer from 0 to {layers[-1]}"
                )
    return layers


def _tensor(tensors: dict, name: str, file: Path) -> torch.Tensor:
    if name not in tensors:
        raise fail(f"{file} is not a circuit-tracer cross-layer transcoder file: it lacks {name}")
    return tensors[name]


def _native_tensors(folder: Path, layer: int) -> dict[str, torch.Tensor]:
    """Layer ``layer``'s encoder file in tc's names and orientation."""
    file = folder / f"W_enc_{layer}.safetensors"
    stored = read_tensors(file)
    W_enc = _tensor(stored, f"W_enc_{layer}", file)
    if W_enc.dim() != 2:
        raise fail(f"{file}: tensor W_enc_{layer} has shape {tuple(W_enc.shape)}, expected (features, d_model)")
    tensors = {
        "W_enc": W_enc.T,  # stored [m, d], applied as x W_enc^T
        "b_enc": _tensor(stored, f"b_enc_{layer}", file),
        "b_dec": _tensor(stored, f"b_dec_{layer}", file),
        "b_pre": torch.zeros(W_enc.shape[1]),
    }
    threshold = stored.get(f"threshold_{layer}")
    if threshold is not None:
        # to_safetensors writes threshold[i].squeeze(0) of its [L, 1, m] tensor: [m]
        tensors["threshold"] = threshold.reshape(-1) if threshold.dim() == 2 and threshold.shape[0] == 1 else threshold
    return tensors


def _gemma_scope_2_tensors(file: Path) -> dict[str, torch.Tensor]:
    """One Gemma Scope 2 CLT layer file (its decoders left on disk) in tc's names and orientation."""
    stored = read_tensors(file, leave_out=("w_dec",))
    W_enc = _tensor(stored, "w_enc", file)
    tensors = {
        "W_enc": W_enc,  # stored [d, m]: circuit-tracer transposes it to its [m, d]
        "b_enc": _tensor(stored, "b_enc", file),
        "b_dec": _tensor(stored, "b_dec", file),
        "threshold": _tensor(stored, "threshold", file),
        "b_pre": torch.zeros(W_enc.shape[0]),
    }
    if "affine_skip_connection" in stored:  # applied as x @ W_skip by circuit-tracer's CLT: tc's orientation
        tensors["W_skip"] = stored["affine_skip_connection"]
    return tensors


def read_clt(folder: str | Path, origin: Optional[str] = None, lazy: bool = False) -> CrossLayerTranscoder:
    """A circuit-tracer (or Gemma Scope 2) cross-layer transcoder folder as a tc CrossLayerTranscoder; with
    ``lazy`` its decoders stay on disk."""
    folder = Path(folder)
    settings = read_yaml(folder / CONFIG)
    where = str(folder / CONFIG)
    if settings.get("model_kind") != CLT_KIND:
        raise fail(f"{where}: model_kind is {settings.get('model_kind')!r}, not {CLT_KIND!r}")
    hooks = {}
    for key in ("feature_input_hook", "feature_output_hook"):
        if not isinstance(settings.get(key), str):
            raise fail(f"{where} names no {key} (circuit-tracer needs it to know where the features read and write)")
        hooks[key] = settings[key]
    hook_in, hook_out = hooks["feature_input_hook"], hooks["feature_output_hook"]
    input_space = space_of_hook(hook_in, False, where)
    output_space = space_of_hook(hook_out, True, where)
    named = settings.get("activation")
    if named is not None and named not in ACTIVATIONS:
        raise fail(
            f"{where}: activation {named!r} is not one a circuit-tracer cross-layer transcoder has "
            f"({', '.join(sorted(set(ACTIVATIONS) - {'jumprelu'}))})"
        )
    tensors: dict[int, dict[str, torch.Tensor]] = {}
    decoders: dict[int, DecoderLocation] = {}
    if "transcoders" in settings:  # Gemma Scope 2's files, one per layer
        file_format = "gemma-scope-2"
        files = layer_files(folder, settings, origin)
        for layer, file in files.items():
            tensors[layer] = _gemma_scope_2_tensors(file)
            decoders[layer] = DecoderLocation(file, "w_dec", skip=layer)
    else:
        file_format = "circuit-tracer"
        for layer in _native_layers(folder):
            tensors[layer] = _native_tensors(folder, layer)
            decoders[layer] = DecoderLocation(folder / f"W_dec_{layer}.safetensors", f"W_dec_{layer}")
    layers = sorted(tensors)
    first = tensors[layers[0]]
    with_threshold = [layer for layer in layers if "threshold" in tensors[layer]]
    if with_threshold and len(with_threshold) != len(layers):
        missing = next(layer for layer in layers if layer not in with_threshold)
        raise fail(
            f"{folder}: layer {missing} has no threshold but layer {with_threshold[0]} has (JumpReLU needs one each)"
        )
    activation = "jumprelu" if with_threshold else "relu"
    if named is not None and ACTIVATIONS[named] != activation:
        raise fail(
            f"{where} says activation {named!r}, but the files {'hold' if with_threshold else 'hold no'} thresholds"
        )
    with_skip = [layer for layer in layers if "W_skip" in tensors[layer]]
    if with_skip and len(with_skip) != len(layers):
        raise fail(f"{folder}: some layers have a skip connection and some do not")
    d_in, m = first["W_enc"].shape
    config = CrossLayerConfig(
        d_in=int(d_in),
        d_out=int(first["b_dec"].shape[0]),
        n_features=int(m),
        layers=layers,
        activation=activation,
        skip=bool(with_skip),
        input_space=input_space,
        output_space=output_space,
        model_name=settings.get("model_name"),
        input_hooks=[block_hook(hook_in, layer) for layer in layers],
        output_hooks=[block_hook(hook_out, layer) for layer in layers],
        source=source("circuit-tracer", folder, set=origin or str(folder), config=CONFIG, file_format=file_format),
    )
    return build_cross_layer(config, tensors, decoders, lazy, str(folder))


def check_clt(clt: CrossLayerTranscoder, where: str) -> str:
    """Refuse (one line) a CLT circuit-tracer's layout cannot hold; returns the activation it is written as."""
    config = clt.config
    if config.layers != list(range(len(config.layers))):
        raise fail(f"{where}: circuit-tracer's CLT layout holds layers 0 .. L-1, got layers {config.layers}")
    if config.skip:
        raise fail(f"{where}: circuit-tracer's CLT layout has no skip connection (its loader reads no W_skip)")
    if config.activation == "relu":
        return "relu"
    if config.activation in ("jumprelu", "batchtopk"):  # batchtopk runs as per-feature thresholds
        return "jumprelu"
    raise fail(f"{where}: circuit-tracer's CLTs are ReLU or JumpReLU; a {config.activation} CLT cannot be written")


def write_clt(clt: CrossLayerTranscoder, folder: str | Path) -> list[Path]:
    """``folder/config.yaml`` + ``W_enc_{i}.safetensors`` + ``W_dec_{i}.safetensors``, as circuit-tracer's
    ``to_safetensors`` writes them (float32). tc's input bias b_pre is folded into b_enc."""
    import yaml

    folder = Path(folder)
    where = f"writing {folder} as a circuit-tracer cross-layer transcoder"
    activation = check_clt(clt, where)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    with torch.no_grad():
        for i, layer in enumerate(clt.layers):
            key = str(layer)
            W_enc = clt.W_enc[key].detach().float().cpu()
            b_pre = clt.b_pre[key].detach().float().cpu()
            b_enc = clt.b_enc[key].detach().float().cpu() - b_pre @ W_enc
            encoder = {f"W_enc_{i}": W_enc.T, f"b_enc_{i}": b_enc, f"b_dec_{i}": clt.b_dec[key]}
            if activation == "jumprelu":
                encoder[f"threshold_{i}"] = clt.threshold[key]
            enc_path, dec_path = folder / f"W_enc_{i}.safetensors", folder / f"W_dec_{i}.safetensors"
            write_safetensors(enc_path, encoder)
            write_safetensors(dec_path, {f"W_dec_{i}": clt.W_dec[key]})
            written += [enc_path, dec_path]
    config = clt.config
    settings = {
        "model_name": config.model_name,
        "model_kind": CLT_KIND,
        "feature_input_hook": hook_of_space(config.input_space, False),
        "feature_output_hook": hook_of_space(config.output_space, True),
    }
    write_text(folder / CONFIG, yaml.safe_dump(settings, sort_keys=False))
    return written
