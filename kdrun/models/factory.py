"""Model factory: zoo networks and timm models behind one :class:`TapModel` interface."""

from __future__ import annotations

import difflib

import timm
import torch
from torch import nn

from kdrun.errors import ConfigError, choices_text
from kdrun.models.base import TapModel
from kdrun.models.timm_model import TimmTapModel
from kdrun.models.weights import load_pretrained
from kdrun.models.zoo import BUILDERS, TIMM_PREFIX

#: zoo model names in display order (CIFAR networks of the CRD benchmark)
ZOO: list[str] = list(BUILDERS)

#: smallest input side every zoo network accepts
MIN_IMAGE_SIZE = 16


def _check_int(name: str, value, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}{hint}")
    return value


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    image_size: int = 32,
    timm_name: str | None = None,
    pretrained: str | None = None,
) -> TapModel:
    """Build a zoo network or a timm model as a :class:`TapModel`.

    Args:
        name: a zoo name (see :data:`ZOO`), or ``"timm"`` together with ``timm_name``
            (``"timm:<timm_name>"`` is accepted as a shorthand; it is also the ``arch``
            of the returned model).
        num_classes: classifier outputs.
        in_chans: input channels (1 for grey-scale, 3 for RGB).
        image_size: input side in pixels; zoo nets need at least 16.  Timm models with a
            fixed input size (ViTs, ...) are built for it.
        timm_name: any name from ``timm.list_models()``; built with ``pretrained=False``.
        pretrained: optional local weights file (safetensors or torch state dict); the
            classifier is skipped when its class count differs.  Nothing is downloaded.
    """
    _check_int("num_classes", num_classes, 1, "")
    _check_int("in_chans", in_chans, 1, " (1 for grey-scale, 3 for RGB)")
    if isinstance(name, str) and name.startswith("timm:"):
        if timm_name is not None and timm_name != name[5:]:
            raise ConfigError(f"model '{name}' conflicts with timm_name '{timm_name}'; give one of them")
        name, timm_name = "timm", name[5:]
    if name == "timm":
        model = _create_timm(timm_name, num_classes, in_chans, image_size)
    elif name in BUILDERS:
        if timm_name is not None:
            raise ConfigError(f"timm_name '{timm_name}' is only used with model 'timm', not with zoo model '{name}'")
        if isinstance(image_size, int) and not isinstance(image_size, bool) and 0 < image_size < MIN_IMAGE_SIZE:
            raise ConfigError(
                f"zoo model '{name}' needs images of at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} pixels (image_size >= "
                f"{MIN_IMAGE_SIZE}), got {image_size}x{image_size}; use larger images or a timm model (student=timm student.name=...)"
            )
        _check_int("image_size", image_size, MIN_IMAGE_SIZE, f" for zoo model '{name}'")
        model = BUILDERS[name](num_classes, in_chans)
    else:
        raise ConfigError(f"unknown model {name!r}; valid: {choices_text(ZOO + ['timm'])}")
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


def check_timm_name(timm_name: str | None) -> None:
    """A name :func:`create_model` can build with timm, else the ConfigError naming close names."""
    if not timm_name:
        raise ConfigError("model 'timm' needs timm_name (e.g. mobilenetv3_small_050); list them with timm.list_models()")
    if timm_name.startswith(TIMM_PREFIX) and timm_name[len(TIMM_PREFIX):] in BUILDERS:
        return
    if ":" in timm_name or not timm.is_model(timm_name):
        pattern = timm_name.split(":")[-1].split(".")[0].split("_")[0] or timm_name
        close = difflib.get_close_matches(timm_name, timm.list_models(), n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ConfigError(
            f"unknown timm model {timm_name!r}{hint}; find names with timm.list_models('*{pattern}*')"
        )


def _create_timm(timm_name: str | None, num_classes: int, in_chans: int, image_size: int) -> TapModel:
    check_timm_name(timm_name)
    if timm_name.startswith(TIMM_PREFIX) and timm_name[len(TIMM_PREFIX):] in BUILDERS:
        # our own registration: return the zoo model itself (it supports preact taps)
        return create_model(timm_name[len(TIMM_PREFIX):], num_classes, in_chans, image_size)
    kwargs = {"num_classes": num_classes, "in_chans": in_chans}
    cfg = timm.get_pretrained_cfg(timm_name)
    if cfg is not None and getattr(cfg, "fixed_input_size", False):
        kwargs["img_size"] = image_size
    try:
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - report timm's reason as a config problem
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"timm model {timm_name!r} cannot be built with num_classes={num_classes}, in_chans={in_chans}, "
            f"image_size={image_size}: {reason}"
        ) from exc
    return TimmTapModel(timm_name, model, num_classes, in_chans)


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, in_chans: int, image_size: int) -> int:
    """Multiply-accumulates of all Conv2d and Linear layers for one image.

    Conv: ``output elements * (in_channels / groups) * kh * kw``; Linear: ``output
    elements * in_features``.  Other layers (BN, pooling, attention matmuls) are not
    counted.  Runs one eval-mode forward on a zero image and restores the mode.
    """
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        per_image = output.numel() // output.shape[0]
        total += per_image * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        per_image = output.numel() // output.shape[0] if output.dim() > 1 else output.numel()
        total += per_image * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    model.eval()
    try:
        model(torch.zeros(1, in_chans, image_size, image_size, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total
