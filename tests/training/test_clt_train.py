"""tccli.training.clt_train: `tc train --kind clt` on small caches: it learns, writes a CLT that load_transcoders
reads, resumes to the same weights after an interruption, and two gloo processes (features sharded) reach the
weights of one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from training_helpers import small_config, toy_cache

from tccli.errors import TcError
from tccli.runtime import interrupts
from tccli.training.run_folder import CHECKPOINT_FILE, LOG_FILE
from tccli.training.train import train
from tccli.transcoders.cross_layer import CrossLayerTranscoder
from tccli.transcoders.files import load_cross_layer
from tccli.transcoders.formats import load_transcoders

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYERS = (0, 1, 2)


def clt_config(tmp_path: Path, name: str = "out", **overrides):
    base = dict(kind="clt", activation="jumprelu", tokens=64 * 60, device="cpu")
    base.update(overrides)
    return small_config(tmp_path, name, **base)


def assert_same_clt(a: CrossLayerTranscoder, b: CrossLayerTranscoder, atol: float = 0.0) -> None:
    assert a.tensor_names() == b.tensor_names()
    params_b = dict(b.named_parameters())
    for name, p in a.named_parameters():
        if atol:
            torch.testing.assert_close(p, params_b[name], atol=atol, rtol=0, msg=name)
        else:
            assert torch.equal(p, params_b[name]), name


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]


# ----------------------------------------------------------------------------- a run


@pytest.mark.parametrize(
    "activation, skip", [("jumprelu", False), ("relu", True), ("topk", False), ("batchtopk", True)]
)
def test_a_short_run_learns_and_writes_a_clt_that_load_transcoders_reads(tmp_path, activation, skip):
    config = clt_config(tmp_path, activation=activation, skip=skip, tokens=64 * 80, log_every=10)
    cache = toy_cache(layers=LAYERS)
    trained = train(config, cache)
    assert isinstance(trained, CrossLayerTranscoder) and trained.layers == list(LAYERS)
    loaded = load_transcoders(str(Path(config.out) / "clt"))
    assert isinstance(loaded, CrossLayerTranscoder)
    assert_same_clt(trained, loaded)
    c = loaded.config
    assert (c.activation, c.skip, c.n_features, c.d_in) == (activation, skip, 32, 8)
    assert c.input_hooks == [f"blocks.{i}.ln2.hook_normalized" for i in LAYERS]
    assert c.training["kind"] == "clt" and len(c.feature_frequency) == 3
    log = log_of(Path(config.out))
    assert [(e["step"], e["layer"]) for e in log[:3]] == [(10, 0), (10, 1), (10, 2)]
    assert {"fvu", "l0", "mse", "dead_fraction", "loss"} <= set(log[0])
    for j, layer in enumerate(LAYERS):  # every layer's FVU falls, and the CLT's output explains the targets
        first, last = (e["fvu"] for e in (log[j], log[-3 + j]))
        assert last < first, (layer, first, last)
        x, y = (torch.from_numpy(a) for a in cache.arrays[layer])
        with torch.no_grad():
            outputs, activations = loaded({layer_: torch.from_numpy(cache.arrays[layer_][0]) for layer_ in LAYERS})
        fvu = float((outputs[layer] - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        assert fvu < 0.5, (layer, fvu)
    if activation == "batchtopk":  # per-feature thresholds estimated from the training batches
        for layer in LAYERS:
            assert float(loaded.threshold[str(layer)].min()) > 0
        assert float(torch.cat([t.detach() for t in loaded.threshold.values()]).std()) > 0
    if activation == "jumprelu":
        assert all(float(t.min()) >= 0 for t in loaded.threshold.values())


def test_writes_to_later_layers_are_learned(tmp_path):
    """The decoders to later layers start small and train (a CLT, not a per-layer set)."""
    trained = train(clt_config(tmp_path, activation="relu", tokens=64 * 40), toy_cache(layers=LAYERS))
    later = trained.W_dec["0"][:, 1:].detach()
    assert float(later.abs().max()) > 0


def test_batchtopk_thresholds_give_about_k_active_features_per_token(tmp_path):
    cache = toy_cache(layers=LAYERS)
    trained = train(clt_config(tmp_path, activation="batchtopk", tokens=64 * 100, k=6), cache)
    with torch.no_grad():
        _, activations = trained({layer: torch.from_numpy(cache.arrays[layer][0]) for layer in LAYERS})
    l0 = sum(float((a > 0).sum(dim=-1).float().mean()) for a in activations.values())
    assert 4.5 <= l0 <= 7.5, l0  # k = 6 per token over every layer in training (measured: 5.4)


def test_same_seed_same_clt(tmp_path):
    a = train(clt_config(tmp_path, "a", tokens=64 * 20), toy_cache(layers=LAYERS))
    b = train(clt_config(tmp_path, "b", tokens=64 * 20), toy_cache(layers=LAYERS))
    assert_same_clt(a, b)


# ----------------------------------------------------------------------------- resume and interruptions


@pytest.mark.parametrize("activation", ["jumprelu", "batchtopk"])
def test_an_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch, activation):
    """Ctrl-C (a pending signal) stops it between two steps with a checkpoint; --resume then reaches
    bit-identical weights, and every step is logged once."""
    straight = train(clt_config(tmp_path, "straight", activation=activation, log_every=5), toy_cache(layers=LAYERS))
    calls = {"n": 0}

    def pending():
        calls["n"] += 1
        return signal.SIGINT if calls["n"] == 23 else None

    monkeypatch.setattr(interrupts, "pending", pending)
    monkeypatch.setitem(interrupts._state, "handling", False)
    config = clt_config(tmp_path, "stopped", activation=activation, log_every=5)
    with pytest.raises(interrupts.Interrupted) as stopped:
        train(config, toy_cache(layers=LAYERS))
    assert stopped.value.detail == "stopped at step 23 of 60 with a checkpoint; resume with --resume"
    out = Path(config.out)
    assert torch.load(out / CHECKPOINT_FILE, weights_only=True)["step"] == 23
    assert not (out / "clt").exists()
    monkeypatch.undo()
    resumed = train(
        clt_config(tmp_path, "stopped", activation=activation, log_every=5, resume=True), toy_cache(layers=LAYERS)
    )
    assert_same_clt(straight, resumed)
    assert_same_clt(load_cross_layer(out / "clt"), load_cross_layer(tmp_path / "straight" / "clt"))
    steps = [(e["step"], e["layer"]) for e in log_of(out)]
    assert steps == [(e["step"], e["layer"]) for e in log_of(tmp_path / "straight")]


def test_resume_refuses_changed_options_and_force_starts_over(tmp_path):
    config = clt_config(tmp_path, tokens=64 * 10)
    train(config, toy_cache(layers=LAYERS))
    with pytest.raises(TcError, match="--resume: --sparsity-coef is 0.01 but the run in --out used 0.001"):
        train(clt_config(tmp_path, tokens=64 * 10, resume=True, sparsity_coef=0.01), toy_cache(layers=LAYERS))
    with pytest.raises(TcError, match="already exists and is not empty"):
        train(clt_config(tmp_path, tokens=64 * 10), toy_cache(layers=LAYERS))
    (Path(config.out) / "clt" / "layer_2.safetensors").write_bytes(b"stale")
    train(clt_config(tmp_path, tokens=64 * 10, force=True, layers="0,1"), toy_cache(layers=LAYERS))
    assert sorted(p.name for p in (Path(config.out) / "clt").iterdir()) == [
        "config.json",
        "layer_0.safetensors",
        "layer_1.safetensors",
    ]


def test_resume_needs_the_number_of_processes_that_started_the_run(tmp_path):
    config = clt_config(tmp_path, tokens=64 * 10)
    train(config, toy_cache(layers=LAYERS))
    out = Path(config.out)
    (out / CHECKPOINT_FILE).rename(out / "checkpoint.rank0-of-2.tcstate")
    with pytest.raises(TcError, match=r"holds checkpoint.rank0-of-2.tcstate, not checkpoint.tcstate: resume a CLT"):
        train(clt_config(tmp_path, tokens=64 * 10, resume=True), toy_cache(layers=LAYERS))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(distribute_layers=True), "--distribute-layers does not apply"),
        (dict(optimizer="signum"), "--kind clt trains with --optimizer adam only"),
        (dict(sparsity_ramp=1.5), "--sparsity-ramp is a fraction of the run"),
        (dict(sparsity_coef=-1.0), "--sparsity-coef must be a finite number >= 0"),
        (dict(kind="crosslayer"), "--kind must be one of transcoder, sae, clt"),
    ],
)
def test_bad_options(tmp_path, overrides, message):
    with pytest.raises(TcError, match=message):
        train(clt_config(tmp_path, **overrides), toy_cache(layers=LAYERS))


# ----------------------------------------------------------------------------- real processes

RUNNER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {helpers!r})
    import torch
    torch.set_num_threads(1)
    from pathlib import Path
    import tccli.training.clt_train as ct
    from training_helpers import small_config, toy_cache
    from tccli.runtime import interrupts
    from tccli.training.train import train
    name, activation, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode == "slow":  # time for the parent to signal us between steps
        original = ct.train_clt_step
        def slowed(*args, **kwargs):
            time.sleep(0.05)
            return original(*args, **kwargs)
        ct.train_clt_step = slowed
    config = small_config(Path({tmp!r}), name, kind="clt", activation=activation, tokens=64 * int(sys.argv[4]),
                          device="cpu", skip=True, features=16, resume=mode == "resume")
    interrupts.install()
    try:
        train(config, toy_cache(layers=(0, 1, 2)))
    except interrupts.Interrupted as exc:
        print(exc.detail, file=sys.stderr)
        sys.exit(exc.exit_code)
    # as `tc` does under torchrun (tccli.cli.app._exit_torchrun_rank): gloo sometimes aborts in torch's
    # exit-time destructors after everything is written
    sys.stderr.flush()
    os._exit(0)
""")


