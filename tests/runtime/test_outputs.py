"""tccli.runtime.outputs: refusing existing outputs and inputs as outputs, locks, atomic writes without debris."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tccli.errors import TcError
from tccli.runtime import outputs


def test_check_new_refuses_existing_unless_forced(tmp_path):
    path = tmp_path / "out.json"
    outputs.check_new(path, force=False)  # new: fine
    path.write_text("x")
    with pytest.raises(TcError, match="out.json already exists; pass --force to replace it"):
        outputs.check_new(path, force=False)
    outputs.check_new(path, force=True)


def test_an_input_is_never_an_output_whatever_its_spelling(tmp_path, monkeypatch):
    data = tmp_path / "data.txt"
    data.write_text("x")
    folder = tmp_path / "tcs"
    (folder / "layer_0").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    link = tmp_path / "link.txt"
    link.symlink_to(data)
    hard = tmp_path / "hard.txt"
    os.link(data, hard)
    for out, inputs in [
        (data, [data]),
        ("./data.txt", [str(data)]),
        (link, [data]),
        (hard, [data]),
        (folder / "layer_0" / "x.json", [folder]),
        (tmp_path, [data]),
        ("tcs", [folder / "layer_0"]),
    ]:
        with pytest.raises(TcError, match="would overwrite the input"):
            outputs.check_not_input(out, inputs)
    outputs.check_not_input(tmp_path / "other.txt", [data, folder, None, "-", ""])


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def failing(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(TcError, match=r"cannot write .*out.bin: No space left on device \(the disk is full\)"):
        outputs.atomic_write(path, failing)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]

    def interrupted(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        outputs.atomic_write(path, interrupted)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    outputs.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_causes_are_read_out_of_library_messages():
    h5py_text = (
        "Can't synchronously write data (file write failed: time = Thu, filename = 'a.h5', file descriptor = 3, "
        "errno = 28, error message = 'No space left on device', buf = 0x7f)"
    )
    assert outputs.os_cause(OSError(28, h5py_text)) == "No space left on device"
    assert outputs.os_cause(OSError(errno.EROFS, "x")) == "Read-only file system"
    torch_text = "[enforce fail at inline_container.cc:747] . open file failed with strerror: Read-only file system"
    assert outputs.os_cause(RuntimeError(torch_text)) == "Read-only file system"
    message = str(outputs.write_error("a/b.h5", OSError(28, h5py_text)))
    assert message == "cannot write a/b.h5: No space left on device (the disk is full)"


HOLD = """
import sys, time
sys.path.insert(0, {repo!r})
from tccli.runtime import outputs
with outputs.locked({path!r}):
    print("held", flush=True)
    sys.stdin.readline()
"""


@pytest.mark.parametrize("folder", [False, True])
def test_a_second_writer_is_refused_and_the_lock_leaves_no_file(tmp_path, folder):
    path = tmp_path / ("run" if folder else "acts.h5")
    if folder:
        path.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(repo=str(Path(__file__).parents[2]), path=str(path))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TcError, match="is being written by another tc process"):
            with outputs.locked(path):
                pass
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0
    with outputs.locked(path):  # free again
        pass
    assert not (tmp_path / "acts.h5.lock").exists() and not list(tmp_path.glob("*.lock"))


def test_claim_checks_everything_before_the_work(tmp_path):
    existing = tmp_path / "g.json"
    existing.write_text("{}")
    with pytest.raises(TcError, match="already exists"):
        with outputs.claim(existing, force=False):
            pass
    with pytest.raises(TcError, match="would overwrite the input"):
        with outputs.claim(existing, force=True, inputs=[existing]):
            pass
    with pytest.raises(TcError, match="folder .*missing does not exist"):
        with outputs.claim(tmp_path / "missing" / "g.json", force=False):
            pass
    with pytest.raises(TcError, match="is a folder"):
        with outputs.claim(tmp_path, force=True):
            pass
    with outputs.claim(None, force=False):  # stdout: nothing to check
        pass
    with outputs.claim(existing, force=True):
        assert (tmp_path / "g.json.lock").exists()
    assert not (tmp_path / "g.json.lock").exists()


def test_claim_removes_what_a_killed_writer_left_and_nothing_else(tmp_path):
    """A SIGKILL between writing a temporary file and renaming it leaves `OUT.PID.tmp`; the next run of the
    output (holding its lock, so no live writer owns such a file) removes it, and only it."""
    out = tmp_path / "g.json"
    stale = [tmp_path / "g.json.12345.tmp", tmp_path / "g.json.7.tmp"]
    kept = [
        tmp_path / "g.json.tmp",
        tmp_path / "g.json.x.tmp",
        tmp_path / "other.json.12345.tmp",
        tmp_path / "g.json.12345.tmp.bak",
    ]
    for path in stale + kept:
        path.write_text("x")
    with outputs.claim(out, force=False):
        outputs.atomic_write_text(out, "{}")
    assert out.read_text() == "{}"
    assert not any(path.exists() for path in stale) and all(path.exists() for path in kept)
