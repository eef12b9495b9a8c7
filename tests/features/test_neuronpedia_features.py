"""Feature files for circuit-tracer's viewer (tccli.features.neuronpedia): where a scan's files go, checked
against the viewer's address for them and circuit-tracer's local server (tests/viewer_rules.py), and one
feature record as the viewer draws it."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from tccli.errors import TcError
from tccli.features.neuronpedia import feature_file, scan_folder, viewer_feature
from viewer_rules import cantor_pair, feature_url, served_file


@pytest.mark.parametrize(
    "scan",
    ["tc-0123456789abcdef", "mntss/transcoder-Llama-3.2-1B", "o/r//sub@rev", "./data/features/a", "./graph_data/x"],
)
def test_files_lie_where_the_viewer_asks_for_them(scan):
    for layer, index in ((0, 0), (0, 7), (4, 0), (11, 24575)):
        url = feature_url(scan, cantor_pair(layer, index))
        assert Path("DIR") / feature_file(scan, layer, index) == served_file(Path("DIR"), url)


def test_scan_folders():
    assert scan_folder("tc-1") == PurePosixPath("features/tc-1")
    assert scan_folder("./data/features/tc-1") == scan_folder("tc-1")  # the local viewer's name for those files
    assert scan_folder("./graph_data/a/b") == PurePosixPath("a/b")


@pytest.mark.parametrize("scan", ["/abs/path", "./elsewhere/x", "../up", "a/../../b", "./data/", "~/x", "C:/x"])
def test_scans_tc_cannot_write_to_are_refused(scan):
    with pytest.raises(TcError, match="scan"):
        scan_folder(scan)


def example(token_index: int, tokens: list[int], acts: list[float], band=None) -> dict:
    out = {"activation": max(acts), "token_index": token_index, "tokens": tokens, "acts": acts}
    return out if band is None else {**out, "band": band}


def test_a_feature_as_the_viewer_draws_it():
    vocab = ["a", " b", "\n", "c"]
    record = {
        "layer": 2,
        "feature": 5,
        "frequency": 0.25,
        "mean_activation": 1.5,
        "max_activation": 3.0,
        # a window of 2 either side: -1 outside the row (the example's token is the middle one)
        "top_examples": [example(40, [-1, 0, 1, 2, 3], [0.0, 0.5, 3.0, 0.0, 0.0])],
        "quantile_examples": [
            example(9, [0, 1, 3, -1, -1], [0.0, 0.0, 1.0, 0.0, 0.0], band=1),
            example(40, [-1, 0, 1, 2, 3], [0.0, 0.5, 3.0, 0.0, 0.0], band=2),
        ],
        "logit_promoted": [[3, 0.9], [7, 0.5]],
        "logit_suppressed": [[0, -0.2]],
    }
    data = viewer_feature(record, vocab, bands=2)
    assert (data["layer"], data["feature"], data["index"]) == (2, 5, 5)
    assert [q["quantile_name"] for q in data["examples_quantiles"]] == [
        "Top activations",
        "Quantile band 2 of 2",
        "Quantile band 1 of 2",
    ]
    top, high, low = (q["examples"][0] for q in data["examples_quantiles"])
    assert top == {
        "tokens": ["a", " b", "\n", "c"],
        "tokens_acts_list": [0.5, 3.0, 0.0, 0.0],
        "train_token_ind": 1,
        "is_repeated_datapoint": False,
    }
    assert high["is_repeated_datapoint"] and not low["is_repeated_datapoint"]  # band 2 repeats the top one
    assert low["tokens"] == ["a", " b", "c"] and low["tokens"][low["train_token_ind"]] == "c"
    assert data["top_logits"] == ["c", "<7>"] and data["bottom_logits"] == ["a"]
    assert (data["act_min"], data["act_max"], data["activation_frequency"]) == (0.0, 3.0, 0.25)


def test_scoring_some_layers_files_them_under_the_whole_sets_id(tmp_path):
    import torch

    from tccli.config.features import ScoreConfig
    from tccli.config.transcoders import TranscoderConfig
    from tccli.features.score import score_scan
    from tccli.transcoders.files import save_transcoder
    from tccli.transcoders.formats import load_transcoder_set
    from tccli.transcoders.set_id import transcoder_set_id
    from tccli.transcoders.transcoder import Transcoder

    for layer in range(2):
        transcoder = Transcoder(TranscoderConfig(d_in=4, d_out=4, n_features=6, layer=layer))
        with torch.no_grad():
            for param in transcoder.parameters():
                param.normal_()
        save_transcoder(transcoder, tmp_path / "tcs" / f"layer_{layer}")
    whole = transcoder_set_id(str(tmp_path / "tcs"), load_transcoder_set(tmp_path / "tcs"))
    some = ScoreConfig(transcoders=str(tmp_path / "tcs"), layers="1", out="v/", format="neuronpedia-features")
    assert score_scan(some, load_transcoder_set(tmp_path / "tcs", layers=[1])) == whole
    assert transcoder_set_id(some.transcoders, load_transcoder_set(tmp_path / "tcs", layers=[1])) != whole
