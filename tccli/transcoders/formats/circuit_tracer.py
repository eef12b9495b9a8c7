"""circuit-tracer transcoder sets (its ``utils/hf_utils.py`` and ``transcoder/single_layer_transcoder.py``).

A folder (or hub repository) with ``config.yaml``::

    model_name: google/gemma-2-2b
    model_kind: transcoder_set          # cross_layer_transcoder: formats.circuit_tracer_clt reads it
    feature_input_hook: hook_resid_mid  # or ln2.hook_normalized, mlp.hook_in
    feature_output_hook: hook_mlp_out   # or mlp.hook_out
    activation: relu | jumprelu | topk  # optional: without it, a threshold tensor means JumpReLU
    k: 64                               # topk only
    transcoders: [...]                  # optional: one file per layer, in order (paths or hf:// URIs)

and otherwise ``layer_{i}.safetensors`` beside it, each holding ``W_enc`` [m, d] (applied as
``F.linear(x, W_enc, b_enc)``), ``W_dec`` [m, d], ``b_enc``, ``b_dec``, optionally
``activation_function.threshold`` [m] and ``W_skip`` [d, d] (applied as ``x @ W_skip.T``: [d_out, d_in]).
The older layout lists ``transcoders`` as ``{id, layer, filepath}`` entries; both are read. A listed
``.npz`` file is a Gemma Scope transcoder (formats.gemma_scope); a file with ``w_enc``/``w_dec``/
``affine_skip_connection`` keys is Gemma Scope 2's layout (W_enc stored [d, m], the skip [d_in, d_out]).

Spaces come from the hooks (formats.common): in circuit-tracer's models hook_resid_mid is the input of the
norm in front of the MLP, ln2.hook_normalized that norm's output before its weight, mlp.hook_in the MLP's
input, mlp.hook_out its output and hook_mlp_out what enters the residual (after Gemma-2's post-norm). The
config names hooks inside a block; circuit-tracer attaches them at ``blocks.{layer}.{hook}``, and so do the
hook names tc records (``input_hook``, ``output_hook``). Layers are 0 .. n-1 with none missing, as
circuit-tracer requires: a gap is refused, naming the missing file.

Two behaviours of circuit-tracer tc does not copy: its TopK keeps the k largest pre-activations even when
negative (tc applies ReLU after the selection; they agree whenever k pre-activations are positive), and its
attribution zeroes every feature at the first (BOS) position (tc keeps the transcoder's real output there;
the BOS position is excluded from circuit sources by default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from tccli.config.transcoders import TranscoderConfig
from tccli.errors import fail
from tccli.transcoders.files import block_hook
from tccli.transcoders.formats import gemma_scope
from tccli.transcoders.formats.common import (
    filled,
    hook_of_space,
    inference_threshold,
    input_bias_folded,
    read_safetensors,
    read_yaml,
    source,
    space_of_hook,
    write_safetensors,
    write_text,
)
from tccli.transcoders.transcoder import Transcoder

CONFIG = "config.yaml"
ACTIVATIONS = ("relu", "jumprelu", "topk")
# tc kinds -> the circuit-tracer activation that stands for them. signed_topk is circuit-tracer's TopK
# exactly; tc's topk (ReLU after the selection) is written as it too, which differs only on a token with
# fewer than k positive pre-activations (tc convert says so on stderr).
WRITTEN_AS = {"batchtopk": "jumprelu", "signed_topk": "topk"}


def is_set(path: Path) -> bool:
    if not (path.is_dir() and (path / CONFIG).is_file()):
        return False
    try:
        data = read_yaml(path / CONFIG)
    except Exception:
        return False
    return "feature_input_hook" in data or data.get("model_kind") in ("transcoder_set", "cross_layer_transcoder")


def layer_files(folder: Path, config: dict, origin: Optional[str] = None) -> dict[int, Path]:
    """{layer: local file} for the set in ``folder`` (downloading hf:// entries when online)."""
    listed = config.get("transcoders")
    if listed is None:
        files = {}
        for file in folder.glob("layer_*.safetensors"):
            suffix = file.stem[len("layer_") :]
            if suffix.isdigit():
                files[int(suffix)] = file
        if not files:
            raise fail(f"{folder / CONFIG} lists no transcoders and no layer_*.safetensors lie beside it")
        missing = _first_missing_layer(files)
        if missing is not None:  # circuit-tracer loads layer_0 .. layer_{n-1}: a gap is a missing file
            raise fail(
                f"{folder / f'layer_{missing}.safetensors'} does not exist: a circuit-tracer set needs a "
                f"transcoder for every layer from 0 to {max(files)}"
            )
        return dict(sorted(files.items()))
    if not isinstance(listed, list):
        raise fail(f"{folder / CONFIG}: transcoders must be a list")
    out = {}
    for index, entry in enumerate(listed):
        if isinstance(entry, dict):  # older layout: {id, layer, filepath}
            layer, where = entry.get("layer", index), entry.get("filepath")
        else:
            layer, where = index, entry
        if not isinstance(where, str) or not isinstance(layer, int):
            raise fail(f"{folder / CONFIG}: transcoder entry {index} is not a path (or {{layer, filepath}})")
        out[layer] = _local(folder, where)
    missing = _first_missing_layer(out)
    if missing is not None:
        raise fail(
            f"{folder / CONFIG} lists no transcoder for layer {missing}: a circuit-tracer set needs one for "
            f"every layer from 0 to {max(out)}"
        )
    return dict(sorted(out.items()))


def _first_missing_layer(files: dict[int, Path]) -> Optional[int]:
    """The first of layers 0 .. max(files) without a file (circuit-tracer refuses a set with a gap), or None."""
    gaps = sorted(set(range(max(files) + 1)) - set(files)) if files else []
    return gaps[0] if gaps else None


def _local(folder: Path, where: str) -> Path:
    if where.startswith("hf://"):
        from tccli.transcoders.formats.hub import download_uri

        return download_uri(where)
    path = Path(where).expanduser()
    for candidate in ((folder / path) if not path.is_absolute() else path, path):
        if candidate.exists():
            return candidate
    raise fail(f"{folder / CONFIG} lists {where}, which does not exist")


def read_set(folder: str | Path, origin: Optional[str] = None) -> dict[int, Transcoder]:
    """Every layer of a circuit-tracer set as tc Transcoders."""
    folder = Path(folder)
    config = read_yaml(folder / CONFIG)
    kind = config.get("model_kind", "transcoder_set")
    if kind != "transcoder_set":
        raise fail(f"{folder}: circuit-tracer model_kind {kind!r} is not supported (per-layer transcoder_set is)")
    where = str(folder / CONFIG)
    hook_in, hook_out = config.get("feature_input_hook"), config.get("feature_output_hook")
    input_space = space_of_hook(hook_in, False, where)
    output_space = space_of_hook(hook_out, True, where)
    activation = config.get("activation")
    if activation is not None and activation not in ACTIVATIONS:
        raise fail(f"{where}: activation {activation!r} is not supported ({', '.join(ACTIVATIONS)} are)")
    out = {}
    for layer, file in layer_files(folder, config, origin).items():
        info = {
            "model_name": config.get("model_name"),
            "layer": layer,
            "input_space": input_space,
            "output_space": output_space,
            # the hooks circuit-tracer attaches to: the config's names under blocks.{layer}.
            "input_hook": block_hook(hook_in, layer),
            "output_hook": block_hook(hook_out, layer),
            "source": source("circuit-tracer", file, set=origin or str(folder), config=CONFIG),
        }
        if file.suffix == ".npz":  # Gemma Scope files listed by a circuit-tracer config: its hooks rule
            transcoder = gemma_scope.read(file, layer)
            for name, value in info.items():
                setattr(transcoder.config, name, value)
            transcoder.config.source["file_format"] = "gemma-scope"
            out[layer] = transcoder
            continue
        out[layer] = read_layer(file, activation, config.get("k"), info)
    return out


def read_layer(file: Path, activation: Optional[str], k, info: dict) -> Transcoder:
    where = str(file)
    tensors = read_safetensors(file)
    if "w_enc" in tensors:  # Gemma Scope 2's JumpReLU checkpoints
        tensors = {
            "W_enc": tensors["w_enc"].T,
            "W_dec": tensors["w_dec"],
            "b_enc": tensors["b_enc"],
            "b_dec": tensors["b_dec"],
            "activation_function.threshold": tensors["threshold"],
            **({"W_skip": tensors["affine_skip_connection"].T} if "affine_skip_connection" in tensors else {}),
        }
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        if name not in tensors:
            raise fail(f"{where} is not a circuit-tracer transcoder: it lacks {name}")
    threshold = tensors.get("activation_function.threshold")
    if activation is None:
        activation = "jumprelu" if threshold is not None else "relu"
    if activation == "jumprelu" and threshold is None:
        raise fail(f"{where}: a jumprelu transcoder without activation_function.threshold")
    if activation == "topk":
        k = int(tensors["k"]) if k is None and "k" in tensors else k
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise fail(f"{where}: a topk transcoder needs k in config.yaml")
        activation = "signed_topk"  # circuit-tracer's TopK keeps the k largest values as they are, even negative
    else:
        k = None
    m, d_in = tensors["W_enc"].shape
    skip = "W_skip" in tensors
    config = TranscoderConfig(
        d_in=int(d_in),
        d_out=int(tensors["W_dec"].shape[1]),
        n_features=int(m),
        activation=activation,
        k=k,
        skip=skip,
        **info,
    )
    weights = {
        "W_enc": tensors["W_enc"].T,
        "W_dec": tensors["W_dec"],
        "b_enc": tensors["b_enc"],
        "b_dec": tensors["b_dec"],
        "b_pre": torch.zeros(int(d_in)),
    }
    if activation == "jumprelu":
        weights["threshold"] = threshold
    if skip:
        weights["W_skip"] = tensors["W_skip"].T  # stored [d_out, d_in]; tc's is [d_in, d_out]
    return filled(config, weights, where)


def check_set(transcoders: dict[int, Transcoder], where: str) -> str:
    """Refuse (one line) a set circuit-tracer cannot hold; returns the activation its config will name."""
    layers = sorted(transcoders)
    if layers != list(range(len(layers))):
        raise fail(f"{where}: circuit-tracer needs a transcoder for every layer from 0, got {layers}")
    configs = [transcoders[layer].config for layer in layers]
    first = configs[0]
    activation = WRITTEN_AS.get(first.activation, first.activation)
    for config in configs:
        same = (config.input_space, config.output_space, config.k, config.kind) == (
            first.input_space,
            first.output_space,
            first.k,
            first.kind,
        )
        if not same or WRITTEN_AS.get(config.activation, config.activation) != activation:
            raise fail(f"{where}: all layers must share spaces, activation and k (layer {config.layer} differs)")
    if first.kind != "transcoder":
        raise fail(f"{where}: circuit-tracer sets hold transcoders, not SAEs")
    return activation


def write_set(transcoders: dict[int, Transcoder], folder: str | Path) -> list[Path]:
    """``folder/config.yaml`` + ``folder/layer_{i}.safetensors``. circuit-tracer needs layers 0..n-1 with one
    config: every transcoder must share its spaces, activation (batchtopk is written as jumprelu, its
    inference rule; topk and signed_topk as topk, see WRITTEN_AS) and k. ``b_pre`` is folded into ``b_enc``."""
    import yaml

    folder = Path(folder)
    where = f"writing {folder} as a circuit-tracer set"
    activation = check_set(transcoders, where)
    layers = sorted(transcoders)
    first = transcoders[layers[0]].config
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for layer in layers:
        transcoder = transcoders[layer]
        W_enc, b_enc = input_bias_folded(transcoder)
        tensors = {"W_enc": W_enc.T, "W_dec": transcoder.W_dec, "b_enc": b_enc, "b_dec": transcoder.b_dec}
        if activation == "jumprelu":
            tensors["activation_function.threshold"] = inference_threshold(transcoder, where)
        if transcoder.config.skip:
            tensors["W_skip"] = transcoder.W_skip.detach().float().cpu().T
        path = folder / f"layer_{layer}.safetensors"
        write_safetensors(path, tensors)
        written.append(path)
    config = {
        "model_name": first.model_name,
        "model_kind": "transcoder_set",
        "feature_input_hook": hook_of_space(first.input_space, False),
        "feature_output_hook": hook_of_space(first.output_space, True),
        "activation": activation,
    }
    if activation == "topk":
        config["k"] = first.k
    write_text(folder / CONFIG, yaml.safe_dump(config, sort_keys=False))
    return written
