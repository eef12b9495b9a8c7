"""circuit-tracer transcoder sets: read against circuit-tracer's own formula, written and read back."""

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tccli.errors import TcError
from tccli.transcoders.files import save_transcoder
from tccli.transcoders.formats import circuit_tracer, convert, load_transcoder_set

D, M = 8, 24


def layer_tensors(seed, jumprelu=True, skip=True):
    """One layer_{i}.safetensors as SingleLayerTranscoder.to_safetensors writes it: W_enc [m, d]."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "W_enc": torch.randn(M, D, generator=generator),
        "W_dec": torch.randn(M, D, generator=generator),
        "b_enc": torch.randn(M, generator=generator),
        "b_dec": torch.randn(D, generator=generator),
    }
    if jumprelu:
        tensors["activation_function.threshold"] = torch.rand(M, generator=generator)
    if skip:
        tensors["W_skip"] = torch.randn(D, D, generator=generator)
    return tensors


def write_set(folder, n_layers=2, hooks=("hook_resid_mid", "hook_mlp_out"), jumprelu=True, skip=True, extra=None):
    folder.mkdir(parents=True)
    layers = [layer_tensors(layer, jumprelu, skip) for layer in range(n_layers)]
    for layer, tensors in enumerate(layers):
        save_file(tensors, str(folder / f"layer_{layer}.safetensors"))
    config = {
        "model_name": "google/gemma-2-2b",
        "model_kind": "transcoder_set",
        "feature_input_hook": hooks[0],
        "feature_output_hook": hooks[1],
        **(extra or {}),
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return layers


def circuit_tracer_formula(tensors, x, topk=None):
    """SingleLayerTranscoder.forward written out (F.linear, JumpReLU x * (x > t), x @ W_skip.T)."""
    pre = x @ tensors["W_enc"].T + tensors["b_enc"]
    if "activation_function.threshold" in tensors:
        z = pre * (pre > tensors["activation_function.threshold"])
    elif topk:
        _, indices = pre.topk(topk, dim=-1)
        z = pre * torch.zeros_like(pre).scatter(-1, indices, 1.0)
    else:
        z = torch.relu(pre)
    y = z @ tensors["W_dec"] + tensors["b_dec"]
    if "W_skip" in tensors:
        y = y + x @ tensors["W_skip"].T
    return y, z


@pytest.mark.parametrize(
    "hooks,spaces",
    [
        (("hook_resid_mid", "hook_mlp_out"), ("resid_mid", "mlp_out")),
        (("ln2.hook_normalized", "hook_mlp_out"), ("normalized", "mlp_out")),
        (("mlp.hook_in", "mlp.hook_out"), ("mlp_input", "mlp_output")),
    ],
)
def test_jumprelu_skip_set_is_read_exactly(tmp_path, hooks, spaces):
    layers = write_set(tmp_path / "set", hooks=hooks)
    transcoders = load_transcoder_set(tmp_path / "set")
    assert sorted(transcoders) == [0, 1]
    x = torch.randn(30, D)
    for layer, tensors in enumerate(layers):
        config = transcoders[layer].config
        assert (config.input_space, config.output_space, config.activation, config.skip) == (*spaces, "jumprelu", True)
        assert config.layer == layer and config.model_name == "google/gemma-2-2b"
        assert config.source["format"] == "circuit-tracer"
        y, z = circuit_tracer_formula(tensors, x)
        with torch.no_grad():
            y_tc, z_tc = transcoders[layer](x)
        assert torch.allclose(z_tc, z, atol=1e-5) and torch.allclose(y_tc, y, atol=1e-4)


def test_activation_from_config_and_topk(tmp_path):
    layers = write_set(tmp_path / "relu", jumprelu=False, skip=False)
    x = torch.randn(20, D)
    relu = load_transcoder_set(tmp_path / "relu")
    assert relu[0].config.activation == "relu" and not relu[0].config.skip
    with torch.no_grad():
        assert torch.allclose(relu[1](x)[0], circuit_tracer_formula(layers[1], x)[0], atol=1e-4)
    layers = write_set(tmp_path / "topk", jumprelu=False, skip=False, extra={"activation": "topk", "k": 5})
    topk = load_transcoder_set(tmp_path / "topk")
    assert topk[0].config.activation == "signed_topk" and topk[0].config.k == 5
    with torch.no_grad():  # circuit-tracer's TopK keeps negative values among the k largest: so does tc's reading
        for shift in (0.0, -100.0):  # -100: every pre-activation negative, the k largest kept as they are
            tensors = dict(layers[0], b_enc=layers[0]["b_enc"] + shift)
            topk[0].b_enc.copy_(tensors["b_enc"])
            y, z = topk[0](x)
            assert torch.allclose(y, circuit_tracer_formula(tensors, x, topk=5)[0], rtol=1e-5, atol=1e-4)
            assert bool(((z != 0).sum(-1) == 5).all())
        assert bool((z < 0).sum(-1).eq(5).all())


def test_older_layout_lists_files(tmp_path):
    """safety-research's configs list {id, layer, filepath}, and Gemma Scope npz files may be listed."""
    write_set(tmp_path / "files")
    generator = torch.Generator().manual_seed(9)
    npz = {
        "W_enc": torch.randn(D, M, generator=generator),
        "W_dec": torch.randn(M, D, generator=generator),
        "b_enc": torch.randn(M, generator=generator),
        "b_dec": torch.randn(D, generator=generator),
        "threshold": torch.rand(M, generator=generator),
    }
    np.savez(tmp_path / "files" / "params.npz", **{k: v.numpy() for k, v in npz.items()})
    config = {
        "model_name": "m",
        "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out",
        "transcoders": [
            {"id": "a", "layer": 0, "filepath": "layer_0.safetensors"},
            {"id": "b", "layer": 1, "filepath": str(tmp_path / "files" / "params.npz")},
        ],
    }
    (tmp_path / "files" / "config.yaml").write_text(yaml.safe_dump(config))
    transcoders = load_transcoder_set(tmp_path / "files")
    assert transcoders[1].config.source["file_format"] == "gemma-scope"
    assert transcoders[1].config.input_space == "normalized"
    x = torch.randn(5, D)
    pre = x @ npz["W_enc"] + npz["b_enc"]
    with torch.no_grad():
        assert torch.allclose(
            transcoders[1](x)[0], (pre * (pre > npz["threshold"])) @ npz["W_dec"] + npz["b_dec"], atol=1e-4
        )


