"""Where each method's run time goes, on one preset (default quick), all runs in one process.

For every method: wall time; its shares spent in client training, the clients' other calls (``start_task``,
``receive``, ``end_task``), server work, evaluation, the wire (payload checks, encode, decode), FLOP counting,
the shared feature-cache fill, setup (building the method, clients and server) and the rest of the harness;
client FLOPs per training image; achieved FLOP/s, also as a fraction of the frozen foundation forward's
FLOP/s at the run's batch size, measured once at the start of the same process; peak RSS of each run and RSS
after it (to show that nothing grows from run to run).

    python benchmarks/profile_methods.py --threads 1                                 # all twelve, quick
    python benchmarks/profile_methods.py --methods fedlscl,fedavg --preset smoke --out /tmp/profile.md

How the shares are measured: each run records ``phase_seconds`` (:class:`fcl_bench.federation.PhaseClock`);
wall time is the time around :func:`fcl_bench.executor.run_one` (as ``fcl-bench run`` executes it: results
store, checkpoints and all), with the workspace (data, scenario, foundation model) built beforehand. FLOP
counting is measured as the difference: each method runs with ``--flops sampled`` (the default, whose wall
time the table shows) and again with ``--flops off``; counting costs the sampled run's client-training and
server seconds minus the off run's (clamped at 0 per phase: on a busy machine the difference is noisy).
``--flops-cost none`` skips the second run (FLOP counting then stays inside client training and server).
The rest is the wall time minus every measured phase: the schedule's bookkeeping, RNG streams, checks of
logits, checkpoints and the results store.

Output: a markdown table (stdout, and ``--out FILE``) and a JSON (``--json``, default
``benchmarks/results/profile_<preset>.json``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from fcl_bench import config as C
from fcl_bench import registry
from fcl_bench.executor import RunSpec, run_one, workspace_for

RESULTS = Path(__file__).resolve().parent / "results"
#: the phases of ``phase_seconds`` the table shows, in order (``checkpoint`` falls under the rest)
PHASES = ("client_train", "client_other", "server", "eval", "wire", "flop_count", "cache_fill", "setup")


# -- process memory ---------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def rss_bytes() -> int:
    """The process's resident set size now (Linux ``VmRSS``; elsewhere its peak, ``ru_maxrss``)."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """The process's RSS high-water mark since the last :func:`reset_peak_rss` (Linux ``VmHWM``)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``/proc/self/clear_refs``), so the next peak is one run's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so RSS after a run
    shows what is still alive rather than what the allocator keeps for reuse."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def feature_cache_bytes(ws) -> int:
    """Bytes held by the workspace's frozen-feature tables (shared by the runs; not a leak)."""
    tables = getattr(ws.features, "_tables", {}) if ws.features is not None else {}
    return int(sum(v.numel() * v.element_size() + f.numel() for v, f in tables.values()))


# -- the frozen forward: the ceiling a ViT method can reach here --------------------------------------------
def frozen_forward(ws, batch_size: int, min_seconds: float = 1.0, min_reps: int = 5) -> dict:
    """FLOP/s of the frozen foundation model's forward (final CLS feature) on ``batch_size`` training images
    of the workspace: FLOPs counted once (``FlopCounterMode``), then the median of timed repetitions."""
    fm = ws.foundation
    n = min(batch_size, len(ws.dataset.train))
    x = ws.view(np.arange(n)).batch(np.arange(n)).x
    dev = ws.device
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def fwd():
        with torch.no_grad(), amp:
            fm.cls(x)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    fwd()
    with FlopCounterMode(display=False) as counter:
        fwd()
    flops = int(counter.get_total_flops())
    times: list[float] = []
    t_end = time.perf_counter() + min_seconds
    while len(times) < min_reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fwd()
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {"batch": n, "flops_per_batch": flops, "flops_per_image": flops / n, "seconds_per_batch": sec,
            "seconds_min": min(times), "reps": len(times), "flops_per_s": flops / sec}


