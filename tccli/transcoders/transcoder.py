"""The transcoder: a wide, sparse replacement for an MLP sublayer (docs/method.md sections 1 and 8).

    pre  = (x - b_pre) W_enc + b_enc             W_enc: [d_in, m]   b_enc: [m]   b_pre: [d_in]
    z    = act(pre)
    yhat = z W_dec + b_dec (+ x W_skip)           W_dec: [m, d_out]  b_dec: [d_out]  W_skip: [d_in, d_out]

``act`` is one of
- ``relu``: ReLU(pre) (the paper; sparsity from an L1 penalty);
- ``topk``: the k largest pre-activations of each token, then ReLU (what tc, SAELens and sparsify train);
- ``signed_topk``: the k largest pre-activations of each token as they are, negative ones included
  (circuit-tracer's and Peek's TopK). The two differ only on a token with fewer than k positive
  pre-activations; tc reads those formats' TopK as this kind, so that they are used exactly as trained;
- ``batchtopk``: during training the k x batch largest entries of the batch (training/step_math.py); at inference
  ``pre * (pre > threshold)`` with the threshold estimated during training (Bussmann et al. 2024);
- ``jumprelu``: ``pre * (pre > threshold_i)``, a threshold per feature (Gemma Scope).
``threshold`` [m] exists for the two threshold kinds (batchtopk stores its one threshold in every entry).

A skip transcoder (``skip=True``, Paulo, Shabalin, Belrose 2025) adds the linear term ``x W_skip`` of its
input; ``x`` is the input itself, before ``b_pre`` is subtracted.

Where a transcoder reads and writes (``input_space``, ``output_space``) is part of its identity: it is valid
only for the activations it was trained on (docs/method.md section 8). An SAE is the same module with input and
target the same activation. Pure math: no file I/O here (see tccli.transcoders.files).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from tccli.config.transcoders import THRESHOLD_ACTIVATIONS, TranscoderConfig


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
