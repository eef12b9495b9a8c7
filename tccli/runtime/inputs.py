"""Reading inputs from pipes: `-` is standard input for every file argument that a tc command can write to
stdout (graphs, features files in JSONL, prompt lists, `tc eval --json` results), so subcommands chain:

    tc graph ... --format json | tc export - --format svg | rsvg-convert ...

This module is the one place that turns `-` into bytes and text:

- ``stdin_bytes(what)`` reads standard input once for the whole run (a pipe can be read only once; the
  bytes are kept, so a command may look at them twice: ``tc info`` sniffs them, then summarises them).
  A terminal is refused (the command would sit waiting for typing) unless ``terminal`` is allowed, as
  for ``--prompt -``; a closed stdin and an empty one are refused with one line each.
- ``sniff(data)`` names what the bytes are from their content alone, since a pipe has no file name:
  the ``format`` field of tc's own JSON and JSONL files (``tc-circuit-graph``, ``tc-features``, ...),
  Neuronpedia's graph JSON, other JSON, JSONL or text, or a binary signature (HDF5, NumPy, zip, PNG).
- ``read_stdin(what, expected)`` is both, refusing anything but the ``expected`` kinds in one line
  (``refusal``); HDF5 is refused with the reason (``cannot_seek``): h5py seeks in its file, a pipe cannot.
- ``refuse_stdin(path, what, why)`` for inputs that can never come from a pipe (an activation cache).
- ``one_stdin(**inputs)``: at most one of a command's inputs may be `-`.

The readers of each kind of file (``tccli.circuit.files.read_graph``, ``tccli.features.files``, ...) call
these when their path is `-`; what the bytes then mean is theirs to say.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

from tccli.errors import TcError, fail

STDIN = "-"
NEURONPEDIA = "neuronpedia"
HDF5 = "hdf5"

# Binary signatures, and what each kind is called in a refusal.
_MAGIC = (
    (b"\x89HDF\r\n\x1a\n", HDF5),
    (b"\x93NUMPY", "npy"),
    (b"PK\x03\x04", "zip"),
    (b"\x89PNG\r\n\x1a\n", "png"),
)
KIND_NAMES = {
    "empty": "nothing",
    HDF5: "an HDF5 file",
    "npy": "a NumPy array (.npy)",
    "zip": "a zip archive (a torch .pt file?)",
    "png": "a PNG picture",
    "binary": "binary data",
    "text": "plain text",
    "json": "JSON of no tc format",
    "jsonl": "JSON lines of no tc format",
    NEURONPEDIA: "Neuronpedia's graph JSON (tc export --format neuronpedia), which tc writes but does not read",
    "tc-circuit-graph": "a tc graph (JSON)",
    "tc-features": "a tc features file (JSONL)",
}

_stdin: Optional[bytes] = None  # standard input, once read


def is_stdin(path: object) -> bool:
    """Whether the path argument ``path`` means standard input."""
    return path is not None and str(path) == STDIN


def display_name(path: object) -> str:
    """How messages and summaries name an input: ``stdin`` for `-`, else the path as given."""
    return "stdin" if is_stdin(path) else str(path)


def stdin_bytes(what: str, terminal: bool = False) -> bytes:
    """All of standard input, read on the first call and kept for the rest of the run.

    ``what`` names the input for the refusals (``the graph``); ``terminal`` allows reading from a terminal
    (a prompt typed by hand) instead of refusing it.
    """
    global _stdin
    if _stdin is None:
        stream = sys.stdin
        if stream is None or getattr(stream, "closed", False):
            raise fail(f"- reads {what} from stdin, but stdin is closed")
        if not terminal and stream.isatty():
            raise fail(
                f"- reads {what} from stdin, but stdin is a terminal: pipe it in "
                "(e.g. tc graph ... --format json | tc export - --format svg)"
            )
        try:
            _stdin = stream.buffer.read() if hasattr(stream, "buffer") else stream.read().encode("utf-8")
        except OSError as exc:
            raise fail(f"cannot read {what} from stdin: {exc.strerror or exc}") from None
    return _stdin


def forget_stdin() -> None:
    """Drop the bytes kept by ``stdin_bytes`` (for tests that run several commands in one process)."""
    global _stdin
    _stdin = None


def stdin_text(what: str, terminal: bool = False) -> str:
    """Standard input as UTF-8 text (see ``stdin_bytes``)."""
    try:
        return stdin_bytes(what, terminal).decode("utf-8")
    except UnicodeDecodeError:
        raise fail(f"stdin is not UTF-8 text, so not {what}") from None


def prompt_text(prompt: str) -> str:
    """A prompt flag's value, or standard input for `-` less one trailing newline (echo's, not the
    prompt's); typed at a terminal too."""
    if not is_stdin(prompt):
        return prompt
    return stdin_text("the prompt", terminal=True).removesuffix("\n").removesuffix("\r")


