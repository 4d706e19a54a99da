"""Benchmark: batched per-sample LoRA vs a per-sample Python loop, batch 64.

Model: the offline presets' tiny ViT shape (32px, patch 8, width 192, depth 6, 3 heads), LoRA rank 4 on
block 3's qkv, tokens entering block 3 taken from a cache, as Fed-LSCL runs it. Run with
``pytest tests/test_bench_adapters.py --benchmark-enable``; under the default ``--benchmark-disable`` each
case runs once as a plain test. Cases of one group share a table, whose relative column is the ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from fcl_bench.nn.lora import adapted_forward, lora_factor_shapes, reference_lora_loop
from fcl_bench.nn.vit_ops import embed, final_cls, run_blocks

BATCH, BLOCK, RANK, SCALE = 64, 3, 4, 0.25
ROUNDS = {"rounds": 3, "iterations": 1, "warmup_rounds": 1}


@dataclass
class Case:
    vit: VisionTransformer
    h_in: torch.Tensor  # cached tokens entering block BLOCK
    A: torch.Tensor
    B: torch.Tensor
    expected: torch.Tensor  # batched result, computed once


@pytest.fixture(scope="module")
def case() -> Case:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=6, num_heads=3, num_classes=0)
    vit = vit.eval().requires_grad_(False)
    with torch.no_grad():
        h_in = run_blocks(vit, embed(vit, torch.randn(BATCH, 3, 32, 32)), 0, BLOCK)
    d_in, r, out = lora_factor_shapes(192, RANK, "qkv")
    A, B = 0.1 * torch.randn(BATCH, d_in, r), 0.1 * torch.randn(BATCH, r, out)
    with torch.no_grad():
        expected = adapted_forward(vit, h_in, BLOCK, A, B, SCALE, "qkv")
    return Case(vit, h_in, A, B, expected)


@torch.no_grad()
def _frozen(c: Case) -> torch.Tensor:
    return final_cls(c.vit, run_blocks(c.vit, c.h_in, BLOCK, len(c.vit.blocks)))


@torch.no_grad()
def _batched(c: Case) -> torch.Tensor:
    return adapted_forward(c.vit, c.h_in, BLOCK, c.A, c.B, SCALE, "qkv")


@torch.no_grad()
def _loop(c: Case) -> torch.Tensor:
    return reference_lora_loop(c.vit, c.h_in, BLOCK, c.A, c.B, SCALE, "qkv")


def _train_step(c: Case, forward) -> torch.Tensor:
    """Forward plus backward to the factors (what one Fed-LSCL training step costs in the ViT)."""
    A, B = c.A.clone().requires_grad_(True), c.B.clone().requires_grad_(True)
    forward(c.vit, c.h_in, BLOCK, A, B, SCALE, "qkv").square().sum().backward()
    return torch.cat([A.grad.flatten(), B.grad.flatten()])


@pytest.mark.benchmark(group="lora-forward-b64")
def test_bench_frozen_suffix(benchmark, case: Case) -> None:
    """Lower bound: the frozen blocks from the cache, no adapter."""
    out = benchmark.pedantic(_frozen, args=(case,), **ROUNDS)
    assert not torch.allclose(out, case.expected, atol=1e-4)  # the adapter changes the features


@pytest.mark.benchmark(group="lora-forward-b64")
def test_bench_batched_lora(benchmark, case: Case) -> None:
    out = benchmark.pedantic(_batched, args=(case,), **ROUNDS)
    torch.testing.assert_close(out, case.expected)


@pytest.mark.benchmark(group="lora-forward-b64")
def test_bench_per_sample_loop(benchmark, case: Case) -> None:
    out = benchmark.pedantic(_loop, args=(case,), **ROUNDS)
    torch.testing.assert_close(out, case.expected, atol=1e-4, rtol=1e-4)


@pytest.mark.benchmark(group="lora-train-step-b64")
def test_bench_batched_lora_train_step(benchmark, case: Case) -> None:
    grads = benchmark.pedantic(_train_step, args=(case, adapted_forward), **ROUNDS)
    torch.testing.assert_close(grads, _train_step(case, reference_lora_loop), atol=1e-4, rtol=1e-3)


@pytest.mark.benchmark(group="lora-train-step-b64")
def test_bench_per_sample_loop_train_step(benchmark, case: Case) -> None:
    grads = benchmark.pedantic(_train_step, args=(case, reference_lora_loop), **ROUNDS)
    assert grads.abs().max() > 0
