"""The paper authors' Peek folders (sae_info.json + sae.json + sae.safetensors): read against Peek's own
formula on a tiny GPT-NeoX (Pythia's architecture), written back, used by tc eval / circuit / info."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import plain_model_reference, run_tc
from format_helpers import D, M, outputs, random_transcoder
from tccli.errors import TcError
from tccli.model.loading import load_model
from tccli.replacement.prompts import freeze_prompt
from tccli.transcoders.files import save_transcoder
from tccli.transcoders.formats import convert, format_of, load_transcoder_set, peek

PROMPT_IDS = [0, 37, 90, 151, 12, 200, 64, 7, 99]


def peek_folder(
    folder, layer, d=D, m=M, act_fn="relu", top_k=None, sublayers=("mlp_in", "mlp_out"), seed=0, dtype=torch.float32
):
    """One transcoder laid out as Peek's SAEInfo.save(save_tensors=True) writes it (json.dump defaults)."""
    generator = torch.Generator().manual_seed(seed + layer)
    tensors = {
        "W_enc": torch.randn(d, m, generator=generator) / d**0.5,
        "b_enc": torch.randn(m, generator=generator) * 0.1,
        "W_dec": torch.randn(m, d, generator=generator) / d**0.5,
        "b_dec": torch.randn(d, generator=generator) * 0.1,
    }
    folder.mkdir(parents=True)
    save_file({k: v.to(dtype) for k, v in tensors.items()}, str(folder / "sae.safetensors"))
    cfg = {
        "d_in": d,
        "num_features": m,
        "d_out": d,
        "dtype": str(dtype),
        "act_fn": act_fn,
        "top_k": top_k,
        "tensors_filename": "sae.safetensors",
    }
    (folder / "sae.json").write_text(json.dumps(cfg))
    sides = [{"layer": layer, "sublayer": sublayer, "parallel_attn_mlp": True} for sublayer in sublayers]
    info = {
        "name": "",
        "input_layer": sides[0],
        "output_layer": sides[1],
        "short_name": f"tc{layer}mlp_in",
        "model_path": "EleutherAI/pythia-2.8b",
        "upstreams": [
            {
                "path_type": "huggingface",
                "hf_repo_id": "jacobdunefsky/pythia-2.8B-transcoders",
                "hf_path": f"pythia-2.8B-dun-mlp-tc{layer}/sae_info.json",
                "absolute_path": None,
                "relative_path": None,
            }
        ],
        "sae_filename": "sae.json",
    }
    (folder / "sae_info.json").write_text(json.dumps(info))
    return {k: v.to(dtype).float() for k, v in tensors.items()}


def peek_formula(tensors, x, act_fn="relu", top_k=None):
    """tc_peek_backend.SAE.get_activs / forward written out: no input bias; top_k keeps the values as they are."""
    pre = torch.einsum("df, ...d -> ...f", tensors["W_enc"], x) + tensors["b_enc"]
    if act_fn == "relu":
        z = torch.relu(pre)
    else:
        values, indices = torch.topk(pre, k=top_k)
        z = torch.scatter(torch.zeros_like(pre), -1, indices, values)
    return torch.einsum("fd, ...f -> ...d", tensors["W_dec"], z) + tensors["b_dec"], z


def pythia_set(root, d_model=32, n_layers=2, **kwargs):
    return {
        layer: peek_folder(root / f"pythia-2.8B-dun-mlp-tc{layer}", layer, d=d_model, m=64, **kwargs)
        for layer in range(n_layers)
    }


