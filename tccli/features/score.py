"""`tc score` as a command: its options, and loading, scoring and writing the features file.

The scores themselves are computed by ``tccli.features.scoring`` (math, no files); the features file is written
by ``tccli.features.files``. This module ties them to the model, the transcoders and the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tccli.config.fields import CaptureOptions, DataOptions, ModelOptions, option, parse_layers
from tccli.errors import fail
from tccli.features.files import vocabulary, write_features
from tccli.features.scoring import ScoreSettings, score_rows


@dataclass
class ScoreConfig(ModelOptions, CaptureOptions, DataOptions):
    """Options of `tc score`."""

    transcoders: Optional[str] = option(
        None, "Transcoder folder, or a folder of layer_L transcoder folders.", required=True)
    layers: Optional[str] = option(None, "Layers to score, e.g. 2 or 0,3-4 (default: every transcoder given).")
    out: Optional[str] = option(None, "Features file to write: .h5 (HDF5) or .jsonl (one feature a line).",
                                required=True)
    top: int = option(20, "Top-activating examples kept per feature.")
    quantiles: int = option(10, "Activation bands to sample examples from (0: none).")
    per_quantile: int = option(2, "Examples kept per band.")
    context_window: int = option(8, "Tokens shown on each side of an example.")
    top_tokens: int = option(10, "Tokens (and pullback features) listed per de-embedding / logit / pullback table.")
    batch_size: int = option(32, "Rows of --context tokens per forward pass.")
    force: bool = option(False, "Replace --out if it exists (it is still written to a temporary file first).",
                         save=False)
    quiet: bool = option(False, "No progress on stderr.", save=False)

    def validate(self) -> None:
        ModelOptions.validate(self)
        CaptureOptions.validate(self)
        DataOptions.validate(self)
        if not self.out or not str(self.out).endswith((".h5", ".hdf5", ".jsonl")):
            raise fail(f"--out must end in .h5 or .jsonl, got {self.out!r}")
        for name in ("top", "batch_size", "top_tokens"):
            if getattr(self, name) < 1:
                raise fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("quantiles", "per_quantile", "context_window"):
            if getattr(self, name) < 0:
                raise fail(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")


def run_score(config: ScoreConfig, progress=None, log=lambda message: None) -> dict:
    """`tc score`: load, stream, write the features file. Returns a small summary for stderr."""
    from tccli.runtime import outputs

    with outputs.claim(config.out, config.force, [*config.data, config.transcoders, config.model]):
        return _score(config, progress, log)


def _score(config: ScoreConfig, progress, log) -> dict:
    """`run_score` once its output is claimed (checked and locked)."""
    from tccli import __version__
    from tccli.config.fields import to_json_dict
    from tccli.transcoders.formats import load_transcoder_set
    from tccli.model.loading import check_context, load_model, torch_dtype
    from tccli.data.text import stream_rows
    from tccli.transcoders.files import check_matches_model

    loaded = load_model(config.model, config.device, config.model_dtype)
    info = loaded.info
    check_context(config.context, info)
    layers = parse_layers(config.layers, info.n_layers) if config.layers else None
    transcoders = load_transcoder_set(config.transcoders, loaded.device, layers)
    for transcoder in transcoders.values():
        check_matches_model(transcoder, info)
        if transcoder.config.kind != "transcoder":
            raise fail(f"{config.transcoders}: layer {transcoder.config.layer} is an SAE on the MLP output; "
                       "tc score scores transcoders (MLP input -> output)")
        transcoder.to(torch_dtype(loaded.dtype))
    # the texts are read now (bad data fails before any work); the token rows come a batch at a time
    rows = stream_rows(config.data, loaded.tokenizer, info.bos_token_id, config.context, config.tokens, config.seed,
                       batch_rows=config.batch_size)
    settings = ScoreSettings(top=config.top, quantiles=config.quantiles if config.per_quantile else 0,
                             per_quantile=config.per_quantile, half_window=config.context_window,
                             top_tokens=config.top_tokens, batch_size=config.batch_size, seed=config.seed)
    scores = score_rows(loaded, transcoders, rows, config.context, settings, progress, total_rows=rows.n_rows_wanted,
                        engine=config.engine, release_bridge=True, log=log)
    metadata = {
        "tc_version": __version__,
        "model_info": info.to_dict(),
        "transcoders": {str(layer): {k: v for k, v in tc.config.to_dict().items() if k != "feature_frequency"}
                        for layer, tc in transcoders.items()},
        "data": {"sources": list(config.data), "tokens": rows.n_tokens, "context": config.context,
                 "seed": config.seed, "available_tokens": rows.available_tokens},
        "config": to_json_dict(config),
        "settings": settings.__dict__,
        "vocab": vocabulary(loaded.tokenizer, info.d_vocab),
    }
    write_features(config.out, scores, metadata)
    return {"tokens": rows.n_tokens, "layers": list(scores), "out": config.out,
            "available_tokens": rows.available_tokens}