def _runner(tmp_path: Path) -> Path:
    script = tmp_path / "runner.py"
    script.write_text(RUNNER.format(helpers=str(Path(__file__).resolve().parent), tmp=str(tmp_path)))
    return script


def _env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.parametrize("activation", ["jumprelu", "batchtopk", "topk"])
def test_two_gloo_processes_reach_the_weights_of_one(tmp_path, activation):
    """Features sharded over 2 ranks (each holds half of every layer's features; one all-reduce of the
    reconstructions per step; BatchTopK / TopK / AuxK cut-offs found over both): after 50 steps the gathered CLT
    equals a single process's to 1e-5, in the same format."""
    script = _runner(tmp_path)
    one = subprocess.run(
        [sys.executable, str(script), "one", activation, "fresh", "50"], env=_env(), capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), "two", activation, "fresh", "50"],
            env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    two_out = tmp_path / "two"
    assert sorted(p.name for p in two_out.glob("checkpoint*")) == [
        "checkpoint.rank0-of-2.tcstate",
        "checkpoint.rank1-of-2.tcstate",
    ]
    a, b = load_cross_layer(tmp_path / "one" / "clt"), load_cross_layer(two_out / "clt")
    differ = {"feature_frequency": None, "training": None}  # the runs' --out differ; frequencies below
    assert a.config.to_dict() | differ == b.config.to_dict() | differ
    assert sorted(p.name for p in (tmp_path / "one" / "clt").iterdir()) == sorted(
        p.name for p in (two_out / "clt").iterdir()
    )
    assert_same_clt(a, b, atol=1e-5)
    if activation != "topk":  # selection counts, exactly the same entries
        assert a.config.feature_frequency == b.config.feature_frequency
    # the log is rank 0's, one line per layer and logged step
    assert [(e["step"], e["layer"]) for e in log_of(two_out)] == [
        (e["step"], e["layer"]) for e in log_of(tmp_path / "one")
    ]


