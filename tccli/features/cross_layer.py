"""Feature scores of a cross-layer transcoder (docs/method.md sections 4 and 11).

What reads the model (density, top and quantile examples, de-embeddings, context-free scores) sees one layer
at a time: a CLT layer's features are scored from its own encoder on that layer's input, through
``CrossLayerTranscoder.layer_transcoder`` (a per-layer ``Transcoder`` view sharing the CLT's encoder), exactly
as a per-layer set's layer is. What reads the decoders differs: a CLT feature ``(l, i)`` writes
``W_dec^(l -> l')_i`` into the MLP output of every layer ``l' >= l``, so

- its logit effect is the sum over every ``l' >= l`` of those writes as they enter the residual stream
  (each through layer ``l'``'s output map, as ``LayerReads`` moves a per-layer decoder), times W_U;
- as an earlier feature in a pullback seen from a feature reading at layer ``r``, its decoder is the sum
  over ``l <= l' < r`` of those writes (what reaches layer ``r``'s input along the direct path).

The sums start from the own-layer write and add the later ones in layer order, so a CLT whose decoders to
later layers are zero gives exactly (bit for bit) the per-layer set's scores. Each feature's decoder norms
per target layer (``||W_dec^(l -> l')_i||``, as stored) are kept for `tc show`.

``LayerViews`` is what `tc score`, `tc deembed` and the scoring pass take for a CLT: a dict {layer: view}
like a per-layer set's, remembering the CLT it came from.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import numpy as np
import torch

from tccli.features.weight_scores import LayerReads
from tccli.transcoders.cross_layer import CrossLayerTranscoder

# How circuit-tracer's graph files (its frontend/graph_models.py, Node.feature_node) and Neuronpedia's
# viewer name a transcoder feature node's type: tc's feature files of a CLT carry it too.
CLT_FEATURE_TYPE = "cross layer transcoder"


class LayerViews(dict):
    """{layer: per-layer ``Transcoder`` view} of a cross-layer transcoder, for the layers being scored;
    ``clt`` is the whole CLT (its decoders reach every later layer, scored or not)."""

    def __init__(self, clt: CrossLayerTranscoder, layers: Optional[list[int]] = None):
        super().__init__({layer: clt.layer_transcoder(layer) for layer in (layers or clt.layers)})
        self.clt = clt


def cross_layer_of(transcoders) -> Optional[CrossLayerTranscoder]:
    """The CLT behind ``transcoders`` (a ``LayerViews``), or None for a per-layer set."""
    return getattr(transcoders, "clt", None)


def as_layer_dict(transcoders) -> dict:
    """A per-layer set as it is, a CrossLayerTranscoder as the ``LayerViews`` of all its layers."""
    return LayerViews(transcoders) if isinstance(transcoders, CrossLayerTranscoder) else transcoders


def load_checked_for_scoring(path: str, loaded, layers: Optional[str] = None) -> dict:
    """``tccli.transcoders.formats.load_checked_transcoders`` for the feature commands, which also read a
    CLT (as its ``LayerViews``): the transcoders at ``path`` on ``loaded``'s device, only those of ``layers``
    (e.g. "0,2-3") when given, each refused unless it was made for this model."""
    from tccli.config.fields import parse_layers
    from tccli.transcoders.files import check_matches_model, check_model_named
    from tccli.transcoders.formats import load_transcoders

    chosen = parse_layers(layers, loaded.info.n_layers) if layers else None
    transcoders = load_transcoders(path, loaded.device, chosen)
    if isinstance(transcoders, CrossLayerTranscoder):
        transcoders = LayerViews(transcoders.eval(), chosen)
    for transcoder in transcoders.values():
        check_matches_model(transcoder, loaded.info)
        check_model_named(transcoder, loaded)
        transcoder.eval()
    return transcoders


# ----------------------------------------------------------------------------- decoders seen from the residual


def _residual_write(clt: CrossLayerTranscoder, source: int, target: int, spaces) -> torch.Tensor:
    """[m, d]: W_dec^(source -> target) as it enters the residual stream after MLP ``target`` (``spaces``: the
    model's per-layer LayerSpaces, or None), moved exactly as ``LayerReads.of`` moves a per-layer decoder."""
    from tccli.model.spaces import LayerSpaces, output_map

    layer_spaces = (spaces[target] if spaces else None) or LayerSpaces(layernorm=False)
    layer_spaces = layer_spaces.to("cpu", torch.float32)
    block = clt.decoder(source, target).detach().float().cpu()
    return output_map(clt.config.output_space, layer_spaces, None).push(block)


def logit_decoders(clt: CrossLayerTranscoder, source: int, own: torch.Tensor, spaces) -> torch.Tensor:
    """[m, d]: each feature of layer ``source``'s decoder summed over every layer it writes to, as it enters
    the residual stream; ``own`` is the own-layer write (``LayerReads.decoders`` of the layer's view)."""
    total = own
    for target in clt.targets_of(source)[1:]:
        total = total + _residual_write(clt, source, target, spaces)
    return total


class PullbackDecoders:
    """The earlier features' decoders each scored layer's pullbacks read: for a reader at layer ``r`` and a
    scored source layer ``s < r``, the sum of ``s``'s writes to layers ``s .. r-1``. ``at(r)`` is called with
    increasing ``r``; each decoder block is moved to the residual once."""

    def __init__(self, clt: CrossLayerTranscoder, reads: dict[int, LayerReads], spaces):
        self.clt, self.spaces = clt, spaces
        self.sums = {layer: reads[layer].decoders for layer in reads}  # writes to targets < reached[layer]
        self.reached = {layer: layer + 1 for layer in reads}  # own-layer write already in

    def at(self, reader: int) -> dict[int, torch.Tensor]:
        out = {}
        for source in sorted(self.sums):
            if source >= reader:
                continue
            for target in self.clt.targets_of(source):
                if self.reached[source] <= target < reader:
                    self.sums[source] = self.sums[source] + _residual_write(self.clt, source, target, self.spaces)
            self.reached[source] = max(self.reached[source], reader)
            out[source] = self.sums[source]
        return out


def decoder_norms(clt: CrossLayerTranscoder, source: int) -> tuple[np.ndarray, np.ndarray]:
    """(target layers [n], norms [m, n] float32): ||W_dec^(source -> target)_i|| for each feature ``i`` of
    layer ``source`` and each layer it writes to, as stored."""
    targets = clt.targets_of(source)
    norms = torch.stack([clt.decoder(source, t).detach().float().cpu().norm(dim=1) for t in targets], dim=1)
    return np.array(targets, dtype=np.int64), norms.numpy().astype(np.float32)


def cross_layer_reads(
    clt: CrossLayerTranscoder, reads: dict[int, LayerReads], spaces
) -> tuple[dict[int, LayerReads], PullbackDecoders]:
    """(each scored layer's reads with its decoders summed over every layer it writes to, for the logit
    effect; the pullbacks' earlier decoders) from the per-layer views' ``reads``."""
    summed = {
        layer: replace(read, decoders=logit_decoders(clt, layer, read.decoders, spaces))
        for layer, read in reads.items()
    }
    return summed, PullbackDecoders(clt, reads, spaces)


def with_decoder_norms(scores, clt: CrossLayerTranscoder):
    """LayerScores with the CLT's per-target decoder norms of its layer added."""
    targets, norms = decoder_norms(clt, scores.layer)
    return replace(scores, decoder_targets=targets, decoder_norms=norms)
