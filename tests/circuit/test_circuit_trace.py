"""`tc circuit`, `tc export`, `tc deembed`: end to end, and every kind of bad input."""

from __future__ import annotations

import json

import pytest
import torch

from circuit_helpers import loaded_model, random_transcoders
from conftest import run_tc
from tccli.circuit.trace import circuit_graph
from tccli.config.circuit import CircuitConfig, DeembedConfig
from tccli.errors import TcError
from tccli.features.deembed import deembed_rows, deembedding
from tccli.nodes import parse_feature
from tccli.replacement.targets import feature_target


@pytest.fixture
def gpt2(tiny_models):
    return tiny_models["gpt2"]


@pytest.fixture
def transcoder_dir(random_transcoder_folder):
    """The saved twin of transcoders_of(gpt2)."""
    return random_transcoder_folder("gpt2")


def config(transcoder_dir, **kwargs) -> CircuitConfig:
    base = dict(transcoders=str(transcoder_dir), prompt="The cat sat on the mat", iters=2, branches=4)
    base.update(kwargs)
    made = CircuitConfig(**base)
    made.validate()
    return made


def transcoders_of(loaded, **kwargs):
    return random_transcoders(loaded.info, 48, 0, **kwargs)


def test_parse_feature():
    assert parse_feature("L8.F1234") == (8, 1234) and parse_feature("3.7") == (3, 7)
    with pytest.raises(TcError, match="bad feature"):
        parse_feature("8:1234")


def test_library_graph_and_summary(gpt2, transcoder_dir):
    graph, summary = circuit_graph(
        gpt2, transcoders_of(gpt2), "The cat sat on the mat", config(transcoder_dir, feature="L1.F3")
    )
    meta = graph.graph["metadata"]
    assert meta["tokens"][0] == "<|endoftext|>" and meta["token_ids"][0] == gpt2.info.bos_token_id
    assert meta["target"] == {"kind": "feature", "layer": 1, "feature": 3}
    assert summary["nodes"] == graph.number_of_nodes() and summary["value"] == graph.nodes["target"]["activation"]
    assert meta["search"]["branches"] == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(feature="L1.F48"), "feature 48 is out of range"),
        (dict(feature="L1.F3", prompt=""), "the prompt is empty"),
        (dict(feature="L1.F3", prompt=" 1" * 200), "longer than the model's context"),
        (dict(logit="The cat"), "not one"),
        (dict(logit_diff=["1", "The cat"]), "not one"),
        (dict(feature="L1.F3", pos=40), "outside the prompt"),
    ],
)
def test_bad_targets(gpt2, transcoder_dir, kwargs, message):
    made = config(transcoder_dir, **kwargs)
    with pytest.raises(TcError, match=message):
        circuit_graph(gpt2, transcoders_of(gpt2), made.prompt, made)


def test_layer_without_transcoder(gpt2, transcoder_dir):
    only_layer_0 = random_transcoders(gpt2.info, 48, 0, layers=[0])
    with pytest.raises(TcError, match="no transcoder for layer 1"):
        circuit_graph(gpt2, only_layer_0, "The cat", config(transcoder_dir, feature="L1.F3"))


def test_transcoder_of_another_model_or_hook(gpt2, tiny_models, transcoder_dir):
    llama = tiny_models["llama"]
    with pytest.raises(TcError, match="trained on a LlamaForCausalLM"):
        circuit_graph(gpt2, transcoders_of(llama), "The cat", config(transcoder_dir, feature="L1.F3"))
    wrong_hook = transcoders_of(gpt2)
    wrong_hook[1].config.input_hook = "blocks.1.hook_resid_mid"
    with pytest.raises(TcError, match="reads blocks.1.hook_resid_mid"):
        circuit_graph(gpt2, wrong_hook, "The cat", config(transcoder_dir, feature="L1.F3"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "exactly one target"),
        (dict(feature="L1.F3", logit="a"), "exactly one target"),
        (dict(logit_diff=["a"]), "exactly two tokens"),
        (dict(direction="d.npy"), "needs --layer"),
        (dict(feature="L1.F3", format="png"), "--format must be one of"),
    ],
)
def test_bad_flags(transcoder_dir, kwargs, message):
    with pytest.raises(TcError, match=message):
        config(transcoder_dir, **kwargs)


def test_deembedding_analytic():
    W_E = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0]])
    encoder = torch.tensor([3.0, 0.0, 0.0])
    assert deembedding(W_E, encoder, layernorm=False).tolist() == [3.0, 0.0, 3.0]
    assert deembedding(W_E, encoder, layernorm=True).tolist() == [2.0, -2.0, 0.0]  # centred: [2,-1,-1]
    W_V, W_O = torch.eye(3)[:, :2], torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # swap e0, e1
    assert deembedding(W_E, encoder, False, W_V, W_O).tolist() == [0.0, 6.0, 3.0]


