"""`tc train --kind clt`: one cross-layer transcoder over every trained layer (docs/method.md section 11).

The run around the step math of ``clt_step``: the same cache, shuffle schedule, log, progress, Ctrl-C
handling and --resume as the per-layer kinds (``train``), with one model instead of one per layer. Every
step reads every layer's MLP input and output from the same rows of the cache.

Under torchrun the features are sharded: rank r of N holds features [r m/N, (r + 1) m/N) of every layer
(their encoder columns, biases, thresholds, decoders and Adam state) and sees whole batches; the biases
b_dec, b_pre and W_skip, which every feature shares, are held whole by every rank (their gradients come
from the reconstruction, which every rank holds whole after the step's all-reduce, so they stay equal).
Each rank checkpoints its own shard (``checkpoint.rank{r}-of-{N}.tcstate``; a resumed run needs the same
N). At the end the shards are gathered and rank 0 writes the whole CLT, the same folder a single
process writes, as ``clt`` in --out.

Determinism: the initial CLT is drawn whole, layer by layer from ``layer_generator(seed, layer)``, on
every rank, and each rank keeps its slice; so N ranks start from, and step to, the weights of one
process (up to the rounding of the products' different blockings).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch

from tccli.config.fields import to_json_dict
from tccli.config.training import TrainConfig
from tccli.config.transcoders import CrossLayerConfig
from tccli.errors import fail
from tccli.runtime import distributed, interrupts
from tccli.training import clt_step
from tccli.training.data_stream import DataStats, ShuffleSchedule, WindowLoader, check_cache, data_stats, open_cache
from tccli.training.run_folder import (
    CHECKPOINT_FILE,
    CLT_FOLDER,
    NonFiniteLoss,
    Reporter,
    check_same_run,
    diverged,
    stop_if_interrupted,
    trim_log,
    write_torch_file,
)
from tccli.training.run_setup import layer_generator, open_out, run_log, step_threads, torch_threads
from tccli.training.step_math import clamp_min_, learning_rate
from tccli.transcoders.cross_layer import CrossLayerTranscoder


@dataclasses.dataclass
class CLTState:
    """This rank's training state: what its checkpoint holds (with the step and the RNG state)."""

    shard: CrossLayerTranscoder
    optimizer: torch.optim.Optimizer
    steps_since_fired: torch.Tensor  # [L, m_local] long
    fire_counts: torch.Tensor  # [L, m_local] long: tokens fired on during the frequency window
    frequency_tokens: int = 0
    min_sum: Optional[torch.Tensor] = None  # batchtopk [L, m_local]: sum of the smallest selected activations
    min_count: Optional[torch.Tensor] = None  # batchtopk [L, m_local]: batches where the feature was selected
    cutoff_sum: float = 0.0  # batchtopk: sum of the batches' cut-offs over the frequency window
    cutoff_count: int = 0

    def counters(self) -> dict:
        return dict(
            steps_since_fired=self.steps_since_fired,
            fire_counts=self.fire_counts,
            frequency_tokens=self.frequency_tokens,
            min_sum=self.min_sum,
            min_count=self.min_count,
            cutoff_sum=self.cutoff_sum,
            cutoff_count=self.cutoff_count,
        )


