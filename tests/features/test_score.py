"""tc score as a command: the features files it writes (.h5 and .jsonl alike), bad input, its options,
bounded memory (rows streamed) and refusing to overwrite."""

import json

import numpy as np
import pytest
import torch

from conftest import TOKENIZER_TEXT, run_tc
from tccli.errors import TcError


@pytest.fixture(scope="module")
def scored_files(tiny_model_dirs, tiny_models, tmp_path_factory):
    """`tc score` run once on the tiny Llama with random transcoders, to .h5 and .jsonl."""
    from tccli.config.transcoders import TranscoderConfig
    from tccli.transcoders.files import save_transcoder
    from tccli.transcoders.transcoder import Transcoder

    root = tmp_path_factory.mktemp("score")
    model_dir = tiny_model_dirs["llama"]
    info = tiny_models["llama"].info
    for layer in range(info.n_layers):
        torch.manual_seed(layer)
        tc = Transcoder(
            TranscoderConfig(
                d_in=info.d_model,
                d_out=info.d_model,
                n_features=16,
                layer=layer,
                model_name=info.name,
                model_architecture=info.architecture,
                weight_processing=info.weight_processing,
                input_hook=info.layer(layer).mlp_in,
                output_hook=info.layer(layer).mlp_out,
            )
        )
        with torch.no_grad():
            for p in tc.parameters():
                p.normal_()
        save_transcoder(tc, root / "tcs" / f"layer_{layer}")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(f"Story {i}. " + TOKENIZER_TEXT[i % 4] for i in range(30)) + "\n")
    outs = {}
    for suffix in ("h5", "jsonl"):
        out = root / f"features.{suffix}"
        result = run_tc(
            "score",
            "--model",
            str(model_dir),
            "--transcoders",
            str(root / "tcs"),
            "--data",
            str(corpus),
            "--tokens",
            "600",
            "--context",
            "24",
            "--top",
            "4",
            "--quantiles",
            "2",
            "--per-quantile",
            "2",
            "--context-window",
            "3",
            "--batch-size",
            "5",
            "--out",
            str(out),
            "--quiet",
        )
        assert result.returncode == 0, result.stderr
        outs[suffix] = out
    return dict(outs, root=root, model=model_dir, corpus=corpus)


def test_h5_and_jsonl_hold_the_same_features(scored_files):
    from tccli.features.files import FeaturesFile

    h5 = FeaturesFile.open(scored_files["h5"])
    jsonl = FeaturesFile.open(scored_files["jsonl"])
    assert h5.layers == jsonl.layers == [0, 1]
    assert h5.meta["model_info"]["architecture"] == "LlamaForCausalLM"
    assert h5.meta["data"]["tokens"] == 600 - 600 % 24
    assert h5.meta["vocab"] == jsonl.meta["vocab"] and len(h5.vocab) == h5.meta["model_info"]["d_vocab"]
    for layer in (0, 1):
        assert np.array_equal(h5.frequencies(layer), jsonl.frequencies(layer))
        for i in range(16):
            a, b = h5.feature(layer, i), jsonl.feature(layer, i)
            assert json.loads(json.dumps(a)) == b
    record = h5.feature(1, 3)
    assert len(record["top_examples"]) <= 4 and all(len(e["tokens"]) == 7 for e in record["top_examples"])
    assert all(pl == 0 for pl, _, _ in record["pullbacks"]) and len(record["pullbacks"]) == 10


def test_mean_activations_are_frequency_times_the_active_mean(scored_files):
    """What a mean ablation (tc intervene / validate --ablation mean) sets a feature to: its mean over all tokens."""
    from tccli.features.files import FeaturesFile

    for suffix in ("h5", "jsonl"):
        features = FeaturesFile.open(scored_files[suffix])
        for layer in (0, 1):
            means = features.mean_activations(layer)
            assert means.shape == (16,) and (means > 0).any()
            for i in range(16):
                record = features.feature(layer, i)
                assert means[i] == pytest.approx(record["frequency"] * record["mean_activation"], rel=1e-6)


