"""Image data as the harness sees it: splits of labelled images and the preprocessing that feeds a model.

A dataset adapter (in ``fcl_bench.datasets``) returns a :class:`Dataset` with a ``train`` and a ``test``
:class:`ImageSource`. Sources only know how to turn indices into normalised model inputs; which indices a
client may touch is decided by the scenario and enforced by :class:`ClientData`.

Two kinds of source cover every dataset:

* :class:`TensorSource` keeps small datasets in memory as one ``uint8`` tensor ``(N, 3, H, W)``; a batch is
  indexed, moved to the device, resized (if the model's input size differs) and normalised there.
* :class:`FileSource` decodes image files on demand (ImageFolder trees such as ImageNet-R), resizing the
  shorter side to ``input_size / crop_pct`` and centre-cropping, as timm's eval transform does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Preprocess:
    """How raw images become model inputs, taken from the foundation model's pretrained config."""

    input_size: int
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    crop_pct: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self) -> str:
        """A short stable identifier, used in feature-cache keys."""
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: float ``(B, 3, H, W)`` in [0, 1] -> resized to ``input_size`` and normalised."""
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            mode = self.interpolation if self.interpolation in ("bilinear", "bicubic") else "bilinear"
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode=mode,
                              align_corners=False, antialias=True).clamp_(0, 1)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std


class ImageSource:
    """One split of a dataset: ``labels`` (int64 ``(N,)``) and a way to load normalised images."""

    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices: np.ndarray | torch.Tensor, pre: Preprocess,
             device: torch.device | str = "cpu") -> torch.Tensor:
        """Return float32 ``(n, 3, S, S)`` normalised images for ``indices`` on ``device``."""
        raise NotImplementedError


class TensorSource(ImageSource):
    """Images held in memory as ``uint8 (N, 3, H, W)``."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"TensorSource needs uint8 (N, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)

    def load(self, indices, pre, device="cpu"):
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        x = self.images[idx].to(device, non_blocking=True).float().div_(255.0)
        return pre.normalise(x)


class FileSource(ImageSource):
    """Images decoded from files on demand (PIL), resized and centre-cropped like timm's eval transform."""

    def __init__(self, paths: Sequence[str | Path], labels: np.ndarray):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)

    def _decode(self, path: str, pre: Preprocess) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        interp = InterpolationMode.BICUBIC if pre.interpolation == "bicubic" else InterpolationMode.BILINEAR
        with Image.open(path) as im:
            im = im.convert("RGB")
            im = TF.resize(im, int(round(pre.input_size / pre.crop_pct)), interpolation=interp)
            im = TF.center_crop(im, [pre.input_size, pre.input_size])
            return TF.pil_to_tensor(im)

    def load(self, indices, pre, device="cpu"):
        idx = np.asarray(indices).reshape(-1)
        x = torch.stack([self._decode(self.paths[i], pre) for i in idx]).to(device).float().div_(255.0)
        return pre.normalise(x)


@dataclass
class Dataset:
    """A classification dataset: two splits, class names and a content fingerprint.

    ``pretrain`` is set only by datasets that ship extra classes for pretraining a foundation model
    (the synthetic dataset); those classes never appear in the FCL protocol.
    """

    name: str
    train: ImageSource
    test: ImageSource
    classes: list[str]
    fingerprint: str
    native_size: int | None = None
    pretrain: Dataset | None = None
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class Batch:
    """A batch handed to a method: global dataset ``index`` (for feature caches), labels ``y``, and
    normalised images ``x`` loaded lazily on first access (a method that reads only cached features never
    pays for them)."""

    index: torch.Tensor
    y: torch.Tensor
    split: str
    _source: ImageSource
    _pre: Preprocess
    _device: torch.device
    _x: torch.Tensor | None = None

    @property
    def x(self) -> torch.Tensor:
        if self._x is None:
            self._x = self._source.load(self.index.cpu().numpy(), self._pre, self._device)
        return self._x

    def __len__(self) -> int:
        return len(self.index)


