"""The shared LoRA block (fcl_bench/nn/lora.py, issue 12): LoRA on any linear of any block of a timm ViT.

References are independent of the batched path: a deep copy of the ViT with the merged weight
``W + scale * B @ A`` written into the linear, run through timm's own ``forward_features``.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from fcl_bench.nn.lora import (
    LORA_LAYERS,
    PerSampleLoRA,
    Scatter,
    SharedLoRA,
    SumLoRA,
    kaiming_lora,
    lora_forward,
    lora_layer_shape,
    qv,
    qv_joint,
)
from fcl_bench.nn.tiny_vit import build_tiny_vit
from fcl_bench.nn.vit_ops import embed, final_cls, run_blocks

TOL = {"atol": 1e-10, "rtol": 1e-10}  # float64


def perturbed(vit: VisionTransformer, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return vit.double().eval().requires_grad_(False)


def small_vit(seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    return perturbed(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4,
                                       num_classes=0, **kw), seed)


VITS = {
    "small": small_vit,
    "layer_scale_qk_norm": lambda: small_vit(init_values=0.3, qk_norm=True),
    "tiny_vit": lambda: perturbed(build_tiny_vit(depth=2)),
    "timm_vit_tiny": lambda: perturbed(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                                         patch_size=8, depth=2, num_classes=0)),
}


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rand(*shape: int, seed: int, scale: float = 0.2) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def random_shared(vit, block: int, layer: str, seed: int, rank: int = 3, scale: float = 0.7) -> SharedLoRA:
    d_in, d_out = lora_layer_shape(vit, block, layer)
    return SharedLoRA(rand(rank, d_in, seed=seed), rand(d_out, rank, seed=seed + 1), scale)


def linear_of(vit, b: int, layer: str) -> torch.nn.Linear:
    """The module a layer name stands for, looked up here independently of the block's own table."""
    blk = vit.blocks[b]
    return {"qkv": blk.attn.qkv, "proj": blk.attn.proj, "fc1": blk.mlp.fc1, "fc2": blk.mlp.fc2}[layer]


