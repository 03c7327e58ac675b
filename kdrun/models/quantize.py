"""Quantization-aware training of a student and its conversion to a real int8 model, with PyTorch's
own tooling: ``torch.ao.quantization``'s FX graph mode (``prepare_qat_fx`` / ``convert_fx``), the
``x86`` backend's default QAT config (per-channel int8 weights, uint8 activations, fused moving-
average observers with fake quantization). Its successor, torchao's pt2e flow, converts to a graph
of quantize/dequantize ops that only a compiler lowers to int8 kernels; the FX flow gives eager int8
kernels (fbgemm/onednn) that run on any x86 CPU, which is what the int8 numbers here measure.

What is traced is the model's ``forward_taps`` (every tap but the pre-activation ones), so every
knowledge term that reads ``stem``, ``stageK``, ``embedding`` or ``logits`` works on a QAT student;
conv-BN(-ReLU) runs are fused by ``prepare_qat_fx`` wherever the graph has them.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings

import torch
from torch import nn

from kdrun.errors import ConfigError
from kdrun.models.base import TapModel
from kdrun.models.factory import latency_ms

BACKEND = "x86"
KINDS = ("int8",)


@contextlib.contextmanager
def _quiet_ao():
    """torch.ao.quantization warns on every observer it builds (and that it is deprecated upstream)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"torch\.ao\..*")
        warnings.filterwarnings("ignore", message=r".*(torch\.ao\.quantization|quant_min|quantize_per_).*")
        yield


class _Taps(nn.Module):
    """``forward(x) = model.forward_taps(x)``: what FX traces, so the taps survive as graph outputs."""

    def __init__(self, model: TapModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict:
        return self.model.forward_taps(x)


def _modules_bottom_up(module: nn.Module):
    for child in module.children():
        yield from _modules_bottom_up(child)
    yield module


def untraceable_classes(root: nn.Module) -> list[type]:
    """The module classes torch.fx cannot trace (their forward branches on a tensor's size or value,
    e.g. VGG's ``MaxPoolIfLarge``), innermost first: ``prepare_qat_fx`` then calls them as leaves,
    which run in float between a dequantize and a quantize."""
    import torch.fx as fx

    leaves: list[type] = []

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, name: str) -> bool:
            return type(m) in leaves or super().is_leaf_module(m, name)

    for module in _modules_bottom_up(root):
        kind = type(module)
        if kind in leaves or kind.forward is nn.Module.forward or kind.__module__.startswith("torch.nn"):
            continue
        try:
            Tracer().trace(module)
        except Exception:  # noqa: BLE001 - whatever fx refuses is left to run as a leaf
            leaves.append(kind)
    return leaves


class QATStudent(TapModel):
    """A zoo (or timm) model prepared for quantization-aware training: the same taps, computed with
    fake-quantized weights and activations. Runs in fp32 (autocast off: fake quantization is fp32
    math). Observers calibrate in train mode only (``eval()`` freezes them, so test batches never
    move the quantization ranges). No pre-activation taps (``ab``, ``ofd`` need them)."""

    supports_preact = False

    def __init__(self, model: TapModel, example: torch.Tensor, kind: str = "int8") -> None:
        super().__init__()
        from torch.ao.quantization import get_default_qat_qconfig_mapping
        from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        self.arch, self.num_classes, self.in_chans, self.kind = model.arch, model.num_classes, model.in_chans, kind
        self._tap_names, self._embedding_dim = list(model.tap_names), int(model.embedding_dim)
        root = _Taps(model).train()
        custom = PrepareCustomConfig().set_non_traceable_module_classes(untraceable_classes(root))
        with _quiet_ao():
            self.graph = prepare_qat_fx(root, get_default_qat_qconfig_mapping(BACKEND), (example,),
                                        prepare_custom_config=custom)

    @property
    def tap_names(self) -> list[str]:
        return self._tap_names

    @property
    def embedding_dim(self) -> int:
        return self._embedding_dim

    @property
    def classifier(self) -> nn.Module:
        return self.graph.get_submodule("model.classifier")

    def train(self, mode: bool = True) -> "QATStudent":
        from torch.ao.quantization import disable_observer, enable_observer

        super().train(mode)
        self.graph.apply(enable_observer if mode else disable_observer)
        return self

    def forward_taps(self, x: torch.Tensor, preact: bool = False) -> dict[str, torch.Tensor]:
        self._check_preact(preact)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.graph(x.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_taps(x)["logits"]


def prepare_qat(model: TapModel, kind: str, in_chans: int, image_size, key: str = "student.quantize") -> QATStudent:
    """``model`` prepared for QAT; a model FX cannot trace or quantize is one ConfigError line."""
    if kind not in KINDS:
        raise ConfigError(f"{key}={kind} is not one of {', '.join(KINDS)}, null")
    h, w = image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)
    try:
        return QATStudent(model, torch.zeros(1, in_chans, h, w), kind)
    except Exception as exc:  # noqa: BLE001 - FX tracing of an arbitrary model
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{key}={kind}: {getattr(model, 'arch', type(model).__name__)} cannot be prepared for "
                          f"quantization-aware training (torch.fx: {type(exc).__name__}: {first}); "
                          "choose another student or student.quantize=null") from None


