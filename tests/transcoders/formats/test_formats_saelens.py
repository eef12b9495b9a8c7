"""SAELens folders: every architecture read against SAELens's formulas, written and read back."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from format_helpers import D, M, outputs, random_transcoder
from tccli.errors import TcError
from tccli.transcoders.files import save_transcoder
from tccli.transcoders.formats import load_transcoder_set, saelens

# ----------------------------------------------------------------------------- SAELens


def test_saelens_transcoder_round_trip_folds_b_pre(tmp_path):
    original = random_transcoder()
    saelens.write(original, tmp_path / "sl")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["architecture"] == "transcoder" and cfg["apply_b_dec_to_input"] is False
    assert cfg["d_in"] == D and cfg["d_sae"] == M and cfg["d_out"] == D
    assert cfg["metadata"]["hook_name"] == "blocks.1.ln2.hook_normalized"
    assert cfg["metadata"]["hook_name_out"] == cfg["hook_name_out"] == "blocks.1.hook_mlp_out"
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "sl" / "sae_weights.safetensors"))
    assert sorted(tensors) == ["W_dec", "W_enc", "b_dec", "b_enc"]
    assert torch.equal(tensors["b_dec"], original.b_dec.detach())  # SAELens's b_dec is the output bias
    # SAELens transcoder maths on the written tensors reproduces tc's outputs
    x = torch.randn(40, D)
    z = torch.relu(x @ tensors["W_enc"] + tensors["b_enc"])
    y, z_tc = outputs(original, x)
    assert torch.allclose(z, z_tc, atol=1e-5) and torch.allclose(z @ tensors["W_dec"] + tensors["b_dec"], y, atol=1e-4)
    again = saelens.read(tmp_path / "sl")
    assert again.config == original.config  # tc_config restores everything
    assert torch.allclose(outputs(again, x)[0], y, atol=1e-4) and not again.b_pre.any()


def test_saelens_sae_with_tied_bias_is_bit_identical(tmp_path):
    original = random_transcoder(kind="sae", activation="topk", k=3)
    with torch.no_grad():
        original.b_pre.copy_(original.b_dec)
    saelens.write(original, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 3 and cfg["apply_b_dec_to_input"] is True
    again = saelens.read(tmp_path / "sae")
    x = torch.randn(30, D)
    for a, b in zip(outputs(original, x), outputs(again, x)):
        assert torch.equal(a, b)


def write_foreign_saelens(folder, cfg, tensors):
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))


def foreign_tensors(d_out=D, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D, M, generator=generator),
        "b_enc": torch.randn(M, generator=generator),
        "W_dec": torch.randn(M, d_out, generator=generator),
        "b_dec": torch.randn(d_out, generator=generator),
    }


def test_read_foreign_saelens_layouts(tmp_path):
    x = torch.randn(25, D)
    t = foreign_tensors()
    # pre-6 flat layout, standard ReLU SAE subtracting b_dec from its input
    write_foreign_saelens(
        tmp_path / "old",
        {
            "d_in": D,
            "d_sae": M,
            "hook_name": "blocks.3.hook_mlp_out",
            "hook_layer": 3,
            "model_name": "gpt2",
            "activation_fn_str": "relu",
            "apply_b_dec_to_input": True,
        },
        t,
    )
    sae = saelens.read(tmp_path / "old")
    assert sae.config.kind == "sae" and sae.config.layer == 3 and sae.config.input_hook == "blocks.3.hook_mlp_out"
    z = torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    y, z_tc = outputs(sae, x)
    assert torch.equal(z, z_tc) and torch.equal(y, z @ t["W_dec"] + t["b_dec"])
    # 6.x layout, a transcoder (no input bias) named by its hooks
    write_foreign_saelens(
        tmp_path / "new",
        {
            "architecture": "transcoder",
            "d_in": D,
            "d_sae": M,
            "d_out": D,
            "apply_b_dec_to_input": False,
            "normalize_activations": "none",
            "hook_name_out": "blocks.0.hook_mlp_out",
            "metadata": {
                "model_name": "gpt2",
                "hook_name": "blocks.0.ln2.hook_normalized",
                "sae_lens_version": "6.5.0",
            },
        },
        t,
    )
    transcoder = saelens.read(tmp_path / "new")
    assert transcoder.config.kind == "transcoder" and transcoder.config.layer == 0
    assert transcoder.config.output_hook == "blocks.0.hook_mlp_out"
    z = torch.relu(x @ t["W_enc"] + t["b_enc"])
    assert torch.equal(outputs(transcoder, x)[0], z @ t["W_dec"] + t["b_dec"])
    # pre-6 TopK through activation_fn_kwargs
    write_foreign_saelens(
        tmp_path / "topk",
        {
            "d_in": D,
            "d_sae": M,
            "hook_name": "blocks.2.hook_mlp_out",
            "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": 4},
        },
        t,
    )
    topk = saelens.read(tmp_path / "topk")
    assert topk.config.activation == "topk" and topk.config.k == 4 and topk.config.layer == 2
    # a set folder mixing formats is read through load_transcoder_set
    save_transcoder(random_transcoder(layer=1), tmp_path / "set" / "layer_1")
    os.rename(tmp_path / "new", tmp_path / "set" / "saelens_0")
    assert sorted(load_transcoder_set(tmp_path / "set")) == [0, 1]


def test_unsupported_saelens_folders_are_refused(tmp_path):
    write_foreign_saelens(
        tmp_path / "jump",
        {"architecture": "jumprelu", "d_in": D, "d_sae": M, "metadata": {"hook_name": "blocks.0.hook_mlp_out"}},
        foreign_tensors(),
    )
    with pytest.raises(TcError, match="architecture 'jumprelu' is not supported"):
        saelens.read(tmp_path / "jump")
    write_foreign_saelens(
        tmp_path / "norm",
        {
            "d_in": D,
            "d_sae": M,
            "hook_name": "blocks.0.hook_mlp_out",
            "normalize_activations": "expected_average_only_in",
        },
        foreign_tensors(),
    )
    with pytest.raises(TcError, match="normalize_activations"):
        saelens.read(tmp_path / "norm")
    write_foreign_saelens(
        tmp_path / "rescale",
        {
            "architecture": "topk",
            "k": 2,
            "d_in": D,
            "d_sae": M,
            "rescale_acts_by_decoder_norm": True,
            "metadata": {"hook_name": "blocks.0.hook_mlp_out"},
        },
        foreign_tensors(),
    )
    with pytest.raises(TcError, match="rescale_acts_by_decoder_norm"):
        saelens.read(tmp_path / "rescale")
    write_foreign_saelens(
        tmp_path / "shape", {"d_in": D, "d_sae": M + 1, "hook_name": "blocks.0.hook_mlp_out"}, foreign_tensors()
    )
    with pytest.raises(TcError, match="tensor W_enc has shape"):
        saelens.read(tmp_path / "shape")


# ----------------------------------------------------------------------------- transcoder architectures


def saelens_transcoder_tensors(architecture, d_out=D, seed=4):
    """Tensors as SAELens's transcoder classes hold them: W_enc [d_in, d_sae], W_skip [d_out, d_in]."""
    generator = torch.Generator().manual_seed(seed)
    tensors = foreign_tensors(d_out, seed)
    if "jumprelu" in architecture:
        tensors["threshold"] = torch.rand(M, generator=generator) - 0.2  # some negative: SAELens's ReLU decides
    if "skip" in architecture:
        tensors["W_skip"] = torch.randn(d_out, D, generator=generator)
    return tensors


