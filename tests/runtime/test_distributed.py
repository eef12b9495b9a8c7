"""tc under torchrun: sharded caching, data- and layer-parallel training, dead ranks (gloo, 2 processes).

The multi-process tests launch `python -m torch.distributed.run --nproc-per-node 2 -m tccli ...` in a
subprocess and compare with a single process run here, in-process, on the same data.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cache_helpers import cache_in_process
from tccli.config.data import CacheConfig
from tccli.config.training import TrainConfig
from tccli.data.cache_reader import ActivationCache
from tccli.data.cache_shards import sharded_run
from tccli.errors import TcError
from tccli.runtime import distributed
from tccli.runtime.distributed import (
    Distributed,
    Shard,
    batch_share,
    checkpoint_name,
    own_layers,
    shard_path,
    shard_rows,
)
from tccli.training.run_folder import CHECKPOINT_FILE, LOG_FILE
from tccli.training.train import train
from tccli.transcoders.files import load_transcoder

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT = 240  # seconds a whole torchrun launch may take on a loaded 2-core machine


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def torchrun_command(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "tccli",
        *args,
    ]


def torchrun_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TC_DEBUG"):
        env.pop(name, None)
    return env


def torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        torchrun_command(*args), capture_output=True, text=True, env=torchrun_env(), timeout=LAUNCH_TIMEOUT
    )


# ============================================================================ the splits (pure)


def test_shard_rows_are_contiguous_whole_batches_covering_every_row():
    for n_rows, batch, world in [(40, 4, 2), (41, 4, 2), (37, 5, 3), (8, 8, 1), (9, 4, 3)]:
        spans = [shard_rows(n_rows, batch, rank, world) for rank in range(world)]
        assert spans[0][0] == 0 and spans[-1][1] == n_rows
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, disjoint, in rank order
        assert all(start % batch == 0 and start < stop for start, stop in spans)  # whole batches, none empty
    assert shard_rows(41, 4, 0, 2) == (0, 20) and shard_rows(41, 4, 1, 2) == (20, 41)
    with pytest.raises(TcError, match="only 1 batch"):
        shard_rows(3, 4, 0, 2)


def test_batch_share_splits_every_batch_into_rank_slices():
    order = np.random.default_rng(0).permutation(50)  # 3 batches of 16, 2 tokens left over
    parts = [batch_share(order, 3, 16, Distributed(rank=r, world=4)) for r in range(4)]
    for b in range(3):  # batch b of the single process = the ranks' batch b slices, in rank order
        joined = np.concatenate([p[b * 4 : (b + 1) * 4] for p in parts])
        assert np.array_equal(joined, order[b * 16 : (b + 1) * 16])
    layer_parallel = Distributed(rank=1, world=4, distribute_layers=True)
    assert batch_share(order, 3, 16, layer_parallel) is order  # whole batches on every rank


def test_layer_assignment_checkpoints_and_shard_names():
    assert own_layers([0, 2, 3, 5, 7], Distributed(rank=1, world=2, distribute_layers=True)) == [2, 5]
    assert own_layers([0, 2, 3], Distributed(rank=1, world=2)) == [0, 2, 3]  # data parallel: all layers
    with pytest.raises(TcError, match="1 layer.* but 2 ranks"):
        own_layers([4], Distributed(rank=0, world=2, distribute_layers=True))
    assert (
        checkpoint_name(CHECKPOINT_FILE, Distributed(rank=1, world=3, distribute_layers=True))
        == "checkpoint.rank1-of-3.tcstate"
    )
    assert checkpoint_name(CHECKPOINT_FILE, Distributed(rank=1, world=3)) == CHECKPOINT_FILE
    assert shard_path(Path("/x/acts.h5"), 1, 2) == Path("/x/acts.rank1-of-2.h5")
    assert not distributed.launched()  # pytest itself is not under torchrun


def test_single_process_gradient_averaging_and_counts_are_identities():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    distributed.SINGLE_PROCESS.average_gradients([p])
    assert torch.equal(p.grad, torch.tensor([1.0, 2.0, 3.0]))
    counts = torch.tensor([0, 5])
    assert distributed.SINGLE_PROCESS.sum_counts(counts) is counts


def test_sharded_cache_refuses_stdin_and_an_existing_output_before_starting(tmp_path):
    out = tmp_path / "acts.h5"
    with pytest.raises(TcError, match="stdin.* cannot be shared among torchrun ranks"):
        with sharded_run(CacheConfig(data=["-"], out=str(out))):
            pass
    out.write_bytes(b"something")
    with pytest.raises(TcError, match="already exists: pass --resume"):
        with sharded_run(CacheConfig(data=["a.txt"], out=str(out))):
            pass
    assert out.read_bytes() == b"something"
    with pytest.raises(TcError, match="--dist-timeout must be a positive number"):
        CacheConfig(data=["a.txt"], dist_timeout=0).validate()


# ============================================================================ sharded cache


def cache_values(model: Path, data: Path, out: Path) -> dict:
    return dict(
        model=str(model),
        data=[str(data)],
        out=str(out),
        tokens=16 * 42,
        context=16,
        batch_size=4,
        dtype="float32",
        device="cpu",
        quiet=True,
        commit_every=4,
    )


def cache_args(values: dict) -> list[str]:
    return [
        "cache",
        "--model",
        values["model"],
        "--data",
        *values["data"],
        "--out",
        values["out"],
        "--tokens",
        str(values["tokens"]),
        "--context",
        "16",
        "--batch-size",
        "4",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--commit-every",
        "4",
        "--quiet",
    ]


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def caches(tiny_model_dirs, tmp_path_factory):
    """A single-process cache and the 2-rank sharded cache of the same arguments; rank 1's shard was
    interrupted after 3 batches first, so the torchrun run with --resume completes it."""
    root = tmp_path_factory.mktemp("dist_caches")
    text = root / "corpus.txt"
    text.write_text(
        "\n\n".join(
            f"Story {i}. Once upon a time there was a little girl named Lily. " * (1 + i % 3) for i in range(40)
        )
        + "\n"
    )
    torch.set_num_threads(1)
    single = cache_values(tiny_model_dirs["llama"], text, root / "single.h5")
    cache_in_process(CacheConfig(**single))
    sharded = dict(single, out=str(root / "acts.h5"))
    beats = []

    def stop_after_three_batches() -> None:
        beats.append(1)
        if len(beats) == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        cache_in_process(
            CacheConfig(**dict(sharded, out=str(root / "acts.rank1-of-2.h5"))),
            shard=Shard(1, 2, heartbeat=stop_after_three_batches),
        )
    started = time.monotonic()
    result = torchrun(*cache_args(sharded), "--resume")
    return dict(
        single=Path(single["out"]),
        joined=Path(sharded["out"]),
        result=result,
        root=root,
        launch_seconds=time.monotonic() - started,
    )


@pytest.mark.slow
def test_sharded_cache_equals_the_single_process_cache(caches):
    result = caches["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == ""  # --quiet: nothing on stdout, from any rank
    joined, single = caches["joined"], caches["single"]
    with h5py.File(single, "r") as a, h5py.File(joined, "r") as b:
        names = []
        a.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        assert len(names) == 2 + 2 * 2  # tokens, doc_ids, 2 layers x (mlp_in, mlp_out)
        for name in names:
            assert b[name].is_virtual
            assert b[name].dtype == a[name].dtype and b[name].shape == a[name].shape, name
            assert np.array_equal(b[name][()], a[name][()]), name  # the same rows in the same order, bit for bit
        attrs_a = {k: np.asarray(v).tolist() for k, v in a.attrs.items()}
        attrs_b = {k: np.asarray(v).tolist() for k, v in b.attrs.items()}
        shards = json.loads(attrs_b.pop("shards"))
        assert attrs_b == attrs_a
    n_rows = 42
    assert shards == [
        {"file": "acts.rank0-of-2.h5", "first_row": 0, "n_rows": 20},
        {"file": "acts.rank1-of-2.h5", "first_row": 20, "n_rows": n_rows - 20},
    ]
    with ActivationCache.open(joined) as cache, ActivationCache.open(single) as reference:
        assert cache.complete and cache.n_tokens == reference.n_tokens == n_rows * 16
        across = (20 * 16 - 5, 20 * 16 + 7)  # a read that spans the two shards
        assert np.array_equal(cache.read(1, "mlp_out", *across), reference.read(1, "mlp_out", *across))
        assert np.array_equal(cache.tokens(), reference.tokens())


@pytest.mark.slow
def test_rank_1_resumed_its_interrupted_shard(caches):
    stderr = caches["result"].stderr
    assert caches["result"].returncode == 0, stderr[-3000:]
    with h5py.File(caches["root"] / "acts.rank1-of-2.h5", "r") as f:
        assert bool(f.attrs["complete"]) and int(f.attrs["shard_first_row"]) == 20
    assert not (caches["root"] / "acts.rank1-of-2.h5.progress").exists()


@pytest.mark.slow
def test_joined_cache_refuses_a_missing_or_foreign_shard(caches, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("acts.h5", "acts.rank0-of-2.h5", "acts.rank1-of-2.h5"):
        shutil.copy(caches["root"] / name, folder / name)
    with ActivationCache.open(folder / "acts.h5") as cache, ActivationCache.open(caches["single"]) as single:
        assert np.array_equal(cache.read(0, "mlp_in", 0, 16), single.read(0, "mlp_in", 0, 16))  # shards found
    with h5py.File(folder / "acts.rank1-of-2.h5", "r+") as f:
        f.attrs["config"] = json.dumps({"other": "run"})
    with pytest.raises(TcError, match="acts.rank1-of-2.h5 of .* is from another run"):
        ActivationCache.open(folder / "acts.h5")
    (folder / "acts.rank1-of-2.h5").unlink()
    with pytest.raises(TcError, match="shard .*acts.rank1-of-2.h5 is missing"):
        ActivationCache.open(folder / "acts.h5")


# ============================================================================ training


def train_values(cache: Path, out: Path, **overrides) -> dict:
    values = dict(
        cache=str(cache),
        out=str(out),
        expansion=2,
        k=4,
        aux_k=0,
        batch_size=64,
        tokens=64 * 14,
        shuffle_buffer=128,
        warmup_steps=3,
        lr=3e-3,
        dead_window=4,
        checkpoint_every=5,
        log_every=1,
        quiet=True,
    )
    values.update(overrides)
    return values


def train_args(values: dict, *extra: str) -> list[str]:
    args = ["train"]
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False:
            args += [flag, str(value)]
    return args + list(extra)


def assert_same_transcoders(a_dir: Path, b_dir: Path, layers, exact: bool) -> None:
    for layer in layers:
        a, b = load_transcoder(a_dir / f"layer_{layer}"), load_transcoder(b_dir / f"layer_{layer}")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "b_pre"):
            x, y = getattr(a, name), getattr(b, name)
            if exact:
                assert torch.equal(x, y), (layer, name)
            else:
                # float32 sums in another order: measured differences ~1e-7 after 14 steps
                assert torch.allclose(x, y, rtol=1e-5, atol=1e-6), (layer, name, float((x - y).abs().max()))
        assert a.config.feature_frequency == b.config.feature_frequency  # firing counts summed over ranks


@pytest.mark.slow
def test_data_parallel_training_equals_one_process(caches, tmp_path):
    """2 ranks with batch 32 each (--batch-size 64 is the global batch) = 1 process with batch 64."""
    values = train_values(caches["joined"], tmp_path / "ddp")
    result = torchrun(*train_args(values))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == f"{tmp_path / 'ddp'}\n"  # one copy, from rank 0
    train(TrainConfig(**dict(values, out=str(tmp_path / "one"))))
    assert_same_transcoders(tmp_path / "one", tmp_path / "ddp", (0, 1), exact=False)
    ddp_log = (tmp_path / "ddp" / LOG_FILE).read_text().splitlines()
    assert len(ddp_log) == 14 * 2  # rank 0 alone writes the log: one line per step and layer
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


@pytest.mark.slow
def test_layer_parallel_training_equals_one_process_exactly(caches, tmp_path):
    values = train_values(caches["joined"], tmp_path / "layers", aux_k=8, batch_size=48, tokens=48 * 10)
    result = torchrun(*train_args(values, "--distribute-layers"))
    assert result.returncode == 0, result.stderr[-3000:]
    train(TrainConfig(**dict(values, out=str(tmp_path / "one"))))
    assert_same_transcoders(tmp_path / "one", tmp_path / "layers", (0, 1), exact=True)
    for rank in (0, 1):  # each rank checkpoints its own layer
        saved = torch.load(tmp_path / "layers" / f"checkpoint.rank{rank}-of-2.tcstate", weights_only=True)
        assert sorted(saved["layers"]) == [rank] and saved["step"] == 10


# ============================================================================ a rank that dies


def worker_pid(launcher: subprocess.Popen, rank: int, deadline: float) -> int:
    """The pid of torchrun's worker with RANK=rank (its children, found through /proc)."""
    while time.time() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                environ = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == launcher.pid and f"RANK={rank}".encode() in environ:
                return int(entry.name)
        time.sleep(0.2)
    raise AssertionError(f"no worker with RANK={rank}")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
