"""The synthetic dataset: determinism, shapes, disjoint pretraining classes, cache behaviour, no single cue."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fcl_bench.data import Dataset, Preprocess, TensorSource
from fcl_bench.datasets import synthetic
from fcl_bench.datasets.synthetic import FACTOR_SIZES, generate, load_synthetic
from fcl_bench.nn.pretrain import mean_colour_probe
from fcl_bench.nn.tiny_vit import TINY_VIT_CONFIG

SMALL = {"num_classes": 100, "train_per_class": 24, "test_per_class": 8, "pretrain_classes": 100,
         "pretrain_train_per_class": 3, "pretrain_test_per_class": 1}
TINY = {"num_classes": 4, "train_per_class": 3, "test_per_class": 2, "pretrain_classes": 5,
        "pretrain_train_per_class": 2, "pretrain_test_per_class": 1}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return load_synthetic(root=tmp_path_factory.mktemp("synthetic"), **SMALL)


def test_shapes_dtypes_and_labels(small):
    for source, classes, per_class in [(small.train, 100, 24), (small.test, 100, 8),
                                       (small.pretrain.train, 100, 3), (small.pretrain.test, 100, 1)]:
        assert source.images.dtype == torch.uint8
        assert tuple(source.images.shape) == (classes * per_class, 3, 32, 32)
        assert source.labels.dtype == np.int64
        assert np.array_equal(np.bincount(source.labels, minlength=classes), np.full(classes, per_class))
    assert small.num_classes == 100 and small.pretrain.num_classes == 100 and small.native_size == 32
    assert len(set(small.classes)) == 100
    # the images use the whole intensity range (not blank or saturated canvases)
    assert small.train.images.float().std() > 30


def test_same_seed_same_images_other_seed_differs():
    a, b, c = generate(seed=3, **TINY), generate(seed=3, **TINY), generate(seed=4, **TINY)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["train_images"], c["train_images"])


def test_pretrain_classes_disjoint_and_factors_shared(small):
    fcl, pre = np.asarray(small.info["factors"]), np.asarray(small.pretrain.info["factors"])
    assert not set(small.classes) & set(small.pretrain.classes)
    assert not {tuple(r) for r in fcl} & {tuple(r) for r in pre}
    for factors in (fcl, pre):
        assert len({tuple(r) for r in factors}) == len(factors)
        for j, n in enumerate(FACTOR_SIZES):  # every factor value is shared by many classes, evenly
            counts = np.bincount(factors[:, j], minlength=n)
            assert counts.max() - counts.min() <= 1 and counts.min() >= 100 // n


def test_cache_is_reused(tmp_path, monkeypatch):
    first = load_synthetic(root=tmp_path, **TINY)
    (path,) = tmp_path.glob("*.safetensors")
    mtime = path.stat().st_mtime_ns
    monkeypatch.setattr(synthetic, "generate", lambda *a, **k: pytest.fail("cache was not used"))
    second = load_synthetic(root=tmp_path, **TINY)
    assert path.stat().st_mtime_ns == mtime
    assert torch.equal(first.train.images, second.train.images)
    assert first.fingerprint == second.fingerprint and first.pretrain.fingerprint == second.pretrain.fingerprint


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "garbage"])
def test_corrupt_cache_is_regenerated(tmp_path, damage):
    first = load_synthetic(root=tmp_path, **TINY)
    (path,) = tmp_path.glob("*.safetensors")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip_byte":
        data[-10] ^= 0xFF          # inside the image bytes: only the content hash notices
    else:
        data = bytearray(b"not a safetensors file")
    path.write_bytes(bytes(data))
    again = load_synthetic(root=tmp_path, **TINY)
    assert torch.equal(first.train.images, again.train.images) and first.fingerprint == again.fingerprint
    assert path.read_bytes() != bytes(data)  # the damaged file was replaced
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [path.name, path.name + ".lock"]  # the lock file stays; no temporary files left behind


def test_mean_colour_does_not_identify_classes(small):
    assert mean_colour_probe(small) < 0.15


def test_mean_colour_probe_can_succeed():
    """The probe itself works: on images whose colour is the class, it is near perfect."""
    gen = torch.Generator().manual_seed(0)
    colours = torch.randint(0, 256, (5, 3, 1, 1), generator=gen)

    def source(n: int) -> TensorSource:
        y = torch.arange(n) % 5
        images = (colours[y] + torch.randint(-3, 4, (n, 3, 4, 4), generator=gen)).clamp(0, 255).to(torch.uint8)
        return TensorSource(images, y.numpy())

    ds = Dataset(name="colours", train=source(100), test=source(50), classes=list("abcde"), fingerprint="c")
    assert mean_colour_probe(ds) > 0.95


def test_preprocess_matches_tiny_vit():
    assert synthetic.SYNTHETIC_PREPROCESS == Preprocess(**TINY_VIT_CONFIG)


@pytest.mark.parametrize("bad", [{"num_classes": 0}, {"train_per_class": -1}, {"test_per_class": 2.5},
                                 {"num_classes": 2000, "pretrain_classes": 2000}, {"seed": -1}])
def test_bad_sizes_are_clear_errors(tmp_path, bad):
    with pytest.raises(ValueError, match="num_classes|per_class|tuples|seed"):
        load_synthetic(root=tmp_path, **{**TINY, **bad})
    assert not list(tmp_path.iterdir())  # nothing cached
