"""tccli.training.run_folder: checkpoints and the run's files in --out. A run killed or stopped by a signal
resumes to bit-identical weights (the kill test kills a real subprocess); --force replaces only the run's
own files; --resume continues only the same run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from training_helpers import D, small_config, toy_cache

from tccli.errors import TcError
from tccli.training.run_folder import CHECKPOINT_FILE, LOG_FILE
from tccli.training.train import train
from tccli.transcoders.files import load_transcoder

# ----------------------------------------------------------------------------- resume after a kill

RUNNER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {helpers!r})
    import torch
    torch.set_num_threads(1)
    import tccli.training.train as tr
    from training_helpers import toy_cache, small_config
    from pathlib import Path
    slow = sys.argv[2] == "slow"
    if slow:  # give the parent time to kill us between checkpoints
        original = tr.train_one_step
        def slowed(*args, **kwargs):
            time.sleep(0.05)
            return original(*args, **kwargs)
        tr.train_one_step = slowed
    activation, skip, optimizer = sys.argv[4], sys.argv[5] == "skip", sys.argv[6]
    checkpoint_every = int(sys.argv[7]) if len(sys.argv) > 7 else 7
    config = small_config(Path({tmp!r}), sys.argv[1], tokens=64 * 120, checkpoint_every=checkpoint_every,
                          resume=sys.argv[3] == "resume", activation=activation, l1=3e-3, skip=skip,
                          optimizer=optimizer, decoder_norm="unit" if activation == "relu" else "free")
    from tccli.runtime import interrupts
    interrupts.install()  # what `tc` does: SIGINT and SIGTERM stop the run at a clean point
    try:
        tr.train(config, toy_cache(layers=(0, 1)))
    except interrupts.Interrupted as exc:
        print(exc.detail, file=sys.stderr)
        sys.exit(exc.exit_code)
""")


