"""Pictures of circuit graphs: the layout, DOT for Graphviz, and the SVG tc writes without Graphviz."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET

import networkx as nx
import pytest

from circuit_helpers import small_circuit_graph
from tccli.circuit import files as circuit_files
from tccli.circuit import picture
from tccli.config.circuit import PictureOptions
from tccli.errors import TcError


@pytest.fixture()
def graph() -> nx.DiGraph:
    return small_circuit_graph()


def render_svg(text: str) -> bytes:
    return subprocess.run(["dot", "-Tsvg"], input=text.encode(), capture_output=True, check=True).stdout


def test_dot_is_valid_graphviz(graph):
    text = picture.to_dot(graph)
    assert text.startswith("digraph circuit {") and text.rstrip().endswith("}")
    assert '"mlp0.f1@1" -> "target"' in text and "layout=neato" in text
    assert 'label="\\"say \\\\\\"hi\\\\\\"\\"\\n1"' in text  # the column's token: quotes survive two escapings
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed; the DOT text was checked, not rendered")
    svg = render_svg(text)
    assert b"<svg" in svg and b"mlp0.f1@1" in svg and b"L0.F1" in svg


def test_dot_edge_style_by_weight_and_sign(graph):
    graph.add_edge("err0@1", "mlp0.f1@1", weight=-3.0)
    lines = {line.split(" [")[0].strip(): line for line in picture.to_dot(graph).splitlines() if "->" in line}
    assert 'color="#c0392b"' in lines['"err0@1" -> "mlp0.f1@1"']  # negative: red
    assert 'color="#1f5fbf"' in lines['"mlp0.f1@1" -> "target"']
    assert "penwidth=5.00" in lines['"mlp0.f1@1" -> "target"']  # the largest |weight| is widest


def test_dot_thresholds_hide_small_edges_and_label_at_3_significant_figures(graph):
    # target value 13: --min-edge 0.01 hides |weight| < 0.13, --min-edge-label 0.05 labels >= 0.65
    graph.add_node("err0@0", kind="error", layer=0, position=0, token="<bos>", path_contribution=0.0001)
    graph.add_edge("err0@0", "mlp0.f0@1", weight=0.0001)
    graph.edges["mlp0.f1@1", "target"]["weight"] = 6.123456
    text = picture.to_dot(graph)
    edges = {line.split(" [")[0].strip(): line for line in text.splitlines() if "->" in line}
    assert '"err0@0" -> "mlp0.f0@1"' not in edges and '"err0@0" [' not in text  # edge and its node hidden
    assert 'label="6.12"' in edges['"mlp0.f1@1" -> "target"']
    assert "label=" not in edges['"err0@1" -> "target"']  # 0.5 < 0.65: drawn, not labelled
    assert "not drawn: 1 edges below 0.01 x |target| and 1 nodes left without an edge" in text
    everything = picture.to_dot(graph, PictureOptions(min_edge=0.0, min_edge_label=0.0))
    assert '"err0@0" -> "mlp0.f0@1"' in everything and 'label="0.0001"' in everything
    with pytest.raises(TcError, match="--min-edge must be a fraction >= 0"):
        PictureOptions(min_edge=float("nan")).validate()


def test_dense_graphs_get_straight_edges_and_at_most_40_labels():
    nodes = {"target": ("target", 1, 2, -1), **{f"f{i}": ("feature", 0, i % 3, i) for i in range(130)}}
    graph = grid_graph(nodes)
    graph.nodes["target"]["activation"] = 1.0
    for i in range(130):
        graph.add_edge(f"f{i}", "target", weight=1.0 + i / 100)
    text = picture.to_dot(graph)
    labels = [line for line in text.splitlines() if "->" in line and "label=" in line]
    assert "splines=false" in text and len(labels) == picture.MAX_EDGE_LABELS
    assert any('"f129" -> "target"' in line for line in labels)  # the largest weights are the ones written
    assert not any('"f0" -> "target"' in line for line in labels)
    small = grid_graph({"target": ("target", 1, 2, -1), "f0": ("feature", 0, 1, 0)})
    small.add_edge("f0", "target", weight=1.0)
    assert "splines=curved" in picture.to_dot(small)


def grid_graph(names: dict) -> nx.DiGraph:
    """A graph of the given nodes (name -> (kind, layer, position, index)) and 3 tokens."""
    graph = nx.DiGraph()
    for name, (kind, layer, position, index) in names.items():
        graph.add_node(
            name,
            kind=kind,
            layer=layer,
            position=position,
            token=f"t{position}",
            feature=index if kind == "feature" else None,
            head=index if kind == "head" else None,
            path_contribution=1.0,
        )
    graph.graph["metadata"] = {"tokens": ["<bos>", " a", " b"]}
    return graph


def test_grid_layout_rows_by_layer_columns_by_position():
    nodes = {
        "target": ("target", 2, 2, -1),
        "embed@1": ("embed", -1, 1, -1),
        "embed@2": ("embed", -1, 2, -1),
        "attn0.h1@1": ("head", 0, 1, 1),
        "mlp0.f3@2": ("feature", 0, 2, 3),
        "mlp1.f4@2": ("feature", 1, 2, 4),
        "mlp1.f5@2": ("feature", 1, 2, 5),
        "err1@2": ("error", 1, 2, -1),
        "attn1.h0@0": ("head", 1, 0, 0),
    }
    layout = picture.grid_layout(grid_graph(nodes))
    x = {n: p[0] for n, p in layout.positions.items()}
    y = {n: p[1] for n, p in layout.positions.items()}
    # rows: embeddings < layer 0 attention < layer 0 MLP < layer 1 attention < layer 1 MLP < target
    assert (
        y["embed@1"] == y["embed@2"] < y["attn0.h1@1"] < y["mlp0.f3@2"] < y["attn1.h0@0"] < y["mlp1.f4@2"] < y["target"]
    )
    assert y["mlp1.f4@2"] == y["mlp1.f5@2"] == y["err1@2"]  # one cell, side by side
    # columns: position 0 < 1 < 2, the token written under each
    assert x["attn1.h0@0"] < x["embed@1"] == x["attn0.h1@1"] < x["embed@2"] == x["mlp0.f3@2"] == x["target"]
    assert [(p, t) for p, _, t in layout.columns] == [(0, "<bos>"), (1, " a"), (2, " b")]
    assert [name for name, _ in layout.rows] == ["embed", "L0 attn", "L0 MLP", "L1 attn", "L1 MLP", "target"]
    cell = sorted(["mlp1.f4@2", "mlp1.f5@2", "err1@2"], key=lambda n: x[n])
    assert cell[-1] == "err1@2"  # errors last in a cell
    assert all(x[b] - x[a] >= layout.widths[a] for a, b in zip(cell, cell[1:]))  # no overlap
    assert sum(x[n] for n in cell) / 3 == pytest.approx(x["mlp0.f3@2"])  # centred on the column


def test_grid_layout_depends_on_attributes_only():
    """Renaming nodes moves nothing: `tc graph` lays out its own graphs with the same function."""
    nodes = {"a": ("feature", 0, 1, 7), "b": ("feature", 0, 1, 8), "c": ("head", 1, 0, 2), "t": ("target", 2, 1, -1)}
    first = picture.grid_layout(grid_graph(nodes))
    renamed = grid_graph({f"node {name}": spec for name, spec in nodes.items()})
    second = picture.grid_layout(renamed)
    assert {f"node {n}": p for n, p in first.positions.items()} == second.positions
    crowded = grid_graph(
        {**{f"f{i}": ("feature", 0, 1, i) for i in range(picture.PER_LINE + 1)}, "t": ("target", 1, 1, -1)}
    )
    lines = sorted({round(p[1], 6) for n, p in picture.grid_layout(crowded).positions.items() if n != "t"})
    assert len(lines) == 2  # more than PER_LINE nodes in one cell wrap onto a second line


def svg_tree(text: str) -> ET.Element:
    """The SVG parsed as XML: a writer's stray '<' or '&' fails here."""
    return ET.fromstring(text)


