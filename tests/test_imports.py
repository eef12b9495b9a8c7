"""The package's imports form no cycle: no module imports, even inside a function, one that imports it
back (README, Development); and they go one way, down the subpackage layers (LAYERS)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "tccli"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> nx.DiGraph:
    """module -> the tccli modules it imports anywhere in its text (``from tccli.x import y`` counts as
    tccli.x.y where that is a module, else as tccli.x)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("tccli"):
                submodules = [f"{node.module}.{alias.name}" for alias in node.names]
                targets = [t for t in submodules if t in modules] or [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph.add_edges_from((name, t) for t in targets if t in modules and t not in (name, "tccli"))
    return graph


def test_the_import_graph_sees_function_level_imports():
    graph = import_graph()
    assert graph.has_edge("tccli.data.cache_shards", "tccli.runtime.distributed")  # at the top of cache_shards.py
    assert graph.has_edge("tccli.graph.files", "tccli.circuit.files")  # inside render()
    assert graph.has_edge("tccli.transcoders.formats", "tccli.transcoders.formats.circuit_tracer")


def test_no_import_cycles():
    assert list(nx.simple_cycles(import_graph())) == []


# tccli's subpackages (and its top-level modules), lowest first, as README's Development section lists them: a
# module may import from its own layer or a lower one, never a higher one. Errors and settings at the bottom
# (torch-free; so they import nothing else of tccli), node names just above them; then the runtime plumbing and
# the model; data and transcoder files on top of the model; training and feature scoring side by side; the
# replacement model, the circuit search, attribution graphs and the evaluations built on them; the Python API
# over all of them, beside tccli/__init__.py that exports it; the CLI on top (so nothing outside it but
# tccli.__main__ imports it).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("config",),
    ("nodes",),
    ("runtime",),
    ("model",),
    ("data",),
    ("transcoders",),
    ("training", "features"),
    ("replacement",),
    ("circuit",),
    ("graph",),
    ("view",),
    ("evaluation",),
    ("serve",),
    ("api", "__init__"),
    ("cli",),
    ("__main__",),
)
LAYER_OF = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def layer_part(module: str) -> str:
    """The subpackage (or top-level module) of tccli that ``module`` belongs to: tccli.circuit.files -> circuit;
    tccli itself -> __init__."""
    return module.split(".")[1] if "." in module else "__init__"


def test_every_subpackage_has_one_layer():
    parts = {layer_part(module) for module in import_graph()}
    declared = [part for parts_of_layer in LAYERS for part in parts_of_layer]
    assert len(declared) == len(set(declared)), "a subpackage is declared in two layers"
    assert parts == set(declared), (
        f"undeclared in LAYERS: {sorted(parts - set(declared))}; "
        f"declared but absent from tccli: {sorted(set(declared) - parts)}"
    )


def test_imports_go_down_the_layers():
    """Every import edge, function-level imports included, goes to the importer's layer or a lower one."""
    upward = sorted(
        (source, target)
        for source, target in import_graph().edges
        if LAYER_OF[layer_part(source)] < LAYER_OF[layer_part(target)]
    )
    assert upward == [], "imports from a lower layer into a higher one:\n" + "\n".join(
        f"  {source} ({layer_part(source)}, layer {LAYER_OF[layer_part(source)]}) imports "
        f"{target} ({layer_part(target)}, layer {LAYER_OF[layer_part(target)]})"
        for source, target in upward
    )
