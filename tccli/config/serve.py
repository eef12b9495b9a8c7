"""Settings of `tc serve`: a local server that shows `tc view`'s page and computes graphs, interventions and
validations on the model for it."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Optional

from tccli.config.fields import ModelOptions, option
from tccli.config.graph import check_graph_budget
from tccli.errors import fail

LOOPBACK_NAMES = ("localhost", "ip6-localhost", "ip6-loopback")


@dataclass
class ServeConfig(ModelOptions):
    """Options of `tc serve`."""

    transcoders: str = option("", "Transcoder folder, or a folder of per-layer transcoder folders.", required=True)
    features: Optional[str] = option(
        None,
        "A features file from `tc score` (.h5 or .jsonl): feature nodes get a label, their card "
        "(examples, density, tables) is fetched from the server when clicked, and --ablation mean "
        "interventions read the features' mean activations from it.",
        metavar="FEATURES.h5",
    )
    host: str = option(
        "127.0.0.1",
        "Address to listen on. The server has no authentication: anything that can reach the address "
        "can run the model; keep it on the loopback (127.0.0.1, ::1, localhost) unless you mean otherwise.",
    )
    port: int = option(8000, "Port to listen on (0: any free port, printed at start).")
    examples: int = option(5, "Examples per feature card (top and quantile each), with --features.")
    min_edge: float = option(
        0.01,
        "Where the page's edge threshold slider starts (a fraction of the target's |value|).",
        metavar="FRACTION",
    )
    max_feature_nodes: int = option(2000, "Graphs: features that get rows (`tc graph --max-feature-nodes`).")
    node_threshold: float = option(0.8, "Graphs: keep the nodes that carry this share of the influence.")
    edge_threshold: float = option(0.98, "Graphs: keep the edges that carry this share of the edge influence.")
    batch_size: int = option(256, "Graphs: rows per backward pass (`tc graph --batch-size`).")
    random: int = option(5, "Validation: random circuits of equal size drawn as the baseline (`tc validate`).")
    queue: int = option(16, "Requests for the model waiting at most; more are refused (503) until some finish.")

    def validate(self) -> None:
        ModelOptions.validate(self)
        if not self.host or not self.host.strip():
            raise fail("--host is empty; give an address such as 127.0.0.1")
        if not 0 <= self.port <= 65535:
            raise fail(f"--port must be in 0-65535, got {self.port}")
        if self.examples < 1:
            raise fail(f"--examples must be at least 1, got {self.examples}")
        if not self.min_edge >= 0:  # also refuses NaN
            raise fail(f"--min-edge must be a fraction >= 0, got {self.min_edge}")
        check_graph_budget(self)
        if self.random < 0:
            raise fail(f"--random must be at least 0, got {self.random}")
        if self.queue < 1:
            raise fail(f"--queue must be at least 1, got {self.queue}")

    @property
    def loopback(self) -> bool:
        """Whether --host is a loopback address (only this machine can reach the server)."""
        host = self.host.strip().strip("[]")
        if host.lower() in LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False