def test_write_set_and_refusals(tmp_path):
    layers = write_set(tmp_path / "set", hooks=("mlp.hook_in", "mlp.hook_out"))
    transcoders = load_transcoder_set(tmp_path / "set")
    written = circuit_tracer.write_set(transcoders, tmp_path / "out")
    assert [p.name for p in written] == ["layer_0.safetensors", "layer_1.safetensors"]
    config = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert config == {
        "model_name": "google/gemma-2-2b",
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "activation": "jumprelu",
    }
    x = torch.randn(10, D)
    for layer, tensors in enumerate(layers):
        again = load_file(str(tmp_path / "out" / f"layer_{layer}.safetensors"))
        assert torch.allclose(circuit_tracer_formula(again, x)[0], circuit_tracer_formula(tensors, x)[0], atol=1e-4)
    with pytest.raises(TcError, match="every layer from 0"):
        circuit_tracer.write_set({1: transcoders[1]}, tmp_path / "gap")
    # through tc convert: refused before anything is written, naming the destination (not its staging folder)
    save_transcoder(transcoders[1], tmp_path / "layer1")
    with pytest.raises(TcError) as refused:
        convert(tmp_path / "layer1", tmp_path / "gap2", "circuit-tracer")
    assert str(refused.value).startswith(
        f"writing {tmp_path / 'gap2'} as a circuit-tracer set: circuit-tracer "
        "needs a transcoder for every layer from 0, got [1]"
    )
    assert not (tmp_path / "gap2").exists() and not list(tmp_path.glob("gap2*"))
    (tmp_path / "clt").mkdir()
    (tmp_path / "clt" / "config.yaml").write_text(
        yaml.safe_dump({"model_kind": "cross_layer_transcoder", "feature_input_hook": "hook_resid_mid"})
    )
    # a cross-layer transcoder is not a per-layer set (load_transcoders reads it: test_formats_circuit_tracer_clt)
    with pytest.raises(TcError, match="is a cross-layer transcoder, which this command does not read yet"):
        load_transcoder_set(tmp_path / "clt")
    write_set(tmp_path / "odd", hooks=("hook_resid_post", "hook_mlp_out"))
    with pytest.raises(TcError, match="reads 'hook_resid_post'"):
        load_transcoder_set(tmp_path / "odd")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hook_names_are_circuit_tracers_and_every_model_command_accepts_the_set(tmp_path, tiny_models, arch):
    """circuit-tracer attaches a config's hooks at f"blocks.{layer}.{hook}" (its ReplacementModel's feature
    hooks): tc records those names, so a set in the layout of its Gemma Scope configs (ln2.hook_normalized ->
    hook_mlp_out), as tc convert writes tc's own, passes the model check, and so do its copies in tc and
    SAELens folders, and a tc folder whose config kept the bare names (as copies made before did)."""
    from circuit_helpers import random_transcoders, save_transcoders
    from tccli.transcoders.formats import load_checked_transcoders

    loaded = tiny_models[arch]
    info = loaded.info
    save_transcoders(random_transcoders(info, 16), tmp_path / "tc")
    convert(tmp_path / "tc", tmp_path / "ct", "circuit-tracer")
    config = yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())
    assert (config["feature_input_hook"], config["feature_output_hook"]) == ("ln2.hook_normalized", "hook_mlp_out")
    checked = load_checked_transcoders(str(tmp_path / "ct"), loaded)
    assert sorted(checked) == list(range(info.n_layers))
    for layer, transcoder in checked.items():
        circuit_tracers = (
            f"blocks.{layer}.{config['feature_input_hook']}",
            f"blocks.{layer}.{config['feature_output_hook']}",
        )
        assert (transcoder.config.input_hook, transcoder.config.output_hook) == circuit_tracers
        assert circuit_tracers == (info.layer(layer).mlp_in, info.layer(layer).mlp_out)
    for fmt in ("tc", "saelens"):
        convert(tmp_path / "ct", tmp_path / fmt / "copy", fmt)
        assert sorted(load_checked_transcoders(str(tmp_path / fmt / "copy"), loaded)) == list(range(info.n_layers))
    bare = load_transcoder_set(tmp_path / "tc" / "layer_1")[1]
    bare.config.input_hook, bare.config.output_hook = "ln2.hook_normalized", "hook_mlp_out"
    save_transcoder(bare, tmp_path / "bare")
    assert list(load_checked_transcoders(str(tmp_path / "bare"), loaded)) == [1]
    bare.config.layer = 0  # the hooks stand under the transcoder's own layer: still checked against the model
    bare.config.input_hook = "blocks.1.ln2.hook_normalized"
    save_transcoder(bare, tmp_path / "wrong")
    with pytest.raises(
        TcError, match="reads blocks.1.ln2.hook_normalized -> hook_mlp_out; this model's MLP is blocks.0"
    ):
        load_checked_transcoders(str(tmp_path / "wrong"), loaded)


