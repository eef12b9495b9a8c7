"""The paper's released GPT-2 transcoder files (docs/method.md section 7).

``torch.save({"cfg": <sae_training.config.LanguageModelSAERunnerConfig>, "state_dict": {W_enc, b_enc, W_dec,
b_dec, b_dec_out}})`` where ``b_dec`` is input-side (tc's ``b_pre``) and ``b_dec_out`` the output bias (tc's
``b_dec``). Read with torch's restricted ``weights_only`` unpickler (tensors, storages, dtypes, devices and
plain containers only) plus one stand-in class registered under the config class's names, which keeps the
pickled attributes as plain data. Any other global in the pickle (``os.system``, another class, ...) stops
the load before anything runs. The reference code loaded GPT-2 with HookedTransformer's default
processing, which tc's compatibility mode reproduces: the spaces are normalized -> mlp_out.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from tccli.config.transcoders import TranscoderConfig
from tccli.errors import fail
from tccli.transcoders.formats.common import filled, layer_of_hook, source
from tccli.transcoders.transcoder import Transcoder

# The config class of the paper's reference code (jacobdunefsky/transcoder_circuits, an old SAELens fork),
# under the module paths it was pickled from. Only these names get the stand-in; nothing else is allowed.
PAPER_CONFIG_CLASSES = (
    "sae_training.config.LanguageModelSAERunnerConfig",
    "transcoder_circuits.sae_training.config.LanguageModelSAERunnerConfig",
)
PAPER_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")


def detect(path: Path) -> bool:
    return path.is_file() and path.suffix == ".pt"


class ForeignConfig:
    """Stand-in for the pickled config class of the paper's code: keeps its attributes as plain data."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) from objects with __slots__
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("the config object's state is not a plain attribute dict")
        self.__dict__.update(state)


def read(path: str | Path) -> Transcoder:
    """A transcoder (or SAE) file released with the paper, loaded without running pickled code."""
    from tccli.model.loading import WEIGHT_PROCESSING

    path = Path(path)
    where = str(path)
    stand_ins = [(ForeignConfig, name) for name in PAPER_CONFIG_CLASSES]
    try:
        with torch.serialization.safe_globals(stand_ins), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing a file
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

    plain = {key: value for key, value in attrs.items() if isinstance(value, (str, int, float, bool, type(None)))}
    config = TranscoderConfig(
        d_in=d_in,
        d_out=d_out,
        n_features=n_features,
        activation="relu",
        kind="transcoder" if is_transcoder else "sae",
        layer=layer,
        model_name=attrs.get("model_name"),
        input_space="normalized" if is_transcoder else "mlp_out",
        # the reference code loaded models with HookedTransformer's default processing, which is
        # what tc's compatibility mode reproduces
        weight_processing=dict(WEIGHT_PROCESSING),
        input_hook=hook_in,
        output_hook=hook_out,
        training={"source": "paper .pt", "file": path.name, "reference_config": plain},
        source=source("paper-pt", path),
    )
    weights = {
        "W_enc": W_enc,
        "b_enc": state["b_enc"],
        "W_dec": state["W_dec"],
        "b_pre": state["b_dec"],
        "b_dec": state["b_dec_out"] if is_transcoder and "b_dec_out" in state else state["b_dec"],
    }
    return filled(config, weights, where)


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
        return (
            f"it asks to run or build {match.group(1)}, which is not a tensor or the paper's config class "
            "(only those are allowed, so nothing in the file was executed)"
        )
    return "it is not a torch.save file holding only tensors and the paper's config (nothing in the file was executed)"
