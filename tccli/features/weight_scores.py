"""Input-invariant feature scores, from the weights alone (docs/method.md sections 4 and 8): how a layer's transcoder
meets the residual stream (LayerReads), de-embeddings (top tokens of W_E f_enc), logit effects (f_dec W_U),
pullbacks (W_dec^(l) f_enc^(l')) and the context-free score of a feature's top examples. Pure math."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def top_entries(scores: torch.Tensor, n: int, largest: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top n of [m, N] scores -> (indices [m, n] int64, values [m, n] float32)."""
    n = min(n, scores.shape[1])
    top = scores.topk(n, dim=1, largest=largest)
    return top.indices.cpu().numpy().astype(np.int64), top.values.float().cpu().numpy()


def embedding_for_norm(W_E: torch.Tensor, normalization: str) -> torch.Tensor:
    """The token embeddings as the normalisation sees them: LayerNorm removes each row's mean."""
    W_E = W_E.float()
    return W_E - W_E.mean(dim=1, keepdim=True) if normalization == "layernorm" else W_E


def deembedding_matrix(W_E: torch.Tensor, encoder_vectors: torch.Tensor) -> torch.Tensor:
    """[m, vocab]: W_E f_enc for every feature (how much each token alone drives it, direct path)."""
    return encoder_vectors.float() @ W_E.float().T


def logit_effect(decoder_vectors: torch.Tensor, W_U: torch.Tensor) -> torch.Tensor:
    """[m, vocab]: f_dec W_U for every feature (which next tokens it promotes, suppresses)."""
    return decoder_vectors.float() @ W_U.float()


def pullbacks(
    earlier_decoders: dict[int, torch.Tensor], encoder_vectors: torch.Tensor, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top n earlier-layer features by W_dec^(l) f_enc^(l') for each feature of layer l'.

    earlier_decoders: {layer l: [m_l, d]} for l < l'. Returns (layer, feature, value) arrays [m, n],
    layer -1 where there are fewer than n candidates.
    """
    m = encoder_vectors.shape[0]
    if not earlier_decoders:
        return (np.full((m, 0), -1, np.int64), np.full((m, 0), -1, np.int64), np.zeros((m, 0), np.float32))
    layers = sorted(earlier_decoders)
    sizes = [earlier_decoders[layer].shape[0] for layer in layers]
    stacked = torch.cat([earlier_decoders[layer].float() for layer in layers])  # [sum m_l, d]
    index, value = top_entries(encoder_vectors.float() @ stacked.T, n)
    offsets = np.cumsum([0] + sizes)
    which = np.searchsorted(offsets, index, side="right") - 1
    return np.array(layers)[which], index - offsets[which], value


def context_free_scores(direct_pre: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """Share of a feature's activation on its top examples that the token's own embedding explains.

    direct_pre [m, k]: the pre-activation the feature would have if the normalised residual held only
    the example token's own embedding, divided by the real normalisation scale at that token,
    ``(W_E[t]/s - b_pre) . f_enc + b_enc``; activations [m, k] (0 for empty slots).
    Score = sum_e min(ReLU(direct_e), a_e) / sum_e a_e, in [0, 1]; NaN for a feature with no examples.
    """
    explained = torch.minimum(direct_pre.clamp(min=0), activations).sum(1)
    total = activations.sum(1)
    return torch.where(total > 0, explained / total.clamp(min=1e-30), torch.full_like(total, float("nan")))


@dataclass
class LayerReads:
    """How one layer's transcoder meets the residual stream, per-token scales left out (docs/method.md section 8):
    its encoder vectors as read from the residual [m, d], its decoder vectors as written to it [m, d], the
    constant its input space adds to every pre-activation [m] (b_enc - b_pre . f_enc, + beta . f_enc when it
    reads mlp_input), and whether its input is divided by the norm's scale (not for resid_mid)."""

    encoders: torch.Tensor
    decoders: torch.Tensor
    constant: torch.Tensor
    scaled: bool

    @classmethod
    def of(cls, transcoder, spaces) -> LayerReads:
        from tccli.model.spaces import LayerSpaces, input_map, output_map

        spaces = spaces or LayerSpaces(layernorm=False)
        config = transcoder.config
        f_enc = transcoder.encoder_vectors.detach().float().cpu()
        spaces = spaces.to("cpu", torch.float32)
        read, norm_bias = input_map(config.input_space, spaces, None)
        constant = transcoder.b_enc.detach().float().cpu() - f_enc @ transcoder.b_pre.detach().float().cpu()
        if norm_bias is not None:
            constant = constant + f_enc @ norm_bias
        decoders = output_map(config.output_space, spaces, None).push(transcoder.decoder_vectors.detach().float().cpu())
        return cls(
            encoders=read.pull(f_enc), decoders=decoders, constant=constant, scaled=config.input_space != "resid_mid"
        )
