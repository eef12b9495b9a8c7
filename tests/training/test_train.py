"""tc train: the training math on small analytic cases, the shuffle stream, resume, bad input.

Most tests feed ``train`` an in-memory cache with the ActivationCache API (``ArrayCache``) so they do
not depend on `tc cache`; the resume test kills a real subprocess.
"""

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

import numpy as np
import pytest
import torch

from tccli.config.fields import to_json_dict
from tccli.errors import TcError
from tccli.training.train import CHECKPOINT_FILE, LOG_FILE, ShuffleSchedule, WindowLoader, auxk_loss, calibrate_encoder_, constrained_step, ghost_grad_loss, init_transcoder, learning_rate, remove_parallel_gradient, train
from tccli.config.training import TrainConfig
from tccli.training import sparse_coding as sc
from tccli.training.sparse_coding import select_auxk
from tccli.transcoders.transcoder import Transcoder
from tccli.config.transcoders import TranscoderConfig
from tccli.transcoders.formats import load_transcoder_set
from tccli.transcoders.files import load_transcoder

D = 8


class ArrayCache:
    """An in-memory stand-in for tccli.data.cache.ActivationCache (same attributes and read())."""

    def __init__(self, arrays: dict[int, tuple[np.ndarray, np.ndarray]], context: int, complete: bool = True):
        self.arrays = arrays
        self.layers = sorted(arrays)
        self.context = context
        n = len(next(iter(arrays.values()))[0])
        self.n_rows = n // context
        self.n_tokens = self.n_rows * context
        self.d_model = next(iter(arrays.values()))[0].shape[1]
        self.complete = complete
        n_layers = max(self.layers) + 1
        self.model_info = {
            "name": "toy", "architecture": "ToyForCausalLM", "n_layers": n_layers,
            "weight_processing": {"fold_ln": True},
            "layers": [{"mlp_in": f"blocks.{i}.ln2.hook_normalized", "mlp_out": f"blocks.{i}.hook_mlp_out"}
                       for i in range(n_layers)],
        }
        self.attrs = {"complete": complete}
        self.reads = 0

    def read(self, layer: int, which: str, start: int, stop: int) -> np.ndarray:
        self.reads += 1
        return self.arrays[layer][0 if which == "mlp_in" else 1][start:stop]

    def close(self) -> None:
        pass


