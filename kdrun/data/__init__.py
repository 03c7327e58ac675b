"""Datasets for kdrun: config in, deterministic device-side batches out.

>>> from kdrun.config import compose
>>> from kdrun.data import build_data
>>> data = build_data(compose(["dataset=synthetic"]).dataset, batch_size=64)
>>> x, y = next(data.train_batches(epoch=0))   # x: float32 (64, 3, 32, 32), y: int64 (64,)

The ``dataset`` section (``conf/dataset/<name>.yaml``) names its kind in ``_target_``: a
:class:`DataSource` dataclass whose fields are the YAML's keys. The YAML holds every default; the
class types them (Hydra's structured config), checks their ranges and owns the loading:

* :class:`Cifar10` / :class:`Cifar100`: torchvision's files under ``root``.
* :class:`Npz`: ``x_train, y_train, x_test, y_test`` uint8 arrays in the file ``path``.
* :class:`FashionMnist`: the four IDX files under ``root``.
* :class:`FashionMnistMini`: 6,000 + 1,000 Fashion-MNIST images shipped with kdrun.
* :class:`ImageFolder`: ``root/train/<class>/`` and ``root/val/<class>/`` images.
* :class:`Synthetic`: generated on the fly, for tests.

A dataset of your own is a subclass (an :class:`ArraySource` writes ``load() -> Splits``) and
one YAML in a config dir of ``hydra.searchpath``. All but image folders are held in memory on
``device`` as uint8 and augmented there.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from kdrun.data.arrays import Splits
from kdrun.data.base import ArraySource, Augment, DataSource
from kdrun.data.imagefolder import ImageFolder
from kdrun.data.module import DataInfo, DataModule
from kdrun.data.sources import Cifar10, Cifar100, FashionMnist, FashionMnistMini, Npz
from kdrun.data.synthetic import Synthetic
from kdrun.errors import ConfigError, choices_text

__all__ = [
    "ArraySource", "Augment", "Cifar10", "Cifar100", "DataInfo", "DataModule", "DataSource", "FashionMnist",
    "FashionMnistMini", "ImageFolder", "Npz", "Splits", "Synthetic", "build_data", "check_dataset_config",
    "dataset_source",
]


def dataset_source(cfg: Any) -> DataSource:
    """The ``dataset`` section (a DictConfig or a mapping with ``_target_``) as its source object:
    typed against the ``_target_`` dataclass (an unknown key or a value of the wrong type is one
    ConfigError line), then built at kdrun's instantiate site; the class checks the ranges.
    Nothing is read from disk."""
    from kdrun.config import instantiate

    plain = _plain(cfg)
    target = plain.get("_target_")
    if not target:
        raise ConfigError("the dataset config has no _target_: give the dataset class, e.g. "
                          "_target_: kdrun.data.Synthetic (see conf/dataset/*.yaml)")
    schema = _locate(str(target))
    node = _typed(schema, plain) if dataclasses.is_dataclass(schema) else OmegaConf.create(plain)
    source = instantiate(node, _convert_="object")
    if not isinstance(source, DataSource):
        raise ConfigError(f"dataset._target_={target} gave a {type(source).__name__}, not a kdrun.data.DataSource "
                          "(subclass kdrun.data.ArraySource and write load())")
    return source


def check_dataset_config(cfg: Any) -> None:
    """Every check of the ``dataset`` section that reads no images: keys and types, ranges, and that
    a required file or folder is there. The CLI calls it before Hydra makes a run dir, so these
    mistakes are one line in well under a second; what only the data tells (labels, shapes) is
    checked when it is loaded."""
    dataset_source(cfg).check()


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
    """Load the dataset ``cfg`` describes (a config section, or a :class:`DataSource`) and return
    its :class:`DataModule`.

    ``seed`` fixes the order and augmentation of every epoch (together with the epoch number).
    Raises :class:`~kdrun.errors.ConfigError` for a bad config and
    :class:`~kdrun.errors.DataError` for data that cannot be found or read.
    """
    source = cfg if isinstance(cfg, DataSource) else dataset_source(cfg)
    for key, value, minimum in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ConfigError(f"{key}={value!r} is invalid: expected an integer >= {minimum}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but torch sees no CUDA device; use device=cpu")
    source.check()
    return source.data_module(device=device, batch_size=int(batch_size), eval_batch_size=int(eval_batch_size),
                              seed=int(seed), channels_last=bool(channels_last), drop_last=bool(drop_last))


# ------------------------------------------------------------------ typing the section (Hydra's structured config)
def _plain(cfg: Any) -> dict[str, Any]:
    """A DictConfig (interpolations resolved) or a mapping as a plain dict."""
    if isinstance(cfg, DictConfig):
        try:
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
        except OmegaConfBaseException as exc:  # an interpolation that cannot be resolved
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"cannot resolve the dataset config: {message}") from None
    if isinstance(cfg, Mapping):
        return copy.deepcopy(dict(cfg))
    raise ConfigError(f"the dataset config must be a mapping with a _target_, got {type(cfg).__name__}")


def _locate(target: str) -> Any:
    from hydra.utils import get_object

    try:
        return get_object(target)
    except Exception as exc:  # noqa: BLE001 - an import error of any kind
        reason = " ".join(str(exc).split())[:200]
        raise ConfigError(f"dataset._target_={target} cannot be imported ({reason}); give a dataset class "
                          "such as kdrun.data.Synthetic") from None


def _typed(schema: type, plain: dict[str, Any]) -> DictConfig:
    """``plain`` merged into the structured config of ``schema``, with its ``_target_`` (and other
    ``_x_`` keys) kept for instantiate."""
    special = {k: v for k, v in plain.items() if k.startswith("_") and k.endswith("_")}
    body = {k: v for k, v in plain.items() if k not in special}
    name = body.get("name", "?")
    try:
        node = OmegaConf.merge(OmegaConf.structured(schema), body)
    except ConfigKeyError as exc:
        key = str(exc.full_key)
        parent = key.rpartition(".")[0]
        valid = [f.name for f in dataclasses.fields(_field_type(schema, parent) if parent else schema)]
        raise ConfigError(f"unknown key dataset.{key} for dataset={name}; valid keys: "
                          f"{choices_text(valid)}") from None
    except ValidationError as exc:
        key = str(exc.full_key)
        value = _lookup(body, key)
        raise ConfigError(f"dataset.{key}={value!r} is invalid: expected {_expected(schema, key)}") from None
    missing = sorted(OmegaConf.missing_keys(node))
    if missing:
        raise ConfigError(f"dataset.{missing[0]} has no value for dataset={name}; set it with "
                          f"dataset.{missing[0]}=VALUE (or in the dataset's YAML)")
    OmegaConf.set_struct(node, False)
    for key, value in special.items():
        node[key] = value
    return node


def _lookup(body: dict[str, Any], key: str) -> Any:
    node: Any = body
    for part in key.replace("[", ".").replace("]", "").split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _field_type(schema: type, key: str) -> Any:
    """The annotation of field ``key`` (dotted) of ``schema``; None where there is none."""
    hint: Any = schema
    for part in key.split("."):
        hints = typing.get_type_hints(hint) if dataclasses.is_dataclass(hint) else {}
        if part not in hints:
            return None
        hint = hints[part]
    return hint


WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a text (a name or a path)"}


def _expected(schema: type, key: str) -> str:
    hint = _field_type(schema, key.split("[")[0])
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    what = WORDS.get(base) or (f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(base))}"
                               if dataclasses.is_dataclass(base) else "a value of another type")
    return f"null or {what}" if optional else what
