"""EleutherAI sparsify sparse coders (its ``sparse_coder.py``): one folder per hookpoint, named by it
(``layers.3.mlp``), holding ``cfg.json`` (``activation``, ``k``, ``num_latents``, ``transcode``,
``skip_connection``, ``d_in``, ...) and ``sae.safetensors`` (``encoder.weight`` [m, d], ``encoder.bias`` [m],
``W_dec`` [m, d], ``b_dec`` [d], and ``W_skip`` [d, d] applied as ``x @ W_skip.mT``: [d_out, d_in]).

    z = topk(relu((x - b_dec [SAE only]) encoder.weight^T + encoder.bias));  y = z W_dec + b_dec (+ x W_skip^T)

ReLU before the top-k and tc's top-k before the ReLU keep the same positive entries, so they agree
exactly. sparsify hooks PyTorch modules of the HuggingFace model: a transcoder on ``*.mlp`` reads the MLP
module's input and predicts its output, tc's mlp_input -> mlp_output (an SAE on ``*.mlp`` reads and writes
mlp_output). Other hookpoints (the residual stream ``layers.N``, ``mlp.act``, attention) and the groupmax
activation are refused with one line.

A sparsify training run saves its coders in a run folder (``Trainer.save``): the trainer's ``config.json``,
one folder per hookpoint as above (``layers.4.mlp/``), and the state a resumed run needs beside them
(``optimizer_{i}.pt``, ``lr_scheduler_{i}.pt``, ``state.pt``, ``rank_{r}_state.pt``; ``best/`` with
``--save_best``). ``read_run`` reads the hookpoint folders of such a folder and nothing else. A run that
trained several seeds per hookpoint (``layers.4.mlp/seed0/``, ...) holds more than one coder per layer
and is refused with one line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from tccli.config.transcoders import TranscoderConfig
from tccli.errors import fail
from tccli.transcoders.formats.common import (
    filled,
    input_bias_folded,
    layer_in_name,
    read_json,
    read_safetensors,
    source,
    write_safetensors,
    write_text,
)
from tccli.transcoders.transcoder import Transcoder

CONFIG = "cfg.json"
WEIGHTS = "sae.safetensors"
RUN_CONFIG = "config.json"  # the trainer's TrainConfig, at the top of a run folder
# what a run folder holds beside its hookpoint folders, for a resumed run: never read by tc
RUN_STATE = re.compile(r"((optimizer|lr_scheduler)(_\d+)?|state|rank_\d+_state)\.pt")
SEED_FOLDER = re.compile(r"seed\d+")


def detect(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def _seed_folders(path: Path) -> list[Path]:
    """The ``seedN`` coder folders of a hookpoint trained with several init seeds."""
    if not path.is_dir():
        return []
    return sorted(child for child in path.iterdir() if SEED_FOLDER.fullmatch(child.name) and detect(child))


def is_run(path: Path) -> bool:
    """A sparsify run folder: config.json beside hookpoint folders or the trainer's state files."""
    if not (path.is_dir() and (path / RUN_CONFIG).is_file()):
        return False
    return any(
        (child.is_dir() and (detect(child) or _seed_folders(child)))
        or (child.is_file() and RUN_STATE.fullmatch(child.name))
        for child in path.iterdir()
    )


def read_run(path: str | Path) -> dict[int, Transcoder]:
    """{layer: coder} of a sparsify run folder: every hookpoint folder in it (cfg.json + sae.safetensors),
    the optimizer, scheduler and trainer state beside them left alone."""
    path = Path(path)
    out: dict[int, Transcoder] = {}
    children = sorted(child for child in path.iterdir() if child.is_dir())
    for child in children:
        seeds = _seed_folders(child)
        if seeds and not detect(child):
            raise fail(
                f"{child} holds one sparse coder per init seed ({', '.join(s.name for s in seeds)}); tc reads one "
                f"coder per layer: copy the seed you want into a folder of its own named {child.name}"
            )
        if not detect(child):
            continue  # best/ (--save_best) and anything else that is not a hookpoint
        coder = read(child)
        layer = coder.config.layer
        if layer in out:
            raise fail(
                f"{path} holds two sparse coders for layer {layer} ({out[layer].config.input_hook}, {child.name})"
            )
        out[layer] = coder
    if not out:
        raise fail(
            f"{path} is a sparsify run folder ({RUN_CONFIG}) but holds no coders: tc looked for hookpoint "
            f"folders such as {folder_name(0)}/ holding {CONFIG} + {WEIGHTS}"
        )
    return out


