"""The README's figures: scripts/readme_figures.py regenerates every block of them; `check` compares.

The fast tests check the mechanism (markers, registry, comparison). `test_readme_figures_are_current`
regenerates every deterministic figure (make demo's cache and training on the built-in model, and
stories260K's walkthrough when ../shared is there): several minutes on 2 cores, marked slow.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "readme_figures.py"


@pytest.fixture(scope="module")
def figures():
    spec = importlib.util.spec_from_file_location("readme_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["readme_figures"] = module
    spec.loader.exec_module(module)
    return module


def test_every_registered_figure_has_one_block_and_every_block_is_registered(figures):
    text = "".join(page.read_text() for page in figures.pages())
    assert any("docs" in page.parts for page in figures.pages())  # the docs site's pages are searched
    blocks = figures.readme_blocks(text)
    assert set(blocks) == set(figures.FIGURES)
    for name in blocks:
        assert text.count(f"<!-- figures: {name} -->") == 1 and text.count(f"<!-- /figures: {name} -->") == 1
        assert blocks[name].strip(), f"README block {name} is empty: run readme_figures.py update {name}"
    assert all(figure.setup in figures.SETUPS for figure in figures.FIGURES.values())
    unpaired = re.findall(r"^<!-- /?figures: .*$", figures.BLOCK.sub("", text), re.M)
    assert unpaired == []  # no marker without its twin


def test_replace_blocks_touches_only_the_named_ones(figures):
    text = (
        "intro\n<!-- figures: a -->\n    old a\n<!-- /figures: a -->\nmiddle\n"
        "<!-- figures: b-2 -->\n    old b\n<!-- /figures: b-2 -->\nend\n"
    )
    assert figures.readme_blocks(text) == {"a": "    old a\n", "b-2": "    old b\n"}
    new = figures.replace_blocks(text, {"b-2": "    new b\n    two lines\n"})
    assert new == text.replace("    old b\n", "    new b\n    two lines\n")
    assert figures.readme_blocks(new)["a"] == "    old a\n"


def test_differences_allow_one_unit_in_the_last_digit_only(figures):
    readme = '    clean model  0.615\n    L0.F339 at " 17"  path 0.365, direct 0.12\n    1,024 features\n'
    assert figures.differences(readme, readme) == []
    assert figures.differences(readme, readme.replace("0.615", "0.616")) == []  # last digit flipped
    assert figures.differences(readme, readme.replace("0.615", "0.617"))  # stale
    assert figures.differences(readme, readme.replace("0.615", "0.226"))  # the stale table
    assert figures.differences(readme, readme.replace("F339", "F338"))  # integers: exact
    assert figures.differences(readme, readme.replace("1,024", "1,025"))
    assert figures.differences(readme, readme.replace("direct", "only"))  # text: exact
    assert figures.differences(readme, readme + "    one more line\n")


def test_commands_are_shown_as_runnable_shell_lines(figures):
    for figure in figures.FIGURES.values():
        for command in figure.commands:
            lines = figures.shell_lines(command)
            assert lines[0].startswith(("$ tc ", "$ python3 scripts/")) and all(len(line) <= 102 for line in lines)
            joined = " ".join(line.rstrip("\\").strip() for line in lines)[2:]
            assert shlex.split(joined) == shlex.split(command)


def test_outputs_name_paths_as_the_user_sees_them(figures, tmp_path):
    runner = figures.Runner(tmp_path)
    command = "tc export demo-out/g.json --model ../shared/models/stories260K"
    real = runner.real(command)
    assert str(tmp_path / "demo-out") in real and str(figures.SHARED) in real
    assert (
        runner.normalise(f"wrote {tmp_path}/demo-out/g.svg from {figures.SHARED}/models/x")
        == "wrote demo-out/g.svg from ../shared/models/x"
    )


@pytest.mark.slow
def test_readme_figures_are_current():
    """Regenerates every deterministic README figure and compares (minutes: make demo's training)."""
    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "check"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=3600
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "figures match" in result.stdout


def test_validation_table_lays_out_each_result_as_a_column(tmp_path):
    """scripts/validation_table.py: the README's validation figures, one column per `tc validate --json`."""

    def result(mode: str, necessity: float, spearman: float) -> dict:
        spread = {"mean": 0.5, "min": 0.25, "max": 0.75}
        return {
            "graph": "demo-out/g.json",
            "mode": mode,
            "ablation": "zero",
            "prompts": 100,
            "prompt_source": "greater-than",
            "circuit_size": {"feature": 10, "head": 4},
            "target": {"kind": "logit_diff", "token_string": "40", "token_b_string": "20"},
            "target_clean": 0.7348,
            "metric": {"name": "probability_difference", "clean": 0.615},
            "circuit": {
                "necessity": necessity,
                "sufficiency": 0.8564,
                "metric_ablated": 0.127,
                "metric_kept": 0.657,
                "spearman_graph": spearman,
                "spearman_total": 0.9,
                "nodes_dropped": 0,
                "disagreements": [{"id": "mlp0.f339@12", "predicted": -0.365, "measured": 0.66}],
                "nodes": [{"id": "mlp0.f339@12", "predicted_total": -0.4}],
            },
            "random": {
                "draws": 5,
                "summary": {
                    key: spread
                    for key in ("necessity", "sufficiency", "spearman_total", "metric_ablated", "metric_kept")
                },
            },
        }

    paths = []
    for mode, necessity, spearman in (("free", -0.198, 0.31), ("frozen", 0.845, 0.868)):
        paths.append(tmp_path / f"{mode}.json")
        paths[-1].write_text(__import__("json").dumps(result(mode, necessity, spearman)))
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "validation_table.py"), *map(str, paths), "--nodes", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(
        "demo-out/g.json: 10 features and 4 head terms, over 100 prompt(s) (greater-than); "
        'target logit("40") - logit("20"); 5 random circuits'
    )
    rows = {line[:30].strip(): line[30:].split("  ") for line in lines[1:] if line[:30].strip()}
    cells = lambda label: [cell.strip() for cell in rows[label] if cell.strip()]  # noqa: E731
    assert cells("necessity (circuit ablated)") == ["-0.198", "0.845"]
    assert cells("per-node Spearman, graph") == ["0.310", "0.868"]
    assert cells("probability difference, clean") == ["0.615", "0.615"]
    assert (
        "0.500 [0.250,0.750]"
        in lines[lines.index(next(line for line in lines if "circuit ablated" in line and "necessity" not in line)) + 1]
    )
    assert "  mlp0.f339@12     -0.365 / -0.400 / +0.660" in lines
    missing = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "validation_table.py"), str(tmp_path / "no.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1 and "cannot read" in missing.stderr
