"""`tc eval`: how sparse and how faithful transcoders are (docs/method.md section 3).

Per layer, over the evaluation tokens:

- L0: mean number of active features per token; dead features (never active on these tokens) and dense
  features (active on more than ``dense_threshold`` of the tokens, 10% by default).
- MSE (mean over tokens and dimensions of (y - yhat)^2) and FVU = sum ||y - yhat||^2 / sum ||y - mean y||^2,
  y being the MLP output in the transcoder's output space (the target) and yhat the transcoder's output on
  the real MLP input in its input space (tccli.model.spaces: each transcoder is evaluated where it was trained).
- Next-token cross-entropy of the model clean, with the MLP's output replaced by the transcoder's
  output (the transcoder fed the MLP input of that same forward pass), with the MLP output zero-ablated
  and mean-ablated, the fraction of CE recovered (CE_ablated - CE_spliced) / (CE_ablated - CE_clean) for
  both ablations, and KL(clean || spliced) per token.
- The same for all given layers replaced at once: each transcoder reads the MLP input of the spliced
  run (so it sees the errors of the transcoders below it), as the model would if the MLPs were gone.

SAEs (kind "sae") read the MLP output and their output replaces it.

A cross-layer transcoder (docs/method.md section 11) gets the same table: per layer l', FVU of
yhat_l' = sum over l <= l' of z_l W_dec^(l -> l') + b_dec^l' (+ skip) from the clean inputs of every layer, L0
and dead features of z_l'; CE with only MLP l' replaced by yhat_l' (its sources read the clean inputs, since
nothing before l' is replaced); and the all-layers row with every evaluated MLP replaced at once, each z_l then
read from the replaced run. A CLT whose decoders to later layers are zero gives its per-layer set's numbers
bit for bit.

Work plan, all under no_grad and in batches of rows: one truncated pass gathers the mean MLP output
(for mean ablation; it must be known before any mean-ablated run); then, per batch, one clean pass
captures every layer's MLP input and output and the clean logits, followed by the spliced, zero- and
mean-ablated passes for each layer and for all layers at once. Clean logits are compared with each
spliced run batch by batch, so nothing vocabulary-sized is kept across batches.

The metric math is in plain functions on tensors (`next_token_loss`, `kl_to_clean`,
`fraction_recovered`, `ReconstructionStats`) so it can be checked by hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from tccli.config.evaluation import EvalConfig
from tccli.config.fields import to_json_dict
from tccli.errors import fail
from tccli.replacement.model import layer_views
from tccli.transcoders.cross_layer import CrossLayerTranscoder
from tccli.transcoders.transcoder import Transcoder

# ----------------------------------------------------------------------------- metric math


def _next_token_log_probs(logits: torch.Tensor) -> torch.Tensor:
    # at least float32 (half-precision models), but not float64 by default: [batch, seq, vocab] in
    # float64 would be 1.6 GB for one batch of GPT-2 logits
    return torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting tokens[:, t+1] from position t: [batch, seq-1] (natural log)."""
    log_probs = _next_token_log_probs(logits)
    return -log_probs.gather(-1, tokens[:, 1:, None].to(log_probs.device)).squeeze(-1)


