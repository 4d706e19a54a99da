"""The offline default dataset: procedurally generated 32x32 RGB scenes, deterministic from a seed.

Every image shows one *main object* over a cluttered background. A class is a tuple of five factors of
the main object, each with few values, drawn from a vocabulary shared by all classes:

==============  ===========================================================================
factor          values
==============  ===========================================================================
shape           disc, square, triangle, ring, cross, star
colour          8 palette colours (the same palette also colours backgrounds and clutter)
stripe freq     1, 2 or 3.5 stripe cycles across the object (texture frequency)
stripe angle    0, 45, 90 or 135 degrees (texture orientation, in image coordinates)
layout          the quadrant that holds the object (top-left, top-right, bottom-left, bottom-right)
==============  ===========================================================================

That is 2304 possible tuples. ``num_classes`` FCL classes and ``pretrain_classes`` pretraining classes are
distinct tuples; inside each group every factor value is used by the same number of classes (up to
rounding), so many classes share any given value and only the *combination* names a class. The pretraining
classes (``Dataset.pretrain``) use the same vocabulary with different tuples, so features learnt on them
transfer to the FCL classes without ever seeing one.

Per-sample nuisances: object position (uniform jitter inside its quadrant), scale, rotation (+-20 deg),
stripe phase and angle jitter, colour gain and per-channel noise; a background gradient between two random
palette colours; two smaller *distractor objects* with random shape, texture and colour (so attributes must
be bound to the main object, not pooled over the image); pixel noise. No single cue names a class: a
multinomial linear probe on per-image mean colour over the 100 FCL classes is far below 15% (see below).

Rendering is vectorised over chunks of images in torch (signed distance functions with one pixel of
anti-aliasing); per-sample parameters come from a numpy ``Generator`` seeded by ``seed``. The arrays are
cached as uint8 safetensors under ``$FCL_BENCH_CACHE/synthetic`` (default ``~/.cache/fcl-bench``), one file
``synthetic-v{version}-seed{seed}-c{C}x{train}x{test}-p{P}x{train}x{test}.safetensors`` per generator
version, seed and sizes, whose metadata holds the content hashes of all arrays and of the pretraining part
(the datasets' fingerprints). Every load checks the file: it parses, has exactly the expected arrays, shapes
and dtypes, and both hashes match; a damaged file is regenerated with a one-line message on stderr saying
what was wrong. Writes are atomic, and first use is serialised by a lock file next to the cache file
(:mod:`fcl_bench.disk_cache`), so processes that start together generate it once.

Calibration, measured with ``python -m fcl_bench.nn.pretrain`` (seed 0, default sizes; 2-core AMD EPYC
with AVX512-BF16, torch 2.14, 2 threads, machine mostly idle):

* generating all 88,000 images: 7 s; cache file 271 MB; loading it back (with the hash check): 0.35 s.
* linear probe on per-image mean colour (3 features), 100 FCL classes: 2.2% test accuracy (chance 1%).
* linear probe on the tiny ViT's final-norm CLS feature, all 100 FCL classes jointly (300 train / 60 test
  images per class, multinomial logistic regression): random init 12.3%, pretrained 55.9%.
* pretraining (2 epochs over the 50,000 pretraining images, bf16 autocast): 137 s (731 img/s), 51.5% test
  accuracy on the 100 pretraining classes; both probes add 54 s. With fp32 (CPUs without bf16) training
  runs at about 570 img/s, i.e. about 3 minutes. Reloading the cached model takes 0.03 s.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from fcl_bench.data import Dataset, Preprocess, TensorSource
from fcl_bench.disk_cache import DamagedCache, first_line, load_or_build
from fcl_bench.store import atomic_write

GENERATOR_VERSION = "2"  # bump whenever the images for a given seed and sizes change
IMAGE_SIZE = 32

#: What the tiny ViT pretrained on the synthetic classes expects (see ``fcl_bench.nn.tiny_vit``).
SYNTHETIC_PREPROCESS = Preprocess(input_size=IMAGE_SIZE, interpolation="bicubic", mean=(0.5, 0.5, 0.5),
                                  std=(0.5, 0.5, 0.5), crop_pct=1.0)

SHAPES = ("disc", "square", "triangle", "ring", "cross", "star")
PALETTE = {
    "red": (0.90, 0.15, 0.15), "orange": (0.95, 0.55, 0.10), "yellow": (0.95, 0.90, 0.20),
    "green": (0.20, 0.75, 0.25), "cyan": (0.20, 0.80, 0.85), "blue": (0.20, 0.30, 0.90),
    "purple": (0.60, 0.25, 0.80), "white": (0.92, 0.92, 0.92),
}
FREQS = (1.0, 2.0, 3.5)
ANGLES = (0, 45, 90, 135)
LAYOUTS = {"topleft": (-0.42, -0.42), "topright": (0.42, -0.42),
           "bottomleft": (-0.42, 0.42), "bottomright": (0.42, 0.42)}
#: Number of values of each factor, in the column order of ``factors`` arrays.
FACTOR_SIZES = (len(SHAPES), len(PALETTE), len(FREQS), len(ANGLES), len(LAYOUTS))
FACTOR_NAMES = ("shape", "colour", "freq", "angle", "layout")

_PALETTE = torch.tensor(list(PALETTE.values()), dtype=torch.float32)
_CHUNK = 256  # images rendered at once: small temporaries stay in cache


@dataclass(frozen=True)
class _Objects:
    """Per-image parameters of one object layer; every field has length B (one object per image)."""

    shape: np.ndarray
    colour: np.ndarray
    freq: np.ndarray
    angle: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    scale: np.ndarray
    rotation: np.ndarray
    phase: np.ndarray
    gain: np.ndarray


def class_factors(num_classes: int, pretrain_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Distinct factor tuples, int64 ``(num_classes + pretrain_classes, 5)``; FCL classes first.

    Inside each group every factor column is a shuffled, balanced tiling of its values; duplicate tuples
    are removed by swapping single factor values between classes of the same group (keeps the balance).
    """
    total = _check_vocabulary(num_classes, pretrain_classes)
    groups = [(0, num_classes), (num_classes, total)]
    f = np.zeros((total, len(FACTOR_SIZES)), dtype=np.int64)
    for lo, hi in groups:
        for j, n in enumerate(FACTOR_SIZES):
            f[lo:hi, j] = rng.permutation(np.resize(np.arange(n), hi - lo))
    for _ in range(100_000):
        _, first = np.unique(f, axis=0, return_index=True)
        dup_rows = np.setdiff1d(np.arange(total), first)
        if len(dup_rows) == 0:
            return f
        row = int(dup_rows[0])
        lo, hi = groups[0] if row < num_classes else groups[1]
        other, col = int(rng.integers(lo, hi)), int(rng.integers(len(FACTOR_SIZES)))
        if other == row:  # a group of one class has nobody to swap with: redraw the value
            f[row, col] = rng.integers(FACTOR_SIZES[col])
        else:
            f[[row, other], col] = f[[other, row], col]
    raise RuntimeError("could not draw distinct class tuples")  # unreachable for sizes within the vocabulary


