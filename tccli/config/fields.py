"""Settings fields: one source of truth for CLI flags and saved configs (imports neither torch nor typer).

Every subcommand's options are the fields of one dataclass. A field is declared with `option(...)`,
which carries its help text (and optionally its flag names or a parser); `tccli.cli.options.command_from`
turns the dataclass into a typer command whose flags are exactly those fields, and `to_json_dict` turns a
filled config into the JSON that is saved beside the results it produced. Nothing about a flag is
written twice.

Shared groups of options (the model, the text input) are small dataclasses that command configs
inherit from.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from tccli.errors import fail

# ----------------------------------------------------------------------------- field declarations


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flags: tuple[str, ...] = (),
    parser: Optional[Callable[[str], Any]] = None,
    metavar: Optional[str] = None,
    save: bool = True,
    cli: bool = True,
    required: bool = False,
    argument: bool = False,
    late: bool = False,
    torchrun: bool = False,
    several: bool = False,
    stdio: bool = False,
) -> Any:
    """A config field that is also a CLI option.

    default: the default value (lists are copied per instance).
    help: what the option means; shown by ``--help`` and kept in the dataclass for readers.
    flags: flag names; default ``--field-name`` (underscores become dashes).
    parser: turns the command-line string into the value (e.g. ``parse_count`` for ``200k``).
    metavar: what ``--help`` shows for the value; default from the field's name and type (see
        ``default_metavar``: ``PATH``, ``N``, ``LAYERS``, ...).
    save: whether the value is written into saved configs (``--quiet`` is not worth saving).
    cli: whether the field is a CLI flag at all (some are filled in by code, e.g. resolved paths).
    required: the flag must be given on the command line.
    argument: a positional command-line argument instead of a flag (``tc show FILE FEATURE``).
    late: ``--help`` lists it after the command's other options (a group several commands share, such
        as how pictures are drawn).
    torchrun: meaningful only under torchrun; ``--help`` lists it last.
    several: a list flag that takes several values after one flag (``--data a.txt b.txt``).
    stdio: the value `-` means standard input (an input file) or standard output (an output file); shell
        completion offers it.
    """
    metadata = dict(
        help=help,
        flags=flags,
        parser=parser,
        metavar=metavar,
        save=save,
        cli=cli,
        required=required,
        argument=argument,
        late=late,
        torchrun=torchrun,
        several=several,
        stdio=stdio,
    )
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=metadata)
    return field(default=default, metadata=metadata)


def to_json_dict(config: Any) -> dict:
    """The saved form of a config: every field marked ``save``, as plain JSON values."""
    out = {}
    for f in fields(config):
        if not f.metadata.get("save", True):
            continue
        value = getattr(config, f.name)
        if isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def from_json_dict(config_cls: type, data: dict) -> Any:
    """Rebuild a config from its saved form, ignoring keys this version does not know."""
    known = {f.name for f in fields(config_cls)}
    kwargs = {
        k: (tuple(v) if isinstance(v, list) and _is_tuple_field(config_cls, k) else v)
        for k, v in data.items()
        if k in known
    }
    return config_cls(**kwargs)


def _is_tuple_field(config_cls: type, name: str) -> bool:
    hint = typing.get_type_hints(config_cls)[name]
    return typing.get_origin(hint) is tuple or tuple in typing.get_args(hint)


# ----------------------------------------------------------------------------- value parsers

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


def parse_count(text: Any) -> int:
    """'200k' -> 200000, '1M' -> 1000000, '1.5m' -> 1500000, '4096' -> 4096."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGbB]?)\s*", str(text))
    if not match:
        raise _bad_parameter(f"expected a count like 4096, 200k or 1M, got {text!r}")
    value = float(match.group(1)) * _SUFFIX[match.group(2).lower()]
    if value != int(value):
        raise _bad_parameter(f"count {text!r} is not a whole number")
    return int(value)


def _bad_parameter(message: str) -> Exception:
    """typer's error for a flag's value (shown as ``Invalid value for '--tokens': ...``); typer is
    imported only on this error path, so settings stay free of it."""
    import typer

    return typer.BadParameter(message)


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """'all', '2', '0,3-5' -> sorted unique layer indices, each checked against the model.

    Raises TcError naming the offending layer when one is out of range.
    """
    if spec is None or str(spec).strip().lower() in ("", "all"):
        return list(range(n_layers))
    layers: set[int] = set()
    for part in str(spec).split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise fail(f"bad layer list {spec!r}: use e.g. 2, 0,3-5 or all")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise fail(f"bad layer range {part!r}: end before start")
        layers.update(range(lo, hi + 1))
    bad = [layer for layer in sorted(layers) if layer >= n_layers]
    if bad:
        raise fail(f"layer {bad[0]} is out of range: the model has {n_layers} layers (0-{n_layers - 1})")
    return sorted(layers)


# ----------------------------------------------------------------------------- shared option groups

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class ModelOptions:
    """Which language model to load and where."""

    model: Optional[str] = option(
        None,
        "Model: a HuggingFace hub name (gpt2, EleutherAI/pythia-70m), a local HuggingFace folder, "
        "or 'builtin' for the model shipped with tc (the default).",
    )
    device: str = option("auto", "Device for the model: auto (cuda when available), cpu, cuda, cuda:1, ...")
    model_dtype: str = option(
        "float32", "Dtype the model runs in: float32, float16 or bfloat16.", flags=("--model-dtype",)
    )

    def validate(self) -> None:
        if self.model_dtype not in DTYPES:
            raise fail(f"--model-dtype must be one of {', '.join(DTYPES)}, got {self.model_dtype!r}")


ENGINES = ("native", "bridge")


@dataclass
class CaptureOptions:
    """How activations are read from the model (tc cache, tc score)."""

    engine: str = option(
        "native",
        "How MLP activations are read: native (the plain HuggingFace model with PyTorch hooks and "
        "its SDPA attention, processed as compatibility mode defines hook_normalized/hook_mlp_out; equal to "
        "the bridge up to float32 rounding and about twice as fast on small models) or bridge "
        "(TransformerLens' own hooks, bit-identical to what tc eval and tc circuit see).",
    )

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise fail(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")


@dataclass
class DataOptions:
    """Which text to read and how to cut it into rows of tokens."""

    data: list[str] = option(
        [],
        "Text: plain .txt files (documents separated by blank lines), .jsonl files with a 'text' "
        "field, folders saved by datasets' save_to_disk, or - for stdin. Several paths may follow one "
        "--data.",
        metavar="PATH...",
        several=True,
        stdio=True,
    )
    tokens: int = option(1_000_000, "Stop after this many tokens (accepts 200k, 1M).", parser=parse_count)
    context: int = option(128, "Tokens per row, BOS included.")
    seed: int = option(0, "Seed for the order in which documents are packed into rows.")

    def validate(self) -> None:
        if not self.data:
            raise fail("no text given: pass --data PATH... (a .txt, .jsonl, datasets folder, or - for stdin)")
        if self.context < 2:
            raise fail(f"--context must be at least 2, got {self.context}")
        if self.tokens < self.context:
            raise fail(f"--tokens {self.tokens} is less than one row of --context {self.context} tokens")
