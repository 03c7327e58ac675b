"""The zoo: every CIFAR network of kdrun, registered in timm's model registry as ``cifar_<name>``.

timm's registry is the one place a zoo network is looked up (for example
``timm.create_model("cifar_resnet20", num_classes=10)``); the prefix keeps ``cifar_resnet50``
apart from timm's ImageNet ``resnet50``.  These entries have no pretrained weights and never
download anything.  A network of a family module joins the zoo by being in that module's
``*_builders()``; its config is one ``conf/model/<name>.yaml``.
"""

from __future__ import annotations

from typing import Callable

import timm
from timm.models import register_model

from kdrun.errors import ConfigError
from kdrun.models.base import Builder, ZooModel
from kdrun.models.mobilenetv2 import mobilenetv2_builders
from kdrun.models.resnet import resnet_builders
from kdrun.models.shufflenet import shufflenet_builders
from kdrun.models.vgg import vgg_builders
from kdrun.models.wrn import wrn_builders

TIMM_PREFIX = "cifar_"

# arguments timm.create_model passes to every entrypoint; irrelevant for the zoo
_TIMM_PLUMBING = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _families() -> dict[str, Builder]:
    """Every family's builders in display order: small to large, resnet50 (the largest) last."""
    resnets = resnet_builders()
    resnet50 = {"resnet50": resnets.pop("resnet50")}
    return {**resnets, **wrn_builders(), **vgg_builders(), **mobilenetv2_builders(), **shufflenet_builders(),
            **resnet50}


def _timm_entrypoint(name: str, builder: Builder) -> Callable[..., ZooModel]:
    """A timm entrypoint ``cifar_<name>(pretrained=False, num_classes=100, in_chans=3)``."""

    def entrypoint(pretrained: bool = False, num_classes: int = 100, in_chans: int = 3, **kwargs) -> ZooModel:
        for key in _TIMM_PLUMBING:
            kwargs.pop(key, None)
        if kwargs:
            raise TypeError(f"{TIMM_PREFIX}{name}() got unexpected arguments: {', '.join(sorted(kwargs))}")
        if pretrained:
            raise ConfigError(
                f"'{TIMM_PREFIX}{name}' has no downloadable weights; pass a local file "
                "through kdrun.models.create_model(..., pretrained=PATH)"
            )
        return builder(num_classes, in_chans)

    entrypoint.__name__ = entrypoint.__qualname__ = TIMM_PREFIX + name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"kdrun zoo network '{name}' (CIFAR variant, no pretrained weights)."
    return entrypoint


def register_zoo(builders: dict[str, Builder]) -> list[str]:
    """Register each ``name -> builder(num_classes, in_chans)`` in timm as ``cifar_<name>``; the names."""
    for name, builder in builders.items():
        if not timm.is_model(TIMM_PREFIX + name):
            register_model(_timm_entrypoint(name, builder))
    return list(builders)


#: zoo model names in display order (CIFAR networks of the CRD benchmark)
ZOO: list[str] = register_zoo(_families())
