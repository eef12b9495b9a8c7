"""tc cache: values equal the model's, float16 overflow refused, crash safety under SIGKILL, bad input."""

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

from cache_helpers import cache_in_process, file_content
from conftest import plain_model_reference, run_tc
from tccli.config.data import CacheConfig
from tccli.data.cache_format import make_plan, progress_path
from tccli.data.cache_reader import ActivationCache
from tccli.errors import TcError
from tccli.model.loading import load_model, run_capture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cache_config(model: Path, data: Path, out: Path, **overrides) -> CacheConfig:
    values = dict(
        model=str(model), data=[str(data)], out=str(out), tokens=512, context=32, batch_size=8, device="cpu", quiet=True
    )
    values.update(overrides)
    config = CacheConfig(**values)
    config.validate()
    return config


def reference_activations(
    model_dir: Path, tokens: np.ndarray, layers: list[int], batch_size: int, engine: str = "bridge"
) -> dict:
    """MLP in/out of each layer from a full forward pass over the same batches, float32 [n_tokens, d]:
    the bridge's hooks, or for the native engine the plain HuggingFace model's (see conftest)."""
    if engine == "native":
        return plain_model_reference(model_dir, tokens, layers, batch_size)
    loaded = load_model(str(model_dir), "cpu", "float32")
    hooks = {(L, w): getattr(loaded.info.layer(L), w) for L in layers for w in ("mlp_in", "mlp_out")}
    parts: dict = {key: [] for key in hooks}
    for lo in range(0, tokens.shape[0], batch_size):
        captured = run_capture(
            loaded, torch.from_numpy(tokens[lo : lo + batch_size].astype(np.int64)), list(hooks.values())
        )
        for key, hook in hooks.items():
            parts[key].append(captured[hook].reshape(-1, loaded.info.d_model))
    return {key: torch.cat(chunks) for key, chunks in parts.items()}


# ============================================================================ values


@pytest.mark.parametrize("engine", ["native", "bridge"])
@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_cached_values_equal_the_model(tiny_model_dir, text_file, tmp_path, storage, engine):
    out = tmp_path / "acts.h5"
    config = cache_config(tiny_model_dir, text_file, out, layers="0-1", dtype=storage, compression="lzf", engine=engine)
    cache_in_process(config)
    with ActivationCache.open(out) as cache:
        assert cache.complete and cache.layers == [0, 1] and cache.n_tokens == 512
        assert cache.attrs["engine"] == engine
        tokens = cache.tokens()
        assert tokens.shape == (16, 32) and (tokens[:, 0] == cache.model_info["bos_token_id"]).all()
        reference = reference_activations(tiny_model_dir, tokens, [0, 1], config.batch_size, engine)
        for (layer, which), expected in reference.items():
            got = torch.from_numpy(cache.read(layer, which))
            if storage == "float32":
                assert torch.equal(got, expected), (layer, which)
            else:  # exactly the model's values rounded to bfloat16
                assert torch.equal(got, expected.to(torch.bfloat16).float()), (layer, which)
            assert torch.equal(torch.from_numpy(cache.read(layer, which, 40, 70)), got[40:70])


def test_stories260k_float16_equals_model_rounded(stories_dir, corpora_dir, tmp_path):
    out = tmp_path / "acts.h5"
    config = cache_config(
        stories_dir,
        corpora_dir / "tinystories-valid-excerpt.txt",
        out,
        layers="1,3",
        dtype="float16",
        tokens=1024,
        context=64,
    )
    cache_in_process(config)
    with ActivationCache.open(out) as cache:
        reference = reference_activations(stories_dir, cache.tokens(), [1, 3], config.batch_size, "native")
        assert cache.attrs["architecture"] == "LlamaForCausalLM" and cache.layers == [1, 3]
        assert (cache.attrs["engine"], cache.attrs["attention"]) == ("native", "sdpa")
        for (layer, which), expected in reference.items():
            assert torch.equal(torch.from_numpy(cache.read(layer, which)), expected.half().float())
        hooks = json.loads(cache.attrs["hook_names"])
        assert hooks["3"] == {"mlp_in": "blocks.3.ln2.hook_normalized", "mlp_out": "blocks.3.hook_mlp_out"}


def test_float16_overflow_is_refused_not_stored_as_inf():
    from tccli.data.cache_writer import storage_array

    config = CacheConfig(model="x", data=["d"], context=2, batch_size=1, dtype="float16")
    plan = make_plan(config, [0], n_rows=1, d_model=3)
    fine = torch.tensor([[[65519.0, -1.0, 0.5], [float("nan"), 2.0, 3.0]]])
    assert storage_array("layers/0/mlp_in", fine, plan)[0, 0] == np.float16(65504)
    with pytest.raises(TcError, match="beyond float16's range"):
        storage_array("layers/0/mlp_out", torch.tensor([[[70000.0, 0, 0], [0, 0, 0]]]), plan)