def to_int8(student: QATStudent) -> nn.Module:
    """The trained QAT student converted to a real int8 model on the CPU (``convert_fx``)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    torch.backends.quantized.engine = BACKEND
    with _quiet_ao():
        return convert_fx(copy.deepcopy(student.graph).cpu().eval())


def to_float(student: QATStudent) -> nn.Module:
    """The same weights as a float model on the CPU: every QAT module by its ``to_float()`` (conv and
    BN folded into one conv), every fake quantizer by an identity."""
    from torch.ao.quantization import FakeQuantizeBase

    graph = copy.deepcopy(student.graph).cpu().eval()
    replaced: list[str] = []
    for name, module in list(graph.named_modules(remove_duplicate=False)):  # a shared quantizer under each name
        if any(name.startswith(f"{done}.") for done in replaced):
            continue
        parent, _, leaf = name.rpartition(".")
        if isinstance(module, FakeQuantizeBase):
            setattr(graph.get_submodule(parent), leaf, nn.Identity())
        elif type(module).__module__.startswith("torch.ao.nn") and hasattr(module, "to_float"):
            setattr(graph.get_submodule(parent), leaf, module.to_float())
        else:
            continue
        replaced.append(name)
    return graph


def state_bytes(model: nn.Module) -> int:
    """The size of ``torch.save(model.state_dict())``: the model's file size on disk."""
    buffer = io.BytesIO()
    with _quiet_ao():
        torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


@torch.inference_mode()
def cpu_top1(model: nn.Module, batches, limit: int | None = None, dry: bool = False) -> float:
    """Test top-1 (percent) of a model whose forward gives a dict with ``logits``, on the CPU."""
    correct = seen = 0
    for i, (x, y) in enumerate(batches):
        if (limit is not None and i >= limit) or (dry and i >= 1):
            break
        x, y = (x[:2], y[:2]) if dry else (x, y)
        logits = model(x.cpu().float())["logits"]
        correct += int((logits.argmax(dim=1) == y.cpu()).sum())
        seen += y.numel()
    return 100.0 * correct / max(seen, 1)


class _Logits(nn.Module):
    """``forward(x) = model(x)["logits"]``: the int8 graph as a plain classifier for TorchScript."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["logits"]


def save_int8(int8: nn.Module, example: torch.Tensor, path) -> None:
    """The int8 model as TorchScript (``torch.jit.load(path)(x)`` gives the logits on the CPU, with
    torch alone: no kdrun needed), written atomically. safetensors cannot hold quantized tensors."""
    from kdrun.engine.io import atomic_write

    with _quiet_ao(), warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*")  # its pt2 successor
        traced = torch.jit.trace(_Logits(int8).eval(), example.cpu().float())  # has no int8 CPU kernels
        atomic_write(path, lambda f: torch.jit.save(traced, f), mode="wb")


def int8_report(student: QATStudent, batches, limit: int | None = None, dry: bool = False,
                save_to=None) -> dict:
    """The int8 model and the same weights in fp32 (folded BN), both on the CPU: test top-1, file
    size and batch-1 latency (``batches()`` gives the test split); ``save_to``: a path where the int8
    model is written as TorchScript (:func:`save_int8`). ``dry``: convert and score two images (the
    preflight), no timing, nothing written."""
    int8, fp32 = to_int8(student), to_float(student)
    out = {"student_int8_top1": cpu_top1(int8, batches(), limit, dry),
           "student_fp32_top1": cpu_top1(fp32, batches(), limit, dry)}
    if dry:
        return out
    out.update(student_int8_bytes=state_bytes(int8), student_fp32_bytes=state_bytes(fp32),
               student_quantize=f"{student.kind} ({BACKEND}, torch.ao QAT, FX)")
    out["student_int8_size_ratio"] = out["student_int8_bytes"] / out["student_fp32_bytes"]
    x, _ = next(iter(batches()))
    x = x[:1].cpu().float()
    out["student_int8_latency_ms"], out["student_fp32_latency_ms"] = (latency_ms(m, x, repeats=30, warmup=5)
                                                                   for m in (int8, fp32))
    if save_to is not None:
        save_int8(int8, x, save_to)
    return out
