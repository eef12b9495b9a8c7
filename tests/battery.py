"""The machinery of the bad-input battery (tests/test_bad_inputs.py): shared artefacts built once per
session with real `tc` runs, sandboxes for read-only and full filesystems, and a runner that executes the
selected cases: the flag-level ones in this process through the CLI's entry point (``run_in_process``:
the same code a `tc` process runs, without paying ~2.5 s of CPU to import torch again per case), the
ones that need a sandbox as real `tc` subprocesses, a few at a time. ``pytest --real-processes`` runs
every case as a real process.

Kept apart from the case tables so that adding a case never means reading this file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
BUILTIN_TEXT = REPO / "tccli" / "builtin" / "text" / "demo.txt"
# What a failing or interrupted run must never leave behind (progress files are not debris: they are what
# --resume continues from).
DEBRIS_SUFFIXES = (".tmp", ".lock", ".creating", ".joining")
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))  # a PNG signature, then bytes that are not UTF-8


@dataclass(frozen=True)
class Case:
    """One bad input: ``tc ARGS`` must fail with one line on stderr containing ``message``.

    ``args`` may name the shared artefacts and the case's own folder as ``{cache}``, ``{tcs}``, ``{tmp}``
    and so on (see ``Artefacts``); ``setup(tmp, artefacts)`` may create further inputs in ``tmp`` and
    return more names for ``args``. ``sandbox`` runs the command with ``{mnt}`` a read-only filesystem
    ("readonly") or a nearly full one ("full", 4 KiB), both private tmpfs mounts that need user namespaces;
    every "full" case also runs as a "fsize" twin that needs no privilege: ``{mnt}`` is an ordinary
    folder and the command may write no file beyond 4 KiB (``ulimit -f``: the writes fail with EFBIG,
    "File too large", where a full disk says ENOSPC; the same code paths). ``stdin`` is fed to the command.
    """

    id: str
    args: tuple[str, ...]
    message: str
    setup: Optional[Callable[[Path, Artefacts], dict]] = None
    sandbox: Optional[str] = None
    stdin: Optional[str] = None
    exit_code: int = 2


@dataclass
class Artefacts:
    """Files every case may read (never write): built once per session by real `tc` runs."""

    root: Path
    text: Path  # a small plain-text corpus
    cache: Path  # tc cache of the built-in model, layers 0-1, context 64
    tcs: Path  # tc train set of transcoders for layers 0 and 1
    tc0: Path  # its layer_0 transcoder folder
    sae: Path  # an SAE set (tc train --kind sae), layer 0
    features: Path  # tc score output (.jsonl)
    graph: Path  # tc circuit --format json
    saelens: Path  # tc convert --to saelens of tcs
    png: Path  # a PNG picture, for "this is not what you think" inputs
    other_model: Path  # a model shaped like the built-in one with other weights
    other_tcs: Path  # transcoders trained on other_model
    digests: dict = field(default_factory=dict)

    def names(self) -> dict[str, str]:
        return {key: str(value) for key, value in self.__dict__.items() if isinstance(value, Path)}


def run_tc(
    *args: str,
    stdin: Optional[str] = None,
    cwd: Optional[Path] = None,
    timeout: float = 600,
    prefix: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """`python -m tccli ARGS` (optionally under ``prefix``, e.g. a sandbox), one torch thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("TC_DEBUG", None)
    return subprocess.run(
        [*prefix, sys.executable, "-m", "tccli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=cwd,
    )


def run_in_process(*args: str, stdin: Optional[str] = None, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    """`tc ARGS` through ``tccli.cli.entry.main`` in this process, as a subprocess would see it: in ``cwd``,
    with ``stdin`` (empty when None) and its own stdout and stderr, no TC_DEBUG; the exit status is
    what ``main`` exits with (0 when it returns). Signal handlers and the interrupt state that ``main``
    installs are put back afterwards. Main thread only (the working folder and the streams are the
    process's)."""
    import io
    import signal

    from tccli.cli.entry import main
    from tccli.runtime import interrupts

    assert threading.current_thread() is threading.main_thread(), "run_in_process changes process-wide state"
    streams = (sys.stdin, sys.stdout, sys.stderr)
    handlers = {signum: signal.getsignal(signum) for signum in interrupts.SIGNALS}
    state = dict(interrupts._state)
    debug = os.environ.pop("TC_DEBUG", None)
    folder = os.getcwd()
    out, err = io.BytesIO(), io.BytesIO()
    sys.stdin = io.TextIOWrapper(io.BytesIO((stdin or "").encode()), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    sys.stderr = io.TextIOWrapper(err, encoding="utf-8", write_through=True)
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        main(list(args))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        printed, logged = out.getvalue(), err.getvalue()  # before the wrappers, and their buffers, are freed
        sys.stdin, sys.stdout, sys.stderr = streams
        os.chdir(folder)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        interrupts._state.clear()
        interrupts._state.update(state)
        if debug is not None:
            os.environ["TC_DEBUG"] = debug
    return subprocess.CompletedProcess(
        ["tc", *args], code, printed.decode("utf-8", "replace"), logged.decode("utf-8", "replace")
    )


def checked(*args: str) -> subprocess.CompletedProcess:
    """A `tc` run that must succeed, in this process (the shared artefacts are inputs, not what is tested)."""
    result = run_in_process(*args)
    assert result.returncode == 0, (args, result.stderr[-2000:])
    return result


def build_other_model(folder: Path) -> Path:
    """The built-in model's architecture and tokenizer with freshly drawn weights: another model that no
    size check can tell apart."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tccli.model.loading import BUILTIN_MODEL_DIR

    folder.mkdir(parents=True)
    for name in os.listdir(BUILTIN_MODEL_DIR):
        if name.startswith("tokenizer"):
            shutil.copy(BUILTIN_MODEL_DIR / name, folder / name)
    torch.manual_seed(1)
    config = AutoConfig.from_pretrained(BUILTIN_MODEL_DIR)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def build_artefacts(root: Path) -> Artefacts:
    root.mkdir(parents=True, exist_ok=True)
    text = root / "text.txt"
    text.write_text(BUILTIN_TEXT.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    png = root / "picture.png"
    png.write_bytes(PNG)
    a = Artefacts(
        root=root,
        text=text,
        cache=root / "acts.h5",
        tcs=root / "tcs",
        tc0=root / "tcs" / "layer_0",
        sae=root / "sae",
        features=root / "features.jsonl",
        graph=root / "graph.json",
        saelens=root / "saelens",
        png=png,
        other_model=root / "other_model",
        other_tcs=root / "other_tcs",
    )
    quick_train = (
        "--tokens",
        "2048",
        "--batch-size",
        "256",
        "--expansion",
        "2",
        "--k",
        "4",
        "--warmup-steps",
        "2",
        "--quiet",
    )
    checked(*cache_args(a, a.cache), "--quiet")
    checked("train", "--cache", str(a.cache), "--out", str(a.tcs), *quick_train)
    checked("train", "--cache", str(a.cache), "--out", str(a.sae), "--layers", "0", "--kind", "sae", *quick_train)
    checked(
        "score",
        "--data",
        str(text),
        "--tokens",
        "1k",
        "--context",
        "64",
        "--transcoders",
        str(a.tcs),
        "--device",
        "cpu",
        "--out",
        str(a.features),
        "--top",
        "4",
        "--quiet",
    )
    checked(
        "circuit",
        "--transcoders",
        str(a.tcs),
        "--prompt",
        "The war lasted from the year 1735 to the year 17",
        "--logit",
        "4",
        "--device",
        "cpu",
        "--iters",
        "2",
        "--branches",
        "3",
        "--format",
        "json",
        "--out",
        str(a.graph),
        "--quiet",
    )
    checked("convert", "--input", str(a.tcs), "--out", str(a.saelens), "--to", "saelens")
    build_other_model(a.other_model)
    other_cache = root / "other_acts.h5"
    checked(
        "cache",
        "--model",
        str(a.other_model),
        "--data",
        str(text),
        "--tokens",
        "2k",
        "--context",
        "64",
        "--layers",
        "0",
        "--device",
        "cpu",
        "--out",
        str(other_cache),
        "--quiet",
    )
    checked("train", "--cache", str(other_cache), "--out", str(a.other_tcs), *quick_train)
    a.digests = digest_tree(root)
    return a


def cache_args(a: Artefacts, out: Path) -> tuple[str, ...]:
    """The arguments the shared cache was made with (small batches: many commits to interrupt between)."""
    return (
        "cache",
        "--data",
        str(a.text),
        "--tokens",
        "4k",
        "--context",
        "64",
        "--layers",
        "0-1",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--out",
        str(out),
    )


def digest_tree(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root``: "nothing already written lost" is checked by
    comparing these before and after each case."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def fsize_twin(case: Case) -> Case:
    """The unprivileged twin of a "full" case: every file capped at ``FSIZE_BYTES`` instead of a full disk."""
    import dataclasses

    return dataclasses.replace(case, id=case.id + "-fsize", sandbox="fsize", message="File too large")


def debris(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(DEBRIS_SUFFIXES))


# ============================================================================ sandboxes


_SANDBOX_OK: dict = {}


def sandbox_available() -> bool:
    """Whether this machine lets us mount a private tmpfs (a user and mount namespace, `unshare -rm`)."""
    if "ok" not in _SANDBOX_OK:
        try:
            probe = subprocess.run(
                ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt && true"],
                capture_output=True,
                timeout=30,
            )
            _SANDBOX_OK["ok"] = probe.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _SANDBOX_OK["ok"] = False
    return _SANDBOX_OK["ok"]


FILLER = ".filler"  # what makes the "full" filesystem full
FSIZE_BYTES = 4096  # the "fsize" sandbox's largest file


def sandbox_prefix(kind: str, mnt: Path, listing: Path) -> tuple[str, ...]:
    """A command prefix running the rest in a private mount namespace where ``mnt`` is a tmpfs, either
    read-only or full (4 KiB, all taken by a filler file: files can still be created, not written); the
    files left in ``mnt`` are listed into ``listing`` when the command ends (the mount disappears with
    the namespace). For "fsize": a shell that caps every file the command writes at ``FSIZE_BYTES``
    (``ulimit -f`` counts 512-byte blocks; Python ignores SIGXFSZ, so a write past the cap fails with EFBIG)."""
    if kind == "fsize":
        return ("sh", "-c", f'ulimit -f {FSIZE_BYTES // 512} && exec "$@"', "fsize")
    if kind == "readonly":
        prepare = 'mount -t tmpfs -o size=64k tmpfs "$MNT" && mount -o remount,ro "$MNT"'
    else:
        prepare = (
            f'mount -t tmpfs -o size=4k tmpfs "$MNT" && '
            f'{{ dd if=/dev/zero of="$MNT/{FILLER}" bs=1k count=64 2>/dev/null; true; }}'
        )
    script = f'MNT="$1"; LISTING="$2"; shift 2; {prepare} && {{ "$@"; rc=$?; ls -A "$MNT" > "$LISTING"; exit $rc; }}'
    return ("unshare", "-rm", "sh", "-c", script, "sandbox", str(mnt), str(listing))


# ============================================================================ running cases


@dataclass
class Outcome:
    result: subprocess.CompletedProcess
    tmp: Path
    sandbox_listing: Optional[list[str]]
    before: dict  # digest_tree(tmp) after the case's setup, before `tc` ran: what must survive it


class Runner:
    """Runs cases: the sandboxed ones (and, with ``real_processes``, all) as `tc` subprocesses on a small
    thread pool, submitted up front so they run while the tests wait in order; the others in this process,
    in the main thread, when their test asks for them."""

    def __init__(self, artefacts: Artefacts, make_tmp: Callable[[str], Path], workers: int, real_processes: bool):
        self.artefacts = artefacts
        self.make_tmp = make_tmp
        self.real_processes = real_processes
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.futures: dict[str, Future] = {}
        self.lock = threading.Lock()

    def in_process(self, case: Case) -> bool:
        return case.sandbox is None and not self.real_processes

    def submit(self, key: str, case: Case) -> None:
        if self.in_process(case):
            return
        with self.lock:
            if key not in self.futures:
                tmp = self.make_tmp(key)
                self.futures[key] = self.pool.submit(self._run, case, tmp)

    def outcome(self, key: str, case: Case) -> Outcome:
        if self.in_process(case):
            return self._run(case, self.make_tmp(key))
        self.submit(key, case)
        return self.futures[key].result()

    def _run(self, case: Case, tmp: Path) -> Outcome:
        names = {**self.artefacts.names(), "tmp": str(tmp), "mnt": str(tmp / "mnt")}
        if case.setup is not None:
            names.update({k: str(v) for k, v in case.setup(tmp, self.artefacts).items()})
        args = [arg.format(**names) for arg in case.args]
        prefix: tuple[str, ...] = ()
        listing_path = tmp / "sandbox-listing.txt"
        if case.sandbox:
            (tmp / "mnt").mkdir(exist_ok=True)
            prefix = sandbox_prefix(case.sandbox, tmp / "mnt", listing_path)
        before = digest_tree(tmp)
        if self.in_process(case):
            result = run_in_process(*args, stdin=case.stdin, cwd=tmp)
        else:
            result = run_tc(*args, stdin=case.stdin, prefix=prefix, cwd=tmp)
        listing = (
            listing_path.read_text().split() if case.sandbox in ("readonly", "full") and listing_path.exists() else None
        )
        return Outcome(result, tmp, listing, before)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
