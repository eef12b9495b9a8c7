"""tc: transcoder circuits, from the command line (`tc`) and from Python (``import tccli``).

The Python API (``tccli.api``) is one function per command: ``load_model``, ``load_transcoders``,
``cache_activations``, ``train``, ``evaluate``, ``score_features``, ``attribution_graph``, ``circuit_graph``,
``intervene``, ``replacement_model``, ``greater_than``, ``validate_circuit``. They are imported on first use
(PEP 562), so ``import tccli`` and the CLI's start-up import no torch.

Layering: pure math (``replacement``, ``graph``, ``circuit``, ``training`` kernels) takes tensors and returns
tensors or graphs; I/O (``data``, ``transcoders``, ``features`` files) reads and writes files; ``cli`` and
``api`` turn flags or keyword arguments into settings (``config``) and call the library.
"""

__version__ = "0.1.0"

__all__ = [
    "load_model",
    "load_transcoders",
    "cache_activations",
    "train",
    "evaluate",
    "score_features",
    "attribution_graph",
    "circuit_graph",
    "intervene",
    "replacement_model",
    "greater_than",
    "validate_circuit",
]


def __getattr__(name: str):
    """An API function, imported from ``tccli.api`` on first use and then kept here."""
    if name not in __all__:
        raise AttributeError(f"module 'tccli' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module("tccli.api"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
