"""Reading any format as a set, tc convert between formats, hub ids."""

import pytest
import torch
from test_formats_paper import paper_config_class, paper_payload, save_pickled

from conftest import run_tc
from format_helpers import D, M, outputs, random_transcoder
from tccli.config.transcoders import TranscoderConfig
from tccli.errors import TcError
from tccli.transcoders.files import save_transcoder
from tccli.transcoders.formats import convert, load_transcoder_set
from tccli.transcoders.transcoder import Transcoder

# ----------------------------------------------------------------------------- conversion


def test_convert_set_to_saelens_and_back(tmp_path):
    for layer in (0, 2):
        save_transcoder(random_transcoder(layer=layer, seed=layer), tmp_path / "tcs" / f"layer_{layer}")
    written = convert(tmp_path / "tcs", tmp_path / "sl", "saelens")
    assert [p.name for p in written] == ["layer_0", "layer_2"]
    convert(tmp_path / "sl", tmp_path / "back", "tc")
    original, back = load_transcoder_set(tmp_path / "tcs"), load_transcoder_set(tmp_path / "back")
    x = torch.randn(10, D)
    for layer in (0, 2):
        assert back[layer].config == original[layer].config
        assert torch.allclose(outputs(back[layer], x)[0], outputs(original[layer], x)[0], atol=1e-4)
    with pytest.raises(TcError, match="already exists"):
        convert(tmp_path / "tcs", tmp_path / "sl", "tc")


def test_tc_convert_command(tmp_path):
    module, Config = paper_config_class()
    save_pickled(
        tmp_path / "tc.pt",
        paper_payload(
            Config(
                hook_point="blocks.4.ln2.hook_normalized",
                out_hook_point="blocks.4.hook_mlp_out",
                hook_point_layer=4,
                is_transcoder=True,
            )
        ),
        module,
    )
    result = run_tc("convert", "--input", str(tmp_path / "tc.pt"), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "out")
    assert list(load_transcoder_set(tmp_path / "out")) == [4]
    bad = run_tc("convert", "--input", str(tmp_path / "tc.pt"), "--out", str(tmp_path / "x"), "--to", "pt")
    assert (
        bad.returncode == 2 and "--to must be one of tc, saelens, sparsify, gemma-scope, circuit-tracer" in bad.stderr
    )


# ----------------------------------------------------------------------------- every format, converted


def skip_transcoder(layer, activation="jumprelu", input_space="mlp_input", output_space="mlp_output", seed=0):
    torch.manual_seed(seed + layer)
    config = TranscoderConfig(
        d_in=D,
        d_out=D,
        n_features=M,
        activation=activation,
        k=4 if activation in ("topk", "batchtopk") else None,
        skip=activation != "relu",
        layer=layer,
        model_name="some/model",
        input_space=input_space,
        output_space=output_space,
    )
    transcoder = Transcoder(config)
    with torch.no_grad():
        for param in transcoder.parameters():
            param.normal_()
        if transcoder.threshold is not None:
            transcoder.threshold.uniform_(0, 1)
    return transcoder


@pytest.mark.parametrize(
    "fmt,activation,spaces",
    [
        ("tc", "batchtopk", ("resid_mid", "mlp_out")),
        ("saelens", "jumprelu", ("mlp_input", "mlp_output")),
        ("sparsify", "topk", ("mlp_input", "mlp_output")),
        ("circuit-tracer", "jumprelu", ("resid_mid", "mlp_out")),
        ("gemma-scope", "relu", ("normalized", "mlp_out")),
    ],
)
def test_convert_to_every_format_and_back(tmp_path, fmt, activation, spaces):
    for layer in (0, 1):
        save_transcoder(skip_transcoder(layer, activation, *spaces), tmp_path / "tcs" / f"layer_{layer}")
    if fmt == "gemma-scope":  # Gemma Scope has no skip connection
        for layer in (0, 1):
            original = load_transcoder_set(tmp_path / "tcs" / f"layer_{layer}")[layer]
            original.config.skip = False
            original.W_skip = None
            save_transcoder(original, tmp_path / "noskip" / f"layer_{layer}")
        source = tmp_path / "noskip"
    else:
        source = tmp_path / "tcs"
    convert(source, tmp_path / "out", fmt)
    back = load_transcoder_set(tmp_path / "out")
    original = load_transcoder_set(source)
    x = torch.randn(16, D)
    for layer in (0, 1):
        assert (back[layer].config.input_space, back[layer].config.output_space) == spaces
        assert torch.allclose(outputs(back[layer], x)[0], outputs(original[layer], x)[0], atol=1e-4)
    assert run_tc("info", str(tmp_path / "out")).returncode == 0


def test_convert_refuses_before_writing(tmp_path):
    save_transcoder(skip_transcoder(0, "jumprelu", "resid_mid", "mlp_out"), tmp_path / "tcs" / "layer_0")
    with pytest.raises(TcError, match="sparsify holds TopK coders"):
        convert(tmp_path / "tcs", tmp_path / "out", "sparsify")
    assert not (tmp_path / "out").exists()


def test_info_shows_kind_spaces_and_source(tmp_path):
    from tccli.cli import info

    save_transcoder(skip_transcoder(0, "jumprelu", "resid_mid", "mlp_out"), tmp_path / "tcs" / "layer_0")
    convert(tmp_path / "tcs", tmp_path / "ct", "circuit-tracer")
    summary = info.describe(tmp_path / "ct")
    assert summary["format"] == "circuit-tracer" and summary["layers"] == [0]
    text = info.render(summary)
    assert "(jumprelu, skip)" in text and "reads resid_mid, writes mlp_out" in text
    assert "from circuit-tracer" in text and "some/model" in text


def test_hub_id_offline_is_one_line(tmp_path, monkeypatch):
    result = run_tc(
        "info", "nobody-here/no-such-transcoders", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0]  # tc info takes paths only
    from tccli.transcoders.formats import hub

    assert hub.looks_like_hub_id("mntss/transcoder-Llama-3.2-1B") and not hub.looks_like_hub_id("/abs/path")
    assert hub.split_hub_id("org/repo/sub/dir@rev") == ("org/repo", "sub/dir", "rev")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(TcError, match="cannot download nobody-here/no-such-transcoders from the HuggingFace hub"):
        load_transcoder_set("nobody-here/no-such-transcoders")
