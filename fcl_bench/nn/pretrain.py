"""Pretraining of the offline models on the synthetic pretraining classes, their caches and a linear probe.

:func:`pretrain_tiny_vit` trains :func:`~fcl_bench.nn.tiny_vit.build_tiny_vit` with temporary linear heads
on ``dataset.pretrain`` only (never on an FCL class): one head over the pretraining classes and, when the
dataset ships its generative factors (``dataset.pretrain.info["factors"]``), one head per factor, which
teaches features that transfer to unseen factor combinations (with 60k training images the FCL probe reached
26% with factor heads and 21% without). :func:`pretrain_small_model` does the same for a client CNN's timm
backbone (``small_pretrained=true`` offline). :func:`linear_probe` measures how well frozen features
separate all FCL classes jointly.

Where the weights come from, in order:

1. the weights shipped with the package (:mod:`fcl_bench.weights`), when one has this model's key: the
   key hashes the dataset fingerprint, the architecture, the recipe, the seed and :data:`PRETRAIN_VERSION`.
   The file's sha256 is checked against the manifest; a mismatch is an error naming the file and the fix,
   unless a sound cached copy of the same key exists (``fcl-bench pretrain --force`` writes one), which is
   then used with a one-line note;
2. the cache: ``$FCL_BENCH_CACHE/tiny_vit/tiny_vit-{key}.safetensors`` (or ``small_cnn/{arch}-{key}...``)
   and the ``.json`` report written after it, holding ``weights_sha256``, checked on every load; a damaged
   pair (a hash mismatch, a truncated file, a missing or unparsable report) is pretrained again with a
   one-line message on stderr;
3. pretraining now, written atomically to the cache under ``{file}.lock`` (:mod:`fcl_bench.disk_cache`):
   processes that start together on an empty cache pretrain once.

The returned report says which in ``origin`` (``shipped``, ``cache`` or ``trained``). Pretraining is made
as reproducible as one machine allows: fp32 (bf16 autocast differs between CPUs with and without native
bf16), a fixed intra-op thread count (``threads``, default 1: reductions split over a different number of
threads round differently), deterministic kernels and seeded data order, augmentation and init. Other
machines may still differ in the last bits (other CPU kernels), which is why the weights ship.

Run ``python -m fcl_bench.nn.pretrain`` for the full calibration (generation, pretraining, both probes).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
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
from fcl_bench.disk_cache import DamagedCache, first_line, load_or_build, say
from fcl_bench.nn.small import feature_width, small_backbone
from fcl_bench.nn.tiny_vit import TINY_VIT_CONFIG, build_tiny_vit
from fcl_bench.progress import PlainProgress, format_seconds
from fcl_bench.store import atomic_write, write_json
from fcl_bench.weights import ShippedWeightsError, read_shipped

PRETRAIN_VERSION = "3"  # bump whenever training changes for the same config


@dataclass(frozen=True)
class Recipe:
    """How a model is pretrained: AdamW, warmup + cosine, random-shift crops, factor heads."""

    epochs: int = 2
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    shift: int = 2                  # random translation of up to `shift` pixels (no flips: they change classes)
    factor_loss: float = 1.0        # weight of the per-factor heads' loss (0 disables them)
    precision: str = "fp32"         # "fp32", "bf16" (autocast) or "auto": bf16 where the hardware has it
    threads: int = 1                # torch intra-op threads while training (the result depends on them)


@dataclass(frozen=True)
class PretrainConfig(Recipe):
    """Architecture and recipe of the tiny-ViT pretraining."""

    patch_size: int = 8
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3

    def arch(self) -> dict:
        return {"patch_size": self.patch_size, "embed_dim": self.embed_dim, "depth": self.depth,
                "num_heads": self.num_heads}


@dataclass(frozen=True)
class SmallPretrainConfig(Recipe):
    """Recipe of a small CNN's pretraining: one epoch over the 50k pretraining images keeps
    mobilenetv3_small_050 at 32 px under two CPU minutes."""

    epochs: int = 1
    lr: float = 2e-3


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
def _deterministic(seed: int, threads: int) -> Iterator[None]:
    """Seed torch, force deterministic kernels and ``threads`` intra-op threads inside the block; restore
    the global state after."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    previous, previous_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous)
            torch.set_num_threads(previous_threads)