# -- one run, measured ---------------------------------------------------------------------------------------
def measured_run(method: str, run: C.RunConfig, out: Path, flops: str, overrides: dict[str, str] | None = None,
                 suite: str | None = None) -> dict:
    """Run ``method`` once (``run_one``, forced) and return its wall time, ``metrics.json``, ``rounds.csv``
    and its peak RSS / RSS after (after garbage collection)."""
    spec = RunSpec(method=method, label=method, run=run, out=str(out), suite=suite or f"profile-{flops}",
                   method_overrides=dict(overrides or {}), force=True, flops=flops, quiet=True)
    release_memory()
    reset_peak_rss()
    t0 = time.perf_counter()
    row = run_one(spec, echo=lambda line: None, err=lambda line: print(line, file=sys.stderr))
    wall = time.perf_counter() - t0
    peak = peak_rss_bytes()
    if row.get("state") != "completed":
        raise RuntimeError(f"{method}: the run did not complete ({row.get('reason')}); see {spec.path / 'log.txt'}")
    metrics = json.loads((spec.path / "metrics.json").read_text())
    rounds = pd.read_csv(spec.path / "rounds.csv")
    release_memory()
    return {"wall": wall, "metrics": metrics, "rounds": rounds, "peak_rss": peak, "rss_after": rss_bytes()}


def shares(sampled: dict, off: dict | None) -> dict[str, float]:
    """Seconds per phase of the sampled run (FLOP counting taken out of client training and server, when the
    off run is given) and ``rest``: the wall time no phase accounts for."""
    ph = dict(sampled["metrics"].get("phase_seconds") or {})
    sec = {k: float(ph.get(k, 0.0)) for k in PHASES if k != "flop_count"}
    sec["flop_count"] = 0.0
    if off is not None:
        ph_off = off["metrics"].get("phase_seconds") or {}
        for k in ("client_train", "server"):
            net = min(sec[k], float(ph_off.get(k, 0.0)))
            sec["flop_count"] += sec[k] - net
            sec[k] = net
    sec["rest"] = sampled["wall"] - sum(sec.values())
    return sec


def train_images(rounds: pd.DataFrame, epochs: int) -> int:
    """Training images the schedule handed the clients: each round's task set, times the run's epochs."""
    r = rounds[rounds.phase == "round"]
    return int(r.train_samples.sum()) * epochs


def profile_method(method: str, run: C.RunConfig, out: Path, flops_cost: str, ceiling: float, ws,
                   overrides: dict[str, str] | None = None) -> dict:
    """One method profiled: the sampled run (and the off run for ``flops_cost == "diff"``)."""
    sampled = measured_run(method, run, out, "sampled", overrides)
    off = measured_run(method, run, out, "off", overrides) if flops_cost == "diff" else None
    sec = shares(sampled, off)
    wall = sampled["wall"]
    m = sampled["metrics"]
    images = train_images(sampled["rounds"], run.epochs)
    cflops = m.get("client_flops")
    achieved = cflops / sec["client_train"] if cflops and sec["client_train"] > 0 else None
    return {
        "wall_seconds": wall,
        "wall_seconds_flops_off": off["wall"] if off else None,
        "run_seconds": m["wall_seconds"],
        "seconds": sec,
        "shares": {k: v / wall for k, v in sec.items()},
        "harness_share": (sec["wire"] + sec["flop_count"] + sec["rest"]) / wall,
        "phase_seconds": m.get("phase_seconds"),
        "client_flops": cflops,
        "server_flops": m.get("server_flops"),
        "train_images": images,
        "client_flops_per_train_image": cflops / images if cflops and images else None,
        "achieved_flops_per_s": achieved,
        "fraction_of_frozen_forward": achieved / ceiling if achieved else None,
        "peak_rss_bytes": sampled["peak_rss"],
        "rss_after_bytes": sampled["rss_after"],
        "rss_after_flops_off_bytes": off["rss_after"] if off else None,
        "feature_cache_bytes": feature_cache_bytes(ws),
        "final_acc": m.get("final_acc"),
    }


