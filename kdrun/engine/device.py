"""Device and mixed-precision choices."""

from __future__ import annotations

import torch

from kdrun.errors import ConfigError

AMP_CHOICES = ("auto", "off", "bf16", "fp16")


def resolve_device(spec: str, world=None) -> torch.device:
    """``trainer.device``; under torchrun ``auto``/``cuda`` mean this rank's GPU, cuda:<LOCAL_RANK>."""
    spec = str(spec or "auto")
    local = getattr(world, "local_rank", 0) if world is not None and world.active else None
    if spec in ("auto", "cuda") and local is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{local}")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.device={spec} but no CUDA device is available; use trainer.device=cpu or auto")
        return torch.device(spec)
    if spec == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"unknown trainer.device '{spec}'; valid: auto, cpu, cuda, cuda:N")


def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 instructions (AVX512-BF16 or AMX), so bf16 autocast is fast."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_amp(spec: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``trainer.amp`` on ``device`` (None: full fp32)."""
    spec = str(spec or "auto")
    if spec not in AMP_CHOICES:
        raise ConfigError(f"unknown trainer.amp '{spec}'; valid: {', '.join(AMP_CHOICES)}")
    if spec == "off":
        return None
    if device.type == "cuda":
        if spec == "fp16":
            return torch.float16
        if spec == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if spec == "fp16":
        raise ConfigError("trainer.amp=fp16 needs a CUDA device; on CPU use trainer.amp=bf16 or off")
    if spec == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def amp_name(dtype: torch.dtype | None) -> str:
    return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
