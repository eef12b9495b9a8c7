"""The CLI's contract with shell scripts: usage errors are one line on stderr and exit 2."""

import pytest

from conftest import run_tc


@pytest.mark.parametrize(
    "args,message",
    [
        (["cache", "--bogus"], "No such option: --bogus"),
        (["train"], "Missing option"),
        (["cache", "--tokens", "lots", "--data", "x"], "expected a count like 4096"),
        (["cache", "--model", "/nonexistent/model", "--data", "x.txt"], "tc: error:"),
    ],
)
def test_usage_errors_are_one_line(args, message):
    result = run_tc(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tc: error:") and message in lines[0], result.stderr
    assert result.stdout == ""


def test_version_and_help():
    assert run_tc("--version").stdout.strip().startswith("tc ")
    result = run_tc("--help")
    assert result.returncode == 0
    for command in ("cache", "train", "eval", "score", "circuit"):
        assert command in result.stdout


def test_version_does_not_import_torch():
    """`tc --version` answers before the CLI (and torch) is imported."""
    import subprocess
    import sys

    from tccli import __version__

    code = (
        "import sys; from tccli.cli.entry import main; main(['--version']); "
        "print(sorted(m for m in ('torch', 'tccli.cli.app', 'transformer_lens') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"tc {__version__}", "[]"]


def test_cli_and_help_do_not_import_torch():
    """Importing the CLI and printing `tc --help` and every command's --help import no torch: the commands
    import the library inside their bodies, and the settings they build their options from are torch-free."""
    import subprocess
    import sys

    code = (
        "import sys, tccli.cli.app; assert 'torch' not in sys.modules, 'import tccli.cli.app'\n"
        f"for args in [['--help'], *([name, '--help'] for name in {COMMANDS!r})]:\n"
        "    try:\n"
        "        tccli.cli.app.main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    loaded = [m for m in ('torch', 'transformer_lens') if m in sys.modules]\n"
        "    assert not loaded, f'tc {\" \".join(args)} imported {loaded}'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout  # the help texts were printed


COMMANDS = (
    "cache",
    "info",
    "train",
    "eval",
    "convert",
    "circuit",
    "export",
    "deembed",
    "score",
    "show",
    "greater-than",
    "graph",
    "plot",
    "intervene",
    "validate",
    "view",
    "serve",
)


def option_blocks(help_text: str) -> list[str]:
    """The Options section of a --help text, one string per option (its flag line and wrapped help)."""
    section = help_text.split("Options:\n", 1)[1].split("\n\n", 1)[0]
    blocks: list[str] = []
    for line in section.splitlines():
        if line.startswith("  -"):
            blocks.append(line)
        else:
            blocks[-1] += " " + line.strip()
    return blocks


@pytest.mark.parametrize("name", COMMANDS)
def test_help_has_metavars_required_first_and_an_example(name, capsys, monkeypatch):
    from tccli.cli.app import main

    monkeypatch.setenv("COLUMNS", "100")
    main([name, "--help"])  # returns: help is not an error
    text = capsys.readouterr().out
    assert "<str>" not in text and "<int>" not in text and "<float>" not in text and "{" not in text, text
    example = text[text.index("Example:") :].split("\n")[1].strip()
    assert example.startswith(f"tc {name} "), text
    required = ["[required]" in block for block in option_blocks(text)]
    assert required == sorted(required, reverse=True), text  # required options before the others
    torchrun = ["Under torchrun" in block for block in option_blocks(text) if "--help" not in block]
    assert torchrun == sorted(torchrun), text  # torchrun-only options last


def test_every_command_is_in_the_help_tests():
    from tccli.cli.app import app

    assert {command.name for command in app.registered_commands} == set(COMMANDS)
