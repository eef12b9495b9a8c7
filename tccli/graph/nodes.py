"""The nodes of a whole attribution graph (docs/method.md section 9): the node table, the active features it
is built from, and circuit-tracer's salient logit targets. Pure math: tensors in, a node table out.

**Nodes**, in circuit-tracer's order: every active transcoder feature (ordered by layer, token,
feature), one error node per (layer, token) (layer-major), one input node per token (its token
embedding plus, for learned positions, its position embedding: everything the residual stream starts
with), then the targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tccli.replacement.frozen import FrozenForward

# node kinds, in layout order
FEATURE, ERROR, EMBED, TARGET = "feature", "error", "embed", "target"


@dataclass
class NodeTable:
    """The graph's nodes: features, then errors (layer-major), then inputs (one per token), then targets."""

    n_layers: int
    n_tokens: int
    feature_layer: torch.Tensor  # [F] int64
    feature_position: torch.Tensor  # [F] int64
    feature_index: torch.Tensor  # [F] int64 (index within its transcoder)
    feature_activation: torch.Tensor  # [F]
    target_weight: torch.Tensor  # [K] (logit probabilities; 1 for a single target)

    @property
    def n_features(self) -> int:
        return int(self.feature_layer.shape[0])

    @property
    def n_targets(self) -> int:
        return int(self.target_weight.shape[0])

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def embed_start(self) -> int:
        return self.n_features + self.n_layers * self.n_tokens

    @property
    def target_start(self) -> int:
        return self.embed_start + self.n_tokens

    @property
    def n_nodes(self) -> int:
        return self.target_start + self.n_targets

    def error_node(self, layer: int, position: int) -> int:
        return self.error_start + layer * self.n_tokens + position

    def embed_node(self, position: int) -> int:
        return self.embed_start + position

    def target_node(self, k: int) -> int:
        return self.target_start + k

    def kind(self, node: int) -> str:
        if node < self.error_start:
            return FEATURE
        if node < self.embed_start:
            return ERROR
        return EMBED if node < self.target_start else TARGET

    def weights(self) -> torch.Tensor:
        """[N]: the target weights at the targets' nodes, 0 elsewhere (circuit-tracer's logit_weights)."""
        out = torch.zeros(self.n_nodes, dtype=self.target_weight.dtype, device=self.target_weight.device)
        out[self.target_start :] = self.target_weight
        return out

    def select_features(self, keep: torch.Tensor) -> NodeTable:
        """The same table with only the features ``keep`` (sorted indices into this table's features)."""
        return NodeTable(
            n_layers=self.n_layers,
            n_tokens=self.n_tokens,
            feature_layer=self.feature_layer[keep],
            feature_position=self.feature_position[keep],
            feature_index=self.feature_index[keep],
            feature_activation=self.feature_activation[keep],
            target_weight=self.target_weight,
        )


def active_features(frozen: FrozenForward) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(layer, position, feature, activation) of every nonzero activation, ordered by layer, token, feature."""
    parts = []
    for layer, frozen_layer in enumerate(frozen.layers):
        if frozen_layer.transcoder is None:
            continue
        position, feature = torch.nonzero(frozen_layer.z, as_tuple=True)  # row-major: token, then feature
        parts.append((torch.full_like(position, layer), position, feature, frozen_layer.z[position, feature]))
    if not parts:
        empty = torch.zeros(0, dtype=torch.long, device=frozen.embed.device)
        return empty, empty, empty, torch.zeros(0, dtype=frozen.embed.dtype, device=frozen.embed.device)
    return tuple(torch.cat(column) for column in zip(*parts))  # type: ignore[return-value]


def node_table(frozen: FrozenForward, target_weight: torch.Tensor) -> NodeTable:
    layer, position, feature, activation = active_features(frozen)
    return NodeTable(
        n_layers=frozen.n_layers,
        n_tokens=frozen.n_tokens,
        feature_layer=layer,
        feature_position=position,
        feature_index=feature,
        feature_activation=activation,
        target_weight=target_weight.to(frozen.embed.dtype),
    )


# ----------------------------------------------------------------------------- targets
