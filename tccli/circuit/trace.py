"""`tc circuit` and `tc deembed`: glue between the model, the transcoders and the pure math.

Runs the model on a prompt, freezes the forward pass (attribution.freeze), builds the target, runs the
greedy path search (search.py) and hands the graph to graph_io. No file formats here.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch

from tccli.replacement import attribution
from tccli.errors import fail
from tccli.model.loading import LoadedModel, run_capture
from tccli.model.spaces import LayerSpaces, input_map
from tccli.data.text import display_token
from tccli.transcoders.transcoder import Transcoder
from tccli.transcoders.files import check_matches_model
from tccli.config.circuit import TargetOptions, CircuitConfig, DeembedConfig


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


def freeze_prompt(loaded: LoadedModel, transcoders: dict[int, Transcoder], tokens: torch.Tensor,
                  weights: Optional[dict] = None) -> attribution.FrozenForward:
    """Run the model once on ``tokens`` [T] and freeze everything attribution needs."""
    captured = run_capture(loaded, tokens.reshape(1, -1), attribution.hooks_needed(loaded.info))
    with torch.no_grad():
        return attribution.freeze(captured, loaded.info, weights or bridge_weights(loaded.bridge),
                                  transcoders, tokens, loaded.spaces)


# ----------------------------------------------------------------------------- parsing user input


def parse_feature(spec: str) -> tuple[int, int]:
    """'L8.F1234', '8.1234' -> (8, 1234)."""
    match = re.fullmatch(r"\s*[Ll]?(\d+)\.[Ff]?(\d+)\s*", spec or "")
    if not match:
        raise fail(f"bad feature {spec!r}: use LAYER.FEATURE, e.g. L8.F1234")
    return int(match.group(1)), int(match.group(2))


def parse_head(spec: str) -> tuple[int, int]:
    """'L3.H2', '3.2' -> (3, 2)."""
    match = re.fullmatch(r"\s*[Ll]?(\d+)\.[Hh]?(\d+)\s*", spec or "")
    if not match:
        raise fail(f"bad head {spec!r}: use LAYER.HEAD, e.g. L3.H2")
    return int(match.group(1)), int(match.group(2))


def single_token(tokenizer: Any, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise fail(f"target {text!r} is {len(ids)} tokens for this tokenizer, not one "
                   f"({[tokenizer.decode([i]) for i in ids]}); mind the leading space")
    return int(ids[0])


def prompt_tokens(loaded: LoadedModel, prompt: str) -> torch.Tensor:
    """BOS followed by the prompt's tokens; refuses an empty prompt or one longer than the context."""
    if not prompt or not prompt.strip():
        raise fail("the prompt is empty")
    ids = [loaded.info.bos_token_id] + list(loaded.tokenizer.encode(prompt, add_special_tokens=False))
    if len(ids) > loaded.info.n_ctx:
        raise fail(f"the prompt is {len(ids)} tokens with BOS, longer than the model's context of "
                   f"{loaded.info.n_ctx}")
    return torch.tensor(ids, dtype=torch.long)


def token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's text as graphs show it (byte pieces as <0xE2>; see text.display_token)."""
    return [display_token(tokenizer, i) for i in ids]


def check_transcoders(transcoders: dict[int, Transcoder], loaded: LoadedModel) -> None:
    for transcoder in transcoders.values():
        check_matches_model(transcoder, loaded.info)
        if transcoder.config.kind != "transcoder":
            raise fail(f"layer {transcoder.config.layer} holds an SAE, not a transcoder: circuits need "
                       f"transcoders (MLP input -> MLP output)")


def check_feature(transcoders: dict[int, Transcoder], layer: int, feature: int) -> Transcoder:
    if layer not in transcoders:
        raise fail(f"no transcoder for layer {layer} (have layers {sorted(transcoders) or 'none'})")
    transcoder = transcoders[layer]
    if not 0 <= feature < transcoder.n_features:
        raise fail(f"feature {feature} is out of range: layer {layer}'s transcoder has "
                   f"{transcoder.n_features} features (0-{transcoder.n_features - 1})")
    return transcoder


def resolve_position(pos: int, n_tokens: int) -> int:
    position = pos if pos >= 0 else n_tokens + pos
    if not 0 <= position < n_tokens:
        raise fail(f"--pos {pos} is outside the prompt's {n_tokens} tokens (BOS included)")
    return position


