"""Pretraining of the tiny foundation ViT on the synthetic pretraining classes, its cache and a linear probe.

:func:`pretrain_tiny_vit` trains :func:`~fcl_bench.nn.tiny_vit.build_tiny_vit` with temporary linear heads
on ``dataset.pretrain`` only (never on an FCL class): one head over the pretraining classes and, when the
dataset ships its generative factors (``dataset.pretrain.info["factors"]``), one head per factor, which
teaches features that transfer to unseen factor combinations (with 60k training images the FCL probe reached
26% with factor heads and 21% without). :func:`linear_probe` measures how well frozen final-norm CLS
features separate all FCL classes jointly.

The cache: ``$FCL_BENCH_CACHE/tiny_vit/tiny_vit-{key}.safetensors`` (the weights) and ``tiny_vit-{key}.json``
(the report, written after the weights, holding ``weights_sha256``: the sha256 of the weights file's bytes),
``key`` hashing the dataset fingerprint, the architecture, the hyperparameters, the seed and
:data:`PRETRAIN_VERSION`. A second call loads them after checking every byte of the weights against that
hash; a damaged pair (a hash mismatch, a truncated file, a missing or unparsable report) is pretrained again
with a one-line message on stderr. Writes are atomic and first use is serialised by
``tiny_vit-{key}.safetensors.lock`` (:mod:`fcl_bench.disk_cache`): processes that start together on an empty
cache pretrain once.

Run ``python -m fcl_bench.nn.pretrain`` for the full calibration (generation, pretraining, both probes).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load, save
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from tqdm.auto import tqdm

from fcl_bench.data import Dataset, ImageSource, Preprocess, TensorSource
from fcl_bench.datasets.synthetic import cache_root, generate, load_synthetic
from fcl_bench.disk_cache import DamagedCache, first_line, load_or_build
from fcl_bench.nn.tiny_vit import TINY_VIT_CONFIG, build_tiny_vit
from fcl_bench.progress import PlainProgress, format_seconds
from fcl_bench.store import atomic_write, write_json

PRETRAIN_VERSION = "2"  # bump whenever training changes for the same config


@dataclass(frozen=True)
class PretrainConfig:
    """Architecture and recipe of the tiny-ViT pretraining (AdamW, warmup + cosine, random-shift crops)."""

    patch_size: int = 8
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    epochs: int = 2
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    shift: int = 2                  # random translation of up to `shift` pixels (no flips: they change classes)
    factor_loss: float = 1.0        # weight of the per-factor heads' loss (0 disables them)
    precision: str = "auto"         # "fp32", "bf16" (autocast) or "auto": bf16 where the hardware has it

    def arch(self) -> dict:
        return {"patch_size": self.patch_size, "embed_dim": self.embed_dim, "depth": self.depth,
                "num_heads": self.num_heads}


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA with bf16 or on CPUs with native bf16 (about 1.7x faster training on
    AVX512-BF16), else ``fp32``."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bf16" if device.type == "cpu" and native else "fp32"


@contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seed torch and force deterministic kernels inside the block, restoring global state after."""
    previous = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous)


@torch.no_grad()
def extract_features(vit: VisionTransformer, source: ImageSource, pre: Preprocess,
                     device: torch.device | str = "cpu", batch_size: int = 500) -> torch.Tensor:
    """Final-norm CLS features of every image of ``source`` -> float32 ``(N, embed_dim)`` on the CPU."""
    was_training = vit.training
    vit.eval()
    feats = [vit(source.load(np.arange(lo, min(lo + batch_size, len(source))), pre, device)).float().cpu()
             for lo in range(0, len(source), batch_size)]
    vit.train(was_training)
    return torch.cat(feats)


def fit_linear_classifier(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = 1e-4,
                          max_iter: int = 200) -> nn.Linear:
    """Multinomial logistic regression on standardised features ``x`` ``(N, D)``, labels ``y`` ``(N,)``.

    Full-batch L-BFGS from zero weights, so the result is deterministic. The returned layer includes the
    standardisation (apply it to raw features).
    """
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    layer = nn.Linear(x.shape[1], num_classes, device="meta")  # no random init: it would use the global RNG
    with torch.no_grad():  # fold the standardisation into the layer
        layer.weight = nn.Parameter((w / std[:, None]).T.contiguous())
        layer.bias = nn.Parameter(b - (mean / std) @ w)
    return layer


def linear_probe(vit: VisionTransformer, dataset: Dataset, pre: Preprocess,
                 device: torch.device | str = "cpu") -> float:
    """Test accuracy of a linear classifier on frozen CLS features over all FCL classes of ``dataset``."""
    train_x = extract_features(vit, dataset.train, pre, device)
    test_x = extract_features(vit, dataset.test, pre, device)
    return probe_accuracy(train_x, torch.as_tensor(dataset.train.labels), test_x,
                          torch.as_tensor(dataset.test.labels), dataset.num_classes)


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   num_classes: int) -> float:
    """Fit :func:`fit_linear_classifier` on the train features and return its test accuracy."""
    layer = fit_linear_classifier(train_x, train_y, num_classes)
    with torch.no_grad():
        return (layer(test_x).argmax(1) == test_y).float().mean().item()


