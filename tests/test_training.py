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


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_non_finite_element_among_several_tensors_is_found(bad):
    ws = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(4))]
    opt = torch.optim.SGD(ws, lr=0.1)
    scale = torch.tensor([1.0, 1.0, bad, 1.0])
    loss = ws[0].sum() + ws[1].sum() + (ws[2] * scale).nan_to_num(0.0).sum()   # the loss stays finite
    with pytest.raises(NonFiniteError, match=r"gradients of 1 of 3 parameter tensors.*\(4,\)"):
        optimizer_step(loss, opt, "loss")
    assert all(torch.equal(w, torch.ones_like(w)) for w in ws)


def test_finite_gradients_whose_sum_overflows_still_step():
    """The fast check sums every gradient element; a sum that overflows is decided tensor by tensor."""
    w = torch.nn.Parameter(torch.tensor([0.0, 0.0]))
    opt = torch.optim.SGD([w], lr=0.0)
    big = torch.tensor([3e38, 3e38])
    optimizer_step((w * big).sum(), opt, "loss")     # loss 0; each gradient is 3e38 (finite), their sum inf
    assert torch.isfinite(w.grad).all() and torch.isinf(w.grad.sum())
