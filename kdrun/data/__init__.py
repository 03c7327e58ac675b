"""Datasets for kdrun: config in, deterministic device-side batches out.

>>> from kdrun.data import build_data
>>> data = build_data({"name": "synthetic"}, batch_size=64)
>>> x, y = next(data.train_batches(epoch=0))   # x: float32 (64, 3, 32, 32), y: int64 (64,)

``cfg`` is the ``dataset`` section (``conf/dataset/<name>.yaml``, or a dict; keys left out
take the same defaults as the YAML files). ``DATASETS`` lists the valid names:

* ``cifar10`` / ``cifar100``: torchvision's files under ``root``.
* ``npz``: ``x_train, y_train, x_test, y_test`` uint8 arrays in the file ``path``.
* ``fashion_mnist``: the four IDX files under ``root``.
* ``fashion_mnist_mini``: 6,000 + 1,000 Fashion-MNIST images shipped with kdrun.
* ``imagefolder``: ``root/train/<class>/`` and ``root/val/<class>/`` images.
* ``synthetic``: generated on the fly, for tests.

All but ``imagefolder`` are held in memory on ``device`` as uint8 and augmented there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kdrun.data._config import DatasetConfig, to_plain_dict
from kdrun.data.arrays import (
    Splits,
    channel_stats,
    find_fashion_mnist_files,
    load_cifar,
    load_fashion_mnist,
    load_fashion_mnist_mini,
    load_npz,
    stratified_subset,
)
from kdrun.data.module import DataInfo, DataModule, InMemoryDataModule
from kdrun.data.synthetic import make_synthetic
from kdrun.errors import ConfigError, DataError, choices_text

DATASETS: list[str] = [
    "cifar10",
    "cifar100",
    "fashion_mnist",
    "fashion_mnist_mini",
    "imagefolder",
    "npz",
    "synthetic",
]

__all__ = ["DATASETS", "DataInfo", "DataModule", "build_data", "check_dataset_config"]


#: image size and channels of the datasets whose files fix them
FIXED_SHAPES = {"cifar10": (32, 3), "cifar100": (32, 3), "fashion_mnist": (28, 1), "fashion_mnist_mini": (28, 1)}


def check_dataset_config(cfg: Any) -> None:
    """Every check of the ``dataset`` section that reads no images: the name, unknown keys, each
    value's type and range, and that a required file or folder is there. The CLI calls it before
    Hydra makes a run dir, so these mistakes are one line in well under a second; what only the
    data can tell (labels, shapes) is checked when it is loaded.
    """
    raw = to_plain_dict(cfg)
    name = raw.get("name")
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; valid choices: {choices_text(DATASETS)}")
    spec = DatasetConfig(name, raw)
    pad = spec.int("augment.crop_padding", minimum=0)
    spec.bool("augment.hflip")
    for key in ("train_subset", "test_subset"):
        spec.optional_count(key)
    size, channels = FIXED_SHAPES.get(name, (None, None))
    if name == "synthetic":
        classes, n_train = spec.int("num_classes", minimum=2), spec.int("n_train", minimum=2)
        if n_train < classes:
            raise ConfigError(f"dataset.n_train={n_train} must be >= dataset.num_classes={classes}: every class "
                              "needs training images")
        spec.int("n_test", minimum=1)
        size, channels = spec.int("image_size", minimum=4), spec.int("channels", minimum=1)
        spec.int("seed", minimum=0)
    elif name == "imagefolder":
        size, channels = spec.int("image_size", minimum=1), 3
        spec.int("num_workers", minimum=0)
        root = spec.path("root", example="/path/to/folder (with train/ and val/ inside)")
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise DataError(f"dataset.root={root} has no {split}/ folder; dataset.root must hold train/ and "
                                "val/, each with one subdirectory of images per class")
    elif name == "npz":
        path = spec.path("path", example="/path/to/file.npz")
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "no such file"
            raise DataError(f"dataset.path={path}: {what} (expected a .npz with x_train, y_train, x_test, y_test)")
    elif name in ("cifar10", "cifar100"):
        spec.path("root", example="/path/to/data")
        spec.bool("download")
    elif name == "fashion_mnist":
        find_fashion_mnist_files(spec.path("root", example="/usr/share/datasets/fashion-mnist"))
    if size is not None and pad >= size:
        raise ConfigError(f"dataset.augment.crop_padding={pad} must be smaller than the {size}x{size} images")
    for key in ("mean", "std"):
        if channels is not None:
            spec.channel_floats(key, channels)


def build_data(
    cfg: Any,
    *,
    batch_size: int,
    eval_batch_size: int = 256,
    device: str | torch.device = "cpu",
    seed: int = 0,
    channels_last: bool = True,
    drop_last: bool = False,
) -> DataModule:
    """Load the dataset ``cfg`` describes and return its :class:`DataModule`.

    ``seed`` fixes the order and augmentation of every epoch (together with the epoch
    number). Raises :class:`~kdrun.errors.ConfigError` for a bad config and
    :class:`~kdrun.errors.DataError` for data that cannot be found or read.
    """
    raw = to_plain_dict(cfg)
    name = raw.get("name")
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; valid choices: {choices_text(DATASETS)}")
    for key, value, minimum in (
        ("batch_size", batch_size, 1),
        ("eval_batch_size", eval_batch_size, 1),
        ("seed", seed, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ConfigError(f"{key}={value!r} is invalid: expected an integer >= {minimum}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"device={device!r} is not a torch device (e.g. cpu, cuda, cuda:1)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but torch sees no CUDA device; use device=cpu")
    spec = DatasetConfig(name, raw)
    common = dict(
        batch_size=int(batch_size),
        eval_batch_size=int(eval_batch_size),
        seed=int(seed),
        channels_last=bool(channels_last),
        drop_last=bool(drop_last),
    )
    if name == "imagefolder":
        from kdrun.data.imagefolder import ImageFolderDataModule

        return ImageFolderDataModule(spec, device=device, **common)

    splits = _load_splits(spec)
    splits = _apply_subsets(spec, splits)
    height, width, channels = splits.x_train.shape[1:]
    pad = spec.int("augment.crop_padding", minimum=0)
    if pad >= min(height, width):
        raise ConfigError(
            f"dataset.augment.crop_padding={pad} must be smaller than the {height}x{width} images"
        )
    mean = spec.channel_floats("mean", channels)
    std = spec.channel_floats("std", channels)
    if mean is None or std is None:
        measured_mean, measured_std = channel_stats(splits.x_train)
        mean = mean or measured_mean
        std = std or measured_std
    info = DataInfo(
        name=name,
        num_classes=splits.num_classes,
        in_chans=channels,
        image_size=height if height == width else (height, width),
        n_train=len(splits.x_train),
        n_test=len(splits.x_test),
        mean=tuple(mean),
        std=tuple(std),
        class_names=splits.class_names,
        train_labels=torch.from_numpy(np.asarray(splits.y_train, dtype=np.int64).copy()),
    )
    return InMemoryDataModule(
        info,
        splits.x_train,
        splits.y_train,
        splits.x_test,
        splits.y_test,
        device=device,
        pad=pad,
        hflip=spec.bool("augment.hflip"),
        **common,
    )


def _load_splits(spec: DatasetConfig) -> Splits:
    name = spec.name
    if name in ("cifar10", "cifar100"):
        root = spec.path("root", example="/path/to/data")
        return load_cifar(name, root, spec.bool("download"))
    if name == "npz":
        return load_npz(spec.path("path", example="/path/to/file.npz"))
    if name == "fashion_mnist":
        return load_fashion_mnist(spec.path("root", example="/usr/share/datasets/fashion-mnist"))
    if name == "fashion_mnist_mini":
        return load_fashion_mnist_mini()
    if name == "synthetic":
        return make_synthetic(
            num_classes=spec.int("num_classes", minimum=2),
            n_train=spec.int("n_train", minimum=2),
            n_test=spec.int("n_test", minimum=1),
            image_size=spec.int("image_size", minimum=4),
            channels=spec.int("channels", minimum=1),
            seed=spec.int("seed", minimum=0),
        )
    raise AssertionError(name)  # pragma: no cover - guarded by DATASETS


def _apply_subsets(spec: DatasetConfig, splits: Splits) -> Splits:
    for split in ("train", "test"):
        key = f"{split}_subset"
        n = spec.optional_count(key)
        if n is None:
            continue
        x, y = getattr(splits, f"x_{split}"), getattr(splits, f"y_{split}")
        if n > len(y):
            raise ConfigError(
                f"dataset.{key}={n} exceeds the {len(y)} {split} images of {spec.name}; "
                f"use null or a number <= {len(y)}"
            )
        index = stratified_subset(y, n, splits.num_classes)
        setattr(splits, f"x_{split}", x[index])
        setattr(splits, f"y_{split}", y[index])
    return splits
