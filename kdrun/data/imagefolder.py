"""Image folders (``root/train/<class>/*.png``, ``root/val/<class>/*``) read by a DataLoader.

Workers only decode, resize (shorter side to ``image_size``) and centre-crop to a square
uint8 image. The random crop and flip then happen on the device with the same code, and
the same per-epoch plan, as the in-memory datasets: the DataLoader's batch sampler is the
plan's permutation, so batches are a function of ``(seed, epoch)`` whatever the number of
workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from kdrun.data.arrays import stratified_subset
from kdrun.data.augment import BatchAugmenter, ImageStore
from kdrun.data.base import (
    DataSource,
    at_least,
    channel_floats,
    check_padding,
)
from kdrun.data.module import Batch, DataInfo, DataModule
from kdrun.errors import ConfigError, DataError

STATS_IMAGES = 2000  # mean/std are estimated from at most this many training images


def _folder(root: Path, split: str, image_size: int):
    from torchvision import datasets, transforms

    path = root / split
    if not path.is_dir():
        raise DataError(
            f"dataset.root={root} has no {split}/ folder; dataset.root must hold train/ and val/, "
            f"each with one subdirectory of images per class"
        )
    transform = transforms.Compose(
        [
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.PILToTensor(),
        ]
    )
    try:
        return datasets.ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"image folder {path}: {' '.join(str(exc).split())}") from None


def _subset(dataset, n: int | None, key: str, num_classes: int):
    if n is None:
        return dataset, np.asarray(dataset.targets)
    targets = np.asarray(dataset.targets)
    if n > len(targets):
        raise ConfigError(
            f"dataset.{key}={n} exceeds the {len(targets)} images of the split; "
            f"use null or a number <= {len(targets)}"
        )
    index = stratified_subset(targets, n, num_classes)
    return Subset(dataset, index.tolist()), targets[index]


def _collate(items):
    images = torch.stack([image for image, _ in items])
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    return images, labels


def _estimate_stats(dataset: Dataset, num_workers: int):
    """Per-channel mean/std (pixel / 255 units) from up to STATS_IMAGES evenly spaced images."""
    n = len(dataset)
    picks = np.unique(np.linspace(0, n - 1, min(n, STATS_IMAGES)).round().astype(int))
    loader = DataLoader(
        Subset(dataset, picks.tolist()),
        batch_size=256,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    total = None
    for images, _ in loader:
        flat = images.permute(1, 0, 2, 3).reshape(images.shape[1], -1).to(torch.float64) / 255.0
        part = torch.stack(
            [flat.sum(1), (flat**2).sum(1), torch.full_like(flat[:, 0], flat.shape[1])]
        )
        total = part if total is None else total + part
    mean = total[0] / total[2]
    std = (total[1] / total[2] - mean**2).clamp_min(0).sqrt()
    std[std < 1e-6] = 1.0
    return tuple(mean.tolist()), tuple(std.tolist())


ROOT_EXAMPLE = "/path/to/folder (with train/ and val/ inside)"


@dataclass
class ImageFolder(DataSource):
    """Images in ``root/train/<class>/`` and ``root/val/<class>/``, resized (shorter side) and
    centre-cropped to ``image_size`` by ``num_workers`` DataLoader workers."""

    root: str | None
    path_fields = ("root",)
    path_example = ROOT_EXAMPLE
    free_fields = ("num_workers",)
    image_size: int
    num_workers: int

    def __post_init__(self) -> None:
        at_least(self, "image_size", self.image_size, 1)
        at_least(self, "num_workers", self.num_workers, 0)
        self.location()
        super().__post_init__()

    def shape(self) -> tuple[int, int]:
        return self.image_size, 3

    def check(self) -> None:
        root = self.location()
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise DataError(f"dataset.root={root} has no {split}/ folder; dataset.root must hold train/ and "
                                "val/, each with one subdirectory of images per class")

    def data_module(self, *, device: torch.device, **batching) -> DataModule:
        return ImageFolderDataModule(self, device=device, **batching)


class ImageFolderDataModule(DataModule):
    """Batches from image folders via a DataLoader, augmented on the device."""

    def __init__(self, source: ImageFolder, *, device: torch.device, **kwargs):
        root = source.location()
        image_size = source.image_size
        self.num_workers = source.num_workers
        pad = source.augment.crop_padding
        train_set = _folder(root, "train", image_size)
        test_set = _folder(root, "val", image_size)
        if test_set.classes != train_set.classes:
            raise DataError(
                f"image folder {root}: val/ classes {test_set.classes} differ from train/ "
                f"classes {train_set.classes}; both need the same class subdirectories"
            )
        class_names = tuple(train_set.classes)
        num_classes = len(class_names)
        train_set, train_labels = _subset(train_set, source.train_subset, "train_subset", num_classes)
        test_set, _ = _subset(test_set, source.test_subset, "test_subset", num_classes)
        mean = channel_floats(source, "mean", 3)
        std = channel_floats(source, "std", 3)
        if mean is None or std is None:
            measured_mean, measured_std = _estimate_stats(train_set, self.num_workers)
            mean = mean or measured_mean
            std = std or measured_std
        info = DataInfo(
            name=source.name,
            num_classes=num_classes,
            in_chans=3,
            image_size=image_size,
            n_train=len(train_set),
            n_test=len(test_set),
            mean=tuple(mean),
            std=tuple(std),
            class_names=class_names,
            train_labels=torch.from_numpy(np.asarray(train_labels, dtype=np.int64).copy()),
        )
        check_padding(pad, image_size, image_size)
        super().__init__(info, device=device, pad=pad, hflip=source.augment.hflip, **kwargs)
        self._train_set, self._test_set = train_set, test_set
        self._augment = BatchAugmenter(image_size, image_size, pad, mean, std, device)

    def _loader(self, dataset, **batching) -> DataLoader:
        return DataLoader(
            dataset,
            num_workers=self.num_workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            **batching,
        )

    def train_batches(self, epoch: int, with_index: bool = False) -> Iterator[Batch]:
        plan = self._plan(epoch)
        return self._train_iter(plan, with_index)

    def _train_iter(self, plan, with_index: bool) -> Iterator[Batch]:
        order = plan.order.tolist()
        batches = [order[start:stop] for start, stop in plan.bounds]
        device = self.device
        dy, dx, flip = plan.dy.to(device), plan.dx.to(device), plan.flip.to(device)
        loader = self._loader(self._train_set, batch_sampler=batches)
        for (start, stop), n_flip, (images, labels) in zip(
            plan.bounds, plan.n_flip, loader, strict=True
        ):
            store = ImageStore(images.to(device, non_blocking=True).permute(0, 2, 3, 1), self.pad)
            index = torch.arange(stop - start, device=device)
            placement = self._augment.place(
                store, index, dy[start:stop], dx[start:stop], flip[start:stop]
            )
            x = self._augment.batch(store, placement, 0, stop - start, n_flip, self.channels_last)
            y = labels.to(device, non_blocking=True)
            yield (x, y, plan.order[start:stop].to(device)) if with_index else (x, y)

    def eval_batches(self) -> Iterator[Batch]:
        loader = self._loader(self._test_set, batch_size=self.eval_batch_size)
        for images, labels in loader:
            nhwc = images.to(self.device, non_blocking=True).permute(0, 2, 3, 1).contiguous()
            yield (
                self._augment.normalize(nhwc, None, self.channels_last),
                labels.to(self.device, non_blocking=True),
            )