def _check_vocabulary(num_classes: int, pretrain_classes: int) -> int:
    """The total number of classes, or a ``ValueError`` when the factor vocabulary cannot tell them apart."""
    total = num_classes + pretrain_classes
    if total > int(np.prod(FACTOR_SIZES)):
        raise ValueError(f"{total} classes requested but the factor vocabulary has only "
                         f"{int(np.prod(FACTOR_SIZES))} distinct tuples; ask for fewer classes")
    return total


def class_name(factors: np.ndarray) -> str:
    """``(5,)`` factor tuple -> readable class name, e.g. ``ring-blue-f2-a45-topleft``."""
    s, c, fr, a, lay = (int(v) for v in factors)
    return f"{SHAPES[s]}-{list(PALETTE)[c]}-f{FREQS[fr]:g}-a{ANGLES[a]}-{list(LAYOUTS)[lay]}"


def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in [-1, 1], each ``(1, H, W)``; y grows downwards."""
    c = (torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5) / IMAGE_SIZE * 2 - 1
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return xx[None], yy[None]


def _sd_triangle(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    normals = ((0.0, 1.0), (-np.sqrt(0.75), -0.5), (np.sqrt(0.75), -0.5))
    return torch.stack([px * a + py * b for a, b in normals]).amax(0) - 0.55   # inradius 0.55


def _sd_cross(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    ax, ay = px.abs(), py.abs()
    return torch.minimum(torch.maximum(ax - 0.32, ay - 1.0), torch.maximum(ax - 1.0, ay - 0.32))


def _sd_star(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    return (torch.hypot(px, py) - 0.72 - 0.32 * torch.cos(5 * torch.atan2(py, px))) * 0.8


# Approximate signed distances in object units (negative inside), one per entry of SHAPES.
_SDF = (
    lambda px, py: torch.hypot(px, py) - 0.95,                       # disc
    lambda px, py: torch.maximum(px.abs(), py.abs()) - 0.82,         # square
    _sd_triangle,
    lambda px, py: (torch.hypot(px, py) - 0.72).abs() - 0.28,        # ring
    _sd_cross,
    _sd_star,
)


def _signed_distance(shape: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Signed distance of each image's own shape: ``shape`` int ``(B,)``; ``px``, ``py`` ``(B, H, W)``
    coordinates in the object's frame. Each shape's function runs only on the images that have it."""
    out = torch.empty_like(px)
    for k, sdf in enumerate(_SDF):
        sel = shape == k
        if sel.any():
            out[sel] = sdf(px[sel], py[sel])
    return out


