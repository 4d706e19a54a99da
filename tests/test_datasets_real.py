"""Real-dataset adapters, loaded through torchvision from tiny files written in the official formats."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from PIL import Image

from fcl_bench.data import Dataset, FileSource, Preprocess, TensorSource
from fcl_bench.datasets import (
    DATASETS,
    DatasetEntry,
    DatasetError,
    available_datasets,
    load_dataset,
    register_dataset,
)
from fcl_bench.datasets.imagefolder import TEST_FRACTION, stratified_split

# ---------------------------------------------------------------------------------------------------------
# CIFAR-100 in its official format: Python 2 pickles (keys are Python 2 ``str``, which torchvision reads
# with encoding="latin1") under <root>/cifar-100-python/{train,test,meta}.


class _Py2Str(bytes):
    """Bytes that pickle as a Python 2 ``str`` (opcode BINSTRING), as in the official CIFAR files."""


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch table can be extended
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2str(self, obj: bytes) -> None:
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + bytes(obj))
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2str


def _py2_pickle(obj: object, path: Path) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def _cifar_batch(images: np.ndarray, fine: np.ndarray, coarse: np.ndarray, split: str) -> dict:
    """``images``: uint8 (N, 3, 32, 32) -> the dict of one CIFAR-100 file (rows are R, G, B planes)."""
    return {_Py2Str(b"batch_label"): _Py2Str(f"{split} batch 1 of 1".encode()),
            _Py2Str(b"filenames"): [_Py2Str(f"img_{split}_{i}.png".encode()) for i in range(len(images))],
            _Py2Str(b"fine_labels"): [int(v) for v in fine],
            _Py2Str(b"coarse_labels"): [int(v) for v in coarse],
            _Py2Str(b"data"): images.reshape(len(images), 3072)}


FINE = ["apple", "aquarium_fish", "baby", "bear", "beaver"]
COARSE = ["fruit_and_vegetables", "fish", "people", "large_carnivores", "aquatic_mammals"]


def _write_cifar100(root: Path, n_train: int = 12, n_test: int = 7, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        fine = rng.integers(0, len(FINE), size=n)
        _py2_pickle(_cifar_batch(images, fine, fine, split), folder / split)
        arrays[f"{split}_x"], arrays[f"{split}_y"] = images, fine
    _py2_pickle({_Py2Str(b"fine_label_names"): [_Py2Str(c.encode()) for c in FINE],
                 _Py2Str(b"coarse_label_names"): [_Py2Str(c.encode()) for c in COARSE]}, folder / "meta")
    return arrays


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def accept_our_cifar_md5(monkeypatch):
    """torchvision verifies the md5 of each CIFAR file against the official release. Point its class-level
    checksum table at our tiny files instead (test only), so its real integrity check and reader run."""

    def accept(root: Path) -> None:
        folder = root / "cifar-100-python"
        monkeypatch.setattr(tvd.CIFAR100, "train_list", [["train", _md5(folder / "train")]])
        monkeypatch.setattr(tvd.CIFAR100, "test_list", [["test", _md5(folder / "test")]])
        monkeypatch.setattr(tvd.CIFAR100, "meta", {**tvd.CIFAR100.meta, "md5": _md5(folder / "meta")})

    return accept


def test_cifar100_round_trips_pixels_labels_and_class_names(tmp_path, accept_our_cifar_md5):
    arrays = _write_cifar100(tmp_path)
    accept_our_cifar_md5(tmp_path)
    ds = load_dataset("cifar100", root=str(tmp_path))
    assert isinstance(ds, Dataset)
    assert isinstance(ds.train, TensorSource) and isinstance(ds.test, TensorSource)
    assert ds.classes == FINE and ds.num_classes == 5 and ds.native_size == 32
    for split, source in (("train", ds.train), ("test", ds.test)):
        assert source.images.dtype == torch.uint8
        assert torch.equal(source.images, torch.from_numpy(arrays[f"{split}_x"]))
        np.testing.assert_array_equal(source.labels, arrays[f"{split}_y"])
    assert ds.info["source"] == "torchvision.datasets.CIFAR100"
    x = ds.test.load(np.array([0, 3]), Preprocess(input_size=16), "cpu")
    assert x.dtype == torch.float32 and x.shape == (2, 3, 16, 16)


def test_cifar100_fingerprint_is_stable_and_tracks_content(tmp_path, accept_our_cifar_md5):
    _write_cifar100(tmp_path / "a", seed=0)
    _write_cifar100(tmp_path / "b", seed=1)
    accept_our_cifar_md5(tmp_path / "a")
    fp_a = load_dataset("cifar100", root=tmp_path / "a").fingerprint
    assert load_dataset("cifar100", root=tmp_path / "a").fingerprint == fp_a
    accept_our_cifar_md5(tmp_path / "b")
    assert load_dataset("cifar100", root=tmp_path / "b").fingerprint != fp_a


def write_idx(folder: Path, n_train: int = 9, n_test: int = 4, gz: bool = False, seed: int = 0,
              size: int = 28) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four MNIST-format idx files (``gz``: gzipped, as distributions ship them) in ``folder``;
    returns ``{"train" | "t10k": (images (N, size, size), labels (N,))}``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)[rng.permutation(n)]
        header = struct.pack(">iiii", 2051, n, size, size)  # idx magic for 3-d uint8, then the dimensions
        files = {f"{prefix}-images-idx3-ubyte": header + images.tobytes(),
                 f"{prefix}-labels-idx1-ubyte": struct.pack(">ii", 2049, n) + labels.tobytes()}
        for fname, payload in files.items():
            if gz:
                (folder / f"{fname}.gz").write_bytes(gzip.compress(payload))
            else:
                (folder / fname).write_bytes(payload)
        data[prefix] = images, labels
    return data


def test_mnist_idx_files_become_three_identical_channels(tmp_path):
    data = write_idx(tmp_path / "MNIST" / "raw")
    ds = load_dataset("mnist", root=tmp_path)
    assert ds.train.images.shape == (9, 3, 28, 28) and ds.test.images.shape == (4, 3, 28, 28)
    for channel in range(3):
        assert torch.equal(ds.train.images[:, channel], torch.from_numpy(data["train"][0]))
    np.testing.assert_array_equal(ds.test.labels, data["t10k"][1])
    assert ds.num_classes == 10 and ds.native_size == 28


@pytest.mark.parametrize("name,classes", [("mnist", tvd.MNIST.classes), ("fashionmnist", tvd.FashionMNIST.classes),
                                          ("kmnist", tvd.KMNIST.classes)])
@pytest.mark.parametrize("gz", [True, False])
def test_mnist_family_reads_the_four_idx_files_lying_in_the_data_root(tmp_path, name, classes, gz):
    data = write_idx(tmp_path, gz=gz)
    ds = load_dataset(name, root=tmp_path)
    assert ds.name == name and ds.classes == list(classes) and ds.native_size == 28
    assert ds.train.images.shape == (9, 3, 28, 28) and ds.test.images.shape == (4, 3, 28, 28)
    for channel in range(3):
        assert torch.equal(ds.test.images[:, channel], torch.from_numpy(data["t10k"][0]))
    np.testing.assert_array_equal(ds.train.labels, data["train"][1])
    assert ds.info["source"] == "idx files in the data root"
    # the same bytes in torchvision's <Name>/raw/ tree give the same dataset
    tree = tmp_path / "tree"
    write_idx(tree / {"mnist": "MNIST", "fashionmnist": "FashionMNIST", "kmnist": "KMNIST"}[name] / "raw")
    assert load_dataset(name, root=tree).fingerprint == ds.fingerprint


def test_flat_idx_files_that_are_not_idx_are_a_dataset_error(tmp_path):
    write_idx(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset("fashionmnist", root=tmp_path)


def test_missing_idx_files_name_both_layouts(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("fashionmnist", root=tmp_path)
    assert "FashionMNIST/raw/train-images-idx3-ubyte" in str(e.value)
    assert "directly in the data root" in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# Errors on the torchvision path


def test_missing_root_names_the_root_and_the_expected_file(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar100", root=missing)
    assert str(missing) in str(e.value) and "cifar-100-python/train" in str(e.value)
    assert "--download" in str(e.value)


def test_root_without_cifar_files_names_the_exact_path(tmp_path):
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "meta").write_bytes(b"x")
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar100", root=tmp_path)
    message = str(e.value)
    assert str(tmp_path / "cifar-100-python" / "train") in message and "cifar-100-python.tar.gz" in message


def test_no_root_at_all_is_a_clear_error():
    with pytest.raises(DatasetError, match="--data-root"):
        load_dataset("cifar100")


def test_cifar_files_with_wrong_checksum_are_reported_not_raised_as_runtime_error(tmp_path):
    _write_cifar100(tmp_path)  # torchvision's md5 table is the official one here: our files fail it
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar100", root=tmp_path)
    assert "corrupted" in str(e.value) and str(tmp_path / "cifar-100-python") in str(e.value)


def test_malformed_cifar_pickle_is_a_dataset_error(tmp_path, accept_our_cifar_md5):
    _write_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"this is not a pickle")
    accept_our_cifar_md5(tmp_path)
    with pytest.raises(DatasetError, match="malformed"):
        load_dataset("cifar100", root=tmp_path)


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar1000")
    assert isinstance(e.value, ValueError)
    for name in ("cifar100", "imagenet-r", "imagefolder", "synthetic"):
        assert name in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# ImageFolder trees


def _write_tree(folder: Path, counts: dict[str, int], seed: int = 0) -> None:
    """``counts[class]`` tiny images per class folder, alternating PNG and JPEG, with varied sizes."""
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        (folder / cls).mkdir(parents=True)
        for i in range(n):
            size = (int(rng.integers(8, 24)), int(rng.integers(8, 24)))
            img = Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8))
            img.save(folder / cls / f"{i:03d}.{'png' if i % 2 else 'jpg'}")


COUNTS = {"n01443537": 10, "n01484850": 5, "n01494475": 7}


@pytest.fixture
def imagenet_r(tmp_path) -> Path:
    root = tmp_path / "imagenet-r"
    _write_tree(root, COUNTS)
    (root / "README.txt").write_text("ImageNet-R\n\nn01443537 goldfish\nn01484850 great_white_shark\n")
    return root


def _paths(source: FileSource) -> set[str]:
    return set(source.paths)


def test_imagenet_r_split_is_disjoint_stratified_and_complete(imagenet_r):
    ds = load_dataset("imagenet-r", root=imagenet_r, seed=3)
    assert ds.classes == sorted(COUNTS)
    assert ds.info["readable_classes"] == ["goldfish", "great white shark", "n01494475"]
    assert isinstance(ds.train, FileSource) and isinstance(ds.test, FileSource)
    assert not _paths(ds.train) & _paths(ds.test)
    assert _paths(ds.train) | _paths(ds.test) == {str(p) for p in imagenet_r.glob("n*/*.*")}
    for label, (cls, n) in enumerate(sorted(COUNTS.items())):
        n_test = int((ds.test.labels == label).sum())
        assert n_test == round(n * TEST_FRACTION) and int((ds.train.labels == label).sum()) == n - n_test
        assert all(Path(p).parent.name == cls for p, y in zip(ds.test.paths, ds.test.labels) if y == label)


def test_imagenet_r_split_is_deterministic_in_the_seed(imagenet_r):
    a = load_dataset("imagenet-r", root=imagenet_r, seed=3)
    b = load_dataset("imagenet-r", root=imagenet_r, seed=3)
    assert a.test.paths == b.test.paths and a.fingerprint == b.fingerprint
    c = load_dataset("imagenet-r", root=imagenet_r, seed=4)
    assert c.test.paths != a.test.paths and c.fingerprint != a.fingerprint


def test_imagenet_r_accepts_the_parent_folder_and_loads_images(imagenet_r):
    ds = load_dataset("imagenet-r", root=imagenet_r.parent, seed=0)
    assert ds.info["root"] == str(imagenet_r)
    x = ds.test.load(np.arange(len(ds.test)), Preprocess(input_size=16), "cpu")
    assert x.dtype == torch.float32 and x.shape == (len(ds.test), 3, 16, 16) and torch.isfinite(x).all()


def test_flat_imagefolder_matches_imagenet_r_split(imagenet_r):
    flat = load_dataset("imagefolder", root=imagenet_r, seed=5)
    inr = load_dataset("imagenet-r", root=imagenet_r, seed=5)
    assert flat.classes == inr.classes and flat.test.paths == inr.test.paths
    assert flat.name == "imagefolder" and flat.fingerprint != inr.fingerprint


def test_presplit_imagefolder_uses_its_folders_and_maps_test_classes(tmp_path):
    _write_tree(tmp_path / "train", {"cat": 3, "dog": 2, "emu": 2})
    _write_tree(tmp_path / "val", {"dog": 2, "emu": 1}, seed=1)
    ds = load_dataset("imagefolder", root=tmp_path, seed=0)
    assert ds.classes == ["cat", "dog", "emu"] and len(ds.train) == 7 and len(ds.test) == 3
    assert all(Path(p).parts[-3] == "val" for p in ds.test.paths)
    assert [ds.classes[y] for y in ds.test.labels] == [Path(p).parent.name for p in ds.test.paths]
    x = ds.train.load(np.array([0, 6]), Preprocess(input_size=16), "cpu")
    assert x.shape == (2, 3, 16, 16)


def test_presplit_test_class_missing_from_train_is_an_error(tmp_path):
    _write_tree(tmp_path / "train", {"cat": 2})
    _write_tree(tmp_path / "test", {"cat": 1, "yak": 1})
    with pytest.raises(DatasetError, match="yak"):
        load_dataset("imagefolder", root=tmp_path)


@pytest.mark.parametrize("name", ["imagenet-r", "imagefolder"])
def test_empty_or_imageless_folders_name_the_path_and_layout(tmp_path, name):
    with pytest.raises(DatasetError) as e:
        load_dataset(name, root=tmp_path)
    assert str(tmp_path) in str(e.value) and "<root>/<class>/<image>" in str(e.value)
    (tmp_path / "n01443537").mkdir()
    (tmp_path / "n01443537" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="n01443537"):
        load_dataset(name, root=tmp_path)


def test_imagefolder_missing_root_and_no_root(tmp_path):
    with pytest.raises(DatasetError, match=str(tmp_path / "absent")):
        load_dataset("imagefolder", root=tmp_path / "absent")
    with pytest.raises(DatasetError, match="imagenet-r.tar"):
        load_dataset("imagenet-r")


def test_stratified_split_on_many_classes():
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(rng.integers(2, 40, size=50))] + [[50]])
    labels = labels[rng.permutation(len(labels))]
    train, test = stratified_split(labels, 0.2, seed=7)
    assert np.intersect1d(train, test).size == 0 and len(train) + len(test) == len(labels)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    counts, test_counts = np.bincount(labels), np.bincount(labels[test], minlength=51)
    expected = np.clip(np.rint(counts * 0.2), 1, counts - 1)
    np.testing.assert_array_equal(test_counts, expected)
    assert test_counts[50] == 0  # a single-sample class stays in training
    again = stratified_split(labels, 0.2, seed=7)
    np.testing.assert_array_equal(again[1], test)


# ---------------------------------------------------------------------------------------------------------
# Registry


def test_registry_lists_every_dataset_with_help():
    names = available_datasets()
    assert {"cifar100", "cifar10", "mnist", "fashionmnist", "svhn", "stl10", "imagenet-r", "imagefolder",
            "synthetic"} <= set(names)
    assert names == sorted(names)
    for name in names:
        entry = DATASETS[name]
        assert entry.name == name and entry.description and entry.how_to_get
        assert entry.needs_root == (name != "synthetic")


def test_synthetic_is_loaded_lazily_with_keyword_arguments(monkeypatch):
    seen = {}

    def fake(root=None, download=False, seed=0):
        seen.update(root=root, download=download, seed=seed)
        return "fake-dataset"

    fake_module = types.SimpleNamespace(load_synthetic=fake)
    monkeypatch.setitem(sys.modules, "fcl_bench.datasets.synthetic", fake_module)
    assert load_dataset("Synthetic", seed=11) == "fake-dataset"
    assert seen == {"root": None, "download": False, "seed": 11}


def test_listing_datasets_imports_no_adapter_or_torchvision():
    code = ("import sys, fcl_bench.datasets as d; d.available_datasets(); "
            "print(sorted(m for m in sys.modules if m.startswith(('torchvision', 'fcl_bench.datasets.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_register_refuses_a_silent_overwrite(monkeypatch):
    monkeypatch.setattr("fcl_bench.datasets.DATASETS", dict(DATASETS))
    entry = DatasetEntry("cifar100", lambda root, download, seed: None, "x", needs_root=False, how_to_get="-")
    with pytest.raises(DatasetError, match="already registered"):
        register_dataset(entry)
    register_dataset(entry, overwrite=True)


# ---------------------------------------------------------------------------------------------------------
# The tiny foundation model on a real dataset


def test_tiny_foundation_on_a_real_dataset_is_pretrained_on_synthetic_and_resizes(tmp_path, monkeypatch):
    from fcl_bench.nn import pretrain
    from fcl_bench.nn.foundation import load_foundation
    from fcl_bench.nn.tiny_vit import build_tiny_vit

    write_idx(tmp_path, n_train=20, n_test=10, gz=True)
    ds = load_dataset("fashionmnist", root=tmp_path)
    seen = {}

    def fake_pretrain(dataset, **kw):  # the real one trains for minutes; record what it would train on
        seen["dataset"] = dataset
        return build_tiny_vit(), {"dataset": dataset.name}

    monkeypatch.setattr(pretrain, "pretrain_tiny_vit", fake_pretrain)
    fm = load_foundation("tiny", ds, torch.device("cpu"), pretrained=True)
    assert seen["dataset"].name == "synthetic" and seen["dataset"].pretrain is not None
    assert fm.info["source"] == "pretrained-offline" and fm.info["pretrain_dataset"] == "synthetic"
    x = ds.train.load(np.arange(3), fm.preprocess, "cpu")
    assert fm.preprocess.input_size == 32 and x.shape == (3, 3, 32, 32)  # 28 px images resized to 32
    assert fm.cls(x).shape == (3, fm.embed_dim)


def test_a_method_runs_on_a_real_dataset_with_the_tiny_foundation_model(tmp_path):
    import dataclasses

    from helpers import run, workspace

    from fcl_bench.config import preset
    from fcl_bench.methods.fedlscl import FedLSCL, FedLSCLConfig

    write_idx(tmp_path, n_train=200, n_test=100, gz=True)
    cfg = dataclasses.replace(preset("smoke"), dataset="fashionmnist", data_root=str(tmp_path),
                              foundation_pretrained=False, small_models=["test_resnet"], device="cpu")
    ws = workspace(cfg)
    result = run(FedLSCL, FedLSCLConfig(), ws, cfg)
    assert ws.foundation.name == "tiny" and ws.foundation.preprocess.input_size == 32
    assert len(result.metrics["acc"]) == cfg.tasks and 0.0 <= result.metrics["final_acc"] <= 1.0