@torch.no_grad()
def extract_features(vit: nn.Module, source: ImageSource, pre: Preprocess,
                     device: torch.device | str = "cpu", batch_size: int = 500) -> torch.Tensor:
    """``vit``'s features (the tiny ViT's final-norm CLS, a CNN backbone's pooled features) of every image of
    ``source`` -> float32 ``(N, D)`` on the CPU."""
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


def linear_probe(vit: nn.Module, dataset: Dataset, pre: Preprocess,
                 device: torch.device | str = "cpu") -> float:
    """Test accuracy of a linear classifier on ``vit``'s frozen features over all FCL classes of ``dataset``."""
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


def _factor_heads(width: int, pretrain: Dataset, cfg: Recipe) -> tuple[nn.ModuleList, torch.Tensor | None]:
    """Temporary heads on ``width``-dim features: one over the pretraining classes, plus one per generative
    factor when the dataset ships them; and the class -> factor table ``(classes, n_factors)`` (None without
    factor heads)."""
    heads = nn.ModuleList([nn.Linear(width, pretrain.num_classes)])
    factors = pretrain.info.get("factors") if cfg.factor_loss > 0 else None
    if factors is None:
        return heads, None
    factors = torch.as_tensor(np.asarray(factors), dtype=torch.long)
    heads.extend(nn.Linear(width, int(n)) for n in factors.max(0).values + 1)
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


def _fit(model: nn.Module, pretrain: Dataset, cfg: Recipe, seed: int, pre: Preprocess, device: torch.device,
         progress: bool, what: str = "tiny ViT") -> dict:
    """Supervised training of ``model`` (images -> features) in place on ``pretrain.train``; returns training
    statistics. Progress: a bar on a terminal, plain lines ``pretrain {what}: ...`` elsewhere."""
    if not isinstance(pretrain.train, TensorSource):
        raise ValueError("pretraining needs an in-memory TensorSource (the synthetic dataset's pretrain split)")
    images, labels = pretrain.train.images, torch.as_tensor(pretrain.train.labels)
    heads, factors = _factor_heads(feature_width(model), pretrain, cfg)
    model.to(device).train()
    heads.to(device)
    factors = factors.to(device) if factors is not None else None
    opt = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(labels) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.epochs * steps_per_epoch, cfg.warmup_frac))
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=f"pretrain {what}",
               disable=None if progress else True, unit="step")  # None: off when not a terminal
    lines = PlainProgress(cfg.epochs * len(labels), f"pretrain {what}", enabled=None if progress else False)
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(labels), generator=gen)
        for lo in range(0, len(labels), cfg.batch_size):
            idx = perm[lo:lo + cfg.batch_size]
            x = _random_shift(images[idx].float().div_(255), cfg.shift, gen).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                loss = _loss(model(pre.normalise(x)), labels[idx].to(device), heads, factors, cfg.factor_loss)
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
    model.eval()
    return {"train_seconds": seconds, "images_per_second": cfg.epochs * len(labels) / seconds,
            "train_images": len(labels), "final_train_loss": float(np.mean(losses[-steps_per_epoch:])),
            "pretrain_test_accuracy": _head_accuracy(model, heads[0], pretrain.test, pre, device)}


@torch.no_grad()
def _head_accuracy(model: nn.Module, head: nn.Module, source: ImageSource, pre: Preprocess,
                   device: torch.device) -> float:
    feats = extract_features(model, source, pre, device)
    return (head.cpu()(feats).argmax(1) == torch.as_tensor(source.labels)).float().mean().item()


def _probe(model: nn.Module, dataset: Dataset, pre: Preprocess, device: torch.device, say, what: str) -> float:
    """:func:`linear_probe` with a plain line before and after (``say``: print when not a terminal)."""
    say(f"linear probe of the {what} model on all {dataset.num_classes} FCL classes ...")
    t0 = time.perf_counter()
    acc = linear_probe(model, dataset, pre, device)
    say(f"linear probe of the {what} model: {100 * acc:.1f}% in {format_seconds(time.perf_counter() - t0)}")
    return acc


# -- keys, the cache and the shipped weights -----------------------------------------------------------------


