"""tccli.training.clt_step: the cross-layer transcoder's loss terms and selections, on cases worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from tccli.config.transcoders import CrossLayerConfig
from tccli.training import clt_step
from tccli.transcoders.cross_layer import CrossLayerTranscoder


def tiny_clt(activation: str = "relu", layers=(0, 1), d: int = 1, m: int = 2, skip: bool = False):
    return CrossLayerTranscoder(
        CrossLayerConfig(d_in=d, d_out=d, n_features=m, layers=list(layers), activation=activation, k=1, skip=skip)
    )


# ----------------------------------------------------------------------------- loss terms


def test_decoder_norm_is_the_norm_of_every_later_decoder_together():
    # feature 0 writes 3 to its own layer and 4 to the next: combined norm 5 (each block alone: 3 and 4)
    W_dec = torch.tensor([[[3.0], [4.0]], [[0.0], [1.0]]])
    assert clt_step.decoder_norms(W_dec).tolist() == [5.0, 1.0]


def test_tanh_penalty_by_hand():
    W_dec = torch.tensor([[[3.0], [4.0]], [[0.0], [1.0]]])
    a = torch.tensor([[0.2, 0.0], [0.1, 2.0]])
    got = clt_step.tanh_penalty(a, clt_step.decoder_norms(W_dec), 0.5)
    # token 0: tanh(0.5 * 0.2 * 5) + tanh(0); token 1: tanh(0.5 * 0.1 * 5) + tanh(0.5 * 2 * 1); mean of tokens
    expected = (math.tanh(0.5) + math.tanh(0.25) + math.tanh(1.0)) / 2
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_tanh_penalty_gradients_are_those_of_the_formula():
    a = torch.tensor([[0.2, 0.0, 1.5], [0.1, 2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    norms = torch.tensor([5.0, 1.0, 0.3], dtype=torch.float64, requires_grad=True)
    got = torch.autograd.grad(clt_step.tanh_penalty(a, norms, 0.5), (a, norms))
    a2, norms2 = a.detach().requires_grad_(), norms.detach().requires_grad_()
    expected = torch.autograd.grad(torch.tanh(0.5 * a2 * norms2).sum() / 2, (a2, norms2))
    torch.testing.assert_close(got, expected)


def test_pre_activation_penalty_gradient():
    pre = torch.tensor([[-1.0, 2.0], [-0.5, 0.0]], requires_grad=True)
    (grad,) = torch.autograd.grad(clt_step.pre_activation_penalty(pre), (pre,))
    assert grad.tolist() == [[-0.5, 0.0], [-0.5, 0.0]]


def test_pre_activation_penalty_by_hand():
    pre = torch.tensor([[-1.0, 2.0], [-0.5, -0.25]])
    assert float(clt_step.pre_activation_penalty(pre)) == pytest.approx((1.0 + 0.5 + 0.25) / 2)


def test_normalized_mse_divides_each_layer_by_its_variance():
    outputs = [torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 3.0]])]
    targets = [torch.zeros(2, 2), torch.zeros(2, 2)]
    total, per_layer = clt_step.normalized_mse(outputs, targets, (2.0, 0.5))
    # layer 0: mean of (1, 0) = 0.5, / 2; layer 1: mean of (0, 9) = 4.5, / 0.5
    assert [float(v) for v in per_layer] == [0.5, 4.5]
    assert float(total) == pytest.approx(0.25 + 9.0)


def test_lambda_ramps_linearly_then_holds():
    assert clt_step.lambda_at(0, 100, 2.0, 0.5) == pytest.approx(2.0 / 50)
    assert clt_step.lambda_at(24, 100, 2.0, 0.5) == pytest.approx(1.0)
    assert clt_step.lambda_at(49, 100, 2.0, 0.5) == 2.0
    assert clt_step.lambda_at(99, 100, 2.0, 0.5) == 2.0
    assert clt_step.lambda_at(0, 100, 2.0, 0.0) == 2.0


def test_whole_loss_of_a_tiny_relu_clt_by_hand():
    clt = tiny_clt("relu")  # layers 0 and 1, d = 1, two features each
    with torch.no_grad():
        clt.W_enc["0"].copy_(torch.tensor([[1.0, -1.0]]))
        clt.W_enc["1"].copy_(torch.tensor([[2.0, 0.0]]))
        clt.b_enc["1"].copy_(torch.tensor([0.0, 1.0]))
        clt.W_dec["0"].copy_(torch.tensor([[[3.0], [4.0]], [[1.0], [0.0]]]))  # 0 -> 0 and 0 -> 1
        clt.W_dec["1"].copy_(torch.tensor([[[0.5]], [[2.0]]]))
        clt.b_dec["1"].fill_(1.0)
    x = [torch.tensor([[1.0], [-2.0]]), torch.tensor([[1.0], [0.0]])]
    y = [torch.tensor([[2.0], [0.0]]), torch.tensor([[8.0], [2.0]])]
    settings = clt_step.CLTSettings("relu", pre_act_coef=0.1)
    scales = clt_step.CLTScales((1.0, 2.0), tanh_scale=0.5)
    dead = torch.zeros(2, 2, dtype=torch.bool)
    result = clt_step.clt_loss(clt, x, y, dead, settings, scales, sparsity_lambda=0.2)
    # layer 0: pre [[1, -1], [-2, 2]] -> a [[1, 0], [0, 2]]; layer 1: pre [[2, 1], [0, 1]] -> a [[2, 1], [0, 1]]
    # yhat_0 = a_0 . (3, 1) = [3, 2]; yhat_1 = a_0 . (4, 0) + a_1 . (0.5, 2) + 1 = [4 + 1 + 2 + 1, 0 + 2 + 1] = [8, 3]
    assert [o.squeeze(1).tolist() for o in result.outputs] == [[3.0, 2.0], [8.0, 3.0]]
    # mse_0 = mean(1, 4) = 2.5, / 1; mse_1 = mean(0, 1) = 0.5, / 2
    assert float(result.reconstruction) == pytest.approx(2.5 + 0.25)
    # decoder norms: layer 0 (5, 1), layer 1 (0.5, 2); tanh(0.5 a norm) summed, mean over the 2 tokens
    tanh_sum = (
        math.tanh(0.5 * 1 * 5) + math.tanh(0.5 * 2 * 1) + math.tanh(0.5 * 2 * 0.5) + 2 * math.tanh(0.5 * 1 * 2)
    ) / 2
    pre_act = (1 + 2) / 2  # ReLU(-pre): layer 0 has -1 and -2, layer 1 none
    assert float(result.penalty) == pytest.approx(0.2 * tanh_sum + 0.1 * pre_act, rel=1e-6)
    assert float(result.loss) == pytest.approx(2.75 + 0.2 * tanh_sum + 0.1 * pre_act, rel=1e-6)
    assert result.fires.tolist() == [[1, 1], [1, 2]]
    assert result.active.tolist() == [2, 3]


def test_the_tanh_penalty_reaches_the_decoders_to_later_layers():
    """A feature's cost grows with its decoders to later layers, so their gradient carries the penalty."""
    clt = tiny_clt("relu")
    with torch.no_grad():
        clt.W_enc["0"].fill_(1.0)
        clt.W_dec["0"].fill_(1.0)
    x = [torch.ones(3, 1), torch.ones(3, 1)]
    dead = torch.zeros(2, 2, dtype=torch.bool)
    settings = clt_step.CLTSettings("relu")
    scales = clt_step.CLTScales((1.0, 1.0), tanh_scale=0.3)
    clt_step.clt_loss(clt, x, x, dead, settings, scales, 0.0).loss.backward()
    without = clt.W_dec["0"].grad[:, 1].clone()
    clt.zero_grad()
    clt_step.clt_loss(clt, x, x, dead, settings, scales, 1.0).loss.backward()
    assert (clt.W_dec["0"].grad[:, 1] > without).all()


