"""student.quantize=int8: QAT with torch.ao (FX), every tap kept, conversion to a real int8 model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.data import build_data
from kdrun.errors import CheckpointError, ConfigError
from kdrun.evaluate import evaluate
from kdrun.models import create_model
from kdrun.models.quantize import QATStudent, prepare_qat, state_bytes, to_float, to_int8, untraceable_classes
from kdrun.run import run, validate_run_config


def module_kinds(model: nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules()}


def test_qat_student_keeps_every_tap_fuses_conv_bn_relu_and_converts_to_int8():
    torch.manual_seed(0)
    float_model = create_model("resnet8", 10, 1, 16)
    shapes = {k: v.shape for k, v in float_model.eval().forward_taps(torch.zeros(2, 1, 16, 16)).items()}
    student = prepare_qat(float_model, "int8", 1, 16)
    assert isinstance(student, QATStudent) and student.arch == "resnet8" and not student.supports_preact
    assert {"ConvBnReLU2d", "ConvBn2d", "FusedMovingAvgObsFakeQuantize"} <= module_kinds(student)
    x = torch.randn(16, 1, 16, 16)
    student.train()
    taps = student.forward_taps(x)
    assert {k: v.shape[1:] for k, v in taps.items()} == {k: v[1:] for k, v in shapes.items()}
    observer = next(m for m in student.modules() if type(m).__name__ == "FusedMovingAvgObsFakeQuantize")
    scale = observer.scale.clone()
    student.eval()
    student(torch.randn(4, 1, 16, 16) * 10)  # test batches never move the ranges
    assert torch.equal(observer.scale, scale)
    with torch.no_grad():
        qat_logits = student(x[:4])
        int8 = to_int8(student)
        fp32 = to_float(student)
        int8_logits, fp32_logits = int8(x[:4])["logits"], fp32(x[:4])["logits"]
    assert "QuantizedConvReLU2d" in module_kinds(int8) or "ConvReLU2d" in module_kinds(int8)
    assert any(p.dtype == torch.qint8 for p in int8.state_dict().values() if isinstance(p, torch.Tensor))
    assert not any("FakeQuantize" in k for k in module_kinds(fp32))  # the fp32 model has no fake quantization
    assert (int8_logits - qat_logits).abs().max() < 0.25 * qat_logits.abs().max()  # fake quant simulated int8
    assert (fp32_logits - qat_logits).abs().max() > 0  # and the fp32 weights are not quantized
    assert state_bytes(int8) < 0.4 * state_bytes(fp32)


class SizeBranch(nn.Module):
    """Branches on the input's size, like VGG's MaxPoolIfLarge: torch.fx cannot trace it."""

    def forward(self, x):
        return F.max_pool2d(x, 2) if x.shape[-1] >= 8 else x


def test_an_untraceable_module_runs_as_a_leaf():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), SizeBranch())
    assert untraceable_classes(model) == [SizeBranch]
    vgg = create_model("vgg8", 10, 1, 16)
    student = prepare_qat(vgg, "int8", 1, 16)  # VGG's MaxPoolIfLarge becomes a leaf
    student.train()(torch.randn(4, 1, 16, 16))
    assert to_int8(student.eval())(torch.randn(2, 1, 16, 16))["logits"].shape == (2, 10)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_int8_run_reports_sizes_accuracies_and_latency_with_a_feature_term(compose_tiny, tmp_path):
    cfg, ov = compose_tiny("student.quantize=int8", "loss=kd+fitnet")
    summary = run(cfg, run_dir=tmp_path / "r", overrides=ov)
    assert summary["status"] == "ok", summary["error"]
    for key in ("student_int8_top1", "student_fp32_top1", "student_int8_latency_ms", "student_fp32_latency_ms"):
        assert summary[key] is not None and summary[key] >= 0, key
    assert 0 < summary["student_int8_bytes"] < 0.45 * summary["student_fp32_bytes"]
    assert summary["student_int8_size_ratio"] == pytest.approx(summary["student_int8_bytes"] / summary["student_fp32_bytes"],
                                                               abs=1e-6)
    # the int8 student ships as TorchScript that torch alone runs: its top-1 is the summary's
    shipped = torch.jit.load(str(tmp_path / "r" / "student_int8.pt"))
    correct = seen = 0
    data = build_data(cfg.dataset, batch_size=8, eval_batch_size=int(cfg.trainer.eval_batch_size),
                      device=torch.device("cpu"), seed=0, channels_last=False)
    limit = cfg.trainer.limit_eval_batches
    for i, (x, y) in enumerate(data.eval_batches()):
        if limit is not None and i >= limit:
            break
        correct += int((shipped(x.float()).argmax(1) == y).sum())
        seen += y.numel()
    assert 100.0 * correct / seen == pytest.approx(summary["student_int8_top1"])
    assert not (tmp_path / "r" / "student.safetensors").exists()
    with pytest.raises(CheckpointError, match="student.quantize=int8: the int8 student is .*student_int8.pt"):
        evaluate(str(tmp_path / "r"))


def test_bad_quantize_values_are_one_line(compose_tiny, tmp_path):
    cfg, _ = compose_tiny("student.quantize=int4")
    with pytest.raises(ConfigError, match=r"student\.quantize=int4 is not one of int8"):
        validate_run_config(cfg)
    cfg, ov = compose_tiny("scheme=mutual", "peers=[resnet8,resnet8]", "student.quantize=int8")
    with pytest.raises(ConfigError, match=r"student\.quantize=int8: scheme=mutual trains no model from student="):
        run(cfg, run_dir=tmp_path / "m", overrides=ov)
