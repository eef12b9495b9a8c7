"""The Python API (``import tccli``): lazy exports that keep torch out of ``import tccli``, keyword arguments
that are the commands' settings, results equal to the library's, and the walkthrough notebook run end to end."""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tccli
from circuit_helpers import loaded_model, random_transcoders, save_transcoders
from conftest import build_tiny_model
from tccli.config.circuit import CircuitConfig
from tccli.config.data import CacheConfig
from tccli.config.evaluation import EvalConfig, GreaterThanConfig, ValidateConfig
from tccli.config.features import ScoreConfig
from tccli.config.graph import GraphConfig
from tccli.config.replacement import InterveneConfig
from tccli.config.training import TrainConfig
from tccli.errors import TcError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "walkthrough.ipynb"

# each wrapper and the settings whose fields are its keyword arguments
SETTINGS = {
    "cache_activations": CacheConfig,
    "train": TrainConfig,
    "evaluate": EvalConfig,
    "score_features": ScoreConfig,
    "attribution_graph": GraphConfig,
    "circuit_graph": CircuitConfig,
    "intervene": InterveneConfig,
    "greater_than": GreaterThanConfig,
    "validate_circuit": ValidateConfig,
}


def python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


# ---------------------------------------------------------------------------- lazy exports


def test_import_tccli_and_the_cli_import_no_torch_and_dir_lists_the_api():
    done = python(
        "import sys, tccli, tccli.cli\n"
        "assert 'torch' not in sys.modules, 'import tccli imported torch'\n"
        "names = dir(tccli)\n"
        "assert 'torch' not in sys.modules, 'dir(tccli) imported torch'\n"
        "missing = [name for name in tccli.__all__ if name not in names]\n"
        "assert not missing, missing\n"
        "print(tccli.__file__)"
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).resolve() == REPO / "tccli" / "__init__.py"


def test_every_exported_name_resolves_to_a_function_with_an_example():
    import tccli.api

    assert len(tccli.__all__) == len(set(tccli.__all__))
    for name in tccli.__all__:
        value = getattr(tccli, name)
        assert value is getattr(tccli.api, name)
        assert callable(value), name
        assert "Examples:" in value.__doc__ and ">>> " in value.__doc__, f"{name}: no example in its docstring"


def test_an_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'load_modle'"):
        tccli.load_modle  # noqa: B018
    assert not hasattr(tccli, "ReplacementModels")
    with pytest.raises(ImportError):  # written as text so that the import checkers do not flag it
        exec("from tccli import no_such_name", {})


def test_the_version_is_a_literal_assignment():
    """The packaging reads ``__version__ = "..."`` from the file's text."""
    import re

    assert re.search(r'^__version__ = "[^"]+"$', (REPO / "tccli" / "__init__.py").read_text(), re.M)


# ---------------------------------------------------------------------------- keyword arguments are the settings


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_keyword_arguments_are_the_settings_fields_with_their_defaults(name):
    parameters = inspect.signature(getattr(tccli, name)).parameters
    for field in dataclasses.fields(SETTINGS[name]):
        if field.name in ("json", "wide"):  # how the command prints; a function returns data
            assert field.name not in parameters
            continue
        assert field.name in parameters, (name, field.name)
        parameter = parameters[field.name]
        if parameter.kind == parameter.POSITIONAL_OR_KEYWORD:  # model, transcoders, prompt: names or objects
            assert parameter.default is inspect.Parameter.empty
        elif field.metadata.get("required"):
            assert parameter.default is inspect.Parameter.empty, (name, field.name)
        elif field.default is not dataclasses.MISSING:
            assert parameter.default == field.default, (name, field.name)
        else:
            assert parameter.default == field.default_factory(), (name, field.name)


def test_bad_keyword_arguments_fail_before_any_work(tmp_path):
    with pytest.raises(TypeError, match="train\\(\\): .*'tokenz'"):
        tccli.train(cache="acts.h5", out=str(tmp_path), tokenz=10)
    with pytest.raises(TypeError, match="missing a required argument: 'out'"):
        tccli.train(cache="acts.h5")
    with pytest.raises(TcError, match="--k must be at least 1"):
        tccli.train(cache="acts.h5", out=str(tmp_path), k=0)
    with pytest.raises(TcError, match="tokens='lots'"):
        tccli.train(cache="acts.h5", out=str(tmp_path), tokens="lots")


def test_settings_accept_paths_counts_and_one_value_for_a_list(tmp_path):
    from tccli.api import build_settings

    config = build_settings(EvalConfig, {"transcoders": tmp_path / "tcs", "data": tmp_path / "a.txt", "tokens": "2k"})
    assert (config.transcoders, config.data, config.tokens) == (str(tmp_path / "tcs"), [str(tmp_path / "a.txt")], 2000)


# ---------------------------------------------------------------------------- the API returns what the library does

PROMPT = "The war lasted from 1735 to 17"


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    model = build_tiny_model("gpt2", root / "gpt2")
    save_transcoders(random_transcoders(loaded_model(model).info, 48, 0, bias_shift=-0.3), root / "tcs")
    return {"model": str(model), "tcs": str(root / "tcs")}


