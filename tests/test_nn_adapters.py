"""Adapter building blocks on small random timm ViTs: functional blocks, per-sample LoRA, prompts, prefixes."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from fcl_bench.nn.lora import (
    LoRAGenerator,
    adapted_forward,
    lora_factor_shapes,
    lora_qkv_delta,
    per_sample_lora_delta,
    reference_lora_loop,
)
from fcl_bench.nn.prompts import (
    PrefixPool,
    PromptPool,
    combine_prefixes,
    forward_with_prompts,
    insert_prompts,
    mean_prompt_tokens,
    prompt_token_slice,
    pull_loss,
    select_by_keys,
)
from fcl_bench.nn.vit_ops import block_forward, embed, final_cls, final_tokens, run_blocks

D, DEPTH, HEADS = 64, 4, 4
TOL = {"atol": 1e-10, "rtol": 1e-10}  # double precision; the brief's bound is 1e-5

VARIANTS = {
    "default": {},
    "no_qkv_bias": {"qkv_bias": False},
    "qk_norm": {"qk_norm": True},
    "layer_scale": {"init_values": 0.1},
    "drop_path_eval": {"drop_path_rate": 0.2},
    "reg_tokens": {"reg_tokens": 2},
    "no_embed_class": {"no_embed_class": True},
    "pre_norm": {"pre_norm": True},
}


def make_vit(dtype: torch.dtype = torch.float64, seed: int = 0, **kw) -> VisionTransformer:
    """A frozen random ViT; every parameter is perturbed so norms and layer scales are not trivial."""
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=D, depth=DEPTH, num_heads=HEADS,
                            num_classes=0, **kw)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return vit.to(dtype).eval().requires_grad_(False)


def images(n: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- vit_ops --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [True, False], ids=["fused", "manual"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_block_forward_equals_timm_block(variant: str, fused: bool) -> None:
    vit = make_vit(**VARIANTS[variant])
    h = embed(vit, images(3))
    for blk in vit.blocks:
        blk.attn.fused_attn = fused  # the test's own model: compare against timm's other attention path
        expected = blk(h)
        torch.testing.assert_close(block_forward(blk, h), expected, **TOL)
        torch.testing.assert_close(block_forward(blk, h, prefix_kv=(h[:, :0], h[:, :0])), expected, **TOL)
        h = expected


@pytest.mark.parametrize("variant", VARIANTS)
def test_pipeline_equals_timm_forward_features(variant: str) -> None:
    vit = make_vit(**VARIANTS[variant])
    x = images(3)
    expected = vit.forward_features(x)
    h = embed(vit, x)
    torch.testing.assert_close(final_cls(vit, run_blocks(vit, h, 0, DEPTH)), expected[:, 0], **TOL)
    split = run_blocks(vit, run_blocks(vit, h, 0, 2), 2, DEPTH)
    torch.testing.assert_close(final_tokens(vit, split), expected, **TOL)
    for blk in vit.blocks:
        h = block_forward(blk, h)
    torch.testing.assert_close(final_tokens(vit, h), expected, **TOL)


def test_vit_ops_reject_bad_input() -> None:
    vit = make_vit(class_token=False, global_pool="avg")
    h = embed(vit, images(2))
    with pytest.raises(ValueError, match="no class token"):
        final_cls(vit, h)
    with pytest.raises(ValueError, match="start <= end"):
        run_blocks(vit, h, 3, 1)
    with pytest.raises(ValueError, match="lacks"):
        block_forward(torch.nn.Linear(D, D), h)
    with pytest.raises(ValueError, match="qkv_delta"):
        block_forward(vit.blocks[0], h, qkv_delta=torch.zeros(2, h.shape[1], 2 * D, dtype=h.dtype))
    with pytest.raises(ValueError, match="prefix pk"):
        block_forward(vit.blocks[0], h, prefix_kv=(torch.zeros(3, 2, D, dtype=h.dtype),) * 2)


# --- per-sample LoRA ------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["qkv", "qv"])
def test_batched_lora_matches_per_sample_loop(target: str) -> None:
    vit = make_vit(init_values=0.5)
    b, block_idx, scale = 5, 2, 0.75
    h_in = run_blocks(vit, embed(vit, images(b)), 0, block_idx)
    d_in, r, out = lora_factor_shapes(D, 4, target)
    A, B = rand(b, d_in, r, seed=2, scale=0.3), rand(b, r, out, seed=3, scale=0.3)
    batched = adapted_forward(vit, h_in, block_idx, A, B, scale, target)
    torch.testing.assert_close(batched, reference_lora_loop(vit, h_in, block_idx, A, B, scale, target), **TOL)
    frozen = final_cls(vit, run_blocks(vit, h_in, block_idx, DEPTH))
    assert (batched - frozen).abs().amax(dim=1).min() > 1e-3  # every sample was actually adapted


def test_qv_delta_leaves_keys_unchanged() -> None:
    y, A, B = rand(3, 7, D, seed=4), rand(3, D, 2, seed=5), rand(3, 2, 2 * D, seed=6)
    delta = lora_qkv_delta(y, A, B, 2.0, "qv")
    direct = per_sample_lora_delta(y, A, B, 2.0)
    assert delta.shape == (3, 7, 3 * D)
    assert torch.equal(delta[..., D:2 * D], torch.zeros_like(delta[..., D:2 * D]))
    torch.testing.assert_close(torch.cat([delta[..., :D], delta[..., 2 * D:]], dim=-1), direct, **TOL)
    torch.testing.assert_close(direct[1], 2.0 * y[1] @ A[1] @ B[1], **TOL)


def test_lora_shapes_and_errors() -> None:
    assert lora_factor_shapes(768, 4, "qkv") == (768, 4, 2304)
    assert lora_factor_shapes(768, 4, "qv") == (768, 4, 1536)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        lora_factor_shapes(768, 4, "proj")
    with pytest.raises(ValueError, match="shape mismatch"):
        per_sample_lora_delta(rand(2, 3, 8, seed=0), rand(2, 9, 4, seed=0), rand(2, 4, 8, seed=0), 1.0)
    with pytest.raises(ValueError, match="block_idx"):
        adapted_forward(make_vit(), rand(1, 5, D, seed=0), DEPTH, rand(1, D, 1, seed=0),
                        rand(1, 1, 3 * D, seed=0), 1.0)


@pytest.mark.parametrize("target", ["qkv", "qv"])
def test_generator_starts_at_frozen_model_and_learns(target: str) -> None:
    vit = make_vit()
    gen = LoRAGenerator(feature_dim=16, dim=D, rank=4, target=target).double()
    feats = rand(6, 16, seed=7, scale=10.0)
    A, B = gen(feats)
    _, r, out = lora_factor_shapes(D, 4, target)
    assert A.shape == (6, D, r) and B.shape == (6, r, out)
    assert torch.equal(B, torch.zeros_like(B))
    assert bool((A.flatten(1).abs().amax(dim=1) > 0).all())
    h_in = run_blocks(vit, embed(vit, images(6)), 0, 1)
    cls = adapted_forward(vit, h_in, 1, A, B, 1.0, target)
    torch.testing.assert_close(cls, final_cls(vit, run_blocks(vit, h_in, 1, DEPTH)), **TOL)
    cls.pow(2).sum().backward()
    b_rows = gen.linear.weight.grad[D * r:]
    assert b_rows.abs().max() > 0  # B receives gradient at init because A is not zero
    torch.testing.assert_close(A[2], gen.linear(feats[2:3])[0, :D * r].reshape(D, r), **TOL)


# --- prefixes -------------------------------------------------------------------------------------------

def test_prefix_equals_attending_to_extra_tokens() -> None:
    """Prefixes that are the keys/values of extra tokens T give timm's block output on [T; h] at h."""
    vit = make_vit()
    blk = vit.blocks[1]
    h, extra = embed(vit, images(2)), rand(2, 3, D, seed=8)
    qkv = blk.attn.qkv(blk.norm1(extra))
    pk, pv = qkv[..., D:2 * D], qkv[..., 2 * D:]
    expected = blk(torch.cat([extra, h], dim=1))[:, 3:]
    torch.testing.assert_close(block_forward(blk, h, prefix_kv=(pk, pv)), expected, **TOL)


