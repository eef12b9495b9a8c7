"""The frozen forward pass: the original model's forward pass on one prompt with attention patterns and
normalisation scales held (docs/method.md sections 5 and 8). Pure math.

``freeze`` turns one captured run into a ``FrozenForward``: per layer the attention patterns, values and
output weights, the norm scales, the MLP's real input and output split into the transcoder's part and
an error term. Its methods move vectors through the maps a target or a row of attributions needs
(attention backward and forward, a transcoder's input and output spaces, Gemma-2's post-norms, the skip
path), so every consumer (tccli.replacement.attribution, tccli.graph) moves them the same way.

**Cross-layer transcoders** (docs/method.md section 11). ``freeze`` takes a per-layer set or a
``CrossLayerTranscoder``; every consumer sees one structure for both: a feature of layer l writes to the MLP
outputs of the layers in ``FrozenLayer.decoder_blocks`` (layer l itself first; for a CLT also every later
layer its active features' decoder rows to are not all zero), and the error term of layer l' is the MLP's
output minus everything written to it (``yhat_l'`` of section 11). A per-layer set has only the own-layer
block, so it runs exactly the code it always ran; a CLT whose blocks to later layers are zero has no other
block either, so it gives bit-for-bit the same results."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from tccli.model.spaces import LayerSpaces, NormMap, input_map, output_map, transcoder_input
from tccli.replacement.model import layer_views
from tccli.transcoders.cross_layer import CrossLayerTranscoder
from tccli.transcoders.transcoder import Transcoder


@dataclass
class FrozenLayer:
    """One block's frozen quantities on the prompt (T tokens)."""

    resid_pre: torch.Tensor  # [T, d]
    attn_scale: torch.Tensor  # [T] ln1 scale
    pattern: torch.Tensor  # [H, T(dest), T(src)]
    values: torch.Tensor  # [T, H, d_head]: x_norm1 @ W_V[kv(h)] + b_V[kv(h)], per query head
    W_V: torch.Tensor  # [H, d, d_head], the kv head of each query head (GQA expanded)
    W_O: torch.Tensor  # [H, d_head, d]
    b_O: torch.Tensor  # [d]
    attn_out: torch.Tensor  # [T, d] what attention adds to the residual (after Gemma-2's post-norm)
    mlp_scale: torch.Tensor  # [T] ln2 scale
    mlp_in: torch.Tensor  # [T, d] compatibility mode's ln2.hook_normalized
    mlp_out: torch.Tensor  # [T, d] what the MLP adds to the residual (after Gemma-2's post-norm)
    transcoder: Optional[Transcoder]  # None: this layer's MLP is not replaced (all of it is "error")
    z: Optional[torch.Tensor]  # [T, m] feature activations on the real MLP input
    pre: Optional[torch.Tensor]  # [T, m] feature pre-activations
    error: torch.Tensor  # [T, d] mlp_out - the transcoder's output as written to the residual
    # Features active at some token of the prompt (all others are exactly 0 everywhere), with their
    # activations and decoder rows gathered once, so the search's matmuls are over these only.
    active: Optional[torch.Tensor] = None  # [k] feature indices
    z_active: Optional[torch.Tensor] = None  # [T, k]
    decoder_active: Optional[torch.Tensor] = None  # [k, d] the decoder rows to this layer's own MLP output
    # {target layer: [k, d] the active features' decoder rows to that layer's MLP output}: this layer itself
    # (decoder_active) first, then, for a cross-layer transcoder, every later layer with a non-zero block
    decoder_blocks: dict[int, torch.Tensor] = field(default_factory=dict)
    b_V: Optional[torch.Tensor] = None  # [H, d_head] value bias per query head (None: no value bias)
    # Spaces (tccli.model.spaces): the unprocessed norm weights, the input the transcoder reads in its own space,
    # its skip term, and Gemma-2's post-norm scales. None where the layer has nothing of the kind.
    spaces: Optional[LayerSpaces] = None
    transcoder_input: Optional[torch.Tensor] = None  # [T, d_in] (None: mlp_in, the normalized space)
    skip_out: Optional[torch.Tensor] = None  # [T, d_out] x W_skip, in the transcoder's output space
    attn_post_scale: Optional[torch.Tensor] = None  # [T] Gemma-2's post-attention norm scale
    mlp_post_scale: Optional[torch.Tensor] = None  # [T] Gemma-2's post-MLP norm scale

    @property
    def n_heads(self) -> int:
        return self.pattern.shape[0]

    @property
    def input_space(self) -> str:
        return "normalized" if self.transcoder is None else self.transcoder.config.input_space

    @property
    def output_space(self) -> str:
        return "mlp_out" if self.transcoder is None else self.transcoder.config.output_space