def _runner(tmp_path: Path, activation: str = "topk", skip: str = "plain", optimizer: str = "adam"):
    """(start, run) of RUNNER: start(name, speed, mode, checkpoint_every, **popen) -> Popen; run(...) waits."""
    script = tmp_path / "runner.py"
    script.write_text(RUNNER.format(helpers=str(Path(__file__).resolve().parent), tmp=str(tmp_path)))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))

    def start(name: str, speed: str, mode: str, checkpoint_every: int = 7, **popen) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(script), name, speed, mode, activation, skip, optimizer, str(checkpoint_every)],
            env=env,
            text=True,
            **popen,
        )

    def run(name: str, speed: str, mode: str, checkpoint_every: int = 7) -> subprocess.CompletedProcess:
        proc = start(name, speed, mode, checkpoint_every, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = proc.communicate(timeout=300)
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    return start, run


def _assert_same_transcoders(a_dir: Path, b_dir: Path, layers=(0, 1)) -> None:
    for layer in layers:
        a = load_transcoder(a_dir / f"layer_{layer}")
        b = load_transcoder(b_dir / f"layer_{layer}")
        assert a.tensor_names() == b.tensor_names()
        for name in a.tensor_names():
            assert torch.equal(getattr(a, name), getattr(b, name)), (layer, name)
        assert a.config.feature_frequency == b.config.feature_frequency


def _wait_for(path: Path, timeout: float = 120, non_empty: bool = False) -> None:
    def ready() -> bool:
        return path.exists() and (not non_empty or path.stat().st_size > 0)

    deadline = time.time() + timeout
    while time.time() < deadline and not ready():
        time.sleep(0.02)
    assert ready(), path


@pytest.mark.process
@pytest.mark.parametrize(
    "activation, skip, optimizer",
    [
        ("topk", "plain", "adam"),
        ("relu", "plain", "adam"),
        ("batchtopk", "skip", "signum"),
        ("jumprelu", "plain", "signum"),
        ("jumprelu", "skip", "adam"),
    ],
)
def test_resume_after_kill_gives_bit_identical_weights(tmp_path, activation, skip, optimizer):
    start, run = _runner(tmp_path, activation, skip, optimizer)
    result = run("straight", "fast", "fresh")
    assert result.returncode == 0, result.stderr
    proc = start("killed", "slow", "fresh", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = tmp_path / "killed" / CHECKPOINT_FILE
    _wait_for(checkpoint)
    time.sleep(0.6)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = torch.load(checkpoint, weights_only=True)["step"]
    assert 0 < step < 120, step  # killed mid-run
    assert not (tmp_path / "killed" / "layer_0").exists()
    result = run("killed", "fast", "resume")
    assert result.returncode == 0, result.stderr
    _assert_same_transcoders(tmp_path / "straight", tmp_path / "killed")
    # the log holds every step once, whatever was logged after the checkpoint before the kill
    logged = [
        [json.loads(line)["step"] for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        for name in ("straight", "killed")
    ]
    assert logged[0] == logged[1]


@pytest.mark.process
def test_killed_before_its_first_checkpoint_resumes_from_step_0(tmp_path):
    start, run = _runner(tmp_path)
    assert run("straight", "fast", "fresh", checkpoint_every=0).returncode == 0
    proc = start("killed", "slow", "fresh", checkpoint_every=0, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(tmp_path / "killed" / "train_log.jsonl")  # training has begun; no checkpoint is ever written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / CHECKPOINT_FILE).exists()
    fresh = run("killed", "fast", "fresh", checkpoint_every=0)  # a fresh run refuses the folder, naming the way out
    assert fresh.returncode != 0 and "pass --resume to continue the run there" in fresh.stderr
    result = run("killed", "fast", "resume", checkpoint_every=0)
    assert result.returncode == 0, result.stderr
    _assert_same_transcoders(tmp_path / "straight", tmp_path / "killed")


@pytest.mark.process
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_between_steps_with_a_checkpoint_and_resumes_bit_identical(tmp_path, signum):
    start, run = _runner(tmp_path, "relu")
    assert run("straight", "fast", "fresh", checkpoint_every=0).returncode == 0
    proc = start("stopped", "slow", "fresh", checkpoint_every=0, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(tmp_path / "stopped" / "train_log.jsonl", non_empty=True)  # inside the steps
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    step = torch.load(tmp_path / "stopped" / CHECKPOINT_FILE, weights_only=True)["step"]
    assert 0 < step < 120 and stderr.strip() == f"stopped at step {step} of 120 with a checkpoint; resume with --resume"
    assert not list((tmp_path / "stopped").glob("*.tmp")) and not (tmp_path / "stopped" / "layer_0").exists()
    result = run("stopped", "fast", "resume", checkpoint_every=0)
    assert result.returncode == 0, result.stderr
    _assert_same_transcoders(tmp_path / "straight", tmp_path / "stopped")


def test_a_layer_trained_alone_and_resumed_gets_its_weights_of_a_run_of_every_layer(tmp_path, monkeypatch):
    import tccli.training.train as tr

    cache = toy_cache(layers=(0, 1, 2))
    every = train(small_config(tmp_path, "every", seed=3, checkpoint_every=7), cache)
    original = tr.train_one_step

    def crashing(state, x, y, config, step, *args, **kwargs):
        if step == 17:  # after the checkpoint of step 14
            raise RuntimeError("the machine went away")
        return original(state, x, y, config, step, *args, **kwargs)

    monkeypatch.setattr(tr, "train_one_step", crashing)
    alone = small_config(tmp_path, "alone", seed=3, checkpoint_every=7, layers="2")
    with pytest.raises(RuntimeError, match="went away"):
        train(alone, cache)
    assert torch.load(Path(alone.out) / CHECKPOINT_FILE, weights_only=True)["step"] == 14
    monkeypatch.setattr(tr, "train_one_step", original)
    resumed = train(small_config(tmp_path, "alone", seed=3, checkpoint_every=7, layers="2", resume=True), cache)
    for name in every[2].tensor_names():
        assert torch.equal(getattr(every[2], name), getattr(resumed[2], name)), name
    assert every[2].config.feature_frequency == resumed[2].config.feature_frequency


# ----------------------------------------------------------------------------- metric lines on stderr


def test_metric_lines_reach_stderr_as_plain_lines_when_it_is_not_a_terminal(tmp_path, capsys):
    config = small_config(tmp_path, "loud", quiet=False, log_every=10, tokens=64 * 40)
    train(config, toy_cache(layers=(0, 1)))
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    logged = [json.loads(line) for line in (Path(config.out) / LOG_FILE).read_text().splitlines()]
    assert [(e["step"], e["layer"]) for e in logged] == [(s, layer) for s in (10, 20, 30, 40) for layer in (0, 1)]
    # one unwrapped line per logged entry, saying what the log says, with no bar or control characters
    assert len(lines) == len(logged)
    for line, entry in zip(lines, logged):
        assert line.startswith(f"step {entry['step']}/40 layer {entry['layer']} lr {entry['lr']:.2e} ")
        assert f" FVU {entry['fvu']:.4f} dead {entry['dead_fraction']:.3f} (" in line and line.endswith("s)")
        assert "\x1b" not in line and "\r" not in line
    # --quiet: nothing
    train(small_config(tmp_path, "quiet", quiet=True, log_every=10, tokens=64 * 40), toy_cache(layers=(0, 1)))
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- --force and --resume


def test_force_replaces_only_the_runs_own_files(tmp_path):
    config = small_config(tmp_path, tokens=64 * 10)
    train(config, toy_cache())
    out = Path(config.out)
    (out / "notes.txt").write_text("mine")
    (out / "layer_0" / "extra.txt").write_text("also mine")
    with pytest.raises(TcError, match="already exists and is not empty"):
        train(small_config(tmp_path, tokens=64 * 10, seed=1), toy_cache())
    train(small_config(tmp_path, tokens=64 * 10, seed=1, force=True), toy_cache())
    assert (out / "notes.txt").read_text() == "mine" and (out / "layer_0" / "extra.txt").read_text() == "also mine"
    assert json.loads((out / "train_config.json").read_text())["seed"] == 1
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 2  # the earlier run's lines are gone


def test_resume_where_nothing_was_started_starts_and_says_so(tmp_path, capsys):
    """--resume on a missing or empty --out starts the run, saying so on stderr (not in silence)."""
    (tmp_path / "empty").mkdir()
    for name in ("new", "empty"):
        config = small_config(tmp_path, name, tokens=64 * 10, resume=True, quiet=False)
        train(config, toy_cache())
        assert (Path(config.out) / "layer_0" / "config.json").is_file()
        assert f"tc train: nothing to resume in {config.out} yet; starting the run" in capsys.readouterr().err


def test_resume_compares_meaning_not_spelling(tmp_path):
    config = small_config(tmp_path, tokens=64 * 20, checkpoint_every=5, layers="0-1", expansion=4)
    train(config, toy_cache())
    # the same layers and width spelled differently continue the run
    train(small_config(tmp_path, tokens=64 * 20, layers="all", expansion=1, features=4 * D, resume=True), toy_cache())
    with pytest.raises(TcError, match="--layers gives \\[0\\] but the run in --out trains \\[0, 1\\]"):
        train(small_config(tmp_path, tokens=64 * 20, layers="0", resume=True), toy_cache())
    with pytest.raises(TcError, match="would have 16 features per layer but the run in --out has 32"):
        train(small_config(tmp_path, tokens=64 * 20, features=16, resume=True), toy_cache())


def test_resume_refuses_changed_options(tmp_path):
    config = small_config(tmp_path, tokens=64 * 10, checkpoint_every=5, lr=0.01)
    train(config, toy_cache())
    with pytest.raises(TcError, match="--k is 5 but the run in --out used 4; .*--force starts the run over"):
        train(small_config(tmp_path, tokens=64 * 10, k=5, lr=0.01, resume=True), toy_cache())
    # an option left out is named as such, with the default it would take (adam's 1.5e-3 for 16,384 features,
    # times 1/sqrt(features / 16384)), not as None
    default = 1.5e-3 / math.sqrt(4 * D / 16384)
    with pytest.raises(TcError) as refused:
        train(small_config(tmp_path, tokens=64 * 10, resume=True), toy_cache())
    assert str(refused.value) == (
        f"--resume: --lr is not given (its default here is {default:.3g}) but the run in --out used 0.01; "
        "a resumed run keeps its options; --force starts the run over"
    )
