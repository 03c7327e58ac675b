"""Reading and checking the ``dataset`` config section.

Every dataset has a table of defaults here that mirrors its ``conf/dataset/<name>.yaml``
(a test keeps the two in step). A plain dict with only ``name`` set therefore works, and a
key that the dataset does not know is an error rather than silently ignored: a typo such as
``dataset.augment.crop_pading=0`` should not train with the default padding.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdrun.errors import ConfigError, DataError, choices_text

# Published per-channel statistics of the training sets (pixel values scaled to [0, 1]).
CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2470, 0.2435, 0.2616]
CIFAR100_MEAN = [0.5071, 0.4865, 0.4409]
CIFAR100_STD = [0.2673, 0.2564, 0.2762]
FASHION_MNIST_MEAN = [0.2860]
FASHION_MNIST_STD = [0.3530]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"


def _default_data_root() -> str:
    return os.environ.get("KDRUN_DATA", "./data")


def _common(crop_padding: int, hflip: bool, mean, std) -> dict[str, Any]:
    return {
        "augment": {"crop_padding": crop_padding, "hflip": hflip},
        "mean": mean,
        "std": std,
        "train_subset": None,
        "test_subset": None,
    }


def dataset_defaults(name: str) -> dict[str, Any]:
    """The default value of every key of dataset ``name`` (``name`` itself excluded)."""
    if name in ("cifar10", "cifar100"):
        mean, std = (
            (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
        )
        return {"root": _default_data_root(), "download": True, **_common(4, True, mean, std)}
    if name == "npz":
        return {"path": None, **_common(4, True, None, None)}
    if name == "fashion_mnist":
        return {
            "root": FASHION_MNIST_ROOT,
            **_common(2, True, FASHION_MNIST_MEAN, FASHION_MNIST_STD),
        }
    if name == "fashion_mnist_mini":
        return _common(2, True, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    if name == "imagefolder":
        return {"root": None, "image_size": 32, "num_workers": 2, **_common(4, True, None, None)}
    if name == "synthetic":
        return {
            "num_classes": 10,
            "n_train": 2000,
            "n_test": 500,
            "image_size": 32,
            "channels": 3,
            "seed": 0,
            **_common(4, True, None, None),
        }
    raise KeyError(name)


def to_plain_dict(cfg: Any) -> dict[str, Any]:
    """Turn a DictConfig (interpolations resolved) or a mapping into a plain, private dict."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        DictConfig = ()  # type: ignore[assignment]
    if isinstance(cfg, DictConfig):
        try:
            plain = OmegaConf.to_container(cfg, resolve=True)
        except Exception as exc:  # an interpolation that cannot be resolved
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"cannot resolve the dataset config: {message}") from None
        return plain  # type: ignore[return-value]
    if isinstance(cfg, Mapping):
        return copy.deepcopy(dict(cfg))
    raise ConfigError(
        f"the dataset config must be a mapping with a 'name' key, got {type(cfg).__name__}"
    )


class DatasetConfig:
    """The ``dataset`` section of one dataset: defaults merged in, values checked on access.

    Error messages name the full key as it is written on the command line, for example
    ``dataset.augment.crop_padding=-1``.
    """

    def __init__(self, name: str, raw: Mapping[str, Any]):
        self.name = name
        defaults = dataset_defaults(name)
        values = dict(raw)
        values.pop("name", None)
        unknown = sorted(set(values) - set(defaults))
        if unknown:
            raise ConfigError(
                f"unknown key dataset.{unknown[0]} for dataset={name}; "
                f"valid keys: {choices_text(['name', *defaults])}"
            )
        merged = {**defaults, **values}
        augment = merged.get("augment")
        if augment is None:
            augment = {}
        if not isinstance(augment, Mapping):
            raise ConfigError(
                f"dataset.augment={augment!r} must be a mapping with keys crop_padding, hflip"
            )
        unknown = sorted(set(augment) - {"crop_padding", "hflip"})
        if unknown:
            raise ConfigError(
                f"unknown key dataset.augment.{unknown[0]}; valid keys: crop_padding, hflip"
            )
        merged["augment"] = {**defaults["augment"], **augment}
        self._values = merged

    # ------------------------------------------------------------------ typed getters
    def raw(self, key: str) -> Any:
        node: Any = self._values
        for part in key.split("."):
            node = node[part]
        return node

    def int(self, key: str, *, minimum: int = 0) -> int:
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(
                f"dataset.{key}={value!r} is invalid: expected an integer >= {minimum}"
            )
        return value

    def bool(self, key: str) -> bool:
        value = self.raw(key)
        if not isinstance(value, bool):
            raise ConfigError(f"dataset.{key}={value!r} is invalid: expected true or false")
        return value

    def optional_count(self, key: str) -> int | None:
        """``null`` or a positive integer (used by ``train_subset`` / ``test_subset``)."""
        value = self.raw(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(
                f"dataset.{key}={value!r} is invalid: expected null or a positive integer"
            )
        return value

    def path(self, key: str, *, example: str) -> Path:
        """A required path; ``null`` or ``???`` gives a DataError that shows how to set it."""
        value = self.raw(key)
        if value is None or value == "???" or (isinstance(value, str) and not value.strip()):
            raise DataError(f"dataset={self.name} needs a path: set dataset.{key}={example}")
        if not isinstance(value, (str, os.PathLike)):
            raise ConfigError(f"dataset.{key}={value!r} is invalid: expected a path")
        return Path(value).expanduser()

    def channel_floats(self, key: str, channels: int) -> tuple[float, ...] | None:
        """``null``, one number (used for every channel) or one number per channel."""
        value = self.raw(key)
        if value is None:
            return None
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        try:
            floats = tuple(float(v) for v in items if not isinstance(v, bool))
        except (TypeError, ValueError):
            floats = ()
        if len(floats) != len(items) or len(floats) not in (1, channels):
            raise ConfigError(
                f"dataset.{key}={value!r} is invalid: expected null, one number or "
                f"{channels} numbers (one per channel)"
            )
        if len(floats) == 1:
            floats = floats * channels
        if key == "std" and min(floats) <= 0:
            raise ConfigError(f"dataset.std={value!r} is invalid: every std must be > 0")
        return floats
