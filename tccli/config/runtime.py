"""Settings that only matter under torchrun."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tccli.config.fields import option
from tccli.errors import fail

DEFAULT_TIMEOUT = 300.0


@dataclass
class DistributedOptions:
    """Options that only matter under torchrun."""

    dist_timeout: float = option(
        DEFAULT_TIMEOUT,
        "Under torchrun: seconds a rank waits for the others in a "
        "collective before it stops with an error (a rank died or stalled).",
        save=False,
        torchrun=True,
        metavar="SECONDS",
    )

    def validate(self) -> None:
        if not (self.dist_timeout > 0 and math.isfinite(self.dist_timeout)):
            raise fail(f"--dist-timeout must be a positive number of seconds, got {self.dist_timeout}")


@dataclass
class TrainDistributedOptions(DistributedOptions):
    """`tc train`'s options for torchrun runs."""

    distribute_layers: bool = option(
        False,
        "Under torchrun: each rank trains whole layers (layer i of the list "
        "on rank i % N) instead of a share of every batch.",
        save=False,
        torchrun=True,
    )