def saelens_formula(architecture, tensors, x):
    """SAELens's forward (sae_lens/saes/transcoder.py) written out."""
    pre = x @ tensors["W_enc"] + tensors["b_enc"]
    z = torch.relu(pre)
    if "jumprelu" in architecture:
        z = z * (pre > tensors["threshold"])
    y = z @ tensors["W_dec"] + tensors["b_dec"]
    if "skip" in architecture:
        y = y + x @ tensors["W_skip"].T
    return y, z


@pytest.mark.parametrize(
    "architecture", ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"]
)
@pytest.mark.parametrize(
    "hooks,spaces",
    [
        (("blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out"), ("normalized", "mlp_out")),
        (("blocks.2.mlp.hook_in", "blocks.2.hook_mlp_out"), ("mlp_input", "mlp_out")),
        (("blocks.2.hook_mlp_in", "blocks.2.mlp.hook_out"), ("mlp_input", "mlp_output")),
        (("blocks.2.hook_resid_mid", "blocks.2.hook_mlp_out"), ("resid_mid", "mlp_out")),
    ],
)
def test_saelens_transcoder_architectures(tmp_path, architecture, hooks, spaces):
    tensors = saelens_transcoder_tensors(architecture)
    write_foreign_saelens(
        tmp_path / "t",
        {
            "architecture": architecture,
            "d_in": D,
            "d_sae": M,
            "d_out": D,
            "apply_b_dec_to_input": False,
            "normalize_activations": "none",
            "dtype": "float32",
            "metadata": {
                "model_name": "google/gemma-2-2b",
                "hook_name": hooks[0],
                "hook_name_out": hooks[1],
                "sae_lens_version": "6.54.12",
            },
        },
        tensors,
    )
    transcoder = saelens.read(tmp_path / "t")
    config = transcoder.config
    assert (config.input_space, config.output_space) == spaces and config.layer == 2
    assert config.skip == ("skip" in architecture) and config.activation == (
        "jumprelu" if "jumprelu" in architecture else "relu"
    )
    assert config.source["format"] == "saelens" and config.source["architecture"] == architecture
    x = torch.randn(50, D)
    y, z = saelens_formula(architecture, tensors, x)
    y_tc, z_tc = outputs(transcoder, x)
    assert torch.allclose(z_tc, z, atol=1e-6) and torch.allclose(y_tc, y, atol=1e-5)
    # written back by tc and read again: the same function, and SAELens's formula on the written tensors
    saelens.write(transcoder, tmp_path / "back")
    cfg = json.loads((tmp_path / "back" / "cfg.json").read_text())
    assert cfg["architecture"] == architecture
    hook = {"normalized": "ln2.hook_normalized", "mlp_input": "mlp.hook_in", "resid_mid": "hook_resid_mid"}[spaces[0]]
    assert cfg["metadata"]["hook_name"] == f"blocks.2.{hook}"
    from safetensors.torch import load_file

    written = load_file(str(tmp_path / "back" / "sae_weights.safetensors"))
    assert torch.allclose(saelens_formula(architecture, written, x)[0], y, atol=1e-5)
    assert torch.allclose(outputs(saelens.read(tmp_path / "back"), x)[0], y, atol=1e-5)


