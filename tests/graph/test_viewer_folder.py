"""A folder circuit-tracer's local viewer opens (`tc graph --format neuronpedia --out DIR/` and `tc score
--format neuronpedia-features --out DIR/`), as users run the commands, read back with the viewer's own
rules (tests/viewer_rules.py): graph-metadata.json lists every graph written into the folder, and every
feature node of every graph finds its own feature's file from the graph's scan, layer and index."""

from __future__ import annotations

import json

import pytest

from conftest import TOKENIZER_TEXT, run_tc
from viewer_rules import feature_lookups, feature_url, listed_graphs, node_feature, served_file, viewer_unpair

PROMPTS = ("The cat sat on the mat", "Once upon a time there was a dog")
LOCAL_SCAN = "./data/features/local"  # the scan whose files circuit-tracer's local viewer loads from DIR


@pytest.fixture(scope="module")
def viewer(tiny_model_dirs, random_transcoder_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(f"Story {i}. " + TOKENIZER_TEXT[i % 4] for i in range(20)) + "\n")
    setup = dict(
        model=str(tiny_model_dirs["gpt2"]),
        transcoders=str(random_transcoder_folder("gpt2", bias_shift=-0.1)),
        folder=root / "viewer",
        corpus=corpus,
    )
    # the first graph and its feature files under the set's own id; the second under a scan the local
    # viewer finds in the folder
    assert graph(setup, PROMPTS[0]).returncode == 0
    result = graph(setup, PROMPTS[1], "--scan", LOCAL_SCAN, "--slug", "second")
    assert result.returncode == 0, result.stderr
    for scan in ((), ("--scan", LOCAL_SCAN)):
        result = score(setup, *scan)
        assert result.returncode == 0, result.stderr
    return setup


def graph(setup, prompt, *args):
    return run_tc(
        "graph",
        "--model",
        setup["model"],
        "--transcoders",
        setup["transcoders"],
        "--prompt",
        prompt,
        "--max-feature-nodes",
        "30",
        "--format",
        "neuronpedia",
        "--out",
        f"{setup['folder']}/",
        "--quiet",
        *args,
    )


def score(setup, *args):
    return run_tc(
        "score",
        "--model",
        setup["model"],
        "--transcoders",
        setup["transcoders"],
        "--data",
        str(setup["corpus"]),
        "--tokens",
        "300",
        "--context",
        "16",
        "--top",
        "3",
        "--quantiles",
        "2",
        "--per-quantile",
        "1",
        "--context-window",
        "2",
        "--format",
        "neuronpedia-features",
        "--out",
        f"{setup['folder']}/",
        "--quiet",
        *args,
    )


def test_every_feature_node_finds_its_own_feature_file(viewer):
    folder = viewer["folder"]
    graphs = listed_graphs(folder)
    assert len(graphs) == 2 and "second" in graphs
    scans = sorted(document["metadata"]["scan"] for document in graphs.values())
    assert scans[0] == LOCAL_SCAN and scans[1].startswith("tc-")  # the set's own id: not its model, not a path
    for document in graphs.values():
        scan = document["metadata"]["scan"]
        lookups = feature_lookups(document)
        assert lookups, "a graph without feature nodes checks nothing"
        for node, feature_index in lookups:
            layer, index = viewer_unpair(feature_index)
            assert (layer, index) == node_feature(node)
            file = served_file(folder, feature_url(scan, feature_index))
            data = json.loads(file.read_text())
            assert (data["layer"], data["feature"]) == (layer, index)
            assert data["examples_quantiles"][0]["quantile_name"] == "Top activations"
    # every feature of the set has its file, under each scan
    default = next(s for s in scans if s.startswith("tc-"))
    for scan_folder in (folder / "features" / default, folder / "features" / "local"):
        assert len(list(scan_folder.glob("*.json"))) == 2 * 48  # tiny gpt2: 2 layers of 48 features


def test_the_list_holds_each_graphs_metadata(viewer):
    folder = viewer["folder"]
    listing = json.loads((folder / "graph-metadata.json").read_text())["graphs"]
    for entry in listing:
        metadata = json.loads((folder / f"{entry['slug']}.json").read_text())["metadata"]
        assert entry == {key: value for key, value in metadata.items() if key != "tc"}
        assert entry["schema_version"] == 1 and entry["node_threshold"] == 0.8
    assert sorted(entry["prompt"] for entry in listing) == sorted(PROMPTS)


def test_writing_again(viewer):
    folder = viewer["folder"]
    index = folder / "graph-metadata.json"
    listing = index.read_text()
    again = graph(viewer, PROMPTS[1], "--scan", LOCAL_SCAN, "--slug", "second")
    assert again.returncode != 0 and again.stderr.startswith("tc: error:") and "--force" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert index.read_text() == listing
    rescored = score(viewer, "--scan", LOCAL_SCAN)
    assert rescored.returncode != 0 and "already exists; pass --force" in rescored.stderr
    assert graph(viewer, PROMPTS[1], "--scan", LOCAL_SCAN, "--slug", "second", "--force").returncode == 0
    slugs = [[entry["slug"] for entry in json.loads(text)["graphs"]] for text in (listing, index.read_text())]
    assert sorted(slugs[1]) == sorted(slugs[0]) and len(slugs[1]) == 2  # replaced, not listed twice
    assert not [p.name for p in folder.iterdir() if p.name.endswith((".lock", ".tmp", ".old"))]


def test_a_list_tc_cannot_update_stops_the_run_before_any_work(viewer, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "graph-metadata.json").write_text("not json")
    result = graph(dict(viewer, folder=bad), PROMPTS[0])
    assert result.returncode != 0 and "graph-metadata.json" in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [result.stderr.strip()]
    assert result.stderr.startswith("tc: error:")
    assert (bad / "graph-metadata.json").read_text() == "not json"
    assert sorted(p.name for p in bad.iterdir()) == ["graph-metadata.json"]


def test_folder_options():
    from tccli.config.features import ScoreConfig
    from tccli.config.graph import GraphConfig
    from tccli.errors import TcError

    def graph_config(**kwargs):
        GraphConfig(transcoders="t", prompt="p", **kwargs).validate()

    def score_config(**kwargs):
        ScoreConfig(transcoders="t", data=["d"], **kwargs).validate()

    graph_config(out="DIR/", format="neuronpedia", scan="./data/features/x", slug="my.graph_1")
    score_config(out="DIR/", format="neuronpedia-features", scan="org/repo")
    for make, kwargs, message in (
        (graph_config, dict(out="DIR/"), "only --format neuronpedia"),
        (graph_config, dict(slug="../up"), "--slug must be"),
        (graph_config, dict(scan="has space"), "--scan must be"),
        (score_config, dict(out="x.h5", format="neuronpedia-features"), "writes into a folder"),
        (score_config, dict(out="x.h5", scan="s"), "--scan names the feature files"),
        (score_config, dict(out="x.jsonl", format="h5"), "--out must end in .h5"),
        (score_config, dict(out="DIR/", format="csv"), "--format must be one of"),
    ):
        with pytest.raises(TcError, match=message):
            make(**kwargs)
