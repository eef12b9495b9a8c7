"""The id of a transcoder set: what a graph file names its transcoders by (circuit-tracer's ``scan``), and
what `tc score --format neuronpedia-features` files its feature examples under, so that a viewer finds the
examples of a graph's features.

One rule, as circuit-tracer derives its ``scan_name``:

- a set named by a hub id: the repository, ``//subfolder`` when there is one, ``@revision`` when given
  (``mntss/transcoder-Llama-3.2-1B``, ``mwhanna/gemma-scope-transcoders//sub@rev``);
- a circuit-tracer set on disk whose ``config.yaml`` names its scan (``scan_name``, else ``scan``): that;
- anything else: ``tc-`` and 16 hex digits of a SHA-256 over every layer's shape, kind and a fixed sample
  of its weights (biases, thresholds, 64 encoder and decoder rows), so the same set gets the same id
  wherever it lies and however its folder is spelled, and another set another id.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from tccli.transcoders.cross_layer import CrossLayerTranscoder
from tccli.transcoders.formats import circuit_tracer
from tccli.transcoders.formats.common import read_yaml
from tccli.transcoders.formats.hub import looks_like_hub_id, split_hub_id
from tccli.transcoders.transcoder import Transcoder

SAMPLED_ROWS = 64


def transcoder_set_id(spec: str, transcoders: dict[int, Transcoder] | CrossLayerTranscoder) -> str:
    """The set's id. ``spec`` is the set as the user named it (--transcoders); ``transcoders`` are all of
    its layers as loaded, or the cross-layer transcoder, before any change of dtype (a subset of the layers
    gets another id)."""
    text = str(spec)
    if looks_like_hub_id(text):
        repo, sub, revision = split_hub_id(text)
        return repo + (f"//{sub}" if sub else "") + (f"@{revision}" if revision else "")
    named = _configured_scan(Path(text).expanduser())
    if named is not None:
        return named
    if isinstance(transcoders, CrossLayerTranscoder):
        return "tc-" + cross_layer_fingerprint(transcoders)[:16]
    return "tc-" + fingerprint(transcoders)[:16]


def _configured_scan(path: Path) -> str | None:
    if not circuit_tracer.is_set(path):
        return None
    config = read_yaml(path / circuit_tracer.CONFIG)
    for key in ("scan_name", "scan"):
        value = config.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def fingerprint(transcoders: dict[int, Transcoder]) -> str:
    """SHA-256 (hex) of every layer's shape and kind and a fixed sample of its weights, as float32."""
    digest = hashlib.sha256()
    for layer in sorted(transcoders):
        transcoder = transcoders[layer]
        rows = sampled_rows(transcoder.n_features).to(transcoder.W_enc.device)
        _digest_layer(digest, layer, transcoder, transcoder.W_dec.index_select(0, rows))
    return digest.hexdigest()


def sampled_rows(n_features: int) -> torch.Tensor:
    """The feature indices whose weights a fingerprint hashes: SAMPLED_ROWS spread evenly, first and last."""
    rows = torch.linspace(0, n_features - 1, min(SAMPLED_ROWS, n_features))
    return rows.round().long().unique()


def _digest_layer(digest, layer: int, transcoder: Transcoder, decoder_sample: torch.Tensor) -> None:
    """Hash one layer's shape, kind and sampled weights; ``decoder_sample`` is W_dec's sampled rows."""
    config = transcoder.config
    digest.update(
        repr(
            (layer, config.kind, config.activation, config.k, config.skip, config.d_in, config.d_out)
            + (transcoder.n_features,)
        ).encode()
    )
    rows = sampled_rows(transcoder.n_features).to(transcoder.W_enc.device)
    tensors = [transcoder.b_enc, transcoder.b_dec, transcoder.W_enc.index_select(1, rows), decoder_sample]
    if transcoder.threshold is not None:
        tensors.append(transcoder.threshold)
    for tensor in tensors:
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


def cross_layer_fingerprint(clt: CrossLayerTranscoder) -> str:
    """SHA-256 (hex) of a CLT: its per-layer views' fingerprint (encoders, own-layer decoders) and the same
    sample of rows of every decoder to a later layer, so that it never shares an id with a per-layer set.
    Only the sampled decoder rows are read (``decoder_rows``: a CLT that keeps its decoders on disk reads
    these rows alone, and gets the same id as when loaded whole)."""
    rows = sampled_rows(clt.n_features)
    sampled = {layer: clt.decoder_rows(layer, rows.to(clt.W_enc[str(layer)].device)) for layer in clt.layers}
    views = hashlib.sha256()  # what fingerprint() gives the views, without reading their whole own-layer blocks
    for layer in clt.layers:
        _digest_layer(views, layer, clt.layer_transcoder(layer), sampled[layer][:, 0])
    digest = hashlib.sha256(b"cross-layer transcoder")
    digest.update(views.hexdigest().encode())
    for layer in clt.layers:
        digest.update(sampled[layer][:, 1:].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
