"""Shared building blocks: frozen foundation model and feature cache, client CNNs, per-sample LoRA, prompt and prefix tuning for timm ViTs, weighted averaging, heads, One-by-One Distillation."""
