from dataclasses import dataclass

import pytest
import typer
from typer.testing import CliRunner

from tccli.cli.app import expand_multi_value_options
from tccli.cli.options import command_from
from tccli.config.fields import DataOptions, ModelOptions, option, parse_count, parse_layers, to_json_dict
from tccli.errors import TcError


def test_parse_count():
    assert [parse_count(s) for s in ("4096", "200k", "1M", "1.5m")] == [4096, 200_000, 1_000_000, 1_500_000]
    with pytest.raises(typer.BadParameter):
        parse_count("lots")


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("0,2-3", 4) == [0, 2, 3]
    with pytest.raises(TcError, match="layer 7 is out of range"):
        parse_layers("1,7", 4)


@dataclass
class DemoConfig(ModelOptions, DataOptions):
    width: int = option(8, "A width.")
    quiet: bool = option(False, "Say nothing.", save=False)


def test_command_from_dataclass_builds_flags_and_config():
    app = typer.Typer()
    seen = {}

    @app.command()
    @command_from(DemoConfig)
    def demo(config: DemoConfig) -> None:
        seen["config"] = config

    @app.command()
    def other() -> None:  # a second command so typer keeps subcommand names
        pass

    result = CliRunner().invoke(
        app, ["demo", "--data", "a.txt", "--data", "b.txt", "--tokens", "2k", "--width", "3", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert config.data == ["a.txt", "b.txt"] and config.tokens == 2000 and config.width == 3 and config.quiet
    saved = to_json_dict(config)
    assert "quiet" not in saved and saved["width"] == 3 and saved["context"] == 128
    help_text = CliRunner().invoke(app, ["demo", "--help"]).output
    assert "A width." in help_text and "--model-dtype" in help_text


def test_expand_multi_value_options():
    argv = ["cache", "--data", "a", "b", "-", "--tokens", "5", "--data", "c"]
    assert expand_multi_value_options(argv) == [
        "cache",
        "--data",
        "a",
        "--data",
        "b",
        "--data",
        "-",
        "--tokens",
        "5",
        "--data",
        "c",
    ]


def test_default_metavars():
    from typing import Optional

    from tccli.cli.options import default_metavar

    assert default_metavar("tokens", int, parse_count) == "N"
    assert default_metavar("batch_size", int) == default_metavar("pos", Optional[int]) == "N"
    assert default_metavar("lr", float) == "X"
    assert default_metavar("resume", bool) is None  # a flag takes no value
    assert default_metavar("out", Optional[str]) == default_metavar("transcoders", str) == "PATH"
    assert default_metavar("data", list[str]) == "PATH..."
    assert default_metavar("layers", str) == "LAYERS" and default_metavar("feature", str) == "L.F"
    assert default_metavar("format", str) == "FORMAT"  # anything else: the field's name, as argparse


@dataclass
class OrderConfig:
    tuning: int = option(1, "Tuning.")
    timeout: float = option(5.0, "Under torchrun: a timeout.", torchrun=True)
    picture: float = option(0.5, "How to draw.", late=True)
    path: str = option("", "The input.", required=True)
    name: str = option("x", "A name.", metavar="WORD")


def test_help_lists_required_first_torchrun_last_with_metavars():
    app = typer.Typer(rich_markup_mode=None)

    @app.command()
    @command_from(OrderConfig)
    def demo(config: OrderConfig) -> None:
        pass

    @app.command()
    def other() -> None:
        pass

    text = CliRunner().invoke(app, ["demo", "--help"]).output
    order = [text.index(flag) for flag in ("--path PATH", "--tuning N", "--name WORD", "--picture X", "--timeout X")]
    assert order == sorted(order), text
    assert "<str>" not in text and "<int>" not in text and "[required]" in text
