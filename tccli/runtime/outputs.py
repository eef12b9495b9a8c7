"""Writing outputs safely: refuse what exists, never write over an input, one writer at a time, no debris.

Every command that writes a file or folder goes through these helpers:

- ``check_new(path, force)``: an existing output is refused unless ``--force`` is given.
- ``check_not_input(out, inputs)``: an output that is one of the command's inputs (the same file under
  another spelling, a folder holding it, or a file inside an input folder) is refused, ``--force`` or not.
- ``output_folder(out)`` / ``claim_folder(out)``: a folder a command writes files into (``--out DIR/``),
  made when missing; ``claim_folder`` also locks it for the run.
- ``locked(path)``: an exclusive ``flock`` for the whole run, so a second run writing the same output
  stops at once with one line (exit 2) instead of both "succeeding" or both leaving debris. A file
  output is locked through ``PATH.lock`` (removed when the run ends); a folder output through the
  folder itself.
- ``atomic_write(path, write)``: the bytes go to a temporary name beside ``path``, are fsynced and renamed
  over it; on any failure (full disk, read-only folder, Ctrl-C) the temporary file is removed, whatever
  ``path`` held before is untouched, and the error is one line naming the path and the cause.
- ``write_error(path, exc)``: that one line for an OSError (or the opaque errors h5py and torch.save wrap
  around one).
- ``write_output(data, out)``: a command's one output file, or standard output where ``--out`` is absent or
  `-` (``to_stdout``); ``check_binary_stdout`` refuses binary data (png, pt) for a terminal but not for a
  pipe or a redirection.

A reader that goes away (`tc graph ... | head -c 10`) is ``tccli.cli.app``'s to handle: the command ends
quietly as a Unix tool ended by SIGPIPE does; nothing here leaves a file behind when that happens.

No math and no knowledge of file formats here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

from tccli.errors import TcError, fail
from tccli.runtime import interrupts

LOCK_SUFFIX = ".lock"
TEMP_SUFFIX = ".tmp"
STDOUT = "-"  # as --out: standard output


# ============================================================================ messages


def os_cause(exc: BaseException) -> str:
    """The human cause inside an OSError, or inside the longer texts h5py and torch wrap around one."""
    if isinstance(exc, OSError) and exc.errno:
        text = str(exc)
        match = re.search(r"error message = '([^']+)'", text)  # h5py: "... errno = 28, error message = '...'"
        return match.group(1) if match else os.strerror(exc.errno)
    text = str(exc)
    match = re.search(r"error message = '([^']+)'|strerror: ([^\n]+)", text)
    if match:
        return (match.group(1) or match.group(2)).strip()
    code = os_errno(exc)
    if code:
        return os.strerror(code)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:200]


def os_errno(exc: BaseException) -> Optional[int]:
    """The errno of an OSError, or of one a library reported inside its own exception (safetensors says
    "I/O error: No space left on device (os error 28)")."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    match = re.search(r"\(os error (\d+)\)", str(exc))
    return int(match.group(1)) if match else None


def write_error(path: Path | str, exc: BaseException) -> TcError:
    """One line for a failed write of ``path``: what, where and why (disk full, read-only, ...)."""
    cause = os_cause(exc)
    code = os_errno(exc)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in cause:
        cause += " (the disk is full)"
    return fail(f"cannot write {path}: {cause}")


# ============================================================================ refusing outputs


def check_new(path: Path | str, force: bool, what: str = "") -> None:
    """Refuse an existing ``path`` unless ``force``."""
    path = Path(path)
    if not force and (path.exists() or path.is_symlink()):
        label = f"{what} {path}" if what else str(path)
        raise fail(f"{label.strip()} already exists; pass --force to replace it")


def _resolved(path: Path | str) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def check_not_input(out: Path | str, inputs: Iterable[Optional[Path | str]]) -> None:
    """Refuse writing ``out`` where it would destroy an input: the same file, a folder that holds an input,
    or a path inside an input folder (spellings, symlinks and hard links all resolved)."""
    target = _resolved(out)
    for item in inputs:
        if item is None or str(item) in ("", "-"):
            continue
        source = _resolved(item)
        same = target == source
        if not same and target.exists() and source.exists():
            try:
                same = os.path.samefile(target, source)
            except OSError:
                same = False
        if same or source.is_relative_to(target) or target.is_relative_to(source):
            raise fail(f"the output {out} would overwrite the input {item}; write somewhere else")


@contextlib.contextmanager
def claim(out: Optional[Path | str], force: bool, inputs: Iterable[Optional[Path | str]] = ()) -> Iterator[None]:
    """Everything a command checks before writing the file ``out``, held for its whole run: the folder
    exists, ``out`` is not an input and not a folder, the lock is ours, and ``out`` is new unless ``force``.
    A no-op when ``out`` is None or `-` (the command writes to stdout)."""
    if to_stdout(out):
        yield
        return
    path = Path(out).expanduser()
    if path.is_dir():
        raise fail(f"{out} is a folder; name a file to write")
    if not path.parent.is_dir():
        raise fail(f"cannot write {out}: folder {path.parent} does not exist")
    check_not_input(path, inputs)
    with locked(path):
        remove_stale_temps(path)
        check_new(path, force)
        yield