def _per_image(a: np.ndarray) -> torch.Tensor:
    """``(B,)`` parameters -> float ``(B, 1, 1)``, broadcastable against ``(B, H, W)`` maps."""
    return torch.as_tensor(a, dtype=torch.float32).view(-1, 1, 1)


def _render_objects(canvas: torch.Tensor, o: _Objects) -> torch.Tensor:
    """Paint one object per image onto ``canvas`` (float ``(B, 3, H, W)``), alpha-blended."""
    xx, yy = _grid()
    dx, dy, scale = xx - _per_image(o.cx), yy - _per_image(o.cy), _per_image(o.scale)
    rot = _per_image(o.rotation)
    px = (torch.cos(rot) * dx + torch.sin(rot) * dy) / scale
    py = (-torch.sin(rot) * dx + torch.cos(rot) * dy) / scale
    dist_px = _signed_distance(torch.as_tensor(o.shape), px, py) * scale * (IMAGE_SIZE / 2)
    alpha = (0.5 - dist_px).clamp(0, 1).unsqueeze(1)            # one pixel of anti-aliasing
    ang = _per_image(o.angle)
    # Stripes run in image coordinates and scale with the object: `freq` cycles across its diameter.
    u = (torch.cos(ang) * dx + torch.sin(ang) * dy) / scale
    wave = torch.sin(np.pi * _per_image(o.freq) * u + _per_image(o.phase))
    stripe = (0.5 + 1.5 * wave).clamp(0, 1).unsqueeze(1)                # soft-edged square wave
    colour = (_PALETTE[torch.as_tensor(o.colour)] * torch.as_tensor(o.gain, dtype=torch.float32)).view(-1, 3, 1, 1)
    fill = colour * (1 - 0.65 * stripe)
    return canvas * (1 - alpha) + fill * alpha


def _random_objects(rng: np.random.Generator, n: int, factors: np.ndarray | None) -> _Objects:
    """Parameters of ``n`` objects: main objects when ``factors`` (``(n, 5)``) is given, else distractors."""
    u = rng.uniform
    gain = u(0.75, 1.15, (n, 1)) * (1 + rng.normal(0, 0.08, (n, 3)))
    if factors is None:  # distractor: random attributes, smaller, anywhere
        f = np.stack([rng.integers(0, k, n) for k in FACTOR_SIZES], 1)
        cx, cy, scale = u(-0.85, 0.85, n), u(-0.85, 0.85, n), u(0.22, 0.34, n)
    else:
        f = factors
        anchor = np.array(list(LAYOUTS.values()))[f[:, 4]]
        cx, cy, scale = anchor[:, 0] + u(-0.2, 0.2, n), anchor[:, 1] + u(-0.2, 0.2, n), u(0.42, 0.58, n)
    angle = np.deg2rad(np.array(ANGLES)[f[:, 3]] + u(-10, 10, n))
    return _Objects(shape=f[:, 0], colour=f[:, 1], freq=np.array(FREQS)[f[:, 2]], angle=angle, cx=cx, cy=cy,
                    scale=scale, rotation=np.deg2rad(u(-20, 20, n)), phase=u(0, 2 * np.pi, n), gain=gain)


def _background(rng: np.random.Generator, n: int) -> torch.Tensor:
    """Dim gradients between two random palette colours, float ``(n, 3, H, W)``."""
    xx, yy = _grid()
    c = _PALETTE[torch.as_tensor(rng.integers(0, len(PALETTE), (n, 2)))]                  # (n, 2, 3)
    c = c * torch.as_tensor(rng.uniform(0.2, 0.55, (n, 2, 1)), dtype=torch.float32)
    direction = torch.as_tensor(rng.uniform(0, 2 * np.pi, n), dtype=torch.float32).view(-1, 1, 1)
    w = (0.5 + 0.5 * (torch.cos(direction) * xx + torch.sin(direction) * yy)).unsqueeze(1)  # (n, 1, H, W)
    return c[:, 0, :, None, None] * (1 - w) + c[:, 1, :, None, None] * w