def test_decode_parts_is_the_clt_decoder_without_biases():
    torch.manual_seed(0)
    clt = tiny_clt("relu", layers=(0, 2, 3), d=4, m=5, skip=False)
    with torch.no_grad():
        for p in clt.parameters():
            p.normal_()
    zs = [torch.relu(torch.randn(6, 5)) for _ in range(3)]
    parts = clt_step.decode_parts(clt, zs)
    reference = clt.decode({layer: z for layer, z in zip(clt.layers, zs)})
    assert parts.shape == (6, 3, 4)
    for j, layer in enumerate(clt.layers):
        torch.testing.assert_close(parts[:, j] + clt.b_dec[str(layer)], reference[layer])


def test_dense_jump_relu_has_the_estimators_of_sparse_coding():
    from tccli.training import sparse_coding

    pre = torch.tensor([[0.5, 1.05, 2.3], [0.98, 0.2, 1.95]], requires_grad=True)
    threshold = torch.tensor([1.0, 1.0, 1.9], requires_grad=True)
    upstream = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    out = clt_step.jump_relu(pre, threshold, 0.2)
    assert torch.equal(out, torch.tensor([[0.0, 1.05, 2.3], [0.0, 0.0, 1.95]]))
    grad_pre, grad_threshold = torch.autograd.grad((out * upstream).sum(), (pre, threshold))
    assert grad_pre.tolist() == [[0.0, 2.0, 3.0], [0.0, 0.0, 6.0]]
    # within half a bandwidth (0.1) of its threshold: 0.98 (feature 0), 1.05 (feature 1), 1.95 (feature 2)
    expected = [-(1.0 / 0.2) * 4.0, -(1.0 / 0.2) * 2.0, -(1.9 / 0.2) * 6.0]
    torch.testing.assert_close(grad_threshold, torch.tensor(expected))
    pre2, threshold2 = pre.detach().requires_grad_(), threshold.detach().requires_grad_()
    reference = sparse_coding.jump_relu(pre2, threshold2.expand(2, 3), 0.2)
    torch.testing.assert_close(
        torch.autograd.grad((reference * upstream).sum(), (pre2, threshold2)), (grad_pre, grad_threshold)
    )


