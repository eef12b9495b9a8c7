"""Optimisers for `tc train` beyond torch's Adam (pure math: parameters and gradients in, steps out).

``ScheduleFreeSign``: sign descent with schedule-free momentum (Defazio et al. 2024, "The Road Less
Scheduled"), the optimiser sparsify 1.x trains with ("signum"). Three sequences per parameter:

    z_{t+1} = z_t - lr_t * sign(g_t)                       the base iterate (plain sign descent)
    x_{t+1} = (1 - c_t) x_t + c_t z_{t+1}                  c_t = lr_t^2 / sum_{s<=t} lr_s^2: a running average
    y_{t+1} = (1 - momentum) z_{t+1} + momentum x_{t+1}    where the next gradient is taken

The parameter tensors hold y during training; the trained model is x (``use_average``). The average
replaces a learning-rate decay: the learning rate stays constant after warm-up. Sign descent moves
every coordinate with a gradient by exactly lr, so the step size does not depend on the scale of the
loss or of the activations; a coordinate whose gradient is exactly zero (a feature no token selected,
under the sparse encoder gradient) does not move.
"""

from __future__ import annotations

import torch


class ScheduleFreeSign(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.95):
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["z"] = p.detach().clone(memory_format=torch.preserve_format)
                    state["x"] = p.detach().clone(memory_format=torch.preserve_format)
                    state["weight_sum"] = 0.0  # a Python float: load_state_dict would cast a tensor to p's dtype
                state["weight_sum"] += lr * lr
                c = lr * lr / state["weight_sum"] if state["weight_sum"] > 0 else 1.0
                z, x = state["z"], state["x"]
                z.add_(torch.sign(p.grad), alpha=-lr)
                x.lerp_(z, c)
                torch.lerp(z, x, momentum, out=p)
        return None

    @torch.no_grad()
    def use_average(self) -> None:
        """Put the averaged iterate x into the parameters (the model to evaluate and save)."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    p.copy_(state["x"])