def render(labels: np.ndarray, factors: np.ndarray, rng: np.random.Generator, distractors: int = 2,
           noise: float = 0.04) -> torch.Tensor:
    """Images of classes ``labels`` (int ``(N,)``) given their ``factors`` table -> uint8 ``(N, 3, H, W)``."""
    out = torch.empty(len(labels), 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    noise_gen = torch.Generator().manual_seed(int(rng.integers(2**62)))  # torch draws pixel noise faster
    for lo in range(0, len(labels), _CHUNK):
        lab = labels[lo:lo + _CHUNK]
        canvas = _background(rng, len(lab))
        for _ in range(distractors):
            canvas = _render_objects(canvas, _random_objects(rng, len(lab), None))
        canvas = _render_objects(canvas, _random_objects(rng, len(lab), factors[lab]))
        canvas += torch.randn(canvas.shape, generator=noise_gen) * noise
        out[lo:lo + _CHUNK] = canvas.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
    return out


_SPLITS = ("train", "test", "pretrain_train", "pretrain_test")


def generate(seed: int = 0, num_classes: int = 100, train_per_class: int = 300, test_per_class: int = 60,
             pretrain_classes: int = 100, pretrain_train_per_class: int = 500,
             pretrain_test_per_class: int = 20) -> dict[str, torch.Tensor]:
    """Render every split (no cache): ``{split}_images`` uint8 ``(N, 3, 32, 32)``, ``{split}_labels`` int64
    ``(N,)`` for the splits train, test, pretrain_train, pretrain_test, and ``factors`` int64 ``(C + P, 5)``
    (rows ``C..`` are the pretraining classes, whose labels restart at 0)."""
    factor_rng, *split_rngs = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5))
    factors = class_factors(num_classes, pretrain_classes, factor_rng)
    counts = (train_per_class, test_per_class, pretrain_train_per_class, pretrain_test_per_class)
    out = {"factors": torch.as_tensor(factors)}
    threads = torch.get_num_threads()
    # Small element-wise ops gain nothing from intra-op threads, and on a busy machine waiting for them
    # made generation up to 50x slower: render on one thread.
    torch.set_num_threads(1)
    try:
        for split, rng, per_class in zip(_SPLITS, split_rngs, counts):
            n_classes, offset = (pretrain_classes, num_classes) if split.startswith("pretrain") else (num_classes, 0)
            labels = np.repeat(np.arange(n_classes), per_class)
            out[f"{split}_images"] = render(labels, factors[offset:], rng)
            out[f"{split}_labels"] = torch.as_tensor(labels, dtype=torch.int64)
    finally:
        torch.set_num_threads(threads)
    return out


def _fingerprints(arrays: dict[str, torch.Tensor]) -> dict[str, str]:
    """Content hashes (names and bytes, in name order) of the whole dataset and of its pretraining part."""
    whole, pretrain = hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16)
    for name in sorted(arrays):
        data = arrays[name].contiguous().numpy().tobytes()
        for h in (whole, pretrain) if name.startswith("pretrain_") else (whole,):
            h.update(name.encode())
            h.update(data)
    return {"fingerprint": whole.hexdigest(), "pretrain_fingerprint": pretrain.hexdigest()}


