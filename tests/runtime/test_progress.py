"""Progress bars in a real terminal (a pseudo-terminal), none elsewhere, and the demo's first steps.

Every long command runs here with stdin, stdout and stderr on a pty, as in an interactive shell: it must
exit 0 and draw its progress bar. No other test sees `tc` in a terminal, which is how a progress bar
that crashed every `tc cache` in a real shell went unnoticed.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from conftest import run_tc, run_tc_in_terminal

REPO = Path(__file__).resolve().parents[2]
PROMPT = "The war lasted from the year 1735 to the year 17"


def assert_clean_progress(code: int, output: str, *words: str) -> None:
    assert code == 0, output[-3000:]
    assert "Traceback" not in output and "tc: error" not in output and "internal error" not in output, output[-3000:]
    for word in words:
        assert word in output, output[-3000:]
    # the bar itself: rich draws it with box characters, and the count as done/total
    assert "━" in output and re.search(r"\d[\d,]*/\d[\d,]*", output), output[-3000:]


@pytest.mark.process
def test_cache_draws_its_bar_in_a_terminal(artefacts, tmp_path):
    code, output = run_tc_in_terminal(
        "cache",
        "--data",
        str(artefacts.text),
        "--tokens",
        "2k",
        "--context",
        "64",
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--out",
        str(tmp_path / "a.h5"),
    )
    assert_clean_progress(code, output, "caching", "tokens")


@pytest.mark.process
def test_train_draws_its_bar_in_a_terminal(artefacts, tmp_path):
    code, output = run_tc_in_terminal(
        "train",
        "--cache",
        str(artefacts.cache),
        "--out",
        str(tmp_path / "t"),
        "--tokens",
        "4096",
        "--batch-size",
        "256",
        "--expansion",
        "2",
        "--log-every",
        "4",
    )
    assert_clean_progress(code, output, "training", "steps", "step 4/16")


@pytest.mark.process
def test_eval_draws_its_bar_in_a_terminal(artefacts):
    code, output = run_tc_in_terminal(
        "eval",
        "--data",
        str(artefacts.text),
        "--tokens",
        "1k",
        "--context",
        "64",
        "--device",
        "cpu",
        "--transcoders",
        str(artefacts.tcs),
        "--batch-size",
        "4",
    )
    assert_clean_progress(code, output, "batches")


@pytest.mark.process
def test_score_draws_its_bar_in_a_terminal(artefacts, tmp_path):
    code, output = run_tc_in_terminal(
        "score",
        "--data",
        str(artefacts.text),
        "--tokens",
        "1k",
        "--context",
        "64",
        "--device",
        "cpu",
        "--transcoders",
        str(artefacts.tcs),
        "--batch-size",
        "4",
        "--out",
        str(tmp_path / "f.jsonl"),
    )
    assert_clean_progress(code, output, "scoring", "rows")


@pytest.mark.process
def test_circuit_draws_its_bar_in_a_terminal(artefacts, tmp_path):
    code, output = run_tc_in_terminal(
        "circuit",
        "--transcoders",
        str(artefacts.tcs),
        "--prompt",
        PROMPT,
        "--logit",
        "4",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "g.dot"),
    )
    assert_clean_progress(code, output, "tracing the circuit")


@pytest.mark.process
def test_greater_than_draws_its_bar_in_a_terminal(artefacts):
    code, output = run_tc_in_terminal("greater-than", "--device", "cpu", "--transcoders", str(artefacts.tcs))
    assert_clean_progress(code, output, "model runs", "probability difference")


@pytest.mark.process
def test_graph_draws_its_bar_in_a_terminal(artefacts, tmp_path):
    code, output = run_tc_in_terminal(
        "graph",
        "--transcoders",
        str(artefacts.tcs),
        "--prompt",
        PROMPT,
        "--device",
        "cpu",
        "--batch-size",
        "8",
        "--out",
        str(tmp_path / "g.json"),
    )
    assert_clean_progress(code, output, "feature rows", "replacement score")


@pytest.mark.process
def test_validate_draws_its_bar_in_a_terminal(artefacts, tmp_path):
    code, output = run_tc_in_terminal(
        "validate",
        str(artefacts.graph),
        "--device",
        "cpu",
        "--random",
        "2",
        "--batch-size",
        "4",
        "--out",
        str(tmp_path / "v.json"),
    )
    assert_clean_progress(code, output, "model runs", "rows")
    assert (tmp_path / "v.json").is_file()


@pytest.mark.process
def test_intervene_runs_in_a_terminal(artefacts):
    """Two forward passes: too short for a bar, but it must run cleanly on a terminal."""
    code, output = run_tc_in_terminal(
        "intervene",
        "--transcoders",
        str(artefacts.tcs),
        "--prompt",
        PROMPT,
        "--device",
        "cpu",
        "--ablate",
        "mlp0.f1@3",
        "--logit",
        "4",
    )
    assert code == 0 and "Traceback" not in output and "tc: error" not in output, output[-3000:]


@pytest.mark.process
def test_torchrun_cache_draws_one_bar_in_a_terminal(artefacts, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this python")
    code, output = run_tc_in_terminal(
        program=(
            str(torchrun),
            "--nproc-per-node",
            "2",
            "-m",
            "tccli",
            "cache",
            "--data",
            str(artefacts.text),
            "--tokens",
            "2k",
            "--context",
            "64",
            "--device",
            "cpu",
            "--batch-size",
            "2",
            "--out",
            str(tmp_path / "a.h5"),
        )
    )
    assert_clean_progress(code, output, "caching")
    assert (tmp_path / "a.h5").is_file()


def test_no_bar_when_stderr_is_not_a_terminal(artefacts, tmp_path):
    result = run_tc(
        "train",
        "--cache",
        str(artefacts.cache),
        "--out",
        str(tmp_path / "t"),
        "--tokens",
        "2k",
        "--batch-size",
        "256",
        "--expansion",
        "2",
    )
    # tc train's metric lines only, as plain lines (7 steps, --log-every 50: the last step's line per layer)
    assert result.returncode == 0 and result.stderr, result.stderr
    for line in result.stderr.splitlines():
        assert re.fullmatch(r"step 7/7 layer \d+ lr \S+ loss .* FVU \S+ dead \S+ \(\d+s\)", line), result.stderr
    result = run_tc(
        "cache",
        "--data",
        str(artefacts.text),
        "--tokens",
        "1k",
        "--context",
        "64",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "a.h5"),
    )
    assert result.returncode == 0 and "\x1b" not in result.stderr and "━" not in result.stderr, result.stderr


@pytest.mark.process
def test_png_is_not_written_to_a_terminal(artefacts):
    code, output = run_tc_in_terminal("export", str(artefacts.graph), "--format", "png")
    assert code == 2 and "tc: error: --format png is binary and stdout is a terminal" in output, output
    assert "PNG" not in output


@pytest.mark.process
def test_demo_first_two_commands_pass_in_a_terminal(tmp_path):
    """`make demo` in an interactive shell: examples/demo.sh up to its `tc info`, on a pty."""
    lines = (REPO / "examples" / "demo.sh").read_text().splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("tc info"))
    script = tmp_path / "demo_start.sh"
    script.write_text("\n".join(lines[: end + 1]).replace('cd "$(dirname "$0")/.."', f"cd {REPO}") + "\n")
    bash = shutil.which("bash")
    os.environ.setdefault("PATH", "")
    env_path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    code, output = run_tc_in_terminal(
        program=("env", f"PATH={env_path}", f"OUT={tmp_path / 'demo-out'}", bash, str(script))
    )
    assert_clean_progress(code, output, "caching", "tc activation cache, complete")


def test_bar_draws_on_a_terminal_before_and_after_the_total_is_known(monkeypatch):
    """A bar renders while its total is unknown (formatting a None total crashed every terminal run once)."""
    import io

    from rich.console import Console

    from tccli.runtime import progress

    screen = io.StringIO()
    monkeypatch.setattr(progress, "stderr_console", lambda: Console(file=screen, force_terminal=True, width=100))
    with progress.bar(False, "tokens") as update:
        assert update is not progress.no_progress
        update("caching", 1_234, None)
        update("caching", 2_000, 5_000)
    assert "1,234 tokens" in screen.getvalue() or "2,000/5,000 tokens" in screen.getvalue()
