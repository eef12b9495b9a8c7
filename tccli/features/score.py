"""`tc score` as a command: its options, and loading, scoring and writing the features file.

The scores themselves are computed by ``tccli.features.scoring`` (math, no files); the features file is written
by ``tccli.features.files``. This module ties them to the model, the transcoders and the text.
"""

from __future__ import annotations


from tccli.config.fields import parse_layers
from tccli.errors import fail
from tccli.features.files import vocabulary, write_features
from tccli.features.scoring import ScoreSettings, score_rows
from tccli.config.features import ScoreConfig


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
