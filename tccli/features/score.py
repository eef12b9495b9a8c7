"""`tc score` on what its command loaded: scoring the rows and writing the features file.

The command (``tccli.cli.app``) claims ``--out``, loads the model, the transcoders and the text; the scores
themselves are computed by ``tccli.features.scoring`` (math, no files); the features file is written by
``tccli.features.files`` (or, for --format neuronpedia-features, the viewer's feature files by
``tccli.features.neuronpedia``). This module ties them together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tccli.config.features import ScoreConfig
from tccli.errors import fail
from tccli.features.files import vocabulary, write_features
from tccli.features.scoring import ScoreSettings, score_rows


def check_scorable(transcoders: dict, path: str) -> None:
    """Refuse SAEs: `tc score` describes transcoders (MLP input -> output); ``path`` names them in the message."""
    for transcoder in transcoders.values():
        if transcoder.config.kind != "transcoder":
            raise fail(
                f"{path}: layer {transcoder.config.layer} is an SAE on the MLP output; "
                "tc score scores transcoders (MLP input -> output)"
            )


def score_scan(config: ScoreConfig, transcoders: dict) -> str:
    """The id of the transcoder set `tc score` scores (tccli.transcoders.set_id), from all of its layers:
    the id `tc graph` writes into its graphs of the same set (with --layers, the whole set is read again)."""
    from tccli.features.cross_layer import cross_layer_of
    from tccli.transcoders.formats import load_transcoder_set
    from tccli.transcoders.set_id import transcoder_set_id

    clt = cross_layer_of(transcoders)  # a CLT is loaded whole, whatever --layers scores
    if clt is not None:
        return transcoder_set_id(config.transcoders, clt)
    whole = transcoders if config.layers is None else load_transcoder_set(config.transcoders)
    return transcoder_set_id(config.transcoders, whole)


def load_score_inputs(config: ScoreConfig) -> tuple[Any, dict[int, Any], Any]:
    """What `tc score` reads, loaded and checked before any scoring: (the model, its transcoders (a
    cross-layer transcoder as its per-layer views, tccli.features.cross_layer.LayerViews), a stream
    of token rows: the texts are read now, so bad data fails before any work, and the rows come a batch at a
    time)."""
    from tccli.data.text import stream_rows
    from tccli.features.cross_layer import load_checked_for_scoring
    from tccli.model.loading import check_context, load_model

    loaded = load_model(config.model, config.device, config.model_dtype)
    check_context(config.context, loaded.info)
    transcoders = load_checked_for_scoring(config.transcoders, loaded, config.layers)
    check_scorable(transcoders, config.transcoders)
    rows = stream_rows(
        config.data,
        loaded.tokenizer,
        loaded.info.bos_token_id,
        config.context,
        config.tokens,
        config.seed,
        batch_rows=config.batch_size,
    )
    return loaded, transcoders, rows


def run_score(
    config: ScoreConfig, loaded: Any, transcoders: dict, rows: Any, progress=None, log=lambda message: None
) -> dict:
    """Score ``transcoders`` (checked against ``loaded``'s model and by `check_scorable`) on ``rows`` (a
    ``tccli.data.text.RowStream``) and write the features file ``config.out``, which the caller has claimed.
    Returns a small summary for stderr."""
    from tccli import __version__
    from tccli.config.fields import to_json_dict
    from tccli.features.cross_layer import cross_layer_of
    from tccli.model.loading import torch_dtype

    info = loaded.info
    feature_folder = None
    if config.format == "neuronpedia-features":  # checked before any scoring, from the weights as stored
        from tccli.features.neuronpedia import check_scan_folder

        scan = config.scan or score_scan(config, transcoders)
        feature_folder = check_scan_folder(Path(config.out).expanduser(), scan, config.force)
    clt = cross_layer_of(transcoders)
    for transcoder in [*transcoders.values(), *([clt] if clt is not None else [])]:
        transcoder.to(torch_dtype(loaded.dtype))  # in place: the kernels read activations in the model's dtype
    settings = ScoreSettings(
        top=config.top,
        quantiles=config.quantiles if config.per_quantile else 0,
        per_quantile=config.per_quantile,
        half_window=config.context_window,
        top_tokens=config.top_tokens,
        batch_size=config.batch_size,
        seed=config.seed,
    )
    scores = score_rows(
        loaded,
        transcoders,
        rows,
        config.context,
        settings,
        progress,
        total_rows=rows.n_rows_wanted,
        engine=config.engine,
        release_bridge=True,
        log=log,
    )
    metadata = {
        "tc_version": __version__,
        "model_info": info.to_dict(),
        "transcoders": {
            str(layer): {k: v for k, v in tc.config.to_dict().items() if k != "feature_frequency"}
            for layer, tc in transcoders.items()
        },
        "data": {
            "sources": list(config.data),
            "tokens": rows.n_tokens,
            "context": config.context,
            "seed": config.seed,
            "available_tokens": rows.available_tokens,
        },
        "config": to_json_dict(config),
        "settings": settings.__dict__,
        "vocab": vocabulary(loaded.tokenizer, info.d_vocab),
    }
    if clt is not None:  # the per-layer entries above are its layers' views; this is the whole dictionary
        metadata["cross_layer_transcoder"] = {k: v for k, v in clt.config.to_dict().items() if k != "feature_frequency"}
    if feature_folder is None:
        write_features(config.out, scores, metadata)
    else:
        from tccli.features.neuronpedia import write_feature_files

        write_feature_files(
            Path(config.out).expanduser(), scan, scores, metadata["vocab"], settings.quantiles, config.force
        )
        log(f"feature files for scan {scan!r} in {feature_folder}")
    return {
        "tokens": rows.n_tokens,
        "layers": list(scores),
        "out": str(feature_folder) if feature_folder is not None else config.out,
        "available_tokens": rows.available_tokens,
    }