@pytest.mark.process
@pytest.mark.slow
def test_ctrl_c_stops_with_a_checkpoint_and_resumes_bit_identical(tmp_path):
    script = _runner(tmp_path)
    straight = subprocess.run(
        [sys.executable, str(script), "straight", "jumprelu", "fresh", "120"],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert straight.returncode == 0, straight.stderr
    proc = subprocess.Popen(
        [sys.executable, str(script), "stopped", "jumprelu", "slow", "120"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = tmp_path / "stopped" / LOG_FILE
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.stat().st_size > 0):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    step = torch.load(tmp_path / "stopped" / CHECKPOINT_FILE, weights_only=True)["step"]
    assert 0 < step < 120 and stderr.strip() == f"stopped at step {step} of 120 with a checkpoint; resume with --resume"
    resumed = subprocess.run(
        [sys.executable, str(script), "stopped", "jumprelu", "resume", "120"],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert_same_clt(load_cross_layer(tmp_path / "straight" / "clt"), load_cross_layer(tmp_path / "stopped" / "clt"))


# ----------------------------------------------------------------------------- the command


def test_tc_train_kind_clt_from_a_real_cache(tmp_path, tiny_model_dirs, text_file):
    from conftest import run_tc

    cache = tmp_path / "acts.h5"
    args = ("--data", str(text_file), "--tokens", "4k", "--context", "32", "--dtype", "float32", "--quiet")
    result = run_tc("cache", "--model", str(tiny_model_dirs["llama"]), *args, "--layers", "0,1", "--out", str(cache))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "clt_run"
    train_args = ("--cache", str(cache), "--layers", "all", "--tokens", "8k", "--batch-size", "512", "--expansion", "2")
    result = run_tc("train", "--kind", "clt", *train_args, "--activation", "batchtopk", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    # one metric line per layer at the last step (15 steps, --log-every 50)
    lines = result.stderr.splitlines()
    assert [line.split(" lr ")[0] for line in lines] == ["step 15/15 layer 0", "step 15/15 layer 1"]
    clt = load_transcoders(str(out / "clt"))
    assert isinstance(clt, CrossLayerTranscoder) and clt.layers == [0, 1]
    assert clt.config.model_architecture == "LlamaForCausalLM"
    assert clt.config.output_hooks == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
    assert clt.config.training["kind"] == "clt" and clt.config.k == 16
    result = run_tc("train", "--kind", "clt", *train_args, "--out", str(tmp_path / "bad"), "--optimizer", "signum")
    assert result.returncode == 2 and result.stderr == "tc: error: --kind clt trains with --optimizer adam only\n"
