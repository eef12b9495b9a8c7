"""A prompt as the replacement model starts from it: its tokens (BOS first, within the context), token
strings as graphs show them, the position a target is read at, and the frozen forward pass on it
(``frozen_prompt``, where `tc circuit` and `tc graph` start)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from tccli.data.text import display_token
from tccli.errors import fail
from tccli.model.loading import LoadedModel, run_capture
from tccli.replacement.frozen import FrozenForward, freeze, hooks_needed
from tccli.replacement.model import layer_views
from tccli.transcoders.cross_layer import CrossLayerTranscoder
from tccli.transcoders.files import check_transcoders
from tccli.transcoders.transcoder import Transcoder


def bridge_weights(bridge: Any) -> dict[str, Optional[torch.Tensor]]:
    """The weights attribution needs; bias-free models raise on b_V/b_O, which become None."""
    out: dict[str, Optional[torch.Tensor]] = {}
    for name in ("W_V", "W_O", "W_U", "b_U", "b_V", "b_O", "W_E"):
        try:
            out[name] = getattr(bridge, name).detach()
        except AttributeError:
            out[name] = None
    if out["b_U"] is None:
        out["b_U"] = torch.zeros(out["W_U"].shape[1], dtype=out["W_U"].dtype, device=out["W_U"].device)
    return out


def freeze_prompt(
    loaded: LoadedModel,
    transcoders: dict[int, Transcoder] | CrossLayerTranscoder,
    tokens: torch.Tensor,
    weights: Optional[dict] = None,
) -> FrozenForward:
    """Run the model once on ``tokens`` [T] and freeze everything attribution needs (a per-layer set or a
    cross-layer transcoder)."""
    captured = run_capture(loaded, tokens.reshape(1, -1), hooks_needed(loaded.info))
    with torch.no_grad():
        return freeze(
            captured, loaded.info, weights or bridge_weights(loaded.bridge), transcoders, tokens, loaded.spaces
        )


def single_token(tokenizer: Any, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise fail(
            f"target {text!r} is {len(ids)} tokens for this tokenizer, not one "
            f"({[tokenizer.decode([i]) for i in ids]}); mind the leading space"
        )
    return int(ids[0])


def prompt_tokens(loaded: LoadedModel, prompt: str) -> torch.Tensor:
    """BOS followed by the prompt's tokens; refuses an empty prompt or one longer than the context."""
    if not prompt or not prompt.strip():
        raise fail("the prompt is empty")
    ids = [loaded.info.bos_token_id] + list(loaded.tokenizer.encode(prompt, add_special_tokens=False))
    if len(ids) > loaded.info.n_ctx:
        raise fail(f"the prompt is {len(ids)} tokens with BOS, longer than the model's context of {loaded.info.n_ctx}")
    return torch.tensor(ids, dtype=torch.long)


def token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's text as graphs show it (byte pieces as <0xE2>; see text.display_token)."""
    return [display_token(tokenizer, i) for i in ids]


def resolve_position(pos: int, n_tokens: int) -> int:
    position = pos if pos >= 0 else n_tokens + pos
    if not 0 <= position < n_tokens:
        raise fail(f"--pos {pos} is outside the prompt's {n_tokens} tokens (BOS included)")
    return position


def frozen_prompt(
    loaded: LoadedModel, transcoders: dict[int, Transcoder] | CrossLayerTranscoder, prompt: str, pos: int
) -> tuple[torch.Tensor, int, dict[int, Transcoder] | CrossLayerTranscoder, FrozenForward]:
    """What `tc circuit` and `tc graph` start from: the prompt's tokens, --pos resolved, the transcoders (a
    per-layer set or a cross-layer transcoder) in the dtype attribution works in, and the frozen forward pass."""
    check_transcoders(layer_views(transcoders), loaded)
    tokens = prompt_tokens(loaded, prompt)
    position = resolve_position(pos, int(tokens.shape[0]))
    dtype = loaded.bridge.W_U.dtype
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32  # freeze works in float32 for half-precision models
    if isinstance(transcoders, CrossLayerTranscoder):
        transcoders = transcoders.to(dtype)
    else:
        transcoders = {layer: t.to(dtype) for layer, t in transcoders.items()}
    return tokens, position, transcoders, freeze_prompt(loaded, transcoders, tokens)
