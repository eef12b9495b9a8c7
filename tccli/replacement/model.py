"""The replacement model (docs/method.md sections 10 and 11): the real model, run through TransformerLens hooks,
with every layer that has a transcoder computing its MLP output as

    mlp_out = clean mlp_out + (transcoder_out(x) - transcoder_out(x_clean))

i.e. the transcoder's output plus the error term ``mlp_out - transcoder_out`` held at its clean value
(the skip term, where a transcoder has one, is part of its output). Written as a difference, a run that
changes nothing adds exactly zero, so the un-intervened run reproduces the model's logits bit for bit; a
position whose transcoder input is bitwise unchanged keeps its clean activations exactly. Layers without
a transcoder run their real MLP.

With a cross-layer transcoder (tccli.transcoders.cross_layer) the output of layer l' is
``sum over CLT layers l <= l' of z_l W_dec^(l -> l') + b_dec^l' (+ skip)``, each z_l computed from this
run's own input at layer l, so a changed feature of layer l moves the MLP output of every layer >= l at once
by ``(value - a) W_dec^(l -> l')``. A per-layer set runs through the same code with one decoder per layer (its
own), so a CLT whose decoders to later layers are zero adds only exact zeros and gives the set's runs bit
for bit. ``self.transcoders`` is always {layer: Transcoder}: a CLT's per-layer views (its encoders, for
targets, means and activations); ``self.writers`` holds the decoders that write to each layer.

``ReplacementModel.run_rows`` runs a batch of rows (a prompt and the interventions on it: see
tccli.replacement.intervention for the nodes, operations and modes) and reduces each run to what the
caller needs. Hook names come from ``ModelInfo``; where a transcoder reads and writes comes from
``transcoder_input_site`` / ``transcoder_output_site`` (its spaces, tccli.model.spaces) with
``input_in_space`` / ``output_at_site`` (tccli.replacement.sites). Gemma-2's post-norms run on the changed
sums (head terms are added before the post-attention norm, an mlp_output transcoder's output before the
post-MLP norm), their scales frozen in frozen and direct modes."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from tccli.config.replacement import ABLATIONS, MODES
from tccli.errors import fail
from tccli.model.loading import LoadedModel
from tccli.nodes import Intervention, NodeRef
from tccli.replacement.sites import (  # noqa: F401 (input_in_space, output_at_site, uncapped_logits, widened: re-exported)
    attention_site,
    input_in_space,
    mlp_output_hook,
    output_at_site,
    post_norm_scales,
    replacer,
    saver,
    transcoder_input_site,
    transcoder_output_site,
    uncapped_logits,
    widened,
)
from tccli.transcoders.cross_layer import CrossLayerTranscoder
from tccli.transcoders.transcoder import Transcoder

# Where a run's hooks keep each transcoder layer's (activations, clean activations), keyed by layer.
_ACTIVATIONS = "activations:"

# The transcoders a replacement model runs: a per-layer set {layer: Transcoder} or one cross-layer transcoder.
Transcoders = dict[int, Transcoder] | CrossLayerTranscoder


def layer_views(transcoders: Transcoders) -> dict[int, Transcoder]:
    """{layer: Transcoder}: a per-layer set as it is, a CLT as its per-layer views (the encoders, shared), for
    code that reads one layer's features at a time (checks, targets, means, activations)."""
    if isinstance(transcoders, CrossLayerTranscoder):
        return {layer: transcoders.layer_transcoder(layer) for layer in transcoders.layers}
    return dict(sorted(transcoders.items()))


def decoder_writers(transcoders: Transcoders) -> dict[int, list[tuple[int, torch.Tensor]]]:
    """{target layer: [(source layer, W_dec^(source -> target) [m, d_out]), ...]}, earliest source first: the
    decoders whose features write to each transcoder layer's output (a per-layer set: its own only)."""
    if isinstance(transcoders, CrossLayerTranscoder):
        return {
            target: [(source, transcoders.decoder(source, target)) for source in transcoders.layers if source <= target]
            for target in transcoders.layers
        }
    return {layer: [(layer, t.W_dec)] for layer, t in sorted(transcoders.items())}


