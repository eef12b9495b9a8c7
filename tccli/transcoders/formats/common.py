"""What the format readers and writers share: hook names <-> spaces, tensors into a Transcoder, one-line
errors for unreadable files. Nothing here runs code from a file: JSON, YAML (safe loader), safetensors and
numpy archives without pickles only."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch

from tccli.config.transcoders import TranscoderConfig
from tccli.errors import fail
from tccli.runtime.outputs import atomic_write
from tccli.transcoders.transcoder import Transcoder

# TransformerLens-style hook names (without the "blocks.L." prefix) and the spaces they are (tccli.model.spaces).
# "mlp.hook_in" is the MLP module's input (circuit-tracer's ReplacementMLP, TransformerLens loaded with
# fold_ln=False, the TransformerBridge), "hook_mlp_in" the bridge's block-level name for it.
INPUT_HOOK_SPACES = {
    "ln2.hook_normalized": "normalized",
    "mlp.hook_in": "mlp_input",
    "hook_mlp_in": "mlp_input",
    "hook_resid_mid": "resid_mid",
}
OUTPUT_HOOK_SPACES = {
    "hook_mlp_out": "mlp_out",
    "mlp.hook_out": "mlp_output",
}
# The name written for each space (the first of the names above that means it).
SPACE_INPUT_HOOKS = {"normalized": "ln2.hook_normalized", "mlp_input": "mlp.hook_in", "resid_mid": "hook_resid_mid"}
SPACE_OUTPUT_HOOKS = {"mlp_out": "hook_mlp_out", "mlp_output": "mlp.hook_out"}

_BLOCK_PREFIX = re.compile(r"^blocks\.(\d+)\.")
_LAYER_NUMBER = re.compile(r"(?:^|[._/])(?:layers?|h|blocks)[._]?(\d+)(?:$|[._/])")


def layer_of_hook(hook: Optional[str]) -> Optional[int]:
    """The L of "blocks.L.anything", or None."""
    match = _BLOCK_PREFIX.match(hook or "")
    return int(match.group(1)) if match else None


def layer_in_name(name: str) -> Optional[int]:
    """The layer number in a folder or hookpoint name: layer_3, layers.3.mlp, h.3.mlp, blocks.3..."""
    match = _LAYER_NUMBER.search(name)
    return int(match.group(1)) if match else None


def space_of_hook(hook: Optional[str], output: bool, where: str) -> str:
    """The space a hook name (with or without "blocks.L.") stands for; one line naming it if unknown."""
    table = OUTPUT_HOOK_SPACES if output else INPUT_HOOK_SPACES
    bare = _BLOCK_PREFIX.sub("", hook or "")
    if bare not in table:
        side = "writes" if output else "reads"
        raise fail(
            f"{where} {side} {hook!r}; tc runs transcoders that read "
            f"{', '.join(INPUT_HOOK_SPACES)} and write {', '.join(OUTPUT_HOOK_SPACES)}"
        )
    return table[bare]


def hook_of_space(space: str, output: bool, layer: Optional[int] = None) -> str:
    name = (SPACE_OUTPUT_HOOKS if output else SPACE_INPUT_HOOKS)[space]
    return name if layer is None else f"blocks.{layer}.{name}"


def filled(config: TranscoderConfig, tensors: dict[str, torch.Tensor], where: str) -> Transcoder:
    """A Transcoder of ``config`` holding ``tensors`` (checked against the config's shapes), in float32."""
    config.validate(where)
    transcoder = Transcoder(config)
    with torch.no_grad():
        for name, param in transcoder.named_parameters():
            value = tensors.get(name)
            if value is None:
                raise fail(f"{where} lacks tensor {name}")
            if tuple(value.shape) != tuple(param.shape):
                raise fail(f"{where}: tensor {name} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
            param.copy_(value.to(torch.float32))
    return transcoder


def positive_int(config: dict, key: str, default: Any, where: str) -> int:
    """A positive integer field of a foreign config (one line naming it otherwise)."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def restored_config(tc_config: Any, where: str) -> Optional[TranscoderConfig]:
    """The full tc config a tc writer kept in a foreign config (under ``tc_config``), or None if there is none."""
    if not isinstance(tc_config, dict):
        return None
    try:
        config = TranscoderConfig(**tc_config)
    except TypeError as exc:
        raise fail(f"{where}: its tc_config is not a tc transcoder config: {exc}") from None
    return config.validate(f"{where} (tc_config)")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise fail(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    plain = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(plain, str(tmp)))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def read_json(path: Path) -> dict:
    from tccli.transcoders.files import read_json_object

    return read_json_object(path)


def read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())  # safe_load: plain data only, no tags that build objects
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise fail(f"cannot read {path}: {reason}") from None
    if not isinstance(data, dict):
        raise fail(f"{path} is not a YAML mapping")
    return data


def input_bias_folded(transcoder: Transcoder) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_enc [d_in, m], b_enc [m]) with tc's input bias b_pre folded into the encoder bias
    (b_enc - b_pre W_enc): the same pre-activations, for formats that have no input bias."""
    W_enc = transcoder.W_enc.detach().float().cpu()
    b_enc = transcoder.b_enc.detach().float().cpu()
    b_pre = transcoder.b_pre.detach().float().cpu()
    return W_enc, (b_enc - b_pre @ W_enc if bool(b_pre.any()) else b_enc)


def inference_threshold(transcoder: Transcoder, where: str) -> torch.Tensor:
    """The per-feature threshold of a jumprelu/batchtopk transcoder (relu: zeros), for formats whose JumpReLU
    is ``pre * (pre > threshold)``."""
    activation = transcoder.config.activation
    if activation == "relu":
        return torch.zeros(transcoder.n_features)
    if activation in ("jumprelu", "batchtopk"):
        return transcoder.threshold.detach().float().cpu()
    raise fail(f"{where}: a {activation} transcoder cannot be written in this format (it has no {activation})")


def source(fmt: str, path: Any, **extra: Any) -> dict:
    """The ``source`` entry of a read transcoder's config (tc info shows it)."""
    return {"format": fmt, "path": str(path), **{k: v for k, v in extra.items() if v is not None}}
