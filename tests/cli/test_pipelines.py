"""Subcommands chained by pipes: `-` reads a graph (or prompts, features, an eval result) from stdin, `--out -`
writes to stdout, and a reader that goes away ends the writer quietly.

The pipelines run as real processes in bash (marked ``process``), each compared with the same command
reading the file; the refusals run in this process (no start-up cost).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

from conftest import Pipe
from tccli.circuit.files import to_json
from tccli.circuit.neuronpedia import to_neuronpedia
from tccli.errors import TcError

PROMPT = "The cat sat on the mat"
TC = f"{shlex.quote(sys.executable)} -m tccli"


def bash(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``script`` under bash with ``pipefail``, one torch thread per `tc`; its stdout and stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("TC_DEBUG", None)
    return subprocess.run(
        ["bash", "-c", "set -o pipefail\n" + script], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


@pytest.fixture(scope="module")
def traced(tiny_model_dirs, random_transcoder_folder) -> dict[str, str]:
    """The flags of `tc circuit` and `tc graph` on the tiny GPT-2 with random transcoders."""
    common = ["--model", str(tiny_model_dirs["gpt2"]), "--transcoders", str(random_transcoder_folder("gpt2"))]
    common += ["--prompt", PROMPT, "--device", "cpu", "--quiet"]
    return {
        "circuit": shlex.join(["circuit", *common, "--feature", "L1.F3", "--format", "json"]),
        "graph": shlex.join(["graph", *common, "--max-feature-nodes", "40"]),
    }


# ============================================================================ pipelines through real processes


@pytest.mark.process
def test_tc_circuit_into_tc_export(traced, tmp_path):
    fmt = "svg" if shutil.which("dot") else "dot"  # svg needs Graphviz
    result = bash(
        f"{TC} {traced['circuit']} | tee c.json | {TC} export - --format {fmt} > piped.{fmt}\n"
        f"{TC} export c.json --format {fmt} > file.{fmt}",
        tmp_path,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    piped = (tmp_path / f"piped.{fmt}").read_text()
    assert piped == (tmp_path / f"file.{fmt}").read_text() and ("<svg" if fmt == "svg" else "->") in piped


@pytest.mark.process
def test_tc_graph_into_tc_validate(traced, tmp_path):
    result = bash(
        f"{TC} {traced['graph']} | tee g.json | {TC} validate - --random 0 --json > piped.json 2> piped.err\n"
        f"{TC} validate g.json --random 0 --json > file.json 2> file.err",
        tmp_path,
    )
    assert result.returncode == 0, (tmp_path / "piped.err").read_text() + (tmp_path / "file.err").read_text()
    piped, direct = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("piped", "file"))
    assert piped.pop("graph") == "stdin" and direct.pop("graph") == "g.json"
    assert piped == direct and piped["circuit_size"]["feature"] > 0
    # the summary on stderr names the graph stdin, and is otherwise the same
    summary = (tmp_path / "piped.err").read_text()
    assert summary.startswith("tc validate: stdin over 1 prompt(s)")
    assert summary.replace("stdin", "g.json", 1) == (tmp_path / "file.err").read_text()


@pytest.mark.process
def test_tc_graph_into_tc_info(traced, tmp_path):
    result = bash(
        f"{TC} {traced['graph']} | tee g.json | {TC} info - > piped.txt\n{TC} info g.json > file.txt", tmp_path
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    piped = (tmp_path / "piped.txt").read_text()
    assert piped.startswith("stdin: tc attribution graph (pruned), ")
    assert piped.replace("stdin", "g.json", 1) == (tmp_path / "file.txt").read_text()


def big_graph_file(path: Path, n_nodes: int = 20_000) -> Path:
    """A tc graph JSON of a few MB (far more than a pipe holds), made without a model."""
    graph = nx.DiGraph(metadata={"scan": "test-set", "n_layers": 2})
    graph.add_node("target", kind="target", layer=2, position=1)
    for i in range(n_nodes):
        graph.add_node(f"mlp0.f{i}@1", kind="feature", layer=0, position=1, feature=i, activation=1.0)
        graph.add_edge(f"mlp0.f{i}@1", "target", weight=1.0 / (i + 1))
    path.write_text(to_json(graph))
    return path


@pytest.mark.process
def test_a_reader_that_goes_away_ends_tc_quietly(tmp_path):
    big = big_graph_file(tmp_path / "big.json")
    result = bash(
        f"{TC} export big.json --format json 2> err.txt | head -c 10 > head.txt; echo ${{PIPESTATUS[0]}} > status",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "err.txt").read_text() == ""  # no traceback, no "Exception ignored", no message
    assert (tmp_path / "head.txt").read_bytes() == big.read_bytes()[:10]  # export json of a tc graph: the same
    assert int((tmp_path / "status").read_text()) == 141  # 128 + SIGPIPE, as any Unix tool cut off by head
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.json", "err.txt", "head.txt", "status"]


@pytest.mark.process
def test_hdf5_on_stdin_is_refused_in_one_line(tmp_path):
    import h5py

    with h5py.File(tmp_path / "acts.h5", "w") as f:
        f.attrs["format"] = "tc-activation-cache"
    with (tmp_path / "acts.h5").open("rb") as stdin:
        result = subprocess.run(
            [sys.executable, "-m", "tccli", "info", "-"], stdin=stdin, capture_output=True, text=True, timeout=600
        )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "tc: error: an HDF5 file cannot be read from stdin: HDF5 is read by seeking in a file, which a pipe cannot "
        "do; pass its path instead"
    ]


# ============================================================================ in this process


def tc_in_process(capsysbinary, monkeypatch, stdin: bytes, *args: str) -> tuple[int, bytes, str]:
    """`tc ARGS` run in this process with ``stdin`` piped in: (exit code, stdout, stderr)."""
    from tccli.cli.app import main

    monkeypatch.setattr("sys.stdin", Pipe(stdin))
    capsysbinary.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsysbinary.readouterr()
    return code, captured.out, captured.err.decode()


@pytest.fixture()
def small_graph(tmp_path) -> Path:
    return big_graph_file(tmp_path / "g.json", n_nodes=3)


def test_export_reads_stdin_and_writes_stdout_for_out_dash(small_graph, tmp_path, capsysbinary, monkeypatch):
    text = small_graph.read_bytes()
    for fmt in ("json", "dot", "graphml", "neuronpedia"):
        code, from_file, err = tc_in_process(
            capsysbinary, monkeypatch, b"", "export", str(small_graph), "--format", fmt
        )
        assert code == 0 and from_file, err
        code, piped, err = tc_in_process(capsysbinary, monkeypatch, text, "export", "-", "--format", fmt, "--out", "-")
        assert (code, err) == (0, "") and piped == from_file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.json"]  # `--out -` is no file
    out = tmp_path / "copy.json"
    code, printed, err = tc_in_process(
        capsysbinary, monkeypatch, text, "export", "-", "--format", "json", "--out", str(out)
    )
    assert (code, printed, err) == (0, b"", "") and out.read_bytes() == text  # a tc graph's JSON export is itself


@pytest.mark.parametrize(
    "stdin,args,message",
    [
        (
            b"",
            ("export", "-"),
            "stdin is empty, not a tc graph (JSON written by tc circuit or tc graph --format json) ",
        ),
        ("neuronpedia", ("export", "-"), "stdin holds Neuronpedia's graph JSON (tc export --format neuronpedia)"),
        (b"\x89HDF\r\n\x1a\n" + bytes(64), ("show", "-", "L0.F1"), "an HDF5 file cannot be read from stdin"),
        (b"x", ("validate", "-", "--prompts", "-"), "stdin holds one input, but GRAPH and --prompts each say -"),
        (b"", ("cache", "--data", "x.txt", "--out", "-"), "an activation cache cannot be written to stdout"),
        (b"", ("train", "--cache", "-", "--out", "tcs"), "an activation cache cannot be read from stdin: HDF5"),
        (b"", ("circuit", "--transcoders", "t", "--prompt", "p", "--direction", "-", "--layer", "0"), "--direction"),
        (b"", ("validate", "g.json", "--out", "-", "--json"), "--out - and --json would both write to stdout"),
        (b"", ("show", "f.jsonl", "L0.F1", "--html", "-"), "--html - writes the page to stdout, where FEATURE"),
    ],
    ids=[
        "empty",
        "neuronpedia",
        "hdf5-features",
        "two-inputs",
        "cache-out",
        "train-cache",
        "direction",
        "validate-out-and-json",
        "html-and-feature",
    ],
)
def test_what_cannot_go_through_a_pipe_is_refused_in_one_line(
    stdin, args, message, small_graph, tmp_path, capsysbinary, monkeypatch
):
    from tccli.circuit.files import read_graph

    monkeypatch.chdir(tmp_path)
    if stdin == "neuronpedia":
        stdin = to_neuronpedia(read_graph(small_graph)).encode()
    code, out, err = tc_in_process(capsysbinary, monkeypatch, stdin, *args)
    assert code == 2 and out == b""
    assert len(err.splitlines()) == 1 and err.startswith("tc: error: ") and message in err, err


def test_read_prompts_from_stdin(tmp_path, pipe_into_stdin):
    from tccli.evaluation.validation import read_prompts

    (tmp_path / "p.txt").write_text("The war lasted\n\nThe cat sat\n")
    pipe_into_stdin((tmp_path / "p.txt").read_bytes())
    assert read_prompts("-") == read_prompts(str(tmp_path / "p.txt")) == ["The war lasted", "The cat sat"]
    pipe_into_stdin(b"\x89HDF\r\n\x1a\n" + bytes(64))
    with pytest.raises(TcError, match="an HDF5 file cannot be read from stdin"):
        read_prompts("-")
