"""The replacement model and interventions on it (METHOD.md section 10); `tc intervene`.

**Replacement model.** The real model, run through TransformerLens hooks, with every layer that has a
transcoder computing its MLP output as

    mlp_out = clean mlp_out + (transcoder_out(x) - transcoder_out(x_clean))

i.e. the transcoder's output plus the error term ``mlp_out - transcoder_out`` held at its clean value
(the skip term, where a transcoder has one, is part of its output). Written as a difference, a run that
changes nothing adds exactly zero, so the un-intervened run reproduces the model's logits bit for bit; a
position whose transcoder input is bitwise unchanged keeps its clean activations exactly. Layers without
a transcoder run their real MLP.

**Nodes** (the ids of `tc circuit` / `tc graph`): ``mlp8.f1234@5`` a transcoder feature's activation,
``attn3.h2@4`` head 2 of layer 3's term read from source token 4 (``pattern[h, t, 4] * value(4) W_O^h``
at every destination t), ``err8@5`` an error term (the whole MLP output where the layer has no
transcoder); ``@*`` every position, a negative position counts from the end.

**Interventions.** ``ablate``: a feature to 0 (or, with mean ablation, to its mean activation over all
tokens from a `tc score` file), a head term or error term removed; ``set``: a feature's activation to a
value; ``scale``: a feature's activation, a head term or an error term times a factor.

**Modes.** ``free``: everything downstream recomputed (patterns, norm scales, later features).
``frozen``: attention patterns and every norm scale held at their clean values; later features respond
(the graph's local replacement model, whose only non-linearity left is the transcoders' activation).
``direct``: every node held at its clean value except the changed ones (every feature, every error term,
every MLP without a transcoder and every head's term), norm scales frozen: the residual stream is the
clean one plus the changed nodes' own writes, so a target changes by exactly those nodes' one-hop
edges into it (`tc circuit`'s edges).

Hook names come from ``models.ModelInfo``; where a transcoder reads and writes comes from
``transcoder_input_site`` / ``transcoder_output_site`` (its spaces, tccli.model.spaces) with ``input_in_space`` /
``output_at_site``. Gemma-2's post-norms run on the changed sums (head terms are added before the
post-attention norm, an mlp_output transcoder's output before the post-MLP norm), their scales frozen in
frozen and direct modes.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from tccli.config.circuit import TargetOptions
from tccli.errors import fail
from tccli.model.loading import LoadedModel
from tccli.transcoders.transcoder import Transcoder
from tccli.config.replacement import MODES, ABLATIONS, InterveneConfig

OPS = ("ablate", "set", "scale")


# ============================================================================ nodes and interventions


@dataclass(frozen=True)
class NodeRef:
    """A node that can be intervened on. ``position`` None: every position; negative: from the end."""

    kind: str  # feature | head | error
    layer: int
    index: int = -1  # the feature or the head; -1 for an error term
    position: Optional[int] = None

    @property
    def id(self) -> str:
        where = "*" if self.position is None else str(self.position)
        if self.kind == "feature":
            return f"mlp{self.layer}.f{self.index}@{where}"
        if self.kind == "head":
            return f"attn{self.layer}.h{self.index}@{where}"
        return f"err{self.layer}@{where}"

    def at(self, position: Optional[int]) -> "NodeRef":
        return NodeRef(self.kind, self.layer, self.index, position)


_NODE_ID = re.compile(r"(?:mlp(?P<feature_layer>\d+)\.f(?P<feature>\d+)|attn(?P<head_layer>\d+)\.h(?P<head>\d+)"
                      r"|err(?P<error_layer>\d+))@(?P<position>\*|-?\d+)")


def parse_node(text: str) -> NodeRef:
    """'mlp8.f1234@5', 'attn3.h2@4', 'err8@5', any of them '@*' -> NodeRef."""
    match = _NODE_ID.fullmatch((text or "").strip())
    if not match:
        raise fail(f"bad node {text!r}: use mlp8.f1234@5 (a feature), attn3.h2@4 (a head's term from source "
                   "token 4), err8@5 (an error term); @* for every position, @-1 for the last")
    groups = match.groupdict()
    position = None if groups["position"] == "*" else int(groups["position"])
    if groups["feature_layer"] is not None:
        return NodeRef("feature", int(groups["feature_layer"]), int(groups["feature"]), position)
    if groups["head_layer"] is not None:
        return NodeRef("head", int(groups["head_layer"]), int(groups["head"]), position)
    return NodeRef("error", int(groups["error_layer"]), -1, position)


@dataclass(frozen=True)
class Intervention:
    node: NodeRef
    op: str  # ablate | set | scale
    value: float = 0.0  # set: the activation; scale: the factor; ablate: unused

    def describe(self) -> str:
        if self.op == "ablate":
            return f"ablate {self.node.id}"
        return f"{self.op} {self.node.id}={self.value:g}"


def parse_interventions(config: InterveneConfig) -> tuple[Intervention, ...]:
    """`tc intervene`'s --ablate, --set and --scale, in that order."""
    return (tuple(Intervention(parse_node(text), "ablate") for text in config.ablate)
            + tuple(parse_assignment(text, "set") for text in config.set)
            + tuple(parse_assignment(text, "scale") for text in config.scale))


