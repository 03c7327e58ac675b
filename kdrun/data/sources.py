"""The dataset kinds read from files into memory: CIFAR, a .npz of arrays, Fashion-MNIST (the IDX
files, or the subset shipped with kdrun). Each is the ``_target_`` of its conf/dataset YAML."""

from __future__ import annotations

from dataclasses import dataclass

from kdrun.data.arrays import (
    Splits,
    find_fashion_mnist_files,
    load_cifar,
    load_fashion_mnist,
    load_fashion_mnist_mini,
    load_npz,
)
from kdrun.data.base import ArraySource
from kdrun.errors import DataError


@dataclass
class Cifar10(ArraySource):
    """torchvision's CIFAR-10 files under ``root``, downloaded there when missing and ``download``."""

    root: str | None
    download: bool
    path_fields = ("root",)
    free_fields = ("download",)
    torchvision_class = "CIFAR10"  # torchvision.datasets.<this> reads and fetches the files

    def __post_init__(self) -> None:
        self.location()
        super().__post_init__()

    def shape(self) -> tuple[int, int]:
        return 32, 3

    def load(self) -> Splits:
        return load_cifar(self.torchvision_class, self.location(), self.download, name=self.name)


@dataclass
class Cifar100(Cifar10):
    """torchvision's CIFAR-100 files under ``root``."""

    torchvision_class = "CIFAR100"


@dataclass
class Npz(ArraySource):
    """``x_train, y_train, x_test, y_test`` (uint8 images, integer labels; optionally ``class_names``)
    in the .npz file ``path``."""

    path: str | None
    path_fields = ("path",)
    path_example = "/path/to/file.npz"

    def __post_init__(self) -> None:
        self.location()
        super().__post_init__()

    def check(self) -> None:
        path = self.location()
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "no such file"
            raise DataError(f"dataset.path={path}: {what} (expected a .npz with x_train, y_train, x_test, y_test)")

    def load(self) -> Splits:
        return load_npz(self.location())


@dataclass
class FashionMnist(ArraySource):
    """The four Fashion-MNIST IDX files (``.gz`` or not) under ``root``."""

    root: str | None
    path_fields = ("root",)
    path_example = "/usr/share/datasets/fashion-mnist"

    def __post_init__(self) -> None:
        self.location()
        super().__post_init__()

    def shape(self) -> tuple[int, int]:
        return 28, 1

    def check(self) -> None:
        find_fashion_mnist_files(self.location())

    def load(self) -> Splits:
        return load_fashion_mnist(self.location())


@dataclass
class FashionMnistMini(ArraySource):
    """6,000 + 1,000 Fashion-MNIST images shipped with kdrun (kdrun/data/assets)."""

    def shape(self) -> tuple[int, int]:
        return 28, 1

    def load(self) -> Splits:
        return load_fashion_mnist_mini()