def mean_colour_probe(dataset: Dataset) -> float:
    """Test accuracy of a linear classifier on per-image mean colour (3 features) over all FCL classes: how
    far one global cue alone goes (in-memory sources only)."""
    def mean_colour(source: ImageSource) -> torch.Tensor:
        if not isinstance(source, TensorSource):
            raise ValueError("the mean-colour probe needs in-memory images (a TensorSource)")
        return source.images.float().mean((2, 3)) / 255                      # (N, 3)

    return probe_accuracy(mean_colour(dataset.train), torch.as_tensor(dataset.train.labels),
                          mean_colour(dataset.test), torch.as_tensor(dataset.test.labels), dataset.num_classes)


def _random_shift(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of ``x`` ``(B, C, H, W)`` by up to ``shift`` pixels (edge-replicated border)."""
    if shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (shift,) * 4, mode="replicate")
    oy, ox = torch.randint(0, 2 * shift + 1, (2, b, 1), generator=generator)
    rows = (oy + torch.arange(h))[:, :, None]                      # (B, H, 1)
    cols = (ox + torch.arange(w))[:, None, :]                      # (B, 1, W)
    return padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


def _lr_lambda(total_steps: int, warmup_frac: float):
    warmup = max(1, int(total_steps * warmup_frac))
    return lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) /
                                                                               max(1, total_steps - warmup)))


def _factor_heads(vit: VisionTransformer, pretrain: Dataset, cfg: PretrainConfig) -> tuple[nn.ModuleList,
                                                                                         torch.Tensor | None]:
    """Temporary heads: one over the pretraining classes, plus one per generative factor when the dataset
    ships them; and the class -> factor table ``(classes, n_factors)`` (None without factor heads)."""
    heads = nn.ModuleList([nn.Linear(vit.embed_dim, pretrain.num_classes)])
    factors = pretrain.info.get("factors") if cfg.factor_loss > 0 else None
    if factors is None:
        return heads, None
    factors = torch.as_tensor(np.asarray(factors), dtype=torch.long)
    heads.extend(nn.Linear(vit.embed_dim, int(n)) for n in factors.max(0).values + 1)
    return heads, factors


def _loss(feats: torch.Tensor, y: torch.Tensor, heads: nn.ModuleList, factors: torch.Tensor | None,
          factor_weight: float) -> torch.Tensor:
    """Class cross-entropy plus ``factor_weight`` x the mean cross-entropy of the factor heads."""
    logits = [h(feats).float() for h in heads]
    loss = F.cross_entropy(logits[0], y)
    if factors is None:
        return loss
    fy = factors[y]                                                 # (B, n_factors)
    return loss + factor_weight * sum(F.cross_entropy(lg, fy[:, j]) for j, lg in enumerate(logits[1:])) / (
        len(logits) - 1)


def _fit(vit: VisionTransformer, pretrain: Dataset, cfg: PretrainConfig, seed: int, pre: Preprocess,
         device: torch.device, progress: bool) -> dict:
    """Supervised training of ``vit`` in place on ``pretrain.train``; returns training statistics."""
    if not isinstance(pretrain.train, TensorSource):
        raise ValueError("pretraining needs an in-memory TensorSource (the synthetic dataset's pretrain split)")
    images, labels = pretrain.train.images, torch.as_tensor(pretrain.train.labels)
    heads, factors = _factor_heads(vit, pretrain, cfg)
    vit.to(device).train()
    heads.to(device)
    factors = factors.to(device) if factors is not None else None
    opt = torch.optim.AdamW([*vit.parameters(), *heads.parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(labels) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.epochs * steps_per_epoch, cfg.warmup_frac))
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="pretrain tiny ViT",
               disable=None if progress else True, unit="step")  # None: off when not a terminal
    lines = PlainProgress(cfg.epochs * len(labels), "pretrain tiny ViT", enabled=None if progress else False)
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(labels), generator=gen)
        for lo in range(0, len(labels), cfg.batch_size):
            idx = perm[lo:lo + cfg.batch_size]
            x = _random_shift(images[idx].float().div_(255), cfg.shift, gen).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                loss = _loss(vit(pre.normalise(x)), labels[idx].to(device), heads, factors, cfg.factor_loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            lines.update(len(idx))
    bar.close()
    seconds = time.perf_counter() - start
    vit.eval()
    return {"train_seconds": seconds, "images_per_second": cfg.epochs * len(labels) / seconds,
            "train_images": len(labels), "final_train_loss": float(np.mean(losses[-steps_per_epoch:])),
            "pretrain_test_accuracy": _head_accuracy(vit, heads[0], pretrain.test, pre, device)}


@torch.no_grad()
def _head_accuracy(vit: VisionTransformer, head: nn.Module, source: ImageSource, pre: Preprocess,
                   device: torch.device) -> float:
    feats = extract_features(vit, source, pre, device)
    return (head.cpu()(feats).argmax(1) == torch.as_tensor(source.labels)).float().mean().item()


def _probe(vit: VisionTransformer, dataset: Dataset, pre: Preprocess, device: torch.device, say, what: str) -> float:
    """:func:`linear_probe` with a plain line before and after (``say``: print when not a terminal)."""
    say(f"linear probe of the {what} ViT on all {dataset.num_classes} FCL classes ...")
    t0 = time.perf_counter()
    acc = linear_probe(vit, dataset, pre, device)
    say(f"linear probe of the {what} ViT: {100 * acc:.1f}% in {format_seconds(time.perf_counter() - t0)}")
    return acc


def _cache_paths(cache_dir: Path, dataset: Dataset, cfg: PretrainConfig, seed: int) -> tuple[Path, Path, str]:
    spec = {"version": PRETRAIN_VERSION, "dataset": dataset.fingerprint, "config": asdict(cfg), "seed": seed}
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    stem = cache_dir / "tiny_vit" / f"tiny_vit-{key}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json"), key


def _read_cached(weights: Path, report_path: Path, cfg: PretrainConfig, key: str) -> tuple[VisionTransformer, dict]:
    """The cached model and report, once checked: the report parses, is for ``key`` and holds the sha256 of
    the weights file, which matches its bytes; the weights then fit the architecture.

    Raises ``FileNotFoundError`` when neither file exists and :class:`~fcl_bench.disk_cache.DamagedCache`
    (saying what is wrong) when a check fails.
    """
    has_weights, has_report = weights.is_file(), report_path.is_file()
    if not (has_weights or has_report):
        raise FileNotFoundError(weights)
    if not has_report:
        raise DamagedCache(f"its report {report_path.name} is missing")
    if not has_weights:
        raise DamagedCache("the weights file is missing")
    try:
        report = json.loads(report_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedCache(f"its report does not parse: {first_line(error)}") from None
    if not isinstance(report, dict) or report.get("key") != key:
        raise DamagedCache("its report is for another configuration")
    if not isinstance(report.get("weights_sha256"), str):
        raise DamagedCache("its report has no sha256 of the weights (an older cache)")
    data = weights.read_bytes()
    if hashlib.sha256(data).hexdigest() != report["weights_sha256"]:
        raise DamagedCache("sha256 mismatch")
    try:
        with torch.device("meta"):  # skip the random init (most of the load time): the file overwrites it
            vit = build_tiny_vit(**cfg.arch())
        vit.load_state_dict(load(data), assign=True)
    except Exception as error:  # the right bytes of the wrong file: cannot happen unless written by hand
        raise DamagedCache(f"weights do not fit the architecture: {first_line(error)}") from None
    return vit.eval(), report


def pretrain_tiny_vit(dataset: Dataset, cache_dir: str | Path | None = None, seed: int = 0,
                      epochs: int | None = None, progress: bool = True, force: bool = False,
                      config: PretrainConfig | None = None, device: torch.device | str = "cpu",
                      probe: bool = True) -> tuple[VisionTransformer, dict]:
    """Pretrain the tiny ViT on ``dataset.pretrain`` (cached); returns ``(vit in eval mode, report)``.

    ``epochs`` overrides ``config.epochs``. With ``probe`` the report holds :func:`linear_probe` accuracies on
    the FCL classes of the pretrained model and of the same architecture at its (seeded) random init. The
    report also holds ``weights_sha256``, checked on every load (see the module docstring); ``force``
    pretrains again even over a sound cache.
    """
    if dataset.pretrain is None:
        raise ValueError(f"dataset {dataset.name!r} has no pretraining classes; use the 'synthetic' dataset")
    cfg = config or PretrainConfig()
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)
    if cfg.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {cfg.epochs}")
    device = torch.device(device)
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, device))  # the key names what was run
    weights, report_path, key = _cache_paths(Path(cache_dir) if cache_dir else cache_root(), dataset, cfg,
                                             seed)

    def build() -> tuple[VisionTransformer, dict]:
        return _pretrain_and_write(dataset, cfg, seed, device, progress, probe, weights, report_path, key)

    return load_or_build(weights, lambda: _read_cached(weights, report_path, cfg, key), build,
                         "the tiny ViT weights cache", "pretraining again", force=force)


def _pretrain_and_write(dataset: Dataset, cfg: PretrainConfig, seed: int, device: torch.device, progress: bool,
                        probe: bool, weights: Path, report_path: Path, key: str) -> tuple[VisionTransformer, dict]:
    """Pretrain (and probe), then write the weights and, after them, the report holding their sha256."""
    pre = Preprocess(**TINY_VIT_CONFIG)
    say = PlainProgress(1, "pretrain tiny ViT", enabled=None if progress else False).note
    say(f"not cached; training it on {len(dataset.pretrain.train):,} images of {dataset.name}'s pretraining "
        f"classes ({cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}{', with two linear probes' if probe else ''})")
    with _deterministic(seed):
        vit = build_tiny_vit(**cfg.arch()).to(device)
        t0 = time.perf_counter()
        random_probe = _probe(vit, dataset, pre, device, say, "random init") if probe else None
        probe_seconds = time.perf_counter() - t0
        stats = _fit(vit, dataset.pretrain, cfg, seed, pre, device, progress)
        t0 = time.perf_counter()
        pretrained_probe = _probe(vit, dataset, pre, device, say, "pretrained") if probe else None
        probe_seconds += time.perf_counter() - t0
    vit = vit.cpu().eval()
    report = {"version": PRETRAIN_VERSION, "key": key, "dataset": dataset.name,
              "dataset_fingerprint": dataset.fingerprint, "seed": seed, "config": asdict(cfg),
              "epochs": cfg.epochs, **stats, "probe_acc_pretrained": pretrained_probe,
              "probe_acc_random_init": random_probe, "probe_seconds": probe_seconds,
              "device": device.type, "torch": torch.__version__}
    data = save({k: v.contiguous() for k, v in vit.state_dict().items()}, metadata={"key": key})
    report["weights_sha256"] = hashlib.sha256(data).hexdigest()
    atomic_write(weights, data)
    write_json(report_path, report)  # last: until it lands, the pair reads as damaged (under the lock)
    return vit, report


def pretraining_source(dataset: Dataset | None = None, cache_dir: str | Path | None = None) -> Dataset:
    """The dataset the tiny ViT is pretrained (and probed) on: ``dataset`` itself when it ships pretraining
    classes (the synthetic dataset), else the default synthetic dataset, so that the offline foundation model
    also serves real datasets (MNIST, CIFAR, ...): it never sees their classes, only their resized images."""
    if dataset is not None and dataset.pretrain is not None:
        return dataset
    if cache_dir:
        return load_synthetic(root=Path(cache_dir) / "synthetic")
    from fcl_bench.datasets import load_dataset
    return load_dataset("synthetic")


def ensure_pretrained(dataset: Dataset | None = None, cache_dir: str | Path | None = None, seed: int = 0,
                      device: torch.device | str = "cpu", progress: bool = True) -> tuple[VisionTransformer, dict]:
    """The default offline foundation model: cached if present, else pretrained now (a few CPU minutes).

    Pretrained on :func:`pretraining_source` of ``dataset`` (the default synthetic dataset when ``dataset``
    is None or has no pretraining classes). Returns the ViT frozen (eval, no grad) on ``device`` and its
    pretraining report.
    """
    dataset = pretraining_source(dataset, cache_dir)
    vit, report = pretrain_tiny_vit(dataset, cache_dir=cache_dir, seed=seed, progress=progress, device=device)
    return vit.requires_grad_(False).eval().to(device), report


def calibrate(cache_dir: str | Path | None = None, seed: int = 0, force: bool = True,
              progress: bool = True) -> dict:
    """The full calibration of the default offline setup: generation time, a mean-colour probe (no single
    cue may name a class), pretraining wall time and the probes of the random-init and pretrained ViT."""
    root = Path(cache_dir) if cache_dir else cache_root()
    t0 = time.perf_counter()
    generate(seed)
    generation_seconds = time.perf_counter() - t0
    dataset = load_synthetic(root=root / "synthetic", seed=seed)
    colour_probe = mean_colour_probe(dataset)
    t0 = time.perf_counter()
    _, report = pretrain_tiny_vit(dataset, cache_dir=root, seed=seed, progress=progress, force=force)
    return {"generation_seconds": generation_seconds, "mean_colour_probe_acc": colour_probe,
            "pretrain_call_seconds": time.perf_counter() - t0, "torch_threads": torch.get_num_threads(),
            **{k: v for k, v in report.items() if k != "config"}, "config": report["config"]}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Calibrate the synthetic dataset and the tiny foundation ViT.")
    parser.add_argument("--cache-dir", default=None, help="default: $FCL_BENCH_CACHE or ~/.cache/fcl-bench")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="load a cached pretrained model instead of training")
    args = parser.parse_args()
    print(json.dumps(calibrate(args.cache_dir, args.seed, force=not args.reuse), indent=2))
