"""tccli.training.sparse_coding: the sparse step equals dense autograd, the selection rules are exact, and
JumpReLU's estimators give the derivatives worked out by hand."""

from __future__ import annotations

import pytest
import torch

from tccli.training import sparse_coding as sc

torch.set_default_dtype(torch.float32)


def dense_pre(x, W_enc, b_enc, b_pre):
    return (x - b_pre) @ W_enc + b_enc


def random_problem(n=12, d=5, m=9, dtype=torch.float64, seed=0, feature_major=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    W_enc = torch.randn(d, m, generator=g, dtype=dtype)
    if feature_major:  # the layout tc train uses: [d, m] with strides (1, d)
        W_enc = W_enc.t().contiguous().t()
    params = dict(
        W_enc=W_enc,
        b_enc=torch.randn(m, generator=g, dtype=dtype),
        b_pre=torch.randn(d, generator=g, dtype=dtype),
        W_dec=torch.randn(m, d, generator=g, dtype=dtype),
        b_dec=torch.randn(d, generator=g, dtype=dtype),
    )
    y = torch.randn(n, d, generator=g, dtype=dtype)
    return x, y, {k: v.requires_grad_() for k, v in params.items()}


def grads(loss, params):
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


@pytest.mark.parametrize("rule", ["topk", "batchtopk", "above"])
@pytest.mark.parametrize("feature_major", [False, True])
def test_sparse_backward_equals_dense_autograd(rule, feature_major):
    """The whole sparse forward (selection, encoder, decoder, AuxK-style second group) against the same
    function computed densely with autograd: equal loss, equal gradients of every weight (float64)."""
    x, y, p = random_problem(feature_major=feature_major)
    n, m = x.shape[0], p["W_enc"].shape[1]
    level = torch.linspace(-0.5, 0.5, m, dtype=x.dtype)
    dead = torch.zeros(m, dtype=torch.bool)
    dead[[1, 4, 7]] = True

    def select(pre):
        if rule == "topk":
            main = sc.select_topk(pre, 3)
        elif rule == "batchtopk":
            main = sc.select_batchtopk(pre, 3)[0]
        else:
            main = sc.select_above(pre, level)
        return [main, sc.select_auxk(pre, dead, 2)]

    values, groups = sc.encode_selected(x, p["W_enc"], p["b_enc"], p["b_pre"], select)
    main_values, aux_values = sc.split_values(values, groups)
    out = sc.decode_entries(torch.relu(main_values), groups[0], p["W_dec"], n) + p["b_dec"]
    aux_out = sc.decode_entries(aux_values, groups[1], p["W_dec"], n)
    loss = (out - y).pow(2).sum() + 0.3 * (aux_out - y).pow(2).sum()
    sparse_grads = grads(loss, p)

    # dense: masks from the same selection, every product over all n x m entries
    pre = dense_pre(x, p["W_enc"], p["b_enc"], p["b_pre"])
    masks = []
    for entries in groups:
        mask = torch.zeros(n, m, dtype=x.dtype)
        mask[entries.token, entries.feature] = 1
        masks.append(mask)
    dense_out = (torch.relu(pre) * masks[0]) @ p["W_dec"] + p["b_dec"]
    dense_aux = (pre * masks[1]) @ p["W_dec"]
    dense_loss = (dense_out - y).pow(2).sum() + 0.3 * (dense_aux - y).pow(2).sum()
    dense_grads = grads(dense_loss, p)

    assert torch.allclose(loss, dense_loss, rtol=1e-12, atol=0)
    for name in p:
        assert dense_grads[name].abs().max() > 0, name
        assert torch.allclose(sparse_grads[name], dense_grads[name], rtol=1e-10, atol=1e-12), name
    if feature_major:
        assert sparse_grads["W_enc"].stride() == p["W_enc"].stride()


def test_sparse_backward_float32_matches_dense_to_rounding():
    x, y, p = random_problem(n=256, d=16, m=128, dtype=torch.float32, seed=3)
    n = x.shape[0]
    values, groups = sc.encode_selected(x, p["W_enc"], p["b_enc"], p["b_pre"], lambda pre: [sc.select_topk(pre, 8)])
    out = sc.decode_entries(torch.relu(values), groups[0], p["W_dec"], n) + p["b_dec"]
    sparse_grads = grads((out - y).pow(2).sum(-1).mean(), p)
    pre = dense_pre(x, p["W_enc"], p["b_enc"], p["b_pre"])
    mask = torch.zeros_like(pre)
    mask[groups[0].token, groups[0].feature] = 1
    dense_out = (torch.relu(pre) * mask) @ p["W_dec"] + p["b_dec"]
    dense_grads = grads((dense_out - y).pow(2).sum(-1).mean(), p)
    for name in p:
        scale = dense_grads[name].abs().max()
        assert float((sparse_grads[name] - dense_grads[name]).abs().max()) <= 2e-6 * float(scale), name


def test_compute_dtype_bfloat16_runs_and_rounds_only_the_product():
    x, _, p = random_problem(n=32, d=8, m=16, dtype=torch.float32)
    exact, groups = sc.encode_selected(x, p["W_enc"], p["b_enc"], p["b_pre"], lambda pre: [sc.select_topk(pre, 4)])
    rounded, groups_bf = sc.encode_selected(
        x, p["W_enc"], p["b_enc"], p["b_pre"], lambda pre: [sc.select_topk(pre, 4)], compute_dtype=torch.bfloat16
    )
    assert rounded.dtype == torch.float32
    same = (groups[0].feature == groups_bf[0].feature) & (groups[0].token == groups_bf[0].token)
    assert same.float().mean() > 0.9  # near-ties may swap
    assert torch.allclose(rounded[same], exact[same], rtol=2e-2, atol=5e-2)
    rounded.sum().backward()
    assert p["W_enc"].grad.dtype == torch.float32


def test_select_topk_and_offsets():
    pre = torch.tensor([[0.1, 3.0, 2.0, -1.0], [5.0, -2.0, 4.0, 1.0]])
    entries = sc.select_topk(pre, 2)
    assert entries.token.tolist() == [0, 0, 1, 1]
    assert sorted(entries.feature[:2].tolist()) == [1, 2] and sorted(entries.feature[2:].tolist()) == [0, 2]
    assert entries.offsets(2).tolist() == [0, 2]


def test_counts_offsets_and_sums_by_index_by_hand():
    index = torch.tensor([3, 0, 3, 3, 1])
    assert sc.counts_of(index, 5).tolist() == [1, 1, 0, 3, 0]  # value 4 never occurs, 2 neither
    assert sc.counts_of(index, 5).tolist() == torch.bincount(index, minlength=5).tolist()
    assert sc.offsets_of(index, 5).tolist() == [0, 1, 2, 2, 5]  # sorted: 0 1 3 3 3
    assert sc.counts_of(index, 5, torch.tensor([1, 0, 1, 0, 1])).tolist() == [0, 1, 0, 2, 0]  # weighted
    values = torch.tensor([0.5, 2.0, -1.0, 4.0, 8.0])
    assert sc.sum_by_index(values, index, 5).tolist() == [2.0, 8.0, 0.0, 3.5, 0.0]
    assert sc.counts_of(torch.zeros(0, dtype=torch.long), 3).tolist() == [0, 0, 0]


def test_select_batchtopk_is_the_batch_top_and_reports_the_cutoff():
    g = torch.Generator().manual_seed(1)
    pre = torch.randn(50, 40, generator=g)
    pre[7] += 10  # one token holds far more than 4k of the batch's largest entries: the fallback path
    entries, cutoff = sc.select_batchtopk(pre, 3)
    flat = pre.reshape(-1).topk(150).indices
    expected = sorted(zip((flat // 40).tolist(), (flat % 40).tolist()))
    assert list(zip(entries.token.tolist(), entries.feature.tolist())) == expected
    assert float(cutoff) == float(pre.reshape(-1).topk(150).values.min())
    assert int((entries.token == 7).sum()) == 40  # every entry of token 7 made the cut
    # without a dominant token the per-token candidates suffice and give the same answer
    pre = torch.randn(50, 40, generator=g)
    entries, cutoff = sc.select_batchtopk(pre, 3)
    flat = pre.reshape(-1).topk(150).indices
    assert list(zip(entries.token.tolist(), entries.feature.tolist())) == sorted(
        zip((flat // 40).tolist(), (flat % 40).tolist())
    )


def test_select_above_and_auxk():
    pre = torch.tensor([[1.0, 0.2, 3.0], [0.0, 0.6, -1.0]])
    entries = sc.select_above(pre, torch.tensor([0.5, 0.5, 2.5]))
    assert list(zip(entries.token.tolist(), entries.feature.tolist())) == [(0, 0), (0, 2), (1, 1)]
    aux = sc.select_auxk(pre, torch.tensor([False, True, True]), 1)
    assert list(zip(aux.token.tolist(), aux.feature.tolist())) == [(0, 2), (1, 1)]
    assert len(sc.select_auxk(pre, torch.zeros(3, dtype=torch.bool), 4)) == 0


def test_jump_relu_and_step_estimators_by_hand():
    # threshold 1, bandwidth 0.5: the kernel is 1/0.5 on |pre - 1| < 0.25
    pre = torch.tensor([0.5, 0.875, 1.125, 2.0], requires_grad=True)
    threshold = torch.ones(4, requires_grad=True)
    z = sc.jump_relu(pre, threshold, 0.5)
    assert z.tolist() == [0.0, 0.0, 1.125, 2.0]
    z.backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert pre.grad.tolist() == [0.0, 0.0, 3.0, 4.0]  # through active entries only
    # d z / d threshold = -threshold / bandwidth inside the window: -2 x upstream gradient
    assert threshold.grad.tolist() == [0.0, -4.0, -6.0, 0.0]
    pre.grad = None
    threshold.grad = None
    count = sc.step(pre, threshold, 0.5)
    assert count.tolist() == [0.0, 0.0, 1.0, 1.0]
    count.sum().backward()
    assert pre.grad is None or float(pre.grad.abs().max()) == 0.0
    assert threshold.grad.tolist() == [0.0, -2.0, -2.0, 0.0]