def test_score_bad_input_is_one_line(scored_files, tiny_model_dirs, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    base = ["score", "--transcoders", str(scored_files["root"] / "tcs"), "--out", str(tmp_path / "f.h5")]
    cases = [
        (["--model", str(scored_files["model"]), "--data", str(empty)], "no text in"),
        (["--model", str(tiny_model_dirs["gpt2"]), "--data", str(scored_files["corpus"])], "trained on a"),
    ]
    for extra, message in cases:
        result = run_tc(*base, *extra)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tc: error:") and message in lines[0], result.stderr
    assert not (tmp_path / "f.h5").exists()


def test_score_config_validation():
    from tccli.config.features import ScoreConfig

    with pytest.raises(TcError, match="--out must end in .h5 or .jsonl"):
        ScoreConfig(transcoders="t", out="f.csv", data=["x.txt"]).validate()
    with pytest.raises(TcError, match="--top must be at least 1"):
        ScoreConfig(transcoders="t", out="f.h5", data=["x.txt"], top=0).validate()


def score_config(files, out, **overrides):
    from tccli.config.features import ScoreConfig

    options = dict(
        model=str(files["model"]),
        transcoders=str(files["root"] / "tcs"),
        data=[str(files["corpus"])],
        tokens=240,
        context=24,
        top=3,
        quantiles=2,
        per_quantile=1,
        batch_size=4,
        out=str(out),
        quiet=True,
    )
    return ScoreConfig(**{**options, **overrides})


def score_files(config):
    """What `tc score` does once its settings are checked: claim --out, load the model, the transcoders and
    the text it names, score; the summary."""
    from tccli.features.score import load_score_inputs, run_score
    from tccli.runtime import outputs

    with outputs.claim(config.out, config.force, [*config.data, config.transcoders, config.model]):
        loaded, transcoders, rows = load_score_inputs(config)
        return run_score(config, loaded, transcoders, rows)


def test_score_streams_its_rows(scored_files, tmp_path, monkeypatch):
    import tccli.data.text as text
    from tccli.features.files import FeaturesFile

    def all_rows_at_once(*args, **kwargs):
        raise AssertionError("tc score must not hold every row at once")

    for name in ("load_rows", "pack_rows"):
        monkeypatch.setattr(text, name, all_rows_at_once)
    monkeypatch.setattr(text.RowStream, "collect", all_rows_at_once)
    out = tmp_path / "f.h5"
    summary = score_files(score_config(scored_files, out, tokens=10**6))
    features = FeaturesFile.open(out)
    # the corpus holds fewer tokens than asked for: counted once the stream has run out
    available = features.meta["data"]["available_tokens"]
    assert summary["available_tokens"] == available and available is not None
    assert summary["tokens"] == features.meta["data"]["tokens"] == available - available % 24


def test_score_refuses_an_existing_out_without_force(scored_files, tmp_path):
    from tccli.features.files import FeaturesFile

    out = tmp_path / "f.jsonl"
    out.write_text("precious\n")
    result = run_tc(
        "score",
        "--model",
        str(scored_files["model"]),
        "--transcoders",
        str(scored_files["root"] / "tcs"),
        "--data",
        str(scored_files["corpus"]),
        "--out",
        str(out),
        "--quiet",
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith("tc: error:") and "already exists" in lines[0] and "--force" in lines[0]
    assert out.read_text() == "precious\n"
    with pytest.raises(TcError, match="already exists"):
        score_files(score_config(scored_files, out))
    score_files(score_config(scored_files, out, force=True))
    assert FeaturesFile.open(out).meta["data"]["tokens"] == 240
    assert not list(tmp_path.glob("*.tmp"))


def test_a_jsonl_features_file_reads_the_same_from_stdin(scored_files, pipe_into_stdin, capsys):
    """`... | tc show - L1.F3`: the JSONL bytes from a pipe, indexed in memory; HDF5 is refused (it needs seeking)."""
    from tccli.cli.app import main
    from tccli.features.files import FeaturesFile

    jsonl = scored_files["jsonl"]
    pipe_into_stdin(jsonl.read_bytes())
    piped, from_file = FeaturesFile.open("-"), FeaturesFile.open(jsonl)
    assert piped.meta == from_file.meta and str(piped.path) == "stdin"
    for layer in (0, 1):
        assert np.array_equal(piped.frequencies(layer), from_file.frequencies(layer))
        assert [piped.feature(layer, i) for i in range(16)] == [from_file.feature(layer, i) for i in range(16)]
    main(["show", str(jsonl), "L1.F3"])
    shown = capsys.readouterr().out
    pipe_into_stdin(jsonl.read_bytes())
    main(["show", "-", "L1.F3"])
    assert capsys.readouterr().out == shown and "L1.F3" in shown
    pipe_into_stdin(scored_files["h5"].read_bytes())
    with pytest.raises(TcError, match="an HDF5 file cannot be read from stdin: HDF5 is read by seeking in a file"):
        FeaturesFile.open("-")