@pytest.mark.parametrize("listed", [False, True])
def test_a_missing_middle_layer_is_refused_naming_it(tmp_path, listed):
    """circuit-tracer needs every layer from 0 to the last: a set missing layer 1 of 0-2 is refused in one line
    naming the missing file (it was read as layers 0 and 2)."""
    write_set(tmp_path / "set", n_layers=3)
    (tmp_path / "set" / "layer_1.safetensors").unlink()
    if listed:  # the older layout lists {id, layer, filepath}: layer 1 not listed at all
        entries = [{"id": str(i), "layer": i, "filepath": f"layer_{i}.safetensors"} for i in (0, 2)]
        config = yaml.safe_load((tmp_path / "set" / "config.yaml").read_text())
        (tmp_path / "set" / "config.yaml").write_text(yaml.safe_dump({**config, "transcoders": entries}))
    with pytest.raises(TcError) as refused:
        load_transcoder_set(tmp_path / "set")
    message = str(refused.value)
    if listed:
        assert message == (
            f"{tmp_path / 'set' / 'config.yaml'} lists no transcoder for layer 1: a circuit-tracer set needs one "
            "for every layer from 0 to 2"
        )
    else:
        assert message == (
            f"{tmp_path / 'set' / 'layer_1.safetensors'} does not exist: a circuit-tracer set needs a transcoder "
            "for every layer from 0 to 2"
        )
    assert "\n" not in message
