"""Achieved FLOP/s of the foundation-model methods' client rounds as a fraction of the frozen forward's.

For each method: one client's ``train_round`` in the first and second task of the quick preset (CPU, one
thread), timed in CPU seconds and counted with :class:`fcl_bench.accounting.FlopCounter` in a separate
identical call; the reference is the frozen foundation forward (``fm.cls`` on batches of the preset's
size, no grad) and a frozen-ViT-plus-head training step, measured in the same process. Ratios only:
absolute times on a shared machine are noise.

    FCL_BENCH_CACHE=/path/to/cache python benchmarks/step_efficiency.py [--methods fedlscl,l2p] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fcl_bench.accounting import FlopCounter
from fcl_bench.api import RoundInfo
from fcl_bench.config import apply_overrides, preset
from fcl_bench.federation import Federation
from fcl_bench.registry import get_method
from fcl_bench.workspace import Workspace

METHODS = ("fedlscl", "l2p", "dualprompt", "fedmgp", "lorm", "pilora")


def _cpu(fn, reps: int = 1) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def _flops(fn) -> int:
    with FlopCounter() as c:
        fn()
    return c.total


def reference(ws: Workspace, batch_size: int, reps: int = 5) -> dict:
    fm = ws.foundation
    size = fm.preprocess.input_size
    x = torch.randn(batch_size, 3, size, size)
    head = torch.nn.Linear(fm.embed_dim, 16)
    opt = torch.optim.Adam(head.parameters())
    y = torch.randint(0, 16, (batch_size,))

    def forward():
        with torch.no_grad():
            fm.cls(x)

    def head_step():
        with torch.no_grad():
            f = fm.cls(x)
        loss = F.cross_entropy(head(f), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    out = {}
    for name, fn in (("frozen_forward", forward), ("frozen_plus_head_step", head_step)):
        fn()
        s, f = _cpu(fn, reps), _flops(fn)
        out[name] = {"seconds": s, "flops": f, "flops_per_s": f / s}
    return out


def method_round(name: str, ws: Workspace, run, task: int = 1) -> dict:
    cls = get_method(name)
    fed = Federation(cls, cls.Config(), ws, run, log=lambda s: None, progress=False, flops="off")
    for t in range(task):
        fed.start_task(t)
        for r in range(run.rounds_per_task):
            fed.run_round(t, r)
        fed.end_task(t)
    fed.start_task(task)
    info = RoundInfo(task=task, round=0, rounds_per_task=run.rounds_per_task,
                     participants=tuple(range(fed.K)))
    client = fed.clients[0]
    snapshot = copy.deepcopy(client.state_dict())

    def one():
        with fed.streams.party(0):
            client.train_round(info)

    one()  # warm (fills the frozen-feature cache)
    client.load_state_dict(copy.deepcopy(snapshot))
    s = _cpu(one)
    client.load_state_dict(copy.deepcopy(snapshot))
    f = _flops(one)
    return {"seconds": s, "flops": f, "flops_per_s": f / s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = apply_overrides(preset("quick"), {"device": "cpu"}, "run")
    ws = Workspace.create(run.workspace())
    ws.ensure_foundation(False)
    ref = reference(ws, run.batch_size)
    rows = {}
    for name in args.methods.split(","):
        r = method_round(name, ws, run)
        r["fraction_of_frozen_forward"] = r["flops_per_s"] / ref["frozen_forward"]["flops_per_s"]
        rows[name] = r
        print(f"{name:10s} {r['flops'] / 1e9:8.2f} GFLOP {r['seconds']:7.2f} s  "
              f"{r['flops_per_s'] / 1e9:6.2f} GFLOP/s  {r['fraction_of_frozen_forward']:.2f} of the frozen forward",
              flush=True)
    for k, v in ref.items():
        print(f"{k:22s} {v['flops_per_s'] / 1e9:6.2f} GFLOP/s")
    if args.out:
        args.out.write_text(json.dumps({"reference": ref, "methods": rows}, indent=1))


if __name__ == "__main__":
    main()
