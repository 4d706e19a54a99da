"""Datasets stored as folders of images by class: ImageNet-R and any ImageFolder tree.

Files are listed by ``torchvision.datasets.ImageFolder`` (classes are the sorted folder names) and decoded
lazily by :class:`~fcl_bench.data.FileSource`. A tree without its own train/test split (ImageNet-R has
none) is split by :func:`stratified_split`: in every class, a seeded random 20 % of the images is the test
set and the rest the training set, so both splits hold every class in the same proportion. The split
depends only on the seed and the list of files, so every method and run with the same seed sees the same one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from fcl_bench.data import Dataset, FileSource

from . import DATASETS, DatasetError

__all__ = ["TEST_FRACTION", "load_imagefolder", "load_imagenet_r", "stratified_split"]

TEST_FRACTION = 0.2
_FLAT_LAYOUT = "<root>/<class>/<image>"
_SPLIT_LAYOUT = "<root>/train/<class>/<image> and <root>/test/<class>/<image> (or val/)"


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded class-stratified split of ``labels`` (int ``(N,)``) -> sorted (train, test) index arrays.

    Each class with n >= 2 samples puts round(n * test_fraction), clamped to 1..n-1, of them in the test
    set; a class with one sample stays in the training set.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels, dtype=np.int64)
    keys = np.random.default_rng(seed).random(len(labels))
    order = np.lexsort((keys, labels))                   # by class, then by random key inside each class
    sorted_labels = labels[order]
    classes, first, counts = np.unique(sorted_labels, return_index=True, return_counts=True)
    n_test = np.minimum(np.maximum(np.rint(counts * test_fraction).astype(np.int64), 1), counts - 1)
    pos = np.searchsorted(classes, sorted_labels)
    rank = np.arange(len(labels)) - first[pos]           # position of each sample inside its class
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[order] = rank < n_test[pos]
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def load_imagenet_r(root: Path | str | None, download: bool = False, seed: int = 0) -> Dataset:
    """ImageNet-R from ``root``, the extracted ``imagenet-r/`` folder (its parent works too).

    Classes are the WordNet ids of the class folders; their readable names, from the archive's README.txt,
    are in ``info["readable_classes"]``. Split: :func:`stratified_split` with ``TEST_FRACTION`` and ``seed``.
    """
    root = _existing_dir("imagenet-r", root, _FLAT_LAYOUT, download)
    if (root / "imagenet-r").is_dir():
        root = root / "imagenet-r"
    paths, labels, classes = _scan("imagenet-r", root, _FLAT_LAYOUT)
    train, test = stratified_split(labels, TEST_FRACTION, seed)
    info = _split_info(root, seed)
    info["readable_classes"] = _readable_names(root / "README.txt", classes)
    return _dataset("imagenet-r", paths, labels, classes, train, test, seed, info)


def load_imagefolder(root: Path | str | None, download: bool = False, seed: int = 0) -> Dataset:
    """Any class-folder tree: ``root/train`` + ``root/test`` (or ``root/val``) as the splits when present,
    otherwise ``root/<class>/...`` split by :func:`stratified_split` with ``TEST_FRACTION`` and ``seed``."""
    root = _existing_dir("imagefolder", root, f"{_SPLIT_LAYOUT}, or {_FLAT_LAYOUT}", download)
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        return _load_presplit(root, test_dir)
    paths, labels, classes = _scan("imagefolder", root, f"{_FLAT_LAYOUT} (or {_SPLIT_LAYOUT})")
    train, test = stratified_split(labels, TEST_FRACTION, seed)
    return _dataset("imagefolder", paths, labels, classes, train, test, seed, _split_info(root, seed))


def _load_presplit(root: Path, test_dir: Path) -> Dataset:
    train_paths, train_labels, classes = _scan("imagefolder", root / "train", _SPLIT_LAYOUT)
    test_paths, test_labels, test_classes = _scan("imagefolder", test_dir, _SPLIT_LAYOUT)
    unknown = sorted(set(test_classes) - set(classes))
    if unknown:
        raise DatasetError(f"imagefolder: {test_dir} has class folders that {root / 'train'} lacks: "
                           f"{', '.join(unknown[:10])}; every test class needs training images")
    # Test labels index the training class list, which may have classes the test folder lacks.
    remap = np.array([classes.index(c) for c in test_classes], dtype=np.int64)
    paths = train_paths + test_paths
    labels = np.concatenate([train_labels, remap[test_labels]])
    n = len(train_paths)
    info = {"root": str(root), "split": f"folders train/ and {test_dir.name}/"}
    return _dataset("imagefolder", paths, labels, classes, np.arange(n), np.arange(n, len(paths)), None, info)


def _existing_dir(name: str, root: Path | str | None, layout: str, download: bool) -> Path:
    how = DATASETS[name].how_to_get if name in DATASETS else ""
    no_download = (f" {name} cannot be downloaded automatically (--download does nothing here)."
                   if download else "")
    if root is None:
        raise DatasetError(f"dataset {name!r} needs a data root (--data-root DIR) laid out as {layout}."
                           f"{no_download} {how}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data root {root} does not exist or is not a folder; dataset {name!r} expects "
                           f"{layout}.{no_download} {how}")
    return root


def _scan(name: str, folder: Path, layout: str) -> tuple[list[str], np.ndarray, list[str]]:
    """List ``folder/<class>/<image>`` with ImageFolder -> (paths, int64 labels ``(N,)``, class names)."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    try:
        tree = ImageFolder(str(folder))
    except (FileNotFoundError, ValueError) as e:  # no class folders, or a class folder without images
        raise DatasetError(f"dataset {name!r}: no usable images in {folder} ({e}). Expected {layout}, with "
                           f"image files ending in {', '.join(IMG_EXTENSIONS)}. "
                           f"{DATASETS[name].how_to_get}") from e
    return [p for p, _ in tree.samples], np.asarray(tree.targets, dtype=np.int64), list(tree.classes)