def test_only_layers_up_to_the_last_requested_run(tiny_model_dirs, text_file, tmp_path, monkeypatch):
    import tccli.model.loading as models

    seen: list = []
    original = models.run_capture

    def spy(loaded, tokens, hook_names, stop_after=None, extra_hooks=()):
        seen.append(stop_after)
        return original(loaded, tokens, hook_names, stop_after=stop_after, extra_hooks=extra_hooks)

    monkeypatch.setattr(models, "run_capture", spy)
    cache_in_process(cache_config(tiny_model_dirs["gpt2"], text_file, tmp_path / "a.h5", layers="0", engine="bridge"))
    assert seen and set(seen) == {"blocks.0.hook_mlp_out"}


def test_fewer_tokens_than_asked_are_stored_and_said(tiny_model_dirs, tmp_path):
    data = tmp_path / "small.txt"
    data.write_text("The cat sat on the mat.\n\nOnce upon a time there was a girl.\n\n" * 6)
    messages: list[str] = []
    out = tmp_path / "a.h5"
    cache_in_process(cache_config(tiny_model_dirs["llama"], data, out, tokens=10_000, context=16), log=messages.append)
    with ActivationCache.open(out) as cache:
        assert cache.complete and 0 < cache.n_tokens < 10_000
        assert cache.attrs["tokens_requested"] == 10_000
        assert cache.attrs["tokens_available"] >= cache.n_tokens
    assert any("fewer than --tokens 10000" in m for m in messages)


# ============================================================================ crash safety


def long_text(path: Path, n_docs: int = 400) -> Path:
    rng = np.random.default_rng(1)
    words = "the cat sat on a mat once upon time there was little girl named lily she liked play".split()
    path.write_text("\n\n".join(" ".join(rng.choice(words, size=40)) for _ in range(n_docs)) + "\n")
    return path


def cache_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "cache",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--tokens",
        "6000",
        "--context",
        "16",
        "--batch-size",
        "2",
        "--layers",
        "all",
        "--dtype",
        "bfloat16",
        "--device",
        "cpu",
        *extra,
    ]


def committed_units(out: Path) -> int:
    try:
        return len(json.loads(progress_path(out).read_text())["units"])
    except (OSError, ValueError, KeyError):
        return -1