SVG = "{http://www.w3.org/2000/svg}"


def test_svg_without_graphviz_draws_the_plan(graph):
    """tc's own SVG draws exactly the nodes and edges the DOT picture draws, at the same positions."""
    graph.add_node("err0@0", kind="error", layer=0, position=0, token="<bos>", path_contribution=0.0001)
    graph.add_edge("err0@0", "mlp0.f0@1", weight=0.0001)  # below --min-edge: neither drawn
    plan = picture.picture_plan(graph)
    root = svg_tree(picture.to_svg(graph))
    node_groups = {g.get("id"): g for g in root.iter(f"{SVG}g") if g.get("class") == "node"}
    assert set(node_groups) == set(plan.nodes) and "err0@0" not in node_groups
    edge_titles = [g.find(f"{SVG}title").text for g in root.iter(f"{SVG}g") if g.get("class") == "edge"]
    assert sorted(t.split(":")[0] for t in edge_titles) == sorted(f"{u} -> {v}" for u, v, _ in plan.edges)
    # the boxes keep the layout's order: centres in the same left-to-right and bottom-to-top order
    centres = {}
    for node, group in node_groups.items():
        rect = group.find(f"{SVG}rect")
        centres[node] = (
            float(rect.get("x")) + float(rect.get("width")) / 2,
            float(rect.get("y")) + float(rect.get("height")) / 2,
        )
        assert group.find(f"{SVG}text").text == picture.short_label(graph.nodes[node])
    for a in plan.nodes:
        for b in plan.nodes:
            (xa, ya), (xb, yb) = plan.layout.positions[a], plan.layout.positions[b]
            assert (centres[a][0] - centres[b][0]) == pytest.approx((xa - xb) * picture.POINTS, abs=0.2)
            assert (centres[a][1] - centres[b][1]) == pytest.approx(-(ya - yb) * picture.POINTS, abs=0.2)
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert '"say \\"hi\\""' in texts  # the column's token, escaped once for XML and still readable
    assert any(t.startswith("not drawn: 1 edges below") for t in texts)


def test_draw_falls_back_to_own_svg_and_says_so(graph, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    said = []
    svg = circuit_files.render(graph, "svg", log=said.append)
    assert svg == picture.to_svg(graph).encode() and len(said) == 1 and "Graphviz" in said[0]
    with pytest.raises(TcError, match="Graphviz's `dot` program"):
        circuit_files.render(graph, "png", log=said.append)  # PNG has no fallback
