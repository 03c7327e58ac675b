"""The zoo: name -> builder for every CIFAR network, and their timm registration.

Each zoo net is also registered in timm's model registry as ``cifar_<name>`` (for
example ``timm.create_model("cifar_resnet20", num_classes=10)``); the prefix keeps
``cifar_resnet50`` apart from timm's ImageNet ``resnet50``.  These entries have no
pretrained weights and never download anything.
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


def _collect() -> dict[str, Builder]:
    resnets = resnet_builders()
    builders: dict[str, Builder] = {}
    # display order: families from small to large, resnet50 (the largest) last
    builders.update({k: v for k, v in resnets.items() if k != "resnet50"})
    builders.update(wrn_builders())
    builders.update(vgg_builders())
    builders.update(mobilenetv2_builders())
    builders.update(shufflenet_builders())
    builders["resnet50"] = resnets["resnet50"]
    return builders


#: zoo name -> ``builder(num_classes, in_chans)``, in display order
BUILDERS: dict[str, Builder] = _collect()

# arguments timm.create_model passes to every entrypoint; irrelevant for the zoo
_TIMM_PLUMBING = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _timm_entrypoint(name: str) -> Callable[..., ZooModel]:
    """A timm entrypoint ``cifar_<name>(pretrained=False, num_classes=100, in_chans=3)``."""
    builder = BUILDERS[name]

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


def _register_all() -> None:
    for name in BUILDERS:
        if not timm.is_model(TIMM_PREFIX + name):
            register_model(_timm_entrypoint(name))


_register_all()
