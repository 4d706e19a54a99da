"""Time a Fed-LSCL training step at paper scale: ViT-B/16 at 224 (random weights), resnet18 client, batch 64,
bf16 autocast on CUDA. Reports images/s and peak memory with the card's name, for:

* ``fedlscl_cached``: Fed-LSCL Stage-1 step, frozen blocks < b from the prefix cache (the default);
* ``fedlscl_uncached``: the same step recomputing the frozen prefix every step;
* ``frozen_vit_head``: a frozen-ViT forward + linear-head step (the overhead baseline of collaboration);
* ``lora_batched`` / ``lora_loop``: the adapted block + rest of the ViT, batched vs a per-sample loop.

    python benchmarks/paper_scale_step.py --out results.json            # GPU, paper scale
    python benchmarks/paper_scale_step.py --tiny --steps 3               # CPU dry run (tiny ViT, 32 px)

Its pieces (:func:`build`, :func:`fedlscl_step`, :func:`frozen_vit_head_step`, :func:`frozen_forward`,
:func:`count_flops`) are also what ``benchmarks/gpu_check.py`` measures.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fcl_bench.api import ClientEnv, ScenarioInfo, Task
from fcl_bench.data import Batch, ClientData, Preprocess, TensorSource
from fcl_bench.methods.fedlscl import FedLSCLClient, FedLSCLConfig
from fcl_bench.nn.cache import FeatureCache, FeatureView
from fcl_bench.nn.foundation import FoundationModel, build_timm_vit
from fcl_bench.nn.lora import adapted_forward, reference_lora_loop
from fcl_bench.nn.small import build_small_model


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn, steps: int, warmup: int, dev: torch.device) -> tuple[float, int]:
    for _ in range(warmup):
        fn()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(dev)
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    return (time.perf_counter() - t0) / steps, int(peak)


@dataclass
class StepBench:
    """What the step benchmarks share: the frozen model, one client's environment and data, one batch."""

    fm: FoundationModel
    env: ClientEnv
    data: ClientData
    batch: Batch
    cache: FeatureCache
    classes: list[int]
    arch: str
    name: str


def build(tiny: bool, batch_size: int, dev: torch.device) -> StepBench:
    """ViT-B/16 at 224 with random weights and a resnet18 client (``tiny``: the tiny ViT at 32 px and a
    resnet10t), ``4 * batch_size`` random images of 8 classes, bf16 autocast on CUDA."""
    torch.manual_seed(0)
    if tiny:
        from fcl_bench.nn.tiny_vit import TINY_VIT_CONFIG, build_tiny_vit
        vit, pre, name, arch, width = build_tiny_vit(), Preprocess(**TINY_VIT_CONFIG), "tiny", "resnet10t", 128
    else:
        vit, _ = build_timm_vit("vit_base_patch16_224", None, pretrained=False)
        pre = Preprocess(input_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.9)
        name, arch, width = "vit_base_patch16_224 (random weights)", "resnet18", 512
    fm = FoundationModel(vit, name, pre, dev, {"source": "random"})
    n, classes = 4 * batch_size, list(range(8))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, pre.input_size, pre.input_size), dtype=torch.uint8, generator=g)
    labels = np.arange(n) % len(classes)
    source = TensorSource(images, labels)
    cache = FeatureCache(fm, {"train": source}, "bench", batch_size=batch_size)
    info = ScenarioInfo(num_classes=8, num_clients=1, num_tasks=1, rounds_per_task=1, client_tasks=[[classes]],
                        train_sizes=[[n]])
    amp = torch.bfloat16 if dev.type == "cuda" else None
    view = FeatureView(cache, "client 0", {"train": np.ones(n, dtype=bool)})
    env = ClientEnv(scenario=info, device=dev, amp_dtype=amp, foundation=fm, features=view,
                    _make_small=build_small_model, small_width=width, small_archs=[arch], seed=0,
                    batch_size=batch_size, epochs=1, client_id=0)
    data = ClientData(source, np.arange(n), "train", pre, dev)
    batch = data.batch(np.arange(batch_size))
    _ = batch.x  # images on the device once, as an in-memory dataset would be
    return StepBench(fm, env, data, batch, cache, classes, arch, name)