def test_deembed_rows_and_bad_input(gpt2, transcoder_dir):
    transcoders = transcoders_of(gpt2)
    rows = deembed_rows(gpt2, transcoders, DeembedConfig(transcoders="x", feature="L0.F17", top=5))
    scores = [r[0] for r in rows]
    assert len(rows) == 5 and scores == sorted(scores, reverse=True)
    full = deembedding(gpt2.bridge.W_E.detach(), transcoders[0].W_enc[:, 17].detach(), True)
    assert abs(scores[0] - float(full.max())) < 1e-6
    with pytest.raises(TcError, match="not upstream"):
        deembed_rows(gpt2, transcoders, DeembedConfig(transcoders="x", feature="L0.F17", head="L1.H0"))
    with pytest.raises(TcError, match="out of range"):
        deembed_rows(gpt2, transcoders, DeembedConfig(transcoders="x", feature="L0.F17", head="L0.H9"))


@pytest.mark.parametrize("space", ["normalized", "mlp_input", "resid_mid"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_deembedding_is_the_embedding_term_of_the_feature(tiny_model_dirs, arch, space):
    """In every input space, a token's de-embedding score is the embedding's direct contribution to the
    feature's pre-activation at a position holding that token, times the norm's scale there (resid_mid: 1)."""
    from tccli.replacement import attribution
    from tccli.replacement.prompts import freeze_prompt

    loaded = loaded_model(tiny_model_dirs[arch], "float64")
    transcoders = transcoders_of(loaded, dtype=torch.float64, input_space=space, output_space="mlp_output")
    tokens = torch.tensor([0, 37, 90, 151, 12])
    frozen = freeze_prompt(loaded, transcoders, tokens)
    scores = {
        int(token): score
        for score, token, _ in deembed_rows(
            loaded, transcoders, DeembedConfig(transcoders="x", feature="L0.F17", top=400)
        )
    }
    for position in (1, 3):
        target = feature_target(frozen, 0, 17, position)
        embed = float(attribution.direct_contributions(frozen, target.vector, position, target.read_point).embed)
        scale = 1.0 if space == "resid_mid" else float(frozen.layers[0].mlp_scale[position])
        assert abs(scores[int(tokens[position])] - embed * scale) < 1e-9


def test_cli_end_to_end(tiny_model_dirs, transcoder_dir, tmp_path):
    model = str(tiny_model_dirs["gpt2"])
    result = run_tc(
        "circuit",
        "--model",
        model,
        "--transcoders",
        str(transcoder_dir),
        "--prompt",
        "-",
        "--logit-diff",
        "1",
        "2",
        "--format",
        "json",
        "--iters",
        "2",
        input="The cat sat on the mat\n",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)  # stdout is the graph and nothing else
    assert data["graph"]["metadata"]["prompt"] == "The cat sat on the mat"
    assert data["graph"]["metadata"]["target"]["kind"] == "logit_diff"
    assert "nodes" in result.stderr and "edges" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    (tmp_path / "g.json").write_text(result.stdout)
    exported = run_tc("export", str(tmp_path / "g.json"), "--format", "dot")
    assert exported.returncode == 0 and exported.stdout.startswith("digraph circuit {")


def test_cli_bad_input_is_one_line(tiny_model_dirs, transcoder_dir):
    result = run_tc(
        "circuit",
        "--model",
        str(tiny_model_dirs["gpt2"]),
        "--transcoders",
        str(transcoder_dir),
        "--prompt",
        "The cat",
        "--feature",
        "L1.F4800",
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "tc: error: feature 4800 is out of range: layer 1's transcoder has 48 features (0-47)"
    ]


def test_cli_on_a_cross_layer_transcoder_without_cross_writes_is_the_per_layer_sets(
    tiny_model_dirs, random_transcoder_folder, random_clt_folder
):
    """`tc circuit` on a saved CLT whose decoders to later layers are zero: the same circuit (nodes, edges,
    every figure) as on the saved per-layer set with the same weights; with decoders to later layers, another
    one. Only what names the input (its folder, its id, the options) differs."""
    model = str(tiny_model_dirs["gpt2"])

    def circuit(folder) -> dict:
        result = run_tc(
            "circuit", "--model", model, "--transcoders", str(folder), "--prompt", "The cat sat on the mat",
            "--logit", "1", "--format", "json", "--iters", "3", "--branches", "8", "--both-signs", "--quiet",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        for key in ("transcoders", "scan", "config", "cross_layer", "slug"):
            data["graph"]["metadata"].pop(key, None)
        return data

    per_layer = circuit(random_transcoder_folder("gpt2"))
    assert len(per_layer["nodes"]) > 10
    assert circuit(random_clt_folder("gpt2", off_diagonal=0.0)) == per_layer
    assert circuit(random_clt_folder("gpt2", off_diagonal=1.0))["links"] != per_layer["links"]