def toy_cache(n_rows: int = 64, context: int = 16, layers=(0, 1), seed: int = 0, complete: bool = True) -> ArrayCache:
    """Targets a fixed sparse-ish nonlinear function of the inputs, with offsets so means matter."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for layer in layers:
        x = rng.normal(size=(n_rows * context, D)).astype(np.float32) + 1.5
        W = rng.normal(size=(D, D)).astype(np.float32)
        y = (np.maximum(x @ W, 0) - 0.5 + layer).astype(np.float32)
        arrays[layer] = (x, y)
    return ArrayCache(arrays, context, complete)


def small_config(tmp_path: Path, name: str = "out", **overrides) -> TrainConfig:
    base = dict(cache="toy.h5", out=str(tmp_path / name), expansion=4, batch_size=64, tokens=64 * 40,
                shuffle_buffer=256, warmup_steps=5, log_every=10, checkpoint_every=0, quiet=True, k=4,
                dead_window=5)
    base.update(overrides)
    return TrainConfig(**base)


def toy_transcoder(m: int = 6, activation: str = "relu", seed: int = 0) -> Transcoder:
    config = TranscoderConfig(d_in=D, d_out=D, n_features=m, activation=activation, k=2 if activation == "topk" else None)
    return init_transcoder(config, torch.zeros(D), torch.zeros(D), torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- training math


def test_remove_parallel_gradient_leaves_only_the_tangential_part():
    W = torch.nn.functional.normalize(torch.randn(5, D, dtype=torch.float64), dim=-1)
    grad = torch.randn(5, D, dtype=torch.float64)
    tangential = remove_parallel_gradient(W, grad)
    assert torch.allclose((tangential * W).sum(-1), torch.zeros(5, dtype=torch.float64), atol=1e-15)
    # what was removed is parallel to each row: grad - tangential = c * W
    removed = grad - tangential
    assert torch.allclose(removed, (grad * W).sum(-1, keepdim=True) * W, atol=1e-15)


def test_decoder_rows_stay_unit_norm_and_step_uses_tangential_gradient():
    transcoder = toy_transcoder()
    optimizer = torch.optim.SGD(transcoder.parameters(), lr=0.1)
    W_before = transcoder.W_dec.detach().clone()
    grad = torch.randn_like(W_before)
    transcoder.W_dec.grad = grad.clone()
    constrained_step(transcoder, optimizer)
    expected = W_before - 0.1 * remove_parallel_gradient(W_before, grad)
    expected = expected / expected.norm(dim=-1, keepdim=True)
    assert torch.allclose(transcoder.W_dec.detach(), expected, atol=1e-6)
    assert torch.allclose(transcoder.W_dec.norm(dim=-1), torch.ones(6), atol=1e-6)


def test_init_sets_biases_to_the_data_means(tmp_path):
    x_mean, y_mean = torch.arange(D, dtype=torch.float32), -torch.arange(D, dtype=torch.float32)
    config = TranscoderConfig(d_in=D, d_out=D, n_features=12)
    transcoder = init_transcoder(config, x_mean, y_mean, torch.Generator().manual_seed(0))
    assert torch.equal(transcoder.b_pre.detach(), x_mean) and torch.equal(transcoder.b_dec.detach(), y_mean)
    assert torch.allclose(transcoder.W_dec.norm(dim=-1), torch.ones(12), atol=1e-6)
    assert torch.equal(transcoder.W_enc, transcoder.W_dec.T)
    # and through train(): b_pre / b_dec start at the cache's means (zero steps of learning rate effect
    # is impossible, so check the initial state via a tiny-lr run instead)
    cache = toy_cache(layers=(0,))
    trained = train(small_config(tmp_path, lr=1e-30, tokens=64, warmup_steps=0), cache)[0]
    x, y = cache.arrays[0]
    assert np.allclose(trained.b_pre.detach().numpy(), x.astype(np.float64).mean(0), atol=1e-5)
    assert np.allclose(trained.b_dec.detach().numpy(), y.astype(np.float64).mean(0), atol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_calibrated_encoder_gives_outputs_half_the_target_spread(activation):
    transcoder = toy_transcoder(m=16, activation=activation)
    x, y = 5 * torch.randn(500, D) + 1, 0.1 * torch.randn(500, D)
    calibrate_encoder_(transcoder, x, y)
    with torch.no_grad():
        output, _ = transcoder(x)
    produced = (output - transcoder.b_dec).pow(2).sum(-1).mean().sqrt()
    wanted = 0.5 * (y - y.mean(0)).pow(2).sum(-1).mean().sqrt()
    assert float(produced) == pytest.approx(float(wanted), rel=1e-5)


def test_ghost_grads_use_target_minus_output_not_input():
    torch.manual_seed(0)
    W_dec = torch.nn.functional.normalize(torch.randn(6, D), dim=-1).requires_grad_()
    pre = torch.randn(10, 6, requires_grad=True)
    x, y = torch.randn(10, D), torch.randn(10, D)
    dead = torch.tensor([True, False, True, False, False, True])
    mse = torch.tensor(2.0)
    # output == target: the residual is zero, so the ghost output is scaled to zero and so is the loss;
    # the reference bug (input - output) would give a positive loss here
    assert float(ghost_grad_loss(pre, y, y.clone(), W_dec, dead, mse)) == 0.0
    output = torch.randn(10, D)
    loss = ghost_grad_loss(pre, y, output, W_dec, dead, mse)
    residual = y - output
    ghost = torch.exp(pre[:, dead]) @ W_dec[dead]
    ghost = ghost * residual.norm(dim=-1, keepdim=True) / (2 * ghost.norm(dim=-1, keepdim=True))
    ghost_mse = (ghost - residual).pow(2).sum(-1).mean()
    assert torch.allclose(loss, mse / (ghost_mse + 1e-6) * ghost_mse)
    loss.backward()
    assert pre.grad[:, ~dead].abs().max() == 0 and pre.grad[:, dead].abs().max() > 0
    assert float(ghost_grad_loss(pre, y, output, W_dec, torch.zeros(6, dtype=torch.bool), mse)) == 0.0


def _auxk(pre, target, output, W_dec, dead, aux_k):
    entries = select_auxk(pre.detach(), dead, aux_k)
    return auxk_loss(pre[entries.token, entries.feature], entries, target, output, W_dec)


def test_auxk_reconstructs_residual_with_dead_features_only():
    W_dec = torch.eye(D)[:6].clone()
    pre = torch.full((4, 6), -1.0)
    pre[:, 4] = 3.0  # a dead feature that explains the residual along axis 4 exactly
    pre[:, 0] = 5.0  # a live feature: must be ignored
    target = torch.zeros(4, D)
    target[:, 4] = torch.tensor([3.0, 3.0, 3.0, 3.0]) + torch.tensor([0.0, 1.0, 2.0, 3.0])
    output = torch.zeros(4, D)
    output[:, 4] = torch.tensor([0.0, 1.0, 2.0, 3.0])
    dead = torch.tensor([False, False, False, False, True, True])
    assert float(_auxk(pre, target, output, W_dec, dead, aux_k=1)) == 0.0
    live_only = torch.tensor([True, False, False, False, False, False])
    assert float(_auxk(pre, target, output, W_dec, live_only, aux_k=1)) > 0
    # a dead feature whose pre-activations are all negative still gets a gradient towards the residual
    negative = torch.full((4, 6), -2.0)
    negative[:, 4] = -1.0  # the dead feature chosen (the top one of the dead features 4 and 5)
    negative.requires_grad_()
    loss = _auxk(negative, target, output, W_dec, dead, aux_k=1)
    loss.backward()
    assert float(negative.grad[:, 4].min()) < 0  # descending the gradient raises the pre-activation
    assert float(negative.grad[:, :4].abs().max()) == 0
    assert float(_auxk(pre, target, output, W_dec, torch.zeros(6, dtype=torch.bool), aux_k=1)) == 0.0


def test_learning_rate_schedule():
    lrs = [learning_rate(s, 100, 1.0, 10, 0.2) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10:80] == [1.0] * 70
    assert lrs[80] == pytest.approx(1.0) and lrs[99] == pytest.approx(0.05)
    assert [learning_rate(s, 100, 2.0, 0, 0.0) for s in (0, 50, 99)] == [2.0, 2.0, 2.0]


# ----------------------------------------------------------------------------- the data stream


def test_shuffle_schedule_mixes_rows_and_covers_the_cache_each_epoch():
    n_rows, context = 512, 16  # 8 chunks of 64 rows (1,024 tokens), 2 chunks per window
    schedule = ShuffleSchedule(n_rows, context, batch_size=64, buffer_tokens=2048, seed=3)
    windows = []
    for window in schedule.windows():
        if window.epoch > 0:
            break
        windows.append(window)
    rows = sorted(r for w in windows for a, b in w.row_ranges for r in range(a, b))
    assert rows == list(range(n_rows))  # every row once per epoch
    first = windows[0]
    assert len(windows) == 4 and [w.n_steps for w in windows] == [32] * 4
    assert [a for a, _ in first.row_ranges] != [0]  # not simply the first rows
    # one batch draws from many rows: tokens carry their row index as their value
    row_of_token = np.repeat(np.arange(n_rows), context).astype(np.float32)[:, None]
    cache = ArrayCache({0: (row_of_token, row_of_token)}, context)
    loader = WindowLoader(cache, [0], "transcoder", context, torch.device("cpu"))
    x, _ = loader.load(first)[0]
    batch_rows = set(x[:64, 0].int().tolist())
    assert len(batch_rows) >= 40  # 64 tokens from 128 rows
    assert sorted(x[:, 0].int().tolist()) == sorted(r for a, b in first.row_ranges for r in range(a, b)
                                                   for _ in range(context))
    # the step -> window mapping is a function of the step alone (what resume relies on)
    later = next(schedule.windows(start_step=first.n_steps + 1))
    assert later.first_step <= first.n_steps + 1 < later.first_step + later.n_steps
    loader.close()


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
    ("topk", False, "adam"), ("topk", True, "signum"), ("batchtopk", False, "signum"), ("batchtopk", True, "adam"),
    ("jumprelu", False, "adam"), ("jumprelu", True, "signum"), ("relu", True, "adam"),
]


@pytest.mark.parametrize("activation, skip, optimizer", KIND_CASES)
def test_every_kind_trains_saves_and_reloads_bit_identically(tmp_path, activation, skip, optimizer):
    cache = toy_cache(layers=(0,))
    config = small_config(tmp_path, activation=activation, skip=skip, optimizer=optimizer, tokens=64 * 60,
                          decoder_norm="unit" if activation == "relu" else "free", l0_coef=1e-2)
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


def test_sparse_step_gradients_equal_dense_autograd():
    """One training loss of every sparse kind, its gradients against the same loss computed densely."""
    import tccli.training.train as tr

    torch.manual_seed(0)
    x = torch.randn(40, D, dtype=torch.float64) + 1
    y = torch.randn(40, D, dtype=torch.float64)
    for activation in ("topk", "batchtopk", "jumprelu"):
        config = small_config(Path("/nonexistent"), activation=activation, skip=True, aux_k=3, l0_coef=0.05)
        tc_config = TranscoderConfig(d_in=D, d_out=D, n_features=12, activation=activation, skip=True,
                                     k=3 if activation != "jumprelu" else None)
        transcoder = init_transcoder(tc_config, x.float().mean(0), y.float().mean(0), torch.Generator().manual_seed(1))
        transcoder = transcoder.double()
        with torch.no_grad():
            transcoder.W_skip.normal_()
            if transcoder.threshold is not None:
                transcoder.threshold.uniform_(0.1, 0.6)
        dead = torch.zeros(12, dtype=torch.bool)
        dead[[2, 5, 9]] = True
        scales = tr.LossScales(target_variance=3.0, bandwidth=0.2, threshold_scale=0.7)
        result = tr.sparse_loss(transcoder, x, y, dead, config, scales)
        params = dict(transcoder.named_parameters())
        sparse = dict(zip(params, torch.autograd.grad(result.loss, list(params.values()), allow_unused=True)))

        # dense reference: the same selection as masks, then ordinary autograd over [n, m]
        pre = transcoder.pre_activation(x)
        with torch.no_grad():
            if activation == "topk":
                mask = torch.zeros_like(pre).scatter(1, pre.topk(3, dim=1).indices, 1.0)
            elif activation == "batchtopk":
                flat = pre.reshape(-1).topk(3 * 40).indices
                mask = torch.zeros_like(pre).reshape(-1).index_fill(0, flat, 1.0).reshape(pre.shape)
            else:
                mask = (pre > transcoder.threshold - 0.1).double()
        if activation == "jumprelu":
            z = sc.jump_relu(pre, transcoder.threshold.expand_as(pre), 0.2) * mask
            l0 = (sc.step(pre, transcoder.threshold.expand_as(pre), 0.2) * mask).sum() / 40
        else:
            z = torch.relu(pre) * mask
        output = z @ transcoder.W_dec + transcoder.b_dec + x @ transcoder.W_skip
        loss = (output - y).pow(2).sum(-1).mean() / 3.0
        residual = (y - output).detach()
        dead_pre = pre[:, dead]
        aux_mask = torch.zeros_like(dead_pre).scatter(1, dead_pre.detach().topk(3, dim=1).indices, 1.0)
        aux_out = (dead_pre * aux_mask) @ transcoder.W_dec[dead]
        aux = (aux_out - residual).pow(2).sum(-1).mean() / (residual - residual.mean(0)).pow(2).sum(-1).mean()
        if activation == "jumprelu":  # the gap between AuxK entries and their thresholds closes from both sides
            gap = torch.relu(transcoder.threshold[dead] - dead_pre) * aux_mask
            aux = aux + gap.sum() / aux_mask.sum() / scales.threshold_scale
        loss = loss + config.aux_coef * aux
        if activation == "jumprelu":
            loss = loss + 0.05 * l0
        dense = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
        assert torch.allclose(result.loss, loss, rtol=1e-12)
        for name in params:
            if name == "threshold" and activation == "batchtopk":
                continue  # not trained (estimated after training)
            assert dense[name] is not None and float(dense[name].abs().max()) > 0, (activation, name)
            assert torch.allclose(sparse[name], dense[name], rtol=1e-9, atol=1e-12), (activation, name)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = train(small_config(tmp_path, "a", layers="0"), toy_cache(layers=(0,)))[0]
    b = train(small_config(tmp_path, "b", layers="0"), toy_cache(layers=(0,)))[0]
    c = train(small_config(tmp_path, "c", layers="0", seed=1), toy_cache(layers=(0,)))[0]
    assert torch.equal(a.W_enc, b.W_enc) and torch.equal(a.W_dec, b.W_dec)
    assert not torch.equal(a.W_enc, c.W_enc)


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
    with pytest.raises(TcError, match=r"the loss became nan at step 13 \(layer 0\); training stopped and its "
                                      r"last checkpoint \(step 10\) is kept in .*out\. A resumed run would diverge"):
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


def test_non_finite_cache_values_are_refused(tmp_path):
    cache = toy_cache(layers=(0,))
    cache.arrays[0][1][5, 2] = np.inf
    with pytest.raises(TcError, match="non-finite activations in layer 0"):
        train(small_config(tmp_path), cache)


@pytest.mark.parametrize("overrides, message", [
    (dict(lr=float("nan")), "--lr must be a finite number"),
    (dict(lr=float("inf")), "--lr must be a finite number"),
    (dict(expansion=0), "--expansion must be at least 1"),
    (dict(activation="gelu"), "--activation must be one of"),
    (dict(tokens=10), "less than one batch"),
    (dict(lr_decay=2.0), "--lr-decay"),
])
def test_bad_options(tmp_path, overrides, message):
    with pytest.raises(TcError, match=message):
        train(small_config(tmp_path, **overrides), toy_cache())


def test_bad_caches(tmp_path):
    with pytest.raises(TcError, match="holds layers \\[0, 1\\], not layer 3"):
        train(small_config(tmp_path, layers="3"), toy_cache(layers=(0, 1, 2, 3)).__class__(
            {0: toy_cache().arrays[0], 1: toy_cache().arrays[1]}, 16) if False else _cache_with_layers_missing())
    with pytest.raises(TcError, match="is incomplete"):
        train(small_config(tmp_path), toy_cache(complete=False))
    with pytest.raises(TcError, match="holds no tokens"):
        train(small_config(tmp_path), toy_cache(n_rows=0))
    with pytest.raises(TcError, match="fewer than one batch"):
        train(small_config(tmp_path, batch_size=4096, tokens=8192), toy_cache(n_rows=4))
    out = tmp_path / "used"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(TcError, match="already exists and is not empty; pass --resume to continue the run there, "
                                      "--force to start it again"):
        train(small_config(tmp_path, "used"), toy_cache())
    with pytest.raises(TcError, match="holds no tc train run"):
        train(small_config(tmp_path, "used", resume=True), toy_cache())
    with pytest.raises(TcError, match="--resume and --force contradict"):
        train(small_config(tmp_path, "used", resume=True, force=True), toy_cache())


def _cache_with_layers_missing() -> ArrayCache:
    cache = toy_cache(layers=(0, 1))
    cache.model_info["n_layers"] = 4
    return cache


# ----------------------------------------------------------------------------- resume after a kill

RUNNER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    import tccli.training.train as tr
    from test_train import toy_cache, small_config
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
    script.write_text(RUNNER.format(tests=str(Path(__file__).parents[1]), tmp=str(tmp_path)))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))

    def start(name: str, speed: str, mode: str, checkpoint_every: int = 7, **popen) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), name, speed, mode, activation, skip, optimizer,
                                 str(checkpoint_every)], env=env, text=True, **popen)

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


@pytest.mark.parametrize("activation, skip, optimizer", [
    ("topk", "plain", "adam"), ("relu", "plain", "adam"), ("batchtopk", "skip", "signum"),
    ("jumprelu", "plain", "signum"), ("jumprelu", "skip", "adam")])
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
    logged = [[json.loads(line)["step"] for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
              for name in ("straight", "killed")]
    assert logged[0] == logged[1]


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


def test_resume_where_nothing_was_started_starts(tmp_path):
    config = small_config(tmp_path, "new", tokens=64 * 10, resume=True)
    train(config, toy_cache())
    assert (Path(config.out) / "layer_0" / "config.json").is_file()


def test_resume_compares_meaning_not_spelling(tmp_path):
    config = small_config(tmp_path, tokens=64 * 20, checkpoint_every=5, layers="0-1", expansion=4)
    train(config, toy_cache())
    # the same layers and width spelled differently continue the run
    train(small_config(tmp_path, tokens=64 * 20, layers="all", expansion=1, features=4 * D, resume=True),
          toy_cache())
    with pytest.raises(TcError, match="--layers gives \\[0\\] but the run in --out trains \\[0, 1\\]"):
        train(small_config(tmp_path, tokens=64 * 20, layers="0", resume=True), toy_cache())
    with pytest.raises(TcError, match="would have 16 features per layer but the run in --out has 32"):
        train(small_config(tmp_path, tokens=64 * 20, features=16, resume=True), toy_cache())


def test_resume_refuses_changed_options(tmp_path):
    config = small_config(tmp_path, tokens=64 * 10, checkpoint_every=5)
    train(config, toy_cache())
    with pytest.raises(TcError, match="--k is 5 but the run in --out used 4"):
        train(small_config(tmp_path, tokens=64 * 10, k=5, resume=True), toy_cache())


# ----------------------------------------------------------------------------- the command, end to end


def test_tc_train_from_a_real_cache(tmp_path, tiny_model_dirs, text_file):
    from conftest import run_tc

    cache = tmp_path / "acts.h5"
    result = run_tc("cache", "--model", str(tiny_model_dirs["llama"]), "--data", str(text_file), "--tokens", "4k",
                    "--context", "32", "--layers", "1", "--dtype", "float32", "--out", str(cache), "--quiet")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "tcs"
    result = run_tc("train", "--cache", str(cache), "--out", str(out), "--layers", "1", "--tokens", "8k",
                    "--batch-size", "512", "--expansion", "2", "--k", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out) and result.stderr == ""  # stderr is not a terminal: silent
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
        result = run_tc("cache", "--model", str(stories_dir), "--data", str(tmp_path / f"{name}.txt"),
                        "--tokens", "1M", "--context", "128", "--layers", "2", "--dtype", "float32",
                        "--out", str(caches[name]), "--quiet")
        assert result.returncode == 0, result.stderr
    config = TrainConfig(cache=str(caches["train"]), out=str(tmp_path / "tcs"), layers="2", activation="batchtopk",
                         k=16, features=512, tokens=300_000, batch_size=1024, quiet=True, checkpoint_every=0)
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


def test_a_gradient_laid_out_unlike_its_parameter_is_applied_correctly():
    """W_enc is stored feature-major while training; a gradient in the ordinary layout (as the data-parallel
    all-reduce returns it) must step the same entries as one in the parameter's own layout."""
    config = TranscoderConfig(d_in=D, d_out=D, n_features=6, activation="topk", k=2)
    results = []
    for layout in ("same", "other"):
        transcoder = init_transcoder(config, torch.zeros(D), torch.zeros(D), torch.Generator().manual_seed(0))
        transcoder.W_enc = torch.nn.Parameter(transcoder.W_enc.detach().t().contiguous().t())
        optimizer = torch.optim.Adam(transcoder.parameters(), lr=0.1, fused=True)
        grad = torch.arange(D * 6, dtype=torch.float32).reshape(D, 6) - 20
        transcoder.W_enc.grad = grad.t().contiguous().t() if layout == "same" else grad.contiguous()
        constrained_step(transcoder, optimizer, unit_decoder=False)
        results.append(transcoder.W_enc.detach().clone())
    assert torch.equal(results[0], results[1])
