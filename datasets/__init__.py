"""Dataset registry: every dataset the benchmark can run on, by name.

    >>> from fcl_bench.datasets import available_datasets, load_dataset
    >>> ds = load_dataset("cifar100", root="~/data", download=True)     # doctest: +SKIP
    >>> ds.train.images.shape                                           # doctest: +SKIP
    torch.Size([50000, 3, 32, 32])

Adapters live in submodules and are imported only when their dataset is loaded, so listing datasets
never imports torchvision (or a dataset module that is not there yet). A plugin adds a dataset with
:func:`register_dataset`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fcl_bench.data import Dataset

__all__ = ["DATASETS", "DatasetEntry", "DatasetError", "Loader", "available_datasets", "load_dataset",
           "register_dataset"]


class DatasetError(ValueError):
    """A dataset cannot be loaded because of the user's input or files: the message says how to fix it."""


Loader = Callable[[Path | None, bool, int], Dataset]
"""``loader(root, download, seed) -> Dataset``."""


@dataclass(frozen=True)
class DatasetEntry:
    """One registered dataset: how to load it and how a user gets its files."""

    name: str
    loader: Loader
    description: str
    needs_root: bool
    how_to_get: str
    writes_root: bool = False  # the loader writes into its root (a generated dataset's cache)


DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(entry: DatasetEntry, *, overwrite: bool = False) -> DatasetEntry:
    """Add ``entry`` to :data:`DATASETS` (a second entry with the same name needs ``overwrite=True``)."""
    from fcl_bench.paths import PathError, check_token

    try:  # the name becomes a results folder
        check_token(entry.name, "dataset name")
    except PathError as e:
        raise DatasetError(str(e)) from None
    if entry.name != entry.name.lower():
        raise DatasetError(f"dataset name {entry.name!r} must be lower case (names are matched case-blind)")
    if entry.name in DATASETS and not overwrite:
        raise DatasetError(f"dataset {entry.name!r} is already registered; pass overwrite=True to replace it")
    DATASETS[entry.name] = entry
    return entry


def available_datasets() -> list[str]:
    """Names of the registered datasets, sorted."""
    return sorted(DATASETS)


def load_dataset(name: str, root: str | Path | None = None, download: bool = False, seed: int = 0) -> Dataset:
    """Load dataset ``name`` from ``root`` (``--data-root``); ``download`` fetches it where supported.

    ``seed`` only matters where the dataset itself is random (the synthetic data, the train/test split of a
    folder tree without one); official splits ignore it.
    """
    entry, path = _entry_and_root(name, root)
    return entry.loader(path, download, seed)


def _entry_and_root(name: str, root: str | Path | None) -> tuple[DatasetEntry, Path | None]:
    entry = DATASETS.get(name.strip().lower())
    if entry is None:
        raise DatasetError(f"unknown dataset {name!r}; available datasets: {', '.join(available_datasets())}")
    path = Path(root).expanduser() if root is not None and str(root) != "" else None
    if entry.needs_root and path is None:
        raise DatasetError(f"dataset {entry.name!r} needs a data root (--data-root DIR). {entry.how_to_get}")
    return entry, path


def check_dataset(name: str, root: str | Path | None = None, download: bool = False) -> None:
    """The cheap checks of :func:`load_dataset`, without loading anything: a registered name, a data root
    where one is needed, a root that is a folder, that exists unless ``download`` may create it, and that
    is writable when the loader would write into it (a download, a generated dataset's first use)."""
    import os

    entry, path = _entry_and_root(name, root)
    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise DatasetError(f"--data-root {path} is a file; give the folder that holds (or will hold) the "
                           f"{entry.name} files")
    if entry.needs_root and not download and not path.exists():
        raise DatasetError(f"dataset {entry.name!r}: no folder at {path}. {entry.how_to_get}")
    writes = download or (entry.writes_root and not (path.is_dir() and any(path.glob("*.safetensors"))))
    if writes:
        probe = path
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            raise DatasetError(f"--data-root {path}: {probe} is not a writable folder, and dataset "
                               f"{entry.name!r} must write its files there; choose a writable --data-root")