def _split_info(root: Path, seed: int) -> dict:
    split = f"seeded class-stratified {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%}"
    return {"root": str(root), "split": split, "test_fraction": TEST_FRACTION, "split_seed": seed}


def _dataset(name: str, paths: list[str], labels: np.ndarray, classes: list[str], train: np.ndarray,
             test: np.ndarray, seed: int | None, info: dict) -> Dataset:
    """A :class:`Dataset` of two :class:`FileSource` splits taken from ``paths``/``labels`` by index."""
    paths_arr = np.asarray(paths, dtype=object)
    root = info["root"]
    return Dataset(
        name=name,
        train=FileSource(paths_arr[train].tolist(), labels[train]),
        test=FileSource(paths_arr[test].tolist(), labels[test]),
        classes=classes,
        fingerprint=_files_fingerprint(name, root, paths, labels, classes, test, seed),
        native_size=None,  # files differ in size; FileSource resizes each one
        info=info,
    )


def _files_fingerprint(name: str, root: str, paths: list[str], labels: np.ndarray, classes: list[str],
                       test: np.ndarray, seed: int | None, sampled: int = 32) -> str:
    """sha1 over relative paths, file sizes, labels, the test indices, the seed and the bytes of up to
    ``sampled`` evenly spaced files (reading all 30k ImageNet-R files would cost more than loading them)."""
    h = hashlib.sha1()
    rel = [os.path.relpath(p, root) for p in paths]
    h.update(json.dumps({"name": name, "classes": classes, "paths": rel, "seed": seed}).encode())
    h.update(np.asarray([os.path.getsize(p) for p in paths], dtype=np.int64).tobytes())
    h.update(labels.astype(np.int64).tobytes())
    h.update(np.asarray(test, dtype=np.int64).tobytes())
    for i in np.unique(np.linspace(0, len(paths) - 1, min(sampled, len(paths))).astype(np.int64)):
        with open(paths[i], "rb") as f:
            h.update(f.read(1 << 16))
    return h.hexdigest()


def _readable_names(readme: Path, classes: list[str]) -> list[str]:
    """Readable class names from ImageNet-R's README.txt (lines ``n01443537 goldfish``); the folder name
    where the file or a line is missing."""
    names: dict[str, str] = {}
    if readme.is_file():
        for line in readme.read_text(errors="replace").splitlines():
            m = re.match(r"^(n\d{8})\s+(.+?)\s*$", line)
            if m:
                names[m.group(1)] = m.group(2).replace("_", " ")
    return [names.get(c, c) for c in classes]
