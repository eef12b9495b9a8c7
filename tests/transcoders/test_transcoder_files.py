import json

import pytest
import torch

from tccli.config.transcoders import TranscoderConfig
from tccli.errors import TcError
from tccli.transcoders.files import load_transcoder, save_transcoder
from tccli.transcoders.formats import load_transcoder_set
from tccli.transcoders.transcoder import Transcoder


def random_transcoder(layer=0, d=8, m=32, activation="relu", k=None, seed=0, skip=False):
    torch.manual_seed(seed)
    tc = Transcoder(TranscoderConfig(d_in=d, d_out=d, n_features=m, activation=activation, k=k, layer=layer, skip=skip))
    with torch.no_grad():
        for p in tc.parameters():
            p.normal_()
    return tc


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("activation,k", [("relu", None), ("topk", 4), ("batchtopk", 4), ("jumprelu", None)])
def test_save_load_bit_identical(tmp_path, activation, k, skip):
    tc = random_transcoder(activation=activation, k=k, skip=skip)
    save_transcoder(tc, tmp_path / activation)
    again = load_transcoder(tmp_path / activation)
    assert again.tensor_names() == tc.tensor_names()
    x = torch.randn(50, 8)
    y1, z1 = tc(x)
    y2, z2 = again(x)
    assert torch.equal(y1, y2) and torch.equal(z1, z2)
    assert again.config == tc.config


def test_topk_keeps_k(tmp_path):
    tc = random_transcoder(activation="topk", k=3)
    z = tc.encode(torch.randn(20, 8))
    assert ((z > 0).sum(-1) <= 3).all()


def test_set_of_folders(tmp_path):
    for layer in (0, 2):
        save_transcoder(random_transcoder(layer=layer, seed=layer), tmp_path / f"layer_{layer}")
    tcs = load_transcoder_set(tmp_path)
    assert sorted(tcs) == [0, 2]
    single = load_transcoder_set(tmp_path / "layer_2")
    assert list(single) == [2]


@pytest.mark.parametrize("field,value", [("d_in", "wide"), ("activation", "gelu"), ("k", -4), ("colour", "red")])
def test_bad_config_json_is_one_line_naming_the_field(tmp_path, field, value):
    tc = random_transcoder(activation="topk", k=4)
    save_transcoder(tc, tmp_path / "t")
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    config[field] = value
    (tmp_path / "t" / "config.json").write_text(json.dumps(config))
    with pytest.raises(TcError, match=field) as caught:
        load_transcoder(tmp_path / "t")
    assert "\n" not in str(caught.value)


def test_config_of_format_version_1_still_loads(tmp_path):
    tc = random_transcoder()
    save_transcoder(tc, tmp_path / "t")
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    for new_field in ("skip", "input_space", "output_space", "source"):
        del config[new_field]
    config["format_version"] = 1
    (tmp_path / "t" / "config.json").write_text(json.dumps(config))
    again = load_transcoder(tmp_path / "t")
    assert again.config.input_space == "normalized" and again.config.skip is False


def test_a_set_for_another_model_needs_model_named():
    """With no --model the built-in model runs: a set trained on another model (a hub name, which cannot be
    compared with it) is refused, naming that model, unless --model was given; sets made for the built-in
    model, or naming none, run."""
    from types import SimpleNamespace

    from tccli.model.loading import BUILTIN_MODEL_DIR
    from tccli.transcoders.files import check_model_named

    transcoder = random_transcoder(layer=1)
    by_default, named = SimpleNamespace(by_default=True), SimpleNamespace(by_default=False)
    transcoder.config.model_name = "gpt2"
    with pytest.raises(TcError) as refused:
        check_model_named(transcoder, by_default)
    assert str(refused.value) == (
        "transcoder for layer 1 was trained on the model gpt2, but no --model was given, so the built-in model "
        "would run: pass --model gpt2"
    )
    check_model_named(transcoder, named)
    for name in ("builtin", str(BUILTIN_MODEL_DIR), None):
        transcoder.config.model_name = name
        check_model_named(transcoder, by_default)