@dataclass(frozen=True)
class RowSpec:
    """One row of a batched run: a clean prompt and what is done to it.

    ``keep_only``: when given, every transcoder feature of every transcoder layer at every position is
    ablated except these (layer, feature, position) triples (a circuit's sufficiency run).
    """

    prompt: int = 0
    interventions: tuple[Intervention, ...] = ()
    keep_only: Optional[frozenset] = None


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

    def __init__(
        self,
        loaded: LoadedModel,
        transcoders: Transcoders,
        tokens: torch.Tensor,
        means: Optional[dict[int, torch.Tensor]] = None,
    ):
        from tccli.model.loading import run_logits

        self.loaded, self.info = loaded, loaded.info
        self.cross_layer = transcoders if isinstance(transcoders, CrossLayerTranscoder) else None
        self.transcoders = layer_views(transcoders)
        self.writers = decoder_writers(transcoders)
        self.tokens = tokens.reshape(-1, tokens.shape[-1]).to(torch.long)
        self.means = {layer: m.to(loaded.device, torch.float32) for layer, m in (means or {}).items()}
        info = self.info
        bridge = loaded.bridge
        self.W_O = bridge.W_O.detach()  # [L, H, d_head, d]
        self.kv_of_head = torch.arange(info.n_heads, device=loaded.device) // (info.n_heads // info.n_kv_heads)
        self.input_site = {layer: transcoder_input_site(info, layer, t) for layer, t in self.transcoders.items()}
        self.output_site = {
            layer: transcoder_output_site(info, layer, self.transcoders.get(layer)) for layer in range(info.n_layers)
        }
        names = [info.final_scale_hook]
        for layer in range(info.n_layers):
            hooks = info.layer(layer)
            names += [
                hooks.attn_scale,
                hooks.attn_pattern,
                hooks.attn_values,
                attention_site(hooks),
                hooks.mlp_scale,
                self.output_site[layer],
            ] + post_norm_scales(hooks)
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
                raise fail(
                    f"node {node.id}: no transcoder for layer {node.layer} "
                    f"(have layers {sorted(self.transcoders) or 'none'})"
                )
            n = self.transcoders[node.layer].n_features
            if not 0 <= node.index < n:
                raise fail(
                    f"node {node.id}: feature {node.index} is out of range (layer {node.layer}'s "
                    f"transcoder has {n} features)"
                )
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
                    raise fail(
                        f"--set {node.id}: only a feature's activation can be set; ablate or scale head and error terms"
                    )
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
            raise fail(
                f"mean ablation of layer {layer} needs its features' means: pass --features FILE "
                "(written by tc score) holding that layer"
            )
        return float(self.means[layer][feature])

    # ------------------------------------------------------------------------ running

    def run(
        self,
        rows: Sequence[RowSpec],
        mode: str = "free",
        ablation: str = "zero",
        capture: Iterable[str] = (),
        probes: Optional[Probes] = None,
    ) -> RunOutput:
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
        identity = len(rows) == self.n_prompts and bool(
            (prompts == torch.arange(self.n_prompts, device=prompts.device)).all()
        )
        clean = (lambda name: self.clean[name]) if identity else (lambda name: self.clean[name][prompts])
        store: dict[str, torch.Tensor] = {}
        hooks = self._hooks(plans, mode, clean, store, probes, ablation)
        names = list(dict.fromkeys(capture))
        hooks += [(name, saver(store, "capture:" + name)) for name in names]
        context = torch.enable_grad() if probes is not None else torch.no_grad()
        with context, warnings.catch_warnings():
            # holding a norm's scale is the point of frozen mode, not a surprise to warn about
            warnings.filterwarnings("ignore", message="A forward hook edited hook_scale")
            logits = self.loaded.bridge.run_with_hooks(
                self.tokens[prompts].to(self.loaded.device), fwd_hooks=hooks, return_type="logits"
            )
        missing = [n for n in names if "capture:" + n not in store]
        if missing:
            raise fail(f"model {self.info.name!r} exposes no hook {missing[0]!r}")
        return RunOutput(logits=logits, captured={n: store["capture:" + n] for n in names}, prompts=prompts)

    def _hooks(
        self,
        plans: dict[int, _LayerPlan],
        mode: str,
        clean: Callable[[str], torch.Tensor],
        store: dict,
        probes: Optional[Probes],
        ablation: str,
    ) -> list[tuple[str, Callable]]:
        info = self.info
        frozen = mode in ("frozen", "direct")
        always = probes is not None  # under autograd a frozen value must be a constant, never the live tensor
        hooks: list[tuple[str, Callable]] = []
        for layer in range(info.n_layers):
            names = info.layer(layer)
            plan = plans[layer]
            head_factor = plan.head_factor
            if probes is not None and layer in probes.head_factor:
                head_factor = (
                    probes.head_factor[layer] if head_factor is None else head_factor * probes.head_factor[layer]
                )
            if frozen:
                for name in [names.attn_scale, names.attn_pattern, names.mlp_scale] + post_norm_scales(names):
                    hooks.append((name, replacer(clean(name), always)))
            if mode == "direct":
                hooks.append((attention_site(names), self._direct_attention(layer, head_factor, clean)))
            elif head_factor is not None:
                hooks.append((names.attn_pattern, saver(store, names.attn_pattern)))
                hooks.append((names.attn_values, saver(store, names.attn_values)))
                hooks.append((attention_site(names), self._attention_with_terms(layer, head_factor, store)))
            error_factor = plan.error_factor
            if probes is not None and layer in probes.error_factor:
                error_factor = (
                    probes.error_factor[layer] if error_factor is None else error_factor * probes.error_factor[layer]
                )
            output = self.output_site[layer]
            if layer in self.transcoders:
                site = self.input_site[layer]
                hooks.append((site, saver(store, site)))
                shift = probes.feature_shift.get(layer) if probes is not None else None
                hooks.append(
                    (
                        output,
                        self._transcoder_output(
                            layer, plan, error_factor, shift, mode, clean, store, ablation, exact=probes is None
                        ),
                    )
                )
            elif mode == "direct" or error_factor is not None:
                hooks.append((output, mlp_output_hook(clean(output) if mode == "direct" else None, error_factor)))
        if frozen:
            hooks.append((info.final_scale_hook, replacer(clean(info.final_scale_hook), always)))
        return hooks

    def _head_terms(
        self, layer: int, factor: torch.Tensor, pattern: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """[R, T, d]: sum over heads h and sources s of (factor - 1) * pattern[h, t, s] * value(s) W_O^h."""
        dtype = widened(values).dtype
        v = values[:, :, self.kv_of_head, :].to(dtype)  # [R, S, H, d_head], each query head's kv head
        ov = torch.einsum("rshe,hed->rhsd", v, self.W_O[layer].to(dtype))
        weights = pattern.to(dtype) * (factor.to(dtype) - 1.0).unsqueeze(2)  # [R, H, T, S]
        return torch.einsum("rhts,rhsd->rtd", weights, ov)

    def _direct_attention(self, layer: int, factor: Optional[torch.Tensor], clean: Callable) -> Callable:
        names = self.info.layer(layer)

        def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
            held = clean(attention_site(names))
            if factor is None:
                return held
            return held + self._head_terms(layer, factor, clean(names.attn_pattern), clean(names.attn_values)).to(
                held.dtype
            )

        return hook

    def _attention_with_terms(self, layer: int, factor: torch.Tensor, store: dict) -> Callable:
        names = self.info.layer(layer)

        def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
            terms = self._head_terms(layer, factor, store[names.attn_pattern], store[names.attn_values])
            return tensor + terms.to(tensor.dtype)

        return hook

    def _transcoder_output(
        self,
        layer: int,
        plan: _LayerPlan,
        error_factor: Optional[torch.Tensor],
        shift: Optional[torch.Tensor],
        mode: str,
        clean: Callable,
        store: dict,
        ablation: str,
        exact: bool,
    ) -> Callable:
        transcoder = self.transcoders[layer]
        site, output = self.input_site[layer], self.output_site[layer]
        dtype = transcoder.W_enc.dtype
        writers = self.writers[layer]

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
            # this layer's activations, for the hooks of later layers that its features also write to (a CLT)
            store[_ACTIVATIONS + str(layer)] = (z, z_clean)
            delta = None
            for source, decoder in writers:  # earliest source first, as CrossLayerTranscoder.decode sums
                z_source, z_source_clean = store[_ACTIVATIONS + str(source)]
                write = (z_source - z_source_clean) @ decoder
                delta = write if delta is None else delta + write
            if mode != "direct" and transcoder.W_skip is not None:
                delta = delta + transcoder.skip_term(x.to(dtype)) - transcoder.skip_term(x_clean.to(dtype))
            delta = output_at_site(self.loaded, layer, transcoder, delta)
            held = clean(output)
            if error_factor is not None:
                y_clean = None
                for source, decoder in writers:
                    write = store[_ACTIVATIONS + str(source)][1] @ decoder
                    y_clean = write if y_clean is None else y_clean + write
                y_clean = y_clean + transcoder.b_dec
                if transcoder.W_skip is not None:
                    y_clean = y_clean + transcoder.skip_term(x_clean.to(dtype))
                error = held.to(dtype) - output_at_site(self.loaded, layer, transcoder, y_clean)
                delta = delta + (error_factor.to(dtype) - 1.0).unsqueeze(-1) * error
            return held + delta.to(held.dtype)

        return hook

    # ------------------------------------------------------------------------ batches and gradients

    def run_rows(
        self,
        rows: Sequence[RowSpec],
        reduce: Callable[[RunOutput], torch.Tensor],
        mode: str = "free",
        ablation: str = "zero",
        capture: Iterable[str] = (),
        batch_size: int = 64,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> torch.Tensor:
        """``reduce`` (a run's output -> [rows] values) over every row, ``batch_size`` rows per pass;
        ``progress(rows done, rows)`` after each pass."""
        capture = list(capture)
        parts = []
        for lo in range(0, len(rows), batch_size):
            parts.append(reduce(self.run(rows[lo : lo + batch_size], mode, ablation, capture)).detach())
            if progress is not None:
                progress(min(lo + batch_size, len(rows)), len(rows))
        return torch.cat(parts) if parts else torch.zeros(0)

    def node_gradients(self, target: Any, prompts: Optional[Sequence[int]] = None) -> NodeGradients:
        """Every node's derivative of ``target`` (a tccli.replacement.targets.TargetSpec, which reads this
        model's runs) in the frozen replacement model (one backward pass)."""
        prompts = list(range(self.n_prompts)) if prompts is None else list(prompts)
        R, T, device = len(prompts), self.n_tokens, self.loaded.device
        dtype = widened(self.clean_logits).dtype
        probes = Probes(
            feature_shift={
                layer: torch.zeros(R, T, t.n_features, device=device, dtype=t.W_enc.dtype, requires_grad=True)
                for layer, t in self.transcoders.items()
            },
            head_factor={
                layer: torch.ones(R, self.info.n_heads, T, device=device, dtype=dtype, requires_grad=True)
                for layer in range(self.info.n_layers)
            },
            error_factor={
                layer: torch.ones(R, T, device=device, dtype=dtype, requires_grad=True)
                for layer in range(self.info.n_layers)
            },
        )
        output = self.run(
            [RowSpec(prompt=p) for p in prompts], "frozen", capture=target.capture_names(self), probes=probes
        )
        values = target.values(self, output)
        grads = torch.autograd.grad(values.sum(), probes.tensors(), allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, probes.tensors())]
        n_features, n_heads = len(probes.feature_shift), len(probes.head_factor)
        index = torch.tensor(prompts, device=device)
        return NodeGradients(
            feature=dict(zip(probes.feature_shift, grads[:n_features])),
            head=dict(zip(probes.head_factor, grads[n_features : n_features + n_heads])),
            error=dict(zip(probes.error_factor, grads[n_features + n_heads :])),
            activations={layer: self.clean_activations(layer, index) for layer in self.transcoders},
            values=values.detach(),
        )
