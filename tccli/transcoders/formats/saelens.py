"""SAELens folders: ``cfg.json`` + ``sae_weights.safetensors`` (SAELens 6 layout; the flat pre-6 layout is
read too). Tensors: W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_out], b_dec, and by architecture
``threshold`` [d_sae] and ``W_skip`` [d_out, d_in]. SAELens computes (sae_lens/saes/*.py)

    standard / topk (SAEs):   z = act((x - b_dec * apply_b_dec_to_input) W_enc + b_enc);  y = z W_dec + b_dec
    transcoder:               z = relu(x W_enc + b_enc);                                   y = z W_dec + b_dec
    skip_transcoder:          as transcoder, y += x W_skip^T
    jumprelu_transcoder:      z = relu(pre) * (pre > threshold)
    jumprelu_skip_transcoder: both

A transcoder has no input-side bias (SAELens refuses apply_b_dec_to_input for them). Mapping to tc:

- reading: ``b_pre = b_dec`` when an SAE applies b_dec to its input, else 0; ``b_dec`` is the output bias;
  ``W_skip`` is transposed to tc's [d_in, d_out]; a JumpReLU threshold t becomes ``max(t, 0)``
  (relu(pre) * (pre > t) == pre * (pre > max(t, 0)), tc's rule, exactly). The spaces come from the hook
  names (``hook_name`` / ``hook_name_out``, see formats.common: ln2.hook_normalized -> normalized,
  mlp.hook_in / hook_mlp_in -> mlp_input, hook_resid_mid -> resid_mid, hook_mlp_out -> mlp_out,
  mlp.hook_out -> mlp_output). A LayerNorm model's hook_mlp_out read by SAELens without
  center_writing_weights is uncentred: such a config's output is mlp_output.
- writing: an SAE whose ``b_pre`` equals its ``b_dec`` is written as is with ``apply_b_dec_to_input =
  true``; otherwise ``b_pre`` is folded into the encoder bias, ``b_enc' = b_enc - b_pre W_enc``. TopK SAEs
  are architecture ``topk``; TopK transcoders architecture ``topk_transcoder``, which SAELens does not
  know (so it refuses the folder instead of applying ReLU); batchtopk transcoders (at inference a JumpReLU
  with one threshold) are written as ``jumprelu_transcoder``. The whole tc config is kept under
  ``tc_config`` (SAELens ignores unknown keys), so a round trip restores everything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from tccli.config.transcoders import OUTPUT_SPACES, TranscoderConfig
from tccli.errors import fail
from tccli.transcoders.formats.common import (
    filled,
    hook_of_space,
    input_bias_folded,
    layer_of_hook,
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

CONFIG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
# SAELens reads a cfg.json as its pre-6 layout unless it names a version >= 6.0.0; the fields written here
# follow the 6.x layout.
LAYOUT_VERSION = "6.0.0"

# architecture -> (is a transcoder, activation, has W_skip)
ARCHITECTURES = {
    "standard": (False, "relu", False),
    "topk": (False, "topk", False),
    "transcoder": (True, "relu", False),
    "skip_transcoder": (True, "relu", True),
    "jumprelu_transcoder": (True, "jumprelu", False),
    "jumprelu_skip_transcoder": (True, "jumprelu", True),
    "topk_transcoder": (True, "topk", False),  # tc's own extension (SAELens has no TopK transcoder)
}


def detect(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def _activation(name: str, k: Any, where: str) -> tuple[str, Optional[int]]:
    if name == "relu":
        return "relu", None
    if name == "topk":
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise fail(f"{where}: topk activation without a positive integer k")
        return "topk", k
    raise fail(f"{where}: activation {name!r} is not supported by tc (relu and topk are)")


def read(folder: str | Path) -> Transcoder:
    """A SAELens folder (SAE or transcoder) as a tc Transcoder."""
    folder = Path(folder)
    where = str(folder)
    cfg = read_json(folder / CONFIG)
    tensors = read_safetensors(folder / WEIGHTS)
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    merged = {**meta, **cfg}  # pre-6 configs are flat; 6.x keeps model and hooks in "metadata"

    norm = merged.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        raise fail(f"{where}: normalize_activations={norm!r} is not supported (tc needs raw activations)")
    if merged.get("finetuning_scaling_factor"):
        raise fail(f"{where}: a finetuning scaling factor is not supported")
    if merged.get("rescale_acts_by_decoder_norm"):
        raise fail(f"{where}: TopK selection rescaled by decoder norms (rescale_acts_by_decoder_norm) is not supported")
    architecture = str(merged.get("architecture", "standard"))
    if architecture not in ARCHITECTURES:
        raise fail(f"{where}: SAELens architecture {architecture!r} is not supported ({', '.join(ARCHITECTURES)} are)")
    is_transcoder, activation, skip = ARCHITECTURES[architecture]
    kwargs = merged.get("activation_fn_kwargs") or {}
    if activation == "topk":
        activation, k = _activation("topk", merged.get("k", kwargs.get("k")), where)
    elif activation == "relu":
        activation, k = _activation(
            str(merged.get("activation_fn", merged.get("activation_fn_str", "relu"))), kwargs.get("k"), where
        )
    else:
        k = None

    hook_in = merged.get("hook_name", merged.get("hook_point"))
    hook_out = merged.get("hook_name_out", merged.get("out_hook_point")) if is_transcoder else hook_in
    d_in = positive_int(merged, "d_in", tensors["W_enc"].shape[0] if "W_enc" in tensors else 0, where)
    d_out = positive_int(merged, "d_out", d_in, where) if is_transcoder else d_in
    n_features = positive_int(merged, "d_sae", tensors["W_enc"].shape[1] if "W_enc" in tensors else 0, where)
    layer = merged.get("hook_layer", merged.get("hook_point_layer"))
    layer = int(layer) if isinstance(layer, int) and not isinstance(layer, bool) else layer_of_hook(hook_in)

    config = restored_config(cfg.get("tc_config"), str(folder / CONFIG))  # written by tc: everything it knew
    if config is None:
        input_space, output_space = _spaces(merged, hook_in, hook_out, is_transcoder, where)
        config = TranscoderConfig(
            d_in=d_in,
            d_out=d_out,
            n_features=n_features,
            activation=activation,
            k=k,
            skip=skip,
            kind="transcoder" if is_transcoder else "sae",
            layer=layer,
            input_space=input_space,
            output_space=output_space,
            model_name=merged.get("model_name"),
            input_hook=hook_in,
            output_hook=hook_out,
            training={"source": "saelens", "saelens_config": cfg},
            source=source("saelens", folder, architecture=architecture),
        )
    weights = dict(tensors)
    apply_b_dec = bool(merged.get("apply_b_dec_to_input", not is_transcoder)) and not is_transcoder
    if "b_dec" in tensors:
        weights["b_pre"] = tensors["b_dec"].clone() if apply_b_dec else torch.zeros(config.d_in)
    if "W_skip" in tensors:
        weights["W_skip"] = tensors["W_skip"].T  # SAELens: [d_out, d_in], applied as x @ W_skip.T
    if "threshold" in tensors:
        weights["threshold"] = tensors["threshold"].clamp(min=0)  # SAELens applies ReLU before the mask
    return filled(config, weights, where)


def _spaces(
    merged: dict, hook_in: Optional[str], hook_out: Optional[str], is_transcoder: bool, where: str
) -> tuple[str, str]:
    output_space = space_of_hook(hook_out, True, where)
    kwargs = merged.get("model_from_pretrained_kwargs") or {}
    if output_space == "mlp_out" and kwargs.get("center_writing_weights") is False:
        output_space = "mlp_output"  # hook_mlp_out of an unprocessed model: the raw MLP output
    if not is_transcoder:
        return output_space, output_space
    return space_of_hook(hook_in, False, where), output_space


def check(transcoder: Transcoder, where: str) -> None:
    """Refuse (one line) a transcoder SAELens cannot hold."""
    config = transcoder.config
    if config.activation == "signed_topk":
        raise fail(
            f"{where}: SAELens's TopK applies ReLU after the selection; a signed_topk {config.kind} "
            "(circuit-tracer's or Peek's TopK) cannot be written exactly"
        )
    if config.kind == "sae" and config.activation not in ("relu", "topk"):
        raise fail(f"{where}: a {config.activation} SAE cannot be written (standard and topk SAEs can)")
    if config.kind != "sae" and config.activation in ("jumprelu", "batchtopk"):
        if bool((transcoder.threshold.detach() < 0).any()):
            raise fail(f"{where}: a negative threshold cannot be expressed (SAELens applies ReLU first)")


def write(transcoder: Transcoder, folder: str | Path) -> Path:
    """Write ``transcoder`` as a SAELens folder (see the module docstring for the mapping)."""
    config = transcoder.config
    folder = Path(folder)
    where = f"writing {folder} as SAELens"
    check(transcoder, where)
    folder.mkdir(parents=True, exist_ok=True)
    is_transcoder = config.kind != "sae"
    b_dec = transcoder.b_dec.detach().float().cpu()
    b_pre = transcoder.b_pre.detach().float().cpu()
    apply_b_dec = not is_transcoder and torch.equal(b_pre, b_dec)
    if apply_b_dec:
        W_enc, b_enc = transcoder.W_enc.detach().float().cpu(), transcoder.b_enc.detach().float().cpu()
    else:
        W_enc, b_enc = input_bias_folded(transcoder)
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": transcoder.W_dec, "b_dec": b_dec}
    if is_transcoder:
        if config.activation == "topk":
            architecture = "topk_transcoder"
        elif config.activation == "relu":
            architecture = "skip_transcoder" if config.skip else "transcoder"
        else:  # jumprelu, batchtopk: SAELens's JumpReLU applies ReLU first (check: thresholds >= 0)
            architecture = "jumprelu_skip_transcoder" if config.skip else "jumprelu_transcoder"
            tensors["threshold"] = transcoder.threshold.detach().float().cpu()
        if config.skip:
            tensors["W_skip"] = transcoder.W_skip.detach().float().cpu().T
    else:
        architecture = "topk" if config.activation == "topk" else "standard"
    # hook names SAELens (and tc) read the spaces back from; a foreign file's own names stay in tc_config
    hook_in = _hook(config, config.input_space) or config.input_hook
    hook_out = _hook(config, config.output_space) or config.output_hook
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
            "hook_name": hook_in,
            "hook_layer": config.layer,
            "hook_head_index": None,
            "prepend_bos": True,
            "sae_lens_version": LAYOUT_VERSION,
            "sae_lens_training_version": LAYOUT_VERSION,
        },
        "tc_config": config.to_dict(),
    }
    if config.activation == "topk":
        cfg["k"] = config.k
    if is_transcoder:
        # current SAELens reads the output hook from metadata; earlier 6.x releases from the top level
        cfg["metadata"].update({"hook_name_out": hook_out, "hook_head_index_out": None})
        cfg.update(
            {
                "d_out": config.d_out,
                "hook_name_out": hook_out,
                "hook_layer_out": config.layer,
                "hook_head_index_out": None,
            }
        )
    import json

    write_safetensors(folder / WEIGHTS, tensors)
    write_text(folder / CONFIG, json.dumps(cfg, indent=2))
    return folder


def _hook(config: TranscoderConfig, space: str) -> Optional[str]:
    return hook_of_space(space, space in OUTPUT_SPACES, config.layer) if config.layer is not None else None