def comm_of(dist: distributed.Distributed) -> clt_step.Comm:
    """The step's collectives on torch.distributed (through ``dist``, so a dead rank is one error line)."""
    if dist.world == 1:
        return clt_step.ONE_PROCESS

    def gather(tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as tdist

        local = tensor.detach().contiguous().to(dist.device)
        pieces = [torch.empty_like(local) for _ in range(dist.world)]
        dist._collective("all-gather", lambda: tdist.all_gather(pieces, local))
        return torch.cat(pieces, dim=-1).to(tensor.device)

    return clt_step.Comm(sum=dist.all_reduce_sum, gather=gather, world=dist.world)


def checkpoint_name(dist: distributed.Distributed) -> str:
    if dist.world == 1:
        return CHECKPOINT_FILE
    stem, dot, suffix = CHECKPOINT_FILE.partition(".")
    return f"{stem}.rank{dist.rank}-of-{dist.world}{dot}{suffix}"


# ----------------------------------------------------------------------------- the run


def train_clt(config: TrainConfig, cache: Any, dist: distributed.Distributed, held: contextlib.ExitStack):
    """The CLT run (``train.train`` calls it for --kind clt, inside the process group and --out's lock)."""
    from tccli.model.loading import resolve_device

    device = resolve_device(config.device)
    out = Path(config.out)
    owns_cache = cache is None
    if cache is None:
        cache = open_cache(config.cache)
    try:
        layers = check_cache(cache, config.cache, config.layers)
        d_model = int(cache.d_model)
        m = config.n_features(d_model)
        if m % dist.world:
            raise fail(f"--kind clt shards the {m} features of each layer across {dist.world} ranks: use a multiple")
        schedule = ShuffleSchedule(cache.n_rows, cache.context, config.batch_size, config.shuffle_buffer, config.seed)
        continuing = dist.from_main(lambda: open_out(config, cache, layers, held))
        torch.manual_seed(config.seed)
        stats = data_stats(cache, layers, "transcoder")
        whole, scales = initial_clt(config, cache, layers, stats)
        state = new_state(whole, config, dist, device, scales)
        name = checkpoint_name(dist)
        start_step = 0
        if continuing and (out / name).is_file():
            start_step = load_checkpoint(out / name, config, state, d_model, dist)
        elif continuing:
            others = sorted(p.name for p in out.glob("checkpoint*.tcstate"))
            if others:
                raise fail(
                    f"--resume: {out} holds {', '.join(others)}, not {name}: resume a CLT run with the number "
                    "of torchrun processes that started it"
                )
            run_log(config)(f"{out} holds no checkpoint yet; continuing the run from step 0")
        if continuing and dist.is_main:
            trim_log(out, start_step)
        multiply_adds = d_model * m * config.batch_size * len(layers) * (len(layers) + 3) // 2
        with torch_threads(step_threads(config.threads, multiply_adds)):
            run_clt_steps(config, cache, layers, schedule, state, scales, start_step, out, device, dist)
    finally:
        if owns_cache:
            cache.close()
    clt = gathered(state, whole.config, dist)
    if dist.is_main:
        from tccli.transcoders.files import save_cross_layer

        save_cross_layer(clt, out / CLT_FOLDER)
    dist.barrier()
    return clt


def clt_config(config: TrainConfig, cache: Any, layers: list[int], n_features: int) -> CrossLayerConfig:
    from tccli.model.loading import model_identity

    info = cache.model_info
    model_name = info.get("name")
    if model_identity(model_name) == "builtin":  # not this machine's install path: it means nothing elsewhere
        model_name = "builtin"
    d_model = int(cache.d_model)
    return CrossLayerConfig(
        d_in=d_model,
        d_out=d_model,
        n_features=n_features,
        layers=list(layers),
        activation=config.activation,
        k=config.k if config.activation in ("topk", "batchtopk") else None,
        skip=config.skip,
        input_space="normalized",
        output_space="mlp_out",
        model_name=model_name,
        model_architecture=info.get("architecture"),
        weight_processing=dict(info.get("weight_processing") or {}),
        input_hooks=[info["layers"][layer]["mlp_in"] for layer in layers],
        output_hooks=[info["layers"][layer]["mlp_out"] for layer in layers],
        training=to_json_dict(config),
    )


def settings_of(config: TrainConfig) -> clt_step.CLTSettings:
    sparse = config.activation in ("topk", "batchtopk")
    return clt_step.CLTSettings(
        activation=config.activation,
        k=config.k,
        pre_act_coef=0.0 if sparse else config.pre_act_coef,
        aux_k=config.aux_k,
        aux_coef=config.aux_coef,
    )


def initial_clt(
    config: TrainConfig, cache: Any, layers: list[int], stats: dict[int, DataStats]
) -> tuple[CrossLayerTranscoder, clt_step.CLTScales]:
    """The whole initial CLT (on the CPU, the same on every rank) and the loss's constants."""
    d_model = int(cache.d_model)
    clt = CrossLayerTranscoder(clt_config(config, cache, layers, config.n_features(d_model)))
    clt_step.init_clt_(
        clt,
        [stats[layer].input_mean for layer in layers],
        [stats[layer].target_mean for layer in layers],
        [layer_generator(config.seed, layer) for layer in layers],
    )
    inputs = [stats[layer].input_sample for layer in layers]
    targets = [stats[layer].target_sample for layer in layers]
    variances = tuple(stats[layer].target_variance for layer in layers)
    spread = sum(v**0.5 for v in variances) / len(variances)  # the outputs' typical RMS spread
    scales = clt_step.CLTScales(variances, config.sparsity_scale / max(spread, 1e-12), (1.0,) * len(layers))
    settings = settings_of(config)
    if config.activation == "jumprelu":
        clt_step.init_thresholds_(clt, inputs, config.k)
    clt_step.calibrate_encoders_(clt, inputs, targets, settings, scales)
    if config.activation == "jumprelu":  # the kernel width relative to each layer's initial thresholds
        threshold_scales = [max(float(clt.threshold[str(layer)].detach().mean()), 1e-8) for layer in layers]
        scales = dataclasses.replace(
            scales,
            bandwidth=tuple(config.bandwidth * t for t in threshold_scales),
            threshold_scale=tuple(threshold_scales),
        )
    return clt, scales


def new_state(
    whole: CrossLayerTranscoder,
    config: TrainConfig,
    dist: distributed.Distributed,
    device: torch.device,
    scales: clt_step.CLTScales,
) -> CLTState:
    shard = CrossLayerTranscoder(dataclasses.replace(whole.config, n_features=whole.n_features // dist.world))
    clt_step.shard_of(whole, shard, dist.rank)
    shard = shard.to(device)
    for param in shard.b_pre.values():  # redundant with b_enc in the encoder; kept at the inputs' mean
        param.requires_grad_(False)
    if shard.threshold is not None and config.activation == "batchtopk":  # estimated at the end, not trained
        for param in shard.threshold.values():
            param.requires_grad_(False)
    lr = config.learning_rate_for(whole.n_features)
    weights = [p for name, p in shard.named_parameters() if p.requires_grad and not name.startswith("threshold")]
    groups = [dict(params=weights, lr_scale=1.0)]
    if config.activation == "jumprelu":
        # thresholds step in units of their layer's bandwidth's scale (as tccli.training.train does per layer)
        for j, layer in enumerate(whole.layers):
            groups.append(dict(params=[shard.threshold[str(layer)]], lr_scale=scales.threshold_scale[j]))
    optimizer = torch.optim.Adam(groups, lr=lr, fused=True)
    shape = (len(whole.layers), shard.n_features)
    batchtopk = config.activation == "batchtopk"
    return CLTState(
        shard,
        optimizer,
        torch.zeros(shape, dtype=torch.long, device=device),
        torch.zeros(shape, dtype=torch.long, device=device),
        min_sum=torch.zeros(shape, device=device) if batchtopk else None,
        min_count=torch.zeros(shape, dtype=torch.long, device=device) if batchtopk else None,
    )


def gathered(state: CLTState, config: CrossLayerConfig, dist: distributed.Distributed) -> CrossLayerTranscoder:
    """The whole CLT from every rank's shard (every rank gets it), with BatchTopK's thresholds and the feature
    frequencies measured over the last tenth of training."""
    comm = comm_of(dist)
    shard = state.shard.to("cpu")
    tokens = max(1, state.frequency_tokens)
    frequency = comm.gather((state.fire_counts.double() / tokens).cpu())  # [L, m]
    whole = CrossLayerTranscoder(dataclasses.replace(config, feature_frequency=frequency.tolist()))
    thresholds = None
    if config.activation == "batchtopk":
        mean_cutoff = state.cutoff_sum / max(1, state.cutoff_count)
        thresholds = clt_step.batchtopk_thresholds(state.min_sum.cpu(), state.min_count.cpu(), mean_cutoff)
    with torch.no_grad():
        for j, layer in enumerate(config.layers):
            key = str(layer)
            whole.W_enc[key].copy_(comm.gather(shard.W_enc[key]))
            whole.b_enc[key].copy_(comm.gather(shard.b_enc[key]))
            whole.W_dec[key].copy_(comm.gather(shard.W_dec[key].permute(1, 2, 0)).permute(2, 0, 1))
            whole.b_pre[key].copy_(shard.b_pre[key])
            whole.b_dec[key].copy_(shard.b_dec[key])
            if whole.W_skip is not None:
                whole.W_skip[key].copy_(shard.W_skip[key])
            if whole.threshold is not None:
                local = thresholds[j] if thresholds is not None else shard.threshold[key]
                whole.threshold[key].copy_(comm.gather(local))
    return whole


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, step: int, config: TrainConfig, state: CLTState, dist: distributed.Distributed) -> None:
    payload = {
        "step": step,
        "config": to_json_dict(config),
        "kind": "clt",
        "rank": dist.rank,
        "world": dist.world,
        "shard": state.shard.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "counters": state.counters(),
        "torch_rng": torch.get_rng_state(),
    }

    write_torch_file(path, payload)


def load_checkpoint(
    path: Path, config: TrainConfig, state: CLTState, d_model: int, dist: distributed.Distributed
) -> int:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        saved_config, kind, world = payload["config"], payload["kind"], payload["world"]
        shard, optimizer, counters = payload["shard"], payload["optimizer"], payload["counters"]
    except Exception as exc:  # a truncated or foreign file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise fail(f"cannot read checkpoint {path}: {reason}; start again with --force") from None
    if kind != "clt" or world != dist.world:
        raise fail(f"--resume: {path} is not a checkpoint of a CLT run on {dist.world} process(es)")
    check_same_run(saved_config, config, d_model, "the checkpointed run")
    try:
        state.shard.load_state_dict(shard)
    except RuntimeError as exc:
        raise fail(f"--resume: {path} holds another CLT's weights ({str(exc).splitlines()[0][:160]})") from None
    state.optimizer.load_state_dict(optimizer)
    device = state.steps_since_fired.device
    for name, value in counters.items():
        setattr(state, name, value.to(device) if isinstance(value, torch.Tensor) else value)
    torch.set_rng_state(payload["torch_rng"])
    return int(payload["step"])


# ----------------------------------------------------------------------------- the steps


def run_clt_steps(
    config: TrainConfig,
    cache: Any,
    layers: list[int],
    schedule: ShuffleSchedule,
    state: CLTState,
    scales: clt_step.CLTScales,
    start_step: int,
    out: Path,
    device: torch.device,
    dist: distributed.Distributed,
) -> None:
    """Train from ``start_step`` to the end as ``train.run_steps`` does (checkpoints, Ctrl-C / SIGTERM between
    two steps with a checkpoint, a non-finite loss stopping the run saying which checkpoint is left)."""
    total = config.total_steps
    frequency_from = total - max(1, total // 10)
    reporter = Reporter(out, config.quiet, total, start_step) if dist.is_main else distributed.SilentReporter()
    path = out / checkpoint_name(dist)
    comm = comm_of(dist)
    settings = settings_of(config)
    loader = WindowLoader(cache, layers, "transcoder", cache.context, device)
    base_lr = config.learning_rate_for(state.shard.n_features * dist.world)
    step = start_step
    saved_step: Optional[int] = start_step if start_step else None

    def checkpoint_now() -> None:
        nonlocal saved_step
        save_checkpoint(path, step, config, state, dist)
        saved_step = step

    try:
        with interrupts.deferred():
            for window, data in loader.stream(schedule.windows(start_step)):
                for batch_index in range(step - window.first_step, window.n_steps):
                    if step >= total:
                        break
                    lr = learning_rate(step, total, base_lr, config.warmup_steps, config.decay_fraction)
                    rows = slice(batch_index * config.batch_size, (batch_index + 1) * config.batch_size)
                    inputs = [data[layer][0][rows] for layer in layers]
                    targets = [data[layer][1][rows] for layer in layers]
                    metrics = train_clt_step(
                        state, inputs, targets, config, settings, scales, step, lr, comm, dist, step >= frequency_from
                    )
                    if (step + 1) % config.log_every == 0 or step + 1 == total:
                        for entry in metrics():
                            reporter.record(dict(step=step + 1, lr=lr, **entry))
                    step += 1
                    reporter.step(step)
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


def train_clt_step(
    state: CLTState,
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    config: TrainConfig,
    settings: clt_step.CLTSettings,
    scales: clt_step.CLTScales,
    step: int,
    lr: float,
    comm: clt_step.Comm,
    dist: distributed.Distributed,
    count_frequency: bool,
):
    """One optimiser step of this rank's shard; returns a function giving the step's per-layer metrics (every
    rank must call it at the same steps: it sums the shards' counts)."""
    shard = state.shard
    dead = state.steps_since_fired >= config.dead_window
    use_aux = settings.aux_k > 0 and dist.any(bool(dead.any()))
    sparsity_lambda = clt_step.lambda_at(step, config.total_steps, config.sparsity_coef, config.sparsity_ramp)
    result = clt_step.clt_loss(shard, inputs, targets, dead, settings, scales, sparsity_lambda, comm, use_aux)
    if not bool(torch.isfinite(result.reconstruction)):
        raise NonFiniteLoss(f"the loss became {float(result.reconstruction.detach())} at step {step + 1}")
    for group in state.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    state.optimizer.zero_grad(set_to_none=True)
    result.loss.backward()
    state.optimizer.step()
    if settings.activation == "jumprelu":
        for param in shard.threshold.values():
            clamp_min_(param, state.optimizer, 0.0)
    n = inputs[0].shape[0]
    with torch.no_grad():
        state.steps_since_fired += 1
        state.steps_since_fired.masked_fill_(result.fires > 0, 0)
        if count_frequency:
            state.fire_counts += result.fires
            state.frequency_tokens += n
            if result.selected_min is not None:
                selected = torch.isfinite(result.selected_min)
                state.min_sum += torch.where(selected, result.selected_min, 0.0)
                state.min_count += selected.long()
                state.cutoff_sum += float(torch.relu(result.cutoff))
                state.cutoff_count += 1

    def metrics() -> list[dict]:
        with torch.no_grad():
            n_layers = len(inputs)
            dead_now = (state.steps_since_fired >= config.dead_window).sum(dim=1).double()
            local = torch.cat([result.active.double(), dead_now, result.penalty.detach().double().reshape(1)])
            total = comm.sum(local.cpu())
            active, dead_count, penalty = total[:n_layers], total[n_layers : 2 * n_layers], float(total[-1])
            loss = float(result.reconstruction) + penalty + settings.aux_coef * float(result.aux)
            width = shard.n_features * comm.world
            return [
                dict(
                    layer=layer,
                    loss=loss,
                    mse=float(result.layer_mse[j]),
                    l1=penalty,
                    l0=float(active[j]) / n,
                    fvu=float(clt_step.fraction_of_variance_unexplained(result.outputs[j], targets[j])),
                    aux=float(result.aux),
                    dead_fraction=float(dead_count[j]) / width,
                )
                for j, layer in enumerate(shard.layers)
            ]

    return metrics
