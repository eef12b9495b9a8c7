"""Cross-layer transcoders in circuit-tracer's layout and Gemma Scope 2's, read and written exactly.

The files here are written by this test as circuit-tracer's ``CrossLayerTranscoder.to_safetensors`` writes
them (``W_enc_{i}.safetensors``: W_enc_i [m, d], b_enc_i [m], b_dec_i [d], threshold_i [m] = its [L, 1, m]
threshold's row squeezed; ``W_dec_{i}.safetensors``: W_dec_i [m, L - i, d]; in the module's dtype) and as
``load_gemma_scope_2_clt`` reads Gemma Scope 2's (w_enc [d, m], w_dec [m, L, d], b_enc, b_dec, threshold,
affine_skip_connection), and circuit-tracer's encode/decode formula is computed by hand from the same
numbers (its ``encode``: einsum("lbd,lfd->lbf", x, W_enc) + b_enc, JumpReLU ``f * (f > threshold)`` or ReLU;
its ``compute_reconstruction``: sum of a_i W_dec_i[:, t - i] + b_dec_t (+ x_t @ W_skip_t)), independently of
tccli."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import run_tc
from tccli.config.transcoders import CrossLayerConfig
from tccli.errors import TcError
from tccli.transcoders import lazy_decoders
from tccli.transcoders.cross_layer import CrossLayerTranscoder
from tccli.transcoders.files import save_cross_layer
from tccli.transcoders.formats import convert, is_cross_layer, load_transcoder_set, load_transcoders
from tccli.transcoders.lazy_decoders import LazyCrossLayerTranscoder

N_LAYERS, M, D = 3, 12, 8


def circuit_tracer_weights(seed: int = 0, jump: bool = True) -> dict:
    """circuit-tracer's CrossLayerTranscoder tensors: W_enc [L, m, d], b_enc [L, m], b_dec [L, d], W_dec[i]
    [m, L - i, d], threshold [L, 1, m] (JumpReLU's), random and fixed."""
    g = torch.Generator().manual_seed(seed)
    weights = {
        "W_enc": torch.randn(N_LAYERS, M, D, generator=g) / D**0.5,
        "b_enc": torch.randn(N_LAYERS, M, generator=g) * 0.2,
        "b_dec": torch.randn(N_LAYERS, D, generator=g) * 0.1,
        "W_dec": [torch.randn(M, N_LAYERS - i, D, generator=g) / D**0.5 for i in range(N_LAYERS)],
    }
    if jump:
        weights["threshold"] = torch.rand(N_LAYERS, 1, M, generator=g) * 0.3
    return weights


def write_like_to_safetensors(folder, weights: dict, dtype=torch.float32, **config) -> None:
    """The files ``to_safetensors`` writes, and a config.yaml as circuit-tracer's hub configs have it."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(N_LAYERS):
        encoder = {
            f"W_enc_{i}": weights["W_enc"][i].to(dtype),
            f"b_enc_{i}": weights["b_enc"][i].to(dtype),
            f"b_dec_{i}": weights["b_dec"][i].to(dtype),
        }
        if "threshold" in weights:
            encoder[f"threshold_{i}"] = weights["threshold"][i].squeeze(0).to(dtype)
        save_file(encoder, str(folder / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": weights["W_dec"][i].to(dtype)}, str(folder / f"W_dec_{i}.safetensors"))
    settings = {
        "model_name": "google/gemma-2-2b",
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out",
        **config,
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(settings))


def circuit_tracer_formula(weights: dict, x: torch.Tensor, W_skip=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [L, n, m], reconstruction [L, n, d]) as circuit-tracer computes them, in float64."""
    W_enc, b_enc, b_dec = (weights[k].double() for k in ("W_enc", "b_enc", "b_dec"))
    features = torch.einsum("lbd,lfd->lbf", x, W_enc) + b_enc[:, None]
    if "threshold" in weights:
        features = features * (features > weights["threshold"].double())
    else:
        features = torch.relu(features)
    recon = torch.zeros(N_LAYERS, x.shape[1], D, dtype=torch.float64)
    for i in range(N_LAYERS):
        for t in range(i, N_LAYERS):
            recon[t] += features[i] @ weights["W_dec"][i][:, t - i, :].double()
    recon = recon + b_dec[:, None]
    if W_skip is not None:
        recon = recon + x @ W_skip.double()
    return features, recon


def fixed_inputs(seed: int = 5, n: int = 7) -> torch.Tensor:
    return torch.randn(N_LAYERS, n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def tc_outputs(clt: CrossLayerTranscoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    outputs, activations = clt.double()({layer: x[layer] for layer in range(N_LAYERS)})
    return torch.stack([activations[i] for i in range(N_LAYERS)]), torch.stack([outputs[i] for i in range(N_LAYERS)])


# ----------------------------------------------------------------------------- circuit-tracer's formula


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("jump", [True, False])
@pytest.mark.parametrize("lazy", [False, True])
def test_encode_and_decode_are_circuit_tracers_formula(tmp_path, dtype, jump, lazy):
    weights = circuit_tracer_weights(jump=jump)
    # the numbers the files hold (bfloat16 ones are exact in float32 and float64)
    weights = {k: [w.to(dtype) for w in v] if isinstance(v, list) else v.to(dtype) for k, v in weights.items()}
    write_like_to_safetensors(tmp_path / "clt", weights, dtype)
    clt = load_transcoders(tmp_path / "clt", lazy_decoders=lazy)
    assert isinstance(clt, LazyCrossLayerTranscoder if lazy else CrossLayerTranscoder)
    config = clt.config
    assert (config.layers, config.n_features, config.d_in, config.d_out) == ([0, 1, 2], M, D, D)
    assert config.activation == ("jumprelu" if jump else "relu") and not config.skip
    assert (config.input_space, config.output_space, config.model_name) == ("resid_mid", "mlp_out", "google/gemma-2-2b")
    assert config.input_hooks == [f"blocks.{i}.hook_resid_mid" for i in range(N_LAYERS)]
    assert config.output_hooks == [f"blocks.{i}.hook_mlp_out" for i in range(N_LAYERS)]
    x = fixed_inputs()
    features, recon = circuit_tracer_formula(weights, x)
    got_features, got_recon = tc_outputs(clt, x)
    assert torch.equal(got_features != 0, features != 0)  # the same features fire
    assert (features != 0).any(-1).all() and (features == 0).any()  # sparse, and not trivially so
    torch.testing.assert_close(got_features, features, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_recon, recon, rtol=1e-12, atol=1e-12)


def test_hooks_map_to_spaces_as_for_per_layer_sets(tmp_path):
    write_like_to_safetensors(
        tmp_path / "clt", circuit_tracer_weights(), feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out"
    )
    config = load_transcoders(tmp_path / "clt").config
    assert (config.input_space, config.output_space) == ("mlp_input", "mlp_output")
    assert config.input_hooks[2] == "blocks.2.mlp.hook_in" and config.output_hooks[1] == "blocks.1.mlp.hook_out"
    assert config.source["format"] == "circuit-tracer" and config.source["file_format"] == "circuit-tracer"


def write_gemma_scope_2(folder, seed: int = 3, skip: bool = True) -> tuple[dict, torch.Tensor]:
    """Gemma Scope 2 CLT files (one per layer, decoders to *every* layer, the earlier ones non-zero here so
    that reading them would show) and a circuit-tracer config listing them; returns circuit-tracer's tensors
    after ``load_gemma_scope_2_clt``'s remapping and W_skip [L, d, d]."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    raw = []
    for i in range(N_LAYERS):
        params = {
            "w_enc": torch.randn(D, M, generator=g) / D**0.5,
            "w_dec": torch.randn(M, N_LAYERS, D, generator=g) / D**0.5,
            "b_enc": torch.randn(M, generator=g) * 0.2,
            "b_dec": torch.randn(D, generator=g) * 0.1,
            "threshold": torch.rand(M, generator=g) * 0.3,
        }
        if skip:
            params["affine_skip_connection"] = torch.randn(D, D, generator=g) / D
        save_file(params, str(folder / f"params_layer_{i}.safetensors"))
        raw.append(params)
    settings = {
        "model_name": "google/gemma-3-1b-pt",
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out",
        "transcoders": [f"params_layer_{i}.safetensors" for i in range(N_LAYERS)],
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(settings))
    stacked = {k: torch.stack([p[k] for p in raw]) for k in raw[0]}
    weights = {
        "W_enc": stacked["w_enc"].transpose(-1, -2),
        "b_enc": stacked["b_enc"],
        "b_dec": stacked["b_dec"],
        "threshold": stacked["threshold"].unsqueeze(1),
        "W_dec": [stacked["w_dec"][i, :, i:, :] for i in range(N_LAYERS)],
    }
    return weights, stacked.get("affine_skip_connection")


@pytest.mark.parametrize("lazy", [False, True])
def test_gemma_scope_2_clt_is_load_gemma_scope_2_clts_formula(tmp_path, lazy):
    weights, W_skip = write_gemma_scope_2(tmp_path / "gs2")
    clt = load_transcoders(tmp_path / "gs2", lazy_decoders=lazy)
    assert clt.config.skip and clt.config.activation == "jumprelu" and clt.config.layers == [0, 1, 2]
    assert clt.config.source["file_format"] == "gemma-scope-2"
    x = fixed_inputs(seed=9)
    features, recon = circuit_tracer_formula(weights, x, W_skip)
    got_features, got_recon = tc_outputs(clt, x)
    assert torch.equal(got_features != 0, features != 0) and (features == 0).any() and (features != 0).any()
    torch.testing.assert_close(got_features, features, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_recon, recon, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- lazy decoders


def random_tc_clt(seed: int = 1, **kwargs) -> CrossLayerTranscoder:
    config = CrossLayerConfig(d_in=D, d_out=D, n_features=M, layers=[0, 1, 2], input_space="resid_mid", **kwargs)
    clt = CrossLayerTranscoder(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in clt.named_parameters():
            scale = 0.3 if name.startswith("threshold") else 0.5
            param.copy_(
                torch.randn(param.shape, generator=g).abs() * scale
                if "threshold" in name
                else torch.randn(param.shape, generator=g) * scale
            )
    return clt


@pytest.fixture()
def clt_folders(tmp_path):
    """The same CLT in tc's folder and in circuit-tracer's layout (b_pre zero, so the two are equal bit for
    bit), and a Gemma Scope 2 one."""
    clt = random_tc_clt()
    with torch.no_grad():
        for param in clt.b_pre.values():
            param.zero_()
    save_cross_layer(clt, tmp_path / "tc")
    convert(tmp_path / "tc", tmp_path / "ct", "circuit-tracer")
    write_gemma_scope_2(tmp_path / "gs2")
    return {name: tmp_path / name for name in ("tc", "ct", "gs2")}


@pytest.mark.parametrize("layout", ["tc", "ct", "gs2"])
def test_lazy_decoders_are_the_eager_ones_and_never_in_memory(clt_folders, layout, monkeypatch):
    eager = load_transcoders(clt_folders[layout])
    lazy = load_transcoders(clt_folders[layout], lazy_decoders=True)
    assert type(eager) is CrossLayerTranscoder and isinstance(lazy, LazyCrossLayerTranscoder)
    # no decoder tensor is a parameter, buffer or attribute tensor of the lazy CLT: its memory is the rest
    lazy_sizes = {name: p.numel() for name, p in lazy.named_parameters()}
    assert not any(name.startswith("W_dec") for name in lazy_sizes) and not list(lazy.buffers())
    eager_sizes = {name: p.numel() for name, p in eager.named_parameters() if not name.startswith("W_dec")}
    assert lazy_sizes == eager_sizes
    for name, param in lazy.named_parameters():
        assert param.device.type == "cpu" and torch.equal(param, dict(eager.named_parameters())[name]), name
    features = torch.tensor([3, 0, 3, M - 1])
    for j, layer in enumerate(eager.layers):
        assert torch.equal(lazy.decoder_rows(layer, features), eager.decoder_rows(layer, features))
        for target in eager.layers[j:]:
            assert torch.equal(lazy.decoder(layer, target), eager.decoder(layer, target))
        assert torch.equal(lazy.layer_transcoder(layer).W_dec, eager.layer_transcoder(layer).W_dec)
    # decode reads the rows of the active features only, and gives the eager decode
    asked = []
    original = lazy_decoders.read_decoder

    def recording(location, rows=None, entry=None):
        asked.append((location.name, None if rows is None else sorted(set(torch.as_tensor(rows).tolist())), entry))
        return original(location, rows, entry)

    monkeypatch.setattr(lazy_decoders, "read_decoder", recording)
    x = fixed_inputs(seed=2, n=3).float()
    activations = {layer: eager.encode(layer, x[j]) for j, layer in enumerate(eager.layers)}
    got, want = lazy.decode(activations), eager.decode(activations)
    for target in eager.layers:
        torch.testing.assert_close(got[target], want[target], rtol=1e-6, atol=1e-6)
    active = [sorted((activations[layer] != 0).any(0).nonzero().squeeze(1).tolist()) for layer in eager.layers]
    assert [rows for _, rows, _ in asked] == active and all(entry is None for *_, entry in asked)
    assert all(len(rows) < M for rows in active)  # some rows were left unread
    # in float64 the two decodes are equal to float64 rounding
    lazy64, eager64 = lazy.double(), eager.double()
    activations64 = {layer: z.double() for layer, z in activations.items()}
    for target, value in lazy64.decode(activations64).items():
        assert value.dtype == torch.float64
        torch.testing.assert_close(value, eager64.decode(activations64)[target], rtol=1e-12, atol=1e-12)


def test_lazy_clt_writes_out_whole(clt_folders, tmp_path):
    lazy = load_transcoders(clt_folders["ct"], lazy_decoders=True)
    eager = lazy.eager()
    reference = load_transcoders(clt_folders["ct"])
    for name, param in reference.named_parameters():
        assert torch.equal(dict(eager.named_parameters())[name], param), name


# ----------------------------------------------------------------------------- tc convert, both ways


def stored(folder) -> dict:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({(file.name, name): f.get_tensor(name) for name in f.keys()})
    return out


def test_convert_circuit_tracer_to_tc_and_back_is_bit_exact(tmp_path):
    write_like_to_safetensors(tmp_path / "ct", circuit_tracer_weights())
    result = run_tc("convert", "--input", str(tmp_path / "ct"), "--out", str(tmp_path / "tc"), "--to", "tc")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "tc").iterdir()) == ["config.json"] + [
        f"layer_{i}.safetensors" for i in range(N_LAYERS)
    ]
    config = json.loads((tmp_path / "tc" / "config.json").read_text())
    assert config["kind"] == "cross_layer_transcoder" and config["input_space"] == "resid_mid"
    shown = run_tc("info", str(tmp_path / "tc")).stdout
    assert "cross-layer transcoder (tc)" in shown and f"from         circuit-tracer ({tmp_path / 'ct'})" in shown
    result = run_tc(
        "convert", "--input", str(tmp_path / "tc"), "--out", str(tmp_path / "back"), "--to", "circuit-tracer"
    )
    assert result.returncode == 0, result.stderr
    original, back = stored(tmp_path / "ct"), stored(tmp_path / "back")
    assert original.keys() == back.keys()
    for key, tensor in original.items():
        assert back[key].dtype == torch.float32 and torch.equal(back[key], tensor), key
    settings = yaml.safe_load((tmp_path / "back" / "config.yaml").read_text())
    assert settings == {
        "model_name": "google/gemma-2-2b",
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out",
    }


@pytest.mark.parametrize("activation", ["jumprelu", "relu", "batchtopk"])
def test_convert_tc_to_circuit_tracer_computes_the_same(tmp_path, activation):
    clt = random_tc_clt(activation=activation, k=4 if activation == "batchtopk" else None)
    save_cross_layer(clt, tmp_path / "tc")
    result = run_tc("convert", "--input", str(tmp_path / "tc"), "--out", str(tmp_path / "ct"), "--to", "circuit-tracer")
    assert result.returncode == 0, result.stderr
    files = stored(tmp_path / "ct")
    for i in range(N_LAYERS):  # circuit-tracer's names and shapes
        assert files[f"W_enc_{i}.safetensors", f"W_enc_{i}"].shape == (M, D)
        assert files[f"W_dec_{i}.safetensors", f"W_dec_{i}"].shape == (M, N_LAYERS - i, D)
        assert files[f"W_enc_{i}.safetensors", f"b_dec_{i}"].shape == (D,)
        assert ((f"W_enc_{i}.safetensors", f"threshold_{i}") in files) == (activation != "relu")
    # circuit-tracer's formula on the written files equals tc's CLT (b_pre folded into b_enc: float32 rounding)
    weights = {
        "W_enc": torch.stack([files[f"W_enc_{i}.safetensors", f"W_enc_{i}"] for i in range(N_LAYERS)]),
        "b_enc": torch.stack([files[f"W_enc_{i}.safetensors", f"b_enc_{i}"] for i in range(N_LAYERS)]),
        "b_dec": torch.stack([files[f"W_enc_{i}.safetensors", f"b_dec_{i}"] for i in range(N_LAYERS)]),
        "W_dec": [files[f"W_dec_{i}.safetensors", f"W_dec_{i}"] for i in range(N_LAYERS)],
    }
    if activation != "relu":
        weights["threshold"] = torch.stack(
            [files[f"W_enc_{i}.safetensors", f"threshold_{i}"] for i in range(N_LAYERS)]
        ).unsqueeze(1)
    x = fixed_inputs(seed=4)
    features, recon = circuit_tracer_formula(weights, x)
    want_features, want_recon = tc_outputs(clt.float(), x.float().double())
    assert torch.equal(want_features != 0, features != 0)
    torch.testing.assert_close(features, want_features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recon, want_recon, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"skip": True}, "circuit-tracer's CLT layout has no skip connection"),
        ({"activation": "topk", "k": 3}, "a topk CLT cannot be written"),
        ({"layers": [1, 2, 3]}, "holds layers 0 .. L-1, got layers [1, 2, 3]"),
    ],
)
def test_convert_refuses_what_circuit_tracers_layout_cannot_hold(tmp_path, kwargs, message):
    layers = kwargs.pop("layers", [0, 1, 2])
    config = CrossLayerConfig(d_in=D, d_out=D, n_features=M, layers=layers, **kwargs)
    save_cross_layer(CrossLayerTranscoder(config), tmp_path / "tc")
    result = run_tc("convert", "--input", str(tmp_path / "tc"), "--out", str(tmp_path / "ct"), "--to", "circuit-tracer")
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("tc: error: ") and message in lines[0]
    assert not (tmp_path / "ct").exists()


@pytest.mark.parametrize("fmt", ["saelens", "sparsify", "gemma-scope", "peek"])
def test_other_formats_refuse_a_clt_in_one_line(clt_folders, tmp_path, fmt):
    for layout in ("tc", "ct"):
        out = tmp_path / f"{layout}_{fmt}"
        result = run_tc("convert", "--input", str(clt_folders[layout]), "--out", str(out), "--to", fmt)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1, result.stderr
        assert "is a cross-layer transcoder: it converts to tc or circuit-tracer only" in lines[0]
        assert not out.exists()


def test_per_layer_readers_refuse_a_circuit_tracer_clt(clt_folders):
    assert is_cross_layer(clt_folders["ct"]) and is_cross_layer(clt_folders["gs2"])
    with pytest.raises(TcError, match="is a cross-layer transcoder, which this command does not read yet"):
        load_transcoder_set(clt_folders["ct"])


# ----------------------------------------------------------------------------- tc info


@pytest.mark.parametrize("layout", ["tc", "ct", "gs2"])
def test_info_says_cross_layer_transcoder(clt_folders, layout):
    result = run_tc("info", str(clt_folders[layout]))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"{clt_folders[layout]}: cross-layer transcoder (" in out
    assert "layers       0-2 (3;" in out and "6 decoder blocks" in out
    assert f"features     {M} per layer, {3 * M} in all" in out
    assert "activation   jumprelu" in out
    assert f"skip         {'yes' if layout == 'gs2' else 'no'}" in out
    assert "reads resid_mid, writes mlp_out" in out
    summary = json.loads(run_tc("info", "--json", str(clt_folders[layout])).stdout)
    assert summary["kind"] == "cross-layer-transcoder" and summary["layers"] == [0, 1, 2]
    assert (
        summary["n_features"] == M
        and summary["format"] == {"tc": "tc", "ct": "circuit-tracer", "gs2": "gemma-scope-2"}[layout]
    )


# ----------------------------------------------------------------------------- bad files


def broken(tmp_path, how: str):
    folder = tmp_path / "ct"
    write_like_to_safetensors(folder, circuit_tracer_weights())
    if how == "missing-decoder":
        (folder / "W_dec_1.safetensors").unlink()
    elif how == "missing-encoder":
        (folder / "W_enc_1.safetensors").unlink()
    elif how == "decoder-shape":
        save_file({"W_dec_1": torch.zeros(M, N_LAYERS, D)}, str(folder / "W_dec_1.safetensors"))
    elif how == "encoder-shape":
        save_file(
            {
                "W_enc_2": torch.zeros(M, D + 1),
                "b_enc_2": torch.zeros(M),
                "b_dec_2": torch.zeros(D),
                "threshold_2": torch.zeros(M),
            },
            str(folder / "W_enc_2.safetensors"),
        )
    elif how == "activation":
        write_like_to_safetensors(folder, circuit_tracer_weights(), activation="topk")
    elif how == "no-hook":
        (folder / "config.yaml").write_text(yaml.safe_dump({"model_kind": "cross_layer_transcoder"}))
    elif how == "missing-bias":
        save_file({"W_enc_0": torch.zeros(M, D)}, str(folder / "W_enc_0.safetensors"))
    return folder


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing-decoder", "W_dec_1.safetensors does not exist"),
        ("missing-encoder", "W_enc_1.safetensors does not exist"),
        ("decoder-shape", f"tensor W_dec_1 has shape ({M}, {N_LAYERS}, {D}), expected ({M}, 2, {D})"),
        ("encoder-shape", f"layer 2's W_enc has shape ({D + 1}, {M}), expected ({D}, {M})"),
        ("activation", "activation 'topk' is not one a circuit-tracer cross-layer transcoder has"),
        ("no-hook", "names no feature_input_hook"),
        ("missing-bias", "W_enc_0.safetensors is not a circuit-tracer cross-layer transcoder file: it lacks b_enc_0"),
    ],
)
@pytest.mark.parametrize("command", ["info", "convert"])
def test_bad_clt_files_are_one_line(tmp_path, how, message, command):
    folder = broken(tmp_path, how)
    args = (
        ("info", str(folder))
        if command == "info"
        else ("convert", "--input", str(folder), "--out", str(tmp_path / "out"), "--to", "tc")
    )
    result = run_tc(*args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("tc: error: ") and message in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- on a tiny Gemma 3


def test_gemma_scope_2_clt_fits_a_gemma3_model(modern_model_dirs, tmp_path):
    """A Gemma Scope 2 CLT over every layer of the tiny Gemma 3 (d_model 32, 2 layers), as circuit-tracer
    configures them (hook_resid_mid -> hook_mlp_out): each layer's view passes tc's model checks, and its hooks
    are the bridge's own names for Gemma 3's residual before the MLP's norm and the MLP's write after the
    post-norm."""
    from tccli.model.loading import load_model
    from tccli.transcoders.files import check_matches_model

    loaded = load_model(str(modern_model_dirs["gemma3"]), "cpu")
    d, n = loaded.info.d_model, loaded.info.n_layers
    g = torch.Generator().manual_seed(0)
    folder = tmp_path / "gs2"
    folder.mkdir()
    for i in range(n):
        params = {
            "w_enc": torch.randn(d, M, generator=g),
            "w_dec": torch.randn(M, n, d, generator=g),
            "b_enc": torch.randn(M, generator=g),
            "b_dec": torch.randn(d, generator=g),
            "threshold": torch.rand(M, generator=g),
            "affine_skip_connection": torch.randn(d, d, generator=g),
        }
        save_file(params, str(folder / f"params_layer_{i}.safetensors"))
    settings = {
        "model_name": "google/gemma-3-1b-pt",
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out",
        "transcoders": [str(folder / f"params_layer_{i}.safetensors") for i in range(n)],
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(settings))
    clt = load_transcoders(folder, lazy_decoders=True)
    assert clt.layers == list(range(n)) and clt.config.skip
    hooks = loaded.bridge.hook_dict
    for layer in clt.layers:
        view = clt.layer_transcoder(layer)
        check_matches_model(view, loaded.info)
        assert view.config.input_hook in hooks and view.config.output_hook in hooks
        assert view.config.input_hook == loaded.info.layer(layer).mlp_norm_input
        assert view.config.output_hook == loaded.info.layer(layer).mlp_out


def test_a_hub_clt_downloads_its_encoder_and_decoder_files(tmp_path, monkeypatch):
    """A hub id of a circuit-tracer CLT (mntss/clt-gemma-2-2b-426k) fetches config.yaml and the W_enc_*/W_dec_*
    files (not only per-layer sets' layer_*.safetensors), and loads as a CLT recording the hub id."""
    import fnmatch

    import huggingface_hub

    write_like_to_safetensors(tmp_path / "snapshot", circuit_tracer_weights())
    asked = {}

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        asked.update(repo=repo_id, patterns=allow_patterns)
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "file_exists", lambda repo, name, revision=None: name == "config.yaml")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    clt = load_transcoders("mntss/clt-gemma-2-2b-426k", lazy_decoders=True)
    assert isinstance(clt, LazyCrossLayerTranscoder) and clt.config.source["set"] == "mntss/clt-gemma-2-2b-426k"
    assert asked["repo"] == "mntss/clt-gemma-2-2b-426k"
    for file in (tmp_path / "snapshot").iterdir():
        assert any(fnmatch.fnmatch(file.name, pattern) for pattern in asked["patterns"]), file.name
