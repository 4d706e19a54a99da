"""The frozen foundation model: any timm ViT by name (weights from the hub or a file), or the suite's tiny
ViT pretrained offline on the synthetic pretraining classes. Frozen, eval mode, shared by all clients."""

from __future__ import annotations

import hashlib
from pathlib import Path

import timm
import torch
from torch import nn

from fcl_bench.data import Dataset, Preprocess
from fcl_bench.nn import vit_ops


class FoundationError(ValueError):
    """The foundation model could not be built or loaded; the message says how to fix it."""


class FoundationModel:
    """A frozen timm VisionTransformer plus what a method needs to run it in pieces.

    ``key`` identifies the weights (name + content hash) for feature-cache keys; ``preprocess`` is the
    input pipeline from the model's pretrained config, recorded with every run.
    """

    def __init__(self, vit: nn.Module, name: str, preprocess: Preprocess, device: torch.device, info: dict):
        vit.eval().requires_grad_(False)
        self.vit = vit.to(device)
        self.name = name
        self.preprocess = preprocess
        self.device = device
        self.info = info
        self.embed_dim: int = vit.embed_dim
        self.depth: int = len(vit.blocks)
        h = hashlib.sha1(name.encode())
        for k, v in sorted(vit.state_dict().items()):
            h.update(k.encode())
            h.update(v.flatten()[:64].float().cpu().numpy().tobytes())
        self.key = f"{name}-{h.hexdigest()[:12]}"

    @torch.no_grad()
    def prefix(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """Tokens entering block ``block`` (``0`` = after embedding): ``(B, N, d)``."""
        return vit_ops.run_blocks(self.vit, vit_ops.embed(self.vit, x), 0, block)

    @torch.no_grad()
    def cls(self, x: torch.Tensor) -> torch.Tensor:
        """Final-norm CLS feature of the unmodified model: ``(B, d)``."""
        return vit_ops.final_cls(self.vit, self.prefix(x, self.depth))

    def check_block(self, block: int) -> None:
        if not 0 <= block < self.depth:
            raise FoundationError(f"block {block} does not exist: {self.name} has blocks 0..{self.depth - 1}")


def _preprocess_from_timm(vit: nn.Module) -> Preprocess:
    cfg = timm.data.resolve_data_config({}, model=vit)
    return Preprocess(input_size=int(cfg["input_size"][-1]), interpolation=str(cfg.get("interpolation", "bicubic")),
                      mean=tuple(float(v) for v in cfg["mean"]), std=tuple(float(v) for v in cfg["std"]),
                      crop_pct=float(cfg.get("crop_pct", 1.0)))


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file (loaded with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FoundationError(f"--foundation-weights: no file at {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: say which and why
        raise FoundationError(f"could not read weights from {path}: not a readable safetensors file or torch "
                              f"state dict ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FoundationError(f"weights file {path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def check_weights_format(path: str | Path) -> None:
    """A cheap look at a weights file's first bytes: a safetensors header, a torch zip archive or a legacy
    torch pickle; anything else (a text file, an image) is a :class:`FoundationError` before any run."""
    path = Path(path)
    if not path.is_file():
        raise FoundationError(f"--foundation-weights: no file at {path}")
    with open(path, "rb") as f:
        head = f.read(8)
        ok = head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"  # torch.save: zip; legacy: pickle protocol
        if not ok and len(head) == 8:  # safetensors: 8-byte header length, then a JSON object
            n = int.from_bytes(head, "little")
            ok = 2 <= n <= 100_000_000 and f.read(1) == b"{"
    if not ok:
        raise FoundationError(f"--foundation-weights {path} is neither a safetensors file nor a torch state dict "
                              "(torch.save); convert it, e.g. with safetensors.torch.save_file(state_dict, path)")


def build_timm_vit(name: str, weights: str | Path | None, pretrained: bool) -> tuple[nn.Module, dict]:
    """``name`` like ``vit_base_patch16_224.augreg_in21k_ft_in1k``; weights from a file, the hub or none."""
    try:
        vit = timm.create_model(name, pretrained=pretrained and weights is None, num_classes=0)
    except RuntimeError as e:
        raise FoundationError(f"unknown foundation model '{name}': {e}") from None
    except Exception as e:  # network failures from the hub
        raise FoundationError(
            f"could not fetch pretrained weights for '{name}' ({type(e).__name__}: {e}). Offline? Download them "
            "on a connected machine and pass --foundation-weights FILE (safetensors or a torch state dict), "
            "or -o foundation_pretrained=false for random weights.") from None
    if not hasattr(vit, "blocks") or not hasattr(vit, "patch_embed"):
        raise FoundationError(f"'{name}' is not a timm VisionTransformer (no blocks/patch_embed)")
    info = {"source": "random" if not pretrained and weights is None else ("file" if weights else "hub")}
    if weights is not None:
        state = {k: v for k, v in load_weights_file(weights).items() if not k.startswith("head.")}
        missing, unexpected = vit.load_state_dict(state, strict=False)
        if missing:
            raise FoundationError(f"weights file {weights} does not fit '{name}': missing {missing[:5]}")
        info.update(weights_file=str(weights), unexpected_keys=list(unexpected)[:10])
    return vit, info


def load_foundation(name: str, dataset: Dataset, device: torch.device, weights: str | None = None,
                    pretrained: bool = True, seed: int = 0, progress: bool = True) -> FoundationModel:
    """Build the frozen foundation model of a run. ``tiny`` = the suite's own ViT, pretrained on the
    synthetic dataset's pretraining classes whatever ``dataset`` is (trained and cached on first use; see
    :func:`~fcl_bench.nn.pretrain.pretraining_source`); every input is resized to its 32 px."""
    if name == "tiny":
        from fcl_bench.nn.pretrain import ensure_pretrained
        from fcl_bench.nn.tiny_vit import TINY_VIT_CONFIG

        if weights is not None:
            from fcl_bench.nn.tiny_vit import build_tiny_vit
            vit = build_tiny_vit()
            vit.load_state_dict(load_weights_file(weights))
            info = {"source": "file", "weights_file": str(weights)}
        elif not pretrained:
            from fcl_bench.nn.tiny_vit import build_tiny_vit
            torch.manual_seed(seed)
            vit, info = build_tiny_vit(), {"source": "random"}
        else:  # whatever the FCL dataset, pretrained on the synthetic pretraining classes
            vit, report = ensure_pretrained(dataset, device=device, progress=progress)
            info = {"source": "pretrained-offline", "pretrain_dataset": report.get("dataset"),
                    "pretrain_report": report}
        return FoundationModel(vit, "tiny", Preprocess(**TINY_VIT_CONFIG), device, info)
    vit, info = build_timm_vit(name, weights, pretrained)
    return FoundationModel(vit, name, _preprocess_from_timm(vit), device, info)


def _meta_timm_vit(name: str) -> nn.Module:
    """The architecture ``name`` on the meta device (no weights, no download, instant), or a clear error."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0].split('_')[0]}*")[:5] if name else []
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise FoundationError(f"unknown foundation model '{name}'{hint}; use 'tiny' or a timm ViT name with "
                              "its tag, e.g. vit_base_patch16_224.augreg_in21k_ft_in1k")
    try:
        with torch.device("meta"):
            vit = timm.create_model(name, pretrained=False, num_classes=0)
    except Exception as e:
        raise FoundationError(f"could not build foundation model '{name}': {type(e).__name__}: {e}") from None
    if not hasattr(vit, "blocks") or not hasattr(vit, "patch_embed"):
        raise FoundationError(f"'{name}' is not a timm VisionTransformer (no blocks/patch_embed); use 'tiny' or "
                              "a timm ViT such as vit_base_patch16_224.augreg_in21k_ft_in1k")
    return vit


def foundation_preprocess(name: str) -> Preprocess:
    """The input pipeline of foundation model ``name`` without loading it (a run's methods all share it,
    whether or not they read the foundation model)."""
    if name == "tiny":
        from fcl_bench.nn.tiny_vit import TINY_VIT_CONFIG

        return Preprocess(**TINY_VIT_CONFIG)
    return _preprocess_from_timm(_meta_timm_vit(name))


def check_foundation(name: str, weights: str | None) -> None:
    """Fail early (:class:`FoundationError`) for an unknown model or a missing weights file."""
    if name != "tiny":
        _meta_timm_vit(name)
    if weights is not None:
        check_weights_format(weights)
