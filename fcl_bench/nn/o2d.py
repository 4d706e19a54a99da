"""One-by-One Distillation (Fed-LSCL, Eq. 5): the server distils every other client's generator into client
``i``'s, on each teacher's own uploaded feature set, while staying close to client ``i``'s generator:

    phi_bar_i = argmin_phi  sum_{j != i} E_{x in FS_j} ||phi(x) - phi_j(x)||^2  +  lam * ||phi - phi_i||^2

For a linear generator ``phi(x) = W x + b`` this is a ridge problem with an exact solution. With
``X~_j = [X_j, 1]`` ``(n_j, e+1)`` and ``W~ = [W^T; b^T]`` ``((e+1), m)``:

    (sum_j X~_j^T X~_j / n_j + lam I) W~ = sum_j X~_j^T X~_j W~_j / n_j + lam W~_i

solved in float64 (:func:`o2d_closed_form`). :func:`o2d_gradient` minimises the same objective by
gradient (L-BFGS) for any generator module, linear or not; the two agree on a linear generator.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call


def o2d_closed_form(student: tuple[torch.Tensor, torch.Tensor],
                    teachers: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                    lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact O2D for linear generators.

    Args:
        student: ``(W_i (m, e), b_i (m,))``, client i's generator.
        teachers: ``(W_j, b_j, FS_j (n_j, e))`` for every j != i.
        lam: the anchor weight ``lambda`` (> 0, or 0 when the teachers' features span the input space).
    Returns:
        ``(W (m, e), b (m,))`` in the student's dtype.
    """
    W_i, b_i = student
    if lam < 0:
        raise ValueError(f"O2D lambda must be >= 0, got {lam}")
    if not teachers:
        return W_i.clone(), b_i.clone()
    e = W_i.shape[1]
    dt = torch.float64
    anchor = torch.cat([W_i.T, b_i[None]], 0).to(dt)  # (e+1, m)
    lhs = lam * torch.eye(e + 1, dtype=dt, device=W_i.device)
    rhs = lam * anchor
    for W_j, b_j, X_j in teachers:
        if len(X_j) == 0:
            continue
        Xt = torch.cat([X_j.to(dt), torch.ones(len(X_j), 1, dtype=dt, device=X_j.device)], 1)
        G = Xt.T @ Xt / len(X_j)
        lhs = lhs + G
        rhs = rhs + G @ torch.cat([W_j.T, b_j[None]], 0).to(dt)
    sol = torch.linalg.solve(lhs, rhs)
    return sol[:-1].T.to(W_i.dtype).contiguous(), sol[-1].to(b_i.dtype).contiguous()


def o2d_gradient(student: nn.Module, teachers: Sequence[tuple[nn.Module, torch.Tensor]], lam: float,
                 steps: int = 200, lr: float = 1.0) -> nn.Module:
    """O2D by optimisation, for any generator module: returns a distilled copy of ``student``.

    ``teachers``: ``(phi_j, FS_j)`` for every j != i; a teacher's outputs may be a tensor or a tuple of
    tensors (flattened and concatenated). L-BFGS in float64 with a strong-Wolfe line search.
    """
    anchor = {n: p.detach().double() for n, p in student.named_parameters()}
    params = {n: p.detach().double().clone().requires_grad_(True) for n, p in student.named_parameters()}
    module = copy.deepcopy(student).double()
    with torch.no_grad():
        targets = [(X.double(), _flat(copy.deepcopy(T).double()(X.double()))) for T, X in teachers if len(X)]
    if not targets:
        return copy.deepcopy(student)
    opt = torch.optim.LBFGS(list(params.values()), lr=lr, max_iter=steps, tolerance_grad=1e-12,
                            tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = sum(((_flat(functional_call(module, params, (X,))) - Y) ** 2).sum(1).mean() for X, Y in targets)
        loss = loss + lam * sum(((params[n] - anchor[n]) ** 2).sum() for n in params)
        loss.backward()
        return loss

    opt.step(closure)
    out = copy.deepcopy(student)
    with torch.no_grad():
        for n, p in out.named_parameters():
            p.copy_(params[n].to(p.dtype))
    return out


def _flat(y) -> torch.Tensor:
    if isinstance(y, (tuple, list)):
        return torch.cat([t.reshape(t.shape[0], -1) for t in y], 1)
    return y.reshape(y.shape[0], -1)
