"""Shared by the attribution-graph tests (tests/graph/test_*.py): tiny models with random transcoders of
every kind frozen on one prompt, a replacement model written independently of tccli.graph (for autograd),
the dense row of a node, and a five-node graph whose influence, pruning and scores are worked out by hand."""

from __future__ import annotations

from typing import Optional

import torch

from circuit_helpers import loaded_model, random_transcoders
from tccli.config.transcoders import TranscoderConfig
from tccli.graph.adjacency import Adjacency, SparseRows
from tccli.graph.attribution_graph import AttributionGraph, GraphParams
from tccli.graph.nodes import NodeTable
from tccli.replacement.frozen import FrozenForward
from tccli.replacement.prompts import freeze_prompt
from tccli.transcoders.cross_layer import CrossLayerTranscoder
from tccli.transcoders.transcoder import Transcoder

PROMPT_IDS = [0, 37, 90, 151, 12, 200, 64, 7, 99]


def with_kind(transcoder: Transcoder, activation: str, skip: bool = False, seed: int = 0) -> Transcoder:
    """The same weights as another kind of transcoder (thresholds and W_skip random)."""
    config = TranscoderConfig(
        **{
            **transcoder.config.to_dict(),
            "activation": activation,
            "skip": skip,
            # signed_topk keeps 30 of 48: most tokens then keep negative values too
            "k": {"topk": 6, "batchtopk": 6, "signed_topk": 30}.get(activation),
        }
    )
    out = Transcoder(config).to(transcoder.W_enc.dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in transcoder.tensor_names():
            getattr(out, name).copy_(getattr(transcoder, name))
        if out.threshold is not None:
            out.threshold.copy_(torch.rand(out.threshold.shape, generator=generator) * 0.2)
        if out.W_skip is not None:
            out.W_skip.copy_(torch.randn(out.W_skip.shape, generator=generator) / out.W_skip.shape[0] ** 0.5)
    return out


def cross_layer(transcoders: dict[int, Transcoder], off_diagonal: float = 1.0, seed: int = 7) -> CrossLayerTranscoder:
    """The cross-layer transcoder whose encoders and own-layer decoders are ``transcoders``' and whose decoders
    to later layers are random (scaled by ``off_diagonal``; 0: exactly the per-layer set), in their dtype."""
    first = next(iter(transcoders.values()))
    clt = CrossLayerTranscoder.from_transcoders(transcoders).to(first.W_enc.dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in clt.layers:
            later = clt.W_dec[str(layer)][:, 1:]
            random = torch.randn(later.shape, generator=generator, dtype=torch.float64) / later.shape[-1] ** 0.5
            later.copy_(random * off_diagonal)
    return clt


def frozen_for(
    path,
    dtype: str = "float32",
    kind: str = "relu",
    skip: bool = False,
    n_features: int = 48,
    decoder_scale: float = 1.0,
    clt: bool = False,
    layers: Optional[list[int]] = None,
):
    """(loaded, frozen) of a tiny model on PROMPT_IDS with random transcoders of ``kind`` (on ``layers``, or
    every layer); ``clt``: a cross-layer transcoder of the same encoders and own-layer decoders with random
    decoders to its later layers."""
    loaded = loaded_model(path, dtype)
    torch_dtype = torch.float64 if dtype == "float64" else torch.float32
    transcoders = random_transcoders(loaded.info, n_features, 0, torch_dtype, layers=layers, bias_shift=-0.1)
    with torch.no_grad():
        for transcoder in transcoders.values():
            transcoder.W_dec.mul_(decoder_scale)
    if kind != "relu" or skip:
        transcoders = {layer: with_kind(t, kind, skip, layer) for layer, t in transcoders.items()}
    chosen = cross_layer(transcoders) if clt else transcoders
    return loaded, freeze_prompt(loaded, chosen, torch.tensor(PROMPT_IDS))


def decoders_into(frozen: FrozenForward, layer: int) -> list[tuple[int, torch.Tensor]]:
    """(source layer, [m, d] decoder) of every layer whose features write to ``layer``'s MLP output, read from
    the transcoder weights themselves (not from what freeze gathered): a cross-layer transcoder's blocks
    W_dec^(source -> layer) for every source <= layer, else the layer's own W_dec."""
    clt = frozen.cross_layer
    if clt is None:
        return [(layer, frozen.layers[layer].transcoder.W_dec)]
    return [(source, clt.decoder(source, layer)) for source in clt.layers if source <= layer]


ALL = GraphParams(max_feature_nodes=10**9, batch_size=64, drop_mass=0.0)


def replacement_value(frozen: FrozenForward, target_row: dict, leaves: dict) -> torch.Tensor:
    """A row's value recomputed from leaves (inputs, feature activations, error terms) through the frozen
    model: patterns and norm scales held, each MLP output = z W_dec + b_dec + error from the leaves (+ a
    skip transcoder's x W_skip from the MLP's input), never recomputed. Written from the model's
    definition, not from tccli.graph."""
    position, (n_attn, n_mlp) = target_row["position"], target_row["read_point"]

    def normalized(x, scale):
        if frozen.layernorm:
            x = x - x.mean(-1, keepdim=True)
        return x / scale.unsqueeze(-1)

    resid = leaves["inputs"]
    for index, layer in enumerate(frozen.layers):
        if (n_attn, n_mlp) == (index, index):
            break
        values = normalized(resid, layer.attn_scale) @ layer.W_V  # [H, T, dh]
        if layer.b_V is not None:
            values = values + layer.b_V.unsqueeze(1)
        attn = torch.einsum("hts,hse,hed->td", layer.pattern, values, layer.W_O) + layer.b_O
        skip = layer.transcoder is not None and layer.transcoder.W_skip is not None
        if layer.transcoder is None:  # the MLP is not replaced: all of it is the error term
            mlp = leaves["error", index]
        else:
            mlp = sum(leaves["z", source] @ decoder for source, decoder in decoders_into(frozen, index))
            mlp = mlp + layer.transcoder.b_dec + leaves["error", index]
        if skip:  # a linear path from the MLP's input (normalized -> mlp_out)
            assert (layer.input_space, layer.transcoder.config.output_space) == ("normalized", "mlp_out")
        if frozen.parallel:  # the MLP reads resid_pre
            if skip:
                mlp = mlp + normalized(resid, layer.mlp_scale) @ layer.transcoder.W_skip
            resid = resid + attn + mlp
        else:
            resid = resid + attn
            if (n_attn, n_mlp) == (index + 1, index):
                break
            if skip:  # the MLP reads resid_mid
                mlp = mlp + normalized(resid, layer.mlp_scale) @ layer.transcoder.W_skip
            resid = resid + mlp
    return target_row["read"](resid[position])


def row_of(frozen: FrozenForward, graph: AttributionGraph, targets, node: int) -> dict:
    """How node ``node`` (a target or a feature) reads the residual: its token, read point and read function."""
    table = graph.table
    if node >= table.target_start:
        target = targets[node - table.target_start]
        kind = target.description["kind"]
        if kind == "feature":
            layer_index, f = target.description["layer"], target.description["feature"]
        elif kind in ("logit", "logit_diff"):
            a, b, t = target.description["token"], target.description.get("token_b"), target.position
            demeaned = target.description.get("demeaned", False)

            def read(x, a=a, b=b, t=t, demeaned=demeaned):
                x = x - x.mean() if frozen.layernorm else x
                logits = (x / frozen.final_scale[t]) @ frozen.W_U + frozen.b_U
                return logits[a] - (logits[b] if b is not None else logits.mean() if demeaned else 0)

            return {"node": node, "position": target.position, "read_point": target.read_point, "read": read}
        else:
            return {
                "node": node,
                "position": target.position,
                "read_point": target.read_point,
                "read": lambda x, v=target.vector: x @ v,
            }
        t = target.position
    else:
        layer_index, t, f = (
            int(table.feature_layer[node]),
            int(table.feature_position[node]),
            int(table.feature_index[node]),
        )
    layer = frozen.layers[layer_index]

    def read(x, layer=layer, f=f, t=t):
        x = x - x.mean() if frozen.layernorm else x
        return layer.transcoder.pre_activation(x / layer.mlp_scale[t])[f]

    return {"node": node, "position": t, "read_point": frozen.mlp_read_point(layer_index), "read": read}


def dense_row(graph: AttributionGraph, node: int, missing_ok: bool = False) -> torch.Tensor:
    for chunk in graph.adjacency.chunks:
        hit = torch.nonzero(chunk.nodes == node).reshape(-1)
        if hit.numel():
            r = int(hit[0])
            row = torch.zeros(graph.table.n_nodes, dtype=chunk.value.dtype)
            lo, hi = int(chunk.crow[r]), int(chunk.crow[r + 1])
            row[chunk.col[lo:hi].long()] = chunk.value[lo:hi]
            return row
    if missing_ok:
        return torch.zeros(graph.table.n_nodes, dtype=graph.influence.dtype)
    raise KeyError(node)


def hand_graph() -> tuple[NodeTable, Adjacency]:
    """Nodes f0, f1 (features), e (error), x (input), t (target, weight 1); edges into
    t: f0 3, f1 -1;  into f0: x 3, e 1;  into f1: f0 1, x 3."""
    table = NodeTable(
        n_layers=1,
        n_tokens=1,
        feature_layer=torch.tensor([0, 0]),
        feature_position=torch.tensor([0, 0]),
        feature_index=torch.tensor([0, 1]),
        feature_activation=torch.tensor([1.0, 1.0], dtype=torch.float64),
        target_weight=torch.tensor([1.0], dtype=torch.float64),
    )
    f0, f1, e, x, t = 0, 1, table.error_node(0, 0), table.embed_node(0), table.target_node(0)
    assert (e, x, t) == (2, 3, 4)
    rows = {t: {f0: 3.0, f1: -1.0}, f0: {x: 3.0, e: 1.0}, f1: {f0: 1.0, x: 3.0}}
    chunks = []
    for node, entries in rows.items():  # one chunk per row: chunk boundaries must not matter
        values = torch.tensor(list(entries.values()), dtype=torch.float64)
        zero = torch.zeros(1, dtype=torch.float64)
        chunks.append(
            SparseRows(
                nodes=torch.tensor([node]),
                crow=torch.tensor([0, len(entries)]),
                col=torch.tensor(list(entries), dtype=torch.int32),
                value=values,
                bias=zero,
                target_value=values.sum(0, True),
                dropped=zero,
                dropped_abs=zero,
                total_abs=values.abs().sum(0, True),
            )
        )
    return table, Adjacency(chunks)
