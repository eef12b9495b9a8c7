"""The paper authors' own release layout: the folders of Peek (github.com/jacobdunefsky/peek,
``tc_peek_backend.py``: ``SAEInfo.save`` / ``SAE.save``), in which Dunefsky published the Pythia-2.8B
transcoders (``jacobdunefsky/pythia-2.8B-transcoders``, ``pythia-2.8B-dun-mlp-tc{0..31}/``) and re-packaged
the paper's GPT-2 transcoders (``jacobdunefsky/gpt2small-transcoders``, ``gpt2-small-dun-chl-mlp-tc{0..11}/``).
One folder per transcoder:

    sae_info.json    {"name", "short_name", "model_path", "upstreams": [...], "sae_filename": "sae.json",
                      "input_layer":  {"layer": L, "sublayer": "mlp_in",  "parallel_attn_mlp": ...},
                      "output_layer": {"layer": L, "sublayer": "mlp_out", "parallel_attn_mlp": ...}}
    sae.json         {"d_in", "num_features", "d_out" (default d_in), "dtype" ("torch.float32", ...),
                      "act_fn" ("relu", "top_k" or "id"), "top_k" (k), "tensors_filename": "sae.safetensors"}
    sae.safetensors  W_enc [d_in, m], b_enc [m], W_dec [m, d_out], b_dec [d_out]

``SAE.forward`` computes ``z = act(x W_enc + b_enc)``, ``y = z W_dec + b_dec``: no input-side bias (tc's
``b_pre`` is 0; the paper's ``.pt`` files subtract one, so their re-packaging folded it into ``b_enc``).
``top_k`` keeps the k largest pre-activations as they are, negative ones included (as circuit-tracer's
TopK does): tc reads it as ``signed_topk``. tc's own ``topk`` applies ReLU after the selection; written as
``top_k`` it differs only on a token with fewer than k positive pre-activations (tc convert says so on
stderr). ``id`` (no non-linearity) is refused.

Sublayers name TransformerLens hooks (``LayerSublayer.to_hookpoint_str``): ``mlp_in`` is
``blocks.L.ln2.hook_normalized``, ``mid`` ``blocks.L.hook_resid_mid``, ``mlp_out`` ``blocks.L.hook_mlp_out``.
Peek loads models with ``HookedTransformer.from_pretrained``'s default processing (LayerNorm folded,
writing weights centred), which is tc's compatibility mode: mlp_in -> mlp_out is tc's normalized -> mlp_out
on every architecture, Pythia's parallel blocks included (there ln2 reads the block's input residual). Input
and output on the same sublayer is an SAE (tc reads those on mlp_out); other sublayers and transcoders from
one layer to another are refused with one line.

Writing: relu, topk and signed_topk transcoders (normalized or resid_mid -> mlp_out) and SAEs on mlp_out, without skip;
``b_pre`` is folded into ``b_enc`` (``b_enc - b_pre W_enc``). The tc config travels in sae_info.json under
``tc_config`` (Peek reads only the keys it knows), so a round trip restores it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from tccli.config.transcoders import TranscoderConfig
from tccli.errors import fail
from tccli.transcoders.formats.common import (
    filled,
    input_bias_folded,
    positive_int,
    read_json,
    read_safetensors,
    restored_config,
    source,
    space_of_hook,
    write_safetensors,
    write_text,
)
from tccli.transcoders.transcoder import Transcoder

INFO = "sae_info.json"
CONFIG = "sae.json"
WEIGHTS = "sae.safetensors"
TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")
# Peek's Sublayer names -> the TransformerLens hook (without "blocks.L.") tc reads as a space; the other
# sublayers (embed, pre, attn_in, attn_out, post, pre_logits, logits) are nothing a tc transcoder reads.
SUBLAYER_HOOKS = {"mlp_in": "ln2.hook_normalized", "mid": "hook_resid_mid", "mlp_out": "hook_mlp_out"}
SPACE_SUBLAYERS = {"normalized": "mlp_in", "resid_mid": "mid", "mlp_out": "mlp_out"}
# DTYPE_DICT of tc_peek_backend.py, floating-point entries (null means float32)
FLOAT_DTYPES = {
    None,
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "torch.float64",
    "torch.float32",
    "torch.float16",
    "torch.bfloat16",
}


def detect(path: Path) -> bool:
    return path.is_dir() and ((path / INFO).is_file() or (path / CONFIG).is_file())


def _plain_name(value: Any, key: str, where: str) -> str:
    """A file name from a Peek json, which must name a file beside it."""
    if not isinstance(value, str) or not value or Path(value).name != value or value in (".", ".."):
        raise fail(f"{where}: {key} must name a file in the same folder, got {value!r}")
    return value


def _layer_sublayer(info: dict, key: str, where: str) -> tuple[int, str]:
    entry = info.get(key)
    if not isinstance(entry, dict):
        raise fail(f"{where}: {key} must be an object with layer and sublayer, got {entry!r}")
    layer, sublayer = entry.get("layer"), entry.get("sublayer")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise fail(f"{where}: {key}.layer must be a non-negative integer, got {layer!r}")
    if sublayer not in SUBLAYER_HOOKS:
        raise fail(
            f"{where}: {key}.sublayer {sublayer!r} is not supported (tc reads transcoders on "
            f"{', '.join(SUBLAYER_HOOKS)})"
        )
    return layer, sublayer


def _activation(cfg: dict, where: str) -> tuple[str, Optional[int]]:
    act_fn = cfg.get("act_fn", "relu")
    if act_fn == "relu":
        return "relu", None
    if act_fn == "top_k":
        return "signed_topk", positive_int(cfg, "top_k", None, where)
    raise fail(f"{where}: act_fn {act_fn!r} is not supported (relu and top_k are)")


def read(folder: str | Path) -> Transcoder:
    """A Peek folder (sae_info.json + sae.json + sae.safetensors) as a tc Transcoder."""
    folder = Path(folder)
    if not (folder / INFO).is_file():
        raise fail(
            f"{folder}: a Peek folder needs {INFO} (it says which layer and hooks the transcoder "
            f"reads and writes); found only {CONFIG}"
        )
    info = read_json(folder / INFO)
    where = str(folder / INFO)
    config_file = folder / _plain_name(info.get("sae_filename", CONFIG), "sae_filename", where)
    if not config_file.is_file():
        raise fail(f"{folder} lacks {config_file.name}, which {INFO} names")
    cfg = read_json(config_file)
    cfg_where = str(config_file)
    tensors_name = cfg.get("tensors_filename")
    if tensors_name is None:
        raise fail(f"{cfg_where}: tensors_filename is null (the folder was saved without its weights)")
    weights_file = folder / _plain_name(tensors_name, "tensors_filename", cfg_where)
    if not weights_file.is_file():
        raise fail(f"{folder} lacks {weights_file.name}, which {config_file.name} names")

    d_in = positive_int(cfg, "d_in", None, cfg_where)
    n_features = positive_int(cfg, "num_features", None, cfg_where)
    d_out = d_in if cfg.get("d_out") is None else positive_int(cfg, "d_out", None, cfg_where)
    if cfg.get("dtype") not in FLOAT_DTYPES:
        raise fail(f"{cfg_where}: dtype {cfg.get('dtype')!r} is not a floating-point type")
    activation, k = _activation(cfg, cfg_where)

    layer, sublayer_in = _layer_sublayer(info, "input_layer", where)
    out_layer, sublayer_out = (
        _layer_sublayer(info, "output_layer", where) if info.get("output_layer") is not None else (layer, sublayer_in)
    )
    if out_layer != layer:
        raise fail(
            f"{where}: a transcoder from layer {layer} to layer {out_layer} is not supported (tc's read "
            "and write the same layer)"
        )
    is_transcoder = sublayer_in != sublayer_out
    hook_in, hook_out = (f"blocks.{layer}.{SUBLAYER_HOOKS[s]}" for s in (sublayer_in, sublayer_out))
    output_space = space_of_hook(hook_out, True, where)
    input_space = space_of_hook(hook_in, False, where) if is_transcoder else output_space

    tensors = read_safetensors(weights_file)
    for name in TENSORS:
        if name not in tensors:
            raise fail(f"{weights_file} lacks tensor {name}")
    config = restored_config(info.get("tc_config"), where)  # written by tc: everything it knew
    if config is None:
        from tccli.model.loading import WEIGHT_PROCESSING

        model = info.get("model_path")
        config = TranscoderConfig(
            d_in=d_in,
            d_out=d_out,
            n_features=n_features,
            activation=activation,
            k=k,
            kind="transcoder" if is_transcoder else "sae",
            layer=layer,
            input_space=input_space,
            output_space=output_space,
            model_name=model if isinstance(model, str) else None,
            # Peek loads models with HookedTransformer's default processing: tc's compatibility mode
            weight_processing=dict(WEIGHT_PROCESSING),
            input_hook=hook_in,
            output_hook=hook_out,
            training={
                "source": "peek",
                "sae_info": {k: v for k, v in info.items() if k != "upstreams"},
                "sae_config": cfg,
            },
            source=source("peek", folder, name=info.get("name") or None),
        )
    weights = {name: tensors[name] for name in TENSORS}
    weights["b_pre"] = torch.zeros(config.d_in)
    return filled(config, weights, str(weights_file))


def check(transcoder: Transcoder, where: str) -> None:
    """Refuse (one line) a transcoder a Peek folder cannot hold."""
    config = transcoder.config
    if config.activation not in ("relu", "topk", "signed_topk") or config.skip:
        raise fail(
            f"{where}: Peek holds relu and top_k transcoders without skip connections; this is a "
            f"{config.activation}{' skip' if config.skip else ''} {config.kind}"
        )
    spaces = (config.input_space, config.output_space)
    if (
        config.output_space != "mlp_out"
        or config.input_space not in SPACE_SUBLAYERS
        or (config.kind == "sae") != (config.input_space == "mlp_out")
    ):
        raise fail(
            f"{where}: Peek's sublayers hold transcoders from normalized (mlp_in) or resid_mid (mid) to "
            f"mlp_out and SAEs on mlp_out; this {config.kind} reads {spaces[0]} and writes {spaces[1]}"
        )
    if config.layer is None:
        raise fail(f"{where}: the transcoder names no layer, which a Peek folder must say")


def write(transcoder: Transcoder, folder: str | Path) -> Path:
    """``folder`` with sae_info.json, sae.json and sae.safetensors (see the module docstring)."""
    config = transcoder.config
    folder = Path(folder)
    check(transcoder, f"writing {folder} as Peek")
    W_enc, b_enc = input_bias_folded(transcoder)
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": transcoder.W_dec, "b_dec": transcoder.b_dec}
    cfg = {
        "d_in": config.d_in,
        "num_features": config.n_features,
        "d_out": config.d_out,
        "dtype": "torch.float32",
        "act_fn": "relu" if config.activation == "relu" else "top_k",
        "top_k": None if config.activation == "relu" else config.k,
        "tensors_filename": WEIGHTS,
    }
    parallel = config.model_architecture == "GPTNeoXForCausalLM"
    sides = {
        key: {"layer": config.layer, "sublayer": SPACE_SUBLAYERS[space], "parallel_attn_mlp": parallel}
        for key, space in (("input_layer", config.input_space), ("output_layer", config.output_space))
    }
    info = {
        "name": f"layer {config.layer} {config.kind}",
        **sides,
        "short_name": "",
        "model_path": config.model_name,
        "upstreams": [],
        "sae_filename": CONFIG,
        "tc_config": config.to_dict(),
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / WEIGHTS, tensors)
    write_text(folder / CONFIG, json.dumps(cfg))
    write_text(folder / INFO, json.dumps(info))
    return folder
