"""What `tc train` keeps in its --out folder, and the per-layer training state it saves there: the run's
config (written first, so that any started run is resumable), the JSONL log and the ``Reporter`` that
writes it, checkpoints of every layer's ``LayerState`` (and the check that a resumed run is the same
run), and preparing the folder for a fresh, resumed or --force'd run.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tccli.config.fields import from_json_dict, to_json_dict
from tccli.config.training import TrainConfig
from tccli.errors import TcError, fail
from tccli.runtime import interrupts, outputs, progress
from tccli.training.step_math import LossScales
from tccli.transcoders.transcoder import Transcoder

CHECKPOINT_FILE = "checkpoint.tcstate"  # not .pt: a set folder's .pt files are read as paper transcoders
LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "train_config.json"
CLT_FOLDER = "clt"  # --kind clt: the trained cross-layer transcoder's folder

# Fields that may differ between a run and its resumption without changing the result.
RESUME_FREE_FIELDS = (
    "device",
    "autocast",
    "threads",
    "checkpoint_every",
    "log_every",
    "resume",
    "force",
    "quiet",
    "out",
    "cache",
)


# ----------------------------------------------------------------------------- checkpoints


@dataclass
class LayerState:
    """One layer's training state: what a checkpoint holds of it (with the step and the RNG state)."""

    transcoder: Transcoder
    optimizer: torch.optim.Optimizer  # Adam or ScheduleFreeSign
    steps_since_fired: torch.Tensor  # [m] long
    fire_counts: torch.Tensor  # [m] long: tokens fired on during the frequency window
    frequency_tokens: int = 0
    scales: LossScales = LossScales()


def save_checkpoint(
    out: Path, step: int, config: TrainConfig, states: dict[int, LayerState], name: str = CHECKPOINT_FILE
) -> None:
    """Replace ``out/name`` atomically; a failed write (full disk, read-only folder) removes its temporary
    file, keeps the previous checkpoint and raises one line naming the file and the cause."""
    payload = {
        "step": step,
        "config": to_json_dict(config),
        "layers": {
            layer: {
                "transcoder": s.transcoder.state_dict(),
                "optimizer": s.optimizer.state_dict(),
                "steps_since_fired": s.steps_since_fired,
                "fire_counts": s.fire_counts,
                "frequency_tokens": s.frequency_tokens,
            }
            for layer, s in states.items()
        },
        "torch_rng": torch.get_rng_state(),
    }

    write_torch_file(out / name, payload)