def official_layout_prefixes(pool: PrefixPool, idx: torch.Tensor, buggy: bool) -> dict:
    """Gather as the public DualPrompt code does from its (L, 2, M, Lp, d) tensor, with or without its bug."""
    raw = pool.prefixes.permute(1, 2, 0, 3, 4)[:, :, idx]  # (L, 2, B, Lp, d)
    n_layers, _, b, length, d = raw.shape
    per_sample = raw.reshape(n_layers, b, 2, length, d) if buggy else raw.permute(0, 2, 1, 3, 4)
    return {layer: (per_sample[j][:, 0], per_sample[j][:, 1]) for j, layer in enumerate(pool.layers)}


def run_prefixed_blocks(vit: VisionTransformer, h: torch.Tensor, prefixes: dict) -> torch.Tensor:
    for i, blk in enumerate(vit.blocks):
        h = block_forward(blk, h, prefix_kv=prefixes.get(i))
    return h


def test_per_sample_prefixes_do_not_mix_across_batch() -> None:
    vit = make_vit()
    pool = PrefixPool(pool_size=5, layers=(1, 2), length=3, dim=D, generator=torch.Generator().manual_seed(0))
    pool = pool.double()
    idx = torch.tensor([3, 0, 4, 0])
    h = embed(vit, images(4))
    gathered = pool.gather(idx)
    for layer, (pk, pv) in official_layout_prefixes(pool, idx, buggy=False).items():
        assert torch.equal(gathered[layer][0], pk) and torch.equal(gathered[layer][1], pv)
    solo = torch.cat([run_prefixed_blocks(vit, h[i:i + 1], pool.gather(idx[i:i + 1])) for i in range(4)])
    torch.testing.assert_close(run_prefixed_blocks(vit, h, gathered), solo, **TOL)
    # The same property catches the public code's reshape: its batch output is not the per-sample one.
    buggy = run_prefixed_blocks(vit, h, official_layout_prefixes(pool, idx, buggy=True))
    assert not torch.allclose(buggy, solo, atol=1e-6)