def test_saelens_unknown_hooks_and_uncentred_outputs(tmp_path):
    tensors = foreign_tensors()
    base = {"architecture": "transcoder", "d_in": D, "d_sae": M, "d_out": D, "apply_b_dec_to_input": False}
    write_foreign_saelens(
        tmp_path / "resid",
        {**base, "hook_name": "blocks.1.hook_resid_post", "hook_name_out": "blocks.1.hook_mlp_out"},
        tensors,
    )
    with pytest.raises(TcError, match="reads 'blocks.1.hook_resid_post'"):
        saelens.read(tmp_path / "resid")
    # an unprocessed model's hook_mlp_out is the raw MLP output
    write_foreign_saelens(
        tmp_path / "raw",
        {
            **base,
            "hook_name": "blocks.1.mlp.hook_in",
            "hook_name_out": "blocks.1.hook_mlp_out",
            "model_from_pretrained_kwargs": {"center_writing_weights": False},
        },
        tensors,
    )
    assert saelens.read(tmp_path / "raw").config.output_space == "mlp_output"


def test_saelens_refuses_what_it_cannot_hold(tmp_path):
    transcoder = random_transcoder(activation="jumprelu")
    with torch.no_grad():
        transcoder.threshold.fill_(-0.5)
    with pytest.raises(TcError, match="negative threshold"):
        saelens.write(transcoder, tmp_path / "neg")
    assert not (tmp_path / "neg").exists()
    with pytest.raises(TcError, match="SAELens's TopK applies ReLU after the selection; a signed_topk"):
        saelens.write(random_transcoder(activation="signed_topk", k=3), tmp_path / "signed")
    assert not (tmp_path / "signed").exists()