def _lazy(module: str, function: str, **fixed) -> Loader:
    """A loader that imports ``.module`` on first use, then calls
    ``function(root=, download=, seed=, **fixed)``."""

    def load(root: Path | None, download: bool, seed: int) -> Dataset:
        fn = getattr(importlib.import_module(f".{module}", __package__), function)
        return fn(root=root, download=download, seed=seed, **fixed)

    load.__qualname__ = f"{module}.{function}"
    return load


def _download_help(manual: str) -> str:
    return (f"Pass --download on a machine with internet access (torchvision fetches it into the data root), "
            f"or {manual}.")


def _archive(url: str, folder: str) -> str:
    return f"download {url} and extract it into the data root so that <data-root>/{folder} exists"


def _idx(url: str, folder: str) -> str:
    return (f"download the four *-ubyte.gz files from {url} and gunzip them into <data-root>/{folder}/raw/ "
            "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
            "t10k-labels-idx1-ubyte), or leave the four *-ubyte.gz files directly in the data root")


# name: (description, how to get the files by hand)
_TORCHVISION = {
    "cifar100": ("CIFAR-100: 100 classes, 50k train / 10k test, 32x32 (the paper's reference dataset)",
                 _archive("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python/")),
    "cifar10": ("CIFAR-10: 10 classes, 50k train / 10k test, 32x32",
                _archive("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-batches-py/")),
    "mnist": ("MNIST digits: 10 classes, 60k / 10k, 28x28 grey (replicated to 3 channels)",
              _idx("https://ossci-datasets.s3.amazonaws.com/mnist/", "MNIST")),
    "fashionmnist": ("Fashion-MNIST: 10 classes, 60k / 10k, 28x28 grey (replicated to 3 channels)",
                     _idx("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", "FashionMNIST")),
    "kmnist": ("Kuzushiji-MNIST: 10 classes, 60k / 10k, 28x28 grey (replicated to 3 channels)",
               _idx("http://codh.rois.ac.jp/kmnist/dataset/kmnist/", "KMNIST")),
    "svhn": ("SVHN street-view digits: 10 classes, 73k / 26k, 32x32 (needs scipy)",
             "download train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/ "
             "into the data root itself"),
    "stl10": ("STL-10: 10 classes, 5k / 8k labelled, 96x96",
              _archive("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz", "stl10_binary/")),
}

for _name, (_description, _manual) in _TORCHVISION.items():
    register_dataset(DatasetEntry(_name, _lazy("torchvision_datasets", "load_torchvision", name=_name),
                                  _description, needs_root=True, how_to_get=_download_help(_manual)))
del _name, _description, _manual

IMAGENET_R_URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"

register_dataset(DatasetEntry(
    "imagenet-r", _lazy("imagefolder", "load_imagenet_r"),
    "ImageNet-R: 200 ImageNet classes as renditions (art, cartoons, ...), 30k images; seeded 80/20 split",
    needs_root=True,
    how_to_get=(f"Download {IMAGENET_R_URL}, extract it (tar xf imagenet-r.tar) and pass the extracted "
                "imagenet-r/ folder (the one holding the 200 class folders n01443537/ ...) as --data-root."),
))
register_dataset(DatasetEntry(
    "imagefolder", _lazy("imagefolder", "load_imagefolder"),
    "Any folder of images by class: <root>/train/<class>/*, <root>/test|val/<class>/*, or a flat "
    "<root>/<class>/* tree split 80/20 by seed",
    needs_root=True,
    how_to_get=("Pass the folder as --data-root: either with train/ and test/ (or val/) subfolders of class "
                "folders, or directly holding one folder of images per class."),
))
register_dataset(DatasetEntry(
    "synthetic", _lazy("synthetic", "load_synthetic"),
    "Procedurally generated images, offline and deterministic by seed (the default)",
    needs_root=False,
    how_to_get="Nothing to get: the images are generated from the seed.",
    writes_root=True,
))