def test_circuit_and_intervene_return_what_the_library_returns(tiny_files, one_torch_thread):
    from tccli.circuit.trace import circuit_graph
    from tccli.replacement.intervention import run_intervene
    from tccli.transcoders.formats import load_transcoder_set

    loaded = loaded_model(tiny_files["model"])
    transcoders = load_transcoder_set(tiny_files["tcs"])
    target = dict(logit_diff=["1", "0"])
    config = CircuitConfig(
        model=tiny_files["model"],
        transcoders=tiny_files["tcs"],
        prompt=PROMPT,
        iters=2,
        branches=6,
        both_signs=True,
        device="cpu",
        **target,
    )
    config.validate()
    expected, expected_summary = circuit_graph(loaded, transcoders, PROMPT, config)

    by_name, summary = tccli.circuit_graph(
        Path(tiny_files["model"]),
        tiny_files["tcs"],
        PROMPT,
        iters=2,
        branches=6,
        both_signs=True,
        device="cpu",
        **target,
    )
    assert summary == expected_summary
    assert by_name.graph["metadata"] == expected.graph["metadata"]
    assert dict(by_name.nodes(data=True)) == dict(expected.nodes(data=True))
    assert sorted(by_name.edges(data="weight")) == sorted(expected.edges(data="weight"))

    by_object, summary = tccli.circuit_graph(
        loaded, transcoders, PROMPT, iters=2, branches=6, both_signs=True, **target
    )
    assert summary == expected_summary
    assert sorted(by_object.edges(data="weight")) == sorted(expected.edges(data="weight"))

    node = max(
        (source for source, _ in expected.in_edges("target") if source.startswith("mlp")),
        key=lambda source: abs(expected.edges[source, "target"]["weight"]),
    )
    config = InterveneConfig(
        model=tiny_files["model"], transcoders=tiny_files["tcs"], prompt=PROMPT, ablate=[node], mode="direct", **target
    )
    config.validate()
    result = tccli.intervene(loaded, transcoders, PROMPT, ablate=node, mode="direct", **target)
    assert result == run_intervene(config, loaded, transcoders, PROMPT)
    assert result["target"]["change"] == pytest.approx(-expected.edges[node, "target"]["weight"], rel=1e-4)


def test_circuit_writes_out_like_the_command_and_validates(tiny_files, tmp_path, one_torch_thread):
    from tccli.circuit.files import read_graph

    loaded = loaded_model(tiny_files["model"])
    out = tmp_path / "g.json"
    graph, _ = tccli.circuit_graph(
        loaded, tiny_files["tcs"], PROMPT, logit="0", iters=1, branches=3, format="json", out=out
    )
    assert sorted(read_graph(out).edges) == sorted(graph.edges)
    with pytest.raises(TcError, match="exists"):
        tccli.circuit_graph(loaded, tiny_files["tcs"], PROMPT, logit="0", iters=1, branches=3, out=out)
    graph, results = tccli.validate_circuit(graph=out, random=1, device="cpu")  # the model the graph names
    assert sorted(graph.edges) == sorted(read_graph(out).edges)
    assert (results["graph"], results["prompts"], results["random"]["draws"]) == (str(out), 1, 1)


# ---------------------------------------------------------------------------- the walkthrough notebook


def test_the_walkthrough_notebook_runs(stories_dir, corpora_dir, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install nbclient ipykernel)")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install nbclient ipykernel)")
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        "commit the notebook without outputs"
    )
    examples_before = sorted(path.name for path in NOTEBOOK.parent.iterdir())
    # the kernel imports this checkout's tccli, whatever is installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()

    text = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            assert output.output_type != "error", f"{output.ename}: {output.evalue}"
            text.append(output.get("text", "") + output.get("data", {}).get("text/markdown", ""))
    text = "\n".join(text)
    for expected in (
        "LlamaForCausalLM",
        "replacement score",
        "| layer | l0 | fvu",
        "logit('she') - logit('he')",
        "| direct | mlp",
    ):
        assert expected in text, expected
    work = Path(text.split("writing into ")[1].split()[0])
    assert work.name.startswith("tc-walkthrough-") and not work.exists()  # its temporary folder, removed
    assert sorted(path.name for path in NOTEBOOK.parent.iterdir()) == examples_before


def test_score_and_greater_than_run_from_names(tiny_files, text_file, tmp_path, one_torch_thread):
    """The wrappers whose library functions load from the settings themselves."""
    from tccli.features.files import FeaturesFile

    out = tmp_path / "features.jsonl"
    summary = tccli.score_features(
        model=tiny_files["model"],
        transcoders=tiny_files["tcs"],
        data=text_file,
        tokens="256",
        context=32,
        out=out,
        device="cpu",
        quiet=True,
    )
    assert (summary["out"], summary["layers"]) == (str(out), [0, 1])
    assert FeaturesFile.open(str(out)) is not None
    result = tccli.greater_than(model=tiny_files["model"], transcoders=tiny_files["tcs"], device="cpu")
    assert result["model"] == tiny_files["model"] and set(result) >= {"clean", "replaced", "all_replaced"}


def test_load_transcoders_returns_a_cross_layer_transcoder_whole(random_clt_folder):
    import tccli
    from tccli.transcoders.cross_layer import CrossLayerTranscoder

    clt = tccli.load_transcoders(random_clt_folder("gpt2"), layers=[1])
    assert isinstance(clt, CrossLayerTranscoder) and clt.layers == [0, 1]


def test_graph_and_replacement_model_take_a_loaded_cross_layer_transcoder(tiny_models, random_clt_folder):
    import tccli

    folder = random_clt_folder("gpt2")
    clt = tccli.load_transcoders(folder)
    loaded = tiny_models["gpt2"]
    by_object = tccli.attribution_graph(loaded, clt, "The war lasted", max_feature_nodes=20)
    by_path = tccli.attribution_graph(loaded, folder, "The war lasted", max_feature_nodes=20)
    assert by_object.graph.replacement == by_path.graph.replacement
    model = tccli.replacement_model(loaded, clt, "The war lasted")
    assert model.n_tokens == len(by_path.tokens)
