"""One prepared check for a GPU machine: step throughput and MFU, the frozen forward, every method end to end.

On a paper-cifar100-shaped setup with synthetic data at 224 px and random ViT-B/16 weights (timm
``vit_base_patch16_224``, ``pretrained=False``: nothing is downloaded), bf16 autocast, it records the card
(name, compute capability, driver) and writes one JSON:

* ``steps``: a Fed-LSCL Stage-1 training step (batch 64, resnet18 client, frozen prefix from the cache) in
  images/s, its FLOPs per image (``torch.utils.flop_counter``, forward + backward) and its MFU against the
  card's bf16 dense peak; the same for a frozen-ViT-plus-linear-head step and for the frozen forward alone;
  the FLOP ratio and the time ratio of the Fed-LSCL step to the frozen-ViT-plus-head step (the gap between
  the two is time spent beyond the FLOPs); peak memory of each (the steps are those of
  ``benchmarks/paper_scale_step.py``, imported from it);
* ``runs``: every method's end-to-end wall time for one seed on the paper's protocol (5 clients, 15 private
  + 25 public classes, 5 tasks x 8 classes, resnet18 clients, batch 64) on synthetic data, with a short
  shape (``--rounds-per-task``, ``--train-per-class``, ``--test-per-class``), and each run's peak memory
  (CUDA allocator; process RSS on CPU).

    python benchmarks/gpu_check.py                                  # GPU: all twelve methods, short run shape
    python benchmarks/gpu_check.py --methods fedlscl,fedavg --rounds-per-task 5 --train-per-class 100
    python benchmarks/gpu_check.py --tiny --methods fedavg --steps 2   # CPU: tiny ViT, smoke shape (the test)

MFU needs the card's bf16 dense peak: from the table ``PEAK_BF16_TFLOPS`` by card name, or
``--peak-tflops``; an unknown card records MFU as null. Output: ``--json`` (default
``benchmarks/results/gpu_check_<card>.json``).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from fcl_bench import config as C
from fcl_bench import registry
from fcl_bench.executor import workspace_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paper_scale_step as P  # noqa: E402
from profile_methods import RESULTS, measured_run  # noqa: E402

#: bf16 dense tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets; the first name that
#: occurs in ``torch.cuda.get_device_name`` wins, so more specific names come first.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "B200": 2250.0,
    "GH200": 989.0,
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 6000 Ada": 364.0,
    "RTX A6000": 155.0,
    "RTX 4090": 165.0,
}


#: the short end-to-end run shape on the paper protocol (``--tiny`` keeps the smoke preset's unless given)
SHORT_SHAPE = {"rounds_per_task": 1, "train_per_class": 40, "test_per_class": 20}


def peak_tflops(name: str, override: float | None) -> tuple[float | None, str]:
    """The bf16 dense peak for card ``name`` and where it came from."""
    if override is not None:
        return override, "--peak-tflops"
    for key, value in PEAK_BF16_TFLOPS.items():
        if key.lower() in name.lower():
            return value, f"table: {key}"
    return None, "unknown card: pass --peak-tflops for MFU"


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def card(dev: torch.device) -> dict:
    if dev.type != "cuda":
        return {"name": "cpu", "capability": None, "driver": None, "cuda": None, "memory_gib": None}
    props = torch.cuda.get_device_properties(dev)
    return {"name": torch.cuda.get_device_name(dev), "capability": list(torch.cuda.get_device_capability(dev)),
            "driver": driver_version(), "cuda": torch.version.cuda, "memory_gib": props.total_memory / 2**30}


def step_checks(tiny: bool, batch: int, steps: int, warmup: int, dev: torch.device, peak: float | None) -> dict:
    """Fed-LSCL step, frozen-ViT-plus-head step and frozen forward: images/s, FLOPs per image, MFU, memory."""
    b = P.build(tiny, batch, dev)
    out: dict = {"model": b.name, "small_model": b.arch, "batch": batch, "amp": str(b.env.amp_dtype), "steps": steps}
    for label, fn in (("fedlscl_step", P.fedlscl_step(b, cached=True)),
                      ("frozen_vit_head_step", P.frozen_vit_head_step(b)),
                      ("frozen_forward", P.frozen_forward(b))):
        fn()  # warm: lazy state (Adam moments, cache entries) before counting
        flops = P.count_flops(fn)
        r = P.timed(fn, steps, warmup, dev, batch)
        r["flops_per_image"] = flops / batch
        r["flops_per_s"] = flops / r["seconds_per_step"]
        r["mfu"] = r["flops_per_s"] / (peak * 1e12) if peak else None
        out[label] = r
        print(f"{label}: {r['images_per_s']:.1f} images/s, {r['flops_per_image'] / 1e9:.2f} GFLOP/image, "
              f"MFU {r['mfu'] if r['mfu'] is None else round(r['mfu'], 4)}", file=sys.stderr, flush=True)
    f, h = out["fedlscl_step"], out["frozen_vit_head_step"]
    out["fedlscl_over_frozen_vit_head"] = {"time": f["seconds_per_step"] / h["seconds_per_step"],
                                           "flops": f["flops_per_image"] / h["flops_per_image"]}
    out["fedlscl_flops_per_s_over_frozen_forward"] = f["flops_per_s"] / out["frozen_forward"]["flops_per_s"]
    return out


def run_config(args) -> C.RunConfig:
    if args.tiny:  # the CPU dry run: smoke shape, the tiny ViT at random init, timm's smallest test CNN
        over = {"foundation_pretrained": "false", "small_models": "test_resnet"}
        base = C.preset("smoke")
    else:
        over = {"dataset": "synthetic", "foundation": "vit_base_patch16_224", "foundation_pretrained": "false"}
        base = C.preset("paper-cifar100")
    for key, short in SHORT_SHAPE.items():
        value = getattr(args, key)
        if value is not None or not args.tiny:
            over[key] = str(short if value is None else value)
    run_over, _ = C.split_overrides(args.overrides)
    return C.apply_overrides(base, {**over, "device": args.device, **run_over}, "run")


def end_to_end(methods: list[str], run: C.RunConfig, out: Path, flops: str) -> dict:
    ws = workspace_for(run, progress=False)
    t0 = time.perf_counter()
    ws.ensure_foundation(progress=False)
    res: dict = {"foundation_load_seconds": time.perf_counter() - t0, "methods": {}}
    for m in methods:
        if ws.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ws.device)
        try:
            r = measured_run(m, run, out, flops, suite="gpu-check")
        except RuntimeError as e:  # one failed method is recorded; the others still run
            res["methods"][m] = {"error": str(e)}
            print(f"{m}: FAILED {e}", file=sys.stderr, flush=True)
            continue
        peak = (torch.cuda.max_memory_allocated(ws.device) if ws.device.type == "cuda" else r["peak_rss"])
        mt = r["metrics"]
        res["methods"][m] = {"wall_seconds": r["wall"], "run_seconds": mt["wall_seconds"],
                             "client_train_seconds": mt["client_train_seconds"],
                             "server_seconds": mt["server_seconds"], "phase_seconds": mt.get("phase_seconds"),
                             "client_flops": mt.get("client_flops"), "final_acc": mt.get("final_acc"),
                             "peak_memory_bytes": int(peak),
                             "memory_kind": "cuda_allocator" if ws.device.type == "cuda" else "process_rss"}
        print(f"{m}: {r['wall']:.1f} s, peak {peak / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: tiny ViT at 32 px, smoke shape")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--methods", default="all", help="comma-separated, or all (default); none: steps only")
    ap.add_argument("--batch", type=int, default=64, help="batch of the step checks")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds-per-task", type=int, default=None, help="end-to-end runs (default 1; paper: 5)")
    ap.add_argument("--train-per-class", type=int, default=None,
                    help="end-to-end runs (default 40; the paper's CIFAR-100: all 500)")
    ap.add_argument("--test-per-class", type=int, default=None,
                    help="end-to-end runs (default 20; the paper's CIFAR-100: all 100)")
    ap.add_argument("-o", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="further run overrides of the end-to-end runs")
    ap.add_argument("--flops", default="sampled", choices=("sampled", "all", "off"))
    ap.add_argument("--peak-tflops", type=float, default=None, help="the card's bf16 dense peak, TFLOP/s")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--results-dir", default=None, help="where the end-to-end runs write (default: temporary)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = run_config(args)
    from fcl_bench.workspace import resolve_device
    dev = resolve_device(run.device)
    info = card(dev)
    peak, peak_source = peak_tflops(info["name"], args.peak_tflops)
    if dev.type != "cuda" and args.peak_tflops is None:
        peak, peak_source = None, "cpu: no bf16 peak (pass --peak-tflops for an MFU)"
    res: dict = {"card": info, "torch": torch.__version__, "peak_bf16_tflops": peak, "peak_source": peak_source,
                 "tiny": args.tiny}
    res["steps"] = step_checks(args.tiny, args.batch, args.steps, args.warmup, dev, peak)
    available = registry.available_methods()
    methods = ([] if args.methods == "none" else available if args.methods == "all"
               else [m.strip() for m in args.methods.split(",") if m.strip()])
    unknown = [m for m in methods if m not in available]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(available)}")
    if methods:
        import tempfile
        with tempfile.TemporaryDirectory(prefix="fcl-gpu-check-") as tmp:
            e2e = end_to_end(methods, run, Path(args.results_dir or tmp), args.flops)
        res["runs"] = {"run_config": run.to_dict(), "flops": args.flops, **e2e}
    slug = re.sub(r"[^a-z0-9]+", "_", info["name"].lower()).strip("_")
    path = Path(args.json) if args.json else RESULTS / f"gpu_check_{slug}{'_tiny' if args.tiny else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(res, indent=2)
    path.write_text(text + "\n")
    print(text)
    return res


if __name__ == "__main__":
    main()