def test_prefix_pool_top_k_concatenates_in_order() -> None:
    pool = PrefixPool(pool_size=4, layers=(0, 3), length=2, dim=D, with_keys=False)
    out = pool.gather(torch.tensor([[2, 1], [0, 3]]))
    assert set(out) == {0, 3} and pool.keys is None
    pk, pv = out[3]
    assert pk.shape == (2, 4, D)
    assert torch.equal(pk[0], torch.cat([pool.prefixes[2, 1, 0], pool.prefixes[1, 1, 0]]))
    assert torch.equal(pv[1], torch.cat([pool.prefixes[0, 1, 1], pool.prefixes[3, 1, 1]]))
    with pytest.raises(ValueError, match="with_keys=False"):
        pool.select(torch.randn(2, D))


def test_combine_prefixes_concatenates_shared_layers() -> None:
    g = {0: (torch.ones(1, 2, D), 2 * torch.ones(1, 2, D))}
    e = {0: (torch.zeros(3, 1, D), torch.zeros(3, 1, D)), 2: (torch.ones(3, 1, D), torch.ones(3, 1, D))}
    out = combine_prefixes(g, e)
    assert out[0][0].shape == (3, 3, D) and out[2][0].shape == (3, 1, D)
    assert torch.equal(out[0][1][:, :2], 2 * torch.ones(3, 2, D)) and torch.equal(out[0][1][:, 2], torch.zeros(3, D))


# --- prompt selection and prompt tuning -----------------------------------------------------------------

