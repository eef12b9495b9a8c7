"""De-embeddings (`tc deembed`): which tokens, alone, drive a feature along the direct path from the
embedding (W_E f_enc), optionally through one head's OV circuit."""

from __future__ import annotations

from typing import Optional

import torch

from tccli.config.circuit import DeembedConfig
from tccli.data.text import display_token
from tccli.errors import fail
from tccli.features.cross_layer import as_layer_dict
from tccli.model.loading import LoadedModel
from tccli.model.spaces import LayerSpaces, input_map
from tccli.nodes import parse_feature, parse_head
from tccli.transcoders.cross_layer import CrossLayerTranscoder
from tccli.transcoders.files import check_feature, check_transcoders
from tccli.transcoders.transcoder import Transcoder


def deembedding(
    W_E: torch.Tensor,
    encoder: torch.Tensor,
    layernorm: bool,
    W_V: Optional[torch.Tensor] = None,
    W_O: Optional[torch.Tensor] = None,
    attn_post_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Scores [vocab]: each token's embedding dotted with the feature's encoder vector as read from the
    residual (centred for LayerNorm, whose mean-centring the direct path goes through), optionally through
    an OV circuit W_V [d, dh] W_O [dh, d] (and Gemma-2's post-attention norm weight). Normalisation scales
    are left out: they are per-token positive factors."""
    vector = encoder - encoder.mean() if layernorm else encoder
    if W_V is not None:
        if attn_post_weight is not None:
            vector = vector * attn_post_weight
        vector = W_V @ (W_O @ vector)
        if layernorm:
            vector = vector - vector.mean()
    return W_E @ vector


def feature_deembedding(
    loaded: LoadedModel, transcoder: Transcoder, layer: int, feature: int, head: Optional[tuple[int, int]] = None
) -> torch.Tensor:
    """Scores [vocab] of feature ``feature`` of ``layer``'s transcoder: its encoder vector read back from the
    transcoder's input space to the residual (``spaces.input_map``), dotted with each token's embedding as it
    enters the residual, optionally through head ``(layer, head)``'s OV circuit."""
    bridge, info = loaded.bridge, loaded.info
    W_V = W_O = post = None
    with torch.no_grad():
        W_E = bridge.W_E.detach() * info.embed_scale  # as the embedding enters the residual
        if head is not None:
            head_layer, index = head
            kv = index // (info.n_heads // info.n_kv_heads)
            W_V = bridge.W_V[head_layer, kv].detach().to(W_E.dtype)
            W_O = bridge.W_O[head_layer, index].detach().to(W_E.dtype)
            if loaded.spaces and loaded.spaces[head_layer].attn_post_weight is not None:
                post = loaded.spaces[head_layer].attn_post_weight.to(W_E.device, W_E.dtype)
        spaces = loaded.spaces[layer] if loaded.spaces else LayerSpaces(layernorm=False)
        spaces = spaces.to(W_E.device, W_E.dtype)
        read, _ = input_map(transcoder.config.input_space, spaces, None)  # the input space's read map, unscaled
        encoder = read.pull(transcoder.W_enc[:, feature].to(W_E.dtype).unsqueeze(0))[0]
        return deembedding(W_E, encoder, info.normalization == "layernorm", W_V, W_O, post)


def deembed_rows(
    loaded: LoadedModel, transcoders: dict[int, Transcoder] | CrossLayerTranscoder, config: DeembedConfig
) -> list[tuple]:
    """[(score, token id, token string)] best first. A cross-layer transcoder's feature is de-embedded from
    its layer's encoder, as a per-layer transcoder's is (the encoder side does not see where it writes)."""
    transcoders = as_layer_dict(transcoders)
    check_transcoders(transcoders, loaded)
    layer, feature = parse_feature(config.feature)
    transcoder = check_feature(transcoders, layer, feature)
    head = None
    if config.head is not None:
        head_layer, index = parse_head(config.head)
        info = loaded.info
        if not 0 <= index < info.n_heads:
            raise fail(f"head {index} is out of range: the model has {info.n_heads} heads per layer")
        visible = head_layer < layer or (head_layer == layer and not info.parallel_attn_mlp)
        if not visible:
            raise fail(f"head L{head_layer}.H{index} is not upstream of layer {layer}'s MLP")
        head = (head_layer, index)
    scores = feature_deembedding(loaded, transcoder, layer, feature, head)
    top = scores.topk(min(config.top, scores.shape[0]))
    return [(float(s), int(i), display_token(loaded.tokenizer, int(i))) for s, i in zip(top.values, top.indices)]