@pytest.mark.parametrize("fate", ["killed", "stalled"])
def test_a_dead_or_stalled_rank_stops_the_run_with_an_error(caches, tmp_path, fate):
    out = tmp_path / "run"
    values = train_values(caches["joined"], out, tokens=64 * 1_000_000, checkpoint_every=0, dist_timeout=4)
    launcher = subprocess.Popen(
        torchrun_command(*train_args(values)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=torchrun_env(),
    )
    try:
        deadline = time.time() + LAUNCH_TIMEOUT
        while time.time() < deadline and not ((out / LOG_FILE).exists() and (out / LOG_FILE).stat().st_size):
            assert launcher.poll() is None, launcher.communicate()[1][-3000:]
            time.sleep(0.2)
        rank1, rank0 = worker_pid(launcher, 1, deadline), worker_pid(launcher, 0, deadline)
        stopped_at = time.time()
        os.kill(rank1, signal.SIGKILL if fate == "killed" else signal.SIGSTOP)
        if fate == "stalled":  # rank 0 must give up by itself, after --dist-timeout 4 s
            while alive(rank0) and time.time() < stopped_at + 60:
                time.sleep(0.2)
            waited = time.time() - stopped_at
            os.kill(rank1, signal.SIGCONT)  # let torchrun's SIGTERM end it
            assert 3 <= waited < 60, waited
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode != 0
    assert time.time() - stopped_at < 120
    if fate == "stalled":
        assert (
            "tc: error: rank 0 of 2: all-reduce failed, another rank died or stalled (no answer within "
            "--dist-timeout 4 s" in stderr
        ), stderr[-3000:]
    else:
        assert "exitcode  : -9" in stderr, stderr[-3000:]  # torchrun names the rank that died and stops the rest