def test_per_sample_selection_ignores_the_batch_and_batchwise_does_not() -> None:
    keys = torch.eye(4, D)
    query = torch.zeros(5, D)
    query[:4, :2] = torch.tensor([1.0, 0.5])  # four samples choose keys (0, 1), ...
    query[4, 2:4] = torch.tensor([0.5, 1.0])  # ... one chooses (3, 2)
    idx, sim = select_by_keys(query, keys, top_n=2)
    assert idx.shape == (5, 2) and sim.shape == (5, 4)
    for i in range(5):
        alone, _ = select_by_keys(query[i:i + 1], keys, top_n=2)
        assert torch.equal(alone[0], idx[i])
    assert idx.tolist() == [[0, 1]] * 4 + [[3, 2]]
    batch_idx, _ = select_by_keys(query, keys, top_n=2, batchwise=True)
    alone4, _ = select_by_keys(query[4:], keys, top_n=2, batchwise=True)
    assert batch_idx.tolist() == [[0, 1]] * 5  # the batch changed sample 4's prompts, ...
    assert alone4.tolist() == [[2, 3]]  # ... which alone are its own (batch order: count, then index)
    cos_top1, cos_top2 = 1 / 1.25 ** 0.5, 0.5 / 1.25 ** 0.5
    assert pull_loss(sim, idx).item() == pytest.approx(cos_top1 + cos_top2)
    assert pull_loss(sim, idx[:, :1]).item() == pytest.approx(cos_top1)


def test_prompt_pool_gather_and_init() -> None:
    pool = PromptPool(pool_size=6, length=3, dim=D, generator=torch.Generator().manual_seed(0))
    assert pool.prompts.abs().max() <= 1 and pool.prompts.min() < -0.5 < 0.5 < pool.prompts.max()
    out = pool.gather(torch.tensor([[4, 1]]))
    assert out.shape == (1, 6, D)
    assert torch.equal(out[0, :3], pool.prompts[4]) and torch.equal(out[0, 3:], pool.prompts[1])
    with pytest.raises(ValueError, match="top_n"):
        pool.select(torch.randn(2, D), top_n=7)


@pytest.mark.parametrize("variant", ["default", "reg_tokens", "pre_norm"])
def test_forward_with_prompts_matches_timm_blocks(variant: str) -> None:
    vit = make_vit(**VARIANTS[variant])
    x = images(3)
    tokens = embed(vit, x)
    torch.testing.assert_close(forward_with_prompts(vit, tokens), vit.forward_features(x), **TOL)
    prompts = rand(3, 4, D, seed=9)
    n_prefix = vit.num_prefix_tokens
    # Official L2P order: positional embedding on the patches, insert the prompts, then norm_pre on all.
    pre = vit._pos_embed(vit.patch_embed(x))
    seq = vit.norm_pre(torch.cat([pre[:, :n_prefix], prompts, pre[:, n_prefix:]], dim=1))
    torch.testing.assert_close(insert_prompts(vit, tokens, prompts), seq, **TOL)
    out = forward_with_prompts(vit, tokens, prompts=prompts)
    torch.testing.assert_close(out, vit.norm(vit.blocks(seq)), **TOL)
    assert prompt_token_slice(vit, 4) == slice(n_prefix, n_prefix + 4)
    torch.testing.assert_close(mean_prompt_tokens(vit, out, 4), out[:, n_prefix:n_prefix + 4].mean(1))


def test_prompt_pos_embed_cls_adds_the_cls_position_to_every_prompt() -> None:
    vit = make_vit()
    x = images(2)
    tokens = embed(vit, x)
    prompts = rand(2, 3, D, seed=11)
    # the PyTorch port: [CLS; prompts; patches] + pos_embed, with pos_embed's CLS entry copied over the prompts
    n = vit.num_prefix_tokens
    pos = torch.cat([vit.pos_embed[:, :1].expand(-1, 1 + 3, -1), vit.pos_embed[:, 1:]], dim=1)
    seq = torch.cat([vit.cls_token.expand(2, -1, -1), prompts, vit.patch_embed(x)], dim=1) + pos
    cls_out = forward_with_prompts(vit, tokens, prompts=prompts, prompt_pos_embed="cls")
    torch.testing.assert_close(cls_out, vit.norm(vit.blocks(vit.norm_pre(seq))), **TOL)
    none_out = forward_with_prompts(vit, tokens, prompts=prompts, prompt_pos_embed="none")
    assert n == 1 and (cls_out - none_out).abs().max() > 1e-3
    with pytest.raises(ValueError, match="prompt_pos_embed"):
        forward_with_prompts(vit, tokens, prompts=prompts, prompt_pos_embed="sin")


