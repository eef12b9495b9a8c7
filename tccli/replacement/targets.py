"""Targets: the scalar a circuit, a graph or an intervention explains or watches (one home for them).

A target is a feature's pre-activation, a logit, a logit difference or a direction read from the residual
stream, at one token. ``Target`` is its linear form on a frozen forward pass (a vector dotted with the
residual at a read point, plus a constant), which the attribution math uses; ``build_target`` makes one
from a command's ``TargetOptions``. ``TargetSpec`` is the same choice as a function of a replacement
model's run (``tc intervene`` and ``tc validate`` read it before and after an intervention)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from tccli.config.circuit import TargetOptions
from tccli.errors import fail
from tccli.model.loading import LoadedModel
from tccli.nodes import parse_feature
from tccli.replacement.frozen import FrozenForward, encoder_constant, encoder_read
from tccli.replacement.model import (
    ReplacementModel,
    RunOutput,
    input_in_space,
    layer_views,
    uncapped_logits,
    widened,
)
from tccli.replacement.prompts import single_token
from tccli.transcoders.cross_layer import CrossLayerTranscoder
from tccli.transcoders.files import check_feature
from tccli.transcoders.transcoder import Transcoder


@dataclass
class Target:
    """A scalar to explain: ``value == constant + vector . resid(position at read_point)``."""

    vector: torch.Tensor  # [d], dotted with the RAW residual
    position: int
    read_point: tuple[int, int]
    constant: float  # the part no upstream component writes (encoder bias, unembedding bias)
    value: float  # the real value, computed from the captured activations, not from the decomposition
    description: dict = field(default_factory=dict)  # kind, layer, feature, tokens...: for graph metadata


def feature_target(frozen: FrozenForward, layer: int, feature: int, position: int) -> Target:
    """A transcoder feature's pre-activation at ``position``."""
    return Target(
        vector=encoder_read(frozen, layer, feature, position),
        position=position,
        read_point=frozen.mlp_read_point(layer),
        constant=float(encoder_constant(frozen, layer, feature)),
        value=float(frozen.layers[layer].pre[position, feature]),
        description={"kind": "feature", "layer": layer, "feature": feature},
    )


def unembed_target(frozen: FrozenForward, token_a: int, token_b: Optional[int], position: int) -> Target:
    """A logit (``token_b`` None) or the logit difference a - b at ``position``."""
    direction = frozen.W_U[:, token_a].clone()
    constant = frozen.b_U[token_a].clone()
    if token_b is not None:
        direction = direction - frozen.W_U[:, token_b]
        constant = constant - frozen.b_U[token_b]
    vector = frozen.to_raw(direction.unsqueeze(0), frozen.final_scale[position : position + 1])[0]
    value = frozen.final_normalized[position] @ direction + constant
    kind = "logit" if token_b is None else "logit_diff"
    return Target(
        vector=vector,
        position=position,
        read_point=(frozen.n_layers, frozen.n_layers),
        constant=float(constant),
        value=float(value),
        description={"kind": kind, "token": token_a, "token_b": token_b},
    )


def direction_target(frozen: FrozenForward, direction: torch.Tensor, layer: int, position: int) -> Target:
    """``direction . resid_pre[layer]`` (the raw residual entering block ``layer``; ``layer == n_layers``
    is the residual after the last block)."""
    direction = direction.to(frozen.embed.dtype).reshape(-1)
    read_point = (layer, layer)
    value = frozen.resid_at(position, read_point) @ direction
    return Target(
        vector=direction,
        position=position,
        read_point=read_point,
        constant=0.0,
        value=float(value),
        description={"kind": "direction", "layer": layer},
    )


def build_target(
    config: TargetOptions,
    loaded: LoadedModel,
    transcoders: dict[int, Transcoder] | CrossLayerTranscoder,
    frozen: FrozenForward,
    position: int,
) -> Target:
    """The target the options name (a feature of a per-layer set or of a cross-layer transcoder: its
    pre-activation, which reads one layer either way)."""
    if config.feature is not None:
        layer, feature = parse_feature(config.feature)
        check_feature(layer_views(transcoders), layer, feature)
        return feature_target(frozen, layer, feature, position)
    if config.logit is not None:
        return unembed_target(frozen, single_token(loaded.tokenizer, config.logit), None, position)
    if config.logit_diff:
        token_a, token_b = (single_token(loaded.tokenizer, text) for text in config.logit_diff)
        return unembed_target(frozen, token_a, token_b, position)
    direction = load_direction(config.direction, loaded.info.d_model)
    if not 0 <= config.layer <= loaded.info.n_layers:
        raise fail(f"--layer {config.layer} is out of range 0-{loaded.info.n_layers} (n_layers: after the last block)")
    return direction_target(frozen, direction, config.layer, position)


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


