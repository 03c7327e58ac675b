"""Model builders: zoo networks and timm models, all from timm's registry, as :class:`TapModel`.

The ``_target_`` of every model config (``conf/model/<name>.yaml``) is one of these builders:
:func:`zoo_model` for the CIFAR zoo (timm's ``cifar_<name>``), :func:`timm_model` for any timm
name.  kdrun passes the data's ``num_classes``, ``in_chans`` and ``image_size`` to whichever of
them a builder accepts.  A builder may carry ``check_name(name)``: the checks of its ``name`` that
need nothing built, run before a run starts.
"""

from __future__ import annotations

import difflib

import timm
import torch
from torch import nn

from kdrun.errors import ConfigError, choices_text
from kdrun.models.base import TapModel
from kdrun.models.timm_model import TimmTapModel
from kdrun.models.weights import load_pretrained
from kdrun.models.zoo import TIMM_PREFIX, ZOO

#: smallest input side every zoo network accepts
MIN_IMAGE_SIZE = 16


def _check_int(name: str, value, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}{hint}")
    return value


def timm_model(name: str, num_classes: int, in_chans: int = 3, image_size: int = 32,
               pretrained: str | None = None) -> TapModel:
    """Any model of timm's registry by its name, as a :class:`TapModel`.

    Args:
        name: a name of ``timm.list_models()`` (the zoo's are ``cifar_<name>``); built with
            ``pretrained=False``.  A model that is a TapModel already (the zoo) is returned as it
            is, any other is wrapped in :class:`TimmTapModel`.
        num_classes: classifier outputs.
        in_chans: input channels (1 for grey-scale, 3 for RGB).
        image_size: input side in pixels; timm models with a fixed input size (ViTs, ...) are
            built for it.
        pretrained: optional local weights file (safetensors or torch state dict); the
            classifier is skipped when its class count differs.  Nothing is downloaded.
    """
    _check_int("num_classes", num_classes, 1, "")
    _check_int("in_chans", in_chans, 1, " (1 for grey-scale, 3 for RGB)")
    check_timm_name(name)
    kwargs = {"num_classes": num_classes, "in_chans": in_chans}
    cfg = timm.get_pretrained_cfg(name)
    if cfg is not None and getattr(cfg, "fixed_input_size", False):
        kwargs["img_size"] = image_size
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - report timm's reason as a config problem
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"timm model {name!r} cannot be built with num_classes={num_classes}, in_chans={in_chans}, "
            f"image_size={image_size}: {reason}"
        ) from exc
    if not isinstance(model, TapModel):
        model = TimmTapModel(name, model, num_classes, in_chans)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


def zoo_model(name: str, num_classes: int, in_chans: int = 3, image_size: int = 32,
              pretrained: str | None = None) -> TapModel:
    """A zoo network by its zoo name (see :data:`ZOO`): timm's ``cifar_<name>``, for inputs of at
    least 16x16 pixels; the other arguments as in :func:`timm_model`."""
    check_zoo_name(name)
    if isinstance(image_size, int) and not isinstance(image_size, bool) and 0 < image_size < MIN_IMAGE_SIZE:
        raise ConfigError(
            f"zoo model '{name}' needs images of at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} pixels (image_size >= "
            f"{MIN_IMAGE_SIZE}), got {image_size}x{image_size}; use larger images or a timm model (student=timm student.name=...)"
        )
    _check_int("image_size", image_size, MIN_IMAGE_SIZE, f" for zoo model '{name}'")
    return timm_model(TIMM_PREFIX + name, num_classes, in_chans, image_size, pretrained)


def create_model(name: str, num_classes: int, in_chans: int = 3, image_size: int = 32,
                 pretrained: str | None = None) -> TapModel:
    """For Python callers: a zoo network by its name, or any timm model as ``timm:<timm name>``
    (the ``arch`` of a built model names it the same way); see :func:`timm_model`."""
    timm_name = str(name).removeprefix("timm:")
    if timm_name != name:
        return timm_model(timm_name, num_classes, in_chans, image_size, pretrained)
    return zoo_model(name, num_classes, in_chans, image_size, pretrained)


def check_zoo_name(name: str) -> None:
    """A zoo name (``cifar_<name>`` in timm's registry), else the ConfigError listing the zoo."""
    if not isinstance(name, str) or not timm.is_model(TIMM_PREFIX + name):
        close = difflib.get_close_matches(str(name), ZOO, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown model {name!r}{hint}; valid: {choices_text(ZOO)}, or any timm model "
                          "as 'timm:<name>' (student=timm student.name=<name>)")


def check_timm_name(name: str | None) -> None:
    """A name :func:`timm_model` can build, else the ConfigError naming close names."""
    if not name:
        raise ConfigError("a timm model needs a name (e.g. mobilenetv3_small_050); list them with timm.list_models()")
    name = str(name)
    if ":" in name or not timm.is_model(name):
        pattern = name.split(":")[-1].split(".")[0].split("_")[0] or name
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ConfigError(
            f"unknown timm model {name!r}{hint}; find names with timm.list_models('*{pattern}*')"
        )


timm_model.check_name = check_timm_name  # type: ignore[attr-defined]
zoo_model.check_name = check_zoo_name  # type: ignore[attr-defined]


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of CPU's fused attention (torch counts the CUDA kernels only): ``q @ k^T`` and
    ``attn @ v``, ``2 * b * heads * s_q * s_k * (d_qk + d_v)``."""
    b, heads, s_q, d_qk = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * heads * s_q * s_k * (d_qk + d_v)


@torch.no_grad()
def count_macs(model: nn.Module, in_chans: int, image_size: int) -> int:
    """Multiply-accumulates of one image's forward pass: ``FLOPs / 2`` as
    :class:`torch.utils.flop_counter.FlopCounterMode` counts them.

    That is every matrix product and convolution (Conv: ``output elements * (in_channels /
    groups) * kh * kw``; Linear: ``output elements * in_features``; attention: ``q @ k^T`` and
    ``attn @ v``); element-wise layers (BN, activations, pooling, softmax) are not counted.
    Runs one eval-mode forward on a zero image and restores the mode.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    counter = FlopCounterMode(display=False, custom_mapping={cpu_attention: _cpu_attention_flops} if cpu_attention else None)
    model.eval()
    try:
        with counter:
            model(torch.zeros(1, in_chans, image_size, image_size, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


@torch.inference_mode()
def latency_ms(run, example: torch.Tensor, repeats: int, warmup: int) -> float:
    """Median wall time (ms) of ``run(example)`` (a model, or an exported one's runner) over ``repeats``
    calls, after ``warmup`` calls (TorchScript and quantized kernels settle during the first ones)."""
    import statistics
    import time

    for _ in range(warmup):
        run(example)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(example)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)
