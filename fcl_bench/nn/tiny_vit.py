"""The tiny ViT that stands in for ViT-B in the offline presets.

It is a plain timm :class:`~timm.models.vision_transformer.VisionTransformer` (class token, pre-norm
blocks, final norm, ``global_pool='token'``, no head), so every method that adapts a timm ViT (LoRA on a
block's qkv, prompts, prefixes, frozen-prefix caching) works on it unchanged: ``vit(x)`` returns the
final-norm CLS feature ``(B, embed_dim)``. It is pretrained by :mod:`fcl_bench.nn.pretrain` on the
synthetic pretraining classes.

Patch 8 on 32x32 inputs gives 16 patch tokens (+1 CLS): on a 2-core CPU this trains about 4x faster than
patch 4 (64 tokens: 140 vs 560 img/s in fp32), which is what lets pretraining fit in about two minutes.
The default depth is 6; keep at least 4 blocks for the methods' defaults, which adapt block 3.
"""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer

#: The pretrained config of the tiny ViT, in the form ``fcl_bench.data.Preprocess(**TINY_VIT_CONFIG)`` takes.
TINY_VIT_CONFIG: dict = {
    "input_size": 32,
    "interpolation": "bicubic",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 1.0,
}


def build_tiny_vit(patch_size: int = 8, embed_dim: int = 192, depth: int = 6, num_heads: int = 3,
                   img_size: int = 32) -> VisionTransformer:
    """A randomly initialised tiny ViT; ``forward``: ``(B, 3, img_size, img_size)`` -> ``(B, embed_dim)``.

    The result is seeded by the global torch RNG (call under ``torch.random.fork_rng`` + ``manual_seed``
    for a reproducible init).
    """
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}; pick a divisor")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    vit = VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                            num_heads=num_heads, mlp_ratio=4.0, num_classes=0, class_token=True,
                            global_pool="token")
    # timm-style pretrained config so that `timm.data.resolve_data_config(model=vit)` works too.
    vit.pretrained_cfg = {**TINY_VIT_CONFIG, "input_size": (3, img_size, img_size), "num_classes": 0,
                          "architecture": "fcl_tiny_vit"}
    return vit
