"""The transcoder's math for every kind, worked out by hand on small cases."""

import pytest
import torch

from tccli.config.transcoders import ACTIVATIONS, K_ACTIVATIONS, TranscoderConfig
from tccli.errors import TcError
from tccli.transcoders.transcoder import Transcoder


def make(activation="relu", k=None, skip=False, d=3, m=4):
    return Transcoder(TranscoderConfig(d_in=d, d_out=d, n_features=m, activation=activation, k=k, skip=skip))


def test_jumprelu_keeps_values_strictly_above_each_threshold():
    tc = make("jumprelu")
    with torch.no_grad():
        tc.threshold.copy_(torch.tensor([0.5, 1.0, -1.0, 2.0]))
    pre = torch.tensor([[0.6, 1.0, -0.5, 1.9]])
    # 0.6 > 0.5 kept; 1.0 is not > 1.0; -0.5 > -1.0 kept (no ReLU: the threshold decides); 1.9 < 2.0
    assert torch.equal(tc.activate(pre), torch.tensor([[0.6, 0.0, -0.5, 0.0]]))


def test_batchtopk_inference_uses_its_threshold():
    tc = make("batchtopk", k=2)
    with torch.no_grad():
        tc.threshold.fill_(0.7)
    pre = torch.tensor([[0.8, 0.1, 0.9, 0.71], [0.2, 0.3, 0.0, 0.6]])
    # at inference the per-token count is free: 3 entries of row 0 pass, none of row 1
    assert torch.equal(tc.activate(pre), torch.tensor([[0.8, 0.0, 0.9, 0.71], [0.0, 0.0, 0.0, 0.0]]))


def test_topk_then_relu():
    tc = make("topk", k=2)
    pre = torch.tensor([[3.0, -1.0, 2.0, 1.0], [-3.0, -1.0, -2.0, 0.5]])
    assert torch.equal(tc.activate(pre), torch.tensor([[3.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.5]]))


def test_signed_topk_keeps_the_k_largest_as_they_are():
    tc = make("signed_topk", k=2)
    pre = torch.tensor([[3.0, -1.0, 2.0, 1.0], [-3.0, -1.0, -2.0, 0.5]])
    # row 0: as topk; row 1 has one positive value, so the second largest (-1.0) is kept negative
    assert torch.equal(tc.activate(pre), torch.tensor([[3.0, 0.0, 2.0, 0.0], [0.0, -1.0, 0.0, 0.5]]))


def test_skip_term_is_added_on_the_raw_input():
    tc = make("relu", skip=True, d=2, m=2)
    with torch.no_grad():
        tc.W_enc.copy_(torch.eye(2))
        tc.W_dec.copy_(2 * torch.eye(2))
        tc.b_pre.copy_(torch.tensor([1.0, 0.0]))
        tc.b_dec.copy_(torch.tensor([0.0, 10.0]))
        tc.W_skip.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    x = torch.tensor([[3.0, -1.0]])
    # z = relu(x - b_pre) = [2, 0]; z W_dec = [4, 0]; + b_dec = [4, 10]; x W_skip = [-1, 3]
    output, z = tc(x)
    assert torch.equal(z, torch.tensor([[2.0, 0.0]]))
    assert torch.equal(output, torch.tensor([[3.0, 13.0]]))
    assert torch.equal(tc.decode(z) + tc.skip_term(x), output)


def test_optional_tensors_exist_exactly_when_the_config_says():
    assert make("relu").tensor_names() == ("W_enc", "b_enc", "W_dec", "b_dec", "b_pre")
    assert "threshold" in make("jumprelu").tensor_names()
    assert "threshold" in make("batchtopk", k=1).tensor_names()
    assert "W_skip" in make("topk", k=1, skip=True).tensor_names()
    assert tuple(make("topk", k=1, skip=True, d=3).W_skip.shape) == (3, 3)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("d_in", "wide", "d_in must be a positive integer"),
        ("n_features", 0, "n_features must be a positive integer"),
        ("activation", "gelu", "activation must be one of"),
        ("k", -4, "needs k"),
        ("skip", "yes", "skip must be true or false"),
        ("input_space", "resid_post", "input_space must be one of"),
        ("output_space", "normalized", "output_space must be one of"),
        ("layer", -1, "layer must be a non-negative integer"),
    ],
)
def test_bad_config_fields_are_refused_by_name(field, value, message):
    fields = dict(d_in=3, d_out=3, n_features=4, activation="topk", k=2)
    fields[field] = value
    with pytest.raises(TcError, match=message):
        TranscoderConfig(**fields).validate()


def test_every_kind_needing_k_refuses_none():
    for activation in K_ACTIVATIONS:
        with pytest.raises(TcError, match="needs k"):
            make(activation, k=None)
    for activation in set(ACTIVATIONS) - set(K_ACTIVATIONS):
        make(activation)  # no k needed