def weights_key(dataset: Dataset, cfg: Recipe, seed: int, **extra) -> str:
    """The key of the weights that pretraining with ``cfg`` and ``seed`` on ``dataset`` gives: a hash of
    everything that decides them (``extra``: the model and input pipeline of a small CNN)."""
    spec = {"version": PRETRAIN_VERSION, "dataset": dataset.fingerprint, "config": asdict(cfg), "seed": seed,
            **extra}
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _cache_paths(cache_dir: Path, dataset: Dataset, cfg: PretrainConfig, seed: int) -> tuple[Path, Path, str]:
    key = weights_key(dataset, cfg, seed)
    stem = cache_dir / "tiny_vit" / f"tiny_vit-{key}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json"), key


def _from_bytes(make_empty: Callable[[], nn.Module], data: bytes) -> nn.Module:
    """The model ``make_empty`` builds, with the safetensors ``data`` as its weights (strict)."""
    with torch.device("meta"):  # skip the random init (most of the load time): the file overwrites it
        model = make_empty()
    model.load_state_dict(load(data), assign=True)
    return model.eval()


def _read_cached(weights: Path, report_path: Path, make_empty: Callable[[], nn.Module],
                 key: str) -> tuple[nn.Module, dict]:
    """The cached model and report, once checked: the report parses, is for ``key`` and holds the sha256 of
    the weights file, which matches its bytes; the weights then fit the architecture ``make_empty`` builds.

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
        model = _from_bytes(make_empty, data)
    except Exception as error:  # the right bytes of the wrong file: cannot happen unless written by hand
        raise DamagedCache(f"weights do not fit the architecture: {first_line(error)}") from None
    return model, report


def _shipped_cached_or_built(what: str, key: str, weights: Path, report_path: Path,
                             make_empty: Callable[[], nn.Module], build: Callable[[], tuple[nn.Module, dict]],
                             force: bool) -> tuple[nn.Module, dict]:
    """The shipped weights of ``key`` if any ship, else the cache, else ``build()`` (see the module
    docstring); the report's ``origin`` says which. ``force`` builds whatever exists."""
    def cached() -> tuple[nn.Module, dict]:
        model, report = _read_cached(weights, report_path, make_empty, key)
        return model, {**report, "origin": "cache"}

    if not force:
        try:
            found = read_shipped(key)
        except ShippedWeightsError as error:
            try:  # the fix the error names, `fcl-bench pretrain --force`, leaves a sound copy in the cache
                model, report = cached()
            except (FileNotFoundError, DamagedCache):
                raise error from None
            say(f"{error}; using the cached copy at {weights}")
            return model, report
        if found is not None:
            data, entry = found
            return _from_bytes(make_empty, data), {**entry["report"], "origin": "shipped"}

    def built() -> tuple[nn.Module, dict]:
        model, report = build()
        return model, {**report, "origin": "trained"}

    return load_or_build(weights, cached, built, f"the {what} weights cache", "pretraining again", force=force)


def _resolved(cfg: Recipe, epochs: int | None, device: torch.device) -> Recipe:
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)
    if cfg.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {cfg.epochs}")
    if cfg.threads < 1:
        raise ValueError(f"threads must be >= 1, got {cfg.threads}")
    return replace(cfg, precision=resolve_precision(cfg.precision, device))  # the key names what was run


def pretrain_tiny_vit(dataset: Dataset, cache_dir: str | Path | None = None, seed: int = 0,
                      epochs: int | None = None, progress: bool = True, force: bool = False,
                      config: PretrainConfig | None = None, device: torch.device | str = "cpu",
                      probe: bool = True) -> tuple[VisionTransformer, dict]:
    """Pretrain the tiny ViT on ``dataset.pretrain`` (shipped or cached); returns ``(vit in eval mode,
    report)``.

    ``epochs`` overrides ``config.epochs``. With ``probe`` the report holds :func:`linear_probe` accuracies on
    the FCL classes of the pretrained model and of the same architecture at its (seeded) random init. The
    report also holds ``weights_sha256``, checked on every load, ``key`` and ``origin`` (see the module
    docstring); ``force`` pretrains again even over sound shipped or cached weights.
    """
    if dataset.pretrain is None:
        raise ValueError(f"dataset {dataset.name!r} has no pretraining classes; use the 'synthetic' dataset")
    device = torch.device(device)
    cfg = _resolved(config or PretrainConfig(), epochs, device)
    weights, report_path, key = _cache_paths(Path(cache_dir) if cache_dir else cache_root(), dataset, cfg,
                                             seed)

    def build() -> tuple[nn.Module, dict]:
        return _pretrain_and_write("tiny ViT", lambda: build_tiny_vit(**cfg.arch()), dataset, cfg, seed,
                                   Preprocess(**TINY_VIT_CONFIG), device, progress, probe, weights, report_path,
                                   key)

    return _shipped_cached_or_built("tiny ViT", key, weights, report_path, lambda: build_tiny_vit(**cfg.arch()),
                                    build, force)


