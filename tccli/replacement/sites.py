"""Where the replacement model reads and writes (docs/method.md sections 8 and 10), and the small hooks it
runs: the hook sites of a transcoder's input and output, the maps between those sites and the transcoder's
spaces, and hook functions that save, hold or scale an activation. Split from tccli.replacement.model, which
re-exports the public names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

from tccli.model.loading import LoadedModel
from tccli.transcoders.transcoder import Transcoder


def transcoder_input_site(info: Any, layer: int, transcoder: Transcoder) -> str:
    """The hook whose activation gives ``transcoder``'s input x (its input space, docs/method.md section 8;
    ``input_in_space`` turns it into x): ln2.hook_normalized for normalized and mlp_input, the residual the
    MLP's norm reads for resid_mid."""
    hooks = info.layer(layer)
    return hooks.mlp_norm_input if transcoder.config.input_space == "resid_mid" else hooks.mlp_in


def transcoder_output_site(info: Any, layer: int, transcoder: Optional[Transcoder]) -> str:
    """The hook whose activation ``transcoder``'s output (skip term included) stands in for: what the MLP
    adds to the residual (mlp_out), or the MLP module's output (mlp_output: before Gemma-2's post-norm,
    which then runs on it; centred for LayerNorm models, see ``output_at_site``)."""
    hooks = info.layer(layer)
    if transcoder is not None and transcoder.config.output_space == "mlp_output":
        return hooks.mlp_output
    return hooks.mlp_out


def input_in_space(loaded: LoadedModel, layer: int, transcoder: Transcoder, activation: torch.Tensor) -> torch.Tensor:
    """The activation at ``transcoder_input_site`` as the transcoder's input x (mlp_input: g * x + beta)."""
    from tccli.model.spaces import transcoder_input

    return transcoder_input(transcoder.config.input_space, activation, activation, loaded.spaces[layer])


def output_at_site(loaded: LoadedModel, layer: int, transcoder: Transcoder, y: torch.Tensor) -> torch.Tensor:
    """A transcoder output (or a change of it) as the activation at ``transcoder_output_site``: a LayerNorm
    model's MLP output hook is centred (compatibility mode), so a raw mlp_output is centred there."""
    from tccli.model.spaces import centre

    if transcoder.config.output_space == "mlp_output" and loaded.info.normalization == "layernorm":
        return centre(y)
    return y


def saver(store: dict, key: str) -> Callable:
    def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
        store[key] = tensor
        return tensor

    return hook


def replacer(value: torch.Tensor, always: bool) -> Callable:
    """Hold an activation at ``value``. The live tensor itself is returned when it already equals the
    value, so norms keep their native kernels (bit-identical output) when nothing upstream changed."""

    def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
        if not always and tensor.shape == value.shape and torch.equal(tensor, value.to(tensor.dtype)):
            return tensor
        return value.to(tensor.dtype).detach()

    return hook


def attention_site(hooks: Any) -> str:
    """Where head terms are added or held: attention's output, or (Gemma-2) its sum before the post-norm,
    which then runs on it (with its scale frozen in frozen and direct modes)."""
    return hooks.attn_post_in or hooks.attn_out


def post_norm_scales(hooks: Any) -> list[str]:
    """Gemma-2's post-attention and post-MLP norm scales (frozen with the others)."""
    return [name for name in (hooks.attn_post_scale, hooks.mlp_post_scale) if name]


def mlp_output_hook(held: Optional[torch.Tensor], error_factor: Optional[torch.Tensor]) -> Callable:
    """A layer without a transcoder (all of its output is error): held (direct mode) and/or scaled."""

    def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
        out = tensor if held is None else held
        if error_factor is not None:
            out = out * error_factor.to(out.dtype).unsqueeze(-1)
        return out

    return hook


def uncapped_logits(logits: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """The logits before a final soft-cap ``c tanh(logit / c)`` (Gemma-2), which tc circuit and tc graph
    attribute: the cap is undone exactly, up to float rounding (``c atanh(capped / c)``)."""
    if not softcap:
        return logits
    return softcap * torch.atanh(logits / softcap)


def widened(tensor: torch.Tensor) -> torch.Tensor:
    """Half precision read out in float32; float32 and float64 as they are."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor
