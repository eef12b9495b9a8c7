"""tccli.training.train: whole runs of tc train (every kind, several layers, seeds, a diverging loss, bad
options and caches) and the command end to end.

Most tests feed ``train`` an in-memory cache with the ActivationCache API (``training_helpers.ArrayCache``)
so they do not depend on `tc cache`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import ArrayCache, D, small_config, toy_cache

from tccli.config.fields import to_json_dict
from tccli.config.training import TrainConfig
from tccli.errors import TcError
from tccli.training.run_folder import CHECKPOINT_FILE, LOG_FILE
from tccli.training.train import layer_generator, train
from tccli.transcoders.files import load_transcoder
from tccli.transcoders.formats import load_transcoder_set

# ----------------------------------------------------------------------------- runs


def test_multi_layer_run_trains_and_saves_complete_configs(tmp_path):
    cache = toy_cache(layers=(0, 1))
    config = small_config(tmp_path, tokens=64 * 60, lr=1e-2)
    trained = train(config, cache)
    assert sorted(trained) == [0, 1]
    out = Path(config.out)
    loaded = load_transcoder_set(out)
    assert sorted(loaded) == [0, 1]
    for layer in (0, 1):
        tc = loaded[layer]
        c = tc.config
        assert c.layer == layer and c.n_features == 4 * D and c.activation == "topk" and c.k == 4
        assert c.model_name == "toy" and c.model_architecture == "ToyForCausalLM"
        assert c.input_hook == f"blocks.{layer}.ln2.hook_normalized" and c.output_hook == f"blocks.{layer}.hook_mlp_out"
        assert c.training == to_json_dict(config)
        assert len(c.feature_frequency) == 4 * D and 0 < sum(c.feature_frequency) <= 4 + 1e-9
        x, y = (torch.from_numpy(a) for a in cache.arrays[layer])
        with torch.no_grad():
            out_y, z = tc(x)
        # TopK: exactly k features per token (pre-activations here are positive for the top 4)
        assert int((z > 0).sum(-1).max()) <= 4 and float((z > 0).sum(-1).float().mean()) > 3.5
        fvu = float((out_y - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        assert fvu < 0.7, fvu  # the mean alone leaves 1.0
        assert torch.allclose(tc.W_dec.norm(dim=-1), torch.ones(4 * D), atol=1e-5)
    log = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert {e["layer"] for e in log} == {0, 1} and log[-1]["step"] == 60
    for layer in (0, 1):
        fvus = [e["fvu"] for e in log if e["layer"] == layer]
        assert fvus[-1] < 0.8 * fvus[0], fvus
    assert {"loss", "mse", "l1", "l0", "fvu", "dead_fraction", "lr"} <= set(log[-1])
    # one read of the cache per window serves both layers: reads = windows x layers x 2 arrays (+ stats)
    assert cache.reads > 0


def test_the_builtin_model_is_recorded_by_name_not_install_path(tmp_path):
    from tccli.model.loading import BUILTIN_MODEL_DIR
    from tccli.training.train import transcoder_config

    cache = toy_cache(layers=(0,))
    config = small_config(tmp_path)
    assert transcoder_config(config, cache, 0).model_name == "toy"
    cache.model_info["name"] = str(BUILTIN_MODEL_DIR)  # what the cache of `tc cache` (no --model) records
    assert transcoder_config(config, cache, 0).model_name == "builtin"


def test_sae_kind_reads_only_the_mlp_output(tmp_path):
    cache = toy_cache(layers=(1,))
    trained = train(small_config(tmp_path, kind="sae", activation="relu", l1=1e-3, tokens=64 * 20, lr=1e-3), cache)[1]
    assert trained.config.kind == "sae" and trained.config.input_hook == "blocks.1.hook_mlp_out"
    _, y = cache.arrays[1]
    assert np.allclose(trained.b_pre.detach().numpy(), trained.b_dec.detach().numpy(), atol=0.2)
    assert np.allclose(trained.b_pre.detach().numpy(), y.mean(0), atol=0.2)


KIND_CASES = [  # (activation, skip, optimizer): every kind, both optimisers, with and without skip
    ("topk", False, "adam"),
    ("topk", True, "signum"),
    ("batchtopk", False, "signum"),
    ("batchtopk", True, "adam"),
    ("jumprelu", False, "adam"),
    ("jumprelu", True, "signum"),
    ("relu", True, "adam"),
]


@pytest.mark.parametrize("activation, skip, optimizer", KIND_CASES)
def test_every_kind_trains_saves_and_reloads_bit_identically(tmp_path, activation, skip, optimizer):
    cache = toy_cache(layers=(0,))
    config = small_config(
        tmp_path,
        activation=activation,
        skip=skip,
        optimizer=optimizer,
        tokens=64 * 60,
        decoder_norm="unit" if activation == "relu" else "free",
        l0_coef=1e-2,
    )
    trained = train(config, cache)[0]
    c = trained.config
    assert (c.activation, c.skip) == (activation, skip)
    assert c.k == (4 if activation in ("topk", "batchtopk") else None)
    assert (trained.threshold is not None) == (activation in ("batchtopk", "jumprelu"))
    assert (trained.W_skip is not None) == skip
    if skip:
        assert float(trained.W_skip.abs().max()) > 0  # trained away from its zero initialisation
    if activation == "batchtopk":
        assert float(trained.threshold.min()) == float(trained.threshold.max()) > 0  # one threshold
    if activation == "jumprelu":
        assert float(trained.threshold.min()) >= 0 and float(trained.threshold.std()) > 0  # one per feature
    assert trained.W_enc.is_contiguous()
    loaded = load_transcoder(Path(config.out) / "layer_0")
    assert loaded.tensor_names() == trained.tensor_names()
    for name in trained.tensor_names():
        assert torch.equal(getattr(loaded, name), getattr(trained, name)), name
    x, y = (torch.from_numpy(a) for a in cache.arrays[0])
    with torch.no_grad():
        out_loaded, z_loaded = loaded(x)
        out_trained, z_trained = trained(x)
    assert torch.equal(out_loaded, out_trained) and torch.equal(z_loaded, z_trained)
    fvu = float((out_loaded - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert fvu < 0.8, fvu  # it learned something (the mean alone leaves 1.0)


def test_signum_saves_the_averaged_weights(tmp_path, monkeypatch):
    """The saved weights are the schedule-free average x, not the iterate y the gradients were taken at."""
    import tccli.training.train as tr

    captured = {}
    original = tr.finish_layer

    def spy(state, stats):
        captured["y"] = state.transcoder.W_dec.detach().clone()
        captured["x"] = state.optimizer.state[state.transcoder.W_dec]["x"].clone()
        return original(state, stats)

    monkeypatch.setattr(tr, "finish_layer", spy)
    trained = train(small_config(tmp_path, optimizer="signum", decoder_norm="free"), toy_cache(layers=(0,)))[0]
    assert not torch.equal(captured["x"], captured["y"])
    assert torch.equal(trained.W_dec.detach().cpu(), captured["x"].cpu())  # trained on a GPU under --device cuda


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = train(small_config(tmp_path, "a", layers="0"), toy_cache(layers=(0,)))[0]
    b = train(small_config(tmp_path, "b", layers="0"), toy_cache(layers=(0,)))[0]
    c = train(small_config(tmp_path, "c", layers="0", seed=1), toy_cache(layers=(0,)))[0]
    assert torch.equal(a.W_enc, b.W_enc) and torch.equal(a.W_dec, b.W_dec)
    assert not torch.equal(a.W_enc, c.W_enc)


def _assert_same_weights(a, b) -> None:
    assert a.tensor_names() == b.tensor_names()
    for name in a.tensor_names():
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.config.feature_frequency == b.config.feature_frequency


def test_a_layer_trained_alone_gets_its_weights_of_a_run_of_every_layer(tmp_path):
    every = train(small_config(tmp_path, "every", seed=1), toy_cache(layers=(0, 1, 2)))
    alone = train(small_config(tmp_path, "alone", seed=1, layers="2"), toy_cache(layers=(0, 1, 2)))
    assert sorted(every) == [0, 1, 2] and sorted(alone) == [2]
    _assert_same_weights(every[2], alone[2])
    # the seed still matters
    other = train(small_config(tmp_path, "other", seed=2, layers="2"), toy_cache(layers=(0, 1, 2)))
    assert not torch.equal(other[2].W_dec, alone[2].W_dec)


def test_each_layer_draws_from_a_generator_of_seed_and_layer():
    def draw(seed: int, layer: int) -> torch.Tensor:
        return torch.randn(16, generator=layer_generator(seed, layer))

    assert torch.equal(draw(1, 2), draw(1, 2))
    pairs = [(0, 0), (0, 1), (1, 0), (1, 2), (2, 1)]
    for i, a in enumerate(pairs):
        for b in pairs[i + 1 :]:
            assert not torch.equal(draw(*a), draw(*b)), (a, b)


def test_nan_stops_with_one_line_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    import tccli.training.train as tr

    original = tr.transcoder_loss

    def diverging(transcoder, x, y, dead, config, step, *scales):
        result = original(transcoder, x, y, dead, config, step, *scales)
        if step >= 12:  # the run diverges at step 13
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(tr, "transcoder_loss", diverging)
    config = small_config(tmp_path, checkpoint_every=5, tokens=64 * 40, activation="relu")
    with pytest.raises(
        TcError,
        match=r"the loss became nan at step 13 \(layer 0\); training stopped and its "
        r"last checkpoint \(step 10\) is kept in .*out\. A resumed run would diverge",
    ):
        train(config, toy_cache(layers=(0,)))
    saved = torch.load(Path(config.out) / CHECKPOINT_FILE, weights_only=True)
    assert saved["step"] == 10
    assert all(bool(torch.isfinite(t).all()) for t in saved["layers"][0]["transcoder"].values())
    assert not (Path(config.out) / "layer_0").exists()  # no transcoder saved from a diverged run
    # without a checkpoint the message claims none
    config = small_config(tmp_path, "unsaved", checkpoint_every=0, tokens=64 * 40, activation="relu")
    with pytest.raises(TcError, match=r"step 13 \(layer 0\); training stopped and no checkpoint had been written"):
        train(config, toy_cache(layers=(0,)))
    assert not (Path(config.out) / CHECKPOINT_FILE).exists()
    assert sorted(p.name for p in Path(config.out).iterdir()) == ["train_config.json", "train_log.jsonl"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(lr=float("nan")), "--lr must be a finite number"),
        (dict(lr=float("inf")), "--lr must be a finite number"),
        (dict(expansion=0), "--expansion must be at least 1"),
        (dict(activation="gelu"), "--activation must be one of"),
        (dict(tokens=10), "less than one batch"),
        (dict(lr_decay=2.0), "--lr-decay"),
        (dict(seed=-1), "--seed must be >= 0"),
    ],
)
def test_bad_options(tmp_path, overrides, message):
    with pytest.raises(TcError, match=message):
        train(small_config(tmp_path, **overrides), toy_cache())


def test_bad_caches(tmp_path):
    with pytest.raises(TcError, match="holds layers \\[0, 1\\], not layer 3"):
        train(
            small_config(tmp_path, layers="3"),
            toy_cache(layers=(0, 1, 2, 3)).__class__({0: toy_cache().arrays[0], 1: toy_cache().arrays[1]}, 16)
            if False
            else _cache_with_layers_missing(),
        )
    with pytest.raises(TcError, match="is incomplete"):
        train(small_config(tmp_path), toy_cache(complete=False))
    with pytest.raises(TcError, match="holds no tokens"):
        train(small_config(tmp_path), toy_cache(n_rows=0))
    with pytest.raises(TcError, match="fewer than one batch"):
        train(small_config(tmp_path, batch_size=4096, tokens=8192), toy_cache(n_rows=4))
    out = tmp_path / "used"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(
        TcError,
        match="already exists and is not empty; pass --resume to continue the run there, --force to start it again",
    ):
        train(small_config(tmp_path, "used"), toy_cache())
    with pytest.raises(TcError, match="holds no tc train run"):
        train(small_config(tmp_path, "used", resume=True), toy_cache())
    with pytest.raises(TcError, match="--resume and --force contradict"):
        train(small_config(tmp_path, "used", resume=True, force=True), toy_cache())


def _cache_with_layers_missing() -> ArrayCache:
    cache = toy_cache(layers=(0, 1))
    cache.model_info["n_layers"] = 4
    return cache


# ----------------------------------------------------------------------------- the command, end to end


def test_tc_train_from_a_real_cache(tmp_path, tiny_model_dirs, text_file):
    from conftest import run_tc

    cache = tmp_path / "acts.h5"
    result = run_tc(
        "cache",
        "--model",
        str(tiny_model_dirs["llama"]),
        "--data",
        str(text_file),
        "--tokens",
        "4k",
        "--context",
        "32",
        "--layers",
        "1",
        "--dtype",
        "float32",
        "--out",
        str(cache),
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "tcs"
    result = run_tc(
        "train",
        "--cache",
        str(cache),
        "--out",
        str(out),
        "--layers",
        "1",
        "--tokens",
        "8k",
        "--batch-size",
        "512",
        "--expansion",
        "2",
        "--k",
        "3",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    # stderr is a pipe: the metric lines come as plain lines (8k tokens / 512 = 15 steps, --log-every 50:
    # the last step's line only)
    assert result.stderr.startswith("step 15/15 layer 1 lr ") and "\x1b" not in result.stderr
    assert len(result.stderr.splitlines()) == 1 and " FVU " in result.stderr
    tc = load_transcoder(out / "layer_1")
    c = tc.config
    assert c.model_architecture == "LlamaForCausalLM" and c.input_hook == "blocks.1.ln2.hook_normalized"
    assert c.training["k"] == 3 and c.training["tokens"] == 8000 and "quiet" not in c.training
    assert c.weight_processing and c.weight_processing.get("fold_ln") is True

    for args, message in [
        (("--layers", "0"), "holds layers [1], not layer 0"),
        (("--layers", "3"), "layer 3 is out of range"),
        (("--lr", "nan"), "--lr must be a finite number"),
        (("--expansion", "0"), "--expansion must be at least 1"),
    ]:
        result = run_tc("train", "--cache", str(cache), "--out", str(tmp_path / "bad"), *args)
        assert result.returncode == 2 and result.stderr.startswith("tc: error: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    result = run_tc("train", "--cache", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "bad"))
    assert result.returncode == 2 and "does not exist" in result.stderr


@pytest.mark.slow  # trains on stories260K: about a minute of CPU
def test_batchtopk_threshold_gives_the_training_l0_on_held_out_text(tmp_path, stories_dir, corpora_dir):
    """The inference threshold estimated for BatchTopK gives, on text not trained on, the L0 of training
    (k per token on average) to within 5%: stories260K layer 2, trained on one slice of TinyStories,
    measured on a later slice."""
    from conftest import run_tc
    from tccli.data.cache_reader import ActivationCache

    text = (corpora_dir / "tinystories-valid-excerpt.txt").read_bytes()
    caches = {}
    for name, part in (("train", text[:200_000]), ("heldout", text[700_000:])):
        (tmp_path / f"{name}.txt").write_bytes(part)
        caches[name] = tmp_path / f"{name}.h5"
        result = run_tc(
            "cache",
            "--model",
            str(stories_dir),
            "--data",
            str(tmp_path / f"{name}.txt"),
            "--tokens",
            "1M",
            "--context",
            "128",
            "--layers",
            "2",
            "--dtype",
            "float32",
            "--out",
            str(caches[name]),
            "--quiet",
        )
        assert result.returncode == 0, result.stderr
    config = TrainConfig(
        cache=str(caches["train"]),
        out=str(tmp_path / "tcs"),
        layers="2",
        activation="batchtopk",
        k=16,
        features=512,
        tokens=300_000,
        batch_size=1024,
        quiet=True,
        checkpoint_every=0,
    )
    transcoder = train(config)[2]
    log = [json.loads(line) for line in (tmp_path / "tcs" / LOG_FILE).read_text().splitlines()]
    training_l0 = sum(e["l0"] for e in log[-5:]) / 5
    assert 15.5 < training_l0 <= 16.0  # k x batch entries, a few of them zero after the ReLU
    with ActivationCache.open(caches["heldout"]) as cache:
        x = torch.from_numpy(cache.read(2, "mlp_in", 0, cache.n_tokens))
    assert x.shape[0] > 40_000
    with torch.no_grad():
        held_out_l0 = float((transcoder.encode(x) > 0).sum(-1).float().mean())
    assert abs(held_out_l0 - training_l0) / training_l0 < 0.05, (held_out_l0, training_l0)