class ClientData:
    """The samples one client may see for one task (or its test set): nothing else is reachable."""

    def __init__(self, source: ImageSource, indices: np.ndarray, split: str, pre: Preprocess,
                 device: torch.device | str):
        self._source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = source.labels[self.indices]
        self.split = split
        self._pre = pre
        self._device = torch.device(device)

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, positions: np.ndarray) -> Batch:
        """A batch of the samples at ``positions`` (0..len-1) of this view."""
        idx = self.indices[positions]
        return Batch(index=torch.as_tensor(idx), y=torch.as_tensor(self.labels[positions], device=self._device),
                     split=self.split, _source=self._source, _pre=self._pre, _device=self._device)

    def batches(self, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[Batch]:
        """Iterate over the view in batches; shuffling uses ``generator`` (seeded per client).

        A trailing batch of one sample is folded into the previous one (which then holds ``batch_size + 1``):
        BatchNorm in train mode cannot normalise a batch of one, and since a prediction never depends on
        the rest of its batch, evaluation is unchanged. So with ``batch_size > 1`` only a view of one sample
        in all yields a batch of one (training helpers then run BatchNorm in eval mode, see
        :func:`fcl_bench.nn.training.single_sample_guard`).
        """
        n = len(self)
        order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)
        starts = list(range(0, n, batch_size))
        if batch_size > 1 and len(starts) > 1 and n - starts[-1] == 1:
            starts.pop()
        for start, end in zip(starts, [*starts[1:], n]):
            yield self.batch(order[start:end])

    def subset(self, positions: np.ndarray) -> ClientData:
        """A view on some of this view's samples (e.g. a replay buffer)."""
        return ClientData(self._source, self.indices[np.asarray(positions, dtype=np.int64)], self.split,
                          self._pre, self._device)


class SubsetSource(ImageSource):
    """The samples ``indices`` of another source, re-indexed 0..len-1."""

    def __init__(self, parent: ImageSource, indices: np.ndarray):
        self.parent = parent
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = parent.labels[self.indices]

    def load(self, indices, pre, device="cpu"):
        return self.parent.load(self.indices[np.asarray(indices).reshape(-1)], pre, device)


def _cap(labels: np.ndarray, per_class: int | None, rng: np.random.Generator) -> np.ndarray | None:
    if per_class is None:
        return None
    keep = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def cap_per_class(ds: Dataset, train_per_class: int | None, test_per_class: int | None, seed: int = 0) -> Dataset:
    """At most ``*_per_class`` samples of each class per split (a seeded choice); None keeps all.
    The fingerprint changes with the caps, so caches never mix capped and full data."""
    if train_per_class is None and test_per_class is None:
        return ds
    rng = np.random.default_rng(seed)
    tr = _cap(ds.train.labels, train_per_class, rng)
    te = _cap(ds.test.labels, test_per_class, rng)
    fp = hashlib.sha1(f"{ds.fingerprint}|cap{train_per_class},{test_per_class},{seed}".encode()).hexdigest()[:16]
    return Dataset(name=ds.name, train=ds.train if tr is None else SubsetSource(ds.train, tr),
                   test=ds.test if te is None else SubsetSource(ds.test, te), classes=ds.classes,
                   fingerprint=fp, native_size=ds.native_size, pretrain=ds.pretrain,
                   info={**ds.info, "train_per_class": train_per_class, "test_per_class": test_per_class})


def concat_views(views: Sequence[ClientData]) -> ClientData:
    """One view over the samples of several views of the same source and split (e.g. a replay buffer
    gathered over tasks). A client can only combine views it was given."""
    if not views:
        raise ValueError("concat_views needs at least one view")
    first = views[0]
    for v in views[1:]:
        if v._source is not first._source or v.split != first.split:
            raise ValueError("concat_views: views come from different sources or splits")
    idx = np.concatenate([v.indices for v in views])
    return ClientData(first._source, idx, first.split, first._pre, first._device)