def output_folder(out: Path | str, inputs: Iterable[Optional[Path | str]] = ()) -> Path:
    """A folder that a command writes files into (``--out DIR/``): created when missing (its parent must
    exist); refused when it is a file, an input, or holds one."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise fail(f"{out} is a file; name a folder to write into (DIR/)")
    if not path.parent.is_dir():
        raise fail(f"cannot write into {out}: folder {path.parent} does not exist")
    check_not_input(path, inputs)
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        raise write_error(path, exc) from None
    return path


@contextlib.contextmanager
def claim_folder(out: Path | str, inputs: Iterable[Optional[Path | str]] = ()) -> Iterator[Path]:
    """``output_folder``, locked for the command's whole run (one writer at a time)."""
    path = output_folder(out, inputs)
    with locked(path):
        yield path


def remove_stale_temps(path: Path) -> None:
    """Delete the temporary files a killed run (SIGKILL, power loss) left beside ``path``; only called
    with ``path`` locked, so no live writer owns them."""
    pattern = re.compile(re.escape(path.name) + r"\.\d+" + re.escape(TEMP_SUFFIX))
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            if pattern.fullmatch(entry.name):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


# ============================================================================ locks


def _flock(fd: int, wait: float) -> bool:
    """Take an exclusive flock on ``fd``, trying for up to ``wait`` seconds; whether it was taken."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


@contextlib.contextmanager
def locked(path: Path | str, wait: float = 0.0) -> Iterator[None]:
    """Hold an exclusive lock on output ``path`` (a file, or an existing folder) for the block's duration;
    ``wait``: seconds to wait for another process to let go of it first (an index several runs update)."""
    path = Path(path)
    if path.is_dir():
        with _locked_folder(path):
            yield
        return
    lock_path = path.with_name(path.name + LOCK_SUFFIX)
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_error(path, exc) from None
        if not _flock(fd, wait):
            os.close(fd)
            raise fail(
                f"{path} is being written by another tc process (it holds {lock_path.name}); "
                "wait for it to finish or write elsewhere"
            ) from None
        # A run that finishes unlinks its lock file; make sure the file locked is the one still there.
        try:
            current = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


@contextlib.contextmanager
def _locked_folder(folder: Path) -> Iterator[None]:
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise fail(
                f"{folder} is being written by another tc process; wait for it to finish or write elsewhere"
            ) from None
        yield
    finally:
        os.close(fd)


# ============================================================================ atomic writes


def temp_path(path: Path) -> Path:
    """A temporary name beside ``path``, unique to this process."""
    return path.with_name(f"{path.name}.{os.getpid()}{TEMP_SUFFIX}")


class RecordingFile:
    """A binary file wrapper that remembers the OSError of a failed write: torch.save reports a full disk
    only as "unexpected pos 576 vs 534", so the real cause is kept here to be named."""

    def __init__(self, handle: Any):
        self.handle = handle
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self.handle.flush()
        except OSError as exc:
            self.error = exc
            raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path | str, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then rename it over ``path``.

    Any failure removes the temporary file and leaves ``path`` as it was; an OSError (or an opaque
    library error wrapping one) becomes one ``TcError`` line naming ``path`` and the cause.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        _fsync(tmp)
        interrupts.raise_if_swallowed()  # a signal arrived and was lost in a finaliser: put nothing in place
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except TcError:
        raise
    except OSError as exc:
        raise write_error(path, exc) from None
    except Exception as exc:  # a library's own exception around an OSError (safetensors)
        if os_errno(exc) is None:
            raise
        raise write_error(path, exc) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# ============================================================================ standard output


def to_stdout(out: Optional[Path | str]) -> bool:
    """Whether the output ``out`` (an --out value) is standard output: absent, empty or `-`."""
    return not out or str(out) == STDOUT


def refuse_stdout(out: Optional[Path | str], what: str, why: str) -> None:
    """Refuse `--out -` for ``what``, which cannot go to stdout, saying ``why``."""
    if out is not None and str(out) == STDOUT:
        raise fail(f"{what} cannot be written to stdout ({why}); name a file with --out")


def check_binary_stdout(out: Optional[Path | str], what: str) -> None:
    """Refuse writing binary ``what`` (``--format png``) to stdout when it is a terminal; a pipe or a
    redirection takes it. Called before the work, so the refusal costs nothing."""
    if to_stdout(out) and sys.stdout.isatty():
        raise fail(f"{what} is binary and stdout is a terminal: pass --out FILE, or pipe or redirect stdout")


def write_output(data: bytes, out: Optional[Path | str]) -> None:
    """A command's one output: to the file ``out`` atomically, or to stdout where ``to_stdout(out)``."""
    if to_stdout(out):
        sys.stdout.flush()  # whatever print() wrote before goes first
        rest = memoryview(data)
        while rest:  # a write cut short (the reader went away, a signal) returns a count: write the rest
            rest = rest[sys.stdout.buffer.write(rest) :]
        sys.stdout.flush()
    else:
        atomic_write_bytes(out, data)  # type: ignore[arg-type]
