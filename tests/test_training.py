"""The shared optimiser step: a finite loss whose gradient is not finite fails before the step."""

from __future__ import annotations

import pytest
import torch

from fcl_bench.checks import NonFiniteError
from fcl_bench.nn.training import optimizer_step


def test_a_non_finite_gradient_fails_before_the_weights_change():
    w = torch.nn.Parameter(torch.tensor([0.0, 4.0]))
    opt = torch.optim.Adam([w], lr=0.1)
    loss = w.sqrt().sum()  # finite (2.0), but d sqrt(w)/dw at w = 0 is inf
    assert torch.isfinite(loss)
    with pytest.raises(NonFiniteError, match=r"client 3 loss: the loss is finite but the gradients of 1 of 1"):
        optimizer_step(loss, opt, "client 3 loss")
    assert w.tolist() == [0.0, 4.0]  # no step was taken


def test_a_finite_gradient_steps_and_the_hook_runs_before_the_check():
    w = torch.nn.Parameter(torch.tensor([1.0]))
    opt = torch.optim.SGD([w], lr=0.5)
    optimizer_step((w ** 2).sum(), opt, "loss")  # grad 2 -> w = 1 - 0.5 * 2
    assert w.item() == pytest.approx(0.0)
    # a hook that repairs the gradient (as clipping does) runs before the check
    w2 = torch.nn.Parameter(torch.tensor([0.0]))
    opt2 = torch.optim.SGD([w2], lr=1.0)
    optimizer_step(w2.sqrt().sum(), opt2, "loss", before_step=lambda: w2.grad.nan_to_num_(posinf=1.0))
    assert w2.item() == pytest.approx(-1.0)
