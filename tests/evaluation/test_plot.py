"""tc plot: Pareto and training figures from tc's own outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tccli.config.evaluation import PlotConfig
from tccli.errors import TcError
from tccli.evaluation.plot import read_pareto_points, read_training_log, run_plot, series_name


def eval_json(path: Path, rows: list[tuple[int, float, float]], activation="topk", kind="transcoder", skip=False):
    data = {
        "model": "m",
        "transcoders": "t",
        "kinds": {str(layer): kind for layer, _, _ in rows},
        "transcoder_kinds": {
            str(layer): {"activation": activation, "k": 8, "skip": skip, "n_features": 64} for layer, _, _ in rows
        },
        "layers": [
            {"layer": layer, "l0": l0, "recovered_zero": rec, "ce_spliced": 2.0 + (1 - rec)} for layer, l0, rec in rows
        ],
    }
    path.write_text(json.dumps(data))
    return str(path)


def test_pareto_points_and_series(tmp_path):
    a = eval_json(tmp_path / "a.json", [(2, 8.0, 0.8), (4, 8.0, 0.7)])
    b = eval_json(tmp_path / "b.json", [(2, 30.0, 0.75)], activation="relu", kind="sae")
    c = eval_json(tmp_path / "c.json", [(2, 16.0, 0.9)], activation="jumprelu", skip=True)
    points = read_pareto_points([a, b, c], "recovered")
    assert [(p.series, p.layer, p.l0, p.value) for p in points] == [
        ("transcoder TopK", 2, 8.0, 0.8),
        ("transcoder TopK", 4, 8.0, 0.7),
        ("SAE ReLU+L1", 2, 30.0, 0.75),
        ("skip transcoder JumpReLU", 2, 16.0, 0.9),
    ]
    assert read_pareto_points([a], "ce")[0].value == pytest.approx(2.2)
    assert series_name("transcoder", None) == "transcoder"  # an eval file from before the kinds were written


def test_pareto_svg_is_written_and_deterministic(tmp_path):
    files = [eval_json(tmp_path / f"{k}.json", [(1, float(k), 0.5 + k / 100)]) for k in (4, 8, 16)]
    first = run_plot(PlotConfig(what="pareto", inputs=files, out=str(tmp_path / "p.svg")))
    content = first.read_bytes()
    assert content.startswith(b"<?xml") and b"<svg" in content
    second = run_plot(PlotConfig(what="pareto", inputs=files, out=str(tmp_path / "p.svg"), force=True))
    assert second.read_bytes() == content
    png = run_plot(PlotConfig(what="pareto", inputs=files, out=str(tmp_path / "p.png")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_curves_use_tokens_from_the_run_config(tmp_path):
    run = tmp_path / "tcs"
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps({"batch_size": 512}))
    log = run / "train_log.jsonl"
    log.write_text(
        "\n".join(
            json.dumps(
                dict(
                    step=s,
                    layer=layer,
                    lr=1e-3,
                    loss=1 / s,
                    mse=1 / s,
                    l1=3.0,
                    l0=8.0,
                    fvu=0.5 / s,
                    aux=0.0,
                    dead_fraction=0.01,
                )
            )
            for s in (10, 20, 30)
            for layer in (0, 1)
        )
    )
    entries, batch = read_training_log(str(log))
    assert len(entries) == 6 and batch == 512
    out = run_plot(PlotConfig(what="training", inputs=[str(log)], out=str(tmp_path / "curves.png")))
    assert out.stat().st_size > 1000


def test_bad_inputs(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TcError, match="cannot read .* as JSON"):
        read_pareto_points([str(bad)], "recovered")
    bad.write_text(json.dumps({"layers": [{"layer": 1}]}))
    with pytest.raises(TcError, match="lacks layer, l0 or recovered_zero"):
        read_pareto_points([str(bad)], "recovered")
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "layer": 0}\nnot json\n')
    with pytest.raises(TcError, match="log.jsonl:2 is not a line of a tc train log"):
        read_training_log(str(log))
    with pytest.raises(TcError, match="suffix must be one of"):
        PlotConfig(what="pareto", inputs=["a"], out="x.gif").validate()
    with pytest.raises(TcError, match="first argument must be one of pareto, training"):
        PlotConfig(what="curves", inputs=["a"], out="x.svg").validate()


def test_tc_plot_command(tmp_path):
    from conftest import run_tc

    good = eval_json(tmp_path / "a.json", [(2, 8.0, 0.8)])
    result = run_tc("plot", "pareto", good, "-o", str(tmp_path / "f.svg"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "f.svg") and (tmp_path / "f.svg").is_file()
    for args, message in [
        (("pareto", str(tmp_path / "missing.json"), "-o", str(tmp_path / "g.svg")), "missing.json does not exist"),
        (("pareto", good, "-o", str(tmp_path / "g.gif")), "suffix must be one of"),
        (("training", good, "-o", str(tmp_path / "g.svg")), "is not a line of a tc train log"),
    ]:
        result = run_tc("plot", *args)
        assert result.returncode == 2 and result.stderr.startswith("tc: error: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "g.svg").exists()


def hide_module(monkeypatch, name: str) -> None:
    """Make ``import name`` (and of its submodules) fail as when the package is not installed."""
    import sys

    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, loaded)
    monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: import raises ImportError


def test_without_matplotlib_plot_says_how_to_install_it(tmp_path, monkeypatch):
    good = eval_json(tmp_path / "a.json", [(2, 8.0, 0.8)])
    hide_module(monkeypatch, "matplotlib")
    with pytest.raises(TcError, match=r"^tc plot needs matplotlib: pip install 'tccli\[plot\]'$"):
        run_plot(PlotConfig(what="pareto", inputs=[good], out=str(tmp_path / "f.svg")))
    assert not (tmp_path / "f.svg").exists()


def test_tc_plot_without_matplotlib_is_one_line(tmp_path):
    """The real command, in a Python where `import matplotlib` fails as when it is not installed."""
    import os

    from conftest import run_tc

    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ModuleNotFoundError("No module named matplotlib", name="matplotlib")\n')
    path = os.pathsep.join(p for p in (str(shadow.parent), os.environ.get("PYTHONPATH")) if p)
    good = eval_json(tmp_path / "a.json", [(2, 8.0, 0.8)])
    result = run_tc("plot", "pareto", good, "-o", str(tmp_path / "f.svg"), env={"PYTHONPATH": path})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "tc: error: tc plot needs matplotlib: pip install 'tccli[plot]'"
    assert not (tmp_path / "f.svg").exists()


def test_pareto_points_from_stdin(tmp_path, pipe_into_stdin):
    """`tc eval --json | tc plot pareto - b.json -o p.svg`: the same points as from the file."""
    a = eval_json(tmp_path / "a.json", [(2, 8.0, 0.8), (4, 8.0, 0.7)])
    b = eval_json(tmp_path / "b.json", [(2, 30.0, 0.75)], activation="relu", kind="sae")
    pipe_into_stdin(Path(a).read_bytes())
    piped, from_file = read_pareto_points(["-", b], "recovered"), read_pareto_points([a, b], "recovered")
    assert [(p.series, p.layer, p.l0, p.value) for p in piped] == [
        (p.series, p.layer, p.l0, p.value) for p in from_file
    ]
    with pytest.raises(TcError, match="stdin holds one input, but FILE 1 and FILE 2 each say -"):
        run_plot(PlotConfig(what="pareto", inputs=["-", "-"], out=str(tmp_path / "p.svg")))
    with pytest.raises(TcError, match=r"a training log cannot be read from stdin \(the plot reads train_config.json"):
        read_training_log("-")