@dataclass
class FrozenForward:
    """The whole prompt's frozen forward pass plus the weights attribution needs.

    The linear maps of docs/method.md section 8 are methods here (``read_mlp_input``, ``write_mlp_output``,
    ``read_mlp_output``, ``read_attn_output``, ``write_attn_output``, ``read_skip``), so every consumer
    (the greedy search, attribution graphs, interventions) moves vectors through norms and spaces the same way.
    """

    tokens: torch.Tensor  # [T] int64
    embed: torch.Tensor  # [T, d] token embedding as it enters the residual (hook_embed; Gemma: scaled)
    pos_embed: Optional[torch.Tensor]  # [T, d] learned positions, None for rotary models
    layers: list[FrozenLayer]
    final_resid: torch.Tensor  # [T, d] residual after the last block
    final_scale: torch.Tensor  # [T]
    final_normalized: torch.Tensor  # [T, d]
    W_U: torch.Tensor  # [d, vocab]
    b_U: torch.Tensor  # [vocab]
    layernorm: bool  # True: LayerNorm (centre vectors); False: RMSNorm
    parallel: bool  # attention and MLP of a block both read resid_pre
    final_logit_softcap: Optional[float] = None  # logits are capped after the unembedding: targets are raw
    cross_layer: Optional[CrossLayerTranscoder] = None  # the CLT frozen here (None: a per-layer set)
    _cache: dict = field(default_factory=dict, repr=False)  # weights folded once per prompt (linear maps below)

    def __post_init__(self) -> None:
        # a FrozenForward built by hand (tests' worked examples) names z and the transcoder only: every feature
        # then counts as active, and it writes to its own layer
        for index, layer in enumerate(self.layers):
            if layer.transcoder is None or layer.z is None:
                continue
            if layer.active is None:
                layer.active = torch.arange(layer.z.shape[1], device=layer.z.device)
                layer.z_active, layer.decoder_active = layer.z, layer.transcoder.W_dec.to(layer.z.dtype)
            if not layer.decoder_blocks:
                layer.decoder_blocks = {index: layer.decoder_active}

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def writes_into(self, target: int) -> list[tuple[int, torch.Tensor]]:
        """(source layer, [k, d] decoder rows of its active features) of every layer whose features write to
        ``target``'s MLP output: ``target`` itself first, then earlier layers (a cross-layer transcoder)."""
        own = self.layers[target]
        out = [(target, own.decoder_blocks[target])] if target in own.decoder_blocks else []
        for source in range(target):
            block = self.layers[source].decoder_blocks.get(target)
            if block is not None:
                out.append((source, block))
        return out

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def mlp_read_point(self, layer: int) -> tuple[int, int]:
        """(n_attn, n_mlp) of the residual the MLP (so its transcoder) of ``layer`` reads."""
        return (layer if self.parallel else layer + 1, layer)

    def resid_at(self, token: int, read_point: tuple[int, int]) -> torch.Tensor:
        """The raw residual at a read point (only read points that exist in the model)."""
        n_attn, n_mlp = read_point
        if n_mlp == self.n_layers:
            return self.final_resid[token]
        if n_attn == n_mlp:
            return self.layers[n_mlp].resid_pre[token]
        layer = self.layers[n_mlp]  # n_attn == n_mlp + 1: resid_mid
        return layer.resid_pre[token] + layer.attn_out[token]

    def to_raw(self, vectors: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Vectors [P, d] dotted with a normalised residual -> vectors dotted with the raw one."""
        if self.layernorm:
            vectors = vectors - vectors.mean(dim=-1, keepdim=True)
        return vectors / scales.unsqueeze(-1)

    # ------------------------------------------------------------------ linear maps of the frozen model
    # Batched over R rows and the first P tokens: a gradient [R, P, d] is "how much row r's quantity
    # changes per unit written to the residual at token p". Causal attention never moves a gradient to a
    # later token, so the first P tokens hold all of it for rows at tokens < P.

    def attention_backward(self, layer: int, grad: torch.Tensor) -> torch.Tensor:
        """[R, P, d]: the gradient at ``layer``'s attention input (the raw resid_pre) from ``grad`` at its
        output, through the frozen patterns, the OV circuits and ln1's frozen scales (the value bias is a
        constant: see attention_bias)."""
        W_O, mix, W_V = self._attention_backward_weights(layer)
        grad = self._through_attn_post_norm(layer, grad)
        R, P, d = grad.shape
        H, d_head = mix.shape[0], W_O.shape[0] // mix.shape[0]
        through_o = grad.reshape(R * P, d) @ W_O.T  # [R*P, H*dh]
        per_head = through_o.reshape(R, P, H, d_head).permute(2, 1, 0, 3).reshape(H, P, R * d_head)
        at_source = torch.bmm(mix[:, :P, :P], per_head)  # [H, source, R*dh]
        at_source = at_source.reshape(H, P, R, d_head).permute(2, 1, 0, 3).reshape(R * P, H * d_head)
        return (at_source @ W_V.T).reshape(R, P, d)

    def attention_forward(self, layer: int, writes: torch.Tensor) -> torch.Tensor:
        """[B, P, d]: what ``layer``'s attention adds to the residual at each token for writes [B, P, d] into
        its input (the raw resid_pre), with patterns and ln1's scales frozen (no biases), through Gemma-2's
        frozen post-attention norm: the adjoint of attention_backward."""
        W_O, mix, W_V = self._attention_backward_weights(layer)
        B, P, d = writes.shape
        H, d_head = mix.shape[0], W_O.shape[0] // mix.shape[0]
        values = writes.reshape(B * P, d) @ W_V  # [B*P, H*dh]
        per_head = values.reshape(B, P, H, d_head).permute(2, 1, 0, 3).reshape(H, P, B * d_head)
        at_dest = torch.bmm(mix[:, :P, :P].transpose(1, 2), per_head)  # [H, dest, B*dh]
        at_dest = at_dest.reshape(H, P, B, d_head).permute(2, 1, 0, 3).reshape(B * P, H * d_head)
        out = at_dest @ W_O  # [B*P, d]
        post = self.attn_output_map(layer)
        if not post.identity:
            out = post.push(out, torch.arange(P, device=out.device).repeat(B))
        return out.reshape(B, P, d)

    def _attention_backward_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_O [H*dh, d], mix [H, source, dest], W_V [d, H*dh]) with ln1 folded in: the pattern
        transposed and divided by the source token's scale, W_V centred over d_model for LayerNorm (the
        vector's mean-centring, as to_raw does it). Computed once per layer."""
        key = ("attention_backward", layer)
        if key not in self._cache:
            frozen_layer = self.layers[layer]
            H, d_head, d = frozen_layer.W_O.shape
            W_V = frozen_layer.W_V  # [H, d, dh]
            if self.layernorm:
                W_V = W_V - W_V.mean(dim=1, keepdim=True)
            mix = frozen_layer.pattern.transpose(1, 2) / frozen_layer.attn_scale.reshape(1, -1, 1)
            self._cache[key] = (
                frozen_layer.W_O.reshape(H * d_head, d),
                mix.contiguous(),
                W_V.permute(1, 0, 2).reshape(d, H * d_head),
            )
        return self._cache[key]

    def attention_bias(self, layer: int, grad: torch.Tensor) -> torch.Tensor:
        """[R]: what ``layer``'s attention writes whatever its input, dotted with ``grad`` [R, P, d] at its
        output: b_O at every token plus each head's value bias mixed by the frozen pattern."""
        grad = self._through_attn_post_norm(layer, grad)
        R, P, d = grad.shape
        return grad.reshape(R, P * d) @ self._attention_constant(layer)[:P].reshape(P * d)

    def _through_attn_post_norm(self, layer: int, grad: torch.Tensor) -> torch.Tensor:
        """[R, P, d] gradients at the residual -> at attention's output before Gemma-2's frozen post-norm
        (read_attn_output for every token at once; unchanged without a post-norm)."""
        post = self.attn_output_map(layer)
        if post.identity:
            return grad
        P = grad.shape[1]
        positions = torch.arange(P, device=grad.device)
        return post.pull(grad.reshape(-1, grad.shape[-1]), positions.repeat(grad.shape[0])).reshape(grad.shape)

    def _attention_constant(self, layer: int) -> torch.Tensor:
        """[T, d]: attention's input-independent write at each token, b_O + sum_h sum_s A[h,t,s] b_V[h] W_O[h]
        (the pattern's rows need not sum to exactly 1)."""
        key = ("attention_constant", layer)
        if key not in self._cache:
            frozen_layer = self.layers[layer]
            constant = frozen_layer.b_O.expand(self.n_tokens, -1)
            if frozen_layer.b_V is not None:
                value_bias = torch.einsum("he,hed->hd", frozen_layer.b_V, frozen_layer.W_O)  # [H, d]
                constant = constant + frozen_layer.pattern.sum(-1).T @ value_bias
            self._cache[key] = constant.contiguous()
        return self._cache[key]

    # ------------------------------------------------------------------ docs/method.md section 8 maps

    def _layer_spaces(self, layer: int) -> LayerSpaces:
        frozen_layer = self.layers[layer]
        if frozen_layer.spaces is not None:
            return frozen_layer.spaces
        return LayerSpaces(layernorm=self.layernorm, norm_weight=None)

    def mlp_input_map(self, layer: int) -> tuple[NormMap, Optional[torch.Tensor]]:
        """(map, constant) with the transcoder's input x = map.push(r) + constant, r the raw residual its
        MLP reads (see tccli.model.spaces.input_map)."""
        frozen_layer = self.layers[layer]
        return input_map(frozen_layer.input_space, self._layer_spaces(layer), frozen_layer.mlp_scale)

    def mlp_output_map(self, layer: int) -> NormMap:
        """The map from the transcoder's output space to what enters the residual stream."""
        frozen_layer = self.layers[layer]
        return output_map(frozen_layer.output_space, self._layer_spaces(layer), frozen_layer.mlp_post_scale)

    def attn_output_map(self, layer: int) -> NormMap:
        """The map from attention's summed head outputs (+ b_O) to what enters the residual stream:
        Gemma-2's post-attention norm with its scale frozen; the identity elsewhere."""
        frozen_layer = self.layers[layer]
        spaces = self._layer_spaces(layer)
        if spaces.attn_post_weight is None:
            return NormMap()
        return NormMap(scale=frozen_layer.attn_post_scale, weight=spaces.attn_post_weight)

    def read_mlp_input(
        self, layer: int, vectors: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectors [P, d] dotted with layer ``layer``'s transcoder input at tokens ``positions`` -> (vectors
        dotted with the raw residual at its read point, constants [P] from the norm's bias)."""
        read, constant = self.mlp_input_map(layer)
        raw = read.pull(vectors, positions)
        constants = (
            vectors @ constant.to(vectors.dtype)
            if constant is not None
            else torch.zeros(vectors.shape[0], dtype=vectors.dtype, device=vectors.device)
        )
        return raw, constants

    def write_mlp_output(self, layer: int, vectors: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Vectors [P, d] in the transcoder's output space written at ``positions`` -> residual writes."""
        return self.mlp_output_map(layer).push(vectors, positions)

    def read_mlp_output(self, layer: int, vectors: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Vectors [P, d] dotted with the residual at ``positions`` -> vectors dotted with the transcoder's
        output there (the adjoint of ``write_mlp_output``)."""
        return self.mlp_output_map(layer).pull(vectors, positions)

    def write_attn_output(self, layer: int, vectors: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.attn_output_map(layer).push(vectors, positions)

    def read_attn_output(self, layer: int, vectors: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Vectors dotted with the residual -> vectors dotted with attention's output before any post-norm."""
        return self.attn_output_map(layer).pull(vectors, positions)

    def skip_backward(self, layer: int, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``read_skip`` for gradients [R, P, d] at the residual (tokens 0..P-1): (the gradient at the raw
        residual ``layer``'s MLP reads [R, P, d], each row's constant [R] from the norm's bias)."""
        R, P, d = grad.shape
        positions = torch.arange(P, device=grad.device).repeat(R)
        raw, constants = self.read_skip(layer, grad.reshape(R * P, d), positions)
        return raw.reshape(R, P, d), constants.reshape(R, P).sum(1)

    def read_skip(
        self, layer: int, vectors: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The skip path: vectors [P, d] dotted with the residual at ``positions`` -> (vectors dotted with
        the raw residual the MLP reads, constants [P]), so that v . (x W_skip written) = raw . r + constant."""
        W_skip = self.layers[layer].transcoder.W_skip.to(vectors.dtype)
        through = self.read_mlp_output(layer, vectors, positions) @ W_skip.T  # x W_skip . u = x . (W_skip u)
        return self.read_mlp_input(layer, through, positions)


def freeze(
    captured: dict[str, torch.Tensor],
    info: object,
    weights: dict,
    transcoders: dict[int, Transcoder] | CrossLayerTranscoder,
    tokens: torch.Tensor,
    spaces: Optional[list[LayerSpaces]] = None,
) -> FrozenForward:
    """Assemble a FrozenForward from one prompt's captured activations (batch dimension 1).

    transcoders: a per-layer set, or a cross-layer transcoder (each layer then holds its per-layer view for
        the encoder, and the error of each layer is its MLP output less what every layer's features write there).

    captured: hook name -> activation, for every hook of ``info`` (a models.ModelInfo) that
        ``hooks_needed`` lists.
    weights: W_V [L, n_kv, d, dh], b_V [L, n_kv, dh] or None, W_O [L, H, dh, d], b_O [L, d] or None,
        W_U [d, vocab], b_U [vocab].
    spaces: per layer, the model's tccli.model.spaces.LayerSpaces (loaded.spaces); needed for transcoders that read
        mlp_input or write mlp_output, and for models with post-norms.
    """
    clt = transcoders if isinstance(transcoders, CrossLayerTranscoder) else None
    transcoders = layer_views(transcoders)
    first = captured[info.embed_hook][0]
    # half-precision models are attributed in float32: sums of many small terms need the mantissa
    dtype, device = (torch.float32 if first.dtype in (torch.float16, torch.bfloat16) else first.dtype), first.device
    W_V, W_O = weights["W_V"].to(device, dtype), weights["W_O"].to(device, dtype)
    n_heads, n_kv = W_O.shape[1], W_V.shape[1]
    kv_of_head = torch.arange(n_heads, device=device) // (n_heads // n_kv)
    layers = []
    for layer in range(info.n_layers):
        names = info.layer(layer)
        get = lambda name: captured[name][0].to(dtype)  # noqa: E731
        x1 = get(names.attn_normalized)
        W_V_heads = W_V[layer][kv_of_head]  # [H, d, dh]
        values = torch.einsum("td,hde->the", x1, W_V_heads)
        b_V = None
        if weights.get("b_V") is not None:
            b_V = weights["b_V"][layer].to(device, dtype)[kv_of_head]
            values = values + b_V
        b_O = (
            weights["b_O"][layer].to(device, dtype)
            if weights.get("b_O") is not None
            else torch.zeros(W_O.shape[-1], device=device, dtype=dtype)
        )
        layer_spaces = spaces[layer].to(device, dtype) if spaces else None
        frozen_layer = FrozenLayer(
            resid_pre=get(names.resid_pre),
            attn_scale=get(names.attn_scale).reshape(-1),
            pattern=get(names.attn_pattern),
            values=values,
            W_V=W_V_heads,
            W_O=W_O[layer],
            b_O=b_O,
            attn_out=get(names.attn_out),
            mlp_scale=get(names.mlp_scale).reshape(-1),
            mlp_in=get(names.mlp_in),
            mlp_out=get(names.mlp_out),
            transcoder=transcoders.get(layer),
            z=None,
            pre=None,
            error=get(names.mlp_out),
            spaces=layer_spaces,
            attn_post_scale=get(names.attn_post_scale).reshape(-1) if names.attn_post_scale else None,
            mlp_post_scale=get(names.mlp_post_scale).reshape(-1) if names.mlp_post_scale else None,
            b_V=b_V,
        )
        if frozen_layer.transcoder is not None:
            later = _active_decoders(frozen_layer, get(names.mlp_norm_input), dtype, info.normalization, layer, clt)
            _split_mlp(frozen_layer, layers, dtype, info.normalization == "layernorm", later)
        layers.append(frozen_layer)
    last = info.layer(info.n_layers - 1)
    pos_embed = captured[info.pos_embed_hook][0].to(dtype) if info.pos_embed_hook else None
    return FrozenForward(
        tokens=tokens.reshape(-1).to(device),
        embed=first.to(dtype),
        pos_embed=pos_embed,
        layers=layers,
        final_resid=captured[last.resid_post][0].to(dtype),
        final_scale=captured[info.final_scale_hook][0].to(dtype).reshape(-1),
        final_normalized=captured[info.final_normalized_hook][0].to(dtype),
        W_U=weights["W_U"].to(device, dtype),
        b_U=weights["b_U"].to(device, dtype),
        layernorm=info.normalization == "layernorm",
        parallel=info.parallel_attn_mlp,
        final_logit_softcap=getattr(info, "final_logit_softcap", None),
        cross_layer=clt,
    )


def _active_decoders(
    frozen_layer: FrozenLayer,
    residual: torch.Tensor,
    dtype: torch.dtype,
    normalization: str,
    layer: int,
    clt: Optional[CrossLayerTranscoder],
) -> dict[int, torch.Tensor]:
    """Run the layer's encoder on its real input (in place: input, pre-activations, activations, the active
    features and their own-layer decoder rows) and return, for a cross-layer transcoder, the active features'
    decoder rows to each later layer they write to, {layer: [k, d]}, leaving out blocks that are all zero
    (read through ``decoder_rows``, so that a CLT that keeps its decoders on disk reads only these).
    ``normalization``: the model's norms ("layernorm" centres, so a resid_mid input is centred, as
    ``mlp_input_map`` reads it)."""
    transcoder = frozen_layer.transcoder
    config = transcoder.config
    needs_spaces = (
        config.input_space == "mlp_input"
        or config.output_space == "mlp_output"
        or frozen_layer.mlp_post_scale is not None
    )
    if needs_spaces and frozen_layer.spaces is None:
        raise ValueError("this transcoder's spaces need the model's unprocessed norm weights (freeze(spaces=...))")
    spaces = frozen_layer.spaces or LayerSpaces(layernorm=normalization == "layernorm", norm_weight=None)
    x = transcoder_input(config.input_space, frozen_layer.mlp_in, residual, spaces)
    frozen_layer.transcoder_input = x
    pre = transcoder.pre_activation(x)
    z = transcoder.activate(pre)
    active = torch.nonzero((z != 0).any(0)).reshape(-1)
    dense = 2 * active.numel() > z.shape[1]  # a gathered copy would cost more than it saves
    later: dict[int, torch.Tensor] = {}
    if clt is not None:
        # only the active features' rows are read (a lazy CLT reads no others from disk); a dense layer's
        # inactive features get zero rows, which they multiply by activations that are all exactly zero
        rows = clt.decoder_rows(layer, active).to(z.device, dtype)
        if dense:
            rows = torch.zeros((z.shape[1], *rows.shape[1:]), dtype=dtype, device=z.device).index_copy_(0, active, rows)
            active = torch.arange(z.shape[1], device=z.device)
        decoder_active = rows[:, 0].contiguous()
        for offset, target in enumerate(clt.targets_of(layer)[1:], start=1):
            if bool(rows[:, offset].any()):  # a zero block writes nothing: skipping it is exact
                later[target] = rows[:, offset].contiguous()
    elif dense:
        active = torch.arange(z.shape[1], device=z.device)
        decoder_active = transcoder.W_dec.to(dtype)
    else:
        decoder_active = transcoder.W_dec[active].to(dtype)
    frozen_layer.z, frozen_layer.pre, frozen_layer.active = z, pre, active
    frozen_layer.z_active, frozen_layer.decoder_active = (z if dense else z[:, active]), decoder_active
    return later


def _split_mlp(
    frozen_layer: FrozenLayer,
    earlier: list[FrozenLayer],
    dtype: torch.dtype,
    layernorm: bool,
    later: dict[int, torch.Tensor],
) -> None:
    """Split the MLP output into what the transcoder writes there and the error term (in place); record the
    layers the active features write to (``decoder_blocks``: their own, then ``later``'s)."""
    transcoder = frozen_layer.transcoder
    layer = len(earlier)
    frozen_layer.decoder_blocks = {layer: frozen_layer.decoder_active, **later}
    # the own layer's product first, then earlier layers' writes, then b_dec: with no cross-layer writes this
    # is exactly z W_dec + b_dec, as for a per-layer transcoder
    output = frozen_layer.z_active @ frozen_layer.decoder_active
    for source in earlier:
        block = source.decoder_blocks.get(layer)
        if block is not None:
            output = output + source.z_active @ block
    output = output + transcoder.b_dec.to(dtype)
    skip = transcoder.skip_term(frozen_layer.transcoder_input)
    if skip is not None:
        frozen_layer.skip_out = skip.to(dtype)
        output = output + frozen_layer.skip_out
    spaces = frozen_layer.spaces or LayerSpaces(layernorm=layernorm, norm_weight=None)
    post = output_map(transcoder.config.output_space, spaces, frozen_layer.mlp_post_scale)
    frozen_layer.error = frozen_layer.mlp_out - post.push(output)


def hooks_needed(info: object) -> list[str]:
    """Every hook ``freeze`` reads."""
    names = [info.embed_hook, info.final_scale_hook, info.final_normalized_hook]
    if info.pos_embed_hook:
        names.append(info.pos_embed_hook)
    for layer in range(info.n_layers):
        hooks = info.layer(layer)
        names += [
            hooks.resid_pre,
            hooks.attn_normalized,
            hooks.attn_scale,
            hooks.attn_pattern,
            hooks.attn_out,
            hooks.mlp_in,
            hooks.mlp_scale,
            hooks.mlp_out,
            hooks.resid_post,
            hooks.mlp_norm_input,
        ]
        names += [name for name in (hooks.attn_post_scale, hooks.mlp_post_scale) if name]
    return list(dict.fromkeys(names))


def encoder_constant(frozen: FrozenForward, layer: int, feature: int) -> torch.Tensor:
    """The part of a feature's pre-activation no upstream component writes: b_enc - b_pre . f_enc, plus
    beta . f_enc when the transcoder reads mlp_input (the norm's bias)."""
    transcoder = frozen.layers[layer].transcoder
    dtype = frozen.embed.dtype
    w_enc = transcoder.W_enc[:, feature].to(dtype)
    constant = (transcoder.b_enc[feature] - transcoder.b_pre @ transcoder.W_enc[:, feature]).to(dtype)
    _, norm_bias = frozen.mlp_input_map(layer)
    return constant if norm_bias is None else constant + w_enc @ norm_bias.to(dtype)


def encoder_read(frozen: FrozenForward, layer: int, feature: int, position: int) -> torch.Tensor:
    """Feature ``feature``'s encoder vector moved to the raw residual its MLP reads at ``position``."""
    w_enc = frozen.layers[layer].transcoder.W_enc[:, feature].to(frozen.embed.dtype)
    positions = torch.tensor([position], device=w_enc.device)
    return frozen.read_mlp_input(layer, w_enc.unsqueeze(0), positions)[0][0]