def write_torch_file(path: Path, payload: Any) -> None:
    """``torch.save`` into ``path`` atomically, a full disk reported as the OSError it is."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            recording = outputs.RecordingFile(handle)
            try:
                torch.save(payload, recording)
            except RuntimeError as exc:  # torch reports a full disk as "unexpected pos ..."
                if recording.error is None:
                    raise
                raise recording.error from exc

    outputs.atomic_write(path, write)


class NonFiniteLoss(TcError):
    """The loss became NaN or infinite (``diverged`` says which checkpoint is left)."""


def diverged(exc: NonFiniteLoss, saved_step: Any, out: Path) -> TcError:
    """The one-line error for a run whose loss stopped being finite."""
    kept = (
        f"its last checkpoint (step {saved_step}) is kept in {out}"
        if saved_step is not None
        else "no checkpoint had been written"
    )
    return fail(
        f"{exc}; training stopped and {kept}. A resumed run would diverge the same way: start "
        f"again with a lower --lr (--force reuses {out})"
    )


def stop_if_interrupted(dist: Any, step: int, total: int, saved_step: Any, checkpoint_now: Any) -> None:
    """Between two steps: on Ctrl-C or SIGTERM (on any rank) checkpoint, unless just done, and stop."""
    if dist.any(interrupts.pending() is not None) and step < total:
        if saved_step != step:
            checkpoint_now()
        raise interrupts.take(f"stopped at step {step} of {total} with a checkpoint; resume with --resume")


def load_checkpoint(
    out: Path, config: TrainConfig, states: dict[int, LayerState], d_model: int, name: str = CHECKPOINT_FILE
) -> int:
    """Restore ``states`` from ``out/name``; the step it was saved at."""
    path = out / name
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        saved_config = payload["config"]
        saved_layers = payload["layers"]
    except Exception as exc:  # a truncated or foreign file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise fail(f"cannot read checkpoint {path}: {reason}; start again with --force") from None
    check_same_run(saved_config, config, d_model, "the checkpointed run")
    if sorted(saved_layers) != sorted(states):
        raise fail(f"--resume: the checkpoint holds layers {sorted(saved_layers)}, not {sorted(states)}")
    for layer, state in states.items():
        saved_layer = saved_layers[layer]
        state.transcoder.load_state_dict(saved_layer["transcoder"])
        state.optimizer.load_state_dict(saved_layer["optimizer"])
        device = state.steps_since_fired.device
        state.steps_since_fired = saved_layer["steps_since_fired"].to(device)
        state.fire_counts = saved_layer["fire_counts"].to(device)
        state.frequency_tokens = int(saved_layer["frequency_tokens"])
    torch.set_rng_state(payload["torch_rng"])
    return int(payload["step"])


def check_same_run(saved: dict, config: TrainConfig, d_model: int, what: str) -> None:
    """Refuse to continue a run whose options would change the result. Compared by meaning: the layer
    lists are compared once resolved (by the caller), and --features / --expansion by the width they give."""
    saved_config = from_json_dict(TrainConfig, saved)
    start_over = "a resumed run keeps its options; --force starts the run over"
    for name, value in to_json_dict(config).items():
        if name in RESUME_FREE_FIELDS or name in ("layers", "expansion", "features"):
            continue
        if getattr(saved_config, name) != value:
            raise fail(
                f"--resume: --{name.replace('_', '-')} is {_described(config, name, value, d_model)} but {what} "
                f"used {getattr(saved_config, name)!r}; {start_over}"
            )
    if saved_config.n_features(d_model) != config.n_features(d_model):
        raise fail(
            f"--resume: this run would have {config.n_features(d_model)} features per layer but {what} "
            f"has {saved_config.n_features(d_model)}; {start_over}"
        )


def _described(config: TrainConfig, name: str, value: Any, d_model: int) -> str:
    """An option's value as the user gave it: one left out is named as such, with the default it takes."""
    if value is not None:
        return repr(value)
    defaults = {
        "lr": lambda: config.learning_rate_for(config.n_features(d_model)),
        "lr_decay": lambda: config.decay_fraction,
    }
    if name in defaults:
        return f"not given (its default here is {defaults[name]():.3g})"
    return "not given"


# ----------------------------------------------------------------------------- the log


class Reporter:
    """Metric lines in the JSONL log and, unless --quiet, on stderr: above a progress bar on a terminal,
    as plain lines (flushed one by one, no bar, no control characters) when stderr is a file or a pipe,
    so that a run's log captured by a shell script or a batch scheduler shows it going."""

    def __init__(self, out: Path, quiet: bool, total_steps: int, start_step: int = 0):
        try:
            self.log = open(out / LOG_FILE, "a")
        except OSError as exc:
            raise outputs.write_error(out / LOG_FILE, exc) from None
        self.total_steps = total_steps
        self.quiet = quiet
        self._bar = progress.bar(quiet, "steps")
        self.update = self._bar.__enter__()
        self.console = progress.stderr_console() if self.update is not progress.no_progress else None
        self.update("training", start_step, total_steps)
        self.started = time.time()

    def record(self, entry: dict) -> None:
        try:
            self.log.write(json.dumps(entry) + "\n")
            self.log.flush()
        except OSError as exc:
            raise outputs.write_error(Path(self.log.name), exc) from None
        if self.quiet:
            return
        m = entry
        line = (
            f"step {m['step']}/{self.total_steps} layer {m['layer']} lr {m['lr']:.2e} loss {m['loss']:.4g} "
            f"mse {m['mse']:.4g} L1 {m['l1']:.3g} L0 {m['l0']:.1f} FVU {m['fvu']:.4f} "
            f"dead {m['dead_fraction']:.3f} ({time.time() - self.started:.0f}s)"
        )
        if self.console is not None:
            self.console.print(line)
        else:
            # print, not the rich console: off a terminal rich would wrap the line at 80 columns
            with contextlib.suppress(OSError, ValueError):  # stderr closed or gone: the JSONL log still has it
                print(line, file=sys.stderr, flush=True)

    def step(self, step: int) -> None:
        self.update("training", step, self.total_steps)

    def close(self) -> None:
        self._bar.__exit__(None, None, None)
        with contextlib.suppress(OSError):
            self.log.close()


