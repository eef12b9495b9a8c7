"""A transcoder's saved config (its kind, activation, spaces) and `tc convert`'s settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from tccli.config.fields import option
from tccli.errors import fail

ACTIVATIONS = ("relu", "topk", "signed_topk", "batchtopk", "jumprelu")


THRESHOLD_ACTIVATIONS = ("batchtopk", "jumprelu")  # the kinds with a `threshold` tensor


K_ACTIVATIONS = ("topk", "signed_topk", "batchtopk")  # the kinds that need k


KINDS = ("transcoder", "sae")


# What the transcoder reads (docs/method.md section 8), with r the residual the MLP's norm reads:
#   normalized  r_c / s: the norm's output with its weight folded into the MLP (tc's own; compatibility
#               mode's ln2.hook_normalized)
#   mlp_input   g * r_c / s + beta: the MLP module's input (sparsify)
#   resid_mid   r itself, centred for LayerNorm (circuit-tracer's sets; resid_pre in parallel blocks)
INPUT_SPACES = ("normalized", "mlp_input", "resid_mid")


# What it writes: mlp_out (tc's: centred for LayerNorm models as compatibility mode does) or mlp_output
# (the MLP module's raw output).
OUTPUT_SPACES = ("mlp_out", "mlp_output")


@dataclass
class TranscoderConfig:
    """Everything needed to use a transcoder correctly later; saved as its config.json."""

    d_in: int
    d_out: int
    n_features: int
    activation: str = "relu"  # one of ACTIVATIONS
    k: Optional[int] = None  # active features per token for topk, signed_topk and batchtopk
    skip: bool = False  # a skip connection x W_skip
    kind: str = "transcoder"  # "transcoder" (MLP in -> MLP out) or "sae" (MLP out -> MLP out)
    input_space: str = "normalized"  # one of INPUT_SPACES (an SAE reads its output space)
    output_space: str = "mlp_out"  # one of OUTPUT_SPACES
    layer: Optional[int] = None
    model_name: Optional[str] = None
    model_architecture: Optional[str] = None
    weight_processing: dict = field(default_factory=dict)
    input_hook: Optional[str] = None
    output_hook: Optional[str] = None
    training: dict = field(default_factory=dict)  # the TrainConfig it came from, as saved
    feature_frequency: Optional[list] = None  # per-feature firing frequency measured during training
    source: dict = field(default_factory=dict)  # where it came from (format, file or hub id), for tc info
    format_version: int = 2

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self, where: str = "transcoder config") -> TranscoderConfig:
        """Refuse values no transcoder can have, with one line naming the field; returns self."""
        for name in ("d_in", "d_out", "n_features"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise fail(f"{where}: {name} must be a positive integer, got {value!r}")
        if self.activation not in ACTIVATIONS:
            raise fail(f"{where}: activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.activation in K_ACTIVATIONS:
            if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
                raise fail(f"{where}: {self.activation} needs k, a positive integer, got {self.k!r}")
        elif self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise fail(f"{where}: k must be a positive integer or null, got {self.k!r}")
        if not isinstance(self.skip, bool):
            raise fail(f"{where}: skip must be true or false, got {self.skip!r}")
        if self.kind not in KINDS:
            raise fail(f"{where}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.input_space not in INPUT_SPACES + OUTPUT_SPACES:
            raise fail(f"{where}: input_space must be one of {', '.join(INPUT_SPACES)}, got {self.input_space!r}")
        if self.output_space not in OUTPUT_SPACES:
            raise fail(f"{where}: output_space must be one of {', '.join(OUTPUT_SPACES)}, got {self.output_space!r}")
        if self.layer is not None and (
            isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0
        ):
            raise fail(f"{where}: layer must be a non-negative integer or null, got {self.layer!r}")
        for name in ("weight_processing", "training", "source"):
            if not isinstance(getattr(self, name), dict):
                raise fail(f"{where}: {name} must be an object, got {getattr(self, name)!r}")
        return self


WRITE_FORMATS = ("tc", "saelens", "sparsify", "gemma-scope", "circuit-tracer", "peek")


@dataclass
class ConvertConfig:
    """Options of `tc convert`."""

    input: str = option(
        "",
        "Transcoders to convert: a folder or file in any readable format (tc, SAELens, "
        "sparsify, circuit-tracer set, Gemma Scope npz, paper .pt, Peek), a folder of them, a "
        "cross-layer transcoder (tc's folder, circuit-tracer's layout, Gemma Scope 2's files), or a hub id.",
        required=True,
    )
    out: str = option(
        "",
        "Where to write: one folder for one transcoder, else a folder of per-layer folders "
        "(must not exist or be empty).",
        required=True,
    )
    to: str = option(
        "tc",
        "Output format: tc, saelens, sparsify, gemma-scope, circuit-tracer or peek (the "
        "paper's .pt format is read only; a cross-layer transcoder converts to tc or circuit-tracer).",
    )

    def validate(self) -> None:
        if self.to not in WRITE_FORMATS:
            raise fail(f"--to must be one of {', '.join(WRITE_FORMATS)}, got {self.to!r}")


CLT_KIND = "cross_layer_transcoder"

# The activations a cross-layer transcoder can have. topk keeps the k largest pre-activations of each
# layer's features at each token (per layer, so that a feature's activity never depends on later layers);
# batchtopk selects across every layer's features of a training batch and runs as per-feature thresholds.
CLT_ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu")


@dataclass
class CrossLayerConfig:
    """A cross-layer transcoder's saved config (docs/method.md section 11): one encoder per layer in
    ``layers``, and decoders from each of those layers to itself and every later one in ``layers``."""

    d_in: int
    d_out: int
    n_features: int  # features per layer (every layer has the same number)
    layers: list  # the layers it reads and writes, increasing (usually 0 .. L-1)
    activation: str = "jumprelu"  # one of CLT_ACTIVATIONS
    k: Optional[int] = None  # topk: active features per layer and token; batchtopk: per token over all layers
    skip: bool = False  # a skip connection x_l W_skip^l per layer
    kind: str = CLT_KIND
    input_space: str = "normalized"  # one of INPUT_SPACES
    output_space: str = "mlp_out"  # one of OUTPUT_SPACES
    model_name: Optional[str] = None
    model_architecture: Optional[str] = None
    weight_processing: dict = field(default_factory=dict)
    input_hooks: Optional[list] = None  # per entry of `layers`: the hook each encoder reads (None: tc's own)
    output_hooks: Optional[list] = None  # per entry of `layers`: the hook each layer's reconstruction replaces
    training: dict = field(default_factory=dict)  # the TrainConfig it came from, as saved
    feature_frequency: Optional[list] = None  # per entry of `layers`: per-feature firing frequency
    source: dict = field(default_factory=dict)  # where it came from (format, file or hub id), for tc info
    format_version: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self, where: str = "cross-layer transcoder config") -> CrossLayerConfig:
        """Refuse values no cross-layer transcoder can have, with one line naming the field; returns self."""
        if self.kind != CLT_KIND:
            raise fail(f"{where}: kind must be {CLT_KIND!r}, got {self.kind!r}")
        if self.activation not in CLT_ACTIVATIONS:
            raise fail(f"{where}: activation must be one of {', '.join(CLT_ACTIVATIONS)}, got {self.activation!r}")
        layers = self.layers
        if (
            not isinstance(layers, list)
            or not layers
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers)
            or any(a >= b for a, b in zip(layers, layers[1:]))
        ):
            raise fail(f"{where}: layers must be a non-empty increasing list of layer numbers, got {layers!r}")
        for name in ("input_hooks", "output_hooks", "feature_frequency"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, list) or len(value) != len(layers)):
                raise fail(f"{where}: {name} must be null or a list with one entry per layer, got {value!r}")
        self.layer_config(layers[0]).validate(where)
        return self

    def layer_config(self, layer: int) -> TranscoderConfig:
        """The per-layer view of layer ``layer``: what its encoder reads and its own-layer decoder writes,
        for the checks and code that see one layer at a time (batchtopk runs as thresholds, like jumprelu)."""
        j = self.layers.index(layer)
        return TranscoderConfig(
            d_in=self.d_in,
            d_out=self.d_out,
            n_features=self.n_features,
            activation=self.activation,
            k=self.k,
            skip=self.skip,
            input_space=self.input_space,
            output_space=self.output_space,
            layer=layer,
            model_name=self.model_name,
            model_architecture=self.model_architecture,
            weight_processing=dict(self.weight_processing),
            input_hook=self.input_hooks[j] if self.input_hooks else None,
            output_hook=self.output_hooks[j] if self.output_hooks else None,
            training=dict(self.training),
            feature_frequency=self.feature_frequency[j] if self.feature_frequency else None,
            source=dict(self.source),
        )