def read(folder: str | Path) -> Transcoder:
    folder = Path(folder)
    where = str(folder)
    cfg = read_json(folder / CONFIG)
    tensors = read_safetensors(folder / WEIGHTS)
    hookpoint = folder.name
    if not (hookpoint == "mlp" or hookpoint.endswith(".mlp")):
        raise fail(
            f"{where}: sparsify hookpoint {hookpoint!r} is not an MLP module (tc reads sparse coders on layers.N.mlp)"
        )
    layer = layer_in_name(hookpoint)
    if layer is None:
        raise fail(f"{where}: no layer number in the hookpoint {hookpoint!r}")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise fail(f"{where}: sparsify activation {activation!r} is not supported (topk is)")
    for name in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"):
        if name not in tensors:
            raise fail(f"{where}/{WEIGHTS} lacks {name}")
    m, d_in = tensors["encoder.weight"].shape
    transcode = bool(cfg.get("transcode", False))
    skip = "W_skip" in tensors
    k = cfg.get("k")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise fail(f"{where}: k must be a positive integer, got {k!r}")
    config = TranscoderConfig(
        d_in=int(d_in),
        d_out=int(tensors["W_dec"].shape[1]),
        n_features=int(m),
        activation="topk",
        k=k,
        skip=skip,
        kind="transcoder" if transcode else "sae",
        layer=layer,
        input_space="mlp_input" if transcode else "mlp_output",
        output_space="mlp_output",
        input_hook=hookpoint,
        output_hook=hookpoint,
        training={"source": "sparsify", "sparsify_config": cfg},
        source=source("sparsify", folder, hookpoint=hookpoint),
    )
    weights = {
        "W_enc": tensors["encoder.weight"].T,
        "b_enc": tensors["encoder.bias"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
        "b_pre": torch.zeros(int(d_in)) if transcode else tensors["b_dec"].clone(),
    }
    if skip:
        weights["W_skip"] = tensors["W_skip"].T
    return filled(config, weights, where)


def folder_name(layer: int) -> str:
    return f"layers.{layer}.mlp"


def check(transcoder: Transcoder, where: str) -> None:
    """Refuse (one line) a coder sparsify cannot hold."""
    config = transcoder.config
    expected = ("mlp_input", "mlp_output") if config.kind == "transcoder" else ("mlp_output", "mlp_output")
    if config.activation != "topk" or (config.input_space, config.output_space) != expected:
        raise fail(
            f"{where}: sparsify holds TopK coders on the MLP module (transcoders mlp_input -> mlp_output, "
            f"SAEs on mlp_output); this is a {config.activation} {config.kind} from {config.input_space} "
            f"to {config.output_space}"
        )
    if config.kind != "transcoder" and not torch.equal(transcoder.b_pre.detach(), transcoder.b_dec.detach()):
        raise fail(f"{where}: a sparsify SAE subtracts b_dec from its input; this SAE's b_pre differs")


def write(transcoder: Transcoder, folder: str | Path) -> Path:
    """``folder`` (name it ``layers.L.mlp``) with cfg.json + sae.safetensors: TopK transcoders from mlp_input to
    mlp_output (SAEs on mlp_output); ``b_pre`` folded into the encoder bias for transcoders."""
    config = transcoder.config
    folder = Path(folder)
    check(transcoder, f"writing {folder} as sparsify")
    is_transcoder = config.kind == "transcoder"
    if is_transcoder:
        W_enc, b_enc = input_bias_folded(transcoder)
    else:
        W_enc, b_enc = transcoder.W_enc.detach().float().cpu(), transcoder.b_enc.detach().float().cpu()
    tensors = {"encoder.weight": W_enc.T, "encoder.bias": b_enc, "W_dec": transcoder.W_dec, "b_dec": transcoder.b_dec}
    if config.skip:
        tensors["W_skip"] = transcoder.W_skip.detach().float().cpu().T
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, config.n_features // config.d_in),
        "normalize_decoder": True,
        "num_latents": config.n_features,
        "k": config.k,
        "multi_topk": False,
        "skip_connection": config.skip,
        "transcode": is_transcoder,
        "d_in": config.d_in,
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / WEIGHTS, tensors)
    write_text(folder / CONFIG, json.dumps(cfg))
    return folder
