"""Helpers shared by the circuit tests: random transcoders filled in from a model's ModelInfo."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import torch

from tccli.circuit.search import SearchParams, greedy_search, paths_to_graph
from tccli.config.transcoders import TranscoderConfig
from tccli.model.loading import load_model
from tccli.replacement.frozen import FrozenForward, FrozenLayer
from tccli.replacement.targets import direction_target
from tccli.transcoders.cross_layer import CrossLayerTranscoder
from tccli.transcoders.files import save_transcoder
from tccli.transcoders.transcoder import Transcoder

_LOADED: dict = {}


def loaded_model(path, dtype: str = "float32"):
    """The tiny test model at ``path`` on the CPU, loaded once per test process and dtype."""
    key = (str(path), dtype)
    if key not in _LOADED:
        _LOADED[key] = load_model(str(path), "cpu", dtype)
    return _LOADED[key]


# Every (input space, output space) pair a transcoder can have (tccli.transcoders.transcoder).
SPACE_PAIRS = [(i, o) for i in ("normalized", "mlp_input", "resid_mid") for o in ("mlp_out", "mlp_output")]


def random_transcoders(
    info,
    n_features: int = 48,
    seed: int = 0,
    dtype=torch.float32,
    layers=None,
    bias_shift: float = 0.0,
    activation: str = "relu",
    skip: bool = False,
    input_space: str = "normalized",
    output_space: str = "mlp_out",
) -> dict[int, Transcoder]:
    """One random transcoder per layer, its config naming the model, hooks and processing.

    ``bias_shift`` is added to b_enc: a negative shift makes features sparse, as trained ones are. A
    threshold kind gets thresholds of 0.05; topk/batchtopk get k = n_features // 4.
    """
    generator = torch.Generator().manual_seed(seed)
    out = {}
    tc_spaces = (input_space, output_space) == ("normalized", "mlp_out")
    for layer in range(info.n_layers) if layers is None else layers:
        hooks = info.layer(layer)
        transcoder = Transcoder(
            TranscoderConfig(
                d_in=info.d_model,
                d_out=info.d_model,
                n_features=n_features,
                layer=layer,
                model_name=info.name,
                model_architecture=info.architecture,
                weight_processing=dict(info.weight_processing),
                activation=activation,
                k=n_features // 4 if activation in ("topk", "signed_topk", "batchtopk") else None,
                skip=skip,
                input_space=input_space,
                output_space=output_space,
                input_hook=hooks.mlp_in if tc_spaces else None,
                output_hook=hooks.mlp_out if tc_spaces else None,
            )
        )
        with torch.no_grad():
            for name, param in transcoder.named_parameters():
                scale = 1.0 / info.d_model**0.5 if name.startswith("W_") else 0.1
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
            transcoder.b_enc.add_(bias_shift)
            if transcoder.threshold is not None:
                transcoder.threshold.fill_(0.05)
        out[layer] = transcoder.to(dtype)
    return out


def random_clt(info, n_features: int = 48, seed: int = 0, off_diagonal: float = 1.0, **kwargs) -> CrossLayerTranscoder:
    """A cross-layer transcoder over every layer (or ``layers=``) of the model: the per-layer set of
    ``random_transcoders`` (same arguments) as its own-layer part, and random decoders to later layers scaled by
    ``off_diagonal`` (0: exactly the per-layer set)."""
    transcoders = random_transcoders(info, n_features, seed, **kwargs)
    clt = CrossLayerTranscoder.from_transcoders({layer: t.float() for layer, t in transcoders.items()})
    generator = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for layer in clt.layers:
            W = clt.W_dec[str(layer)]
            later = torch.randn(W[:, 1:].shape, generator=generator) / info.d_model**0.5
            W[:, 1:].copy_(later * off_diagonal)
    return clt.to(kwargs.get("dtype", torch.float32))


def plain_gpt2_with_transcoders(
    model_dir, transcoders: dict[int, Transcoder], tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean logits, logits with each layer of ``transcoders`` replaced) of the plain HuggingFace GPT-2 in
    ``model_dir``, by torch hooks and independently of tccli: the MLP's output is replaced by its ReLU
    transcoder's (written out here from the weights) on tc's resid_mid, the residual in front of ln_2 centred
    (compatibility mode centres every write, so its residual is HuggingFace's less its mean). Whatever the
    transcoder's output's mean, every norm removes it and the next resid_mid is centred again."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    residual: dict[int, torch.Tensor] = {}

    def transcode(layer: int) -> torch.Tensor:
        t, r = transcoders[layer], residual[layer]
        assert t.config.input_space == "resid_mid" and t.config.activation == "relu" and not t.config.skip
        x = r - r.mean(-1, keepdim=True)
        return torch.relu((x - t.b_pre) @ t.W_enc + t.b_enc) @ t.W_dec + t.b_dec

    handles = []
    try:
        with torch.no_grad():
            clean = model(tokens).logits
            for layer in transcoders:
                block = model.transformer.h[layer]
                handles.append(
                    block.ln_2.register_forward_pre_hook(lambda m, a, layer=layer: residual.update({layer: a[0]}))
                )
                handles.append(block.mlp.register_forward_hook(lambda m, a, out, layer=layer: transcode(layer)))
            spliced = model(tokens).logits
    finally:
        for handle in handles:
            handle.remove()
    return clean, spliced


def save_transcoders(transcoders: dict[int, Transcoder], folder: Path) -> Path:
    for layer, transcoder in transcoders.items():
        save_transcoder(transcoder.float(), Path(folder) / f"layer_{layer}")
    return Path(folder)


def paper_model() -> FrozenForward:
    """d=2, two tokens, one sequential RMS-norm layer with one head and a 2-feature transcoder.

    embed = [[1,0],[0,1]]; pattern [[1,0],[.5,.5]]; W_V = I; W_O = diag(2,1); attention scale 1.
    Token 1: attn_out = .5*[2,0] + .5*[0,1] = [1,.5]; resid_mid = [1,1.5]; MLP scale .5 so
    mlp_in = [2,3]; W_enc = I so z = [2,3]; W_dec = [[1,1],[0,2]] so transcoder_out = [2,8]; the
    real mlp_out is [2.5,8], an error of [.5,0]; resid_post = [3.5,9.5].
    """
    f64 = torch.float64
    embed = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=f64)
    transcoder = Transcoder(TranscoderConfig(d_in=2, d_out=2, n_features=2, layer=0)).to(f64)
    with torch.no_grad():
        transcoder.W_enc.copy_(torch.eye(2))
        transcoder.W_dec.copy_(torch.tensor([[1.0, 1.0], [0.0, 2.0]]))
    pattern = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]], dtype=f64)
    W_O = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]], dtype=f64)
    attn_out = torch.einsum("hts,se,hed->td", pattern, embed, W_O)
    resid_mid = embed + attn_out
    mlp_scale = torch.tensor([1.0, 0.5], dtype=f64)
    mlp_in = resid_mid / mlp_scale.unsqueeze(-1)
    with torch.no_grad():
        z = transcoder.encode(mlp_in)
        mlp_out = transcoder.decode(z) + torch.tensor([[0.0, 0.0], [0.5, 0.0]], dtype=f64)
    layer = FrozenLayer(
        resid_pre=embed,
        attn_scale=torch.ones(2, dtype=f64),
        pattern=pattern,
        values=embed.unsqueeze(1),
        W_V=torch.eye(2, dtype=f64).unsqueeze(0),
        W_O=W_O[0:1].reshape(1, 2, 2),
        b_O=torch.zeros(2, dtype=f64),
        attn_out=attn_out,
        mlp_scale=mlp_scale,
        mlp_in=mlp_in,
        mlp_out=mlp_out,
        transcoder=transcoder,
        z=z,
        pre=transcoder.pre_activation(mlp_in),
        error=mlp_out - transcoder.decode(z),
    )
    final = resid_mid + mlp_out
    return FrozenForward(
        tokens=torch.tensor([0, 1]),
        embed=embed,
        pos_embed=None,
        layers=[layer],
        final_resid=final,
        final_scale=torch.ones(2, dtype=f64),
        final_normalized=final,
        W_U=torch.eye(2, dtype=f64),
        b_U=torch.zeros(2, dtype=f64),
        layernorm=False,
        parallel=False,
    )


def small_circuit_graph() -> nx.DiGraph:
    """A one-layer circuit graph of the paper's hand-made model, with the metadata tc circuit writes."""
    frozen = paper_model()
    target = direction_target(frozen, torch.tensor([1.0, 1.0]), 1, 1)
    g = paths_to_graph(
        frozen, target, greedy_search(frozen, target, SearchParams(iters=2, branches=2)), ["<bos>", 'say "hi"']
    )
    g.graph["metadata"] = {
        "model": "paper",
        "scan": "paper-set",
        "n_layers": 1,
        "prompt": "x",
        "tokens": ["<bos>", 'say "hi"'],
        "target": target.description,
        "transcoder_list": ["layer_0"],
        "search": {"iters": 2, "branches": 2},
        "tc_version": "0",
    }
    return g
