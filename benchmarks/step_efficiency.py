"""Achieved FLOP/s of the foundation-model methods' client rounds as a fraction of the frozen forward's.

For each method: one client's ``train_round`` in the first and second task of the quick preset (CPU, one
thread), timed in CPU seconds and counted with :class:`fcl_bench.accounting.FlopCounter` in a separate
identical call; the reference is the frozen foundation forward (``fm.cls`` on batches of the preset's
size, no grad) and a frozen-ViT-plus-head training step, measured in the same process. Ratios only:
absolute times on a shared machine are noise.

    FCL_BENCH_CACHE=/path/to/cache python benchmarks/step_efficiency.py [--methods fedlscl,l2p] [--out FILE]
    python benchmarks/step_efficiency.py --methods fedlscl --breakdown    # where its round's time goes
    python benchmarks/step_efficiency.py --methods fedlscl -o channels_last=true   # run options as for fcl-bench run
    python benchmarks/step_efficiency.py --methods fedlscl --vary channels_last=false,true  # each value, one process

``--breakdown`` also splits each method's round by kind of operation (torch.profiler self CPU time and
torch's FLOP formulas per aten op): convolutions (the client CNN), matrix products (the ViT, LoRA, heads),
normalisation, and everything else (activations, elementwise, copies, optimiser); each kind's share of the
time (the profiler's self times), of the FLOPs, and its FLOP/s (its FLOPs over its share of the round's
CPU seconds) against the frozen forward's.
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


#: aten op name fragments -> kind of operation (first match wins; the rest is "other")
KINDS = (("conv", ("conv", "mkldnn_convolution")), ("matmul", ("mm", "matmul", "linear", "addmm", "bmm", "einsum",
                                                              "baddbmm", "scaled_dot_product", "_efficient_attention")),
         ("norm", ("batch_norm", "layer_norm", "native_batch_norm", "native_layer_norm")))


def _kind(op: str) -> str:
    name = op.split("::")[-1]
    for kind, parts in KINDS:
        if any(p in name for p in parts):
            return kind
    return "other"


def breakdown(fn) -> dict:
    """Self CPU seconds and FLOPs of ``fn`` per kind of operation (see :data:`KINDS`)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    secs: dict[str, float] = {}
    for ev in prof.key_averages():
        if ev.key.startswith("aten::") or "::" in ev.key:
            k = _kind(ev.key)
            secs[k] = secs.get(k, 0.0) + ev.self_cpu_time_total / 1e6
    with FlopCounterMode(display=False) as fc:
        fn()
    flops: dict[str, int] = {}
    for op, n in fc.get_flop_counts().get("Global", {}).items():
        k = _kind(str(op))
        flops[k] = flops.get(k, 0) + int(n)
    total_s, total_f = sum(secs.values()), sum(flops.values())
    return {k: {"seconds": secs.get(k, 0.0), "time_share": secs.get(k, 0.0) / total_s,
                "flops": flops.get(k, 0), "flop_share": flops.get(k, 0) / total_f if total_f else 0.0,
                "flops_per_s": flops.get(k, 0) / secs[k] if secs.get(k) else 0.0}
            for k in ("conv", "matmul", "norm", "other")}


def method_round(name: str, ws: Workspace, run, task: int = 1, split: bool = False) -> dict:
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
    out = {"seconds": s, "flops": f, "flops_per_s": f / s}
    if split:
        def fresh():
            client.load_state_dict(copy.deepcopy(snapshot))
            one()
        out["breakdown"] = split_round = breakdown(fresh)
        for b in split_round.values():   # the profiler's times are wall times: scale its shares to CPU seconds
            b["flops_per_s"] = b["flops"] / (b["time_share"] * s) if b["time_share"] else 0.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--breakdown", action="store_true", help="also split each round by kind of operation")
    ap.add_argument("-o", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a run option of the quick preset (repeatable), e.g. -o channels_last=true")
    ap.add_argument("--vary", default=None, metavar="KEY=V1,V2",
                    help="run each method once per value of a run option, in this process (a ratio on one machine)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    bad = [o for o in args.overrides + ([args.vary] if args.vary else []) if "=" not in o]
    if bad:
        ap.error(f"-o and --vary take KEY=VALUE (--vary: KEY=V1,V2), got {bad[0]!r}")
    opts = dict(o.split("=", 1) for o in args.overrides)
    run = apply_overrides(preset("quick"), {**opts, "device": "cpu"}, "run")
    ws = Workspace.create(run.workspace())
    ws.ensure_foundation(False)
    ref = reference(ws, run.batch_size)
    variants = [("", run)]
    if args.vary:
        key, _, values = args.vary.partition("=")
        variants = [(f"[{key}={v}]", apply_overrides(run, {key: v}, "run")) for v in values.split(",")]
    rows = {}
    for name, (tag, vrun) in ((n, v) for n in args.methods.split(",") for v in variants):
        r = method_round(name, ws, vrun, split=args.breakdown)
        r["fraction_of_frozen_forward"] = r["flops_per_s"] / ref["frozen_forward"]["flops_per_s"]
        name = name + tag
        rows[name] = r
        print(f"{name:10s} {r['flops'] / 1e9:8.2f} GFLOP {r['seconds']:7.2f} s  "
              f"{r['flops_per_s'] / 1e9:6.2f} GFLOP/s  {r['fraction_of_frozen_forward']:.2f} of the frozen forward",
              flush=True)
        for kind, b in r.get("breakdown", {}).items():
            frac = b["flops_per_s"] / ref["frozen_forward"]["flops_per_s"]
            print(f"    {kind:7s} {100 * b['time_share']:5.1f} % of the time  {100 * b['flop_share']:5.1f} % of the "
                  f"FLOPs  {b['flops_per_s'] / 1e9:6.2f} GFLOP/s ({frac:.2f} of the frozen forward)", flush=True)
    for k, v in ref.items():
        print(f"{k:22s} {v['flops_per_s'] / 1e9:6.2f} GFLOP/s")
    if args.out:
        args.out.write_text(json.dumps({"reference": ref, "methods": rows}, indent=1))


if __name__ == "__main__":
    main()
