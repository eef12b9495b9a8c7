"""Settings dataclasses -> typer commands: each field of a ``tccli.config`` dataclass becomes one flag.

``command_from`` turns a dataclass into the keyword options of a typer command (help, metavar, order,
parser from each field's metadata) and builds the filled, validated dataclass for the command;
``multi_value_flags`` lists the flags that take several values after one flag, ``stdio_params`` those
that take `-` for stdin or stdout; ``plain_arguments`` tidies how positional arguments are shown.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Iterable
from dataclasses import fields
from typing import Any, Optional

import typer

from tccli.config.fields import parse_count


def command_from(config_cls: type) -> Callable:
    """Decorate ``fn(config)`` so typer sees one keyword option per field of ``config_cls``.

    The wrapper builds the config from the parsed flags, calls its ``validate()`` if it has one
    (which raises TcError on bad values), and hands it to ``fn``. ``--help`` lists the options in
    this order: required ones, then the rest in declaration order, then the late and the torchrun-only
    ones; each
    value is shown by its metavar (``--out PATH``, ``--tokens N``).
    """
    hints = typing.get_type_hints(config_cls)

    def decorator(fn: Callable) -> Callable:
        params = []
        annotations = {}
        for f in _help_order(config_cls):
            if not f.metadata.get("cli", True):
                continue
            meta = f.metadata
            flag_names = meta.get("flags") or ("--" + f.name.replace("_", "-"),)
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = None  # lists: typer collects repeated flags; None means "not given"
            else:
                default = ...
            if meta.get("required"):
                default = ...
            annotation = hints[f.name]
            kwargs: dict[str, Any] = dict(help=meta.get("help", ""), show_default=default not in (None, ...))
            if meta.get("parser") is not None:
                # typer needs a plain declared type when a parser decides the value
                kwargs["parser"] = meta["parser"]
                annotation = _parser_annotation(hints[f.name])
            kwargs["metavar"] = meta.get("metavar") or default_metavar(f.name, hints[f.name], meta.get("parser"))
            if kwargs["metavar"] is None:
                del kwargs["metavar"]
            if meta.get("argument"):
                opt = typer.Argument(default, **kwargs)
            else:
                opt = typer.Option(default, *flag_names, **kwargs)
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=annotation))
            annotations[f.name] = annotation

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            kwargs = {k: v for k, v in kwargs.items() if not (v is None and _has_factory(config_cls, k))}
            config = config_cls(**kwargs)
            if hasattr(config, "validate"):
                config.validate()
            return fn(config)

        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = annotations
        del wrapper.__wrapped__  # typer must read our signature, not fn's
        wrapper.stdio_params = stdio_params(config_cls)  # type: ignore[attr-defined]
        return wrapper

    return decorator


def stdio_params(config_cls: type) -> frozenset[str]:
    """The fields of ``config_cls`` declared ``stdio`` (`-` is stdin or stdout): what shell completion offers
    `-` for. A command's function carries them as ``stdio_params``."""
    return frozenset(f.name for f in fields(config_cls) if f.metadata.get("stdio"))


def multi_value_flags(config_classes: Iterable[type]) -> frozenset[str]:
    """Every flag declared ``several`` in these settings (``--data``, ``--logit-diff``, ``--ablate``...)."""
    return frozenset(
        name
        for config_cls in config_classes
        for f in fields(config_cls)
        if f.metadata.get("several")
        for name in (f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),))
    )


def _help_order(config_cls: type) -> list:
    """The CLI fields of ``config_cls``: required first, then the others, then the late ones, torchrun-only
    last; declaration order within each group."""

    def group(f) -> int:
        if f.metadata.get("required") or f.metadata.get("argument"):
            return 0
        if f.metadata.get("torchrun"):
            return 3
        return 2 if f.metadata.get("late") else 1

    return sorted((f for f in fields(config_cls) if f.metadata.get("cli", True)), key=group)


# What a value means, by field name, where the type alone would say only TEXT: paths, layer lists,
# model and device names, feature and head references.
_NAMED_METAVARS = {
    "out": "PATH",
    "cache": "PATH",
    "transcoders": "PATH",
    "graph": "PATH",
    "input": "PATH",
    "html": "PATH",
    "direction": "PATH",
    "data": "PATH...",
    "features_file": "FEATURES_FILE",
    "model": "MODEL",
    "device": "DEVICE",
    "dtype": "DTYPE",
    "model_dtype": "DTYPE",
    "layers": "LAYERS",
    "feature": "L.F",
    "features": "L.F,...",
    "head": "L.H",
    "logit": "TOKEN",
    "prompt": "TEXT",
    "noun": "WORD",
    "to": "FORMAT",
    "mean_ablation": "MODE",
}


def default_metavar(name: str, hint: Any, parser: Optional[Callable] = None) -> Optional[str]:
    """What ``--help`` shows for a field's value when the declaration names none.

    Counts (``parse_count``) and integers are ``N``, floats ``X``, flags nothing; strings are named by
    what they hold (``PATH``, ``LAYERS``, ``MODEL``, ``L.F``) or else by the field's name in capitals
    (``--format FORMAT``), as argparse does.
    """
    base = _base_type(hint)
    if base is bool:
        return None
    if parser is parse_count or base is int:
        return "N"
    if base is float:
        return "X"
    return _NAMED_METAVARS.get(name, name.upper())


def _base_type(hint: Any) -> Any:
    """int for ``Optional[int]``, str for ``list[str]``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (list, typing.Union) and args:
        return _base_type(args[0])
    return hint


def plain_arguments(command: Any) -> Any:
    """Show positional arguments as ``tc info PATH`` and ``tc show FEATURES_FILE [FEATURE]``.

    typer 0.29 writes a required argument as ``{path}`` in the usage line and adds its Python type
    (``<str>``) in the help; every option already shows its metavar, so arguments do the same. Applied
    to the click command typer builds (``typer.main.get_command``), each subcommand in turn.
    """
    from typer.core import TyperArgument

    class PlainArgument(TyperArgument):
        def display_type_rich(self, ctx: Any) -> None:
            return None

        def _usage_display_name(self) -> str:
            name = self.display_name_raw.upper() if self.metavar is None else self.metavar
            return name if self.required else f"[{name}]"

        def _rich_display_name(self) -> str:
            return self.display_name_raw.upper() if self.metavar is None else self.metavar

    for sub in getattr(command, "commands", {}).values():
        for param in sub.params:
            if type(param) is TyperArgument:
                param.__class__ = PlainArgument
    return command


def _has_factory(config_cls: type, name: str) -> bool:
    f = config_cls.__dataclass_fields__[name]
    return f.default_factory is not dataclasses.MISSING  # type: ignore[misc]


def _parser_annotation(hint: Any) -> Any:
    """The type typer should declare for a parsed option (lists stay lists)."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is list:
        return list[str]
    if origin is typing.Union and args:
        return _parser_annotation(args[0])
    return str
