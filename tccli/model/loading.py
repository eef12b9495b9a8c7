"""The model layer: load a language model through TransformerLens 4 and describe it.

`load_model` boots any model TransformerLens 4 supports (hub name or local HuggingFace folder) with
`TransformerBridge.boot_transformers` and applies `enable_compatibility_mode()`, the equivalent of
HookedTransformer's default weight processing that the paper's transcoders were trained under.

`ModelInfo` is the one description of the loaded model that the rest of the code uses: sizes,
normalisation kind, block layout and, per layer, every hook name. No other module spells a hook name.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from tccli.config.fields import ENGINES
from tccli.errors import fail

# Where the built-in model lives once shipped (issue 6). `--model builtin` and the default resolve here.
BUILTIN_MODEL_DIR = Path(__file__).parents[1] / "builtin" / "model"

# The weight processing `tc` applies, recorded with every cache, transcoder and graph: a transcoder is
# only valid for activations produced under the same processing.
WEIGHT_PROCESSING = {
    "compatibility_mode": True,
    "fold_ln": True,
    "center_writing_weights": True,
    "center_unembed": True,
    "fold_value_biases": True,
}


@dataclass(frozen=True)
class LayerHooks:
    """Hook names of one transformer block (TransformerLens 4 compatibility-mode naming)."""

    resid_pre: str
    attn_normalized: str  # ln1 output: what attention's Q/K/V read (normalised, weights folded)
    attn_scale: str  # ln1 scale, shape [..., 1]
    attn_pattern: str  # [batch, head, dest, src]
    attn_values: str  # [batch, src, kv head, d_head]: x_norm1 W_V + b_V, one per key/value head (GQA)
    attn_out: str
    resid_mid: Optional[str]  # None for parallel blocks (GPT-NeoX), where attention and MLP both read resid_pre
    mlp_in: str  # ln2 output: the transcoder's input
    mlp_scale: str
    mlp_out: str  # the transcoder's target: what the MLP adds to the residual (after any post-norm)
    resid_post: str
    mlp_norm_input: str = ""  # what the norm in front of the MLP reads (resid_mid; resid_pre in parallel blocks)
    mlp_output: str = ""  # the MLP module's own output (before any post-norm; centred for LayerNorm models)
    mlp_hidden: str = ""  # the MLP's hidden activations (their mean restores a LayerNorm model's raw output)
    attn_post_in: Optional[str] = None  # Gemma-2: attention's output before its post-norm
    attn_post_scale: Optional[str] = None  # Gemma-2: the post-attention norm's scale
    mlp_post_scale: Optional[str] = None  # Gemma-2: the post-MLP norm's scale


@dataclass(frozen=True)
class ModelInfo:
    """Everything the rest of tc needs to know about a loaded model."""

    name: str  # hub name or local path as given
    architecture: str  # HuggingFace architecture class, e.g. GPT2LMHeadModel
    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int  # < n_heads for grouped-query attention
    d_head: int
    d_vocab: int
    n_ctx: int
    normalization: str  # "layernorm" or "rmsnorm"
    parallel_attn_mlp: bool
    positional: str  # "learned", "rotary", ...
    gated_mlp: bool
    bos_token_id: int
    weight_processing: dict = field(default_factory=lambda: dict(WEIGHT_PROCESSING))
    post_norms: bool = False  # Gemma-2: a norm after attention and after the MLP, before each enters the residual
    embed_scale: float = 1.0  # the token embedding enters the residual times this (Gemma: sqrt(d_model))
    final_logit_softcap: Optional[float] = None  # logits = c tanh(raw / c) (Gemma-2); tc attributes the raw logit
    attn_logit_softcap: Optional[float] = None  # inside the attention pattern, frozen with it

    # Hooks outside the blocks.
    embed_hook: str = "hook_embed"
    pos_embed_hook: Optional[str] = None
    final_normalized_hook: str = "ln_final.hook_normalized"
    final_scale_hook: str = "ln_final.hook_scale"

    def layer(self, layer: int) -> LayerHooks:
        if not 0 <= layer < self.n_layers:
            raise fail(f"layer {layer} is out of range: the model has {self.n_layers} layers (0-{self.n_layers - 1})")
        p = f"blocks.{layer}."
        return LayerHooks(
            resid_pre=p + "hook_resid_pre",
            attn_normalized=p + "ln1.hook_normalized",
            attn_scale=p + "ln1.hook_scale",
            attn_pattern=p + "attn.hook_pattern",
            attn_values=p + "attn.hook_v",
            attn_out=p + "hook_attn_out",
            resid_mid=None if self.parallel_attn_mlp else p + "hook_resid_mid",
            mlp_in=p + "ln2.hook_normalized",
            mlp_scale=p + "ln2.hook_scale",
            mlp_out=p + "hook_mlp_out",
            resid_post=p + "hook_resid_post",
            mlp_norm_input=p + ("hook_resid_pre" if self.parallel_attn_mlp else "hook_resid_mid"),
            mlp_output=p + "mlp.hook_out",
            mlp_hidden=p + "mlp.hook_post",
            attn_post_in=p + "ln1_post.hook_in" if self.post_norms else None,
            attn_post_scale=p + "ln1_post.hook_scale" if self.post_norms else None,
            mlp_post_scale=p + "ln2_post.hook_scale" if self.post_norms else None,
        )

    def input_hooks(self, layer: int, space: str) -> list[str]:
        """The hooks ``spaces.transcoder_input`` needs for ``space`` at ``layer`` (an SAE's: its output space)."""
        hooks = self.layer(layer)
        if space in ("normalized", "mlp_input"):
            return [hooks.mlp_in]
        if space == "resid_mid":
            return [hooks.mlp_norm_input]
        return self.output_hooks(layer, space)

    def output_hooks(self, layer: int, space: str) -> list[str]:
        """The hooks ``spaces.mlp_output`` needs for ``space`` at ``layer``."""
        hooks = self.layer(layer)
        if space == "mlp_out":
            return [hooks.mlp_out]
        return [hooks.mlp_output] + ([hooks.mlp_hidden] if self.normalization == "layernorm" else [])

    def mlp_in_hook(self, layer: int) -> str:
        return self.layer(layer).mlp_in

    def mlp_out_hook(self, layer: int) -> str:
        return self.layer(layer).mlp_out

    @property
    def final_resid_hook(self) -> str:
        return self.layer(self.n_layers - 1).resid_post

    def to_dict(self) -> dict:
        out = asdict(self)
        out["layers"] = [asdict(self.layer(i)) for i in range(self.n_layers)]
        return out


@dataclass
class LoadedModel:
    """A booted bridge, its tokenizer and its description."""

    bridge: Any  # transformer_lens.model_bridge.TransformerBridge
    tokenizer: Any
    info: ModelInfo
    device: torch.device
    dtype: str = "float32"  # the dtype the model runs in (--model-dtype)
    # per layer, the unprocessed weights that tell a transcoder's spaces apart (tccli.model.spaces)
    spaces: list = field(default_factory=list)
    by_default: bool = False  # the built-in model, loaded because no model was named (no --model)


def resolve_model_name(model: Optional[str]) -> str:
    """None or 'builtin' -> the shipped model's folder; anything else is passed on unchanged."""
    if model is None or model == "builtin":
        if not (BUILTIN_MODEL_DIR / "config.json").exists():
            raise fail("no --model given and this tc ships no built-in model; pass --model NAME_OR_FOLDER")
        return str(BUILTIN_MODEL_DIR)
    return model


def model_identity(model: Optional[str]) -> str:
    """What a --model value means, for comparing runs and files: 'builtin' for the shipped model however it
    was named (None, 'builtin', its folder, or the install path an older tc recorded), the resolved
    absolute folder for any other local model, else the hub name as given."""
    if model is None or model == "builtin":
        return "builtin"
    if _looks_like_local_path(model) or os.path.isabs(model):
        resolved = os.path.realpath(os.path.expanduser(model))
        if resolved == os.path.realpath(BUILTIN_MODEL_DIR) or resolved.endswith(
            os.path.join("tccli", "builtin", "model")
        ):
            return "builtin"
        return resolved
    return model


def recorded_model_name(name: str) -> str:
    """How a file tc writes records the model it was made with: a local folder given relative to the
    working folder made absolute (so the file still names it from another folder); anything else as given."""
    if _looks_like_local_path(name) and not os.path.isabs(os.path.expanduser(name)):
        return os.path.abspath(os.path.expanduser(name))
    return name


def known_different_models(recorded: Optional[str], loaded: Optional[str]) -> bool:
    """Whether a file made with model ``recorded`` is known to come from another model than ``loaded``: both
    name the built-in model or a local folder, and they are not the same one. A recorded folder that no
    longer exists may have been moved, and hub names have aliases (gpt2 / gpt2-small), so those are not
    judged."""
    if not recorded or not loaded:
        return False
    a, b = model_identity(recorded), model_identity(loaded)
    if a == b:
        return False

    def local(identity: str) -> bool:
        return identity == "builtin" or os.path.isabs(identity)

    if not (local(a) and local(b)):
        return False
    return a == "builtin" or os.path.isdir(a)


def check_context(context: int, info: ModelInfo) -> None:
    """Refuse rows longer than the model's context before any work (positions past it do not exist)."""
    if context > info.n_ctx:
        raise fail(f"--context {context} is longer than the model's maximum context of {info.n_ctx} tokens")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise fail(f"unknown --device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise fail(f"--device {device} asked for, but no CUDA device is available")
    return dev


def torch_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
    if name not in table:
        raise fail(f"unknown dtype {name!r}: use float32, float16 or bfloat16")
    return table[name]


def _looks_like_local_path(name: str) -> bool:
    # Hub names look like "gpt2" or "org/name"; anything that exists on disk or is spelled as a path is local.
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def load_model(model: Optional[str] = None, device: str = "auto", dtype: str = "float32") -> LoadedModel:
    """Boot a model by hub name or local folder; raise TcError with one line if that fails."""
    name = resolve_model_name(model)
    if _looks_like_local_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise fail(f"model folder {name} does not exist or is not a folder")
        if not (path / "config.json").is_file():
            raise fail(f"{name} is not a HuggingFace model folder (no config.json)")
    dev = resolve_device(device)
    with _quiet_loading():
        from transformer_lens.model_bridge import TransformerBridge

        try:
            bridge = TransformerBridge.boot_transformers(name, device=str(dev), dtype=torch_dtype(dtype))
            spaces = read_layer_spaces(bridge)  # before compatibility mode folds the norms away
            bridge.enable_compatibility_mode(
                **{k: v for k, v in WEIGHT_PROCESSING.items() if k != "compatibility_mode"}
            )
        except Exception as exc:  # hub unreachable, unknown architecture, corrupt weights, ...
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise fail(f"cannot load model {name!r}: {reason[:300]}") from None
    bridge.eval()
    tokenizer = bridge.tokenizer
    if tokenizer is None:
        raise fail(f"model {name!r} has no tokenizer")
    return LoadedModel(
        bridge=bridge,
        tokenizer=tokenizer,
        info=describe(bridge, name),
        device=dev,
        dtype=dtype,
        spaces=spaces,
        by_default=model is None,
    )


def space_activation(loaded: LoadedModel, layer: int, space: str, captured: dict[str, torch.Tensor]) -> torch.Tensor:
    """Layer ``layer``'s activation in ``space`` (tccli.model.spaces) from the hooks ``ModelInfo.input_hooks`` /
    ``output_hooks`` name, captured on one forward pass."""
    from tccli.config.transcoders import INPUT_SPACES
    from tccli.model.spaces import mlp_output, transcoder_input

    hooks, spaces = loaded.info.layer(layer), loaded.spaces[layer]
    if space in INPUT_SPACES:
        return transcoder_input(space, captured.get(hooks.mlp_in), captured.get(hooks.mlp_norm_input), spaces)
    if space == "mlp_out":
        return captured[hooks.mlp_out]
    return mlp_output(captured[hooks.mlp_output], captured.get(hooks.mlp_hidden), spaces)


def _norm_gain(component: Any) -> tuple[torch.Tensor, Optional[torch.Tensor], float]:
    """(g, beta or None, eps) of a HuggingFace norm module: the factor it multiplies the normalised vector
    by, the bias it adds. Gemma's RMSNorm multiplies by (1 + weight)."""
    weight = component.weight.detach().float().clone()
    if "Gemma" in type(component).__name__:
        weight = weight + 1.0
    bias = getattr(component, "bias", None)
    eps = getattr(component, "eps", None) or getattr(component, "variance_epsilon", None) or 1e-6
    return weight, (None if bias is None else bias.detach().float().clone()), float(eps)


def read_layer_spaces(bridge: Any) -> list:
    """Per layer, a ``tccli.model.spaces.LayerSpaces`` from the booted, not yet processed bridge."""
    from tccli.model.spaces import LayerSpaces

    layernorm = not str(getattr(bridge.cfg, "normalization_type", "LN") or "LN").upper().startswith("RMS")
    out_mean_weight = out_mean_bias = None
    if layernorm:  # the processed MLP output is centred: keep what restores the raw output's mean
        out_mean_weight = bridge.W_out.detach().float().mean(-1)  # [L, d_mlp]
        try:
            out_mean_bias = bridge.b_out.detach().float().mean(-1)  # [L]
        except AttributeError:
            out_mean_bias = None
    layers = []
    for index, block in enumerate(bridge.blocks):
        weight, bias, _ = _norm_gain(block.ln2.original_component)
        spaces = LayerSpaces(layernorm=layernorm, norm_weight=weight, norm_bias=bias)
        if hasattr(block, "ln2_post"):
            spaces.post_weight, _, spaces.post_eps = _norm_gain(block.ln2_post.original_component)
        if hasattr(block, "ln1_post"):
            spaces.attn_post_weight, _, spaces.attn_post_eps = _norm_gain(block.ln1_post.original_component)
        if out_mean_weight is not None:
            spaces.output_mean_weight = out_mean_weight[index].clone()
            spaces.output_mean_bias = 0.0 if out_mean_bias is None else float(out_mean_bias[index])
        layers.append(spaces)
    return layers


def describe(bridge: Any, name: str) -> ModelInfo:
    """Read a booted bridge's config into a ModelInfo."""
    cfg = bridge.cfg
    hf_config = getattr(getattr(bridge, "original_model", None), "config", None)
    architectures = getattr(hf_config, "architectures", None) or [
        getattr(cfg, "original_architecture", None) or "unknown"
    ]
    norm = str(getattr(cfg, "normalization_type", "LN") or "LN").upper()
    tokenizer = bridge.tokenizer
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(tokenizer, "eos_token_id", None)
    if bos is None:
        raise fail(f"model {name!r}: its tokenizer has neither a BOS nor an EOS token to start rows with")
    n_heads = int(cfg.n_heads)
    n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
    pos = str(getattr(cfg, "positional_embedding_type", "standard"))
    first = bridge.blocks[0]
    embed = getattr(getattr(bridge, "embed", None), "original_component", None)
    return ModelInfo(
        name=name,
        architecture=str(architectures[0]),
        n_layers=int(cfg.n_layers),
        d_model=int(cfg.d_model),
        d_mlp=int(cfg.d_mlp),
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        d_head=int(cfg.d_head),
        d_vocab=int(cfg.d_vocab),
        n_ctx=int(cfg.n_ctx),
        normalization="rmsnorm" if norm.startswith("RMS") else "layernorm",
        parallel_attn_mlp=bool(getattr(cfg, "parallel_attn_mlp", False)),
        positional="learned" if pos == "standard" else pos,
        gated_mlp=bool(getattr(cfg, "gated_mlp", False)),
        bos_token_id=int(bos),
        pos_embed_hook="hook_pos_embed" if pos == "standard" else None,
        post_norms=hasattr(first, "ln1_post") and hasattr(first, "ln2_post"),
        embed_scale=float(getattr(embed, "scalar_embed_scale", 1.0) or 1.0),
        final_logit_softcap=_softcap(getattr(cfg, "output_logits_soft_cap", None)),
        attn_logit_softcap=_softcap(getattr(cfg, "attn_scores_soft_cap", None)),
    )


def _softcap(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once everything needed has been captured."""


def run_capture(
    loaded: LoadedModel,
    tokens: torch.Tensor,
    hook_names: Iterable[str],
    stop_after: Optional[str] = None,
    extra_hooks: Iterable[tuple[str, Any]] = (),
) -> dict[str, torch.Tensor]:
    """Run the model on ``tokens`` [batch, seq] and return the activations at ``hook_names``.

    With ``stop_after`` the forward pass ends as soon as that hook has fired, so caching layer 2 of a
    12-layer model costs three blocks, not twelve. ``extra_hooks`` are (name, fn) pairs run as well
    (e.g. a transcoder splice). Runs under ``torch.no_grad``.
    """
    captured: dict[str, torch.Tensor] = {}
    names = list(dict.fromkeys(hook_names))

    # Keyed by the name asked for, not hook.name: the bridge reports aliases (hook_resid_pre,
    # hook_resid_post) under their target's name (blocks.L.hook_in / hook_out).
    def saver(name: str):
        def save(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
            captured[name] = tensor.detach()
            if stop_after is not None and name == stop_after and all(n in captured for n in names):
                raise _StopForward
            return tensor

        return save

    fwd_hooks = [(n, saver(n)) for n in names] + list(extra_hooks)
    if stop_after is not None and stop_after not in names:
        fwd_hooks.append((stop_after, saver(stop_after)))
    with torch.no_grad():
        try:
            loaded.bridge.run_with_hooks(tokens.to(loaded.device), fwd_hooks=fwd_hooks, return_type=None)
        except _StopForward:
            pass
    missing = [n for n in names if n not in captured]
    if missing:
        raise fail(f"model {loaded.info.name!r} exposes no hook {missing[0]!r}")
    return {n: captured[n] for n in names}


def run_logits(
    loaded: LoadedModel,
    tokens: torch.Tensor,
    hook_names: Iterable[str] = (),
    extra_hooks: Iterable[tuple[str, Any]] = (),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A full forward pass on ``tokens`` [batch, seq]: (logits [batch, seq, vocab], captured activations).

    ``extra_hooks`` are (name, fn) pairs run as well; a hook that returns a tensor replaces the
    activation (how `tc eval` splices a transcoder in). Runs under ``torch.no_grad``.
    """
    captured: dict[str, torch.Tensor] = {}
    names = list(dict.fromkeys(hook_names))

    def saver(name: str):  # keyed by the name asked for (see run_capture)
        def save(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
            captured[name] = tensor.detach()
            return tensor

        return save

    fwd_hooks = [(n, saver(n)) for n in names] + list(extra_hooks)
    with torch.no_grad():
        logits = loaded.bridge.run_with_hooks(tokens.to(loaded.device), fwd_hooks=fwd_hooks, return_type="logits")
    missing = [n for n in names if n not in captured]
    if missing:
        raise fail(f"model {loaded.info.name!r} exposes no hook {missing[0]!r}")
    return logits, {n: captured[n] for n in names}


# ============================================================================ capturing MLP inputs and outputs

# How `tc cache` and `tc score` read activations (--engine):
#   bridge  the TransformerBridge's own hooks, exactly the values `tc eval` and `tc circuit` see. The bridge
#           recomputes attention eagerly to expose hook_pattern, which halves throughput on small models.
#   native  the plain HuggingFace model with its default attention kernel (SDPA) and PyTorch hooks on the
#           norm in front of each MLP and on the MLP; the captured tensors are then processed the way
#           compatibility mode defines them (below). Equal to the bridge's values up to float rounding
#           (different attention kernels), and verified only for the architectures listed here; others
#           fall back to the bridge.
MLP_ACTIVATIONS = ("mlp_in", "mlp_scale", "mlp_out")  # what MlpCapture.capture returns per layer
NATIVE_ARCHITECTURES = (
    "GPT2LMHeadModel",
    "GPTNeoXForCausalLM",
    "LlamaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Qwen3ForCausalLM",
)


@dataclass(frozen=True)
class NativeMlpSite:
    """Where one layer's MLP sits in the plain HuggingFace module tree."""

    norm_module: str  # the norm the MLP reads (ln_2 / post_attention_layernorm); its *input* is captured
    mlp_module: str  # the module whose output enters the residual: the MLP, or Gemma-2's post-MLP norm
    eps: float
    # The bridge computes hook_normalized as x * rsqrt(var + eps) on some architectures and as
    # x / sqrt(var + eps) on others; doing the same keeps the two engines equal wherever inputs are.
    inverse_sqrt: bool


def native_mlp_sites(loaded: LoadedModel) -> Optional[list[NativeMlpSite]]:
    """Each layer's NativeMlpSite, read from the bridge's module tree; None where native capture is unverified."""
    if loaded.info.architecture not in NATIVE_ARCHITECTURES:
        return None
    bridge = loaded.bridge
    # The bridge wraps HF modules in place: a wrapped module's path, less the `_original_component`
    # steps, is the module's path in the plain model.
    paths = {
        id(module): name.replace("._original_component", "").replace("_original_component.", "")
        for name, module in bridge.original_model.named_modules()
    }
    sites = []
    for block in bridge.blocks:
        norm, mlp = block.ln2, getattr(block, "ln2_post", None) or block.mlp
        if id(norm) not in paths or id(mlp) not in paths:
            return None
        component = norm.original_component
        eps = getattr(component, "eps", None) or getattr(component, "variance_epsilon", None) or bridge.cfg.eps
        sites.append(
            NativeMlpSite(
                paths[id(norm)], paths[id(mlp)], float(eps), bool(getattr(norm, "use_native_layernorm_autograd", False))
            )
        )
    return sites


def compat_normalized(
    x: torch.Tensor, normalization: str, eps: float, inverse_sqrt: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hook_normalized, hook_scale) of compatibility mode's norm for the norm input ``x``.

    With fold_ln the norm's weight and bias live in the next layer's weights, so the MLP reads the bare
    normalised vector: centred (LayerNorm only) and divided by sqrt(mean square + eps), in float32.
    """
    x = x.float()
    if normalization == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    variance = x.pow(2).mean(-1, keepdim=True) + eps
    scale = variance.sqrt()
    return (x * torch.rsqrt(variance) if inverse_sqrt else x / scale), scale


def compat_mlp_out(out: torch.Tensor, normalization: str) -> torch.Tensor:
    """hook_mlp_out of compatibility mode from the plain MLP output: center_writing_weights makes every
    write to the residual stream of a LayerNorm model mean-free; RMSNorm models are left as they are."""
    if normalization == "layernorm":
        return out - out.mean(-1, keepdim=True)
    return out


class MlpCapture:
    """Captures chosen layers' MLP input (with its norm scale) and MLP output, one batch at a time.

    ``capture(tokens)`` returns {layer: {"mlp_in", "mlp_scale", "mlp_out"}} with tensors
    [batch, pos, d_model] ([batch, pos, 1] for the scale); each pass stops after the last chosen MLP.
    ``input_spaces`` ({layer: space}, default normalized) says in which input space (tccli.model.spaces) each
    layer's "mlp_in" is given; "mlp_out" is always what the MLP adds to the residual (hook_mlp_out).
    ``engine`` is 'native' or 'bridge' (see ENGINES); ``engine_used`` says which one runs (native
    falls back to the bridge for unverified architectures, and ``fallback_reason`` says why).
    With ``release_bridge`` the native engine drops the bridge before loading the plain model, so only
    one copy of the weights is held; ``loaded.bridge`` is then None.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        layers: Iterable[int],
        engine: str = "native",
        release_bridge: bool = False,
        input_spaces: Optional[dict[int, str]] = None,
    ):
        if engine not in ENGINES:
            raise fail(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        self.loaded, self.info = loaded, loaded.info
        self.layers = sorted(set(layers))
        self.input_spaces = {layer: (input_spaces or {}).get(layer, "normalized") for layer in self.layers}
        self.engine_used, self.fallback_reason, self.attention = engine, "", "bridge-eager"
        self._bridge_hooks = {
            layer: {which: getattr(self.info.layer(layer), which) for which in MLP_ACTIVATIONS} for layer in self.layers
        }
        for layer, space in self.input_spaces.items():
            if space == "resid_mid":  # spaces.transcoder_input reads the residual from this name
                self._bridge_hooks[layer]["mlp_norm_input"] = self.info.layer(layer).mlp_norm_input
        sites = native_mlp_sites(loaded) if engine == "native" else None
        if engine == "native" and sites is None:
            self.engine_used = "bridge"
            self.fallback_reason = (
                f"native capture is verified for {', '.join(NATIVE_ARCHITECTURES)} only; "
                f"using the bridge for {self.info.architecture}"
            )
        if self.engine_used == "native":
            self._captured: dict[tuple[int, str], torch.Tensor] = {}
            self._sites = sites
            if release_bridge:
                loaded.bridge = None
                import gc

                gc.collect()
            self._model = self._load_plain_model()
            self.attention = str(getattr(self._model.config, "_attn_implementation", "unknown"))
            self._hook_plain_model()

    def _load_plain_model(self) -> Any:
        with _quiet_loading():
            from transformers import AutoModelForCausalLM

            try:
                model = AutoModelForCausalLM.from_pretrained(
                    resolve_model_name(self.info.name), dtype=torch_dtype(self.loaded.dtype)
                )
            except Exception as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise fail(
                    f"cannot load model {self.info.name!r} for native capture: {reason[:300]} "
                    "(--engine bridge avoids this)"
                ) from None
        return model.to(self.loaded.device).eval()

    def _hook_plain_model(self) -> None:
        last = max(self.layers)
        for layer in self.layers:
            site = self._sites[layer]

            def save_input(module: Any, args: tuple, kwargs: dict, layer: int = layer) -> None:
                self._captured[layer, "norm_input"] = args[0] if args else kwargs["hidden_states"]

            def save_output(module: Any, args: tuple, output: Any, layer: int = layer) -> None:
                self._captured[layer, "mlp_out"] = output[0] if isinstance(output, tuple) else output
                if layer == last:
                    raise _StopForward

            self._model.get_submodule(site.norm_module).register_forward_pre_hook(save_input, with_kwargs=True)
            self._model.get_submodule(site.mlp_module).register_forward_hook(save_output)

    def capture(self, tokens: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
        from tccli.model.spaces import transcoder_input

        tokens = tokens.to(self.loaded.device)
        if self.engine_used == "bridge":
            names = [name for hooks in self._bridge_hooks.values() for name in hooks.values()]
            captured = run_capture(
                self.loaded, tokens, names, stop_after=self._bridge_hooks[self.layers[-1]]["mlp_out"]
            )
            out = {}
            for layer, hooks in self._bridge_hooks.items():
                out[layer] = {which: captured[hooks[which]] for which in MLP_ACTIVATIONS}
                out[layer]["mlp_in"] = space_activation(self.loaded, layer, self.input_spaces[layer], captured)
            return out
        self._captured.clear()
        with torch.no_grad():
            try:
                self._model(input_ids=tokens, use_cache=False)
            except _StopForward:
                pass
        out = {}
        for layer in self.layers:
            site = self._sites[layer]
            norm_input = self._captured[layer, "norm_input"]
            normalized, scale = compat_normalized(norm_input, self.info.normalization, site.eps, site.inverse_sqrt)
            if self.input_spaces[layer] != "normalized":  # resid_mid: centred there for LayerNorm models
                residual = norm_input.float()
                normalized = transcoder_input(self.input_spaces[layer], normalized, residual, self.loaded.spaces[layer])
            out[layer] = {
                "mlp_in": normalized,
                "mlp_scale": scale,
                "mlp_out": compat_mlp_out(self._captured[layer, "mlp_out"], self.info.normalization),
            }
        self._captured.clear()
        return out


@contextlib.contextmanager
def _quiet_loading():
    """Silence HuggingFace/TransformerLens progress bars and warnings while booting a model."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.disable(previous)