def test_peek_set_reads_exactly_on_tiny_neox(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["neox"]
    tensors = pythia_set(tmp_path / "set")
    assert format_of(tmp_path / "set" / "pythia-2.8B-dun-mlp-tc1") == "peek"
    transcoders = load_transcoder_set(tmp_path / "set")
    assert sorted(transcoders) == [0, 1]
    for layer, transcoder in transcoders.items():
        config = transcoder.config
        assert (config.kind, config.activation, config.input_space, config.output_space) == (
            "transcoder",
            "relu",
            "normalized",
            "mlp_out",
        )
        assert config.input_hook == f"blocks.{layer}.ln2.hook_normalized"
        assert config.output_hook == f"blocks.{layer}.hook_mlp_out"
        assert config.source["format"] == "peek" and config.model_name == "EleutherAI/pythia-2.8b"
        assert config.weight_processing["fold_ln"] and not transcoder.b_pre.any()
    # Peek's input is ln2.hook_normalized of the model (computed here from a plain HuggingFace pass: the
    # residual before the parallel block, normalised); tc's pipeline feeds its own and must agree
    reference = plain_model_reference(model_dir, [PROMPT_IDS], [0, 1], batch_size=1)
    loaded = load_model(str(model_dir), "cpu", "float32")
    frozen = freeze_prompt(loaded, transcoders, torch.tensor(PROMPT_IDS))
    for layer in (0, 1):
        x = reference[layer, "mlp_in"]
        y, z = peek_formula(tensors[layer], x)
        y_tc, z_tc = outputs(transcoders[layer], x)
        assert torch.allclose(z_tc, z, rtol=1e-5, atol=1e-6) and torch.allclose(y_tc, y, rtol=1e-5, atol=1e-6)
        assert bool((z > 0).any()) and bool((z == 0).any())  # some features fire, some do not
        assert torch.allclose(frozen.layers[layer].z, z, rtol=1e-4, atol=1e-5)


def test_peek_top_k_and_half_precision(tmp_path):
    tensors = peek_folder(tmp_path / "tk", 3, act_fn="top_k", top_k=4, dtype=torch.float16)
    transcoder = peek.read(tmp_path / "tk")
    assert (transcoder.config.activation, transcoder.config.k, transcoder.config.layer) == ("signed_topk", 4, 3)
    x = torch.randn(50, D)
    # Peek keeps the k largest values as they are: all positive (+5), some negative (-3), all negative (-100)
    negatives = []
    for shift in (5.0, -3.0, -100.0):
        with torch.no_grad():
            transcoder.b_enc.copy_(tensors["b_enc"] + shift)
        y, z = peek_formula(dict(tensors, b_enc=tensors["b_enc"] + shift), x, "top_k", 4)
        y_tc, z_tc = outputs(transcoder, x)
        assert torch.allclose(z_tc, z, rtol=1e-5, atol=1e-6) and torch.allclose(y_tc, y, rtol=1e-5, atol=1e-5)
        assert bool(((z_tc != 0).sum(-1) == 4).all())
        negatives.append(int((z_tc < 0).sum()))
    assert negatives[0] == 0 < negatives[1] < negatives[2] == 50 * 4, negatives


def test_peek_sae_on_mlp_out(tmp_path):
    tensors = peek_folder(tmp_path / "sae", 2, sublayers=("mlp_out", "mlp_out"))
    sae = peek.read(tmp_path / "sae")
    assert sae.config.kind == "sae" and sae.config.input_space == sae.config.output_space == "mlp_out"
    x = torch.randn(10, D)
    assert torch.allclose(outputs(sae, x)[0], peek_formula(tensors, x)[0], rtol=1e-5, atol=1e-6)


def test_peek_round_trips(tmp_path):
    # Peek -> tc -> Peek: the same tensors, bit for bit
    pythia_set(tmp_path / "set", d_model=D)
    convert(tmp_path / "set", tmp_path / "tc", "tc")
    convert(tmp_path / "tc", tmp_path / "back", "peek")
    for layer in (0, 1):
        before = load_file(str(tmp_path / "set" / f"pythia-2.8B-dun-mlp-tc{layer}" / "sae.safetensors"))
        after = load_file(str(tmp_path / "back" / f"layer_{layer}" / "sae.safetensors"))
        assert sorted(after) == ["W_dec", "W_enc", "b_dec", "b_enc"]
        assert all(torch.equal(before[name], after[name]) for name in before)
        cfg = json.loads((tmp_path / "back" / f"layer_{layer}" / "sae.json").read_text())
        assert cfg == {
            "d_in": D,
            "num_features": 64,
            "d_out": D,
            "dtype": "torch.float32",
            "act_fn": "relu",
            "top_k": None,
            "tensors_filename": "sae.safetensors",
        }
        info = json.loads((tmp_path / "back" / f"layer_{layer}" / "sae_info.json").read_text())
        assert info["input_layer"]["sublayer"] == "mlp_in" and info["output_layer"]["sublayer"] == "mlp_out"
    # tc -> Peek -> tc: the same config and outputs (b_pre folded into b_enc: equal to rounding)
    original = random_transcoder(layer=2, activation="topk", k=3)
    peek.write(original, tmp_path / "one")
    again = peek.read(tmp_path / "one")
    assert again.config == original.config  # tc's config travels with the folder: tc's own topk comes back
    cfg = json.loads((tmp_path / "one" / "sae.json").read_text())
    assert (cfg["act_fn"], cfg["top_k"]) == ("top_k", 3)
    x = torch.randn(20, D)
    assert torch.allclose(outputs(again, x)[0], outputs(original, x)[0], rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        original.b_pre.zero_()
    peek.write(original, tmp_path / "zero_b_pre")
    for a, b in zip(outputs(original, x), outputs(peek.read(tmp_path / "zero_b_pre"), x)):
        assert torch.equal(a, b)


def test_signed_topk_round_trips_and_tc_topk_is_noted(tmp_path):
    # circuit-tracer's / Peek's TopK (signed_topk) -> Peek -> tc: the same function, negative values included
    signed = random_transcoder(layer=1, activation="signed_topk", k=3)
    with torch.no_grad():
        signed.b_enc.sub_(10.0)  # every pre-activation negative
    peek.write(signed, tmp_path / "signed")
    x = torch.randn(20, D)
    again = peek.read(tmp_path / "signed")
    z = outputs(again, x)[1]
    assert again.config.activation == "signed_topk" and bool((z < 0).sum(-1).eq(3).all())
    assert torch.allclose(outputs(again, x)[0], outputs(signed, x)[0], rtol=1e-5, atol=1e-4)
    # tc's own topk converted to Peek: written, with one note on stderr; relu: no note
    save_transcoder(random_transcoder(layer=1, activation="topk", k=3), tmp_path / "tc_topk")
    save_transcoder(random_transcoder(layer=1), tmp_path / "tc_relu")
    topk = run_tc("convert", "--input", str(tmp_path / "tc_topk"), "--out", str(tmp_path / "p1"), "--to", "peek")
    relu = run_tc("convert", "--input", str(tmp_path / "tc_relu"), "--out", str(tmp_path / "p2"), "--to", "peek")
    assert topk.returncode == 0 and relu.returncode == 0, topk.stderr + relu.stderr
    assert topk.stdout.strip() == str(tmp_path / "p1") and (tmp_path / "p1" / "sae.json").is_file()
    assert topk.stderr.count("tc convert: note: peek's TopK keeps the k largest pre-activations even when") == 1
    assert "note" not in relu.stderr


def test_peek_writer_refusals(tmp_path):
    with pytest.raises(TcError, match="Peek holds relu and top_k transcoders without skip"):
        peek.write(random_transcoder(activation="jumprelu"), tmp_path / "a")
    with pytest.raises(TcError, match="reads mlp_input and writes mlp_output"):
        peek.write(random_transcoder(input_space="mlp_input", output_space="mlp_output"), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def rewrite(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "target,changes,message",
    [
        ("sae.json", {"act_fn": "id"}, "act_fn 'id' is not supported"),
        ("sae.json", {"act_fn": "top_k", "top_k": None}, "top_k must be a positive integer"),
        ("sae.json", {"num_features": -3}, "num_features must be a positive integer"),
        ("sae.json", {"d_in": "wide"}, "d_in must be a positive integer"),
        ("sae.json", {"dtype": "torch.int8"}, "is not a floating-point type"),
        ("sae.json", {"num_features": 99}, "tensor W_enc has shape"),
        ("sae.json", {"tensors_filename": None}, "saved without its weights"),
        ("sae.json", {"tensors_filename": "../../etc/passwd"}, "must name a file in the same folder"),
        (
            "sae_info.json",
            {"input_layer": {"layer": 1, "sublayer": "pre", "parallel_attn_mlp": True}},
            "sublayer 'pre' is not supported",
        ),
        (
            "sae_info.json",
            {"output_layer": {"layer": 2, "sublayer": "mlp_out", "parallel_attn_mlp": True}},
            "from layer 1 to layer 2 is not supported",
        ),
        ("sae_info.json", {"input_layer": {"layer": -1, "sublayer": "mlp_in"}}, "layer must be a non-negative"),
        ("sae_info.json", {"sae_filename": "other.json"}, "lacks other.json"),
    ],
)
def test_peek_bad_fields_are_one_line(tmp_path, target, changes, message):
    folder = tmp_path / "tc1"
    peek_folder(folder, 1)
    rewrite(folder / target, **changes)
    with pytest.raises(TcError, match=message):
        peek.read(folder)


def test_peek_missing_files(tmp_path):
    peek_folder(tmp_path / "a", 0)
    (tmp_path / "a" / "sae_info.json").unlink()
    with pytest.raises(TcError, match="needs sae_info.json"):
        load_transcoder_set(tmp_path / "a")
    peek_folder(tmp_path / "b", 0)
    (tmp_path / "b" / "sae.safetensors").unlink()
    with pytest.raises(TcError, match="lacks sae.safetensors"):
        load_transcoder_set(tmp_path / "b")
    peek_folder(tmp_path / "c", 0)
    save_file({"W_enc": torch.zeros(D, M)}, str(tmp_path / "c" / "sae.safetensors"))
    with pytest.raises(TcError, match="lacks tensor b_enc"):
        peek.read(tmp_path / "c")


@pytest.mark.slow
def test_eval_circuit_info_and_convert_on_tiny_neox(tiny_model_dirs, text_file, tmp_path):
    model_dir = str(tiny_model_dirs["neox"])
    pythia_set(tmp_path / "set")
    result = run_tc(
        "eval",
        "--model",
        model_dir,
        "--transcoders",
        str(tmp_path / "set"),
        "--data",
        str(text_file),
        "--tokens",
        "1024",
        "--context",
        "32",
        "--device",
        "cpu",
        "--json",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [row["layer"] for row in report["layers"]] == [0, 1]
    assert all(row["fvu"] > 0 and row["l0"] > 0 for row in report["layers"])
    out = tmp_path / "graph.json"
    result = run_tc(
        "circuit",
        "--model",
        model_dir,
        "--transcoders",
        str(tmp_path / "set"),
        "--device",
        "cpu",
        "--prompt",
        "The cat sat on the mat",
        "--logit",
        " the",
        "--format",
        "json",
        "--out",
        str(out),
        "--iters",
        "2",
        "--branches",
        "6",
    )
    assert result.returncode == 0, result.stderr
    graph = json.loads(out.read_text())
    assert graph["graph"]["metadata"]["transcoder_spaces"]["0"] == {
        "input": "normalized",
        "output": "mlp_out",
        "skip": False,
        "activation": "relu",
    }
    assert any(node["kind"] == "feature" for node in graph["nodes"])
    info = run_tc("info", str(tmp_path / "set"))
    assert info.returncode == 0, info.stderr
    assert "reads normalized, writes mlp_out" in info.stdout and "from peek" in info.stdout
    assert "EleutherAI/pythia-2.8b" in info.stdout
    result = run_tc("convert", "--input", str(tmp_path / "set"), "--out", str(tmp_path / "p"), "--to", "peek")
    assert result.returncode == 0, result.stderr
    bad = run_tc("info", str(tmp_path / "set" / "pythia-2.8B-dun-mlp-tc0" / "sae.json"))
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
