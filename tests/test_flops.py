"""FLOP accounting: the counter's formulas, sampled counting against a full count, the server's steps."""

from __future__ import annotations

import pytest
import torch
from helpers import run as run_method
from helpers import smoke_config, workspace
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fcl_bench.accounting import Accountant, FlopCounter
from fcl_bench.registry import get_method

CPU = torch.device("cpu")


def test_counter_hand_computed_linear_step():
    """Linear (B, i) -> (B, o) with a trainable weight and a constant input: forward 2Bio (addmm), backward
    only the weight gradient 2Bio; the elementwise loss and Adam's update count 0."""
    B, i, o = 5, 7, 3
    lin = nn.Linear(i, o)
    opt = torch.optim.Adam(lin.parameters())
    with FlopCounter() as c:
        lin(torch.randn(B, i)).pow(2).mean().backward()
        opt.step()
    assert c.total == 4 * B * i * o
    with FlopCounter() as c:  # an input that needs its gradient adds 2Bio
        lin(torch.randn(B, i, requires_grad=True)).sum().backward()
    assert c.total == 6 * B * i * o


def test_counter_equals_torch_flop_counter_mode():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    attn = nn.MultiheadAttention(16, 2, batch_first=True)
    x, t = torch.randn(4, 3, 10, 10), torch.randn(2, 5, 16)

    def work():
        loss = conv(x).sum() + attn(t, t, t)[0].sum()
        loss.backward()

    work()  # materialise the lazy layer
    with FlopCounterMode(display=False) as ref:
        work()
    with FlopCounter() as ours:
        work()
    assert ours.total == ref.get_total_flops() > 0


def _loop(acct: Accountant, party, task: int, sizes: list[int], model: nn.Module, opt) -> tuple[int, bool]:
    with acct.measure(party, task) as m:
        for n in sizes:
            loss = model(torch.randn(n, 6)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            model(torch.randn(11, 6))
    return m.flops, m.flops_measured


def test_sampled_equals_all_and_reuses_repeated_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sizes = [8, 8, 8, 3]
    full, sampled = Accountant(CPU, "all"), Accountant(CPU, "sampled")
    ref = _loop(full, 0, 0, sizes, model, opt)[0]
    per_step = 2 * 6 * 9 + 2 * 9 * 2  # per sample, forward
    # forward, then backward: the weight grads of both layers (as much as the forward) and the hidden
    # activation's grad (2 * 9 * 2; none for the input); then the no-grad pass
    assert ref == sum(n * (2 * per_step + 2 * 9 * 2) for n in sizes) + 11 * per_step
    first = _loop(sampled, 0, 0, sizes, model, opt)
    # how each step was had: the first 8, the 3 and the no-grad tail of 11 counted, two 8s reused
    assert sampled.steps == {"counted": 3, "partial": 0, "reused": 2}
    counted_ops = sampled.ops
    again = _loop(sampled, 0, 0, sizes, model, opt)
    assert first == (ref, False)   # the 2nd and 3rd step reused the 1st one's count
    assert again == (ref, False)   # every step reused
    assert sampled.steps == {"counted": 3, "partial": 0, "reused": 7}
    assert sampled.ops - counted_ops < counted_ops / 4     # reused steps ran only their preambles counted
    assert 0 < counted_ops < full.ops                     # the full count ran every op through the counter
    assert sampled.inexact == 0
    # a new batch size, or a grown layer (its parameter shapes are part of the signature), is counted
    assert _loop(sampled, 0, 1, [5], model, opt)[0] == _loop(full, 0, 1, [5], model, opt)[0]
    model[2] = nn.Linear(9, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert _loop(sampled, 0, 1, sizes, model, opt) == (_loop(full, 0, 1, sizes, model, opt)[0], False)
    assert sampled.inexact == 0


def test_clients_share_signatures_but_server_steps_do_not():
    """A step one client counted is reused by another client's model of the same class and shapes (it is
    not measured again) and equals a full count; a server step is its own party and counted afresh."""
    torch.manual_seed(0)

    def make():
        model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 2))
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    sampled, full = Accountant(CPU, "sampled"), Accountant(CPU, "all")
    ref = _loop(full, 0, 0, [8, 3], *make())[0]
    assert _loop(sampled, 0, 0, [8, 3], *make()) == (ref, True)     # client 0: counted
    assert _loop(sampled, 1, 0, [8, 3], *make()) == (ref, False)    # client 1, its own model: reused
    assert _loop(sampled, "server:round", 0, [8, 3], *make()) == (ref, True)
    other = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 2))  # another structure: counted
    assert _loop(sampled, 2, 0, [8], other, torch.optim.SGD(other.parameters(), lr=0.1))[1] is True


