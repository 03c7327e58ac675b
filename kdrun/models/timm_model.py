"""Any timm model behind the :class:`~kdrun.models.base.TapModel` interface.

Taps come from timm's ``forward_intermediates`` (one forward pass): the intermediates
are named ``stage1``..``stageK`` in forward order, except that the first one is named
``stem`` when it is a stem output rather than the first of a run of repeated blocks.
That is decided from ``model.feature_info``: the first feature is a stem when its module
name mentions "stem" or belongs to a different family than the second feature's module
(``act1`` vs ``layer1`` in ResNets, ``bn1`` vs ``blocks.0`` in MobileNetV3-Small; but
``blocks.0`` vs ``blocks.1`` in MobileNetV3-Large or ViTs, which then have no stem tap).

``embedding`` is ``forward_head(pre_logits=True)``.  Pre-activation taps are not
available (``supports_preact`` is False).  Models without ``forward_intermediates``
still work for logit-only distillation: their taps are just ``embedding`` and ``logits``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from kdrun.models.base import TapModel


def _module_family(module_name: str) -> str:
    """``"layer1" -> "layer"``, ``"blocks.0" -> "blocks"``, ``"stages.2" -> "stages"``."""
    return re.sub(r"\d+", "", module_name.split(".")[0])


def first_feature_is_stem(feature_info: list[dict]) -> bool:
    """Whether the first of timm's feature taps is a stem output (see the module docstring)."""
    if len(feature_info) < 2:
        return False
    first, second = feature_info[0]["module"], feature_info[1]["module"]
    return "stem" in first or _module_family(first) != _module_family(second)


class TimmTapModel(TapModel):
    """A timm model with kdrun's tap interface; the timm model is ``self.model``."""

    supports_preact = False
    post_activation = False

    def __init__(self, timm_name: str, model: nn.Module, num_classes: int, in_chans: int) -> None:
        super().__init__()
        self.model = model
        self.timm_name = timm_name
        self.arch = f"timm:{timm_name}"
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.has_intermediates = hasattr(model, "forward_intermediates")
        feature_info = list(getattr(model, "feature_info", None) or [])
        self._has_stem = first_feature_is_stem(feature_info)
        self._num_taps = len(feature_info) if self.has_intermediates else 0

    @property
    def classifier(self) -> nn.Module:
        """The timm model's classifier (``get_classifier()``), normally an ``nn.Linear``."""
        return self.model.get_classifier()

    @property
    def embedding_dim(self) -> int:
        clf = self.classifier
        if isinstance(clf, nn.Linear):
            return clf.in_features
        return int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)

    @property
    def tap_names(self) -> list[str]:
        return self._names(self._num_taps)

    def _names(self, count: int) -> list[str]:
        if self._has_stem and count >= 2:
            return ["stem"] + [f"stage{i}" for i in range(1, count)]
        return [f"stage{i}" for i in range(1, count + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward_taps(self, x: torch.Tensor, preact: bool = False) -> dict[str, torch.Tensor]:
        self._check_preact(preact)
        taps: dict[str, torch.Tensor] = {}
        if self.has_intermediates:
            final, intermediates = self.model.forward_intermediates(x)
            taps.update(zip(self._names(len(intermediates)), intermediates))
        else:
            final = self.model.forward_features(x)
        embedding = self.model.forward_head(final, pre_logits=True)
        taps["embedding"] = embedding
        clf = self.classifier
        dropout_active = self.training and getattr(self.model, "drop_rate", 0.0)
        if isinstance(clf, nn.Linear) and not dropout_active:
            taps["logits"] = clf(embedding)
        else:
            taps["logits"] = self.model.forward_head(final)
        return taps
