"""Distillation blocks shared by continual-learning methods: temperature knowledge distillation, frozen
copies of a model, and BatchNorm in eval mode.

* :func:`kd_loss`: Hinton et al.'s ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, averaged over the
  batch, optionally on a subset of the classes (e.g. the old ones);
* :func:`frozen_copy`: a deep copy in eval mode with gradients off (the "old model" of LwF, iCaRL, GLFC,
  TARGET, Fed-LSCL's theta^{n-1});
* :func:`batchnorm_eval`: BatchNorm layers to eval mode (running statistics used and frozen), as a call
  or a context manager that restores the previous modes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["batchnorm_eval", "frozen_copy", "kd_loss"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
            classes: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * mean_batch KL(softmax(teacher / T) || softmax(student / T))`` over ``classes`` (all if None).

    ``student_logits``, ``teacher_logits``: ``(B, C)``; the teacher is detached. Returns a scalar.
    """
    if temperature <= 0:
        raise ValueError(f"KD temperature must be > 0, got {temperature}")
    if classes is not None:
        idx = torch.as_tensor(classes, device=student_logits.device, dtype=torch.long)
        student_logits, teacher_logits = student_logits[:, idx], teacher_logits[:, idx]
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` in eval mode with ``requires_grad`` off; the original is untouched."""
    return copy.deepcopy(module).eval().requires_grad_(False)


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class _BatchNormEval:
    """Returned by :func:`batchnorm_eval`: already applied; as a context manager it restores on exit."""

    def __init__(self, module: nn.Module):
        self.layers = _batchnorms(module)
        self.previous = [m.training for m in self.layers]
        for m in self.layers:
            m.eval()

    def __enter__(self) -> list[nn.Module]:
        return self.layers

    def __exit__(self, *exc) -> None:
        for m, was in zip(self.layers, self.previous):
            m.train(was)


def batchnorm_eval(module: nn.Module) -> _BatchNormEval:
    """Put every BatchNorm layer of ``module`` in eval mode (use running statistics, do not update them).

    ``batchnorm_eval(m)`` switches them for good; ``with batchnorm_eval(m): ...`` restores their previous
    modes afterwards.
    """
    return _BatchNormEval(module)

