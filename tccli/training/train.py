"""`tc train`: transcoders (and MLP-output SAEs) trained from an activation cache (docs/method.md section 2).

This module is the run: ``train(config)`` builds one transcoder per layer, feeds every layer from the
same window (so the cache is read once per step whatever the number of layers), logs, checkpoints and
saves; ``run_steps`` is the step loop and ``train_one_step`` one optimiser step of one layer. What it puts
together lives beside it, kept apart:
- ``step_math``: the training math, pure functions of tensors (initialisation, losses, the decoder-norm
  constraint, dead-feature losses, the learning-rate schedule);
- ``data_stream``: the cache, its statistics and the deterministic shuffle buffer over it;
- ``run_folder``: the run's files in --out (config, log, checkpoints) and the per-layer state they hold.
- ``run_setup``: what every run sets up the same way (--out opened and checked, each layer's generator);
- ``clt_train`` / ``clt_step``: ``--kind clt``, one cross-layer transcoder over every layer (``train``
  hands the run to it).

Determinism: everything random derives from ``--seed``: each layer's initial weights from a torch
generator of its own, seeded from (seed, layer) alone (``layer_generator``), and the token order of each
window from numpy's SeedSequence of (seed, epoch, window), the same for every layer. So a layer trained
on its own (``--layers 2``) gets the weights it gets in a run of every layer. The data position is a
function of the step alone, so a checkpoint needs only the step, the weights, the optimiser state and
the dead-feature counters to resume to bit-identical final weights on CPU.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Optional

import torch

from tccli.config.fields import to_json_dict
from tccli.config.training import CLT, TrainConfig
from tccli.config.transcoders import K_ACTIVATIONS, TranscoderConfig
from tccli.runtime import allocator, distributed, interrupts
from tccli.training.data_stream import DataStats, ShuffleSchedule, WindowLoader, check_cache, data_stats, open_cache
from tccli.training.optim import ScheduleFreeSign
from tccli.training.run_folder import (
    CHECKPOINT_FILE,
    LayerState,
    NonFiniteLoss,
    Reporter,
    diverged,
    load_checkpoint,
    save_checkpoint,
    stop_if_interrupted,
    trim_log,
)
from tccli.training.run_setup import layer_generator, open_out, run_log, step_threads, torch_threads
from tccli.training.step_math import (
    LossScales,
    batch_cutoff,
    calibrate_encoder_,
    clamp_min_,
    constrained_step,
    fraction_of_variance_unexplained,
    init_thresholds_,
    init_transcoder,
    learning_rate,
    transcoder_loss,
)
from tccli.transcoders.files import layer_folder_name, save_transcoder
from tccli.transcoders.transcoder import Transcoder


def train(config: TrainConfig, cache: Any = None) -> Any:
    """Run `tc train`; returns the trained transcoders by layer (also saved under ``config.out``), or with
    --kind clt the trained ``CrossLayerTranscoder`` (saved as ``clt`` in ``config.out``; see ``clt_train``).

    ``cache`` may be passed in (an open ActivationCache or an object with the same API); otherwise
    ``config.cache`` is opened. Under torchrun the ranks train together (see ``tccli.runtime.distributed``).
    """
    config.validate()
    allocator.keep_freed_memory()  # the step's buffers are reused instead of page-faulted every step
    with (
        distributed.session(config.dist_timeout, config.device, config.distribute_layers) as dist,
        contextlib.ExitStack() as held,
    ):  # holds the lock on --out for the whole run
        return _train(config, cache, dist, held)


def _train(
    config: TrainConfig, cache: Any, dist: distributed.Distributed, held: contextlib.ExitStack
) -> dict[int, Transcoder]:
    from tccli.model.loading import resolve_device

    if config.kind == CLT:
        from tccli.training.clt_train import train_clt

        return train_clt(config, cache, dist, held)
    device = resolve_device(config.device)
    out = Path(config.out)
    owns_cache = cache is None
    if cache is None:
        cache = open_cache(config.cache)
    try:
        layers = check_cache(cache, config.cache, config.layers)
        schedule = ShuffleSchedule(cache.n_rows, cache.context, config.batch_size, config.shuffle_buffer, config.seed)
        distributed.check_batch_split(config.batch_size, dist)
        mine = distributed.own_layers(layers, dist)
        continuing = dist.from_main(lambda: open_out(config, cache, layers, held))
        torch.manual_seed(config.seed)
        stats = data_stats(cache, mine, config.kind)
        states = {
            layer: new_layer_state(
                transcoder_config(config, cache, layer),
                stats[layer],
                config,
                layer_generator(config.seed, layer),
                device,
            )
            for layer in mine
        }
        checkpoint = distributed.checkpoint_name(CHECKPOINT_FILE, dist)
        start_step = 0
        if continuing and (out / checkpoint).is_file():
            start_step = load_checkpoint(out, config, states, int(cache.d_model), checkpoint)
        elif continuing:
            run_log(config)(f"{out} holds no checkpoint yet; continuing the run from step 0")
        if continuing and dist.world == 1:
            trim_log(out, start_step)
        d_model = int(cache.d_model)
        with torch_threads(step_threads(config.threads, d_model * config.n_features(d_model) * config.batch_size)):
            run_steps(
                config,
                cache,
                mine,
                schedule,
                states,
                start_step,
                out,
                device,
                dist,
                saved_step=start_step if start_step else None,
            )
    finally:
        if owns_cache:
            cache.close()
    for layer, state in states.items():
        finish_layer(state, stats[layer])
        tc_config = state.transcoder.config
        tokens = max(1, state.frequency_tokens)
        tc_config.feature_frequency = (state.fire_counts.double() / tokens).cpu().tolist()
        if dist.writes_run_files:
            save_transcoder(state.transcoder.to("cpu"), out / layer_folder_name(layer))
    dist.barrier()  # every rank's layers are saved before rank 0 reports the run done
    return {layer: state.transcoder for layer, state in states.items()}


# ----------------------------------------------------------------------------- a layer's transcoder: set up and finish


def transcoder_config(config: TrainConfig, cache: Any, layer: int) -> TranscoderConfig:
    from tccli.model.loading import model_identity

    info = cache.model_info
    model_name = info.get("name")
    if model_identity(model_name) == "builtin":  # not this machine's install path: it means nothing elsewhere
        model_name = "builtin"
    hooks = info["layers"][layer]
    d_model = int(cache.d_model)
    return TranscoderConfig(
        d_in=d_model,
        d_out=d_model,
        n_features=config.n_features(d_model),
        activation=config.activation,
        k=config.k if config.activation in K_ACTIVATIONS else None,
        skip=config.skip,
        kind=config.kind,
        layer=layer,
        input_space="mlp_out" if config.kind == "sae" else "normalized",
        output_space="mlp_out",
        model_name=model_name,
        model_architecture=info.get("architecture"),
        weight_processing=dict(info.get("weight_processing") or {}),
        input_hook=hooks["mlp_out"] if config.kind == "sae" else hooks["mlp_in"],
        output_hook=hooks["mlp_out"],
        training=to_json_dict(config),
    )


def new_layer_state(
    tc_config: TranscoderConfig, stats: DataStats, config: TrainConfig, generator: torch.Generator, device: torch.device
) -> LayerState:
    transcoder = init_transcoder(tc_config, stats.input_mean, stats.target_mean, generator)
    init_thresholds_(transcoder, stats.input_sample, config.k)
    calibrate_encoder_(transcoder, stats.input_sample, stats.target_sample)
    bandwidth = threshold_scale = 1.0
    if tc_config.activation == "jumprelu":  # relative to the initial thresholds' scale
        threshold_scale = max(float(transcoder.threshold.detach().mean()), 1e-8)
        bandwidth = config.bandwidth * threshold_scale
    transcoder = transcoder.to(device)
    if tc_config.activation != "relu":
        # feature-major storage of W_enc [d_in, m] (strides (1, d_in)): the sparse encoder gradient is built
        # per feature, so the weight, its gradient and the optimiser's state share this layout
        transcoder.W_enc = torch.nn.Parameter(transcoder.W_enc.detach().t().contiguous().t())
    if tc_config.activation == "batchtopk":  # estimated, not trained (finish_layer)
        transcoder.threshold.requires_grad_(False)
    weights = [p for name, p in transcoder.named_parameters() if p.requires_grad and name != "threshold"]
    groups = [dict(params=weights, lr_scale=1.0)]
    if tc_config.activation == "jumprelu":
        # JumpReLU's thresholds step in units of their own initial size, so that a step changes a
        # threshold by about lr of itself (as training log thresholds would) whatever the activations' scale
        groups.append(dict(params=[transcoder.threshold], lr_scale=threshold_scale))
    lr = config.learning_rate_for(tc_config.n_features)
    optimizer = (
        ScheduleFreeSign(groups, lr=lr) if config.optimizer == "signum" else torch.optim.Adam(groups, lr=lr, fused=True)
    )  # one pass over each tensor (half the time)
    m = tc_config.n_features
    return LayerState(
        transcoder,
        optimizer,
        torch.zeros(m, dtype=torch.long, device=device),
        torch.zeros(m, dtype=torch.long, device=device),
        scales=LossScales(stats.target_variance, bandwidth, threshold_scale),
    )


def finish_layer(state: LayerState, stats: DataStats) -> Transcoder:
    """The transcoder to save once the steps are done: the averaged weights (schedule-free), BatchTopK's
    inference threshold estimated with those weights on the sample of training tokens (the cut-off of
    the sample's k x n largest pre-activations, so that the threshold gives k active features per token
    on average), and W_enc back in the ordinary layout."""
    transcoder = state.transcoder
    if isinstance(state.optimizer, ScheduleFreeSign):
        state.optimizer.use_average()
    with torch.no_grad():
        if transcoder.config.activation == "batchtopk":
            x = stats.input_sample.to(transcoder.W_enc.device)
            transcoder.threshold.fill_(float(batch_cutoff(transcoder.pre_activation(x), int(transcoder.config.k))))
        transcoder.W_enc = torch.nn.Parameter(
            transcoder.W_enc.detach().contiguous(), requires_grad=transcoder.W_enc.requires_grad
        )
    return transcoder


# ----------------------------------------------------------------------------- the steps


def run_steps(
    config: TrainConfig,
    cache: Any,
    layers: list[int],
    schedule: ShuffleSchedule,
    states: dict[int, LayerState],
    start_step: int,
    out: Path,
    device: torch.device,
    dist: distributed.Distributed = distributed.SINGLE_PROCESS,
    saved_step: Optional[int] = None,
) -> None:
    """Train from ``start_step`` to the end, checkpointing on the way (``saved_step``: the step of the
    checkpoint already in ``out``, if any). Ctrl-C / SIGTERM stop it between two steps with a checkpoint
    of the step reached; a non-finite loss stops it saying which checkpoint, if any, is left."""
    total = config.total_steps
    frequency_from = total - max(1, total // 10)  # feature frequencies over the last tenth of training
    reporter = (
        Reporter(out, config.quiet or not dist.is_main, total, start_step)
        if dist.writes_run_files
        else distributed.SilentReporter()
    )
    checkpoint = distributed.checkpoint_name(CHECKPOINT_FILE, dist)
    batch_size = config.batch_size // dist.data_world  # this rank's share of every batch
    base_lr = config.learning_rate_for(next(iter(states.values())).transcoder.config.n_features) if states else 0.0
    loader = WindowLoader(
        cache,
        layers,
        config.kind,
        cache.context,
        device,
        share=lambda order, window: distributed.batch_share(order, window.n_steps, config.batch_size, dist),
    )
    step = start_step

    def checkpoint_now() -> None:
        nonlocal saved_step
        if dist.writes_run_files:
            save_checkpoint(out, step, config, states, checkpoint)
        saved_step = step

    try:
        with interrupts.deferred():
            for window, data in loader.stream(schedule.windows(start_step)):
                for batch_index in range(step - window.first_step, window.n_steps):
                    if step >= total:
                        break
                    lr = learning_rate(step, total, base_lr, config.warmup_steps, config.decay_fraction)
                    rows = slice(batch_index * batch_size, (batch_index + 1) * batch_size)
                    for layer, state in states.items():
                        x, y = data[layer][0][rows], data[layer][1][rows]
                        metrics = train_one_step(state, x, y, config, step, lr, layer, step >= frequency_from, dist)
                        if (step + 1) % config.log_every == 0 or step + 1 == total:
                            reporter.record(dict(step=step + 1, layer=layer, lr=lr, **metrics()))
                    step += 1
                    reporter.step(step)
                    dist.step_done()
                    if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
                        checkpoint_now()
                    stop_if_interrupted(dist, step, total, saved_step, checkpoint_now)
                if step >= total:
                    break
    except NonFiniteLoss as exc:
        raise diverged(exc, saved_step, out) from None
    finally:
        loader.close()
        reporter.close()
    checkpoint_now()


def train_one_step(
    state: LayerState,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    step: int,
    lr: float,
    layer: int,
    count_frequency: bool,
    dist: distributed.Distributed = distributed.SINGLE_PROCESS,
):
    """One optimiser step for one layer; returns a function computing the step's metrics on demand.
    Data parallel: gradients are averaged and firing counts summed over the ranks (``dist``)."""
    transcoder = state.transcoder
    dead = state.steps_since_fired >= config.dead_window
    result = transcoder_loss(transcoder, x, y, dead, config, step, state.scales)
    if not bool(torch.isfinite(result.loss)):
        raise NonFiniteLoss(f"the loss became {float(result.loss.detach())} at step {step + 1} (layer {layer})")
    for group in state.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    state.optimizer.zero_grad(set_to_none=True)
    result.loss.backward()
    dist.average_gradients([p for p in transcoder.parameters() if p.requires_grad])
    constrained_step(transcoder, state.optimizer, unit_decoder=config.decoder_norm == "unit")
    if transcoder.config.activation == "jumprelu":
        clamp_min_(transcoder.threshold, state.optimizer, 0.0)
    with torch.no_grad():
        fires = dist.sum_counts(result.fires)
        state.steps_since_fired += 1
        state.steps_since_fired.masked_fill_(fires > 0, 0)  # a boolean index would sync with the GPU
        if count_frequency:
            state.fire_counts += fires
            state.frequency_tokens += x.shape[0] * dist.data_world

    def metrics() -> dict:
        with torch.no_grad():
            return dict(
                loss=float(result.loss),
                mse=float(result.mse),
                l1=float(result.l1),
                l0=float(result.l0),
                fvu=float(fraction_of_variance_unexplained(result.output, y)),
                aux=float(result.aux),
                dead_fraction=float((state.steps_since_fired >= config.dead_window).float().mean()),
            )

    return metrics
