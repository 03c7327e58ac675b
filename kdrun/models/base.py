"""The common interface of every kdrun model: logits plus named intermediate "taps".

A distillation scheme needs more than logits: hint/feature methods (FitNets, AT, OFD,
CRD, ...) read intermediate feature maps of teacher and student.  Every model built by
:func:`kdrun.models.create_model` is a :class:`TapModel` and exposes them under fixed
names taken from one forward pass:

``stem``
    output of the stem (the layers before the first stage), NCHW;
``stage1`` .. ``stageK``
    output of each stage, NCHW, in forward order;
``stageK_preact``
    (only with ``preact=True``) the stage output before its final ReLU;
``embedding``
    pooled, flattened features fed to the classifier, shape ``(B, embedding_dim)``;
``logits``
    classifier output, shape ``(B, num_classes)``.

The stage naming follows the feature-list convention of the CRD benchmark
(Tian et al., 2020), so ``stage2`` is the "middle" hint layer of every zoo network.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from kdrun.errors import ConfigError


class TapModel(nn.Module):
    """Base class: a classifier that can also return its intermediate features.

    Subclasses set :attr:`arch`, :attr:`num_classes`, :attr:`in_chans` and
    :attr:`classifier` (the final ``nn.Linear``) and implement :meth:`forward_taps`.
    """

    #: True when ``forward_taps(x, preact=True)`` is available.
    supports_preact: bool = True
    #: True when ``relu(taps["stageK_preact"]) == taps["stageK"]`` for every stage,
    #: i.e. each stage ends in a ReLU.  False for pre-activation (WRN) and
    #: linear-bottleneck (MobileNetV2) nets, whose preact taps equal the stage taps.
    post_activation: bool = True

    arch: str
    num_classes: int
    in_chans: int
    classifier: nn.Module

    @property
    def tap_names(self) -> list[str]:
        """Names of the spatial taps in forward order: ``["stem", "stage1", ...]``."""
        raise NotImplementedError

    @property
    def embedding_dim(self) -> int:
        """Width of the ``embedding`` tap (the classifier's input features)."""
        return self.classifier.in_features

    def forward_taps(self, x: torch.Tensor, preact: bool = False) -> dict[str, torch.Tensor]:
        """Run one forward pass and return every tap (see the module docstring)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits."""
        return self.forward_taps(x)["logits"]

    def _check_preact(self, preact: bool) -> None:
        if preact and not self.supports_preact:
            raise ConfigError(
                f"model '{self.arch}' does not provide pre-activation taps (preact=True); "
                "choose a kdrun zoo model (without student.quantize) or a term that reads post-activation features"
            )

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, num_classes={self.num_classes}, in_chans={self.in_chans}"


#: ``builder(num_classes, in_chans) -> model``, one per zoo name
Builder = Callable[[int, int], "ZooModel"]


class PreactBlock(nn.Module):
    """A residual/conv block that can also report its output before the final ReLU.

    Subclasses implement :meth:`forward_preact` returning ``(out, preact)``; blocks
    without a final ReLU return the same tensor twice.
    """

    def forward_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_preact(x)[0]


class Stage(nn.Sequential):
    """A sequence of blocks whose last block supplies the stage's preact tap."""

    def forward_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        *head, last = list(self)
        for module in head:
            x = module(x)
        if isinstance(last, PreactBlock):
            return last.forward_preact(x)
        x = last(x)
        return x, x


class ZooModel(TapModel):
    """A kdrun zoo network: ``stem -> stages -> head -> global avg pool -> classifier``.

    ``head`` holds whatever runs between the last stage and the pooling (for example
    WRN's final BN+ReLU or ShuffleNetV2's 1x1 conv); it is not a tap.  The adaptive
    pooling makes every zoo net accept any input of at least 16x16 pixels.
    """

    def __init__(
        self,
        arch: str,
        num_classes: int,
        in_chans: int,
        stem: nn.Module,
        stages: list[Stage],
        embedding_dim: int,
        head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.head = head if head is not None else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(embedding_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """He-normal (fan-out) convolutions, BN scale 1 / shift 0; Linear keeps PyTorch's default."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def tap_names(self) -> list[str]:
        return ["stem"] + [f"stage{i}" for i in range(1, len(self.stages) + 1)]

    def forward_taps(self, x: torch.Tensor, preact: bool = False) -> dict[str, torch.Tensor]:
        self._check_preact(preact)
        taps: dict[str, torch.Tensor] = {}
        x = self.stem(x)
        taps["stem"] = x
        for i, stage in enumerate(self.stages, start=1):
            if preact:
                x, taps[f"stage{i}_preact"] = stage.forward_preact(x)
            else:
                x = stage(x)
            taps[f"stage{i}"] = x
        embedding = torch.flatten(self.pool(self.head(x)), 1)
        taps["embedding"] = embedding
        taps["logits"] = self.classifier(embedding)
        return taps


def conv_bn(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1,
            relu: bool = True) -> nn.Sequential:
    """``Conv2d(bias=False) + BatchNorm2d`` (+ ReLU), 'same' padding for odd kernels."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` equal groups (ShuffleNet's channel shuffle)."""
    if groups == 1:
        return x
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


@torch.no_grad()
def tap_shapes(model: TapModel, in_chans: int, image_size: int, preact: bool = False) -> dict[str, tuple]:
    """Shape (without the batch dim) of every tap, from a dry run on a 2-image batch.

    The model runs in eval mode without gradients and is put back in its previous
    mode afterwards.  Used to size adapters/projectors between teacher and student.
    """
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(2, in_chans, image_size, image_size, device=device, dtype=dtype)
    model.eval()
    try:
        taps = model.forward_taps(x, preact=preact)
    finally:
        model.train(was_training)
    return {name: tuple(t.shape[1:]) for name, t in taps.items()}
