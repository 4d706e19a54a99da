"""How a run's cost grows with clients, with tasks and with images per client, for a few methods.

Three grids around the smoke preset (1 round per task, 1 epoch, batch 32), each point a few seconds:

* clients k = 2, 5, 10, 20, each holding smoke-sized data of its own (4 private classes of 16 training
  images, 2 tasks x 2 classes; no public classes, so a client's data does not shrink as k grows);
* tasks T = 1, 2, 4, 8 (2 clients, T private + T public classes, 2 classes per task);
* images per client: 8, 16, 32, 64 training images per class (2 clients, 2 tasks).

Every run records its phases (``phase_seconds``); a point's cost is its wall time minus the shared
feature-cache fill (paid by the first foundation method of each point's workspace). Per method, axis and
component (client: training and the clients' other calls; server; eval; harness: the rest) the script fits
a power law ``seconds ~ x^p`` by least squares in log-log: p = 1 is linear, p = 2 quadratic. The work each
point hands the methods is recorded too (training images, evaluated test images), and the cost per unit of
work at the largest point over that at the smallest (1 = linear in the work). Expected to grow faster than
the work: Fed-LSCL's server with k (One-by-One Distillation distils each client's generator from every
other client's: k(k-1) teacher passes per round), and evaluation with T (after task t every client is
evaluated on all t seen tasks: T(T+1)/2 test sets per client).

    python benchmarks/scaling.py --threads 1                # about 10 minutes on 2 busy cores
    python benchmarks/scaling.py --threads 1 --quick        # a smaller grid

Writes ``scaling.json`` (``scaling_quick.json`` with ``--quick``) and a PNG of the same name to ``--out-dir``
(default ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

from fcl_bench import config as C
from fcl_bench.executor import workspace_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_methods import RESULTS, measured_run, train_images  # noqa: E402

METHODS = ("fedavg", "fedvit", "dualprompt", "fedlscl")
COMPONENTS = ("client", "server", "eval", "harness")
#: axis -> (grid, quick grid, the run overrides of a point)
AXES = {
    "clients": ((2, 5, 10, 20), (2, 5, 10),
                lambda v: dict(clients=v, private=4, public=0, server_per_class=0)),
    "tasks": ((1, 2, 4, 8), (1, 2, 4), lambda v: dict(tasks=v, private=v, public=v)),
    "images_per_class": ((8, 16, 32, 64), (8, 16, 32), lambda v: dict(train_per_class=v)),
}
LABELS = {"clients": "clients k", "tasks": "tasks T", "images_per_class": "training images per class"}


def point_config(base: C.RunConfig, changes: dict) -> C.RunConfig:
    return C.apply_overrides(base, {k: str(v) for k, v in changes.items()}, "run")


def eval_images(ws) -> int:
    """Test images evaluated in a run: after task t, every client on its test sets of tasks 0..t."""
    sc = ws.scenario
    return int(sum(len(sc.test_indices[c][i]) for c in range(sc.num_clients) for t in range(sc.num_tasks)
                   for i in range(t + 1)))


def measure_point(method: str, run: C.RunConfig, out: Path, flops: str) -> dict:
    r = measured_run(method, run, out, flops, suite="scaling")
    ph = r["metrics"].get("phase_seconds") or {}
    fill = float(ph.get("cache_fill", 0.0))
    parts = {"client": ph.get("client_train", 0.0) + ph.get("client_other", 0.0), "server": ph.get("server", 0.0),
             "eval": ph.get("eval", 0.0)}
    cost = r["wall"] - fill
    parts["harness"] = cost - sum(parts.values())
    return {"cost_seconds": cost, "wall_seconds": r["wall"], "cache_fill_seconds": fill,
            "components": {k: float(v) for k, v in parts.items()}, "phase_seconds": ph,
            "train_images": train_images(r["rounds"], run.epochs), "final_acc": r["metrics"].get("final_acc")}


def power_fit(x, y) -> float | None:
    """Exponent p of ``y ~ x^p`` (least squares in log-log); None when fewer than two positive points."""
    pts = [(a, b) for a, b in zip(x, y) if a > 0 and b > 0]
    if len(pts) < 2:
        return None
    lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(lx, ly, 1)[0])


def summarise(points: list[dict]) -> dict:
    """Exponents per component and the cost per unit of work at the largest point over the smallest."""
    x = [p["value"] for p in points]
    out = {"exponent": {"cost": power_fit(x, [p["cost_seconds"] for p in points]),
                        **{c: power_fit(x, [p["components"][c] for p in points]) for c in COMPONENTS}}}
    first, last = points[0], points[-1]
    out["train_images_exponent"] = power_fit(x, [p["train_images"] for p in points])
    out["eval_images_exponent"] = power_fit(x, [p["eval_images"] for p in points])
    out["client_seconds_per_train_image_last_over_first"] = (
        (last["components"]["client"] / last["train_images"]) / (first["components"]["client"] / first["train_images"]))
    out["eval_seconds_per_eval_image_last_over_first"] = (
        (last["components"]["eval"] / last["eval_images"]) / (first["components"]["eval"] / first["eval_images"]))
    out["cost_per_train_image_last_over_first"] = (
        (last["cost_seconds"] / last["train_images"]) / (first["cost_seconds"] / first["train_images"]))
    return out


def plot(res: dict, path: Path) -> None:
    axes_names = list(res["axes"])
    methods = res["methods"]
    with matplotlib.rc_context({"font.size": 8}):
        fig = Figure(figsize=(4 * len(axes_names), 6.6), layout="constrained")
        grid = fig.subplots(2, len(axes_names), squeeze=False)
        colours = matplotlib.colormaps["tab10"]
        for j, axis in enumerate(axes_names):
            data = res["axes"][axis]
            top, bottom = grid[0][j], grid[1][j]
            for i, m in enumerate(methods):
                pts = data[m]["points"]
                x = [p["value"] for p in pts]
                p_cost = data[m]["fit"]["exponent"]["cost"]
                top.plot(x, [p["cost_seconds"] for p in pts], "o-", color=colours(i),
                         label=f"{m} (p={p_cost:.2f})" if p_cost is not None else m)
            x0 = data[methods[0]]["points"][0]["value"]
            xs = np.array([p["value"] for p in data[methods[0]]["points"]], dtype=float)
            y0 = min(data[m]["points"][0]["cost_seconds"] for m in methods)
            top.plot(xs, y0 * xs / x0, ":", color="grey", label="linear")
            top.set(xscale="log", yscale="log", xlabel=LABELS[axis], ylabel="run seconds (cache fill aside)",
                    title=f"cost vs {LABELS[axis]}")
            top.legend(fontsize=6)
            focus = "fedlscl" if "fedlscl" in methods else methods[-1]
            pts = data[focus]["points"]
            x = [p["value"] for p in pts]
            for k, comp in enumerate(COMPONENTS):
                p_c = data[focus]["fit"]["exponent"][comp]
                ys = [max(p["components"][comp], 1e-4) for p in pts]
                bottom.plot(x, ys, "s--", color=colours(k + 4),
                            label=f"{comp} (p={p_c:.2f})" if p_c is not None else comp)
            bottom.set(xscale="log", yscale="log", xlabel=LABELS[axis], ylabel="seconds",
                       title=f"{focus}: where the time goes")
            bottom.legend(fontsize=6)
            for ax in (top, bottom):
                ax.set_xticks(xs, [str(int(v)) for v in xs])
                ax.xaxis.set_minor_locator(NullLocator())
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
                ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        fig.suptitle(f"fcl-bench scaling ({res['threads']} thread(s), {res['device']}, smoke-sized points; "
                     "p: fitted exponent, seconds ~ x^p)", fontsize=9)
        fig.savefig(path, dpi=130)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--quick", action="store_true", help="a smaller grid (three points per axis)")
    ap.add_argument("--axes", default=",".join(AXES), help="comma-separated: clients, tasks, images_per_class")
    ap.add_argument("--grid", action="append", default=[], metavar="AXIS=V1,V2,...",
                    help="replace an axis's grid, e.g. clients=2,4")
    ap.add_argument("-o", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="run overrides applied to every point (e.g. foundation_pretrained=false)")
    ap.add_argument("--flops", default="off", choices=("off", "sampled", "all"),
                    help="FLOP counting of each run (default off: not what is being scaled)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    axes = [a.strip() for a in args.axes.split(",") if a.strip()]
    bad = [a for a in axes if a not in AXES]
    if bad:
        ap.error(f"unknown axis {', '.join(bad)}; axes: {', '.join(AXES)}")
    grids = {a: AXES[a][1 if args.quick else 0] for a in axes}
    for item in args.grid:
        name, _, values = item.partition("=")
        if name not in grids or not values:
            ap.error(f"--grid {item!r}: give AXIS=V1,V2,... with AXIS one of {', '.join(grids)}")
        grids[name] = tuple(int(v) for v in values.split(","))
    run_over, _ = C.split_overrides(args.overrides)
    base = C.apply_overrides(C.preset("smoke"), run_over, "run")
    res: dict = {"methods": methods, "threads": torch.get_num_threads(), "flops": args.flops, "base": base.to_dict(),
                 "grids": grids, "torch": torch.__version__, "axes": {}}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fcl-scaling-") as tmp:
        for axis in axes:
            res["axes"][axis] = {m: {"points": []} for m in methods}
            for v in grids[axis]:
                run = point_config(base, AXES[axis][2](v))
                ws = workspace_for(run, progress=False)
                n_eval = eval_images(ws)
                for m in methods:
                    p = measure_point(m, run, Path(tmp), args.flops)
                    p.update(value=v, eval_images=n_eval)
                    res["axes"][axis][m]["points"].append(p)
                    print(f"{axis}={v} {m}: {p['cost_seconds']:.2f} s", file=sys.stderr, flush=True)
            for m in methods:
                res["axes"][axis][m]["fit"] = summarise(res["axes"][axis][m]["points"])
    res["device"] = str(ws.device)
    res["total_seconds"] = time.perf_counter() - t_start
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "scaling_quick" if args.quick else "scaling"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    plot(res, out / f"{stem}.png")
    print(table(res))
    return res


def table(res: dict) -> str:
    """Markdown: per axis and method, the fitted exponents of cost and of each component."""
    lines = ["| axis | method | cost p | client p | server p | eval p | harness p | cost per train image, last / first |",
             "|---|---|---|---|---|---|---|---|"]

    def f(v):
        return "n/a" if v is None else f"{v:.2f}"

    for axis, per in res["axes"].items():
        for m, d in per.items():
            e = d["fit"]["exponent"]
            lines.append(f"| {axis} | {m} | {f(e['cost'])} | {f(e['client'])} | {f(e['server'])} | {f(e['eval'])} | "
                         f"{f(e['harness'])} | {f(d['fit']['cost_per_train_image_last_over_first'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