# ----------------------------------------------------------------------------- selections


def test_batchtopk_selects_across_every_layer_of_the_batch():
    pres = [
        torch.tensor([[5.0, 1.0, 0.5], [0.2, 0.3, 0.1]]),  # layer 0, tokens 0 and 1
        torch.tensor([[4.0, 3.0, 0.0], [2.5, 0.4, 6.0]]),  # layer 1
    ]
    masks, cutoff = clt_step.batchtopk_masks(pres, k=2)  # 2 x 2 tokens = the 4 largest of all 12 entries
    assert float(cutoff) == 3.0
    assert masks[0].tolist() == [[True, False, False], [False, False, False]]
    assert masks[1].tolist() == [[True, True, False], [False, False, True]]


def test_topk_selects_per_layer_and_token():
    pres = [torch.tensor([[5.0, 1.0, 0.5], [0.2, 0.3, 0.1]]), torch.tensor([[4.0, 3.0, 0.0], [2.5, 0.4, 6.0]])]
    masks = clt_step.topk_masks(pres, k=1)
    assert masks[0].tolist() == [[True, False, False], [False, True, False]]
    assert masks[1].tolist() == [[True, False, False], [False, False, True]]


def test_auxk_picks_only_dead_features():
    pres = [torch.tensor([[5.0, 1.0, 0.5], [0.2, 0.3, 0.1]]), torch.tensor([[4.0, 3.0, 0.0], [2.5, 0.4, 6.0]])]
    dead = torch.tensor([[False, True, True], [False, False, True]])
    masks = clt_step.auxk_masks(pres, dead, aux_k=1)
    assert masks[0].tolist() == [[False, True, False], [False, True, False]]
    assert masks[1].tolist() == [[False, False, True], [False, False, True]]  # the only dead one, for each token


def test_kth_largest_over_processes_with_a_gather():
    """Each process sends only its own k largest; the k-th largest of the union is the global one."""
    first, second = torch.tensor([[9.0, 1.0, 2.0]]), torch.tensor([[8.0, 7.0, 0.0]])
    comm = clt_step.Comm(gather=lambda local: torch.cat([local, second.topk(2).values], dim=-1), world=2)
    assert clt_step.kth_largest(first, 3, comm).tolist() == [[7.0]]


def test_batchtopk_threshold_conversion():
    min_sum = torch.tensor([[3.0, 0.0, 1.5]])
    min_count = torch.tensor([[2, 0, 1]])
    thresholds = clt_step.batchtopk_thresholds(min_sum, min_count, mean_cutoff=0.75)
    assert thresholds.tolist() == [[1.5, 0.75, 1.5]]