class _Hidden(nn.Module):
    """A matmul whose size comes from an attribute, invisible in the module call's signature."""

    def __init__(self):
        super().__init__()
        self.k = 4
        self.w = nn.Parameter(torch.randn(6, 1))

    def forward(self, x):
        return (x @ torch.ones(6, self.k)).sum(1, keepdim=True) * self.w.sum()


def test_sampled_reuse_is_by_signature():
    """The mechanism reuses counts by signature: a size the signature cannot see is reused (documented
    limit), a size it can see (input shape), or work outside any module call, is counted afresh."""
    torch.manual_seed(0)
    model = _Hidden()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    acct = Accountant(CPU, "sampled")
    a = _loop(acct, "c", 0, [8], model, opt)[0]
    model.k = 40
    assert _loop(acct, "c", 0, [8], model, opt)[0] == a  # reused: the signature did not change
    assert _loop(acct, "c", 0, [9], model, opt)[0] != a   # new input shape: counted
    for n in (3, 30):  # no module call: always counted
        with acct.measure("server:round", 0) as m:
            X = torch.randn(n, 5, dtype=torch.float64)
            G = X.T @ X  # the only counted op: torch's formulas give a solve 0
            torch.linalg.solve(G + torch.eye(5, dtype=torch.float64), G)
        assert m.flops == 2 * n * 5 * 5 and m.flops_measured


def test_sampled_skips_the_feature_cache_fill():
    """Module calls made while another dispatch mode is in charge (the cache fill hides itself behind its
    own counter) are not part of a step, and its FLOPs are not the method's."""
    from torch.utils._python_dispatch import _disable_current_modes

    lin = nn.Linear(4, 4)
    acct = Accountant(CPU, "sampled")
    with acct.measure(0, 0) as m:
        with _disable_current_modes(), FlopCounterMode(display=False):
            lin(torch.randn(3, 4))
        lin(torch.randn(2, 4))
    assert m.flops == 2 * 2 * 4 * 4


# -- end to end: sampled against a full count on the smoke preset --------------------------------------

#: Stated tolerance of sampled against all; on these runs the two are equal.
REL_TOL = 0.01


@pytest.fixture(scope="module")
def ws_runs():
    run = smoke_config(rounds_per_task="2", epochs="2", train_per_class="24")
    return workspace(run), run


@pytest.mark.parametrize("name", ["fedlscl", "dualprompt", "fedavg", "glfc", "fedmgp", "target"])
def test_sampled_matches_full_count(ws_runs, name):
    ws, run = ws_runs
    cls = get_method(name)
    full = run_method(cls, cls.Config(), ws, run, flops="all")
    sampled = run_method(cls, cls.Config(), ws, run, flops="sampled")
    for key in ("client_flops", "server_flops"):
        a, s = full.metrics[key], sampled.metrics[key]
        assert a is not None and s is not None
        assert abs(s - a) <= REL_TOL * a, (key, s, a)
    rows = sampled.rounds[sampled.rounds.phase == "round"]
    assert (rows.flops > 0).all()
    assert not rows.flops_measured.all()  # some steps were reused, not counted
    full_rows = full.rounds[full.rounds.phase == "round"]
    assert full_rows.flops_measured.all()
    assert list(rows.flops) == list(full_rows.flops)  # row by row, not only in total
    if name == "fedmgp":  # a method with server-side work
        assert full.metrics["server_flops"] > 0