def start_and_kill(args: list[str], out: Path, kill_when) -> bool:
    """Start `tc` and SIGKILL it once ``kill_when(out)`` holds; False if it finished first."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tccli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if kill_when(out):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.wait()
    return False


@pytest.mark.process
@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(tiny_model_dirs, tmp_path):
    model = tiny_model_dirs["gpt2"]
    data = long_text(tmp_path / "text.txt")
    reference = tmp_path / "reference.h5"
    cache_in_process(
        cache_config(model, data, reference, tokens=6000, context=16, batch_size=2, dtype="bfloat16", layers="all")
    )
    expected = file_content(reference)

    out = tmp_path / "killed.h5"
    args = cache_args(model, data, out, "--commit-every", "4")
    kill_points = [
        lambda o: o.with_name(o.name + ".creating").exists() or o.exists(),  # while creating the file
        lambda o: committed_units(o) >= 3,  # a few commits in
        lambda o: committed_units(o) >= 40,
    ]
    killed = 0
    for index, kill_when in enumerate(kill_points):
        killed += start_and_kill(args + (["--resume"] if index else []), out, kill_when)
    assert killed == len(kill_points), "a run finished before it could be killed"
    assert out.exists() and committed_units(out) >= 40

    resume = cache_config(
        model,
        data,
        out,
        tokens=6000,
        context=16,
        batch_size=2,
        dtype="bfloat16",
        layers="all",
        commit_every=4,
        resume=True,
    )
    # a kill may also hit an HDF5 write: damage committed bytes; resume must notice and rewrite them
    with h5py.File(out, "r") as f:
        offset = f["layers/0/mlp_in"].id.get_chunk_info(0).byte_offset
    with open(out, "r+b") as handle:
        handle.seek(offset + 10)
        handle.write(b"\xff" * 64)
    messages: list[str] = []
    cache_in_process(resume, log=messages.append)
    assert any("rows 0-3" in m and "do not match their checksum" in m for m in messages), messages
    assert not progress_path(out).exists()
    assert file_content(out) == expected

    # a second --resume of a complete file changes nothing
    cache_in_process(resume, log=messages.append)
    assert "already complete" in messages[-1]
    assert file_content(out) == expected


def test_resume_of_a_cache_from_before_engines_counts_it_as_the_bridge(tiny_model_dirs, text_file, tmp_path):
    out = tmp_path / "old.h5"
    cache_in_process(cache_config(tiny_model_dirs["llama"], text_file, out, engine="bridge"))
    with h5py.File(out, "r+") as f:  # what tc wrote before --engine existed
        config = json.loads(f.attrs["config"])
        del config["engine"]
        f.attrs["config"] = json.dumps(config, sort_keys=True)
    resumed = cache_config(tiny_model_dirs["llama"], text_file, out, engine="bridge", resume=True)
    assert cache_in_process(resumed).seconds == 0.0
    with pytest.raises(TcError, match="other arguments.*engine"):
        cache_in_process(cache_config(tiny_model_dirs["llama"], text_file, out, engine="native", resume=True))


def test_resume_restarts_cleanly_when_the_file_is_unreadable(tiny_model_dirs, text_file, tmp_path):
    reference = tmp_path / "reference.h5"
    cache_in_process(cache_config(tiny_model_dirs["neox"], text_file, reference))
    out = tmp_path / "acts.h5"
    config = cache_config(tiny_model_dirs["neox"], text_file, out, commit_every=8)
    cache_in_process(config)
    # what a kill in the middle of a metadata write can leave: a progress file and a broken HDF5 file
    from tccli.data.cache_format import config_fingerprint, write_progress

    write_progress(out, config_fingerprint(config, "cpu"), [(8, "00000000")])
    out.write_bytes(out.read_bytes()[:2000])
    messages: list[str] = []
    cache_in_process(cache_config(tiny_model_dirs["neox"], text_file, out, resume=True), log=messages.append)
    assert any("starting again" in m for m in messages)
    assert file_content(out) == file_content(reference)


def test_resume_refuses_other_arguments(tiny_model_dirs, text_file, tmp_path):
    out = tmp_path / "acts.h5"
    cache_in_process(cache_config(tiny_model_dirs["gpt2"], text_file, out))
    before = out.read_bytes()
    with pytest.raises(TcError, match="other arguments"):
        cache_in_process(cache_config(tiny_model_dirs["gpt2"], text_file, out, resume=True, seed=5))
    assert out.read_bytes() == before


# ============================================================================ bad input (real CLI)


def one_line_error(result, *fragments: str) -> None:
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("tc: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # seven `tc` subprocesses
def test_bad_input_gives_one_line_and_keeps_data(tiny_model_dirs, text_file, tmp_path):
    model = tiny_model_dirs["gpt2"]
    out = tmp_path / "acts.h5"
    base = [
        "cache",
        "--model",
        str(model),
        "--data",
        str(text_file),
        "--tokens",
        "256",
        "--context",
        "32",
        "--device",
        "cpu",
    ]
    assert run_tc(*base, "--out", str(out)).returncode == 0
    original = out.read_bytes()

    one_line_error(run_tc(*base, "--out", str(out)), "already exists", "--resume", "--force")
    one_line_error(run_tc(*base, "--out", str(tmp_path / "b.h5"), "--layers", "7"), "layer 7", "2 layers")
    one_line_error(
        run_tc("cache", "--model", str(tmp_path / "nope"), "--data", str(text_file), "--out", str(tmp_path / "c.h5")),
        "does not exist",
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    one_line_error(
        run_tc("cache", "--model", str(model), "--data", str(empty), "--out", str(tmp_path / "d.h5")), "no text"
    )
    one_line_error(
        run_tc(
            "cache", "--model", str(model), "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "e.h5")
        ),
        "does not exist",
    )
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    foreign_bytes = foreign.read_bytes()
    one_line_error(run_tc(*base, "--out", str(foreign), "--resume"), "not a tc activation cache")
    assert foreign.read_bytes() == foreign_bytes
    assert out.read_bytes() == original
    assert not any(p.name.startswith(("b.h5", "c.h5", "d.h5", "e.h5")) for p in tmp_path.iterdir())


def test_full_disk_is_refused_before_writing(tiny_model_dirs, text_file, tmp_path, monkeypatch):
    import collections
    import shutil

    out = tmp_path / "acts.h5"
    out.write_bytes(b"precious")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(TcError, match="not enough disk space"):
        cache_in_process(cache_config(tiny_model_dirs["gpt2"], text_file, out, force=True))
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["acts.h5", text_file.name])


def test_resume_compares_what_the_arguments_mean(artefacts):
    """The shared cache was made with no --model, --layers 0-1 and an absolute --data path; the same run
    spelt `--model builtin` or the built-in folder, `--layers 0,1`, and a relative path is the same run."""
    from tccli.model.loading import BUILTIN_MODEL_DIR

    before = file_content(artefacts.cache)
    for model in ("builtin", str(BUILTIN_MODEL_DIR)):
        result = run_tc(
            "cache",
            "--model",
            model,
            "--data",
            artefacts.text.name,
            "--tokens",
            "4000",
            "--context",
            "64",
            "--layers",
            "0,1",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--out",
            str(artefacts.cache),
            "--resume",
            cwd=artefacts.root,
        )
        assert result.returncode == 0 and "is already complete" in result.stderr, result.stderr
    result = run_tc(
        "cache",
        "--data",
        artefacts.text.name,
        "--tokens",
        "4k",
        "--context",
        "64",
        "--layers",
        "0",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--out",
        str(artefacts.cache),
        "--resume",
        cwd=artefacts.root,
    )
    assert result.returncode == 2 and "layers: [0, 1] then, [0] now" in result.stderr, result.stderr
    assert file_content(artefacts.cache) == before
