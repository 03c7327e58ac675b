"""What every dataset kind is: a dataclass whose fields are its YAML's keys.

``conf/dataset/<name>.yaml`` names a subclass of :class:`DataSource` in ``_target_`` and gives a
value for every field (the defaults live there, once). :func:`kdrun.data.dataset_source` types the
YAML against the class (Hydra's structured config: an unknown key or a value of the wrong type is
refused) and instantiates it; constructing a source checks ranges and reads no file,
:meth:`DataSource.check` looks for the files, :meth:`DataSource.data_module` loads.

A dataset held in memory subclasses :class:`ArraySource` and writes :meth:`ArraySource.load`
(uint8 images and int64 labels as :class:`~kdrun.data.arrays.Splits`); subsets, normalisation and
device-side augmentation come with it.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from kdrun.data.arrays import Splits, channel_stats, stratified_subset
from kdrun.data.module import DataInfo, DataModule, InMemoryDataModule
from kdrun.errors import ConfigError, DataError


@dataclass
class Augment:
    """Training-time augmentation, on the device: a random crop of the image zero-padded by
    ``crop_padding`` pixels per side, and a horizontal flip with probability 0.5 when ``hflip``."""

    crop_padding: int
    hflip: bool


@dataclass
class DataSource(abc.ABC):
    """One dataset kind. ``mean``/``std``: null (measured on the training images), one number for
    every channel or one per channel, in pixel / 255 units. ``train_subset``/``test_subset``: null
    or N, a class-balanced subset (the earliest images of each class)."""

    name: str
    augment: Augment
    mean: Any
    std: Any
    train_subset: int | None
    test_subset: int | None

    #: fields that name a file or folder: absolute in :meth:`identity`
    path_fields: ClassVar[tuple[str, ...]] = ()
    #: fields that cannot change the data (whether to download it): left out of :meth:`identity`
    free_fields: ClassVar[tuple[str, ...]] = ()
    #: an example value of the first of :attr:`path_fields`, shown when it is not set
    path_example: ClassVar[str] = "/path/to/data"

    def location(self) -> Path:
        """The file or folder the data lives in (the first of :attr:`path_fields`), which must be set:
        null or blank is a DataError showing how to set it (:func:`required_path`)."""
        return required_path(self, self.path_fields[0], self.path_example)

    def identity(self) -> dict:
        """What determines the data, as plain values (part of a stored model's recipe): every field,
        paths made absolute, :attr:`free_fields` left out."""
        out = {"kind": f"{type(self).__module__}.{type(self).__qualname__}", **dataclasses.asdict(self)}
        for key in self.free_fields:
            out.pop(key, None)
        for key in self.path_fields:
            if out.get(key):
                out[key] = str(Path(str(out[key])).expanduser().resolve())
        return out

    def __post_init__(self) -> None:
        at_least(self, "augment.crop_padding", self.augment.crop_padding, 0)
        for key in ("train_subset", "test_subset"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"dataset.{key}={value!r} is invalid: expected null or a positive integer")
        shape = self.shape()
        if shape is not None:
            size, channels = shape
            check_padding(self.augment.crop_padding, size, size)
            channel_floats(self, "mean", channels)
            channel_floats(self, "std", channels)

    def shape(self) -> tuple[int, int] | None:
        """(image side, channels) where the config fixes them (checked before loading), else None."""
        return None

    def check(self) -> None:
        """Look for the files the source reads (cheap, nothing is read): a DataError naming the key."""

    @abc.abstractmethod
    def data_module(self, *, device: torch.device, batch_size: int, eval_batch_size: int, seed: int,
                    channels_last: bool, drop_last: bool) -> DataModule:
        """Load the data and return its DataModule."""


class ArraySource(DataSource):
    """A dataset loaded whole into memory and augmented on the device (InMemoryDataModule)."""

    @abc.abstractmethod
    def load(self) -> Splits:
        """Both splits as uint8 (N, H, W, C) images and int64 labels 0..K-1."""

    def data_module(self, *, device: torch.device, **batching) -> DataModule:
        splits = self._subsets(self.load())
        height, width, channels = splits.x_train.shape[1:]
        pad = self.augment.crop_padding
        check_padding(pad, height, width)
        mean, std = channel_floats(self, "mean", channels), channel_floats(self, "std", channels)
        if mean is None or std is None:
            measured_mean, measured_std = channel_stats(splits.x_train)
            mean, std = mean or measured_mean, std or measured_std
        info = DataInfo(
            name=self.name, num_classes=splits.num_classes, in_chans=channels,
            image_size=height if height == width else (height, width),
            n_train=len(splits.x_train), n_test=len(splits.x_test), mean=tuple(mean), std=tuple(std),
            class_names=splits.class_names,
            train_labels=torch.from_numpy(np.asarray(splits.y_train, dtype=np.int64).copy()),
        )
        return InMemoryDataModule(info, splits.x_train, splits.y_train, splits.x_test, splits.y_test,
                                  device=device, pad=pad, hflip=self.augment.hflip, **batching)

    def _subsets(self, splits: Splits) -> Splits:
        for split in ("train", "test"):
            key = f"{split}_subset"
            n = getattr(self, key)
            if n is None:
                continue
            x, y = getattr(splits, f"x_{split}"), getattr(splits, f"y_{split}")
            if n > len(y):
                raise ConfigError(f"dataset.{key}={n} exceeds the {len(y)} {split} images of {self.name}; "
                                  f"use null or a number <= {len(y)}")
            index = stratified_subset(y, n, splits.num_classes)
            setattr(splits, f"x_{split}", x[index])
            setattr(splits, f"y_{split}", y[index])
        return splits


# ------------------------------------------------------------------ checks the kinds share
def at_least(source: DataSource, key: str, value: int, minimum: int) -> int:
    """``value`` (an integer: the config is typed) must be >= ``minimum``."""
    if value < minimum:
        raise ConfigError(f"dataset.{key}={value!r} is invalid: expected an integer >= {minimum}")
    return value


def check_padding(pad: int, height: int, width: int) -> None:
    if pad >= min(height, width):
        raise ConfigError(f"dataset.augment.crop_padding={pad} must be smaller than the {height}x{width} images")


def required_path(source: DataSource, key: str, example: str) -> Path:
    """A path field that must be set; null or blank is a DataError showing how to set it."""
    value = getattr(source, key)
    if value is None or not str(value).strip():
        raise DataError(f"dataset={source.name} needs a path: set dataset.{key}={example}")
    return Path(str(value)).expanduser()


def channel_floats(source: DataSource, key: str, channels: int) -> tuple[float, ...] | None:
    """``mean``/``std``: null, one number (for every channel) or ``channels`` numbers; a std > 0."""
    value = getattr(source, key)
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        floats = tuple(float(v) for v in items if not isinstance(v, bool))
    except (TypeError, ValueError):
        floats = ()
    if len(floats) != len(items) or len(floats) not in (1, channels):
        raise ConfigError(f"dataset.{key}={value!r} is invalid: expected null, one number or "
                          f"{channels} numbers (one per channel)")
    if len(floats) == 1:
        floats = floats * channels
    if key == "std" and min(floats) <= 0:
        raise ConfigError(f"dataset.std={value!r} is invalid: every std must be > 0")
    return floats
