"""Evaluation: every client on the test sets of every task it has seen, in both evaluation spaces.

A prediction is scored twice: restricted to the classes the evaluated client has seen (``client`` space,
the paper's "local test sets") and to the classes any client has seen (``global`` space). Test data meets
a method only here, through ``Client.predict``; the client's feature view answers test batches only while
it is being evaluated.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext

import numpy as np
import torch

from fcl_bench.api import Client, ClientEnv
from fcl_bench.checks import check_logits
from fcl_bench.workspace import Workspace

SPACES = ("client", "global")


def restricted_correct(logits: torch.Tensor, y: torch.Tensor, allowed: torch.Tensor) -> int:
    """Correct predictions when the argmax is taken over the ``allowed`` classes only."""
    mask = torch.full((logits.shape[1],), float("-inf"), device=logits.device)
    mask[allowed] = 0.0
    return int(((logits.float() + mask).argmax(1) == y).sum())


def new_tallies(num_clients: int, num_tasks: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``correct[space][c, t, i]`` (NaN until measured) and ``total[c, i]``."""
    return {s: np.full((num_clients, num_tasks, num_tasks), np.nan) for s in SPACES}, np.zeros((num_clients, num_tasks))


@torch.no_grad()
def evaluate_client(ws: Workspace, c: int, client: Client, env: ClientEnv, t: int, who: str,
                    amp: bool) -> dict[str, list[int]]:
    """Client ``c`` after task ``t``, through ``predict`` on its own test sets of tasks ``0..t``: correct
    predictions per task in each space (``client``, ``global``) and the test set sizes (``total``)."""
    sc = ws.scenario
    glob = torch.as_tensor(sc.all_seen_classes(t), device=ws.device)
    own = torch.as_tensor(sc.seen_classes(c, t), device=ws.device)
    out: dict[str, list[int]] = {"client": [], "global": [], "total": []}
    view = env.features
    with view.open_test() if view is not None else nullcontext():
        for i in range(t + 1):
            data = ws.test_view(c, i)
            n_c = n_g = 0
            for batch in data.batches(ws.cfg.eval_batch_size):
                with torch.autocast(ws.device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = client.predict(batch)
                check_logits(logits, len(batch), sc.num_classes, f"{who} client {c}")
                n_c += restricted_correct(logits, batch.y, own)
                n_g += restricted_correct(logits, batch.y, glob)
            out["client"].append(n_c)
            out["global"].append(n_g)
            out["total"].append(len(data))
    return out


def evaluate(ws: Workspace, clients: Mapping[int, Client], envs: Mapping[int, ClientEnv], t: int,
             correct: dict[str, np.ndarray], total: np.ndarray, who: str, amp: bool) -> None:
    """Fill ``correct[:, :, t, :t+1]`` and ``total[:, :t+1]`` after task ``t``."""
    for c, client in clients.items():
        counts = evaluate_client(ws, c, client, envs[c], t, who, amp)
        for s in SPACES:
            correct[s][c, t, : t + 1] = counts[s]
        total[c, : t + 1] = counts["total"]


def accuracy_after(correct: np.ndarray, total: np.ndarray, t: int) -> float:
    """Mean over clients of the accuracy on all test samples of tasks ``0..t``."""
    accs = [np.nansum(correct[c, t, : t + 1]) / total[c, : t + 1].sum() for c in range(correct.shape[0])]
    return float(np.mean(accs))
