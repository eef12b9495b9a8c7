"""Completion scripts: generated from the CLI, committed up to date, valid for each shell."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tccli.cli.completions import SHELL_FILES, command_tree, generate

COMMITTED = Path(__file__).resolve().parents[2] / "completions"


def test_committed_completions_match_the_cli():
    generated = generate()
    for name, text in generated.items():
        path = COMMITTED / name
        assert path.exists(), f"{path} is missing: run `make completions`"
        assert path.read_text() == text, f"{path} is out of date with the CLI: run `make completions`"


def test_tree_has_every_command_and_option():
    root, commands = command_tree()
    names = {c.name for c in commands}
    assert {"cache", "info"} <= names
    cache = next(c for c in commands if c.name == "cache")
    flags = {n for o in cache.options for n in o.names}
    assert {"--layers", "--out", "-o", "--resume", "--force", "--compression", "--data"} <= flags
    assert any("--version" in o.names for o in root)
    # every command and every option of `cache` appears in each script
    for text in generate().values():
        for command in names:
            assert command in text
        assert "commit-every" in text and "batch-size" in text  # fish spells long flags without dashes


@pytest.mark.parametrize("shell", sorted(SHELL_FILES))
def test_scripts_parse(shell, tmp_path):
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    path = tmp_path / SHELL_FILES[shell]
    path.write_text(generate()[SHELL_FILES[shell]])
    result = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_bash_completes_subcommands_and_options():
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    script = generate()[SHELL_FILES["bash"]]
    probe = (
        script + '\nCOMP_WORDS=(tc cache --res); COMP_CWORD=2; _tc; echo "${COMPREPLY[@]}"'
        '\nCOMP_WORDS=(tc inf); COMP_CWORD=1; _tc; echo "${COMPREPLY[@]}"'
    )
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True).stdout.splitlines()
    assert out == ["--resume", "info"]


def test_completion_offers_dash_where_stdin_or_stdout_is_taken(tmp_path):
    """`-` is offered for a graph argument, --prompts, --out ..., and not where a file must be named."""
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    (tmp_path / "g.json").write_text("{}")
    script = generate()[SHELL_FILES["bash"]]
    probes = {
        "export ''": ["g.json", "-"],  # the graph argument
        "export -": [
            "--format",
            "--out",
            "--force",
            "--scan",
            "--slug",
            "--min-edge",
            "--min-edge-label",
            "--help",
            "-",
        ],
        "validate g.json --prompts ''": ["-", "g.json"],
        "circuit --out ''": ["-", "g.json"],
        "train --cache ''": ["g.json"],  # HDF5: no `-`
        "circuit --direction ''": ["g.json"],
    }
    probe = script + "".join(
        f'\nCOMP_WORDS=(tc {words}); COMP_CWORD={len(words.split())}; _tc; echo "${{COMPREPLY[@]}}"' for words in probes
    )
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, cwd=tmp_path).stdout.splitlines()
    assert [line.split() for line in out] == list(probes.values())
    # the other shells are told the same
    texts = generate()
    assert "'*:file:_tc_file_or_dash'" in texts[SHELL_FILES["zsh"]] and "--prompts[" in texts[SHELL_FILES["zsh"]]
    assert "complete -c tc -n '__fish_seen_subcommand_from export' -a - -d 'stdin'" in texts[SHELL_FILES["fish"]]


def test_the_fields_that_take_dash_are_the_ones_read_or_written_through_it():
    from tccli.cli.options import stdio_params
    from tccli.config.circuit import CircuitConfig, ExportConfig
    from tccli.config.evaluation import ValidateConfig
    from tccli.config.features import ScoreConfig, ShowConfig

    assert stdio_params(ExportConfig) == {"graph", "out"}
    assert stdio_params(ValidateConfig) == {"graph", "prompts", "features", "out"}
    assert stdio_params(ShowConfig) == {"features_file", "html"}
    assert "direction" not in stdio_params(CircuitConfig) and "out" not in stdio_params(ScoreConfig)