def sniff(data: bytes) -> str:
    """What ``data`` is, from its content: a tc format name (the ``format`` field of a tc JSON document, or
    of a JSONL file's first line), ``neuronpedia``, ``json``, ``jsonl``, ``text``, ``empty``, or a binary
    kind (``hdf5``, ``npy``, ``zip``, ``png``, ``binary``)."""
    if not data.strip():
        return "empty"
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "binary"
    stripped = text.lstrip()
    if not stripped.startswith(("{", "[")):
        return "text"
    decoder = json.JSONDecoder()
    try:
        document, end = decoder.raw_decode(stripped)
    except json.JSONDecodeError:
        return "text"
    whole = not stripped[end:].strip()
    if isinstance(document, dict) and isinstance(document.get("format"), str):
        return document["format"]
    if whole and isinstance(document, dict) and {"metadata", "nodes", "links"} <= document.keys():
        return NEURONPEDIA  # circuit-tracer's graph files, as tc export writes them
    return "json" if whole else "jsonl"


def kind_name(kind: str) -> str:
    return KIND_NAMES.get(kind, f"a {kind} file")


def cannot_seek(what: str) -> TcError:
    """The refusal of an HDF5 input on stdin: why, and what to do instead."""
    return fail(
        f"{what} cannot be read from stdin: HDF5 is read by seeking in a file, which a pipe cannot do; "
        "pass its path instead"
    )


def read_stdin(what: str, expected: tuple[str, ...], terminal: bool = False) -> bytes:
    """Standard input, refused in one line unless ``sniff`` finds one of the ``expected`` kinds."""
    data = stdin_bytes(what, terminal)
    kind = sniff(data)
    if kind not in expected:
        raise refusal(kind, what)
    return data


def refusal(kind: str, what: str) -> TcError:
    """The one line refusing stdin that holds ``kind`` (as ``sniff`` names it) where ``what`` is needed."""
    if kind == HDF5:
        return cannot_seek("an HDF5 file")
    if kind == "empty":
        return fail(f"stdin is empty, not {what} (did the command before the pipe fail?)")
    return fail(f"stdin holds {kind_name(kind)}, not {what}")


def refuse_stdin(path: object, what: str, why: str) -> None:
    """Refuse `-` for an input that cannot come from a pipe, saying ``why``."""
    if is_stdin(path):
        raise fail(f"{what} cannot be read from stdin ({why}); pass its path")


def one_stdin(**inputs: object) -> None:
    """Refuse a command whose inputs (flag name -> value; lists allowed) name `-` more than once: stdin
    holds one input."""
    named = [
        name
        for name, value in inputs.items()
        for item in (value if isinstance(value, (list, tuple)) else [value])
        if is_stdin(item)
    ]
    if len(named) > 1:
        raise fail(f"stdin holds one input, but {' and '.join(named)} each say -: give a file for all but one")
