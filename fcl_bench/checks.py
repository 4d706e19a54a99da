"""Checks the harness applies to what methods produce: finite losses and tensors, payloads, logits.

Each failure names the method (``who``) and the rule it broke, so a plugin author knows what to fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any

import torch


class NonFiniteError(RuntimeError):
    """A loss or an uploaded tensor became NaN or infinite."""


class ContractError(RuntimeError):
    """A method broke the plugin contract (:mod:`fcl_bench.api`); the message says which rule."""


def check_finite(value: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` if ``value`` holds NaN or inf."""
    if not torch.isfinite(value).all():
        raise NonFiniteError(f"{what} is not finite (NaN or inf)")


def check_payload(payload: Any, who: str, declared: tuple[str, ...] | None = None) -> None:
    """A payload is a dict of finite tensors whose names match the method's declared ``uploads`` patterns."""
    if not isinstance(payload, Mapping):
        raise ContractError(f"{who} must be a dict of tensors (a Payload), got {type(payload).__name__}")
    for name, t in payload.items():
        if not isinstance(t, torch.Tensor):
            raise ContractError(f"{who}: '{name}' is a {type(t).__name__}; a payload holds only tensors")
        if t.is_floating_point():
            check_finite(t, f"{who} '{name}'")
        if declared is not None and not any(fnmatchcase(str(name), p) for p in declared):
            raise ContractError(f"{who}: '{name}' is not among the tensors the method declares it uploads "
                                f"({', '.join(declared)}); add it to the method's `uploads` or do not send it")


def check_logits(logits: Any, batch_size: int, num_classes: int, who: str) -> torch.Tensor:
    """``predict`` returns finite float logits ``(batch, num_classes)``."""
    if not isinstance(logits, torch.Tensor):
        raise ContractError(f"{who}.predict must return a tensor of logits, got {type(logits).__name__}")
    if tuple(logits.shape) != (batch_size, num_classes):
        raise ContractError(f"{who}.predict must return (batch, {num_classes}) logits over all classes; "
                            f"got {tuple(logits.shape)} for a batch of {batch_size}")
    if not logits.is_floating_point():
        raise ContractError(f"{who}.predict must return float logits, got {logits.dtype}")
    # -inf is a legitimate "never this class" (heads over seen classes only); NaN and +inf are not
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise ContractError(f"{who}.predict returned NaN or +inf logits")
    return logits
