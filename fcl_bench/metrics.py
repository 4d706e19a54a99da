"""Accuracy matrices -> summary metrics. The only place metrics are computed.

Inputs per evaluation space (``client``: logits restricted to the classes the evaluated client has seen,
the default for tables; ``global``: restricted to all classes any client has seen):

* ``correct[c, t, i]``: correct predictions of client ``c`` after task ``t`` on the test set of its task ``i``
  (``i <= t``; NaN above the diagonal),
* ``total[c, i]``: size of client ``c``'s test set of task ``i``.

``a[c, t, i] = correct / total`` is the accuracy matrix. Names say what they average:

* ``acc[t]``: mean over clients of the accuracy on ALL test samples of tasks 0..t (sample-weighted; the
  paper's Table 1 number).
* ``task_mean_acc[t]``: mean over clients of the mean over tasks 0..t of ``a[c, t, i]``.
* ``current_task_acc[t]``: mean over clients of ``a[c, t, t]``, the accuracy after task t on the test set
  of task t alone (the other reading of the paper's Table 1; no earlier task counts, so no forgetting).
* ``avg_incremental_acc``: mean of ``acc`` over t. ``final_acc``: ``acc[T-1]``.
* ``forgetting`` (Chaudhry et al. 2018): mean over clients of mean over i < T-1 of
  ``max_{l in i..T-2} a[c, l, i] - a[c, T-1, i]``.
* ``bwt``: mean over clients of mean over i < T-1 of ``a[c, T-1, i] - a[c, i, i]``.

With a single task, ``forgetting`` and ``bwt`` are 0 by convention. Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import numpy as np


def accuracy_matrix(correct: np.ndarray, total: np.ndarray) -> np.ndarray:
    """``(C, T, T)`` accuracies, NaN above the diagonal."""
    correct = np.asarray(correct, dtype=float)
    total = np.asarray(total, dtype=float)
    if correct.ndim != 3 or correct.shape[1] != correct.shape[2] or total.shape != correct.shape[:2]:
        raise ValueError(f"correct must be (C, T, T) and total (C, T); got {correct.shape} and {total.shape}")
    with np.errstate(invalid="ignore", divide="ignore"):
        a = correct / total[:, None, :]
    tri = np.tril(np.ones(correct.shape[1:], dtype=bool))
    return np.where(tri[None], a, np.nan)


def acc_per_task(correct: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Per client ``(C, T)``: accuracy after task t on all test samples of tasks 0..t."""
    correct = np.asarray(correct, dtype=float)
    total = np.asarray(total, dtype=float)
    T = correct.shape[1]
    out = np.empty(correct.shape[:2])
    for t in range(T):
        out[:, t] = correct[:, t, : t + 1].sum(1) / total[:, : t + 1].sum(1)
    return out


def current_task_acc_per_client(a: np.ndarray) -> np.ndarray:
    """Per client ``(C, T)``: accuracy after task t on task t's test set only, the diagonal of ``a``."""
    return np.diagonal(a, axis1=1, axis2=2).copy()


def forgetting_per_client(a: np.ndarray) -> np.ndarray:
    """Chaudhry forgetting per client from the accuracy matrix ``(C, T, T)``."""
    T = a.shape[1]
    if T < 2:
        return np.zeros(a.shape[0])
    vals = [np.nanmax(a[:, i:T - 1, i], axis=1) - a[:, T - 1, i] for i in range(T - 1)]
    return np.mean(vals, axis=0)


def bwt_per_client(a: np.ndarray) -> np.ndarray:
    """Backward transfer per client from the accuracy matrix ``(C, T, T)``."""
    T = a.shape[1]
    if T < 2:
        return np.zeros(a.shape[0])
    return np.mean([a[:, T - 1, i] - a[:, i, i] for i in range(T - 1)], axis=0)


def summarise(correct: np.ndarray, total: np.ndarray) -> dict:
    """All summary metrics of one evaluation space, as plain Python numbers and lists."""
    a = accuracy_matrix(correct, total)
    acc_c = acc_per_task(correct, total)
    T = a.shape[1]
    task_mean_c = np.stack([np.nanmean(a[:, t, : t + 1], axis=1) for t in range(T)], axis=1)
    acc = acc_c.mean(0)
    current_c = current_task_acc_per_client(a)
    forg_c = forgetting_per_client(a)
    bwt_c = bwt_per_client(a)
    return {
        "acc": acc.tolist(),
        "task_mean_acc": task_mean_c.mean(0).tolist(),
        "current_task_acc": current_c.mean(0).tolist(),
        "avg_incremental_acc": float(acc.mean()),
        "final_acc": float(acc[-1]),
        "forgetting": float(forg_c.mean()),
        "bwt": float(bwt_c.mean()),
        "per_client": {
            "acc": acc_c.tolist(),
            "task_mean_acc": task_mean_c.tolist(),
            "current_task_acc": current_c.tolist(),
            "avg_incremental_acc": acc_c.mean(1).tolist(),
            "final_acc": acc_c[:, -1].tolist(),
            "forgetting": forg_c.tolist(),
            "bwt": bwt_c.tolist(),
        },
        "accuracy_matrix": np.where(np.isnan(a), None, a).tolist(),
    }