@dataclass
class TargetSpec:
    """A scalar read from a run: a logit, a logit difference, a feature's pre-activation or a direction
    dotted with the residual stream, at ``position`` (negative counts from the end)."""

    kind: str  # logit | logit_diff | feature | direction
    position: int
    token: Optional[int] = None
    token_b: Optional[int] = None
    layer: Optional[int] = None  # feature: its layer; direction: the residual entering this block
    feature: Optional[int] = None
    direction: Optional[torch.Tensor] = None
    demeaned: bool = False  # a logit minus the mean logit (tc graph's logit targets)
    description: dict = field(default_factory=dict)

    def capture_names(self, model: ReplacementModel) -> list[str]:
        if self.kind == "feature":
            return [model.input_site[self.layer]]
        if self.kind == "direction":
            info = model.info
            return [info.final_resid_hook if self.layer == info.n_layers else info.layer(self.layer).resid_pre]
        return []

    def values(self, model: ReplacementModel, output: RunOutput) -> torch.Tensor:
        """[R] the target on each row of a run."""
        position = model.position(self.position)
        if self.kind in ("logit", "logit_diff"):
            logits = uncapped_logits(widened(output.logits[:, position]), model.info.final_logit_softcap)
            value = logits[:, self.token]
            if self.demeaned:
                value = value - logits.mean(dim=-1)
            return value - logits[:, self.token_b] if self.kind == "logit_diff" else value
        (name,) = self.capture_names(model)
        activation = output.captured[name][:, position]
        if self.kind == "feature":
            transcoder = model.transcoders[self.layer]
            x = input_in_space(model.loaded, self.layer, transcoder, activation)
            return transcoder.pre_activation(x.to(transcoder.W_enc.dtype))[:, self.feature]
        activation = widened(activation)
        return activation @ self.direction.to(activation.device, activation.dtype)


def target_from_options(
    options: TargetOptions, loaded: LoadedModel, transcoders: dict[int, Transcoder] | CrossLayerTranscoder
) -> Optional[TargetSpec]:
    """The target named by `tc circuit`-style options, or None when none is given."""
    options.validate_target(required=False)
    if options.feature is not None:
        layer, feature = parse_feature(options.feature)
        check_feature(layer_views(transcoders), layer, feature)
        return TargetSpec(
            "feature",
            options.pos,
            layer=layer,
            feature=feature,
            description={"kind": "feature", "layer": layer, "feature": feature},
        )
    if options.logit is not None:
        token = single_token(loaded.tokenizer, options.logit)
        return TargetSpec("logit", options.pos, token=token, description={"kind": "logit", "token": token})
    if options.logit_diff:
        token_a, token_b = (single_token(loaded.tokenizer, text) for text in options.logit_diff)
        return TargetSpec(
            "logit_diff",
            options.pos,
            token=token_a,
            token_b=token_b,
            description={"kind": "logit_diff", "token": token_a, "token_b": token_b},
        )
    if options.direction is not None:
        if not 0 <= options.layer <= loaded.info.n_layers:
            raise fail(
                f"--layer {options.layer} is out of range 0-{loaded.info.n_layers} (n_layers: after the last block)"
            )
        direction = load_direction(options.direction, loaded.info.d_model)
        return TargetSpec(
            "direction",
            options.pos,
            layer=options.layer,
            direction=direction,
            description={"kind": "direction", "layer": options.layer},
        )
    return None


def salient_logit_targets(
    frozen: FrozenForward, position: int, max_logits: int = 10, probability: float = 0.95
) -> tuple[list[Target], torch.Tensor]:
    """circuit-tracer's logit targets: the most likely next tokens at ``position`` until their cumulative
    probability reaches ``probability`` (at most ``max_logits``), each as ``logit_a - mean_b logit_b``
    (the unembedding column minus the mean column, through the frozen final norm). Returns the targets and
    their probabilities (the weights)."""
    normalized = frozen.final_normalized[position]
    logits = normalized @ frozen.W_U + frozen.b_U
    probs = torch.softmax(logits.double(), dim=-1)
    top = probs.topk(min(max_logits, probs.shape[0]))
    count = (
        int(
            torch.searchsorted(
                top.values.cumsum(0), torch.tensor(probability, dtype=torch.float64, device=probs.device)
            )
        )
        + 1
    )
    tokens, weights = top.indices[:count], top.values[:count]
    mean_column, mean_bias = frozen.W_U.mean(dim=1), frozen.b_U.mean()
    scale = frozen.final_scale[position : position + 1]
    targets = []
    for token, weight in zip(tokens.tolist(), weights.tolist()):
        direction = frozen.W_U[:, token] - mean_column
        constant = frozen.b_U[token] - mean_bias
        targets.append(
            Target(
                vector=frozen.to_raw(direction.unsqueeze(0), scale)[0],
                position=position,
                read_point=(frozen.n_layers, frozen.n_layers),
                constant=float(constant),
                value=float(normalized @ direction + constant),
                description={"kind": "logit", "token": token, "demeaned": True, "probability": weight},
            )
        )
    return targets, weights.to(frozen.embed.dtype)