def merged_features(vit, updates: dict[tuple[int, str], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Reference: a deep copy of the ViT whose linears hold ``W + update``, through timm's forward."""
    ref = copy.deepcopy(vit)
    with torch.no_grad():
        for (b, layer), upd in updates.items():
            linear_of(ref, b, layer).weight.add_(upd)
    return ref.forward_features(x)[:, 0]


def all_layer_loras(vit, blocks=(0, 1)) -> dict:
    return {(b, layer): random_shared(vit, b, layer, seed=10 * b + i) for b in blocks
            for i, layer in enumerate(LORA_LAYERS)}


@pytest.mark.parametrize("name", VITS)
def test_shared_lora_equals_merged_weight_on_all_layers(name: str) -> None:
    vit = VITS[name]()
    x = images(3)
    loras = all_layer_loras(vit)
    out = lora_forward(vit, x, loras)
    expected = merged_features(vit, {k: lo.scale * lo.B @ lo.A for k, lo in loras.items()}, x)
    torch.testing.assert_close(out, expected, **TOL)
    frozen = vit.forward_features(x)[:, 0]
    assert (out - frozen).abs().max() > 1e-3  # the LoRAs actually changed the output
    torch.testing.assert_close(lora_forward(vit, x, {}), frozen, **TOL)


def test_each_layer_alone_and_f_linear_delta() -> None:
    vit = small_vit()
    x = images(2)
    for b in range(len(vit.blocks)):
        for i, layer in enumerate(LORA_LAYERS):
            lo = random_shared(vit, b, layer, seed=3 * b + i)
            torch.testing.assert_close(lora_forward(vit, x, {(b, layer): lo}),
                                       merged_features(vit, {(b, layer): lo.weight()}, x), **TOL)
            y = rand(2, 5, lo.A.shape[1], seed=99)
            lin = linear_of(vit, b, layer)
            merged = F.linear(y, lin.weight + lo.scale * lo.B @ lo.A, lin.bias)
            torch.testing.assert_close(lin(y) + lo.delta(y), merged, **TOL)


def test_sum_lora_equals_merged_sum() -> None:
    vit = small_vit()
    x = images(3)
    slots = {k: [random_shared(vit, *k, seed=100 * t + 7 * k[0] + len(k[1])) for t in range(3)]
             for k in [(0, "qkv"), (1, "fc1"), (2, "proj")]}
    out = lora_forward(vit, x, {k: SumLoRA(parts) for k, parts in slots.items()})
    expected = merged_features(vit, {k: sum(p.weight() for p in parts) for k, parts in slots.items()}, x)
    torch.testing.assert_close(out, expected, **TOL)


def test_qv_scatter_leaves_keys_unchanged() -> None:
    vit = small_vit()
    d = vit.embed_dim
    q, v = random_shared(vit, 0, "proj", seed=1), random_shared(vit, 0, "proj", seed=2)  # (d, d) updates
    x = images(2)
    upd = torch.cat([q.weight(), torch.zeros(d, d, dtype=torch.float64), v.weight()])
    torch.testing.assert_close(lora_forward(vit, x, {(0, "qkv"): qv(q, v, d)}),
                               merged_features(vit, {(0, "qkv"): upd}, x), **TOL)
    y = rand(2, 4, d, seed=3)
    joint = SharedLoRA(torch.cat([q.A, v.A]), torch.block_diag(q.B, v.B), q.scale)  # same q/v updates
    torch.testing.assert_close(qv_joint(joint, d).delta(y), qv(q, v, d).delta(y), **TOL)
    assert torch.equal(qv(q, None, d).delta(y)[..., d:], torch.zeros(2, 4, 2 * d, dtype=torch.float64))
    with pytest.raises(ValueError, match="disjoint"):
        Scatter(3 * d, [(((0, d),), q), (((d // 2, d + 1),), v)])


def test_frozen_vit_unchanged_and_gradient_reaches_factors() -> None:
    vit = small_vit()
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    modules_before = [type(m) for m in vit.modules()]
    d = vit.embed_dim
    A, B = kaiming_lora(d, d, 4, torch.Generator().manual_seed(0), torch.float64)
    B = B + 0.1  # non-zero so A gets gradient too
    A.requires_grad_(True)
    B.requires_grad_(True)
    ps_A = rand(2, d, 2, seed=5).requires_grad_(True)
    ps_B = rand(2, 2, 4 * d, seed=6).requires_grad_(True)
    feat = lora_forward(vit, images(2), {(0, "qkv"): qv(SharedLoRA(A, B), SharedLoRA(A, B), d),
                                         (1, "fc1"): PerSampleLoRA(ps_A, ps_B, 0.5)})
    feat.pow(2).sum().backward()
    for t in (A, B, ps_A, ps_B):
        assert t.grad is not None and t.grad.abs().max() > 0
    after = vit.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in vit.parameters())
    assert [type(m) for m in vit.modules()] == modules_before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in vit.modules())


def test_batch_independence_and_per_sample_factors() -> None:
    vit = small_vit()
    x = images(4)
    d = vit.embed_dim
    shared = all_layer_loras(vit, blocks=(1,))
    A, B = rand(4, d, 2, seed=8), rand(4, 2, 3 * d, seed=9)
    full = lora_forward(vit, x, {**shared, (2, "qkv"): PerSampleLoRA(A, B, 1.5)})
    for i in range(4):
        one = lora_forward(vit, x[i:i + 1], {**shared, (2, "qkv"): PerSampleLoRA(A[i:i + 1], B[i:i + 1], 1.5)})
        torch.testing.assert_close(full[i:i + 1], one, **TOL)
        ref = merged_features(vit, {**{k: lo.weight() for k, lo in shared.items()},
                                    (2, "qkv"): 1.5 * (A[i] @ B[i]).T}, x[i:i + 1])
        torch.testing.assert_close(one, ref, **TOL)


def test_returned_inputs_equal_forward_hooks() -> None:
    vit = small_vit()
    x = images(3)
    deltas = {**all_layer_loras(vit, blocks=(0, 2)), (1, "fc2"): None}  # None: observe only
    feat, inputs = lora_forward(vit, x, deltas, return_inputs=True)
    assert set(inputs) == set(deltas)
    # reference: hooks on a merged deep copy (the copy, never the shared model)
    updates = {k: lo.weight() for k, lo in deltas.items() if lo is not None}
    ref = copy.deepcopy(vit)
    seen = {}
    with torch.no_grad():
        for (b, layer), upd in updates.items():
            linear_of(ref, b, layer).weight.add_(upd)
    for (b, layer) in deltas:
        linear_of(ref, b, layer).register_forward_hook(lambda m, args, out, key=(b, layer): seen.__setitem__(key, args[0]))
    expected = ref.forward_features(x)[:, 0]
    torch.testing.assert_close(feat, expected, **TOL)
    for k in deltas:
        assert inputs[k].shape == (3, 17, lora_layer_shape(vit, *k)[0])
        torch.testing.assert_close(inputs[k], seen[k], **TOL)


def test_start_block_and_cached_tokens() -> None:
    vit = small_vit()
    x = images(2)
    deltas = all_layer_loras(vit, blocks=(1, 2))
    full = lora_forward(vit, x, deltas)
    tokens = run_blocks(vit, embed(vit, x), 0, 1)
    torch.testing.assert_close(lora_forward(vit, None, deltas, start_block=1, tokens=tokens), full, **TOL)
    torch.testing.assert_close(lora_forward(vit, x, deltas, start_block=1), full, **TOL)
    torch.testing.assert_close(lora_forward(vit, x, {}), final_cls(vit, run_blocks(vit, embed(vit, x), 0, 3)),
                               **TOL)
    with pytest.raises(ValueError, match="start_block"):
        lora_forward(vit, x, deltas, start_block=2)
    with pytest.raises(ValueError, match="unknown LoRA layer"):
        lora_forward(vit, x, {(0, "fc3"): None})
    with pytest.raises(ValueError, match="block"):
        lora_layer_shape(vit, 3, "qkv")
    assert lora_layer_shape(vit, 0, "fc1") == (32, 128) and lora_layer_shape(vit, 2, "qkv") == (32, 96)


def test_kaiming_init_matches_torch() -> None:
    A, B = kaiming_lora(48, 20, 4, torch.Generator().manual_seed(0))
    assert A.shape == (4, 48) and B.shape == (20, 4) and torch.count_nonzero(B) == 0
    ref = torch.empty(4, 48)
    torch.nn.init.kaiming_uniform_(ref, a=5 ** 0.5)
    assert A.abs().max() <= 48 ** -0.5 and ref.abs().max() <= 48 ** -0.5
    assert A.abs().max() > 0.8 * 48 ** -0.5
