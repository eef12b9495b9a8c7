"""tc's own transcoder files: one folder per transcoder, a folder of such folders for a set.

A transcoder folder holds ``transcoder.safetensors`` (W_enc, b_enc, W_dec, b_dec, b_pre, and
``threshold`` / ``W_skip`` for the kinds that have them, in float32) and ``config.json`` (a
TranscoderConfig). A set is a folder whose sub-folders are transcoder folders (named ``layer_L`` when
written by tc). A cross-layer transcoder folder holds ``config.json`` (a CrossLayerConfig, ``kind:
cross_layer_transcoder``) and one ``layer_L.safetensors`` per layer with that layer's W_enc, b_enc, b_pre,
W_dec [m, n_later, d_out], b_dec (of layer L's output) and the optional tensors, so that a reader can take
the decoder rows of a few features of one layer without reading the rest.

Other formats, and reading any of them as a set, are in tccli.transcoders.formats.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tccli.config.transcoders import CLT_KIND, INPUT_SPACES, OUTPUT_SPACES, CrossLayerConfig, TranscoderConfig
from tccli.errors import fail
from tccli.runtime.outputs import atomic_write, write_error
from tccli.transcoders.cross_layer import CrossLayerTranscoder
from tccli.transcoders.transcoder import Transcoder

if TYPE_CHECKING:
    from tccli.model.loading import LoadedModel

WEIGHTS_FILE = "transcoder.safetensors"
CONFIG_FILE = "config.json"


# (input space, output space) pairs the model layer can produce (tccli.model.spaces): a transcoder reads any input
# space and writes any output space; an SAE reads and writes one output space.
SUPPORTED_SPACES = tuple((i, o) for i in INPUT_SPACES for o in OUTPUT_SPACES) + tuple((o, o) for o in OUTPUT_SPACES)
# The spaces whose hooks are tc's own names (ModelInfo.layer): only there is a recorded hook name checked.
TC_SPACES = (("normalized", "mlp_out"), ("mlp_out", "mlp_out"))


def block_hook(hook: Optional[str], layer: Optional[int]) -> Optional[str]:
    """A hook named inside a block (circuit-tracer's ``ln2.hook_normalized``) as the model names it,
    ``blocks.{layer}.ln2.hook_normalized`` (circuit-tracer's own rule); a name already under ``blocks.N.``,
    or without a layer to put it under, as it is."""
    if hook is None or layer is None or re.match(r"blocks\.\d+\.", hook):
        return hook
    return f"blocks.{layer}.{hook}"


def layer_folder_name(layer: int) -> str:
    return f"layer_{layer}"


def save_transcoder(transcoder: Transcoder, folder: str | Path) -> Path:
    """Write a transcoder folder atomically enough that a crash never leaves half a config."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(folder, exc) from None
    tensors = {
        name: getattr(transcoder, name).detach().to("cpu", torch.float32).contiguous()
        for name in transcoder.tensor_names()
    }
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    text = json.dumps(transcoder.config.to_dict(), indent=2)
    atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    return folder


def is_transcoder_folder(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def load_transcoder(folder: str | Path, device: str | torch.device = "cpu") -> Transcoder:
    folder = Path(folder)
    if not is_transcoder_folder(folder):
        raise fail(f"{folder} is not a transcoder folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = read_config(folder / CONFIG_FILE)
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError) as exc:
        raise fail(f"cannot read {folder / WEIGHTS_FILE}: {exc}") from None
    transcoder = Transcoder(config)
    missing = [n for n in transcoder.tensor_names() if n not in tensors]
    if missing:
        raise fail(f"{folder / WEIGHTS_FILE} lacks tensor {missing[0]}")
    with torch.no_grad():
        for name in transcoder.tensor_names():
            param = getattr(transcoder, name)
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise fail(
                    f"{folder}: tensor {name} has shape {tuple(tensors[name].shape)}, config says {tuple(param.shape)}"
                )
            param.copy_(tensors[name])
    return transcoder.to(device)


def read_json_object(path: Path, what: str = "a JSON object") -> dict:
    """A JSON file holding an object; one line saying why not otherwise."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise fail(f"{path} is not {what} (not a JSON object)")
    return data


def read_config(path: Path) -> TranscoderConfig:
    """A transcoder's config.json, every field checked (one line naming the bad field otherwise)."""
    data = read_json_object(path, "a tc transcoder config")
    known = set(TranscoderConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise fail(f"{path} is not a tc transcoder config: unknown field {unknown[0]!r}")
    try:
        config = TranscoderConfig(**data)
    except TypeError as exc:  # a required field missing
        raise fail(f"{path} is not a tc transcoder config: {exc}") from None
    return config.validate(str(path))


def check_matches_model(transcoder: Transcoder, info) -> None:
    """Refuse a transcoder trained on another model, hook or width (info: models.ModelInfo)."""
    cfg = transcoder.config
    where = f"transcoder for layer {cfg.layer}"
    spaces = (cfg.input_space, cfg.output_space)
    if spaces not in SUPPORTED_SPACES or (cfg.kind == "sae") != (cfg.input_space in OUTPUT_SPACES):
        raise fail(
            f"{where} ({cfg.kind}) reads {cfg.input_space} and writes {cfg.output_space}; tc runs "
            f"transcoders from {'/'.join(INPUT_SPACES)} to {'/'.join(OUTPUT_SPACES)} and SAEs on one "
            f"of {'/'.join(OUTPUT_SPACES)}"
        )
    if cfg.d_in != info.d_model or cfg.d_out != info.d_model:
        raise fail(f"{where} has d_in={cfg.d_in}, d_out={cfg.d_out} but the model's d_model is {info.d_model}")
    if cfg.layer is not None and cfg.layer >= info.n_layers:
        raise fail(f"{where}: the model has only {info.n_layers} layers")
    if cfg.layer is not None and cfg.input_hook is not None and spaces in TC_SPACES:
        hooks = info.layer(cfg.layer)
        expected_in = hooks.mlp_out if cfg.kind == "sae" else hooks.mlp_in
        # a name inside the block (circuit-tracer's configs, and copies tc made of them) is under blocks.L.
        hook_in, hook_out = block_hook(cfg.input_hook, cfg.layer), block_hook(cfg.output_hook, cfg.layer)
        if hook_in != expected_in or (hook_out and hook_out != hooks.mlp_out):
            raise fail(
                f"{where} reads {cfg.input_hook} -> {cfg.output_hook}; this model's MLP is "
                f"{expected_in} -> {hooks.mlp_out}"
            )
    if cfg.model_architecture and cfg.model_architecture != info.architecture:
        raise fail(
            f"{where} was trained on a {cfg.model_architecture} model ({cfg.model_name}), not this {info.architecture}"
        )
    if cfg.weight_processing and cfg.weight_processing != info.weight_processing:
        raise fail(f"{where} was trained under other weight processing: {cfg.weight_processing}")
    from tccli.model.loading import known_different_models

    if known_different_models(cfg.model_name, info.name):
        raise fail(f"{where} was trained on the model {cfg.model_name}, not on {info.name}")


def check_model_named(transcoder: Transcoder, loaded: LoadedModel) -> None:
    """Refuse to run a transcoder made for another model on the built-in one only because no --model was
    given (a hub name cannot be compared with the built-in model, so this is the one safe reading)."""
    from tccli.model.loading import model_identity

    name = transcoder.config.model_name
    if loaded.by_default and name and model_identity(name) != "builtin":
        raise fail(
            f"transcoder for layer {transcoder.config.layer} was trained on the model {name}, but no --model was "
            f"given, so the built-in model would run: pass --model {name}"
        )


def check_transcoders(transcoders: dict[int, Transcoder], loaded: LoadedModel) -> None:
    for transcoder in transcoders.values():
        check_matches_model(transcoder, loaded.info)
        check_model_named(transcoder, loaded)
        if transcoder.config.kind != "transcoder":
            raise fail(
                f"layer {transcoder.config.layer} holds an SAE, not a transcoder: circuits need "
                f"transcoders (MLP input -> MLP output)"
            )


def check_feature(transcoders: dict[int, Transcoder], layer: int, feature: int) -> Transcoder:
    if layer not in transcoders:
        raise fail(f"no transcoder for layer {layer} (have layers {sorted(transcoders) or 'none'})")
    transcoder = transcoders[layer]
    if not 0 <= feature < transcoder.n_features:
        raise fail(
            f"feature {feature} is out of range: layer {layer}'s transcoder has "
            f"{transcoder.n_features} features (0-{transcoder.n_features - 1})"
        )
    return transcoder


# ----------------------------------------------------------------------------- cross-layer transcoders


def clt_layer_file(layer: int) -> str:
    return f"layer_{layer}.safetensors"


def is_cross_layer_folder(path: Path) -> bool:
    """A tc cross-layer transcoder folder (config.json whose kind is cross_layer_transcoder)."""
    if not (path / CONFIG_FILE).is_file():
        return False
    try:
        return json.loads((path / CONFIG_FILE).read_text()).get("kind") == CLT_KIND
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def save_cross_layer(clt: CrossLayerTranscoder, folder: str | Path) -> Path:
    """Write a tc cross-layer transcoder folder: one safetensors file per layer, then the config (a reader
    takes the folder for a CLT only once its config exists, and the config is written last)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(folder, exc) from None
    params = dict(clt.named_parameters())
    for layer in clt.layers:
        tensors = {
            name.split(".")[0]: tensor.detach().to("cpu", torch.float32).contiguous()
            for name, tensor in params.items()
            if name.split(".")[1] == str(layer)
        }
        atomic_write(folder / clt_layer_file(layer), lambda tmp, t=tensors: save_file(t, str(tmp)))
    text = json.dumps(clt.config.to_dict(), indent=2)
    atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    return folder


def read_cross_layer_config(path: Path) -> CrossLayerConfig:
    data = read_json_object(path, "a tc cross-layer transcoder config")
    unknown = sorted(set(data) - set(CrossLayerConfig.__dataclass_fields__))
    if unknown:
        raise fail(f"{path} is not a tc cross-layer transcoder config: unknown field {unknown[0]!r}")
    try:
        config = CrossLayerConfig(**data)
    except TypeError as exc:  # a required field missing
        raise fail(f"{path} is not a tc cross-layer transcoder config: {exc}") from None
    return config.validate(str(path))


def load_cross_layer(folder: str | Path, device: str | torch.device = "cpu") -> CrossLayerTranscoder:
    folder = Path(folder)
    config = read_cross_layer_config(folder / CONFIG_FILE)
    clt = CrossLayerTranscoder(config)
    params = dict(clt.named_parameters())
    with torch.no_grad():
        for layer in clt.layers:
            file = folder / clt_layer_file(layer)
            try:
                tensors = load_file(str(file))
            except (SafetensorError, OSError) as exc:
                raise fail(f"cannot read {file}: {exc}") from None
            for name, param in params.items():
                base, key = name.split(".")
                if key != str(layer):
                    continue
                if base not in tensors:
                    raise fail(f"{file} lacks tensor {base}")
                if tuple(tensors[base].shape) != tuple(param.shape):
                    raise fail(
                        f"{file}: tensor {base} has shape {tuple(tensors[base].shape)}, "
                        f"config says {tuple(param.shape)}"
                    )
                param.copy_(tensors[base])
    return clt.to(device)
