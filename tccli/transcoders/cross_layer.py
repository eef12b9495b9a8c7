"""The cross-layer transcoder (CLT; docs/method.md section 11): one dictionary for the whole model.

For each layer ``l`` of ``config.layers`` (index ``j``):

    pre_l  = (x_l - b_pre^l) W_enc^l + b_enc^l           W_enc^l: [d_in, m]  b_enc^l: [m]  b_pre^l: [d_in]
    z_l    = act(pre_l)
    yhat_t = sum over source layers s <= t of z_s W_dec^(s -> t) + b_dec^t  (+ x_t W_skip^t)

``W_dec^s`` is stored as one tensor [m, n_later, d_out] per source layer, whose entry ``[:, t - j, :]`` is
the decoder from layer ``s`` (index ``j``) to the layer of index ``t`` (circuit-tracer's layout). A
per-layer transcoder set is the special case where only the ``[:, 0, :]`` entries are non-zero
(``from_transcoders`` builds it, for the exactness tests).

``act`` is relu, jumprelu (``pre * (pre > threshold)``), topk (the k largest pre-activations of each layer
at each token, then ReLU: per layer, so a feature's activity never depends on later layers) or batchtopk
(trained across every layer's features of a batch, run as per-feature thresholds like jumprelu).

Code that sees one layer at a time (the encoder, checks of spaces and hooks) uses ``layer_transcoder(l)``:
a ``Transcoder`` sharing this CLT's encoder tensors, whose decoder is the own-layer block ``W_dec^(l -> l)``.
Pure math: no file I/O here (see tccli.transcoders.files).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from tccli.config.transcoders import THRESHOLD_ACTIVATIONS, CrossLayerConfig
from tccli.errors import fail
from tccli.transcoders.transcoder import Transcoder


class CrossLayerTranscoder(nn.Module):
    def __init__(self, config: CrossLayerConfig):
        super().__init__()
        config.validate()
        self.config = config
        d_in, d_out, m, n = config.d_in, config.d_out, config.n_features, len(config.layers)
        keys = [str(layer) for layer in config.layers]

        def per_layer(shape_of) -> nn.ParameterDict:
            return nn.ParameterDict({key: nn.Parameter(torch.zeros(*shape_of(j))) for j, key in enumerate(keys)})

        self.W_enc = per_layer(lambda j: (d_in, m))
        self.b_enc = per_layer(lambda j: (m,))
        self.b_pre = per_layer(lambda j: (d_in,))
        self.W_dec = per_layer(lambda j: (m, n - j, d_out))
        self.b_dec = per_layer(lambda j: (d_out,))
        # Optional tensors exist exactly when the config says so (saved and loaded by name).
        self.threshold = per_layer(lambda j: (m,)) if config.activation in THRESHOLD_ACTIVATIONS else None
        self.W_skip = per_layer(lambda j: (d_in, d_out)) if config.skip else None

    # ------------------------------------------------------------------ shape

    @property
    def layers(self) -> list[int]:
        return list(self.config.layers)

    @property
    def n_features(self) -> int:
        """Features per layer."""
        return self.config.n_features

    def tensor_names(self) -> tuple[str, ...]:
        """The names of every tensor this CLT holds (``W_enc.3``, ``W_dec.3``, ...: its file's contents)."""
        return tuple(name for name, _ in self.named_parameters())

    def _index(self, layer: int) -> int:
        if layer not in self.config.layers:
            raise fail(f"the cross-layer transcoder has no layer {layer} (has layers {self.config.layers})")
        return self.config.layers.index(layer)

    # ------------------------------------------------------------------ encoder (one layer at a time)

    def pre_activation(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations [..., m] of layer ``layer``'s features from that layer's input ``x``."""
        key = str(layer)
        self._index(layer)
        return (x - self.b_pre[key]) @ self.W_enc[key] + self.b_enc[key]

    def activate(self, layer: int, pre: torch.Tensor) -> torch.Tensor:
        """Activations from pre-activations (inference rule; BatchTopK's batch rule lives in training)."""
        activation = self.config.activation
        if activation == "relu":
            return torch.relu(pre)
        if activation == "topk":
            k = min(int(self.config.k), pre.shape[-1])
            top = pre.topk(k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return pre * (pre > self.threshold[str(layer)])

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Feature activations z [..., m] of layer ``layer``."""
        return self.activate(layer, self.pre_activation(layer, x))

    # ------------------------------------------------------------------ decoders

    def decoder(self, source: int, target: int) -> torch.Tensor:
        """[m, d_out]: the decoder block W_dec^(source -> target) (zeros never stored: target >= source)."""
        j, t = self._index(source), self._index(target)
        if t < j:
            raise fail(f"layer {source}'s features write only to layers {self.config.layers[j:]}, not {target}")
        return self.W_dec[str(source)][:, t - j, :]

    def decoder_rows(self, source: int, features: torch.Tensor) -> torch.Tensor:
        """[len(features), n_later, d_out]: the decoders of the given features of layer ``source`` to
        ``source`` and every later layer. A reader that keeps decoders on disk overrides this, so that tracing
        touches only the rows of active features."""
        return self.W_dec[str(source)][features]

    def targets_of(self, source: int) -> list[int]:
        """The layers a feature of layer ``source`` writes to: ``source`` and every later layer."""
        return self.config.layers[self._index(source) :]

    def decode(self, activations: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """{layer: z [..., m]} -> {target layer: the features' part of its output + b_dec} for every target
        layer at or after the first given layer (a layer with no given activations contributes nothing)."""
        if not activations:
            return {}
        first = self._index(min(activations))
        out: dict[int, torch.Tensor] = {}
        for source, z in sorted(activations.items()):
            j = self._index(source)
            # one product per decoder block, not one fused product: a CLT whose blocks to later layers are
            # zero then computes exactly what the per-layer set computes (same kernel, same sums)
            for offset, target in enumerate(self.config.layers[j:]):
                write = z @ self.W_dec[str(source)][:, offset, :]
                out[target] = write if target not in out else out[target] + write
        for target in self.config.layers[first:]:
            bias = self.b_dec[str(target)]
            out[target] = (
                out[target] + bias if target in out else bias.expand(*next(iter(activations.values())).shape[:-1], -1)
            )
        return out

    def skip_term(self, layer: int, x: torch.Tensor) -> Optional[torch.Tensor]:
        """x_l W_skip^l, or None without skip connections."""
        return None if self.W_skip is None else x @ self.W_skip[str(layer)]

    def forward(self, inputs: dict[int, torch.Tensor]) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """{layer: x_l} for every layer -> ({layer: yhat_l}, {layer: z_l}), each output reading the given
        (clean) inputs of its own and earlier layers."""
        activations = {layer: self.encode(layer, x) for layer, x in inputs.items()}
        outputs = self.decode(activations)
        if self.W_skip is not None:
            outputs = {layer: y + self.skip_term(layer, inputs[layer]) for layer, y in outputs.items()}
        return outputs, activations

    # ------------------------------------------------------------------ per-layer views

    def layer_transcoder(self, layer: int) -> Transcoder:
        """Layer ``layer`` as a ``Transcoder``: this CLT's encoder tensors (shared, not copied), the own-layer
        decoder W_dec^(l -> l), b_dec^l and W_skip^l. Its ``decode`` is only the own-layer part of the output:
        code that reconstructs MLP outputs must use ``decode`` of the whole CLT."""
        self._index(layer)
        key = str(layer)
        view = Transcoder(self.config.layer_config(layer))
        view.W_enc, view.b_enc, view.b_pre, view.b_dec = (
            self.W_enc[key],
            self.b_enc[key],
            self.b_pre[key],
            self.b_dec[key],
        )
        view.W_dec = nn.Parameter(self.decoder(layer, layer), requires_grad=False)
        if self.threshold is not None:
            view.threshold = self.threshold[key]
        if self.W_skip is not None:
            view.W_skip = self.W_skip[key]
        return view

    @classmethod
    def from_transcoders(cls, transcoders: dict[int, Transcoder]) -> CrossLayerTranscoder:
        """The CLT equal to a per-layer set: the same encoders and own-layer decoders, zero decoders to later
        layers. Every transcoder must have the same width, activation, k, skip and spaces."""
        layers = sorted(transcoders)
        first = transcoders[layers[0]].config
        shared = ("d_in", "d_out", "n_features", "activation", "k", "skip", "input_space", "output_space")
        for layer in layers:
            c = transcoders[layer].config
            if any(getattr(c, name) != getattr(first, name) for name in shared):
                raise fail(f"layer {layer}'s transcoder differs in shape or kind from layer {layers[0]}'s: not one CLT")
        config = CrossLayerConfig(
            d_in=first.d_in,
            d_out=first.d_out,
            n_features=first.n_features,
            layers=layers,
            activation=first.activation,
            k=first.k,
            skip=first.skip,
            input_space=first.input_space,
            output_space=first.output_space,
            model_name=first.model_name,
            model_architecture=first.model_architecture,
            weight_processing=dict(first.weight_processing),
            input_hooks=[transcoders[layer].config.input_hook for layer in layers],
            output_hooks=[transcoders[layer].config.output_hook for layer in layers],
        )
        clt = cls(config)
        with torch.no_grad():
            for layer in layers:
                t, key = transcoders[layer], str(layer)
                clt.W_enc[key].copy_(t.W_enc)
                clt.b_enc[key].copy_(t.b_enc)
                clt.b_pre[key].copy_(t.b_pre)
                clt.W_dec[key][:, 0, :].copy_(t.W_dec)
                clt.b_dec[key].copy_(t.b_dec)
                if clt.threshold is not None:
                    clt.threshold[key].copy_(t.threshold)
                if clt.W_skip is not None:
                    clt.W_skip[key].copy_(t.W_skip)
        return clt
