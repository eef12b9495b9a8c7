"""The cross-layer transcoder's math (docs/method.md section 11), worked out by hand on small cases, and its
tc file format."""

import pytest
import torch

from tccli.config.transcoders import CrossLayerConfig, TranscoderConfig
from tccli.errors import TcError
from tccli.transcoders.cross_layer import CrossLayerTranscoder
from tccli.transcoders.files import is_cross_layer_folder, load_cross_layer, save_cross_layer
from tccli.transcoders.transcoder import Transcoder


def random_clt(activation="jumprelu", k=None, skip=False, layers=(0, 1, 2), d=4, m=6, seed=0):
    clt = CrossLayerTranscoder(
        CrossLayerConfig(d_in=d, d_out=d, n_features=m, layers=list(layers), activation=activation, k=k, skip=skip)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in clt.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return clt


def test_two_layer_clt_by_hand():
    # d = 1, m = 1, two layers, ReLU: layer 0's feature writes 2 to itself and 3 to layer 1; layer 1's writes 5.
    clt = CrossLayerTranscoder(CrossLayerConfig(d_in=1, d_out=1, n_features=1, layers=[0, 1], activation="relu"))
    with torch.no_grad():
        clt.W_enc["0"].fill_(1.0)
        clt.W_enc["1"].fill_(-1.0)
        clt.W_dec["0"].copy_(torch.tensor([[[2.0], [3.0]]]))
        clt.W_dec["1"].copy_(torch.tensor([[[5.0]]]))
        clt.b_dec["0"].fill_(0.5)
        clt.b_dec["1"].fill_(-0.5)
    outputs, activations = clt({0: torch.tensor([[4.0]]), 1: torch.tensor([[-2.0]])})
    assert activations[0].item() == 4.0 and activations[1].item() == 2.0
    assert outputs[0].item() == 4 * 2 + 0.5
    assert outputs[1].item() == 4 * 3 + 2 * 5 - 0.5
    assert torch.equal(clt.decoder(0, 1), torch.tensor([[3.0]]))
    with pytest.raises(TcError, match="write only to layers"):
        clt.decoder(1, 0)


def test_topk_is_per_layer():
    clt = random_clt("topk", k=2)
    z = clt.encode(1, torch.randn(5, 4))
    assert ((z > 0).sum(-1) <= 2).all()


@pytest.mark.parametrize("activation,k,skip", [("jumprelu", None, False), ("topk", 2, True), ("relu", None, True)])
def test_a_per_layer_set_as_a_clt_gives_the_same_outputs_bit_for_bit(activation, k, skip):
    generator = torch.Generator().manual_seed(1)
    transcoders = {}
    for layer in (0, 2, 3):
        t = Transcoder(
            TranscoderConfig(d_in=4, d_out=4, n_features=6, activation=activation, k=k, skip=skip, layer=layer)
        )
        with torch.no_grad():
            for param in t.parameters():
                param.copy_(torch.randn(param.shape, generator=generator))
        transcoders[layer] = t
    clt = CrossLayerTranscoder.from_transcoders(transcoders)
    inputs = {layer: torch.randn(7, 4, generator=generator) for layer in transcoders}
    outputs, activations = clt(inputs)
    for layer, t in transcoders.items():
        expected_output, expected_z = t(inputs[layer])
        assert torch.equal(activations[layer], expected_z)
        assert torch.equal(outputs[layer], expected_output)
        view = clt.layer_transcoder(layer)
        assert torch.equal(view(inputs[layer])[0], expected_output)
    assert clt.decoder(0, 3).abs().sum() == 0


def test_decode_sums_every_earlier_layers_writes():
    clt = random_clt(layers=(1, 3, 4))
    z = {layer: torch.randn(2, 6) for layer in clt.layers}
    out = clt.decode(z)
    for t in clt.layers:
        expected = clt.b_dec[str(t)].clone()
        for s in clt.layers:
            if s <= t:
                expected = expected + z[s] @ clt.decoder(s, t)
        torch.testing.assert_close(out[t], expected, rtol=1e-6, atol=1e-6)
    rows = clt.decoder_rows(3, torch.tensor([4, 0]))
    assert rows.shape == (2, 2, 4) and torch.equal(rows[0, 1], clt.decoder(3, 4)[4])


def test_layer_transcoder_shares_the_encoder():
    clt = random_clt()
    view = clt.layer_transcoder(1)
    with torch.no_grad():
        clt.W_enc["1"][0, 0] = 123.0
    assert view.W_enc[0, 0].item() == 123.0
    assert view.config.layer == 1 and view.config.activation == "jumprelu"


@pytest.mark.parametrize("activation,k,skip", [("jumprelu", None, True), ("topk", 3, False)])
def test_saved_and_reloaded_clt_gives_identical_outputs(tmp_path, activation, k, skip):
    clt = random_clt(activation, k, skip)
    folder = save_cross_layer(clt, tmp_path / "clt")
    assert is_cross_layer_folder(folder)
    again = load_cross_layer(folder)
    inputs = {layer: torch.randn(3, 4) for layer in clt.layers}
    for a, b in zip(clt(inputs), again(inputs)):
        for layer in clt.layers:
            assert torch.equal(a[layer], b[layer])
    assert again.config == clt.config


def test_config_refuses_bad_layers():
    with pytest.raises(TcError, match="increasing"):
        CrossLayerConfig(d_in=2, d_out=2, n_features=2, layers=[1, 1]).validate()
    with pytest.raises(TcError, match="activation"):
        CrossLayerConfig(d_in=2, d_out=2, n_features=2, layers=[0], activation="signed_topk").validate()


def test_load_transcoders_gives_the_clt_and_set_readers_refuse_it(tmp_path):
    from tccli.transcoders.formats import is_cross_layer, load_transcoder_set, load_transcoders

    clt = random_clt()
    folder = save_cross_layer(clt, tmp_path / "clt")
    assert is_cross_layer(folder)
    loaded = load_transcoders(folder, layers=[1])
    assert isinstance(loaded, CrossLayerTranscoder) and loaded.layers == [0, 1, 2]
    with pytest.raises(TcError, match="no layer 5"):
        load_transcoders(folder, layers=[5])
    with pytest.raises(TcError, match="cross-layer transcoder"):
        load_transcoder_set(folder)


def test_random_clt_fixture_is_checked_against_the_model(tiny_models, random_clt_folder):
    from tccli.transcoders.files import check_matches_model
    from tccli.transcoders.formats import load_transcoders

    clt = load_transcoders(random_clt_folder("gpt2", "jumprelu", skip=True))
    assert clt.config.activation == "jumprelu" and clt.W_skip is not None
    assert clt.decoder(0, clt.layers[-1]).abs().sum() > 0
    for layer in clt.layers:
        check_matches_model(clt.layer_transcoder(layer), tiny_models["gpt2"].info)


def test_from_transcoders_refuses_layers_of_different_kinds():
    a = Transcoder(TranscoderConfig(d_in=4, d_out=4, n_features=6, layer=0))
    b = Transcoder(TranscoderConfig(d_in=4, d_out=4, n_features=6, activation="topk", k=2, layer=1))
    with pytest.raises(TcError, match="differs in shape or kind"):
        CrossLayerTranscoder.from_transcoders({0: a, 1: b})
