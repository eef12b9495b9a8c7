"""tccli.training.optim: schedule-free sign descent, step by step by hand."""

from __future__ import annotations

import copy

import pytest
import torch

from tccli.training.optim import ScheduleFreeSign


def test_schedule_free_sign_by_hand():
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float64))
    opt = ScheduleFreeSign([p], lr=0.1, momentum=0.5)
    p.grad = torch.tensor([2.0, 0.0], dtype=torch.float64)
    opt.step()
    # z = 1 - 0.1 sign(2) = 0.9; c = 1 so x = z; y = z. A zero gradient moves nothing.
    assert p.tolist() == pytest.approx([0.9, 1.0], abs=1e-15)
    for group in opt.param_groups:
        group["lr"] = 0.2
    p.grad = torch.tensor([-3.0, 0.0], dtype=torch.float64)
    opt.step()
    # z = 0.9 + 0.2 = 1.1; c = 0.04 / (0.01 + 0.04) = 0.8: x = 0.9 + 0.8 (1.1 - 0.9) = 1.06;
    # y = 0.5 z + 0.5 x = 1.08
    assert p.tolist() == pytest.approx([1.08, 1.0], abs=1e-12)
    assert opt.state[p]["z"].tolist() == pytest.approx([1.1, 1.0], abs=1e-12)
    opt.use_average()
    assert p.tolist() == pytest.approx([1.06, 1.0], abs=1e-12)


def test_schedule_free_sign_state_round_trips():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a = ScheduleFreeSign([a], lr=0.05)
    grads = [torch.randn(4, 3) for _ in range(6)]
    for g in grads[:3]:
        a.grad = g.clone()
        opt_a.step()
    opt_b = ScheduleFreeSign([b], lr=0.05)
    with torch.no_grad():
        b.copy_(a)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as through a checkpoint file
    for g in grads[3:]:
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)


def test_bad_momentum():
    with pytest.raises(ValueError):
        ScheduleFreeSign([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=1.0)