def frozen_prompt(loaded: LoadedModel, transcoders: dict[int, Transcoder], prompt: str, pos: int
                  ) -> tuple[torch.Tensor, int, dict[int, Transcoder], attribution.FrozenForward]:
    """What `tc circuit` and `tc graph` start from: the prompt's tokens, --pos resolved, the transcoders in the
    dtype attribution works in, and the frozen forward pass."""
    check_transcoders(transcoders, loaded)
    tokens = prompt_tokens(loaded, prompt)
    position = resolve_position(pos, int(tokens.shape[0]))
    dtype = loaded.bridge.W_U.dtype
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32  # attribution.freeze works in float32 for half-precision models
    transcoders = {layer: t.to(dtype) for layer, t in transcoders.items()}
    return tokens, position, transcoders, freeze_prompt(loaded, transcoders, tokens)


# ----------------------------------------------------------------------------- tc circuit


def build_target(config: TargetOptions, loaded: LoadedModel, transcoders: dict[int, Transcoder],
                 frozen: attribution.FrozenForward, position: int) -> attribution.Target:
    if config.feature is not None:
        layer, feature = parse_feature(config.feature)
        check_feature(transcoders, layer, feature)
        return attribution.feature_target(frozen, layer, feature, position)
    if config.logit is not None:
        return attribution.unembed_target(frozen, single_token(loaded.tokenizer, config.logit), None, position)
    if config.logit_diff:
        token_a, token_b = (single_token(loaded.tokenizer, text) for text in config.logit_diff)
        return attribution.unembed_target(frozen, token_a, token_b, position)
    direction = load_direction(config.direction, loaded.info.d_model)
    if not 0 <= config.layer <= loaded.info.n_layers:
        raise fail(f"--layer {config.layer} is out of range 0-{loaded.info.n_layers} (n_layers: after the last block)")
    return attribution.direction_target(frozen, direction, config.layer, position)


def load_direction(path: str, d_model: int) -> torch.Tensor:
    import numpy as np

    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise fail(f"cannot read direction {path}: {exc}") from None
    if array.reshape(-1).shape[0] != d_model or array.size != d_model:
        raise fail(f"direction {path} has shape {array.shape}; the model's d_model is {d_model}")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise fail(f"direction {path} holds {array.dtype} values, not real numbers")
    if not np.isfinite(array).all():
        raise fail(f"direction {path} holds non-finite values (NaN or inf)")
    if not np.any(array):
        raise fail(f"direction {path} is all zeros")
    return torch.from_numpy(array.astype("float64").reshape(-1))


def circuit_graph(loaded: LoadedModel, transcoders: dict[int, Transcoder], prompt: str,
                  config: CircuitConfig):
    """Everything `tc circuit` computes: (graph, summary dict)."""
    from tccli import __version__
    from tccli.config.fields import to_json_dict
    from tccli.circuit.search import SearchParams, explained, greedy_search, paths_to_graph

    tokens, position, transcoders, frozen = frozen_prompt(loaded, transcoders, prompt, config.pos)
    with torch.no_grad():
        target = build_target(config, loaded, transcoders, frozen, position)
        params = SearchParams(iters=config.iters, branches=config.branches,
                              min_contribution=config.min_contribution, both_signs=config.both_signs,
                              include_bos=config.include_bos)
        result = greedy_search(frozen, target, params)
        strings = token_strings(loaded.tokenizer, tokens.tolist())
        graph = paths_to_graph(frozen, target, result, strings, config.min_contribution)
    kept, error = explained(graph)
    description = dict(target.description)
    for key in ("token", "token_b"):
        if description.get(key) is not None:
            description[key + "_string"] = display_token(loaded.tokenizer, description[key])
            graph.nodes["target"][f"target_{key}_string"] = description[key + "_string"]
    graph.graph["metadata"] = {
        "tc_version": __version__, "model": loaded.info.name, "architecture": loaded.info.architecture,
        "n_layers": loaded.info.n_layers, "parallel_attn_mlp": loaded.info.parallel_attn_mlp,
        "transcoders": config.transcoders,
        "transcoder_list": [f"layer_{layer}" for layer in sorted(transcoders)],
        "transcoder_spaces": {str(layer): {"input": t.config.input_space, "output": t.config.output_space,
                                           "skip": t.config.skip, "activation": t.config.activation}
                              for layer, t in sorted(transcoders.items())},
        # a logit target is the logit before the final soft-cap c tanh(logit / c), which is not linear
        "final_logit_softcap": loaded.info.final_logit_softcap,
        "prompt": prompt, "tokens": strings, "token_ids": tokens.tolist(), "position": position,
        "target": description, "target_value": target.value, "target_constant": target.constant,
        "explained": kept, "error_into_target": error,
        "search": {"iters": params.iters, "branches": params.branches,
                   "min_contribution": params.min_contribution, "both_signs": params.both_signs,
                   "include_bos": params.include_bos},
        "config": to_json_dict(config),
    }
    summary = {"nodes": graph.number_of_nodes(), "edges": graph.number_of_edges(), "value": target.value,
               "explained": kept, "fraction": kept / target.value if target.value else float("nan"),
               "error": error}
    return graph, summary


