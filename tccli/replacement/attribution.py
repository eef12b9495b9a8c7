"""Exact direct attributions through a frozen forward pass (METHOD.md sections 5 and 8). Pure math.

The frozen forward pass is the ORIGINAL model's forward pass on one prompt: its residual stream,
attention patterns and normalisation scales are the real ones. Each MLP output is split into the
transcoder's part (feature activations z times decoder rows, plus b_dec, plus a skip transcoder's
x W_skip), computed from the MLP's real input in the transcoder's input space and written to the
residual through its output space (tccli.model.spaces), and an error term ``mlp_out - written(transcoder_out)``.
With patterns and scales frozen, a target ``v . resid(t)`` is linear in every upstream write, so

    target = constant + sum(features) + sum(skips) + sum(head, source) + embed + pos + sum(biases) + sum(errors)

holds to floating-point precision (tests/test_attribution.py checks it for every space pair).

Normalisation: a vector ``w`` dotted with a normalised residual equals ``(P w / scale) . x`` with
``x`` the raw residual, ``P`` the mean-centring projection for LayerNorm (identity for RMSNorm).
Applying ``P`` to the vector makes this exact whether or not the residual writes are centred, so
nothing relies on compatibility mode's centring of writing weights. The other maps (a transcoder's input
and output spaces, Gemma-2's post-attention and post-MLP norms with frozen scales, the skip path) are
``FrozenForward`` methods, so every consumer moves vectors through them the same way.

Read points: a vector is dotted with the residual stream that includes the attention outputs of
layers ``< n_attn`` and the MLP outputs of layers ``< n_mlp``. The MLP of layer l reads
``(l + 1, l)`` in a sequential block and ``(l, l)`` in a parallel one (it cannot see attention l).

Logit targets are the logits before any final soft-cap (Gemma-2's ``c tanh(logit / c)`` is not linear).

All functions are batched over "rows": a row is one vector [d] at one token with one read point.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from tccli.model.spaces import LayerSpaces, NormMap, input_map, output_map, transcoder_input
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
    decoder_active: Optional[torch.Tensor] = None  # [k, d]
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

    The linear maps of METHOD.md section 8 are methods here (``read_mlp_input``, ``write_mlp_output``,
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
    _cache: dict = field(default_factory=dict, repr=False)  # weights folded once per prompt (linear maps below)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

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
        its input (the raw resid_pre), with patterns and ln1's scales frozen (no biases): the adjoint of
        attention_backward."""
        W_O, mix, W_V = self._attention_backward_weights(layer)
        B, P, d = writes.shape
        H, d_head = mix.shape[0], W_O.shape[0] // mix.shape[0]
        values = writes.reshape(B * P, d) @ W_V  # [B*P, H*dh]
        per_head = values.reshape(B, P, H, d_head).permute(2, 1, 0, 3).reshape(H, P, B * d_head)
        at_dest = torch.bmm(mix[:, :P, :P].transpose(1, 2), per_head)  # [H, dest, B*dh]
        at_dest = at_dest.reshape(H, P, B, d_head).permute(2, 1, 0, 3).reshape(B * P, H * d_head)
        return (at_dest @ W_O).reshape(B, P, d)

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
            self._cache[key] = (frozen_layer.W_O.reshape(H * d_head, d), mix.contiguous(),
                                W_V.permute(1, 0, 2).reshape(d, H * d_head))
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

    # ------------------------------------------------------------------ METHOD.md section 8 maps

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

    def read_mlp_input(self, layer: int, vectors: torch.Tensor, positions: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectors [P, d] dotted with layer ``layer``'s transcoder input at tokens ``positions`` -> (vectors
        dotted with the raw residual at its read point, constants [P] from the norm's bias)."""
        read, constant = self.mlp_input_map(layer)
        raw = read.pull(vectors, positions)
        constants = (vectors @ constant.to(vectors.dtype) if constant is not None
                     else torch.zeros(vectors.shape[0], dtype=vectors.dtype, device=vectors.device))
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

    def read_skip(self, layer: int, vectors: torch.Tensor, positions: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The skip path: vectors [P, d] dotted with the residual at ``positions`` -> (vectors dotted with
        the raw residual the MLP reads, constants [P]), so that v . (x W_skip written) = raw . r + constant."""
        W_skip = self.layers[layer].transcoder.W_skip.to(vectors.dtype)
        through = self.read_mlp_output(layer, vectors, positions) @ W_skip.T  # x W_skip . u = x . (W_skip u)
        return self.read_mlp_input(layer, through, positions)


def freeze(
    captured: dict[str, torch.Tensor],
    info: "object",
    weights: dict,
    transcoders: dict[int, Transcoder],
    tokens: torch.Tensor,
    spaces: Optional[list[LayerSpaces]] = None,
) -> FrozenForward:
    """Assemble a FrozenForward from one prompt's captured activations (batch dimension 1).

    captured: hook name -> activation, for every hook of ``info`` (a models.ModelInfo) that
        ``hooks_needed`` lists.
    weights: W_V [L, n_kv, d, dh], b_V [L, n_kv, dh] or None, W_O [L, H, dh, d], b_O [L, d] or None,
        W_U [d, vocab], b_U [vocab].
    spaces: per layer, the model's tccli.model.spaces.LayerSpaces (loaded.spaces); needed for transcoders that read
        mlp_input or write mlp_output, and for models with post-norms.
    """
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
        b_O = (weights["b_O"][layer].to(device, dtype) if weights.get("b_O") is not None
               else torch.zeros(W_O.shape[-1], device=device, dtype=dtype))
        layer_spaces = spaces[layer].to(device, dtype) if spaces else None
        frozen_layer = FrozenLayer(
            resid_pre=get(names.resid_pre), attn_scale=get(names.attn_scale).reshape(-1),
            pattern=get(names.attn_pattern), values=values, W_V=W_V_heads, W_O=W_O[layer], b_O=b_O,
            attn_out=get(names.attn_out), mlp_scale=get(names.mlp_scale).reshape(-1), mlp_in=get(names.mlp_in),
            mlp_out=get(names.mlp_out), transcoder=transcoders.get(layer), z=None, pre=None,
            error=get(names.mlp_out), spaces=layer_spaces,
            attn_post_scale=get(names.attn_post_scale).reshape(-1) if names.attn_post_scale else None,
            mlp_post_scale=get(names.mlp_post_scale).reshape(-1) if names.mlp_post_scale else None, b_V=b_V)
        if frozen_layer.transcoder is not None:
            _split_mlp(frozen_layer, get(names.mlp_norm_input), dtype)
        layers.append(frozen_layer)
    last = info.layer(info.n_layers - 1)
    pos_embed = captured[info.pos_embed_hook][0].to(dtype) if info.pos_embed_hook else None
    return FrozenForward(
        tokens=tokens.reshape(-1).to(device), embed=first.to(dtype), pos_embed=pos_embed,
        layers=layers, final_resid=captured[last.resid_post][0].to(dtype),
        final_scale=captured[info.final_scale_hook][0].to(dtype).reshape(-1),
        final_normalized=captured[info.final_normalized_hook][0].to(dtype),
        W_U=weights["W_U"].to(device, dtype), b_U=weights["b_U"].to(device, dtype),
        layernorm=info.normalization == "layernorm", parallel=info.parallel_attn_mlp,
        final_logit_softcap=getattr(info, "final_logit_softcap", None))


def _split_mlp(frozen_layer: FrozenLayer, residual: torch.Tensor, dtype: torch.dtype) -> None:
    """Run the transcoder on its real input and split the MLP output into its parts (in place)."""
    transcoder = frozen_layer.transcoder
    config = transcoder.config
    needs_spaces = (config.input_space == "mlp_input" or config.output_space == "mlp_output"
                    or frozen_layer.mlp_post_scale is not None)
    if needs_spaces and frozen_layer.spaces is None:
        raise ValueError("this transcoder's spaces need the model's unprocessed norm weights (freeze(spaces=...))")
    spaces = frozen_layer.spaces or LayerSpaces(layernorm=False, norm_weight=None)
    x = transcoder_input(config.input_space, frozen_layer.mlp_in, residual, spaces)
    frozen_layer.transcoder_input = x
    pre = transcoder.pre_activation(x)
    z = transcoder.activate(pre)
    active = torch.nonzero((z != 0).any(0)).reshape(-1)
    if 2 * active.numel() > z.shape[1]:  # dense: a gathered copy would cost more than it saves
        active = torch.arange(z.shape[1], device=z.device)
        z_active, decoder_active = z, transcoder.W_dec.to(dtype)
    else:
        z_active, decoder_active = z[:, active], transcoder.W_dec[active].to(dtype)
    output = z_active @ decoder_active + transcoder.b_dec.to(dtype)
    skip = transcoder.skip_term(x)
    if skip is not None:
        frozen_layer.skip_out = skip.to(dtype)
        output = output + frozen_layer.skip_out
    frozen_layer.z, frozen_layer.pre = z, pre
    frozen_layer.active, frozen_layer.z_active, frozen_layer.decoder_active = active, z_active, decoder_active
    post = output_map(config.output_space, spaces, frozen_layer.mlp_post_scale)
    frozen_layer.error = frozen_layer.mlp_out - post.push(output)


def hooks_needed(info: "object") -> list[str]:
    """Every hook ``freeze`` reads."""
    names = [info.embed_hook, info.final_scale_hook, info.final_normalized_hook]
    if info.pos_embed_hook:
        names.append(info.pos_embed_hook)
    for layer in range(info.n_layers):
        hooks = info.layer(layer)
        names += [hooks.resid_pre, hooks.attn_normalized, hooks.attn_scale, hooks.attn_pattern,
                  hooks.attn_out, hooks.mlp_in, hooks.mlp_scale, hooks.mlp_out, hooks.resid_post,
                  hooks.mlp_norm_input]
        names += [name for name in (hooks.attn_post_scale, hooks.mlp_post_scale) if name]
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------- targets


@dataclass
class Target:
    """A scalar to explain: ``value == constant + vector . resid(position at read_point)``."""

    vector: torch.Tensor  # [d], dotted with the RAW residual
    position: int
    read_point: tuple[int, int]
    constant: float  # the part no upstream component writes (encoder bias, unembedding bias)
    value: float  # the real value, computed from the captured activations, not from the decomposition
    description: dict = field(default_factory=dict)  # kind, layer, feature, tokens...: for graph metadata


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


def feature_target(frozen: FrozenForward, layer: int, feature: int, position: int) -> Target:
    """A transcoder feature's pre-activation at ``position``."""
    return Target(vector=encoder_read(frozen, layer, feature, position), position=position,
                  read_point=frozen.mlp_read_point(layer),
                  constant=float(encoder_constant(frozen, layer, feature)),
                  value=float(frozen.layers[layer].pre[position, feature]),
                  description={"kind": "feature", "layer": layer, "feature": feature})


def unembed_target(frozen: FrozenForward, token_a: int, token_b: Optional[int], position: int) -> Target:
    """A logit (``token_b`` None) or the logit difference a - b at ``position``."""
    direction = frozen.W_U[:, token_a].clone()
    constant = frozen.b_U[token_a].clone()
    if token_b is not None:
        direction = direction - frozen.W_U[:, token_b]
        constant = constant - frozen.b_U[token_b]
    vector = frozen.to_raw(direction.unsqueeze(0), frozen.final_scale[position:position + 1])[0]
    value = frozen.final_normalized[position] @ direction + constant
    kind = "logit" if token_b is None else "logit_diff"
    return Target(vector=vector, position=position, read_point=(frozen.n_layers, frozen.n_layers),
                  constant=float(constant), value=float(value),
                  description={"kind": kind, "token": token_a, "token_b": token_b})


def direction_target(frozen: FrozenForward, direction: torch.Tensor, layer: int, position: int) -> Target:
    """``direction . resid_pre[layer]`` (the raw residual entering block ``layer``; ``layer == n_layers``
    is the residual after the last block)."""
    direction = direction.to(frozen.embed.dtype).reshape(-1)
    read_point = (layer, layer)
    value = frozen.resid_at(position, read_point) @ direction
    return Target(vector=direction, position=position, read_point=read_point, constant=0.0,
                  value=float(value), description={"kind": "direction", "layer": layer})


# ----------------------------------------------------------------------------- direct contributions


@dataclass
class Rows:
    """P vectors to attribute, each at a token and a read point."""

    vectors: torch.Tensor  # [P, d] dotted with the raw residual
    positions: torch.Tensor  # [P] int64
    n_attn: torch.Tensor  # [P] int64: attention layers < n_attn are upstream
    n_mlp: torch.Tensor  # [P] int64: MLP layers < n_mlp are upstream

    @classmethod
    def single(cls, vector: torch.Tensor, position: int, read_point: tuple[int, int]) -> "Rows":
        device = vector.device
        return cls(vectors=vector.reshape(1, -1), positions=torch.tensor([position], device=device),
                   n_attn=torch.tensor([read_point[0]], device=device),
                   n_mlp=torch.tensor([read_point[1]], device=device))

    @classmethod
    def from_target(cls, target: Target) -> "Rows":
        return cls.single(target.vector, target.position, target.read_point)

    def __len__(self) -> int:
        return int(self.vectors.shape[0])


def feature_contributions(frozen: FrozenForward, rows: Rows, layer: int,
                          only_active: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Transcoder features of ``layer``: (feature indices [k], contributions [P, k]).

    contribution[p, i] = z_i(t_p) * (W(f_dec(i)) . v_p), W the map from the transcoder's output space to the
    residual; zero where layer is not upstream of row p. With ``only_active`` only features active
    somewhere in the prompt are computed (the rest contribute 0).
    """
    frozen_layer = frozen.layers[layer]
    if only_active and frozen_layer.active is not None:
        indices, z, decoder = frozen_layer.active, frozen_layer.z_active, frozen_layer.decoder_active
    else:
        z, decoder = frozen_layer.z, frozen_layer.transcoder.W_dec.to(rows.vectors.dtype)
        indices = torch.arange(z.shape[1], device=z.device)
    read = frozen.read_mlp_output(layer, rows.vectors, rows.positions)
    contributions = z[rows.positions] * (read @ decoder.T)
    upstream = (rows.n_mlp > layer).to(contributions.dtype).unsqueeze(1)
    return indices, contributions * upstream


def skip_contributions(frozen: FrozenForward, rows: Rows, layer: int) -> torch.Tensor:
    """[P]: the skip term x W_skip of ``layer`` at row p's token, written to the residual, dotted with v_p
    (zero where the layer is not upstream or has no skip connection)."""
    frozen_layer = frozen.layers[layer]
    if frozen_layer.skip_out is None:
        return torch.zeros(len(rows), dtype=rows.vectors.dtype, device=rows.vectors.device)
    read = frozen.read_mlp_output(layer, rows.vectors, rows.positions)
    upstream = (rows.n_mlp > layer).to(read.dtype)
    return (read * frozen_layer.skip_out[rows.positions]).sum(-1) * upstream


def head_contributions(frozen: FrozenForward, rows: Rows, layer: int) -> torch.Tensor:
    """[P, H, T]: head h of ``layer`` reading source token s, written into row p's token.

    contribution = A[h, t, s] * ((x_norm1(s) W_V + b_V) W_O[h]) . R(v), R the adjoint of Gemma-2's frozen
    post-attention norm at t (the identity elsewhere)
    """
    frozen_layer = frozen.layers[layer]
    read = frozen.read_attn_output(layer, rows.vectors, rows.positions)
    read_back = torch.einsum("pd,hed->phe", read, frozen_layer.W_O)  # W_O v per head
    per_source = torch.einsum("phe,she->phs", read_back, frozen_layer.values)
    pattern = frozen_layer.pattern[:, rows.positions, :].permute(1, 0, 2)  # [P, H, T]
    upstream = (rows.n_attn > layer).to(per_source.dtype).reshape(-1, 1, 1)
    return pattern * per_source * upstream


def dot_rows(rows: Rows, per_token: torch.Tensor) -> torch.Tensor:
    """[P]: v_p . per_token[t_p] (per_token [T, d])."""
    return (rows.vectors * per_token[rows.positions]).sum(-1)


def embed_contributions(frozen: FrozenForward, rows: Rows) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """([P] token embedding, [P] position embedding or None)."""
    pos = dot_rows(rows, frozen.pos_embed) if frozen.pos_embed is not None else None
    return dot_rows(rows, frozen.embed), pos


def error_contributions(frozen: FrozenForward, rows: Rows, layer: int) -> torch.Tensor:
    """[P]: v . (mlp_out - transcoder_out) of ``layer`` where that layer is upstream."""
    upstream = (rows.n_mlp > layer).to(rows.vectors.dtype)
    return dot_rows(rows, frozen.layers[layer].error) * upstream


def bias_contributions(frozen: FrozenForward, rows: Rows, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([P] attention output bias b_O, [P] transcoder decoder bias b_dec) of ``layer``."""
    frozen_layer = frozen.layers[layer]
    attn_read = frozen.read_attn_output(layer, rows.vectors, rows.positions)
    attn = (attn_read @ frozen_layer.b_O) * (rows.n_attn > layer).to(rows.vectors.dtype)
    if frozen_layer.transcoder is None:
        dec = torch.zeros_like(attn)
    else:
        b_dec = frozen_layer.transcoder.b_dec.to(rows.vectors.dtype)
        read = frozen.read_mlp_output(layer, rows.vectors, rows.positions)
        dec = (read @ b_dec) * (rows.n_mlp > layer).to(rows.vectors.dtype)
    return attn, dec


@dataclass
class DirectContributions:
    """Every direct term of one row; ``total()`` is ``v . resid`` exactly."""

    features: dict[int, torch.Tensor]  # layer -> [m]
    heads: dict[int, torch.Tensor]  # layer -> [H, T]
    embed: torch.Tensor
    pos_embed: Optional[torch.Tensor]
    attn_bias: dict[int, torch.Tensor]
    decoder_bias: dict[int, torch.Tensor]
    errors: dict[int, torch.Tensor]
    skips: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> skip term (skip transcoders only)

    def total(self) -> torch.Tensor:
        parts = [self.embed] + ([self.pos_embed] if self.pos_embed is not None else [])
        parts += [t.sum() for t in self.features.values()] + [t.sum() for t in self.heads.values()]
        parts += list(self.attn_bias.values()) + list(self.decoder_bias.values()) + list(self.errors.values())
        parts += list(self.skips.values())
        return torch.stack([p.reshape(()) for p in parts]).sum()


def direct_contributions(frozen: FrozenForward, vector: torch.Tensor, position: int,
                         read_point: tuple[int, int]) -> DirectContributions:
    """All direct terms of ``vector . resid(position at read_point)``, for every upstream component."""
    rows = Rows.single(vector, position, read_point)
    n_attn, n_mlp = read_point
    features, skips = {}, {}
    for layer in range(n_mlp):
        if frozen.layers[layer].transcoder is not None:
            indices, contributions = feature_contributions(frozen, rows, layer, only_active=False)
            features[layer] = contributions[0]
        if frozen.layers[layer].skip_out is not None:
            skips[layer] = skip_contributions(frozen, rows, layer)[0]
    heads = {layer: head_contributions(frozen, rows, layer)[0] for layer in range(n_attn)}
    embed, pos = embed_contributions(frozen, rows)
    attn_bias, decoder_bias = {}, {}
    for layer in range(max(n_attn, n_mlp)):
        attn, dec = bias_contributions(frozen, rows, layer)
        if layer < n_attn:
            attn_bias[layer] = attn[0]
        if layer < n_mlp and frozen.layers[layer].transcoder is not None:
            decoder_bias[layer] = dec[0]
    errors = {layer: error_contributions(frozen, rows, layer)[0] for layer in range(n_mlp)}
    return DirectContributions(features=features, heads=heads, embed=embed[0],
                               pos_embed=None if pos is None else pos[0], attn_bias=attn_bias,
                               decoder_bias=decoder_bias, errors=errors, skips=skips)


# ----------------------------------------------------------------------------- one step upstream


def feature_upstream(frozen: FrozenForward, layer: int, feature: int, position: int,
                     coefficient: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor]:
    """Continue upstream from feature ``feature`` of ``layer`` whose path weight is ``coefficient``
    (= W(f_dec) . v): the vector whose direct contributions sum to coefficient * (pre-activation -
    encoder constant), its read point, and that constant part (coefficient * encoder constant)."""
    vector = coefficient * encoder_read(frozen, layer, feature, position)
    constant = coefficient * encoder_constant(frozen, layer, feature)
    return vector, frozen.mlp_read_point(layer), constant


def head_upstream(frozen: FrozenForward, layer: int, head: int, source: int, destination: int,
                  vector: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Continue upstream from head ``head`` of ``layer`` reading ``source`` for ``destination``:
    the vector A[t, s] * W_V W_O R(v) (R: Gemma-2's post-attention norm at t, read backwards) moved through
    ln1 at the source token, and its read point."""
    frozen_layer = frozen.layers[layer]
    weight = frozen_layer.pattern[head, destination, source]
    read = frozen.read_attn_output(layer, vector.unsqueeze(0), torch.tensor([destination], device=vector.device))[0]
    ov = frozen_layer.W_V[head] @ (frozen_layer.W_O[head] @ read)
    raw = frozen.to_raw((weight * ov).unsqueeze(0), frozen_layer.attn_scale[source:source + 1])[0]
    return raw, (layer, layer)


def skip_upstream(frozen: FrozenForward, layer: int, position: int, vector: torch.Tensor
                  ) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor]:
    """Continue upstream through ``layer``'s skip connection at ``position`` (METHOD.md section 8): the
    vector W_skip W(v) moved through the norm, whose direct contributions sum to the skip term's
    contribution less the returned constant (the norm bias's part), and its read point."""
    raw, constant = frozen.read_skip(layer, vector.unsqueeze(0), torch.tensor([position], device=vector.device))
    return raw[0], frozen.mlp_read_point(layer), constant[0]
