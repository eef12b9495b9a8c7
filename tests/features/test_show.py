"""tc show: the terminal view, the self-contained HTML page (rendered in headless Chromium when it is
installed), and one-line errors for unknown features, foreign files and other models."""

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import TOKENIZER_TEXT, run_tc
from tccli.errors import TcError
from tccli.features.files import FeaturesFile
from tccli.features.show import default_refs, parse_feature_list, render_html, visible
from tccli.nodes import parse_feature

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "render_features_html.sh"


@pytest.fixture(scope="module")
def features_h5(tiny_model_dirs, tmp_path_factory) -> Path:
    """Features of one random 24-feature transcoder on layer 0 of the tiny Llama, scored in-process."""
    from tccli.config.features import ScoreConfig
    from tccli.config.transcoders import TranscoderConfig
    from tccli.features.score import load_score_inputs, run_score
    from tccli.model.loading import load_model
    from tccli.transcoders.files import save_transcoder
    from tccli.transcoders.transcoder import Transcoder

    root = tmp_path_factory.mktemp("show")
    model_dir = tiny_model_dirs["llama"]
    config = ScoreConfig(
        model=str(model_dir),
        transcoders=str(root / "tc"),
        data=[str(root / "corpus.txt")],
        tokens=640,
        context=32,
        top=5,
        quantiles=3,
        per_quantile=2,
        context_window=3,
        out=str(root / "features.h5"),
        quiet=True,
    )
    loaded = load_model(config.model, config.device, config.model_dtype)  # as tc score loads it
    info = loaded.info
    torch.manual_seed(0)
    tc = Transcoder(TranscoderConfig(d_in=info.d_model, d_out=info.d_model, n_features=24, layer=0))
    with torch.no_grad():
        for p in tc.parameters():
            p.normal_()
        tc.b_enc[5] = -1e6  # feature 5 never fires
    save_transcoder(tc, root / "tc")
    (root / "corpus.txt").write_text("\n\n".join(f"Tale {i}. " + TOKENIZER_TEXT[i % 4] for i in range(30)))
    run_score(config, *load_score_inputs(config))
    return Path(config.out)


def test_feature_names():
    assert parse_feature("L2.F57") == (2, 57)
    assert parse_feature("l0.f3") == (0, 3)
    assert parse_feature_list("L2.F57, L3.F1") == [(2, 57), (3, 1)]
    with pytest.raises(TcError, match="bad feature name 'F57'"):
        parse_feature("F57")


def test_visible_marks_whitespace_and_control_characters():
    assert visible("a\nb\tc\x00") == "a⏎b⇥c␀"
    assert visible("") == "∅"


def test_terminal_view(features_h5):
    features = FeaturesFile.open(features_h5)
    record = features.feature(0, 1)
    result = run_tc("show", str(features_h5), "L0.F1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "L0.F1" in out and "de-embedding" in out and "promotes" in out and "top examples" in out
    assert f"{record['max_activation']:.3g}" in out
    top_token = features.token_text(record["top_examples"][0]["tokens"][3])
    assert visible(top_token).strip() in out
    dead = run_tc("show", str(features_h5), "L0.F5")
    assert dead.returncode == 0 and "dead (never fired)" in dead.stdout and "no examples" in dead.stdout


def test_html_page_is_self_contained_with_a_card_per_feature(features_h5, tmp_path):
    features = FeaturesFile.open(features_h5)
    refs = default_refs(features, limit=50)
    assert (0, 5) not in refs and len(refs) == 23  # every live feature, the dead one left out
    page = render_html(features, [(0, 1), (0, 2)], n_examples=4)
    assert page.count('class="card"') == 2 and 'id="L0.F1"' in page and 'id="L0.F2"' in page
    assert page.count("<svg") == 4  # a density and an activation histogram per card
    for needle in ("<script", " src=", " href=", "url(", "@import", "<link"):
        assert needle not in page
    assert re.findall(r"https?://[^\"' ]+", page) == ["http://www.w3.org/2000/svg"] * 4  # namespaces only
    record = features.feature(0, 1)
    first = record["top_examples"][0]
    assert f'title="{first["acts"][3]:.4f}"' in page

    out = tmp_path / "page.html"
    result = run_tc("show", str(features_h5), "--html", str(out), "--features", "L0.F1,L0.F2", "--examples", "4")
    assert result.returncode == 0, result.stderr
    assert out.read_text(encoding="utf-8") == page


def test_show_bad_input_is_one_line(features_h5, tiny_model_dirs, tmp_path, capsys):
    not_features = tmp_path / "other.h5"
    import h5py

    with h5py.File(not_features, "w") as f:
        f["x"] = [1, 2, 3]
    cases = [
        ((str(features_h5), "L0.F24"), "no feature L0.F24"),
        ((str(features_h5), "L3.F0"), "has no layer 3"),
        ((str(features_h5), "layer0"), "bad feature name"),
        ((str(features_h5), "--html", str(tmp_path / "x.html"), "--features", "L0.F99"), "no feature L0.F99"),
        ((str(features_h5), "L0.F0", "--model", str(tiny_model_dirs["gpt2"])), "computed on another model"),
        ((str(not_features), "L0.F0"), "is not a tc features file"),
        ((str(tmp_path / "missing.jsonl"), "L0.F0"), "does not exist"),
        ((str(features_h5),), "nothing to show"),
    ]
    for args, message in cases:
        code, _, stderr = tc_in_process(capsys, "show", *args)
        assert code == 2, args
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tc: error:") and message in lines[0], (args, stderr)
    assert not (tmp_path / "x.html").exists()
    code, stdout, _ = tc_in_process(capsys, "show", str(features_h5), "L0.F0", "--model", str(tiny_model_dirs["llama"]))
    assert code == 0 and "L0.F0" in stdout
    # and once through a real process: the exit status a shell sees
    result = run_tc("show", str(features_h5), "L0.F24")
    assert result.returncode == 2 and result.stderr.strip().startswith("tc: error: no feature L0.F24")


def tc_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """Run `tc` in this process (what the subprocess would run, without its start-up cost)."""
    from tccli.cli.app import main

    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.mark.skipif(
    not (shutil.which("chromium") or shutil.which("chromium-browser")),
    reason="chromium is not installed (apt-get install -y chromium)",
)
def test_html_renders_in_headless_chromium(features_h5, tmp_path):
    features = FeaturesFile.open(features_h5)
    page = tmp_path / "page.html"
    page.write_text(render_html(features, [(0, 1), (0, 2)], n_examples=5), encoding="utf-8")
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    shots = {}
    for name, source in (("page", page), ("blank", blank)):
        shot = tmp_path / f"{name}.png"
        subprocess.run(
            ["bash", str(SCRIPT), str(source), str(shot), "900x700"], check=True, timeout=120, capture_output=True
        )
        assert png_size(shot) == (900, 700)
        shots[name] = shot.stat().st_size
    # a rendered page of cards compresses far worse than an empty white page
    assert shots["page"] > 5 * shots["blank"]