# ----------------------------------------------------------------------------- tc deembed


def deembedding(W_E: torch.Tensor, encoder: torch.Tensor, layernorm: bool,
                W_V: Optional[torch.Tensor] = None, W_O: Optional[torch.Tensor] = None,
                attn_post_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scores [vocab]: each token's embedding dotted with the feature's encoder vector as read from the
    residual (centred for LayerNorm, whose mean-centring the direct path goes through), optionally through
    an OV circuit W_V [d, dh] W_O [dh, d] (and Gemma-2's post-attention norm weight). Normalisation scales
    are left out: they are per-token positive factors."""
    vector = encoder - encoder.mean() if layernorm else encoder
    if W_V is not None:
        if attn_post_weight is not None:
            vector = vector * attn_post_weight
        vector = W_V @ (W_O @ vector)
        if layernorm:
            vector = vector - vector.mean()
    return W_E @ vector


def feature_deembedding(loaded: LoadedModel, transcoder: Transcoder, layer: int, feature: int,
                        head: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Scores [vocab] of feature ``feature`` of ``layer``'s transcoder: its encoder vector read back from the
    transcoder's input space to the residual (``spaces.input_map``), dotted with each token's embedding as it
    enters the residual, optionally through head ``(layer, head)``'s OV circuit."""
    bridge, info = loaded.bridge, loaded.info
    W_V = W_O = post = None
    with torch.no_grad():
        W_E = bridge.W_E.detach() * info.embed_scale  # as the embedding enters the residual
        if head is not None:
            head_layer, index = head
            kv = index // (info.n_heads // info.n_kv_heads)
            W_V = bridge.W_V[head_layer, kv].detach().to(W_E.dtype)
            W_O = bridge.W_O[head_layer, index].detach().to(W_E.dtype)
            if loaded.spaces and loaded.spaces[head_layer].attn_post_weight is not None:
                post = loaded.spaces[head_layer].attn_post_weight.to(W_E.device, W_E.dtype)
        spaces = loaded.spaces[layer] if loaded.spaces else LayerSpaces(layernorm=False)
        spaces = spaces.to(W_E.device, W_E.dtype)
        read, _ = input_map(transcoder.config.input_space, spaces, None)  # the input space's read map, unscaled
        encoder = read.pull(transcoder.W_enc[:, feature].to(W_E.dtype).unsqueeze(0))[0]
        return deembedding(W_E, encoder, info.normalization == "layernorm", W_V, W_O, post)


def deembed_rows(loaded: LoadedModel, transcoders: dict[int, Transcoder], config: DeembedConfig) -> list[tuple]:
    """[(score, token id, token string)] best first."""
    check_transcoders(transcoders, loaded)
    layer, feature = parse_feature(config.feature)
    transcoder = check_feature(transcoders, layer, feature)
    head = None
    if config.head is not None:
        head_layer, index = parse_head(config.head)
        info = loaded.info
        if not 0 <= index < info.n_heads:
            raise fail(f"head {index} is out of range: the model has {info.n_heads} heads per layer")
        visible = head_layer < layer or (head_layer == layer and not info.parallel_attn_mlp)
        if not visible:
            raise fail(f"head L{head_layer}.H{index} is not upstream of layer {layer}'s MLP")
        head = (head_layer, index)
    scores = feature_deembedding(loaded, transcoder, layer, feature, head)
    top = scores.topk(min(config.top, scores.shape[0]))
    return [(float(s), int(i), display_token(loaded.tokenizer, int(i))) for s, i in zip(top.values, top.indices)]
