"""`tc train`'s settings: kind, optimiser, schedule, dead-feature revival, output folder."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from tccli.config.fields import option, parse_count
from tccli.config.runtime import DistributedOptions, TrainDistributedOptions
from tccli.config.transcoders import KINDS
from tccli.errors import fail

# The kinds of transcoder.ACTIVATIONS that tc can train (the others are read from other libraries' files).
TRAINABLE_ACTIVATIONS = ("topk", "batchtopk", "jumprelu", "relu")


OPTIMIZERS = ("adam", "signum")


DECODER_NORMS = ("unit", "free")


AUTOCASTS = ("none", "bfloat16")


# `--kind`: a per-layer kind of tccli.config.transcoders.KINDS, or clt (one cross-layer transcoder for every
# trained layer; docs/method.md section 11, trained by tccli.training.clt_train).
CLT = "clt"
TRAIN_KINDS = (*KINDS, CLT)


# Base learning rates at 16,384 features, scaled by 1/sqrt(features / 16384) (the form of Gao et al. 2024's rule
# for Adam, which sparsify uses for sign descent too). Adam's base is measured on stories260K (README: 6e-3 at
# 1,024 features beat 1e-3, 3e-3 and Gao et al.'s 2e-4 base and matched 1e-2); signum's is sparsify's.
BASE_LR = {"adam": 1.5e-3, "signum": 5e-3}


@dataclass
class TrainConfig(TrainDistributedOptions):
    """Options of `tc train`; saved into every trained transcoder's config.json as ``training``."""

    cache: Optional[str] = option(None, "Activation cache written by `tc cache` (HDF5).", required=True)
    out: Optional[str] = option(
        None,
        "Output folder: one transcoder folder per layer (layer_L), the JSONL log and the checkpoint.",
        required=True,
    )
    layers: str = option(
        "all",
        "Layers to train, one transcoder each, from one read of the cache: 2, 0-4, 0,3 or all (every cached layer).",
    )
    kind: str = option(
        "transcoder",
        "transcoder (MLP input -> MLP output, one per layer), sae (MLP output -> MLP output, the paper's "
        "baseline) or clt (one cross-layer transcoder over every trained layer: each layer's features write "
        "to its own and every later layer's MLP output; saved as one folder, clt, in --out).",
    )
    expansion: int = option(16, "Features per model dimension (m = expansion x d_model); ignored with --features.")
    features: Optional[int] = option(None, "Number of features m (overrides --expansion).")
    activation: str = option(
        "topk",
        "topk (the k largest pre-activations of each token), batchtopk (the "
        "k x batch largest of the batch; a threshold at inference), jumprelu (a trained "
        "threshold per feature, L0 penalty) or relu (the paper's, sparsity from the L1 "
        "penalty).",
    )
    k: int = option(16, "Active features per token: topk and batchtopk (on average); jumprelu starts at it.")
    skip: bool = option(
        False,
        "Skip transcoder: add a linear term x W_skip of the input, initialised at 0.",
        flags=("--skip/--no-skip",),
    )
    l1: float = option(1e-3, "L1 coefficient lambda for --activation relu (loss + lambda * sum |z|).")
    l0_coef: float = option(1e-3, "jumprelu: weight of the L0 penalty (loss = mse / target variance + coef x L0).")
    bandwidth: float = option(
        0.1, "jumprelu: width of the straight-through estimators' kernel, as a fraction of the mean initial threshold."
    )
    l1_warmup: int = option(0, "Steps over which the L1 coefficient ramps linearly from 0 (0: none, the paper).")
    sparsity_coef: float = option(
        1e-3,
        "clt with relu or jumprelu: lambda of the sparsity penalty lambda x sum tanh(c x a x ||decoders||) "
        "(per token, over every layer's features; ||decoders|| is the norm of a feature's decoders to all "
        "later layers together).",
    )
    sparsity_scale: float = option(
        1.0,
        "clt with relu or jumprelu: c of the tanh penalty, in units of 1 / (RMS spread of the MLP outputs).",
    )
    sparsity_ramp: float = option(
        1.0, "clt: fraction of the run over which lambda ramps linearly from 0 to --sparsity-coef (0: none)."
    )
    pre_act_coef: float = option(
        3e-6,
        "clt with relu or jumprelu: weight of the pre-activation penalty sum ReLU(-pre) per token, which "
        "keeps features from dying.",
    )
    normalize_mse: bool = option(
        False, "Divide each token's squared error by the norm of its target (the reference code's normalisation)."
    )
    optimizer: str = option(
        "adam",
        "adam (with the decoder-norm constraint and the schedule below) or signum "
        "(sign descent with schedule-free momentum, sparsify's; constant lr after warm-up, "
        "the averaged weights are saved).",
    )
    lr: Optional[float] = option(
        None,
        "Learning rate (default: adam 1.5e-3, signum 5e-3, times "
        "1/sqrt(features / 16384): adam 6e-3 at 1,024 features).",
    )
    decoder_norm: str = option("unit", "unit (decoder rows kept at norm 1; the paper's, needed by relu's L1) or free.")
    warmup_steps: int = option(100, "Steps of linear learning-rate warm-up from 0.")
    lr_decay: Optional[float] = option(
        None,
        "Fraction of the run, at its end, over which the learning rate "
        "decays linearly to 0 (0: constant after warm-up, the paper; default: "
        "adam 0.3, signum 0).",
    )
    batch_size: int = option(1024, "Tokens per step.", parser=parse_count)
    tokens: int = option(
        12_000_000,
        "Training tokens (accepts 200k, 12M); the cache is read again, reshuffled, as often as needed.",
        parser=parse_count,
    )
    shuffle_buffer: int = option(
        262_144,
        "Tokens held in the shuffle buffer: each batch is drawn from this "
        "many tokens of randomly chosen rows (bounds memory).",
        parser=parse_count,
    )
    dead_window: int = option(
        50, "A feature is dead after this many steps without firing (AuxK and ghost gradients train the dead ones)."
    )
    ghost_grads: bool = option(
        True,
        "relu: train dead features on the residual target - output with ghost gradients.",
        flags=("--ghost-grads/--no-ghost-grads",),
    )
    aux_k: int = option(
        256, "topk, batchtopk, jumprelu: dead features used by the auxiliary loss (AuxK) that revives them; 0: off."
    )
    aux_coef: float = option(1 / 32, "Weight of the AuxK loss.")
    seed: int = option(
        0,
        "Seed (>= 0) for the initial weights and the shuffle order. Each layer's initial weights come "
        "from (seed, layer) alone, so a layer trained on its own matches that layer of a run of every layer.",
    )
    device: str = option("auto", "Device: auto (cuda when available), cpu, cuda or cuda:N.")
    threads: int = option(
        0,
        "CPU threads for the step (0: automatic: one thread when the encoder product of a "
        "step is under 2^30 multiply-adds, where splitting small operations across cores costs "
        "more than it gains, above all on a busy machine; else torch's default).",
    )
    autocast: str = option(
        "none",
        "none or bfloat16: the encoder's dense product in bfloat16 on a GPU "
        "(the sparse parts and the weights stay float32).",
    )
    checkpoint_every: int = option(500, "Steps between checkpoints (0: only at the end).")
    log_every: int = option(
        50,
        "Steps between metric lines. They go to the JSONL log (train_log.jsonl in --out) and, unless --quiet, "
        "to stderr: above the progress bar on a terminal, as plain lines when stderr is a file or a pipe.",
    )
    resume: bool = option(
        False,
        "Continue the run in --out from its checkpoint (from step 0 if it was stopped before its first one).",
        save=False,
    )
    force: bool = option(
        False,
        "Start the run again in --out, replacing the files an earlier tc train left there (others are kept).",
        save=False,
    )
    quiet: bool = option(False, "No progress on stderr.", save=False)

    def validate(self) -> None:
        def finite_positive(name: str, value: float) -> None:
            if not (math.isfinite(value) and value > 0):
                raise fail(f"--{name} must be a finite number > 0, got {value}")

        if self.lr is not None:
            finite_positive("lr", self.lr)
        finite_positive("bandwidth", self.bandwidth)
        if self.resume and self.force:
            raise fail("--resume and --force contradict each other: pick one")
        DistributedOptions.validate(self)
        if self.activation not in TRAINABLE_ACTIVATIONS:
            raise fail(f"--activation must be one of {', '.join(TRAINABLE_ACTIVATIONS)}, got {self.activation!r}")
        if self.kind not in TRAIN_KINDS:
            raise fail(f"--kind must be one of {', '.join(TRAIN_KINDS)}, got {self.kind!r}")
        if self.kind == CLT:
            self._validate_clt()
        if self.expansion < 1:
            raise fail(f"--expansion must be at least 1, got {self.expansion}")
        if self.features is not None and self.features < 1:
            raise fail(f"--features must be at least 1, got {self.features}")
        if self.activation != "relu" and self.k < 1:
            raise fail(f"--k must be at least 1, got {self.k}")
        for name, allowed in (("optimizer", OPTIMIZERS), ("decoder_norm", DECODER_NORMS), ("autocast", AUTOCASTS)):
            if getattr(self, name) not in allowed:
                raise fail(
                    f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if self.activation == "relu" and self.decoder_norm != "unit":
            raise fail(
                "--activation relu needs --decoder-norm unit (with free decoder rows the L1 penalty "
                "is evaded by shrinking the activations)"
            )
        if not (math.isfinite(self.l0_coef) and self.l0_coef >= 0):
            raise fail(f"--l0-coef must be a finite number >= 0, got {self.l0_coef}")
        if not (math.isfinite(self.l1) and self.l1 >= 0):
            raise fail(f"--l1 must be a finite number >= 0, got {self.l1}")
        if not (math.isfinite(self.aux_coef) and self.aux_coef >= 0):
            raise fail(f"--aux-coef must be a finite number >= 0, got {self.aux_coef}")
        if self.lr_decay is not None and not 0 <= self.lr_decay <= 1:
            raise fail(f"--lr-decay is a fraction of the run, between 0 and 1, got {self.lr_decay}")
        for name in ("warmup_steps", "l1_warmup", "aux_k", "checkpoint_every", "threads", "seed"):
            if getattr(self, name) < 0:
                raise fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "dead_window", "log_every"):
            if getattr(self, name) < 1:
                raise fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.tokens < self.batch_size:
            raise fail(f"--tokens {self.tokens} is less than one batch of {self.batch_size}")

    def _validate_clt(self) -> None:
        for name in ("sparsity_coef", "sparsity_scale", "pre_act_coef"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise fail(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if not 0 <= self.sparsity_ramp <= 1:
            raise fail(f"--sparsity-ramp is a fraction of the run, between 0 and 1, got {self.sparsity_ramp}")
        if self.distribute_layers:
            raise fail(
                "--kind clt shards every layer's features across the torchrun ranks; --distribute-layers "
                "does not apply to it"
            )
        if self.optimizer != "adam":
            raise fail("--kind clt trains with --optimizer adam only")

    @property
    def total_steps(self) -> int:
        return self.tokens // self.batch_size

    def n_features(self, d_model: int) -> int:
        return self.features if self.features is not None else self.expansion * d_model

    @property
    def decay_fraction(self) -> float:
        """--lr-decay, or the optimiser's default (schedule-free averaging replaces a decay)."""
        if self.lr_decay is not None:
            return self.lr_decay
        return 0.0 if self.optimizer == "signum" else 0.3

    def learning_rate_for(self, n_features: int) -> float:
        """--lr, or the optimiser's base rate scaled by 1/sqrt(n_features / 16384)."""
        if self.lr is not None:
            return self.lr
        return BASE_LR[self.optimizer] / math.sqrt(n_features / 16384)
