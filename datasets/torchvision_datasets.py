"""Torchvision classification datasets (CIFAR, the MNIST family, SVHN, STL-10) held in memory.

Each dataset is read by its own ``torchvision.datasets`` class from the files of the official release, so
the on-disk layout, the integrity checks and ``download=True`` are torchvision's. The images become one
``uint8 (N, 3, H, W)`` tensor per split (grey images are replicated to three channels) behind a
:class:`~fcl_bench.data.TensorSource`. The official train/test split is used; the seed plays no part.

The MNIST family (mnist, fashionmnist, kmnist) also accepts the layout most distributions ship: the four
``*-ubyte.gz`` files (or their gunzipped versions) directly in the data root, read here without
torchvision. torchvision's ``<root>/<Name>/raw/`` tree wins when both are present.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fcl_bench.data import Dataset, TensorSource

from . import DATASETS, DatasetError

__all__ = ["TORCHVISION_SPECS", "TorchvisionSpec", "load_torchvision", "tensor_fingerprint"]


@dataclass(frozen=True)
class TorchvisionSpec:
    """How one torchvision class is called and what its files look like."""

    cls: str                        # class name in torchvision.datasets
    split_arg: str                  # "train": cls(train=bool); "split": cls(split="train" | "test")
    layout: str                     # layout of the class's ``.data``: "NHWC", "NCHW" or "NHW" (grey)
    files: tuple[str, ...]          # files the class reads, relative to the root (named in errors)
    classes: tuple[str, ...] = ()   # class names, for classes without a ``.classes`` attribute


IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


def _idx_files(folder: str) -> tuple[str, ...]:
    return tuple(f"{folder}/raw/{n}" for n in IDX_NAMES)


TORCHVISION_SPECS: dict[str, TorchvisionSpec] = {
    "cifar100": TorchvisionSpec("CIFAR100", "train", "NHWC",
                                ("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta")),
    "cifar10": TorchvisionSpec("CIFAR10", "train", "NHWC",
                               tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6))
                               + ("cifar-10-batches-py/test_batch", "cifar-10-batches-py/batches.meta")),
    "mnist": TorchvisionSpec("MNIST", "train", "NHW", _idx_files("MNIST")),
    "fashionmnist": TorchvisionSpec("FashionMNIST", "train", "NHW", _idx_files("FashionMNIST")),
    "kmnist": TorchvisionSpec("KMNIST", "train", "NHW", _idx_files("KMNIST")),
    "svhn": TorchvisionSpec("SVHN", "split", "NCHW", ("train_32x32.mat", "test_32x32.mat"),
                            classes=tuple(str(d) for d in range(10))),
    # torchvision checks the unlabelled images too, although they are never used here.
    "stl10": TorchvisionSpec("STL10", "split", "NCHW", tuple(
        f"stl10_binary/{f}" for f in ("train_X.bin", "train_y.bin", "unlabeled_X.bin", "test_X.bin",
                                      "test_y.bin", "class_names.txt"))),
}

# What a truncated, foreign or hand-edited file raises inside torchvision's readers.
_FORMAT_ERRORS = (pickle.UnpicklingError, EOFError, KeyError, IndexError, TypeError, ValueError)


def load_torchvision(name: str, root: Path | str | None, download: bool = False, seed: int = 0) -> Dataset:
    """Load torchvision dataset ``name`` (a key of :data:`TORCHVISION_SPECS`) from ``root``.

    ``download=True`` lets torchvision fetch the official archive into ``root``. ``seed`` is unused (the
    official split is fixed) and accepted for the common loader signature.
    """
    spec = TORCHVISION_SPECS.get(name)
    if spec is None:
        known = ", ".join(sorted(TORCHVISION_SPECS))
        raise DatasetError(f"{name!r} is not a torchvision dataset; known: {known}")
    if root is None:
        raise DatasetError(f"dataset {name!r} needs a data root (--data-root DIR). {_how_to_get(name)}")
    root = Path(root).expanduser()
    flat = _flat_idx_paths(spec, root) if not download and not _has_files(spec, root) else None
    if flat is not None:
        splits = _read_flat_idx(name, spec, root, flat)
    else:
        if not download:
            _check_files(name, spec, root)
        splits = {}
        for split in ("train", "test"):
            # Both splits pass download: SVHN fetches one file per split; the others skip a complete download.
            ds = _open(name, spec, root, split == "train", download)
            splits[split] = _to_arrays(name, spec, root, ds)
    classes = list(spec.classes) or [str(c) for c in splits["train"][2]]
    for split, (_, labels, _) in splits.items():
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DatasetError(f"{name} {split} labels under {root} fall outside 0..{len(classes) - 1}: "
                               "the files are not the official release")
    (train_x, train_y, _), (test_x, test_y, _) = splits["train"], splits["test"]
    h, w = train_x.shape[-2:]
    fingerprint = tensor_fingerprint(name, classes, {"train": (train_x, train_y), "test": (test_x, test_y)})
    info = {"source": f"torchvision.datasets.{spec.cls}" if flat is None else "idx files in the data root",
            "root": str(root), "split": "official train/test"}
    return Dataset(name=name, train=TensorSource(train_x, train_y), test=TensorSource(test_x, test_y),
                   classes=classes, fingerprint=fingerprint, native_size=int(h) if h == w else None,
                   info=info)


def tensor_fingerprint(name: str, classes: list[str],
                       splits: dict[str, tuple[torch.Tensor, np.ndarray]]) -> str:
    """sha1 over the name, class names, shapes and every image and label byte of each split.

    ``splits[s] = (uint8 (N, 3, H, W), int64 (N,))``. Hashing all bytes costs well under a second for
    CIFAR-sized data and keeps feature caches honest if a file is ever replaced.
    """
    h = hashlib.sha1()
    header = {"name": name, "classes": classes, "shapes": {s: list(x.shape) for s, (x, _) in splits.items()}}
    h.update(json.dumps(header, sort_keys=True).encode())
    for split in sorted(splits):
        images, labels = splits[split]
        h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
        h.update(images.contiguous().numpy().data)
    return h.hexdigest()


def _how_to_get(name: str) -> str:
    entry = DATASETS.get(name)
    return entry.how_to_get if entry is not None else ""


def _has_files(spec: TorchvisionSpec, root: Path) -> bool:
    return all((root / f).is_file() for f in spec.files)


def _flat_idx_paths(spec: TorchvisionSpec, root: Path) -> list[Path] | None:
    """The four idx files directly in ``root`` (``.gz`` preferred), for the MNIST family; None if any is
    missing or the dataset is not an idx one."""
    if spec.files != _idx_files(spec.cls):
        return None
    paths = []
    for n in IDX_NAMES:
        found = [p for p in (root / f"{n}.gz", root / n) if p.is_file()]
        if not found:
            return None
        paths.append(found[0])
    return paths


def _read_idx(name: str, path: Path, ndim: int) -> np.ndarray:
    """An idx file of unsigned bytes (magic 0x0000 08 ndim, big-endian dimensions), gzipped or not."""
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        magic = struct.unpack(">i", data[:4])[0]
        if magic != 0x0800 + ndim:
            raise ValueError(f"magic number {magic:#x}, expected {0x0800 + ndim:#x}")
        dims = struct.unpack(f">{ndim}i", data[4:4 + 4 * ndim])
        body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if body.size != int(np.prod(dims)):
            raise ValueError(f"{body.size} bytes of data for dimensions {dims}")
    except (OSError, EOFError, ValueError, struct.error, gzip.BadGzipFile) as e:
        raise DatasetError(f"dataset {name!r}: {path} is not a readable idx file ({type(e).__name__}: {e}); "
                           f"replace it with the official release. {_how_to_get(name)}") from e
    return body.reshape(dims)


def _read_flat_idx(name: str, spec: TorchvisionSpec, root: Path,
                   paths: list[Path]) -> dict[str, tuple[torch.Tensor, np.ndarray, list[str]]]:
    """Both splits from the four flat idx files, shaped as :func:`_to_arrays` returns them."""
    import torchvision.datasets as tvd

    classes = list(getattr(tvd, spec.cls).classes)
    out = {}
    for split, (images_path, labels_path) in (("train", paths[:2]), ("test", paths[2:])):
        images, labels = _read_idx(name, images_path, 3), _read_idx(name, labels_path, 1).astype(np.int64)
        if len(images) != len(labels):
            raise DatasetError(f"dataset {name!r} under {root}: {len(images)} {split} images for {len(labels)} "
                               "labels; the files are not the official release")
        x = torch.from_numpy(images.copy()).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
        out[split] = x, labels, classes
    return out


def _check_files(name: str, spec: TorchvisionSpec, root: Path) -> None:
    """Fail early, naming the first expected file that is missing, before torchvision says 'not found'."""
    if not root.is_dir():
        raise DatasetError(f"data root {root} does not exist (or is not a folder); dataset {name!r} expects "
                           f"{root / spec.files[0]}. {_how_to_get(name)}")
    missing = [f for f in spec.files if not (root / f).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise DatasetError(f"dataset {name!r} not found: expected the file {root / missing[0]}{more}. "
                           f"{_how_to_get(name)}")


def _open(name: str, spec: TorchvisionSpec, root: Path, train: bool, download: bool) -> Any:
    """Instantiate the torchvision class, turning its errors into :class:`DatasetError`."""
    import torchvision.datasets as tvd

    kwargs: dict[str, Any] = ({"train": train} if spec.split_arg == "train"
                              else {"split": "train" if train else "test"})
    where = root / Path(spec.files[0]).parent
    try:
        return getattr(tvd, spec.cls)(str(root), download=download, **kwargs)
    except ImportError as e:  # SVHN reads .mat files with scipy, an optional dependency
        raise DatasetError(f"dataset {name!r} needs the package {e.name or 'scipy'}: pip install "
                           f"{e.name or 'scipy'}") from e
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted", failed downloads
        raise DatasetError(f"dataset {name!r} could not be loaded from {where}: {e}. The files must be the "
                           f"official release (torchvision checks their md5). {_how_to_get(name)}") from e
    except OSError as e:  # unreachable download URL, unreadable file
        action = "downloaded into" if download else "read from"
        raise DatasetError(f"dataset {name!r} could not be {action} {where}: {e}. {_how_to_get(name)}") from e
    except _FORMAT_ERRORS as e:
        raise DatasetError(f"dataset {name!r}: the files under {where} are malformed "
                           f"({type(e).__name__}: {e}); replace them with the official release. "
                           f"{_how_to_get(name)}") from e


def _to_arrays(name: str, spec: TorchvisionSpec, root: Path,
               ds: Any) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """``ds`` -> (uint8 ``(N, 3, H, W)``, int64 ``(N,)``, class names or [])."""
    data = ds.data if isinstance(ds.data, torch.Tensor) else torch.from_numpy(np.asarray(ds.data))
    expected_ndim = 3 if spec.layout == "NHW" else 4
    if data.ndim != expected_ndim:
        raise DatasetError(f"dataset {name!r} under {root}: images have shape {tuple(data.shape)}, expected "
                           f"{spec.layout}; the files are not the official release")
    if spec.layout == "NHW":
        data = data.unsqueeze(1).expand(-1, 3, -1, -1)
    elif spec.layout == "NHWC":
        data = data.permute(0, 3, 1, 2)
    targets = ds.targets if hasattr(ds, "targets") else ds.labels
    labels = np.asarray(targets.numpy() if isinstance(targets, torch.Tensor) else targets, dtype=np.int64)
    if data.shape[1] != 3 or len(labels) != len(data):
        raise DatasetError(f"dataset {name!r} under {root}: {tuple(data.shape)} images for {len(labels)} "
                           "labels; the files are not the official release")
    return data.to(torch.uint8).contiguous(), labels, list(getattr(ds, "classes", None) or [])
