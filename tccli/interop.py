"""Other transcoder formats: SAELens folders and the paper's released GPT-2 ``.pt`` files.

SAELens folder (``cfg.json`` + ``sae_weights.safetensors``; SAELens 6 layout, also read in the flat
pre-6 layout). SAELens computes

    SAE (architecture standard / topk):  z = act((x - b_dec * apply_b_dec_to_input) W_enc + b_enc);  y = z W_dec + b_dec
    transcoder (architecture transcoder): z = relu(x W_enc + b_enc);                                   y = z W_dec + b_dec

so an SAELens transcoder has no input-side bias and its ``b_dec`` is the output bias (circuit-tracer's
per-layer transcoders compute the same). tc's ``b_pre`` is mapped as follows:

- reading: ``b_pre = b_dec`` when ``apply_b_dec_to_input`` is true (SAEs), else ``b_pre = 0``; ``b_dec``
  is always the output bias.
- writing: an SAE whose ``b_pre`` equals its ``b_dec`` is written as is with
  ``apply_b_dec_to_input = true``; otherwise ``b_pre`` is folded into the encoder bias,
  ``b_enc' = b_enc - b_pre W_enc`` (the same pre-activations up to float rounding), with
  ``apply_b_dec_to_input = false``. TopK SAEs are written as architecture ``topk`` with ``k``; TopK
  transcoders as architecture ``topk_transcoder``, which SAELens 6 does not know (it has no TopK
  transcoder), so SAELens refuses such a folder instead of silently applying ReLU; tc reads it.
  The whole tc config is kept under ``tc_config`` in cfg.json (SAELens ignores unknown top-level keys),
  so a round trip restores layer, model, weight processing, training config and feature frequencies.

Paper ``.pt`` file (METHOD.md section 7): ``torch.save({"cfg": <sae_training.config.LanguageModelSAERunnerConfig>,
"state_dict": {W_enc, b_enc, W_dec, b_dec, b_dec_out}})`` where ``b_dec`` is input-side (tc's ``b_pre``)
and ``b_dec_out`` the output bias (tc's ``b_dec``). It is read with torch's restricted ``weights_only``
unpickler (tensors, storages, dtypes, devices and plain containers only) plus one stand-in class
registered under the config class's names, which keeps the pickled attributes as plain data. Any other
global in the pickle (``os.system``, another class, ...) stops the load before anything runs.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from tccli.config import option
from tccli.errors import fail
from tccli.transcoder import Transcoder, TranscoderConfig

SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
# SAELens reads a cfg.json as its pre-6 layout unless it names a version >= 6.0.0; the tensors and the
# fields written here follow the 6.x layout.
SAELENS_LAYOUT_VERSION = "6.0.0"

# The config class of the paper's reference code (jacobdunefsky/transcoder_circuits, an old SAELens fork),
# under the module paths it was pickled from. Only these names get the stand-in; nothing else is allowed.
PAPER_CONFIG_CLASSES = (
    "sae_training.config.LanguageModelSAERunnerConfig",
    "transcoder_circuits.sae_training.config.LanguageModelSAERunnerConfig",
)
PAPER_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")

_LAYER_IN_HOOK = re.compile(r"^blocks\.(\d+)\.")


def is_saelens_folder(path: Path) -> bool:
    return path.is_dir() and (path / SAELENS_CONFIG).is_file() and (path / SAELENS_WEIGHTS).is_file()


def is_paper_file(path: Path) -> bool:
    return path.is_file() and path.suffix == ".pt"


def layer_of_hook(hook: Optional[str]) -> Optional[int]:
    match = _LAYER_IN_HOOK.match(hook or "")
    return int(match.group(1)) if match else None


def _activation(name: str, k: Any, where: str) -> tuple[str, Optional[int]]:
    if name == "relu":
        return "relu", None
    if name == "topk":
        if not isinstance(k, int) or k < 1:
            raise fail(f"{where}: topk activation without a positive integer k")
        return "topk", k
    raise fail(f"{where}: activation {name!r} is not supported by tc (relu and topk are)")


def _filled(config: TranscoderConfig, tensors: dict[str, torch.Tensor], where: str) -> Transcoder:
    """A Transcoder of ``config`` holding ``tensors`` (checked against the config's shapes)."""
    try:
        transcoder = Transcoder(config)
    except ValueError as exc:
        raise fail(f"{where}: {exc}") from None
    with torch.no_grad():
        for name, param in transcoder.named_parameters():
            value = tensors.get(name)
            if value is None:
                raise fail(f"{where} lacks tensor {name}")
            if tuple(value.shape) != tuple(param.shape):
                raise fail(f"{where}: tensor {name} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
            param.copy_(value.to(torch.float32))
    return transcoder


# ----------------------------------------------------------------------------- SAELens


def read_saelens(folder: str | Path) -> Transcoder:
    """A SAELens folder (SAE or transcoder) as a tc Transcoder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    where = str(folder)
    try:
        cfg = json.loads((folder / SAELENS_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise fail(f"cannot read {folder / SAELENS_CONFIG}: {exc}") from None
    if not isinstance(cfg, dict):
        raise fail(f"{folder / SAELENS_CONFIG} is not a SAELens config")
    try:
        tensors = load_file(str(folder / SAELENS_WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise fail(f"cannot read {folder / SAELENS_WEIGHTS}: {exc}") from None
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    merged = {**meta, **cfg}  # pre-6 configs are flat; 6.x keeps model and hook in "metadata"

    norm = merged.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        raise fail(f"{where}: normalize_activations={norm!r} is not supported (tc needs raw activations)")
    if merged.get("finetuning_scaling_factor"):
        raise fail(f"{where}: a finetuning scaling factor is not supported")
    if merged.get("rescale_acts_by_decoder_norm"):
        raise fail(f"{where}: TopK selection rescaled by decoder norms (rescale_acts_by_decoder_norm) is not supported")
    architecture = str(merged.get("architecture", "standard"))
    is_transcoder = "transcoder" in architecture
    if architecture not in ("standard", "topk", "transcoder", "topk_transcoder"):
        raise fail(f"{where}: SAELens architecture {architecture!r} is not supported "
                   "(standard, topk, transcoder are)")
    if architecture.startswith("topk"):
        k = merged.get("k", (merged.get("activation_fn_kwargs") or {}).get("k"))
        activation, k = _activation("topk", k, where)
    else:
        name = str(merged.get("activation_fn", merged.get("activation_fn_str", "relu")))
        activation, k = _activation(name, (merged.get("activation_fn_kwargs") or {}).get("k"), where)

    hook_in = merged.get("hook_name", merged.get("hook_point"))
    hook_out = merged.get("hook_name_out", merged.get("out_hook_point")) if is_transcoder else hook_in
    d_in = int(merged.get("d_in", tensors["W_enc"].shape[0] if "W_enc" in tensors else 0))
    d_out = int(merged.get("d_out", d_in)) if is_transcoder else d_in
    n_features = int(merged.get("d_sae", tensors["W_enc"].shape[1] if "W_enc" in tensors else 0))
    layer = merged.get("hook_layer", merged.get("hook_point_layer"))
    layer = int(layer) if isinstance(layer, int) else layer_of_hook(hook_in)

    tc_config = cfg.get("tc_config")
    if isinstance(tc_config, dict):  # written by tc: restore everything it knew
        try:
            config = TranscoderConfig(**tc_config)
        except TypeError as exc:
            raise fail(f"{where}: its tc_config is not a tc transcoder config: {exc}") from None
    else:
        config = TranscoderConfig(
            d_in=d_in, d_out=d_out, n_features=n_features, activation=activation, k=k,
            kind="transcoder" if is_transcoder else "sae", layer=layer,
            input_space="normalized" if is_transcoder else "mlp_out",
            model_name=merged.get("model_name"), input_hook=hook_in, output_hook=hook_out,
            training={"source": "saelens", "saelens_config": cfg})
    b_dec = tensors.get("b_dec")
    weights = dict(tensors)
    apply_b_dec = bool(merged.get("apply_b_dec_to_input", not is_transcoder)) and not is_transcoder
    if b_dec is not None:
        weights["b_pre"] = b_dec.clone() if apply_b_dec else torch.zeros(config.d_in)
    return _filled(config, weights, where)


def write_saelens(transcoder: Transcoder, folder: str | Path) -> Path:
    """Write ``transcoder`` as a SAELens folder (see the module docstring for the bias mapping)."""
    from safetensors.torch import save_file

    from tccli.transcoder_io import _atomic_write

    config = transcoder.config
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    is_transcoder = config.kind != "sae"
    with torch.no_grad():
        W_enc = transcoder.W_enc.detach().float().cpu()
        b_enc = transcoder.b_enc.detach().float().cpu()
        b_pre = transcoder.b_pre.detach().float().cpu()
        b_dec = transcoder.b_dec.detach().float().cpu()
        apply_b_dec = not is_transcoder and torch.equal(b_pre, b_dec)
        if not apply_b_dec and bool(b_pre.any()):
            b_enc = b_enc - b_pre @ W_enc
    tensors = {"W_enc": W_enc.contiguous(), "b_enc": b_enc.contiguous(),
               "W_dec": transcoder.W_dec.detach().float().cpu().contiguous(), "b_dec": b_dec.contiguous()}
    if is_transcoder:
        architecture = "topk_transcoder" if config.activation == "topk" else "transcoder"
    else:
        architecture = "topk" if config.activation == "topk" else "standard"
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": config.d_in,
        "d_sae": config.n_features,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": config.model_name,
            "hook_name": config.input_hook,
            "hook_layer": config.layer,
            "hook_head_index": None,
            "prepend_bos": True,
            "sae_lens_version": SAELENS_LAYOUT_VERSION,
            "sae_lens_training_version": SAELENS_LAYOUT_VERSION,
        },
        "tc_config": config.to_dict(),
    }
    if config.activation == "topk":
        cfg["k"] = config.k
    if is_transcoder:
        # current SAELens reads the output hook from metadata; earlier 6.x releases from the top level
        cfg["metadata"].update({"hook_name_out": config.output_hook, "hook_head_index_out": None})
        cfg.update({"d_out": config.d_out, "hook_name_out": config.output_hook,
                    "hook_layer_out": config.layer, "hook_head_index_out": None})
    _atomic_write(folder / SAELENS_WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))
    text = json.dumps(cfg, indent=2)
    _atomic_write(folder / SAELENS_CONFIG, lambda tmp: Path(tmp).write_text(text))
    return folder


# ----------------------------------------------------------------------------- the paper's .pt files


class ForeignConfig:
    """Stand-in for the pickled config class of the paper's code: keeps its attributes as plain data."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) from objects with __slots__
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("the config object's state is not a plain attribute dict")
        self.__dict__.update(state)


def read_paper_file(path: str | Path) -> Transcoder:
    """A transcoder (or SAE) file released with the paper, loaded without running pickled code."""
    path = Path(path)
    where = str(path)
    stand_ins = [(ForeignConfig, name) for name in PAPER_CONFIG_CLASSES]
    try:
        with torch.serialization.safe_globals(stand_ins):
            payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickling_reason(str(exc))
        raise fail(f"refusing to load {where}: {reason}") from None
    except Exception as exc:  # truncated zip, not a torch file, a stand-in built with odd arguments, ...
        raise fail(f"cannot read {where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not isinstance(payload, dict) or "state_dict" not in payload or "cfg" not in payload:
        raise fail(f"{where} is not a transcoder file of the paper's code (needs 'cfg' and 'state_dict')")
    state = payload["state_dict"]
    attrs = _config_attributes(payload["cfg"], where)
    if not isinstance(state, dict) or not all(isinstance(state.get(n), torch.Tensor) for n in PAPER_TENSORS):
        raise fail(f"{where}: state_dict lacks one of {', '.join(PAPER_TENSORS)}")
    W_enc = state["W_enc"]
    d_in, n_features = int(W_enc.shape[0]), int(W_enc.shape[1])
    hook_in = attrs.get("hook_point")
    is_transcoder = bool(attrs.get("is_transcoder", "b_dec_out" in state))
    hook_out = attrs.get("out_hook_point") if is_transcoder else hook_in
    d_out = int(state["W_dec"].shape[1])
    layer = attrs.get("hook_point_layer")
    layer = int(layer) if isinstance(layer, int) else layer_of_hook(hook_in)
    from tccli.models import WEIGHT_PROCESSING

    plain = {key: value for key, value in attrs.items() if isinstance(value, (str, int, float, bool, type(None)))}
    config = TranscoderConfig(
        d_in=d_in, d_out=d_out, n_features=n_features, activation="relu",
        kind="transcoder" if is_transcoder else "sae", layer=layer, model_name=attrs.get("model_name"),
        input_space="normalized" if is_transcoder else "mlp_out",
        # the reference code loaded models with HookedTransformer's default processing, which is
        # what tc's compatibility mode reproduces
        weight_processing=dict(WEIGHT_PROCESSING), input_hook=hook_in, output_hook=hook_out,
        training={"source": "paper .pt", "file": path.name, "reference_config": plain})
    weights = {"W_enc": W_enc, "b_enc": state["b_enc"], "W_dec": state["W_dec"], "b_pre": state["b_dec"],
               "b_dec": state["b_dec_out"] if is_transcoder and "b_dec_out" in state else state["b_dec"]}
    return _filled(config, weights, where)


def _config_attributes(cfg: Any, where: str) -> dict:
    if isinstance(cfg, ForeignConfig):
        attrs = dict(cfg.__dict__)
    elif isinstance(cfg, dict):
        attrs = dict(cfg)
    else:
        raise fail(f"{where}: 'cfg' is a {type(cfg).__name__}, not a config object")
    for key, value in list(attrs.items()):
        if isinstance(value, torch.dtype):
            attrs[key] = str(value).replace("torch.", "")
        elif isinstance(value, torch.device):
            attrs[key] = str(value)
    return attrs


def _unpickling_reason(message: str) -> str:
    # torch's messages differ between versions ("Unsupported global: GLOBAL a.b", "unsupported GLOBAL a.b
    # whose module a is blocked"); the offending name follows GLOBAL in all of them
    match = re.search(r"GLOBAL ([\w.]+)", message)
    if match:
        return (f"it asks to run or build {match.group(1)}, which is not a tensor or the paper's config class "
                "(only those are allowed, so nothing in the file was executed)")
    return ("it is not a torch.save file holding only tensors and the paper's config "
            "(nothing in the file was executed)")


# ----------------------------------------------------------------------------- conversion


FORMATS = ("tc", "saelens")


def write_transcoder(transcoder: Transcoder, folder: str | Path, fmt: str) -> Path:
    from tccli.transcoder_io import save_transcoder

    if fmt == "tc":
        return save_transcoder(transcoder, folder)
    if fmt == "saelens":
        return write_saelens(transcoder, folder)
    raise fail(f"unknown output format {fmt!r}: use {' or '.join(FORMATS)}")


def convert(source: str | Path, destination: str | Path, fmt: str) -> list[Path]:
    """Convert a transcoder or a set (any readable format) to ``fmt`` folders under ``destination``.

    A single transcoder becomes one folder at ``destination``; a set becomes ``destination/layer_L``.
    Refuses to write into an existing non-empty folder.
    """
    from tccli.transcoder_io import layer_folder_name, load_transcoder_set, single_transcoder_path

    if fmt not in FORMATS:
        raise fail(f"unknown output format {fmt!r}: use {' or '.join(FORMATS)}")
    destination = Path(destination)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise fail(f"{destination} already exists and is not an empty folder")
    transcoders = load_transcoder_set(source)
    if single_transcoder_path(Path(source)):
        (transcoder,) = transcoders.values()
        return [write_transcoder(transcoder, destination, fmt)]
    return [write_transcoder(t, destination / layer_folder_name(layer), fmt) for layer, t in transcoders.items()]



@dataclass
class ConvertConfig:
    """Options of `tc convert`."""

    input: str = option("", "Transcoders to convert: a tc or SAELens folder, a paper .pt file, or a folder of them.",
                        required=True)
    out: str = option("", "Where to write: one folder for one transcoder, else a folder of layer_L folders "
                      "(must not exist or be empty).", required=True)
    to: str = option("tc", "Output format: tc or saelens (the paper's .pt format is read only).")

    def validate(self) -> None:
        if self.to not in FORMATS:
            raise fail(f"--to must be one of {', '.join(FORMATS)}, got {self.to!r}")