def fedlscl_step(b: StepBench, cached: bool = True) -> Callable[[], None]:
    """One Fed-LSCL Stage-1 training step (forward, CE, backward, Adam) on ``b.batch``."""
    # Step time does not depend on lr; a small one keeps 20+ steps on one random-label batch finite
    # (at lr 1e-3 the generated LoRA factors of a random ViT-B grow until the loss overflows).
    client = FedLSCLClient(FedLSCLConfig(prefix_cache=cached, lr=1e-5), b.env)
    client.start_task(Task(index=0, classes=b.classes, seen_classes=b.classes, train=b.data))
    client._train_mode(True)
    b.cache.prefix(b.batch, 3)  # fill the cache for this batch once

    def step(c=client):
        with b.env.autocast():
            logits, _, _ = c.forward(b.batch)
            loss = F.cross_entropy(logits.float(), b.batch.y)
        c._step(loss)
    return step


def frozen_vit_head_step(b: StepBench) -> Callable[[], None]:
    """A frozen-ViT forward plus a trained linear head: what collaboration is compared with."""
    head = torch.nn.Linear(b.fm.embed_dim, len(b.classes)).to(b.env.device)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)

    def step():
        with b.env.autocast():
            feat = b.fm.cls(b.batch.x)
            loss = F.cross_entropy(head(feat).float(), b.batch.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def frozen_forward(b: StepBench) -> Callable[[], None]:
    """The frozen ViT's forward alone (final CLS feature), no gradient."""
    def fwd():
        with torch.no_grad(), b.env.autocast():
            b.fm.cls(b.batch.x)
    return fwd


def count_flops(fn: Callable[[], None]) -> int:
    """FLOPs of one call of ``fn`` (``torch.utils.flop_counter``: matrix products and convolutions)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def timed(fn: Callable[[], None], steps: int, warmup: int, dev: torch.device, batch: int) -> dict:
    sec, peak = _time(fn, steps, warmup, dev)
    return {"images_per_s": batch / sec, "seconds_per_step": sec, "peak_memory_gib": peak / 2**30}


def measure(b: StepBench, steps: int, warmup: int) -> dict:
    """Every step of the module docstring, timed, with the ratios between them."""
    dev, n = b.env.device, len(b.batch)
    results: dict = {}
    for cached in (True, False):
        results["fedlscl_cached" if cached else "fedlscl_uncached"] = timed(fedlscl_step(b, cached), steps, warmup,
                                                                            dev, n)
    results["frozen_vit_head"] = timed(frozen_vit_head_step(b), steps, warmup, dev, n)
    h = b.cache.prefix(b.batch, 3)
    d = b.fm.embed_dim
    A = torch.randn(n, d, 4, device=dev) * 0.02
    B = torch.randn(n, 4, 3 * d, device=dev) * 0.02
    for label, fn in (("lora_batched", adapted_forward), ("lora_loop", reference_lora_loop)):
        def fwd(f=fn):
            with torch.no_grad(), b.env.autocast():
                f(b.fm.vit, h, 3, A, B, 1.0)
        results[label] = timed(fwd, max(2, steps // 4), 1, dev, n)
    r = results
    results["ratios"] = {
        "fedlscl_uncached_over_cached_time": r["fedlscl_uncached"]["seconds_per_step"] / r["fedlscl_cached"]["seconds_per_step"],
        "fedlscl_cached_over_frozen_vit_head_time": r["fedlscl_cached"]["seconds_per_step"] / r["frozen_vit_head"]["seconds_per_step"],
        "lora_loop_over_batched_time": r["lora_loop"]["seconds_per_step"] / r["lora_batched"]["seconds_per_step"],
    }
    return results


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny ViT at 32 px (CPU dry run)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    b = build(args.tiny, args.batch, dev)
    results: dict = {"device": device_name(dev), "torch": torch.__version__, "model": b.name, "small_model": b.arch,
                     "batch": args.batch, "amp": str(b.env.amp_dtype), "steps": args.steps}
    results.update(measure(b, args.steps, args.warmup))
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
