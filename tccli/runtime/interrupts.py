"""Ctrl-C (SIGINT) and SIGTERM: one line on stderr, exit 130 / 143, files left resumable.

``install()`` (called by ``tccli.cli.app.main``) turns both signals into ``Interrupted``, a BaseException, so
that no ``except Exception`` in our code or in the libraries swallows it and typer does not turn it into
a silent exit code; ``main`` prints the line and exits 128 + the signal number.

Long jobs that must stop at a clean point (``tc train`` between two optimiser steps) run inside
``deferred()``: a signal arriving there is only recorded, the job polls ``pending()`` at its clean points,
saves what it has and raises ``Interrupted`` itself. A second signal while the first is being handled
stops the process at once (the user insisted; every file tc writes survives a kill anyway).

A signal can arrive while the main thread runs a finaliser (an object's ``__del__``, a generator closed
by the garbage collector): Python prints the ``Interrupted`` raised there as "Exception ignored" and goes
on. ``swallowed()`` remembers such a signal, so that no output is put in place after it
(``tccli.runtime.outputs.atomic_write``) and the command still ends as interrupted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


# What an interrupted run leaves, by command: the end of the line `tc: interrupted; ...`.
HINTS = {"cache": "resume with --resume", "train": "resume with --resume"}
HINT = "nothing was written"


def hint(args: list[str]) -> str:
    """What to tell a user whose `tc ARGS` was interrupted (before the command said more itself)."""
    command = next((arg for arg in args if not arg.startswith("-")), "")
    return HINTS.get(command, HINT)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. ``detail`` (optional) says what was saved."""

    def __init__(self, signum: int, detail: str = ""):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.detail = detail

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_state: dict = {"installed": False, "deferred": 0, "pending": None, "handling": False, "raised": None}


def _handler(signum: int, frame: object) -> None:
    if _state["handling"]:
        os.write(2, b"tc: interrupted again; stopped at once\n")
        os._exit(128 + signum)
    if _state["deferred"]:
        if _state["pending"] is not None:  # a second signal while the job is reaching its clean point
            os.write(2, b"tc: interrupted again; stopped at once\n")
            os._exit(128 + signum)
        _state["pending"] = signum
        return
    _state["handling"] = True
    _state["raised"] = signum  # remembered in case a finaliser swallows the exception (swallowed())
    raise Interrupted(signum)


def swallowed() -> Optional[int]:
    """The signal whose ``Interrupted`` the handler raised, if one was: when code is still running normally
    after it (not unwinding from it), something swallowed the exception."""
    return _state.get("raised")


def raise_if_swallowed() -> None:
    """In the main thread, raise ``Interrupted`` again for a signal that a finaliser swallowed (a no-op
    otherwise, and in other threads, such as `tc cache`'s writer, which commits its progress either way)."""
    signum = swallowed()
    if signum is not None and threading.current_thread() is threading.main_thread():
        raise Interrupted(signum)


def install() -> None:
    """Route SIGINT and SIGTERM to ``Interrupted`` (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in SIGNALS:
        signal.signal(signum, _handler)
    _state["installed"] = True


def installed() -> bool:
    return bool(_state["installed"])


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold signals inside the block: they are recorded for ``pending()``; one still pending at the end
    of the block is raised then."""
    _state["deferred"] += 1
    try:
        yield
    finally:
        _state["deferred"] -= 1
    if not _state["deferred"]:
        raise_pending()


def pending() -> Optional[int]:
    """The signal number recorded inside ``deferred()``, if any."""
    return _state["pending"]


def raise_pending(detail: str = "") -> None:
    """Raise ``Interrupted`` for a recorded signal (a no-op when none is)."""
    if _state["pending"] is not None:
        raise take(detail)


def take(detail: str = "") -> Interrupted:
    """The ``Interrupted`` to raise at a clean point once ``pending()`` (here or on another rank) said so."""
    signum = _state["pending"] or signal.SIGINT
    _state["pending"] = None
    _state["handling"] = True
    return Interrupted(int(signum), detail)