def test_forward_with_prompts_is_per_sample() -> None:
    vit = make_vit()
    tokens = embed(vit, images(4))
    prompts = rand(4, 2, D, seed=10)
    pool = PrefixPool(pool_size=3, layers=(0, 2), length=2, dim=D).double()
    g_pool = PrefixPool(pool_size=1, layers=(0,), length=1, dim=D, with_keys=False).double()
    idx = torch.tensor([2, 0, 1, 2])

    def run(sl: slice) -> torch.Tensor:
        prefixes = combine_prefixes(g_pool.gather(torch.zeros(1, dtype=torch.long)), pool.gather(idx[sl]))
        return forward_with_prompts(vit, tokens[sl], prompts=prompts[sl], prefixes=prefixes)

    batched = run(slice(None))
    assert batched.shape == (4, tokens.shape[1] + 2, D)
    torch.testing.assert_close(batched, torch.cat([run(slice(i, i + 1)) for i in range(4)]), **TOL)
    with pytest.raises(ValueError, match="outside"):
        forward_with_prompts(vit, tokens, prefixes={DEPTH: pool.gather(idx)[0]})


def test_float32_adapters_run_on_a_bfloat16_model() -> None:
    """Trainable adapters stay float32 while the frozen model may be bf16: no dtype errors, close output."""
    vits = {dt: make_vit(dtype=dt) for dt in (torch.float32, torch.bfloat16)}
    ppool, xpool = PromptPool(3, 2, D), PrefixPool(3, (0, 2), 2, D)
    A, B = 0.1 * torch.randn(2, D, 2), 0.1 * torch.randn(2, 2, 3 * D)
    outs = {}
    for dt, vit in vits.items():
        tokens = embed(vit, images(2, dtype=dt))
        out = forward_with_prompts(vit, tokens, prompts=ppool.gather(torch.tensor([[0], [2]])),
                                   prefixes=xpool.gather(torch.tensor([1, 2])))
        cls = adapted_forward(vit, run_blocks(vit, tokens, 0, 1), 1, A, B, 1.0)
        assert out.dtype == cls.dtype == dt
        outs[dt] = torch.cat([out[:, 0], cls], dim=1).float()
    torch.testing.assert_close(outs[torch.bfloat16], outs[torch.float32], atol=0.1, rtol=0.02)


# --- the shared frozen model stays untouched ------------------------------------------------------------

def test_frozen_model_is_never_modified_and_gets_no_grads() -> None:
    vit = make_vit(dtype=torch.float32, init_values=0.1)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    attrs = {name: (sorted(vars(m)), m.training) for name, m in vit.named_modules()}
    x = images(3, dtype=torch.float32)
    gen = LoRAGenerator(feature_dim=8, dim=D, rank=2, target="qv")
    with torch.no_grad():
        gen.linear.weight.normal_()  # B != 0, so LoRA changes the output and gradients reach A too
    A, B = gen(torch.randn(3, 8))
    ppool, xpool = PromptPool(5, 2, D), PrefixPool(5, (1, 3), 2, D)
    tokens = embed(vit, x)
    q = final_cls(vit, run_blocks(vit, tokens, 0, DEPTH))
    p_idx, sim = ppool.select(q, top_n=2)
    e_idx, e_sim = xpool.select(q, top_n=1)
    out = forward_with_prompts(vit, tokens, prompts=ppool.gather(p_idx), prefixes=xpool.gather(e_idx[:, 0]))
    cls = adapted_forward(vit, run_blocks(vit, tokens, 0, 2), 2, A, B, 0.5, "qv")
    loss = out.square().mean() + cls.square().mean() - pull_loss(sim, p_idx) - pull_loss(e_sim, e_idx)
    loss.backward()
    assert all(p.grad is None for p in vit.parameters())
    for p in (gen.linear.weight, ppool.prompts, ppool.keys, xpool.prefixes, xpool.keys):
        assert p.grad is not None and p.grad.abs().max() > 0
    after = vit.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert attrs == {name: (sorted(vars(m)), m.training) for name, m in vit.named_modules()}
