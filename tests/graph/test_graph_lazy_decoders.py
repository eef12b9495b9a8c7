"""`tc graph` and `tc circuit` on a cross-layer transcoder whose decoders stay on disk
(tccli.transcoders.lazy_decoders): the same graphs, bit for bit, as with every decoder in memory, while only the
decoder rows of the prompt's active features are read (docs/method.md section 11)."""

from __future__ import annotations

import json

import pytest
import torch

from circuit_helpers import random_clt
from conftest import run_tc
from tccli.circuit import files as circuit_files
from tccli.circuit.trace import circuit_graph
from tccli.config.circuit import CircuitConfig
from tccli.config.graph import GraphConfig
from tccli.graph import files as graph_files
from tccli.graph.trace import attribution_graph
from tccli.replacement.prompts import frozen_prompt
from tccli.transcoders import lazy_decoders
from tccli.transcoders.files import save_cross_layer
from tccli.transcoders.formats import load_transcoders
from tccli.transcoders.lazy_decoders import LazyCrossLayerTranscoder
from tccli.transcoders.set_id import sampled_rows, transcoder_set_id

PROMPT = "The cat sat on the mat"
GRAPH_OPTIONS = {"max_feature_nodes": 40, "max_logits": 3}
CIRCUIT_OPTIONS = {"logit": "1", "iters": 3, "branches": 8, "both_signs": True}


@pytest.fixture
def gpt2(tiny_models):
    return tiny_models["gpt2"]


@pytest.fixture
def clt_folder(random_clt_folder):
    return random_clt_folder("gpt2", off_diagonal=1.0)


def graph_config(folder, **kwargs) -> GraphConfig:
    made = GraphConfig(transcoders=str(folder), prompt=PROMPT, format="json", **GRAPH_OPTIONS, **kwargs)
    made.validate()
    return made


def circuit_config(folder, **kwargs) -> CircuitConfig:
    made = CircuitConfig(transcoders=str(folder), prompt=PROMPT, format="json", **CIRCUIT_OPTIONS, **kwargs)
    made.validate()
    return made


def without_timings(data: dict) -> dict:
    metadata = data["graph"]["metadata"]
    for key in [key for key in metadata if key.startswith("seconds")]:
        metadata.pop(key)
    return data


def graph_json(loaded, transcoders, config) -> dict:
    run = attribution_graph(loaded, transcoders, PROMPT, config)
    data = graph_files.render(run.graph, run.metadata, run.strings, run.tokens, "json", run.heads, config)
    return without_timings(json.loads(data))


def circuit_json(loaded, transcoders, config) -> dict:
    graph, _ = circuit_graph(loaded, transcoders, PROMPT, config)
    return without_timings(json.loads(circuit_files.render(graph, "json", config)))


def load(folder, loaded, lazy: bool):
    clt = load_transcoders(str(folder), loaded.device, lazy_decoders=lazy)
    assert isinstance(clt, LazyCrossLayerTranscoder) == lazy
    return clt


def test_graph_and_circuit_are_the_same_lazy_or_eager(gpt2, clt_folder, one_torch_thread):
    """Through the library with both loads, and through the commands (which load lazily) against the eager
    library run: the same JSON, every number bit for bit, the same scan id."""
    eager, lazy = load(clt_folder, gpt2, False), load(clt_folder, gpt2, True)
    graph = graph_json(gpt2, eager, graph_config(clt_folder))
    assert len(graph["nodes"]) > 20 and len(graph["links"]) > 20
    assert graph["graph"]["metadata"]["scan"].startswith("tc-")
    assert graph_json(gpt2, lazy, graph_config(clt_folder)) == graph
    circuit = circuit_json(gpt2, eager, circuit_config(clt_folder))
    assert len(circuit["nodes"]) > 5 and circuit["graph"]["metadata"]["scan"] == graph["graph"]["metadata"]["scan"]
    assert circuit_json(gpt2, lazy, circuit_config(clt_folder)) == circuit


