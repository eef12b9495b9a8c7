"""Feature files as circuit-tracer's viewer loads them: `tc score --format neuronpedia-features --out DIR/`.

Where the viewer looks (circuit-tracer's ``frontend/assets/feature_examples/init-feature-examples.js``,
``loadFeature``): a feature node's examples are ``{base}/{feature}.json``, ``feature`` being the node's
number in the graph file (the Cantor pairing of layer and index, tccli.nodes.neuronpedia_feature_id) and
``base`` following from the graph's ``scan``:

- a scan beginning with ``./``: ``{scan}``, relative to the viewer's page;
- any other scan: ``./features/{scan}``. circuit-tracer's own viewer sends ``./features/`` to Anthropic's
  server (its ``util.js``), and its newer releases first try a binary index at
  ``huggingface.co/{hub id}/resolve/{revision}/features/index.json.gz``: for a plain scan it shows the
  examples published for that id, not local files. Neuronpedia reads ``{feature_json_base_url}/{feature}.json``.

circuit-tracer's local server (``circuit-tracer start-server --graph_file_dir DIR``) answers ``./data/`` and
``./graph_data/`` from DIR, so the files go where those addresses land:

- scan ``./data/REST`` or ``./graph_data/REST``: ``DIR/REST/{feature}.json``, what the local viewer loads;
- a plain scan S: ``DIR/features/S/{feature}.json``, the ``./features/S`` layout to publish (the same files
  as scan ``./data/features/S``).

Other scans (``/...``, another ``./...``, ``..`` anywhere) name places tc does not write: refused.

A file holds what circuit-tracer's ``frontend/feature_models.py`` lists: ``transcoder_id``, ``index``,
``examples_quantiles`` (``[{quantile_name, examples: [{tokens, tokens_acts_list, train_token_ind,
is_repeated_datapoint}]}]``: the top examples, then each quantile band from the highest), ``top_logits`` and
``bottom_logits`` (token texts), ``act_min``, ``act_max``, ``activation_frequency``; tc adds ``layer`` and
``feature`` (so that a file names its own feature) and ``mean_activation``, and for a feature of a cross-layer
transcoder ``feature_type``: ``"cross layer transcoder"``, the type circuit-tracer's and Neuronpedia's graph
files give a transcoder feature node (circuit-tracer writes it for every transcoder, per-layer or cross-layer;
tc's feature files of a per-layer set leave the key out). ``quantile_values`` and
``histogram`` are left out: tc score keeps no activation histogram, and the viewer then draws none.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path, PurePosixPath

from tccli.errors import fail
from tccli.features.cross_layer import CLT_FEATURE_TYPE
from tccli.features.files import feature_record
from tccli.features.scoring import LayerScores
from tccli.nodes import neuronpedia_feature_id
from tccli.runtime import interrupts, outputs

# The local server's addresses that answer from its --graph_file_dir.
SERVED_FROM_DIR = ("./data/", "./graph_data/")


def scan_folder(scan: str) -> PurePosixPath:
    """Where, relative to DIR, the feature files of ``scan`` go (module docstring)."""
    if scan.startswith(SERVED_FROM_DIR):
        rest = scan.split("/", 2)[2]
    elif scan.startswith(("/", ".", "~")) or "\\" in scan or ":" in scan.split("/", 1)[0]:
        raise fail(
            f"scan {scan!r} names a place tc cannot write feature files to: give a plain id (files in "
            "DIR/features/ID/) or ./data/PATH (files in DIR/PATH/, which circuit-tracer's local server serves)"
        )
    else:
        rest = "features/" + scan
    parts = [part for part in rest.split("/") if part]  # the viewer's URL may hold a hub id's //
    if not parts or any(part in (".", "..") for part in parts):
        raise fail(f"scan {scan!r} does not name a folder (empty, '.' or '..' parts)")
    return PurePosixPath(*parts)


def feature_file(scan: str, layer: int, index: int) -> PurePosixPath:
    """The file, relative to DIR, holding feature ``index`` of ``layer`` for graphs of ``scan``."""
    return scan_folder(scan) / f"{neuronpedia_feature_id(layer, index)}.json"


# ----------------------------------------------------------------------------- one feature


def _token_text(vocab: list[str], token: int) -> str:
    return vocab[token] if 0 <= token < len(vocab) else f"<{token}>"


def _example(example: dict, vocab: list[str], repeated: bool) -> dict:
    """tc's example (a window of token ids centred on the example's token, -1 outside its row) as the
    viewer draws one."""
    kept = [j for j, token in enumerate(example["tokens"]) if token >= 0]
    centre = len(example["tokens"]) // 2
    return {
        "tokens": [_token_text(vocab, example["tokens"][j]) for j in kept],
        "tokens_acts_list": [example["acts"][j] for j in kept],
        "train_token_ind": kept.index(centre),
        "is_repeated_datapoint": repeated,
    }


def viewer_feature(record: dict, vocab: list[str], bands: int) -> dict:
    """A tc feature record (tccli.features.files.feature_record) as the viewer's feature file; ``bands``:
    how many quantile bands tc score sampled."""
    top = record["top_examples"]
    in_top = {example["token_index"] for example in top}
    groups = [{"quantile_name": "Top activations", "examples": [_example(e, vocab, False) for e in top]}]
    for band in range(bands, 0, -1):
        examples = [e for e in record["quantile_examples"] if e.get("band") == band]
        if examples:
            groups.append(
                {
                    "quantile_name": f"Quantile band {band} of {bands}",
                    "examples": [_example(e, vocab, e["token_index"] in in_top) for e in examples],
                }
            )
    shown = [a for group in groups for example in group["examples"] for a in example["tokens_acts_list"]]
    marking = {"feature_type": CLT_FEATURE_TYPE} if "decoder_norms" in record else {}
    return {
        "transcoder_id": f"layer_{record['layer']}",
        "index": record["feature"],
        "layer": record["layer"],
        "feature": record["feature"],
        "examples_quantiles": groups,
        "top_logits": [_token_text(vocab, token) for token, _ in record["logit_promoted"]],
        "bottom_logits": [_token_text(vocab, token) for token, _ in record["logit_suppressed"]],
        "act_min": min([0.0, *shown]),
        "act_max": record["max_activation"],
        "activation_frequency": record["frequency"],
        "mean_activation": record["mean_activation"],
    } | marking


# ----------------------------------------------------------------------------- the folder


def check_scan_folder(folder: Path, scan: str, force: bool) -> Path:
    """The folder of ``scan``'s files in ``folder`` (DIR), refused when it exists unless ``force``; called
    before scoring so that a run does not end refusing its output."""
    target = folder / scan_folder(scan)
    outputs.check_new(target, force, "the feature files")
    return target


def write_feature_files(
    folder: Path, scan: str, scores: dict[int, LayerScores], vocab: list[str], bands: int, force: bool
) -> Path:
    """Every scored feature's file for ``scan`` in ``folder`` (DIR; claimed by the caller). The files are
    written into a temporary folder that replaces the scan's folder in one rename, so a failure (a full
    disk, Ctrl-C) leaves what was there before. Returns the scan's folder."""
    target = check_scan_folder(folder, scan, force)
    staging = outputs.temp_path(target)
    retired = target.with_name(f"{target.name}.{os.getpid()}.old")
    try:
        staging.mkdir(parents=True)
        for layer in sorted(scores):
            for index in range(scores[layer].n_features):
                data = viewer_feature(feature_record(scores[layer], index), vocab, bands)
                name = staging / f"{neuronpedia_feature_id(layer, index)}.json"
                name.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        interrupts.raise_if_swallowed()  # a signal lost in a finaliser: put nothing in place
        if target.exists():
            os.replace(target, retired)  # --force: the old files step aside until the new ones are in place
        try:
            os.replace(staging, target)
        except OSError:
            if retired.exists():
                os.replace(retired, target)
            raise
        outputs.fsync_folder(target.parent)
    except OSError as exc:
        raise outputs.write_error(target, exc) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)
    return target