def parse_assignment(text: str, op: str) -> Intervention:
    """'mlp8.f1234@5=2.5' -> Intervention(op=op, value=2.5)."""
    node_text, sep, value_text = (text or "").rpartition("=")
    try:
        value = float(value_text)
    except ValueError:
        value = float("nan")
    if not sep or not math.isfinite(value):
        raise fail(f"bad --{op} {text!r}: use NODE=NUMBER, e.g. mlp8.f1234@5=2.5")
    return Intervention(parse_node(node_text), op, value)


@dataclass(frozen=True)
class RowSpec:
    """One row of a batched run: a clean prompt and what is done to it.

    ``keep_only``: when given, every transcoder feature of every transcoder layer at every position is
    ablated except these (layer, feature, position) triples (a circuit's sufficiency run).
    """

    prompt: int = 0
    interventions: tuple[Intervention, ...] = ()
    keep_only: Optional[frozenset] = None


# ============================================================================ where a transcoder reads and writes


def transcoder_input_site(info: Any, layer: int, transcoder: Transcoder) -> str:
    """The hook whose activation gives ``transcoder``'s input x (its input space, METHOD.md section 8;
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


# ============================================================================ the replacement model


@dataclass
class RunOutput:
    logits: torch.Tensor  # [R, T, vocab]
    captured: dict[str, torch.Tensor]
    prompts: torch.Tensor  # [R] the clean prompt of each row


@dataclass
class Probes:
    """Tensors a frozen run is differentiated against (``ReplacementModel.node_gradients``)."""

    feature_shift: dict[int, torch.Tensor]  # layer -> [R, T, m], added to the activations (zeros)
    head_factor: dict[int, torch.Tensor]  # layer -> [R, H, T(source)], multiplies each head term (ones)
    error_factor: dict[int, torch.Tensor]  # layer -> [R, T], multiplies each error term (ones)

    def tensors(self) -> list[torch.Tensor]:
        return list(self.feature_shift.values()) + list(self.head_factor.values()) + list(self.error_factor.values())


@dataclass
class _LayerPlan:
    """One layer's interventions for one batched run, as tensors."""

    feature_index: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None  # rows, positions, features
    feature_scale: Optional[torch.Tensor] = None  # [n] factor, NaN where the value is set instead
    feature_value: Optional[torch.Tensor] = None  # [n] the value set (where feature_scale is NaN)
    ablate_mask: Optional[torch.Tensor] = None  # [R, T, m] bool: features ablated (keep_only rows)
    head_factor: Optional[torch.Tensor] = None  # [R, H, T]
    error_factor: Optional[torch.Tensor] = None  # [R, T]


@dataclass
class NodeGradients:
    """Derivatives of a target in the frozen replacement model, per prompt row.

    ``feature`` [R, T, m]: d target / d activation (a steer's effect per unit); a feature's total
    attribution over every path is its activation times this. ``head`` [R, H, T] and ``error`` [R, T]:
    d target / d factor on the term, i.e. the term's total attribution over every path.
    """

    feature: dict[int, torch.Tensor]
    head: dict[int, torch.Tensor]
    error: dict[int, torch.Tensor]
    activations: dict[int, torch.Tensor]  # layer -> [R, T, m] clean activations
    values: torch.Tensor  # [R] the target's clean value