def kl_to_clean(clean_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(clean || other) of the next-token distributions at the positions scored by next_token_loss."""
    clean = _next_token_log_probs(clean_logits)
    other = _next_token_log_probs(logits)
    return (clean.exp() * (clean - other)).sum(-1)


def fraction_recovered(ce_clean: float, ce_spliced: float, ce_ablated: float) -> float:
    """(CE_ablated - CE_spliced) / (CE_ablated - CE_clean): 1 = as good as the MLP, 0 = as bad as ablation."""
    gap = ce_ablated - ce_clean
    if gap == 0:
        return float("nan")
    return (ce_ablated - ce_spliced) / gap


@dataclass
class ReconstructionStats:
    """Running sums for L0, MSE, FVU and per-feature firing counts over batches of tokens."""

    n_features: int
    n_tokens: int = 0
    active_sum: float = 0.0
    squared_error: float = 0.0
    target_sum: Optional[torch.Tensor] = None  # [d] float64
    target_square_sum: float = 0.0
    fire_counts: Optional[torch.Tensor] = None  # [m] int64
    d: int = 0

    def update(self, target: torch.Tensor, output: torch.Tensor, acts: torch.Tensor) -> None:
        """target, output: [..., d]; acts: [..., m] feature activations."""
        y = target.reshape(-1, target.shape[-1]).double()
        yhat = output.reshape(-1, output.shape[-1]).double()
        active = acts.reshape(-1, acts.shape[-1]) != 0  # signed_topk keeps negative values: active too
        if self.target_sum is None:
            self.d = y.shape[-1]
            self.target_sum = torch.zeros(self.d, dtype=torch.float64, device=y.device)
            self.fire_counts = torch.zeros(self.n_features, dtype=torch.int64, device=y.device)
        self.n_tokens += y.shape[0]
        self.active_sum += float(active.sum())
        self.squared_error += float(((y - yhat) ** 2).sum())
        self.target_sum += y.sum(0)
        self.target_square_sum += float((y**2).sum())
        self.fire_counts += active.sum(0)

    def result(self, dense_threshold: float) -> dict:
        if self.n_tokens == 0:
            raise fail("no tokens were evaluated")
        n = self.n_tokens
        # total variance about the mean over tokens: sum ||y||^2 - n ||mean y||^2
        total_variance = self.target_square_sum - float((self.target_sum**2).sum()) / n
        frequency = self.fire_counts.double() / n
        return {
            "l0": self.active_sum / n,
            "mse": self.squared_error / (n * self.d),
            "fvu": self.squared_error / total_variance if total_variance > 0 else float("nan"),
            "dead_features": int((self.fire_counts == 0).sum()),
            "dense_features": int((frequency > dense_threshold).sum()),
            "n_features": self.n_features,
        }


class MeanOutput:
    """Running mean of an activation [batch, seq, d], per position or over all tokens."""

    def __init__(self, per_position: bool):
        self.per_position = per_position
        self.total: Optional[torch.Tensor] = None
        self.count = 0

    def update(self, activation: torch.Tensor) -> None:
        batch_sum = activation.double().sum(0)  # [seq, d]
        if not self.per_position:
            batch_sum = batch_sum.sum(0, keepdim=True)  # [1, d]
        self.total = batch_sum if self.total is None else self.total + batch_sum
        self.count += activation.shape[0] * (1 if self.per_position else activation.shape[1])

    def mean(self) -> torch.Tensor:
        """[seq or 1, d]: broadcasts against [batch, seq, d]."""
        return self.total / self.count


# ----------------------------------------------------------------------------- splicing


def splice_hooks(loaded: Any, transcoders: dict[int, Transcoder]) -> list[tuple[str, Callable]]:
    """Hooks replacing each layer's MLP output (hook_mlp_out) by its transcoder's output.

    A transcoder reads its input space (tccli.model.spaces) from hooks of the same forward pass that fire before
    the MLP output; an SAE reads the output space it replaces. An output in mlp_output space enters the
    residual as the model would pass it on (centred for LayerNorm models, through Gemma-2's post-MLP norm).
    """
    hooks: list[tuple[str, Callable]] = []
    for layer, transcoder in transcoders.items():
        names = loaded.info.layer(layer)
        seen: dict[str, torch.Tensor] = {}
        sources = loaded.info.input_hooks(layer, transcoder.config.input_space)
        hooks += [(name, _remember(seen, name)) for name in sources if name != names.mlp_out]
        hooks.append((names.mlp_out, _replace_with(loaded, layer, transcoder, seen)))
    return hooks


def _remember(seen: dict, name: str) -> Callable:
    def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
        seen[name] = tensor
        return tensor

    return hook


def _replace_with(loaded: Any, layer: int, transcoder: Transcoder, seen: dict) -> Callable:
    from tccli.model.loading import space_activation
    from tccli.model.spaces import written_to_residual

    names = loaded.info.layer(layer)
    config = transcoder.config

    def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
        source = space_activation(loaded, layer, config.input_space, {**seen, names.mlp_out: tensor})
        seen.clear()
        output = transcoder(source.to(transcoder.W_enc.dtype))[0]
        return written_to_residual(config.output_space, output, loaded.spaces[layer]).to(tensor.dtype)

    return hook


def cross_layer_splice_hooks(loaded: Any, clt: CrossLayerTranscoder, replaced: Iterable[int]) -> list:
    """Hooks replacing the MLP output of each layer in ``replaced`` by the CLT's output there, the sum of the
    writes of every CLT layer at or before it (docs/method.md section 11). Each layer's features read that
    layer's input on the same forward pass (so, below a replaced layer, the replaced model's input)."""
    replaced = set(replaced)
    last = max(replaced)
    activations: dict[int, torch.Tensor] = {}  # this pass's z_l, filled in layer order
    hooks: list[tuple[str, Callable]] = []
    for layer in clt.layers:
        if layer > last:
            break
        names = loaded.info.layer(layer)
        seen: dict[str, torch.Tensor] = {}
        sources = loaded.info.input_hooks(layer, clt.config.input_space)
        hooks += [(name, _remember(seen, name)) for name in sources if name != names.mlp_out]
        hooks.append((names.mlp_out, _cross_layer_step(loaded, clt, layer, seen, activations, layer in replaced)))
    return hooks


def _cross_layer_step(
    loaded: Any, clt: CrossLayerTranscoder, layer: int, seen: dict, activations: dict, replace: bool
) -> Callable:
    from tccli.model.loading import space_activation
    from tccli.model.spaces import written_to_residual

    names = loaded.info.layer(layer)
    config = clt.config
    dtype = clt.W_enc[str(layer)].dtype

    def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
        x = space_activation(loaded, layer, config.input_space, {**seen, names.mlp_out: tensor}).to(dtype)
        seen.clear()
        activations[layer] = clt.encode(layer, x)
        if not replace:
            return tensor
        output = None
        for source in clt.layers:  # earliest source first, as CrossLayerTranscoder.decode sums
            if source > layer:
                break
            write = activations[source] @ clt.decoder(source, layer)
            output = write if output is None else output + write
        output = output + clt.b_dec[str(layer)]
        if clt.W_skip is not None:
            output = output + clt.skip_term(layer, x)
        return written_to_residual(config.output_space, output, loaded.spaces[layer]).to(tensor.dtype)

    return hook


def replacement_hooks(loaded: Any, transcoders: Any, layers: Iterable[int]) -> list:
    """Hooks replacing the MLP outputs of ``layers`` (together) by ``transcoders``' outputs: a per-layer set's
    transcoders of those layers, or a cross-layer transcoder's outputs there."""
    if isinstance(transcoders, CrossLayerTranscoder):
        return cross_layer_splice_hooks(loaded, transcoders, layers)
    return splice_hooks(loaded, {layer: transcoders[layer] for layer in layers})


def ablation_hooks(info: Any, layers: Iterable[int], means: Optional[dict[int, torch.Tensor]]) -> list:
    """Hooks setting each layer's MLP output to zero (means None) or to its mean."""
    hooks = []
    for layer in layers:
        value = None if means is None else means[layer]
        hooks.append((info.layer(layer).mlp_out, _constant(value)))
    return hooks


def _constant(value: Optional[torch.Tensor]) -> Callable:
    def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
        if value is None:
            return torch.zeros_like(tensor)
        return value[: tensor.shape[1]].to(tensor.dtype).expand_as(tensor).clone()

    return hook


# ----------------------------------------------------------------------------- evaluation


@dataclass
class _Fidelity:
    """Sums over scored positions for one setting (one layer, or all layers)."""

    ce_spliced: float = 0.0
    ce_zero: float = 0.0
    ce_mean: float = 0.0
    kl: float = 0.0

    def result(self, ce_clean: float, n: int) -> dict:
        spliced, zero, mean = self.ce_spliced / n, self.ce_zero / n, self.ce_mean / n
        return {
            "ce_clean": ce_clean,
            "ce_spliced": spliced,
            "ce_zero_ablated": zero,
            "ce_mean_ablated": mean,
            "recovered_zero": fraction_recovered(ce_clean, spliced, zero),
            "recovered_mean": fraction_recovered(ce_clean, spliced, mean),
            "kl": self.kl / n,
        }


@dataclass
class EvalResult:
    layers: list[dict]
    all_layers: Optional[dict]
    n_tokens: int
    n_scored: int
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain JSON data; a non-finite number (recovered with no ablation gap) becomes null."""
        return _finite_or_none(
            {
                **self.meta,
                "n_tokens": self.n_tokens,
                "n_predictions": self.n_scored,
                "layers": self.layers,
                "all_layers": self.all_layers,
            }
        )


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(item) for item in value]
    return value


def evaluate(
    loaded: Any,
    transcoders: dict[int, Transcoder] | CrossLayerTranscoder,
    tokens: torch.Tensor,
    batch_size: int = 32,
    mean_ablation: str = "position",
    dense_threshold: float = 0.1,
    progress: Optional[Callable[[str, int, int], None]] = None,
    layers: Optional[list[int]] = None,
) -> EvalResult:
    """Measure ``transcoders`` ({layer: Transcoder}, or a CrossLayerTranscoder of which ``layers`` are
    evaluated, all of them when None) on ``tokens`` [n_rows, context] with ``loaded``'s model."""
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise fail("no evaluation tokens: need at least one row of 2 or more tokens")
    info = loaded.info
    clt = transcoders if isinstance(transcoders, CrossLayerTranscoder) else None
    if clt is not None:
        layers = sorted(clt.layers if layers is None else layers)
        views = {layer: clt.layer_transcoder(layer) for layer in clt.layers}
    else:
        layers, views = sorted(transcoders), transcoders
    if not layers:
        raise fail("no transcoders to evaluate")
    batches = [tokens[i : i + batch_size] for i in range(0, tokens.shape[0], batch_size)]
    step = progress or (lambda stage, done, total: None)

    # pass 1: mean MLP outputs, stopping after the last layer needed
    from tccli.model.loading import run_capture, run_logits

    out_hooks = {layer: info.layer(layer).mlp_out for layer in layers}
    means_acc = {layer: MeanOutput(mean_ablation == "position") for layer in layers}
    for index, batch in enumerate(batches):
        captured = run_capture(loaded, batch, out_hooks.values(), stop_after=out_hooks[layers[-1]])
        for layer in layers:
            means_acc[layer].update(captured[out_hooks[layer]])
        step("mean MLP outputs", index + 1, len(batches))
    means = {layer: means_acc[layer].mean().to(loaded.device) for layer in layers}

    # pass 2: clean run, then spliced / ablated runs per layer and for all layers at once
    from tccli.model.loading import space_activation

    # a CLT's output at a layer reads the inputs of every CLT layer up to it
    read_layers = [layer for layer in views if layer <= layers[-1]] if clt is not None else layers
    space_hooks = [name for layer in read_layers for name in info.input_hooks(layer, views[layer].config.input_space)]
    space_hooks += [name for layer in layers for name in info.output_hooks(layer, views[layer].config.output_space)]
    space_hooks = list(dict.fromkeys(space_hooks))
    recon = {layer: ReconstructionStats(views[layer].n_features) for layer in layers}
    fidelity = {layer: _Fidelity() for layer in layers}
    all_at_once = _Fidelity() if len(layers) > 1 else None
    ce_clean_sum = 0.0
    n_scored = 0
    for index, batch in enumerate(batches):
        batch = batch.to(loaded.device)
        clean_logits, captured = run_logits(loaded, batch, space_hooks)
        ce_clean_sum += _total(next_token_loss(clean_logits, batch))
        n_scored += batch.shape[0] * (batch.shape[1] - 1)
        with torch.no_grad():
            if clt is not None:  # every layer's output from the clean inputs of its own and earlier layers
                dtype = clt.W_enc[str(layers[0])].dtype
                inputs = {
                    layer: space_activation(loaded, layer, clt.config.input_space, captured).to(dtype)
                    for layer in read_layers
                }
                outputs, activations = clt(inputs)
            else:
                outputs, activations = {}, {}
                for layer in layers:
                    transcoder = transcoders[layer]
                    source = space_activation(loaded, layer, transcoder.config.input_space, captured)
                    outputs[layer], activations[layer] = transcoder(source.to(transcoder.W_enc.dtype))
        for layer in layers:
            target = space_activation(loaded, layer, views[layer].config.output_space, captured)
            recon[layer].update(target, outputs[layer], activations[layer])
            _score_settings(loaded, batch, clean_logits, fidelity[layer], transcoders, [layer], means)
        if all_at_once is not None:
            _score_settings(loaded, batch, clean_logits, all_at_once, transcoders, layers, means)
        step("spliced runs", index + 1, len(batches))

    ce_clean = ce_clean_sum / n_scored
    per_layer = [
        {"layer": layer, **recon[layer].result(dense_threshold), **fidelity[layer].result(ce_clean, n_scored)}
        for layer in layers
    ]
    return EvalResult(
        per_layer,
        None if all_at_once is None else {"layers": layers, **all_at_once.result(ce_clean, n_scored)},
        n_tokens=int(tokens.numel()),
        n_scored=n_scored,
    )


def _total(per_token: torch.Tensor) -> float:
    return float(per_token.double().sum())


def _score_settings(
    loaded: Any,
    batch: torch.Tensor,
    clean_logits: torch.Tensor,
    sums: _Fidelity,
    transcoders: Any,
    layers: list[int],
    means: dict[int, torch.Tensor],
) -> None:
    """Add one batch's spliced, zero-ablated and mean-ablated CE (and spliced KL) to ``sums``, the MLPs of
    ``layers`` replaced by ``transcoders`` (a set or a CLT: ``replacement_hooks``) or ablated together.

    Full passes from the tokens: TransformerBridge's start_at_layer still runs the blocks below (it
    only swaps the residual in), so starting from a captured residual would save nothing.
    """
    from functools import partial

    from tccli.model.loading import run_logits

    info = loaded.info
    run = partial(run_logits, loaded, batch)
    logits, _ = run(extra_hooks=replacement_hooks(loaded, transcoders, layers))
    sums.ce_spliced += _total(next_token_loss(logits, batch))
    sums.kl += _total(kl_to_clean(clean_logits, logits))
    logits, _ = run(extra_hooks=ablation_hooks(info, layers, None))
    sums.ce_zero += _total(next_token_loss(logits, batch))
    logits, _ = run(extra_hooks=ablation_hooks(info, layers, means))
    sums.ce_mean += _total(next_token_loss(logits, batch))


# ----------------------------------------------------------------------------- the command


def load_checked(path: str, loaded: Any, layers: Optional[str] = None) -> dict[int, Transcoder] | CrossLayerTranscoder:
    """``load_checked_transcoders`` for a per-layer set; a cross-layer transcoder whole (``layers``, e.g.
    "0,2-3", must be among its layers), each of its layers checked against the model the same way."""
    from tccli.config.fields import parse_layers
    from tccli.transcoders.files import check_matches_model, check_model_named
    from tccli.transcoders.formats import is_cross_layer, load_checked_transcoders, load_transcoders

    if not is_cross_layer(path):
        return load_checked_transcoders(path, loaded, layers)
    chosen = parse_layers(layers, loaded.info.n_layers) if layers else None
    clt = load_transcoders(path, loaded.device, chosen)
    for view in layer_views(clt).values():
        check_matches_model(view, loaded.info)
        check_model_named(view, loaded)
    return clt.eval()


def chosen_layers(config: Any, loaded: Any, transcoders: Any) -> list[int]:
    """The layers a command with ``--layers`` works on: a set's own (it was loaded with only those), a CLT's
    chosen ones (it is loaded whole, since a layer's output reads every earlier layer's features)."""
    from tccli.config.fields import parse_layers

    if isinstance(transcoders, CrossLayerTranscoder) and config.layers:
        return parse_layers(config.layers, loaded.info.n_layers)
    return sorted(layer_views(transcoders))


def check_kind(transcoders: dict[int, Transcoder] | CrossLayerTranscoder, kind: str) -> None:
    """Refuse a file whose kind is not the ``--kind`` given (``auto``: whatever its config says)."""
    for transcoder in layer_views(transcoders).values():
        if kind != "auto" and transcoder.config.kind != kind:
            raise fail(
                f"--kind {kind} given, but the file for layer {transcoder.config.layer} holds "
                f"a {transcoder.config.kind}"
            )


def load_eval_inputs(config: EvalConfig) -> tuple[Any, dict[int, Transcoder] | CrossLayerTranscoder, Any]:
    """What `tc eval` reads, loaded and checked before any measuring: (the model, its transcoders: a set or
    a cross-layer transcoder, the token rows of --data)."""
    from tccli.data.text import load_rows
    from tccli.model.loading import check_context, load_model

    loaded = load_model(config.model, config.device, config.model_dtype)
    check_context(config.context, loaded.info)
    transcoders = load_checked(config.transcoders, loaded, config.layers)
    check_kind(transcoders, config.kind)
    rows = load_rows(
        config.data, loaded.tokenizer, loaded.info.bos_token_id, config.context, config.tokens, config.seed
    )
    return loaded, transcoders, rows.tokens


def run_eval(
    config: EvalConfig,
    loaded: Any,
    transcoders: dict[int, Transcoder] | CrossLayerTranscoder,
    tokens: Any,
    progress: Optional[Callable[[str, int, int], None]] = None,
) -> EvalResult:
    """`tc eval` on what its command loaded: ``loaded``'s model, ``transcoders`` ({layer: Transcoder} or a
    CrossLayerTranscoder, checked against that model) and ``tokens`` [n_rows, context] (numpy or torch); the
    result carries ``config``."""
    if isinstance(tokens, np.ndarray):
        tokens = torch.from_numpy(np.ascontiguousarray(tokens))
    layers = chosen_layers(config, loaded, transcoders)
    result = evaluate(
        loaded,
        transcoders,
        tokens,
        config.batch_size,
        config.mean_ablation,
        config.dense_threshold,
        progress,
        layers if isinstance(transcoders, CrossLayerTranscoder) else None,
    )
    cross_layer = isinstance(transcoders, CrossLayerTranscoder)
    transcoders = {layer: view for layer, view in layer_views(transcoders).items() if layer in layers}
    result.meta = {
        "model": loaded.info.name,
        "transcoders": config.transcoders,
        "kinds": {str(layer): t.config.kind for layer, t in transcoders.items()},
        "transcoder_kinds": {
            str(layer): {
                "activation": t.config.activation,
                "k": t.config.k,
                "skip": t.config.skip,
                "n_features": t.config.n_features,
            }
            for layer, t in transcoders.items()
        },
        "config": to_json_dict(config),
    }
    if cross_layer:
        result.meta["cross_layer"] = True
    return result


TABLE_COLUMNS = (
    ("layer", "layer", "{}"),
    ("L0", "l0", "{:.2f}"),
    ("FVU", "fvu", "{:.4f}"),
    ("MSE", "mse", "{:.3g}"),
    ("dead", "dead_features", "{}"),
    ("dense", "dense_features", "{}"),
    ("CE clean", "ce_clean", "{:.4f}"),
    ("CE spliced", "ce_spliced", "{:.4f}"),
    ("CE zero-abl", "ce_zero_ablated", "{:.4f}"),
    ("CE mean-abl", "ce_mean_ablated", "{:.4f}"),
    ("rec. zero", "recovered_zero", "{:.3f}"),
    ("rec. mean", "recovered_mean", "{:.3f}"),
    ("KL", "kl", "{:.4f}"),
)
# The columns shown without --wide: they fit an 80-column terminal. The clean CE, the same on every
# row, goes into the title; the ablated CEs are implied by the recovered fractions; MSE by FVU.
NARROW_COLUMNS = ("layer", "l0", "fvu", "dead_features", "ce_spliced", "recovered_zero", "recovered_mean", "kl")


# A feature never active in n tokens has density below 3/n with 95% confidence (the "rule of three":
# (1 - 3/n)^n ~ e^-3 = 0.05). And a live feature of density 1e-4 (rare, but a kept feature of a trained
# transcoder) goes unseen in n tokens with probability exp(-1e-4 n): over 1% below 46,052 tokens. Below
# that count "dead" would count rare features too, and the table says so.
RARE_DENSITY = 1e-4
DEAD_TOKENS = math.ceil(math.log(100) / RARE_DENSITY)  # 46,052


def few_tokens_for_dead(n_tokens: int) -> str:
    """The table's warning that ``n_tokens`` are too few to tell a dead feature from a rare one."""
    return (
        f"dead: not active in these {n_tokens:,} tokens, i.e. density below {3 / max(n_tokens, 1):.0e} (95%); "
        f"too few tokens to tell dead from rare (density {RARE_DENSITY:g}): use --tokens 50k or more"
    )


def result_table(result: EvalResult, wide: bool = False) -> Any:
    """A rich table: one row per layer, plus a row for all layers replaced at once.

    ``wide``: every metric (about 150 characters); otherwise the columns of NARROW_COLUMNS, with the
    clean cross-entropy in the title (about 75 characters).
    """
    from rich import box
    from rich.table import Table

    rows = list(result.layers)
    if result.all_layers is not None:
        rows.append({**result.all_layers, "layer": "all"})
    columns = [c for c in TABLE_COLUMNS if wide or c[1] in NARROW_COLUMNS]
    title = f"tc eval: {result.n_tokens} tokens, {result.n_scored} next-token predictions"
    if not wide and rows:
        title += f"; CE clean {_cell(rows[0].get('ce_clean'), '{:.4f}')}"
    captions = [] if wide else ["--wide: also MSE, dense features, clean and ablated CE"]
    if result.n_tokens < DEAD_TOKENS:
        captions.append(few_tokens_for_dead(result.n_tokens))
    table = Table(
        title=title,
        box=box.HEAVY_HEAD if wide else box.SIMPLE_HEAD,
        pad_edge=wide,
        caption="\n".join(captions) or None,
    )
    for title, _, _ in columns:
        table.add_column(title, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*[_cell(row.get(key), fmt) for _, key, fmt in columns])
    return table


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return fmt.format(value)
