"""The transcoder: a wide, sparse replacement for an MLP sublayer (METHOD.md sections 1 and 8).

    pre  = (x - b_pre) W_enc + b_enc             W_enc: [d_in, m]   b_enc: [m]   b_pre: [d_in]
    z    = act(pre)
    yhat = z W_dec + b_dec (+ x W_skip)           W_dec: [m, d_out]  b_dec: [d_out]  W_skip: [d_in, d_out]

``act`` is one of
- ``relu``: ReLU(pre) (the paper; sparsity from an L1 penalty);
- ``topk``: the k largest pre-activations of each token, then ReLU (what tc, SAELens and sparsify train);
- ``signed_topk``: the k largest pre-activations of each token as they are, negative ones included
  (circuit-tracer's and Peek's TopK). The two differ only on a token with fewer than k positive
  pre-activations; tc reads those formats' TopK as this kind, so that they are used exactly as trained;
- ``batchtopk``: during training the k x batch largest entries of the batch (train.py); at inference
  ``pre * (pre > threshold)`` with the threshold estimated during training (Bussmann et al. 2024);
- ``jumprelu``: ``pre * (pre > threshold_i)``, a threshold per feature (Gemma Scope).
``threshold`` [m] exists for the two threshold kinds (batchtopk stores its one threshold in every entry).

A skip transcoder (``skip=True``, Paulo, Shabalin, Belrose 2025) adds the linear term ``x W_skip`` of its
input; ``x`` is the input itself, before ``b_pre`` is subtracted.

Where a transcoder reads and writes (``input_space``, ``output_space``) is part of its identity: it is valid
only for the activations it was trained on (METHOD.md section 8). An SAE is the same module with input and
target the same activation. Pure math: no file I/O here (see transcoder_io).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

from tccli.errors import fail

ACTIVATIONS = ("relu", "topk", "signed_topk", "batchtopk", "jumprelu")
THRESHOLD_ACTIVATIONS = ("batchtopk", "jumprelu")  # the kinds with a `threshold` tensor
K_ACTIVATIONS = ("topk", "signed_topk", "batchtopk")  # the kinds that need k
KINDS = ("transcoder", "sae")
# What the transcoder reads (METHOD.md section 8), with r the residual the MLP's norm reads:
#   normalized  r_c / s: the norm's output with its weight folded into the MLP (tc's own; compatibility
#               mode's ln2.hook_normalized)
#   mlp_input   g * r_c / s + beta: the MLP module's input (sparsify)
#   resid_mid   r itself (circuit-tracer's sets; resid_pre in parallel blocks)
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

    def validate(self, where: str = "transcoder config") -> "TranscoderConfig":
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
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or self.layer < 0):
            raise fail(f"{where}: layer must be a non-negative integer or null, got {self.layer!r}")
        for name in ("weight_processing", "training", "source"):
            if not isinstance(getattr(self, name), dict):
                raise fail(f"{where}: {name} must be an object, got {getattr(self, name)!r}")
        return self


class Transcoder(nn.Module):
    def __init__(self, config: TranscoderConfig):
        super().__init__()
        config.validate()
        self.config = config
        d_in, d_out, m = config.d_in, config.d_out, config.n_features
        self.W_enc = nn.Parameter(torch.zeros(d_in, m))
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.W_dec = nn.Parameter(torch.zeros(m, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.b_pre = nn.Parameter(torch.zeros(d_in))
        # Optional tensors exist exactly when the config says so (saved and loaded by name).
        self.threshold = nn.Parameter(torch.zeros(m)) if config.activation in THRESHOLD_ACTIVATIONS else None
        self.W_skip = nn.Parameter(torch.zeros(d_in, d_out)) if config.skip else None

    def tensor_names(self) -> tuple[str, ...]:
        """The names of every tensor this transcoder holds (its file's contents)."""
        return tuple(name for name, _ in self.named_parameters())

    @property
    def n_features(self) -> int:
        return self.config.n_features

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """Feature pre-activations [..., m]; the circuit target for a feature is one of these."""
        return (x - self.b_pre) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Activations z from pre-activations (inference rule; BatchTopK's batch rule lives in training)."""
        activation = self.config.activation
        if activation == "relu":
            return torch.relu(pre)
        if activation in ("topk", "signed_topk"):
            k = min(int(self.config.k), pre.shape[-1])
            top = pre.topk(k, dim=-1)
            values = torch.relu(top.values) if activation == "topk" else top.values
            return torch.zeros_like(pre).scatter(-1, top.indices, values)
        return pre * (pre > self.threshold)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations z [..., m]."""
        return self.activate(self.pre_activation(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The features' part of the output: z W_dec + b_dec (no skip term)."""
        return z @ self.W_dec + self.b_dec

    def skip_term(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """x W_skip, or None without a skip connection."""
        return None if self.W_skip is None else x @ self.W_skip

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction yhat, feature activations z)."""
        z = self.encode(x)
        output = self.decode(z)
        if self.W_skip is not None:
            output = output + x @ self.W_skip
        return output, z

    @property
    def encoder_vectors(self) -> torch.Tensor:
        """[m, d_in]: row i is feature i's encoder vector f_enc(i)."""
        return self.W_enc.T

    @property
    def decoder_vectors(self) -> torch.Tensor:
        """[m, d_out]: row i is feature i's decoder vector f_dec(i)."""
        return self.W_dec