class ReplacementModel:
    """The replacement model on a batch of prompts of one length: clean run captured once, then any
    number of batched runs with interventions (``run``)."""

    def __init__(self, loaded: LoadedModel, transcoders: dict[int, Transcoder], tokens: torch.Tensor,
                 means: Optional[dict[int, torch.Tensor]] = None):
        from tccli.model.loading import run_logits

        self.loaded, self.info = loaded, loaded.info
        self.transcoders = dict(sorted(transcoders.items()))
        self.tokens = tokens.reshape(-1, tokens.shape[-1]).to(torch.long)
        self.means = {layer: m.to(loaded.device, torch.float32) for layer, m in (means or {}).items()}
        info = self.info
        bridge = loaded.bridge
        self.W_O = bridge.W_O.detach()  # [L, H, d_head, d]
        self.kv_of_head = torch.arange(info.n_heads, device=loaded.device) // (info.n_heads // info.n_kv_heads)
        self.input_site = {layer: transcoder_input_site(info, layer, t) for layer, t in self.transcoders.items()}
        self.output_site = {layer: transcoder_output_site(info, layer, self.transcoders.get(layer))
                            for layer in range(info.n_layers)}
        names = [info.final_scale_hook]
        for layer in range(info.n_layers):
            hooks = info.layer(layer)
            names += [hooks.attn_scale, hooks.attn_pattern, hooks.attn_values, _attention_site(hooks),
                      hooks.mlp_scale, self.output_site[layer]] + _post_norm_scales(hooks)
        names += list(self.input_site.values())
        logits, captured = run_logits(loaded, self.tokens, names)
        self.clean_logits = logits
        self.clean = captured

    @property
    def n_prompts(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[1])

    def position(self, position: int) -> int:
        """A position of these prompts (negative counts from the end), checked."""
        resolved = position + self.n_tokens if position < 0 else position
        if not 0 <= resolved < self.n_tokens:
            raise fail(f"position {position} is outside the prompt's {self.n_tokens} tokens (BOS included)")
        return resolved

    def clean_activations(self, layer: int, prompts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[R, T, m] the transcoder's activations on the clean run (float32)."""
        x = self.clean[self.input_site[layer]]
        if prompts is not None:
            x = x[prompts]
        transcoder = self.transcoders[layer]
        with torch.no_grad():
            return transcoder.encode(input_in_space(self.loaded, layer, transcoder, x).to(transcoder.W_enc.dtype))

    # ------------------------------------------------------------------------ compiling interventions

    def _check_node(self, node: NodeRef) -> None:
        info = self.info
        if not 0 <= node.layer < info.n_layers:
            raise fail(f"node {node.id}: layer {node.layer} is out of range (the model has {info.n_layers} layers)")
        if node.kind == "feature":
            if node.layer not in self.transcoders:
                raise fail(f"node {node.id}: no transcoder for layer {node.layer} "
                           f"(have layers {sorted(self.transcoders) or 'none'})")
            n = self.transcoders[node.layer].n_features
            if not 0 <= node.index < n:
                raise fail(f"node {node.id}: feature {node.index} is out of range (layer {node.layer}'s "
                           f"transcoder has {n} features)")
        if node.kind == "head" and not 0 <= node.index < info.n_heads:
            raise fail(f"node {node.id}: head {node.index} is out of range (the model has {info.n_heads} heads)")
        if node.position is not None:
            self.position(node.position)

    def _positions(self, node: NodeRef) -> list[int]:
        return list(range(self.n_tokens)) if node.position is None else [self.position(node.position)]

    def _plan(self, rows: Sequence[RowSpec], ablation: str) -> dict[int, _LayerPlan]:
        info, device = self.info, self.loaded.device
        R, T = len(rows), self.n_tokens
        plans = {layer: _LayerPlan() for layer in range(info.n_layers)}
        features: dict[int, dict[tuple[int, int, int], tuple[float, float]]] = {}  # (row, pos, f) -> (scale, value)
        for r, row in enumerate(rows):
            for intervention in row.interventions:
                node, op = intervention.node, intervention.op
                self._check_node(node)
                plan = plans[node.layer]
                if node.kind == "feature":
                    if op == "ablate":
                        setting = (float("nan"), self._ablated_value(node.layer, node.index, ablation))
                    elif op == "set":
                        setting = (float("nan"), intervention.value)
                    else:
                        setting = (intervention.value, 0.0)
                    for p in self._positions(node):
                        features.setdefault(node.layer, {})[r, p, node.index] = setting
                    continue
                if op == "set":
                    raise fail(f"--set {node.id}: only a feature's activation can be set; "
                               "ablate or scale head and error terms")
                factor = 0.0 if op == "ablate" else intervention.value
                if node.kind == "head":
                    if plan.head_factor is None:
                        plan.head_factor = torch.ones(R, info.n_heads, T, device=device, dtype=torch.float64)
                    plan.head_factor[r, node.index, self._positions(node)] = factor
                else:
                    if plan.error_factor is None:
                        plan.error_factor = torch.ones(R, T, device=device, dtype=torch.float64)
                    plan.error_factor[r, self._positions(node)] = factor
            if row.keep_only is not None:
                for layer, transcoder in self.transcoders.items():
                    plan = plans[layer]
                    if plan.ablate_mask is None:
                        plan.ablate_mask = torch.zeros(R, T, transcoder.n_features, dtype=torch.bool, device=device)
                    plan.ablate_mask[r] = True
                    kept = [(p, f) for (kept_layer, f, p) in row.keep_only if kept_layer == layer]
                    if kept:
                        positions, indices = zip(*kept)
                        plan.ablate_mask[r, list(positions), list(indices)] = False
                if ablation == "mean":
                    for layer in self.transcoders:
                        self._ablated_value(layer, 0, ablation)  # refuse a layer without means up front
        for layer, settings in features.items():
            keys = list(settings)
            index = torch.tensor(keys, dtype=torch.long, device=device).T
            values = torch.tensor([settings[k] for k in keys], dtype=torch.float64, device=device)
            plans[layer].feature_index = (index[0], index[1], index[2])
            plans[layer].feature_scale, plans[layer].feature_value = values[:, 0], values[:, 1]
        return plans

    def _ablated_value(self, layer: int, feature: int, ablation: str) -> float:
        if ablation == "zero":
            return 0.0
        if layer not in self.means:
            raise fail(f"mean ablation of layer {layer} needs its features' means: pass --features FILE "
                       "(written by tc score) holding that layer")
        return float(self.means[layer][feature])

    # ------------------------------------------------------------------------ running

    def run(self, rows: Sequence[RowSpec], mode: str = "free", ablation: str = "zero",
            capture: Iterable[str] = (), probes: Optional[Probes] = None) -> RunOutput:
        """One batched forward pass of the replacement model, row r on clean prompt ``rows[r].prompt``.

        ``capture``: hook names whose (possibly replaced) activations are returned. ``probes``: tensors
        to differentiate against (frozen mode; the run then keeps its autograd graph).
        """
        if mode not in MODES:
            raise fail(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
        if ablation not in ABLATIONS:
            raise fail(f"--ablation must be one of {', '.join(ABLATIONS)}, got {ablation!r}")
        if not rows:
            raise fail("nothing to run: no rows")
        prompts = torch.tensor([row.prompt for row in rows], dtype=torch.long, device=self.loaded.device)
        if int(prompts.min()) < 0 or int(prompts.max()) >= self.n_prompts:
            raise fail(f"row prompt out of range 0-{self.n_prompts - 1}")
        plans = self._plan(rows, ablation)
        identity = len(rows) == self.n_prompts and bool((prompts == torch.arange(self.n_prompts,
                                                                                  device=prompts.device)).all())
        clean = (lambda name: self.clean[name]) if identity else (lambda name: self.clean[name][prompts])
        store: dict[str, torch.Tensor] = {}
        hooks = self._hooks(plans, mode, clean, store, probes, ablation)
        names = list(dict.fromkeys(capture))
        hooks += [(name, _saver(store, "capture:" + name)) for name in names]
        context = torch.enable_grad() if probes is not None else torch.no_grad()
        with context, warnings.catch_warnings():
            # holding a norm's scale is the point of frozen mode, not a surprise to warn about
            warnings.filterwarnings("ignore", message="A forward hook edited hook_scale")
            logits = self.loaded.bridge.run_with_hooks(self.tokens[prompts].to(self.loaded.device),
                                                       fwd_hooks=hooks, return_type="logits")
        missing = [n for n in names if "capture:" + n not in store]
        if missing:
            raise fail(f"model {self.info.name!r} exposes no hook {missing[0]!r}")
        return RunOutput(logits=logits, captured={n: store["capture:" + n] for n in names}, prompts=prompts)

    def _hooks(self, plans: dict[int, _LayerPlan], mode: str, clean: Callable[[str], torch.Tensor],
               store: dict, probes: Optional[Probes], ablation: str) -> list[tuple[str, Callable]]:
        info = self.info
        frozen = mode in ("frozen", "direct")
        always = probes is not None  # under autograd a frozen value must be a constant, never the live tensor
        hooks: list[tuple[str, Callable]] = []
        for layer in range(info.n_layers):
            names = info.layer(layer)
            plan = plans[layer]
            head_factor = plan.head_factor
            if probes is not None and layer in probes.head_factor:
                head_factor = probes.head_factor[layer] if head_factor is None else head_factor * probes.head_factor[layer]
            if frozen:
                for name in [names.attn_scale, names.attn_pattern, names.mlp_scale] + _post_norm_scales(names):
                    hooks.append((name, _replacer(clean(name), always)))
            if mode == "direct":
                hooks.append((_attention_site(names), self._direct_attention(layer, head_factor, clean)))
            elif head_factor is not None:
                hooks.append((names.attn_pattern, _saver(store, names.attn_pattern)))
                hooks.append((names.attn_values, _saver(store, names.attn_values)))
                hooks.append((_attention_site(names), self._attention_with_terms(layer, head_factor, store)))
            error_factor = plan.error_factor
            if probes is not None and layer in probes.error_factor:
                error_factor = probes.error_factor[layer] if error_factor is None else error_factor * probes.error_factor[layer]
            output = self.output_site[layer]
            if layer in self.transcoders:
                site = self.input_site[layer]
                hooks.append((site, _saver(store, site)))
                shift = probes.feature_shift.get(layer) if probes is not None else None
                hooks.append((output, self._transcoder_output(layer, plan, error_factor, shift, mode, clean, store,
                                                              ablation, exact=probes is None)))
            elif mode == "direct" or error_factor is not None:
                hooks.append((output, _mlp_output(clean(output) if mode == "direct" else None, error_factor)))
        if frozen:
            hooks.append((info.final_scale_hook, _replacer(clean(info.final_scale_hook), always)))
        return hooks

    def _head_terms(self, layer: int, factor: torch.Tensor, pattern: torch.Tensor, values: torch.Tensor
                    ) -> torch.Tensor:
        """[R, T, d]: sum over heads h and sources s of (factor - 1) * pattern[h, t, s] * value(s) W_O^h."""
        dtype = _widened(values).dtype
        v = values[:, :, self.kv_of_head, :].to(dtype)  # [R, S, H, d_head], each query head's kv head
        ov = torch.einsum("rshe,hed->rhsd", v, self.W_O[layer].to(dtype))
        weights = pattern.to(dtype) * (factor.to(dtype) - 1.0).unsqueeze(2)  # [R, H, T, S]
        return torch.einsum("rhts,rhsd->rtd", weights, ov)

    def _direct_attention(self, layer: int, factor: Optional[torch.Tensor], clean: Callable) -> Callable:
        names = self.info.layer(layer)

        def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
            held = clean(_attention_site(names))
            if factor is None:
                return held
            return held + self._head_terms(layer, factor, clean(names.attn_pattern),
                                           clean(names.attn_values)).to(held.dtype)
        return hook

    def _attention_with_terms(self, layer: int, factor: torch.Tensor, store: dict) -> Callable:
        names = self.info.layer(layer)

        def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
            terms = self._head_terms(layer, factor, store[names.attn_pattern], store[names.attn_values])
            return tensor + terms.to(tensor.dtype)
        return hook

    def _transcoder_output(self, layer: int, plan: _LayerPlan, error_factor: Optional[torch.Tensor],
                           shift: Optional[torch.Tensor], mode: str, clean: Callable, store: dict,
                           ablation: str, exact: bool) -> Callable:
        transcoder = self.transcoders[layer]
        site, output = self.input_site[layer], self.output_site[layer]
        dtype = transcoder.W_enc.dtype

        def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
            x_clean = input_in_space(self.loaded, layer, transcoder, clean(site))
            z_clean = transcoder.encode(x_clean.to(dtype))
            if mode == "direct":
                x, z = x_clean, z_clean
            else:
                x = input_in_space(self.loaded, layer, transcoder, store[site])
                z = transcoder.encode(x.to(dtype))
                if exact:  # a position whose input is bitwise unchanged keeps its clean activations exactly
                    same = (x == x_clean).all(dim=-1, keepdim=True)
                    z = torch.where(same, z_clean, z)
            if shift is not None:
                z = z + shift
            if plan.ablate_mask is not None:
                ablated = self.means[layer] if ablation == "mean" else torch.zeros((), device=z.device)
                z = torch.where(plan.ablate_mask, ablated.to(z.dtype), z)
            if plan.feature_index is not None:
                rows, positions, features = plan.feature_index
                current = z[rows, positions, features]
                scaled = plan.feature_scale.to(z.dtype) * current
                new = torch.where(torch.isnan(plan.feature_scale), plan.feature_value.to(z.dtype), scaled)
                z = z.index_put((rows, positions, features), new)
            delta = (z - z_clean) @ transcoder.W_dec
            if mode != "direct" and transcoder.W_skip is not None:
                delta = delta + transcoder.skip_term(x.to(dtype)) - transcoder.skip_term(x_clean.to(dtype))
            delta = output_at_site(self.loaded, layer, transcoder, delta)
            held = clean(output)
            if error_factor is not None:
                y_clean = transcoder.decode(z_clean)
                if transcoder.W_skip is not None:
                    y_clean = y_clean + transcoder.skip_term(x_clean.to(dtype))
                error = held.to(dtype) - output_at_site(self.loaded, layer, transcoder, y_clean)
                delta = delta + (error_factor.to(dtype) - 1.0).unsqueeze(-1) * error
            return held + delta.to(held.dtype)
        return hook

    # ------------------------------------------------------------------------ batches and gradients

    def run_rows(self, rows: Sequence[RowSpec], reduce: Callable[[RunOutput], torch.Tensor], mode: str = "free",
                 ablation: str = "zero", capture: Iterable[str] = (), batch_size: int = 64,
                 progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
        """``reduce`` (a run's output -> [rows] values) over every row, ``batch_size`` rows per pass;
        ``progress(rows done, rows)`` after each pass."""
        capture = list(capture)
        parts = []
        for lo in range(0, len(rows), batch_size):
            parts.append(reduce(self.run(rows[lo:lo + batch_size], mode, ablation, capture)).detach())
            if progress is not None:
                progress(min(lo + batch_size, len(rows)), len(rows))
        return torch.cat(parts) if parts else torch.zeros(0)

    def node_gradients(self, target: "TargetSpec", prompts: Optional[Sequence[int]] = None) -> NodeGradients:
        """Every node's derivative of ``target`` in the frozen replacement model (one backward pass)."""
        prompts = list(range(self.n_prompts)) if prompts is None else list(prompts)
        R, T, device = len(prompts), self.n_tokens, self.loaded.device
        dtype = _widened(self.clean_logits).dtype
        probes = Probes(
            feature_shift={layer: torch.zeros(R, T, t.n_features, device=device, dtype=t.W_enc.dtype,
                                              requires_grad=True) for layer, t in self.transcoders.items()},
            head_factor={layer: torch.ones(R, self.info.n_heads, T, device=device, dtype=dtype, requires_grad=True)
                         for layer in range(self.info.n_layers)},
            error_factor={layer: torch.ones(R, T, device=device, dtype=dtype, requires_grad=True)
                          for layer in range(self.info.n_layers)})
        output = self.run([RowSpec(prompt=p) for p in prompts], "frozen", capture=target.capture_names(self),
                          probes=probes)
        values = target.values(self, output)
        grads = torch.autograd.grad(values.sum(), probes.tensors(), allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, probes.tensors())]
        n_features, n_heads = len(probes.feature_shift), len(probes.head_factor)
        index = torch.tensor(prompts, device=device)
        return NodeGradients(
            feature=dict(zip(probes.feature_shift, grads[:n_features])),
            head=dict(zip(probes.head_factor, grads[n_features:n_features + n_heads])),
            error=dict(zip(probes.error_factor, grads[n_features + n_heads:])),
            activations={layer: self.clean_activations(layer, index) for layer in self.transcoders},
            values=values.detach())


def _saver(store: dict, key: str) -> Callable:
    def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
        store[key] = tensor
        return tensor
    return hook


def _replacer(value: torch.Tensor, always: bool) -> Callable:
    """Hold an activation at ``value``. The live tensor itself is returned when it already equals the
    value, so norms keep their native kernels (bit-identical output) when nothing upstream changed."""
    def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
        if not always and tensor.shape == value.shape and torch.equal(tensor, value.to(tensor.dtype)):
            return tensor
        return value.to(tensor.dtype).detach()
    return hook


def _attention_site(hooks: Any) -> str:
    """Where head terms are added or held: attention's output, or (Gemma-2) its sum before the post-norm,
    which then runs on it (with its scale frozen in frozen and direct modes)."""
    return hooks.attn_post_in or hooks.attn_out


def _post_norm_scales(hooks: Any) -> list[str]:
    """Gemma-2's post-attention and post-MLP norm scales (frozen with the others)."""
    return [name for name in (hooks.attn_post_scale, hooks.mlp_post_scale) if name]


def _mlp_output(held: Optional[torch.Tensor], error_factor: Optional[torch.Tensor]) -> Callable:
    """A layer without a transcoder (all of its output is error): held (direct mode) and/or scaled."""
    def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
        out = tensor if held is None else held
        if error_factor is not None:
            out = out * error_factor.to(out.dtype).unsqueeze(-1)
        return out
    return hook


# ============================================================================ targets


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
            logits = _uncapped(_widened(output.logits[:, position]), model.info.final_logit_softcap)
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
        activation = _widened(activation)
        return activation @ self.direction.to(activation.device, activation.dtype)


def _uncapped(logits: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """The logits before a final soft-cap ``c tanh(logit / c)`` (Gemma-2), which tc circuit and tc graph
    attribute: the cap is undone exactly, up to float rounding (``c atanh(capped / c)``)."""
    if not softcap:
        return logits
    return softcap * torch.atanh(logits / softcap)


def _widened(tensor: torch.Tensor) -> torch.Tensor:
    """Half precision read out in float32; float32 and float64 as they are."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def target_from_options(options: TargetOptions, loaded: LoadedModel, transcoders: dict[int, Transcoder]
                        ) -> Optional[TargetSpec]:
    """The target named by `tc circuit`-style options, or None when none is given."""
    from tccli.circuit.trace import check_feature, load_direction, parse_feature, single_token

    options.validate_target(required=False)
    if options.feature is not None:
        layer, feature = parse_feature(options.feature)
        check_feature(transcoders, layer, feature)
        return TargetSpec("feature", options.pos, layer=layer, feature=feature,
                          description={"kind": "feature", "layer": layer, "feature": feature})
    if options.logit is not None:
        token = single_token(loaded.tokenizer, options.logit)
        return TargetSpec("logit", options.pos, token=token, description={"kind": "logit", "token": token})
    if options.logit_diff:
        token_a, token_b = (single_token(loaded.tokenizer, text) for text in options.logit_diff)
        return TargetSpec("logit_diff", options.pos, token=token_a, token_b=token_b,
                          description={"kind": "logit_diff", "token": token_a, "token_b": token_b})
    if options.direction is not None:
        if not 0 <= options.layer <= loaded.info.n_layers:
            raise fail(f"--layer {options.layer} is out of range 0-{loaded.info.n_layers} "
                       "(n_layers: after the last block)")
        direction = load_direction(options.direction, loaded.info.d_model)
        return TargetSpec("direction", options.pos, layer=options.layer, direction=direction,
                          description={"kind": "direction", "layer": options.layer})
    return None


# ============================================================================ means for mean ablation


def feature_means(path: str, loaded: LoadedModel, transcoders: dict[int, Transcoder]) -> dict[int, torch.Tensor]:
    """Each transcoder layer's features' mean activations over all tokens, from a `tc score` file."""
    from tccli.features.files import FeaturesFile, check_features_match_model

    features = FeaturesFile.open(path)
    check_features_match_model(features, loaded.info)
    out = {}
    for layer, transcoder in transcoders.items():
        if layer not in features.layers:
            continue
        if features.n_features(layer) != transcoder.n_features:
            raise fail(f"{path} has {features.n_features(layer)} features for layer {layer}; its transcoder "
                       f"has {transcoder.n_features}: not scored with these transcoders")
        out[layer] = torch.as_tensor(features.mean_activations(layer), dtype=torch.float32)
    return out


# ============================================================================ tc intervene


def top_tokens(probabilities: torch.Tensor, tokenizer: Any, k: int) -> list[dict]:
    top = probabilities.topk(min(k, probabilities.shape[-1]))
    return [{"token": tokenizer.decode([int(i)]), "id": int(i), "probability": float(p)}
            for p, i in zip(top.values, top.indices)]


def kl_divergence(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """KL(p || q) in nats from log-probabilities [vocab]."""
    return float((p_log.exp() * (p_log - q_log)).sum())


def run_intervene(config: InterveneConfig, loaded: LoadedModel, transcoders: dict[int, Transcoder],
                  prompt: str) -> dict:
    """Everything `tc intervene` prints: the target and the next-token distribution, before and after."""
    from tccli.circuit.trace import check_transcoders, prompt_tokens, resolve_position, token_strings

    check_transcoders(transcoders, loaded)
    interventions = parse_interventions(config)
    tokens = prompt_tokens(loaded, prompt)
    position = resolve_position(config.pos, int(tokens.shape[0]))
    target = target_from_options(config, loaded, transcoders)
    means = feature_means(config.features, loaded, transcoders) if config.features else None
    model = ReplacementModel(loaded, transcoders, tokens.unsqueeze(0), means)
    rows = [RowSpec(0), RowSpec(0, interventions)]
    capture = target.capture_names(model) if target is not None else []
    output = model.run(rows, config.mode, config.ablation, capture)
    log_probs = torch.log_softmax(output.logits[:, position].double(), dim=-1)
    result = {
        "prompt": prompt, "tokens": token_strings(loaded.tokenizer, tokens.tolist()), "position": position,
        "mode": config.mode, "ablation": config.ablation,
        "interventions": [i.describe() for i in interventions],
        "target": None,
        "top_before": top_tokens(log_probs[0].exp(), loaded.tokenizer, config.top),
        "top_after": top_tokens(log_probs[1].exp(), loaded.tokenizer, config.top),
        "kl": kl_divergence(log_probs[0], log_probs[1]),
    }
    if target is not None:
        before, after = (float(v) for v in target.values(model, output))
        description = dict(target.description)
        for key in ("token", "token_b"):
            if description.get(key) is not None:
                description[key + "_string"] = loaded.tokenizer.decode([description[key]])
        result["target"] = {**description, "before": before, "after": after, "change": after - before}
    return result


def intervene_lines(result: dict) -> list[str]:
    lines = [f"{'; '.join(result['interventions']) or 'no intervention'} ({result['mode']} mode, "
             f"{result['ablation']} ablation) at token {result['position']} "
             f"{result['tokens'][result['position']]!r}"]
    target = result["target"]
    if target is not None:
        lines.append(f"target {target_label(target)}: {target['before']:.6g} -> {target['after']:.6g} "
                     f"(change {target['change']:+.6g})")
    lines.append(f"KL(before || after) of the next-token distribution: {result['kl']:.6g} nats")
    lines.append(f"{'before':<32}after")
    for before, after in zip(result["top_before"], result["top_after"]):
        left = f"{before['token']!r} {before['probability']:.4f}"
        lines.append(f"  {left:<30}{after['token']!r} {after['probability']:.4f}")
    return lines


def target_label(target: dict) -> str:
    kind = target.get("kind")
    if kind == "feature":
        return f"L{target['layer']}.F{target['feature']} pre-activation"
    if kind == "logit":
        return f"logit({target.get('token_string', target.get('token'))!r})"
    if kind == "logit_diff":
        return (f"logit({target.get('token_string', target.get('token'))!r}) - "
                f"logit({target.get('token_b_string', target.get('token_b'))!r})")
    return f"direction . resid_pre[{target.get('layer')}]"