def trim_log(out: Path, step: int) -> None:
    """Drop log lines written after ``step`` (the point a resumed run continues from), so every step is
    logged once."""
    path = out / LOG_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry_step = int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError, TypeError):
            continue  # a line cut short by a kill
        if entry_step <= step:
            kept.append(line)
    outputs.atomic_write_text(path, "".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------- the folder


def run_files(out: Path) -> list[Path]:
    """The files and folders tc train writes in ``out`` (what --force replaces; nothing else is touched)."""
    found = [out / name for name in (CONFIG_FILE, LOG_FILE) if (out / name).exists()]
    found += sorted(p for p in out.glob("checkpoint*.tcstate*"))
    found += sorted(p for p in out.glob(f"{CONFIG_FILE}.*{outputs.TEMP_SUFFIX}"))
    found += sorted(p for p in out.iterdir() if p.is_dir() and re.fullmatch(r"layer_\d+", p.name))
    if (out / CLT_FOLDER).is_dir():
        found.append(out / CLT_FOLDER)
    return found


def remove_run_files(out: Path) -> None:
    """Remove a previous run's files from ``out`` (its transcoder folders only when they hold nothing else)."""
    try:
        for path in run_files(out):
            if path.is_dir():
                for inner in path.iterdir():
                    if (
                        inner.name in ("config.json", "transcoder.safetensors")
                        or re.fullmatch(r"layer_\d+\.safetensors", inner.name)
                        or inner.name.endswith(outputs.TEMP_SUFFIX)
                    ):
                        inner.unlink()
                with contextlib.suppress(OSError):
                    path.rmdir()
            else:
                path.unlink()
    except OSError as exc:
        raise outputs.write_error(getattr(exc, "filename", None) or out, exc) from None


def prepare_out(out: Path, resume: bool, force: bool = False, log: Any = lambda message: None) -> bool:
    """Make ``out`` ready (the caller holds its lock); True when a started run is there to continue.

    A run is resumable from any moment: ``train_config.json`` is written before anything else, so a run
    killed before its first checkpoint continues from step 0; --resume where nothing was started yet
    simply starts.
    """
    entries = [p for p in out.iterdir()]
    started = (out / CONFIG_FILE).is_file() or any(out.glob("checkpoint*.tcstate"))
    if resume:
        if started:
            return True
        if not entries:
            log(f"nothing to resume in {out} yet; starting the run")
            return False
        raise fail(
            f"--resume: {out} holds no tc train run (no {CONFIG_FILE}); choose another folder, or "
            "--force to start a run there"
        )
    if force:
        remove_run_files(out)
        return False
    if entries:
        raise fail(
            f"--out {out} already exists and is not empty; pass --resume to continue the run there, "
            "--force to start it again, or choose another folder"
        )
    return False


def make_out_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise fail(f"--out {out} is a file; tc train writes a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise outputs.write_error(out, exc) from None


def read_run_config(path: Path) -> dict:
    """The run's saved config (``train_config.json``) as a dict; one line naming the way out when it is unreadable."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise fail(f"cannot read {path}: {exc}; start again with --force") from None
    if not isinstance(saved, dict):
        raise fail(f"{path} is not a tc train config; start again with --force")
    return saved