def pretrain_small_model(arch: str, dataset: Dataset, pre: Preprocess, cache_dir: str | Path | None = None,
                         seed: int = 0, progress: bool = True, force: bool = False,
                         config: SmallPretrainConfig | None = None, device: torch.device | str = "cpu",
                         probe: bool = False) -> tuple[nn.Module, dict]:
    """Pretrain the timm backbone ``arch`` (``num_classes=0``, as :class:`~fcl_bench.nn.small.SmallModel`
    holds it) on ``dataset.pretrain`` with inputs through ``pre`` (the run's input pipeline); shipped or
    cached like the tiny ViT (``$FCL_BENCH_CACHE/small_cnn/{arch}-{key}.safetensors``). Returns
    ``(backbone in eval mode, report)``; ``probe`` adds linear probes on the FCL classes (slow)."""
    if dataset.pretrain is None:
        raise ValueError(f"dataset {dataset.name!r} has no pretraining classes; use the 'synthetic' dataset")
    device = torch.device(device)
    cfg = _resolved(config or SmallPretrainConfig(), None, device)

    def make() -> nn.Module:
        return small_backbone(arch)

    key = weights_key(dataset, cfg, seed, model=arch, preprocess=asdict(pre))
    stem = (Path(cache_dir) if cache_dir else cache_root()) / "small_cnn" / f"{arch}-{key}"
    weights, report_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def build() -> tuple[nn.Module, dict]:
        return _pretrain_and_write(arch, make, dataset, cfg, seed, pre, device, progress, probe, weights,
                                   report_path, key, model=arch, preprocess=asdict(pre))

    return _shipped_cached_or_built(arch, key, weights, report_path, make, build, force)


def _pretrain_and_write(what: str, make: Callable[[], nn.Module], dataset: Dataset, cfg: Recipe, seed: int,
                        pre: Preprocess, device: torch.device, progress: bool, probe: bool, weights: Path,
                        report_path: Path, key: str, **extra) -> tuple[nn.Module, dict]:
    """Build ``make()`` under the seed, pretrain it (and probe), then write the weights and, after them, the
    report holding their sha256."""
    say_line = PlainProgress(1, f"pretrain {what}", enabled=None if progress else False).note
    say_line(f"not cached; training it on {len(dataset.pretrain.train):,} images of {dataset.name}'s "
             f"pretraining classes ({cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}, {cfg.precision}, "
             f"{cfg.threads} thread{'s' if cfg.threads != 1 else ''}{', with two linear probes' if probe else ''})")
    with _deterministic(seed, cfg.threads):
        model = make().to(device)
        t0 = time.perf_counter()
        random_probe = _probe(model, dataset, pre, device, say_line, "random init") if probe else None
        probe_seconds = time.perf_counter() - t0
        stats = _fit(model, dataset.pretrain, cfg, seed, pre, device, progress, what)
        t0 = time.perf_counter()
        pretrained_probe = _probe(model, dataset, pre, device, say_line, "pretrained") if probe else None
        probe_seconds += time.perf_counter() - t0
    model = model.cpu().eval()
    report = {"version": PRETRAIN_VERSION, "key": key, "dataset": dataset.name,
              "dataset_fingerprint": dataset.fingerprint, "seed": seed, "config": asdict(cfg), **extra,
              "epochs": cfg.epochs, **stats, "probe_acc_pretrained": pretrained_probe,
              "probe_acc_random_init": random_probe, "probe_seconds": probe_seconds,
              "device": device.type, "torch": torch.__version__}
    data = weights_bytes(model, key)
    report["weights_sha256"] = hashlib.sha256(data).hexdigest()
    atomic_write(weights, data)
    write_json(report_path, report)  # last: until it lands, the pair reads as damaged (under the lock)
    return model, report


def weights_bytes(model: nn.Module, key: str) -> bytes:
    """The safetensors file of ``model``'s state dict (its parameters and buffers, no heads), tagged ``key``."""
    return save({k: v.contiguous() for k, v in model.state_dict().items()}, metadata={"key": key})


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
