"""The package's imports form no cycle: no module imports, even inside a function, one that imports it
back (README, Development)."""

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