def test_commands_load_lazily_and_match_the_eager_library(
    tiny_model_dirs, gpt2, clt_folder, monkeypatch, one_torch_thread
):
    """`tc graph` and `tc circuit` on a saved CLT: exactly the eager library run's JSON, while the CLT they
    load keeps its decoders on disk (a whole block read would fail here)."""
    model = str(tiny_model_dirs["gpt2"])
    eager = load(clt_folder, gpt2, False)
    graph = graph_json(gpt2, eager, graph_config(clt_folder, model=model))
    circuit = circuit_json(gpt2, eager, circuit_config(clt_folder, model=model))
    reads = forbid_whole_decoders(monkeypatch)
    common = ["--model", model, "--transcoders", str(clt_folder), "--prompt", PROMPT, "--format", "json", "--quiet"]
    result = run_tc("graph", *common, "--max-feature-nodes", "40", "--max-logits", "3")
    assert result.returncode == 0, result.stderr
    assert without_timings(json.loads(result.stdout)) == graph
    assert reads  # it loaded the CLT lazily and read decoder rows from disk
    reads.clear()
    result = run_tc("circuit", *common, "--logit", "1", "--iters", "3", "--branches", "8", "--both-signs")
    assert result.returncode == 0, result.stderr
    assert without_timings(json.loads(result.stdout)) == circuit
    assert reads


def forbid_whole_decoders(monkeypatch) -> list[tuple[int, list[int]]]:
    """Make every read of a whole decoder block or tensor of a lazy CLT fail; return the list that records
    each row read: (source layer, the features whose rows were read)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a whole decoder block was read")

    monkeypatch.setattr(LazyCrossLayerTranscoder, "decoder", refuse)
    monkeypatch.setattr(lazy_decoders.DiskDecoders, "__getitem__", refuse)
    monkeypatch.setattr(lazy_decoders.DiskDecoders, "block", refuse)
    reads: list[tuple[int, list[int]]] = []
    read_rows = lazy_decoders.DiskDecoders.rows

    def rows(self, layer, features):
        features = torch.as_tensor(features)
        assert features.ndim == 1
        reads.append((layer, features.tolist()))
        return read_rows(self, layer, features)

    monkeypatch.setattr(lazy_decoders.DiskDecoders, "rows", rows)
    return reads


@pytest.mark.parametrize("sparse", [False, True])
def test_the_lazy_path_reads_only_the_active_features_rows(gpt2, clt_folder, tmp_path, monkeypatch, sparse):
    """With the scan id given (so no fingerprint is taken), the graph and the circuit each read every layer's
    decoder rows once, of exactly the features active somewhere in the prompt, and no whole block: where most
    features are active (the dense layout of tccli.replacement.frozen) and where few are."""
    if sparse:
        clt_folder = save_cross_layer(random_clt(gpt2.info, 48, 0, bias_shift=-2.0), tmp_path / "clt")
    eager = load(clt_folder, gpt2, False)
    _, _, _, frozen = frozen_prompt(gpt2, eager, PROMPT, -1)
    active = [
        (layer, torch.nonzero((frozen.layers[layer].z != 0).any(0)).reshape(-1).tolist()) for layer in eager.layers
    ]
    assert all(features for _, features in active)
    counts = [len(features) for _, features in active]
    assert (
        all(2 * count < eager.n_features for count in counts)
        if sparse
        else any(eager.n_features > count > eager.n_features // 2 for count in counts)
    ), counts
    lazy = load(clt_folder, gpt2, True)
    reads = forbid_whole_decoders(monkeypatch)
    graph_json(gpt2, lazy, graph_config(clt_folder, scan="given"))
    assert reads == active
    reads.clear()
    circuit_json(gpt2, lazy, circuit_config(clt_folder, scan="given"))
    assert reads == active


def test_the_scan_id_reads_only_sampled_rows_and_is_the_eager_one(gpt2, tmp_path, monkeypatch):
    """A lazy CLT's fingerprint reads only the sampled decoder rows of each layer, and names the CLT as the
    eager load does."""
    folder = save_cross_layer(random_clt(gpt2.info, 200, 3), tmp_path / "clt")
    eager_id = transcoder_set_id(str(folder), load_transcoders(str(folder)))
    lazy = load_transcoders(str(folder), lazy_decoders=True)
    reads = forbid_whole_decoders(monkeypatch)
    assert transcoder_set_id(str(folder), lazy) == eager_id
    sample = sampled_rows(200).tolist()
    assert len(sample) < 200 and reads == [(layer, sample) for layer in lazy.layers]
