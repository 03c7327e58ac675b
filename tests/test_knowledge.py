"""Knowledge terms checked against values worked out by hand and properties that must hold."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdrun.errors import ConfigError
from kdrun.knowledge import KnowledgeSet, Step
from kdrun.knowledge.features import FitNet
from kdrun.knowledge.logits import KD, kd_divergence


def test_kd_matches_hand_computed_values():
    # teacher p = softmax([ln 3, 0]) = [0.75, 0.25], student uniform:
    # KL = 0.75 ln(0.75/0.5) + 0.25 ln(0.25/0.5) = 0.130812 at T=1
    s = torch.zeros(1, 2)
    t = torch.tensor([[math.log(3.0), 0.0]])
    assert kd_divergence(s, t, 1.0).item() == pytest.approx(0.130812, abs=1e-5)
    # T=2: p = [sqrt3, 1]/(sqrt3+1); KL = p1 ln(2 p1) + p2 ln(2 p2) = 0.0363408, times T^2 = 4
    assert kd_divergence(s, t, 2.0).item() == pytest.approx(0.1453631, abs=1e-6)


def test_kd_batch_mean_and_zero_when_equal():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    per_sample = [kd_divergence(s[i : i + 1], t[i : i + 1], 3.0) for i in range(5)]
    assert kd_divergence(s, t, 3.0).item() == pytest.approx(torch.stack(per_sample).mean().item(), rel=1e-5)
    assert kd_divergence(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_divergence(s, t, 3.0).item() > 0


def test_kd_gradient_reaches_student_not_teacher_and_bf16_is_finite():
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10, requires_grad=True)
    kd_divergence(s, t.detach(), 4.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    v = kd_divergence(s.bfloat16(), t.bfloat16(), 4.0)
    assert v.dtype == torch.float32 and torch.isfinite(v)


@pytest.mark.parametrize("kwargs", [{"temperature": 0}, {"temperature": -1}, {"alpha": 1.5}, {"alpha": -0.1}])
def test_kd_rejects_bad_hyperparameters(kwargs):
    with pytest.raises(ConfigError):
        KD(**kwargs)


def test_knowledge_set_hinton_mix():
    torch.manual_seed(1)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    kset = KnowledgeSet({"kd": KD(alpha=0.7, temperature=2.0)})
    total, logs = kset({"logits": s}, {"logits": t}, Step(y))
    ce = F.cross_entropy(s, y)
    expected = 0.3 * ce + 0.7 * kd_divergence(s, t, 2.0)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["loss_ce"].item() == pytest.approx(0.3 * ce.item(), rel=1e-5)
    assert sum(v.item() for v in logs.values()) == pytest.approx(total.item(), rel=1e-5)
    # no kd selected: cross-entropy keeps weight 1
    assert KnowledgeSet({}).ce_weight == 1.0


def test_explicit_ce_and_kd_weights_give_published_recipes():
    torch.manual_seed(2)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    ce, kd = F.cross_entropy(s, y).item(), kd_divergence(s, t, 2.0).item()
    # LSKD: CE 0.1, KD x9 (alpha stays at its default and no longer weighs KD)
    lskd = KnowledgeSet({"kd": KD(temperature=2.0, weight=9.0)}, ce_weight=0.1)
    assert lskd({"logits": s}, {"logits": t}, Step(y))[0].item() == pytest.approx(0.1 * ce + 9 * kd, rel=1e-5)
    assert lskd.formula() == "0.1*ce + 9*kd"
    # loss.kd.weight alone: CE still follows alpha (auto)
    assert KnowledgeSet({"kd": KD(alpha=0.9, weight=1.0)}).ce_weight == pytest.approx(0.1)
    # RepDistiller's +KD rows: CE 1, KD 1
    both = KnowledgeSet({"kd": KD(temperature=2.0, weight=1.0)}, ce_weight=1)
    assert both({"logits": s}, {"logits": t}, Step(y))[0].item() == pytest.approx(ce + kd, rel=1e-5)
    assert KnowledgeSet({"kd": KD()}, ce_weight=0).formula() == "0.9*kd"


@pytest.mark.parametrize("bad", ["-1", "abc", "nan", "inf"])
def test_ce_weight_rejects_bad_values(bad):
    with pytest.raises(ConfigError, match=f"ce_weight={bad} must be auto or"):
        KnowledgeSet({}, ce_weight=bad)


def test_fitnet_value_gradients_and_shapes():
    torch.manual_seed(0)
    term = FitNet(weight=100.0)
    term.setup({"stage2": (8, 16, 16)}, {"stage2": (32, 8, 8)})
    fs = torch.randn(3, 8, 16, 16, requires_grad=True)
    ft = torch.randn(3, 32, 8, 8, requires_grad=True)
    value = term({"stage2": fs}, {"stage2": ft.detach()}, Step(None))
    # independent: apply the regressor by hand and average the squared error over every element
    reg = term.regressor
    manual = F.relu(reg.bn(F.conv2d(fs, reg.conv.weight, reg.conv.bias, stride=2, padding=1)))  # 16 -> 8
    assert value.item() == pytest.approx(((manual - ft) ** 2).mean().item(), rel=1e-5)
    value.backward()
    assert fs.grad is not None and fs.grad.abs().sum() > 0
    assert reg.conv.weight.grad is not None and reg.conv.weight.grad.abs().sum() > 0
    assert ft.grad is None
    # a smaller student map is upsampled to the teacher's size
    term.setup({"stage2": (8, 4, 4)}, {"stage2": (16, 8, 8)})
    out = term({"stage2": torch.randn(2, 8, 4, 4)}, {"stage2": torch.randn(2, 16, 8, 8)}, Step(None))
    assert torch.isfinite(out)


def test_fitnet_zero_when_regressed_hint_equals_teacher():
    term = FitNet()
    term.setup({"stage2": (4, 4, 4)}, {"stage2": (4, 4, 4)})
    fs = torch.randn(2, 4, 4, 4)
    target = term.regressor(fs).detach()
    assert term({"stage2": fs}, {"stage2": target}, Step(None)).item() == pytest.approx(0.0, abs=1e-7)


def test_knowledge_set_reports_missing_taps():
    kset = KnowledgeSet({"fitnet": FitNet(student_tap="stage9")})
    with pytest.raises(ConfigError, match="stage9"):
        kset.setup({"logits": (10,), "stage2": (4, 4, 4)}, {"logits": (10,), "stage2": (4, 4, 4)})