def test_batchtopk_records_each_features_smallest_selected_activation():
    clt = tiny_clt("batchtopk", layers=(0, 1), d=1, m=2)
    with torch.no_grad():
        clt.W_enc["0"].copy_(torch.tensor([[1.0, 2.0]]))
        clt.W_enc["1"].copy_(torch.tensor([[-1.0, 0.5]]))
    x = [torch.tensor([[1.0], [3.0]]), torch.tensor([[1.0], [3.0]])]
    # pre: layer 0 [[1, 2], [3, 6]], layer 1 [[-1, 0.5], [-3, 1.5]]; k = 1 -> the 2 largest: 6 and 3
    result = clt_step.clt_loss(
        clt,
        x,
        x,
        torch.zeros(2, 2, dtype=torch.bool),
        clt_step.CLTSettings("batchtopk", k=1),
        clt_step.CLTScales((1.0, 1.0)),
        0.0,
    )
    assert float(result.cutoff) == 3.0
    assert result.selected_min.tolist() == [[3.0, 6.0], [math.inf, math.inf]]


def test_auxk_uses_only_the_dead_features_decoders_and_closes_jumprelus_gap():
    torch.manual_seed(0)
    clt = tiny_clt("jumprelu", layers=(0, 1), d=3, m=4)
    with torch.no_grad():
        for p in clt.parameters():
            p.normal_()
        for t in clt.threshold.values():
            t.abs_()
    x = [torch.randn(5, 3), torch.randn(5, 3)]
    y = [torch.randn(5, 3), torch.randn(5, 3)]
    dead = torch.tensor([[True, False, True, False], [False, False, False, True]])
    settings = clt_step.CLTSettings("jumprelu", aux_k=1, aux_coef=1.0)
    scales = clt_step.CLTScales((1.0, 1.0), bandwidth=(0.1, 0.1), threshold_scale=(2.0, 0.5))
    result = clt_step.clt_loss(clt, x, y, dead, settings, scales, 0.0, use_aux=True)
    with torch.no_grad():
        pres = clt_step.pre_activations(clt, x)
        # per token: layer 0's larger of features 0 and 2, layer 1's feature 3 (its only dead one)
        pick0 = torch.where(pres[0][:, 0] >= pres[0][:, 2], 0, 2)
        v0, v1 = pres[0].gather(1, pick0[:, None]).squeeze(1), pres[1][:, 3]
        W0, W1 = clt.W_dec["0"], clt.W_dec["1"]
        aux_out = [v0[:, None] * W0[pick0, 0], v0[:, None] * W0[pick0, 1] + v1[:, None] * W1[3, 0]]
        terms = []
        for out, target, a in zip(result.outputs, y, aux_out):
            residual = target - out
            variance = (residual - residual.mean(0)).pow(2).sum(-1).mean()
            terms.append((a - residual).pow(2).sum(-1).mean() / variance)
        gap0 = torch.relu(clt.threshold["0"][pick0] - v0).sum() / (5 * 1 * 2.0)
        gap1 = torch.relu(clt.threshold["1"][3] - v1).sum() / (5 * 1 * 0.5)
    torch.testing.assert_close(result.aux, (terms[0] + terms[1]) / 2 + gap0 + gap1)
    # the gradient reaches only the dead features' decoders
    result.aux.backward()
    assert float(clt.W_dec["0"].grad[[1, 3]].abs().max()) == 0 and float(clt.W_dec["0"].grad[[0, 2]].abs().max()) > 0
    # a layer without dead features of its own still receives the earlier layers' dead features' writes
    none_dead_in_1 = torch.tensor([[True, False, True, False], [False, False, False, False]])
    other = clt_step.clt_loss(clt, x, y, none_dead_in_1, settings, scales, 0.0, use_aux=True)
    with torch.no_grad():
        residual = y[1] - result.outputs[1]
        variance = (residual - residual.mean(0)).pow(2).sum(-1).mean()
        term1 = (v0[:, None] * W0[pick0, 1] - residual).pow(2).sum(-1).mean() / variance
    torch.testing.assert_close(other.aux, (terms[0] + term1) / 2 + gap0)