def _expected_shapes(sizes: dict[str, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every array of a cache file with ``sizes`` -> its shape and dtype."""
    c, p = sizes["num_classes"], sizes["pretrain_classes"]
    counts = {"train": c * sizes["train_per_class"], "test": c * sizes["test_per_class"],
              "pretrain_train": p * sizes["pretrain_train_per_class"],
              "pretrain_test": p * sizes["pretrain_test_per_class"]}
    out = {"factors": ((c + p, len(FACTOR_SIZES)), torch.int64)}
    for split, n in counts.items():
        out[f"{split}_images"] = ((n, 3, IMAGE_SIZE, IMAGE_SIZE), torch.uint8)
        out[f"{split}_labels"] = ((n,), torch.int64)
    return out


def _read_cache(path: Path, sizes: dict[str, int]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The cached arrays and their metadata, once the file is checked: it parses, holds exactly the expected
    arrays with their shapes and dtypes, and both content hashes match the bytes.

    Raises ``FileNotFoundError`` when there is no file and :class:`~fcl_bench.disk_cache.DamagedCache`
    (saying what is wrong) when it fails a check.
    """
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            arrays = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as error:  # truncated, zeroed, a header that is not JSON, not safetensors at all
        raise DamagedCache(f"truncated or unreadable: {first_line(error)}") from None
    expected = _expected_shapes(sizes)
    if set(arrays) != set(expected):
        missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        raise DamagedCache(f"missing arrays {missing}" if missing else f"unexpected arrays {extra}")
    for name, (shape, dtype) in expected.items():
        if tuple(arrays[name].shape) != shape or arrays[name].dtype != dtype:
            raise DamagedCache(f"{name} is {arrays[name].dtype} {tuple(arrays[name].shape)} instead of "
                               f"{dtype} {shape}")
    if any(meta.get(k) != v for k, v in _fingerprints(arrays).items()):
        raise DamagedCache("content hash mismatch")
    return arrays, meta


def cache_root() -> Path:
    """The suite's cache folder: ``$FCL_BENCH_CACHE`` or ``~/.cache/fcl-bench``."""
    return Path(os.environ.get("FCL_BENCH_CACHE", Path.home() / ".cache" / "fcl-bench")).expanduser()


def load_synthetic(root: str | Path | None = None, download: bool = False, seed: int = 0, num_classes: int = 100,
                   train_per_class: int = 300, test_per_class: int = 60, pretrain_classes: int = 100,
                   pretrain_train_per_class: int = 500, pretrain_test_per_class: int = 20) -> Dataset:
    """The synthetic dataset: ``num_classes`` FCL classes plus ``pretrain_classes`` disjoint pretraining
    classes (``Dataset.pretrain``), generated once and cached.

    ``root`` is the cache directory (default ``cache_root() / "synthetic"``); ``download`` is accepted for
    interface parity with file-backed datasets and ignored: nothing is downloaded. Defaults: 100 FCL
    classes x (300 train, 60 test) and 100 pretraining classes x (500 train, 20 test) images. A cache file
    that fails its checks (see the module docstring) is regenerated, with one line on stderr.
    """
    sizes = {"num_classes": num_classes, "train_per_class": train_per_class, "test_per_class": test_per_class,
             "pretrain_classes": pretrain_classes, "pretrain_train_per_class": pretrain_train_per_class,
             "pretrain_test_per_class": pretrain_test_per_class}
    for name, value in sizes.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"synthetic dataset: {name} must be a positive integer, got {value!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"synthetic dataset: seed must be a non-negative integer, got {seed!r}")
    _check_vocabulary(num_classes, pretrain_classes)  # before the cache folder and its lock are created
    cache = Path(root).expanduser() if root is not None else cache_root() / "synthetic"
    shape = "c{}x{}x{}-p{}x{}x{}".format(*sizes.values())
    path = cache / f"synthetic-v{GENERATOR_VERSION}-seed{seed}-{shape}.safetensors"

    def build() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        arrays = generate(seed, **sizes)
        meta = {**_fingerprints(arrays), "version": GENERATOR_VERSION}
        atomic_write(path, save(arrays, metadata=meta))  # a crash never leaves a partial cache file
        return arrays, meta

    arrays, meta = load_or_build(path, lambda: _read_cache(path, sizes), build, "the synthetic dataset cache",
                                 "generating it again")
    return _to_dataset(arrays, meta, seed, sizes)


def _to_dataset(arrays: dict[str, torch.Tensor], meta: dict[str, str], seed: int, sizes: dict[str, int]) -> Dataset:
    factors = arrays["factors"].numpy()
    c = sizes["num_classes"]

    def split(prefix: str) -> TensorSource:
        return TensorSource(arrays[f"{prefix}_images"], arrays[f"{prefix}_labels"].numpy())

    # JSON-friendly: runs record dataset info. factors[i] is class i's (shape, colour, freq, angle, layout).
    info = {"generator_version": GENERATOR_VERSION, "seed": seed, **sizes, "factor_names": list(FACTOR_NAMES),
            "preprocess": SYNTHETIC_PREPROCESS.to_dict()}
    pretrain = Dataset(name="synthetic-pretrain", train=split("pretrain_train"), test=split("pretrain_test"),
                       classes=[class_name(f) for f in factors[c:]],
                       fingerprint=meta["pretrain_fingerprint"], native_size=IMAGE_SIZE,
                       info={**info, "factors": factors[c:].tolist()})
    return Dataset(name="synthetic", train=split("train"), test=split("test"),
                   classes=[class_name(f) for f in factors[:c]], fingerprint=meta["fingerprint"],
                   native_size=IMAGE_SIZE, pretrain=pretrain, info={**info, "factors": factors[:c].tolist()})