# -- output -------------------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def markdown(res: dict) -> str:
    ff = res["frozen_forward"]
    head = ("| method | wall s | client train % | client other % | server % | eval % | wire % | FLOP count % "
            "| cache fill % | setup % | rest % | harness % | client GFLOP / train img | client GFLOP/s "
            "| / frozen fwd | peak RSS GiB | RSS after GiB |")
    lines = [head, "|" + "---|" * (head.count(" | ") + 1)]
    for name, r in res["methods"].items():
        per_img, ach, frac = (r["client_flops_per_train_image"], r["achieved_flops_per_s"],
                              r["fraction_of_frozen_forward"])
        cells = [name, f"{r['wall_seconds']:.1f}", *(_pct(r["shares"][k]) for k in (*PHASES, "rest")),
                 _pct(r["harness_share"]), "n/a" if per_img is None else f"{per_img / 1e9:.3g}",
                 "n/a" if ach is None else f"{ach / 1e9:.2f}", "n/a" if frac is None else f"{frac:.2f}",
                 _gib(r["peak_rss_bytes"]), _gib(r["rss_after_bytes"])]
        lines.append("| " + " | ".join(cells) + " |")
    p = res["process"]
    lines += ["", f"Frozen foundation forward ({res['foundation']}, batch {ff['batch']}): "
                  f"{ff['flops_per_s'] / 1e9:.2f} GFLOP/s ({ff['flops_per_image'] / 1e9:.3f} GFLOP per image) at the "
                  f"start, {res['frozen_forward_at_end']['flops_per_s'] / 1e9:.2f} GFLOP/s at the end. "
                  f"Process: peak RSS {_gib(p['peak_rss_bytes'])} GiB, RSS {_gib(p['rss_before_bytes'])} GiB before "
                  f"the first run and {_gib(p['rss_end_bytes'])} GiB after the last "
                  f"(frozen-feature cache {p['feature_cache_bytes'] / 2**20:.0f} MiB of it). "
                  f"FLOP counting: {res['flops_cost']}. {res['threads']} torch thread(s), "
                  f"load average {res['load_average'][0]:.1f} at the start, {res['load_average_end'][0]:.1f} at "
                  f"the end."]
    return "\n".join(lines)


def parse_overrides(items: list[str]) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    return C.split_overrides(items or [])


def build_run(preset: str, items: list[str], device: str | None) -> tuple[C.RunConfig, dict[str, dict[str, str]]]:
    run_over, per_method = parse_overrides(items)
    if device:
        run_over = {"device": device, **run_over}
    return C.apply_overrides(C.preset(preset), run_over, "run"), per_method


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="all", help="comma-separated method names, or all (default)")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("-o", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="run or METHOD.KEY overrides, as in fcl-bench run")
    ap.add_argument("--device", default=None, help="auto | cpu | cuda (default: the preset's)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy machine)")
    ap.add_argument("--flops-cost", choices=("diff", "none"), default="diff",
                    help="diff: also run each method with --flops off and take the difference (default)")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--json", default=None, help="JSON path (default benchmarks/results/profile_<preset>.json)")
    ap.add_argument("--results-dir", default=None, help="where the runs write (default: a temporary folder)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    available = registry.available_methods()
    methods = available if args.methods.strip() == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in available]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(available)}")
    run, per_method = build_run(args.preset, args.overrides, args.device)

    load0 = os.getloadavg()
    ws = workspace_for(run, progress=False)
    ws.ensure_foundation(progress=False)  # the frozen model is the ceiling; loading it is no method's time
    ceiling = frozen_forward(ws, run.batch_size)
    release_memory()
    rss0 = rss_bytes()
    results: dict = {
        "preset": args.preset, "overrides": args.overrides, "run_config": run.to_dict(),
        "device": str(ws.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "load_average": load0, "foundation": ws.foundation.name, "frozen_forward": ceiling,
        "flops_cost": ("sampled run minus --flops off run, client training and server seconds"
                       if args.flops_cost == "diff" else "not separated (inside client training and server)"),
        "methods": {},
    }
    peak = peak_rss_bytes()
    with tempfile.TemporaryDirectory(prefix="fcl-profile-") as tmp:
        out = Path(args.results_dir) if args.results_dir else Path(tmp)
        for name in methods:
            r = profile_method(name, run, out, args.flops_cost, ceiling["flops_per_s"], ws, per_method.get(name))
            results["methods"][name] = r
            peak = max(peak, r["peak_rss_bytes"])
            print(f"{name}: {r['wall_seconds']:.1f} s, harness {_pct(r['harness_share'])} %, "
                  f"RSS after {_gib(r['rss_after_bytes'])} GiB", file=sys.stderr, flush=True)
    results["frozen_forward_at_end"] = frozen_forward(ws, run.batch_size)
    results["load_average_end"] = os.getloadavg()
    release_memory()
    results["process"] = {"peak_rss_bytes": peak, "rss_before_bytes": rss0, "rss_end_bytes": rss_bytes(),
                          "feature_cache_bytes": feature_cache_bytes(ws),
                          "rss_after_each_run_bytes": [r["rss_after_bytes"] for r in results["methods"].values()]}
    table = markdown(results)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    path = Path(args.json) if args.json else RESULTS / f"profile_{args.preset}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=float) + "\n")
    return results


if __name__ == "__main__":
    main()
