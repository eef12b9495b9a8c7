"""tc info: caches, transcoders, unknown and damaged files; the extension point."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import run_tc
from tccli.cli import info
from tccli.errors import TcError


@pytest.fixture(scope="module")
def small_cache(tiny_model_dirs, tmp_path_factory) -> Path:
    from cache_helpers import cache_in_process
    from tccli.config.data import CacheConfig

    folder = tmp_path_factory.mktemp("info")
    data = folder / "text.txt"
    data.write_text("\n\n".join(f"Once upon a time {i} the cat sat on the mat." * 3 for i in range(40)))
    out = folder / "acts.h5"
    torch.set_num_threads(1)
    config = CacheConfig(
        model=str(tiny_model_dirs["llama"]),
        data=[str(data)],
        out=str(out),
        tokens=256,
        context=32,
        layers="1",
        dtype="bfloat16",
        device="cpu",
        quiet=True,
    )
    config.validate()
    cache_in_process(config)
    return out


def test_cache_summary_json_and_text(small_cache):
    result = run_tc("info", "--json", str(small_cache))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["kind"] == "activation-cache" and summary["complete"] is True
    assert summary["layers"] == [1] and summary["tokens_written"] == 256 and summary["context"] == 32
    assert summary["storage"] == "bfloat16-as-uint16" and summary["architecture"] == "LlamaForCausalLM"
    assert summary["activation_bytes"] == 256 * 32 * 2 * 2
    text = info.render(info.describe(small_cache))
    assert "complete" in text and "LlamaForCausalLM" in text and "bfloat16-as-uint16" in text


def test_incomplete_cache_says_so(small_cache, tmp_path):
    partial = tmp_path / "partial.h5"
    partial.write_bytes(small_cache.read_bytes())
    with h5py.File(partial, "r+") as f:
        f.attrs["complete"] = False
        f.attrs["tokens_written"] = 64
    summary = info.describe(partial)
    assert summary["complete"] is False and summary["tokens_written"] == 64
    assert "INCOMPLETE (64 of 256 tokens" in info.render(summary)


def test_transcoder_folder_and_set(tmp_path):
    from tccli.config.transcoders import TranscoderConfig
    from tccli.transcoders.files import layer_folder_name, save_transcoder
    from tccli.transcoders.transcoder import Transcoder

    for layer in (0, 2):
        config = TranscoderConfig(d_in=8, d_out=8, n_features=32, layer=layer, model_name="m")
        save_transcoder(Transcoder(config), tmp_path / "set" / layer_folder_name(layer))
    summary = info.describe(tmp_path / "set")
    assert summary["kind"] == "transcoder" and summary["set"] is True and summary["layers"] == [0, 2]
    assert summary["transcoders"][1]["n_features"] == 32
    single = info.describe(tmp_path / "set" / "layer_2")
    assert single["set"] is False and single["layers"] == [2]
    assert "layer 2: transcoder (relu) 8 -> 32 features -> 8" in info.render(single)


def test_bad_paths_give_one_line(tmp_path):
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(4)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    for path, fragment in [
        (tmp_path / "missing.h5", "does not exist"),
        (corrupt, "not a readable HDF5"),
        (foreign, "not a tc activation cache"),
        (other, "not something tc knows"),
    ]:
        result = run_tc("info", str(path))
        assert result.returncode == 2
        assert result.stderr.startswith("tc: error: ") and fragment in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_registered_kinds_extend_tc_info(tmp_path):
    path = tmp_path / "graph.json"
    path.write_text(json.dumps({"format": "test-graph", "nodes": [1, 2, 3]}))

    def detect(p: Path) -> bool:
        return p.suffix == ".json" and json.loads(p.read_text()).get("format") == "test-graph"

    info.register_kind(
        "test-graph",
        detect,
        lambda p: {"kind": "test-graph", "path": str(p), "nodes": 3},
        lambda s: [f"graph with {s['nodes']} nodes"],
    )
    try:
        summary = info.describe(path)
        assert summary == {"kind": "test-graph", "path": str(path), "nodes": 3}
        assert info.render(summary) == "graph with 3 nodes"
        with pytest.raises(TcError, match="not something tc knows"):
            info.describe(_plain_file(tmp_path))  # JSON that no kind claims
    finally:
        info.KINDS[:] = [k for k in info.KINDS if k.name != "test-graph"]


def _plain_file(folder: Path) -> Path:
    path = folder / "plain.json"
    path.write_text("{}")
    return path


def test_info_reads_what_convert_writes_and_names_the_model_given(artefacts):
    result = run_tc("info", str(artefacts.saelens))  # SAELens folders written by tc convert
    assert result.returncode == 0, result.stderr
    assert "set of 2 transcoders" in result.stdout and "layer 1: transcoder (topk k=" in result.stdout
    result = run_tc("info", str(artefacts.saelens / "layer_0"))
    assert result.returncode == 0 and "layer 0: transcoder" in result.stdout, result.stderr
    summary = json.loads(run_tc("info", "--json", str(artefacts.cache)).stdout)
    # the name the user gave (no --model: the built-in model) and where it was loaded from
    assert summary["model"] == "builtin" and summary["model_path"].endswith("tccli/builtin/model")
