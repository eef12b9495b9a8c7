"""tccli.runtime.inputs: `-` as standard input, read once, named by its content, refused in one line."""

from __future__ import annotations

import io
import json

import networkx as nx
import numpy as np
import pytest

from tccli.errors import TcError
from tccli.runtime import inputs


class FakeStdin:
    """What sys.stdin offers the helper: a byte buffer, isatty, closed; counts the reads."""

    def __init__(self, data: bytes, terminal: bool = False):
        self.buffer = io.BytesIO(data)
        self.terminal = terminal
        self.closed = False
        self.reads = 0
        read = self.buffer.read

        def counted(*args):
            self.reads += 1
            return read(*args)

        self.buffer.read = counted  # type: ignore[method-assign]

    def isatty(self) -> bool:
        return self.terminal


@pytest.fixture(autouse=True)
def fresh_stdin():
    inputs.forget_stdin()
    yield
    inputs.forget_stdin()


def feed(monkeypatch, data: bytes, terminal: bool = False) -> FakeStdin:
    stdin = FakeStdin(data, terminal)
    monkeypatch.setattr("sys.stdin", stdin)
    return stdin


def tc_graph_json() -> bytes:
    from tccli.circuit.files import to_json

    graph = nx.DiGraph()
    graph.add_node("a", kind="feature")
    graph.add_node("target", kind="target")
    graph.add_edge("a", "target", weight=0.5)
    return to_json(graph).encode()


def npy_bytes() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ones(3))
    return buffer.getvalue()


def test_sniff_names_the_content_never_a_name():
    features = b'{"format": "tc-features", "format_version": 1}\n{"layer": 0, "feature": 0}\n'
    neuronpedia = json.dumps({"metadata": {}, "qParams": {}, "nodes": [], "links": []}).encode()
    cases = {
        tc_graph_json(): "tc-circuit-graph",
        features: "tc-features",
        neuronpedia: inputs.NEURONPEDIA,
        b'{"layers": []}': "json",
        b'{"a": 1}\n{"a": 2}\n': "jsonl",
        b"The cat sat\nOn the mat\n": "text",
        b"{not json at all": "text",
        b"  \n": "empty",
        b"\x89HDF\r\n\x1a\n" + bytes(64): inputs.HDF5,
        npy_bytes(): "npy",
        b"PK\x03\x04" + bytes(16): "zip",
        b"\xff\xfe\x00binary": "binary",
    }
    assert {data: inputs.sniff(data) for data in cases} == cases


def test_stdin_is_read_once_and_kept(monkeypatch):
    stdin = feed(monkeypatch, b"some text")
    assert inputs.stdin_bytes("the graph") == b"some text"
    assert inputs.stdin_bytes("the graph") == b"some text"
    assert stdin.reads == 1
    inputs.forget_stdin()
    assert inputs.stdin_bytes("the graph") == b""  # read again: the pipe is drained
    assert stdin.reads == 2


def test_a_terminal_or_a_closed_stdin_is_refused_in_one_line(monkeypatch):
    feed(monkeypatch, b"typed", terminal=True)
    with pytest.raises(TcError, match="- reads the graph from stdin, but stdin is a terminal: pipe it in"):
        inputs.stdin_bytes("the graph")
    assert inputs.stdin_bytes("the prompt", terminal=True) == b"typed"  # a prompt may be typed
    inputs.forget_stdin()
    monkeypatch.setattr("sys.stdin", None)  # `tc ... <&-`
    with pytest.raises(TcError, match="stdin is closed"):
        inputs.stdin_bytes("the graph")


def test_prompt_text_drops_one_trailing_newline(monkeypatch):
    assert inputs.prompt_text("a prompt") == "a prompt"
    feed(monkeypatch, "café au lait\n\n".encode(), terminal=True)
    assert inputs.prompt_text("-") == "café au lait\n"


def test_read_stdin_takes_only_the_expected_kinds(monkeypatch):
    feed(monkeypatch, tc_graph_json())
    assert inputs.read_stdin("a graph", ("tc-circuit-graph",)) == tc_graph_json()
    for data, message in (
        (b"", r"stdin is empty, not a graph \(did the command before the pipe fail\?\)"),
        (b"\x89HDF\r\n\x1a\n" + bytes(64), "an HDF5 file cannot be read from stdin: HDF5 is read by seeking"),
        (npy_bytes(), r"stdin holds a NumPy array \(.npy\), not a graph"),
        (b"hello\n", "stdin holds plain text, not a graph"),
    ):
        inputs.forget_stdin()
        feed(monkeypatch, data)
        with pytest.raises(TcError, match=message):
            inputs.read_stdin("a graph", ("tc-circuit-graph",))


def test_one_stdin_and_refuse_stdin():
    inputs.one_stdin(GRAPH="-", prompts="p.txt", features=None, data=["a.txt"])
    with pytest.raises(TcError, match="stdin holds one input, but GRAPH and --prompts each say -"):
        inputs.one_stdin(GRAPH="-", **{"--prompts": "-"})
    with pytest.raises(TcError, match="--data and --data each say -"):
        inputs.one_stdin(**{"--data": ["-", "b.txt", "-"]})
    inputs.refuse_stdin("d.npy", "--direction", "why")
    with pytest.raises(TcError, match=r"--direction cannot be read from stdin \(why\); pass its path"):
        inputs.refuse_stdin("-", "--direction", "why")
    assert inputs.display_name("-") == "stdin" and inputs.display_name("g.json") == "g.json"
