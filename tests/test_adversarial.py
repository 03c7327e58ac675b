"""loss=adv: MEAL's discriminator trained by its own step, the student fooling it, and nothing else shared."""

from __future__ import annotations

import csv

import pytest
import torch

from kdrun.engine.checkpoint import read_checkpoint
from kdrun.errors import ConfigError
from kdrun.knowledge import KnowledgeSet, Step
from kdrun.knowledge.adversarial import Adversarial
from kdrun.knowledge.logits import KD
from kdrun.models import create_model
from kdrun.run import run
from kdrun.schemes.stages import DistillStage


def fixed_inputs():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 10, generator=g)
    return s, torch.randn(6, 10, generator=g) * 2


def term_with_fixed_weights(**kwargs) -> Adversarial:
    term = Adversarial(**kwargs)
    term.setup({"logits": (10,)}, {"logits": (10,)})
    g = torch.Generator().manual_seed(1)
    for layer, (o, i) in zip(term.discriminator.layers, [(5, 10), (2, 5), (2, 2)]):
        layer.weight.data = torch.randn(o, i, generator=g) * 0.5
        layer.bias.data = torch.randn(o, generator=g) * 0.1 + 0.2
    return term


def test_parity_discriminator_and_student_losses_equal_meal_on_the_same_tensors():
    """Reference: AaronHeee/MEAL @ fd4a23a8ed360dfe91ad6fc55d3214434c1b82d8, models/discriminator.py
    Discriminator(10, K=2) (its three 1x1 convs given the weights above) and loss.py
    discriminatorLoss([s], [t]) for D's loss and gradients; the student's term is torch's
    nn.BCEWithLogitsLoss()(Discriminator(s), [[0, 1]] * 6) and its gradient on s (run in /work/ref/meal)."""
    term = term_with_fixed_weights()
    s, t = fixed_inputs()
    params = term.own_parameters()
    for p in params:
        p.requires_grad_(True)
    d_loss = term.discriminator_loss(s, t)
    grads = torch.autograd.grad(d_loss, params)
    assert d_loss.item() == pytest.approx(1.0896389484405518, abs=1e-6)
    assert grads[0].sum().item() == pytest.approx(-0.7241905927658081, abs=1e-6)
    assert grads[-1].tolist() == pytest.approx([0.13844776153564453, 0.15305079519748688], abs=1e-6)
    for p in params:
        p.requires_grad_(False)
    term.eval()  # no discriminator step: the term alone against the given D
    s.requires_grad_(True)
    value = term({"logits": s}, {"logits": t}, Step(targets=torch.zeros(6, dtype=torch.long)))
    (grad_s,) = torch.autograd.grad(value, s)
    assert value.item() == pytest.approx(1.0138518810272217, abs=1e-6)
    assert grad_s[0].tolist() == pytest.approx(
        [-0.008297406136989594, -0.01296273060142994, -0.014880583621561527, -0.025162525475025177,
         0.02424342930316925, -0.019969375804066658, -0.06594283878803253, -0.037143923342227936,
         0.0027515266556292772, 0.002051837043836713], abs=1e-6)


def snapshot(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(before, module) -> bool:
    return any(not torch.equal(a, p.detach()) for a, p in zip(before, module.parameters()))


def test_one_step_updates_each_side_by_its_own_optimizer_only():
    torch.manual_seed(0)
    student, teacher = create_model("resnet8", 10, 1, 16), create_model("resnet8", 10, 1, 16)
    knowledge = KnowledgeSet({"kd": KD(), "adv": Adversarial(d_lr=0.1)})
    shapes = {"logits": (10,)}
    knowledge.setup(shapes, shapes)
    stage = DistillStage(student, teacher, knowledge)
    d = knowledge.terms["adv"].discriminator
    params = stage.parameters_to_train()
    assert not {id(p) for p in d.parameters()} & {id(p) for p in params}  # D is not in the student's optimizer
    optimizer = torch.optim.SGD(params, lr=0.1)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    s0, d0, t0 = snapshot(student), snapshot(d), snapshot(teacher)
    stage.train()
    loss, _, logs = stage.training_step(x, Step(targets=y))
    assert changed(d0, d) and not changed(s0, student)  # D's own step ran inside the forward, the student untouched
    d1 = snapshot(d)
    optimizer.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in d.parameters())  # the student's backward never reaches D
    optimizer.step()
    assert changed(s0, student) and not changed(d1, d) and not changed(t0, teacher)
    assert set(logs) >= {"loss_ce", "loss_kd", "loss_adv", "adv_d_loss"}
    # D's update is one SGD step of MEAL's loss on the detached logits (momentum buffer empty: w - lr * (g + wd * w))
    with torch.no_grad():
        z_s, z_t = student_logits_before(s0, student, x), teacher(x)
    ref = term_like(d0)
    for p in ref.parameters():
        p.requires_grad_(True)
    grads = torch.autograd.grad(ref.discriminator_loss(z_s, z_t), list(ref.parameters()))
    for w, g, new in zip(d0, grads, d1):
        assert torch.allclose(new, w - 0.1 * (g + 5e-4 * w), atol=1e-6)


def student_logits_before(weights, student, x):
    """The student's logits on x with its weights before the step (train mode, as in the step)."""
    clone = create_model("resnet8", 10, 1, 16)
    clone.load_state_dict(student.state_dict())
    for p, w in zip(clone.parameters(), weights):
        p.data.copy_(w)
    clone.train()
    return clone(x)


def term_like(weights) -> Adversarial:
    term = Adversarial()
    term.setup({"logits": (10,)}, {"logits": (10,)})
    for p, w in zip(term.discriminator.parameters(), weights):
        p.data.copy_(w)
    return term


def test_kd_plus_adv_run_logs_both_losses_and_saves_the_discriminator_optimizer(compose_tiny, tmp_path):
    cfg, ov = compose_tiny("loss=kd+adv")
    summary = run(cfg, run_dir=tmp_path / "r", overrides=ov)
    assert summary["status"] == "ok" and summary["loss_formula"] == "0.1*ce + 0.9*kd + 1*adv"
    with open(tmp_path / "r" / "metrics.csv", newline="") as f:
        row = [r for r in csv.DictReader(f) if r["stage"] == "student"][0]
    assert float(row["loss_adv"]) > 0 and float(row["adv_d_loss"]) > 0
    parts = float(row["loss_ce"]) + float(row["loss_kd"]) + float(row["loss_adv"])
    assert parts == pytest.approx(float(row["train_loss"]), rel=1e-4)  # D's loss is not part of the student's
    state = read_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["extra_state"]["knowledge"]
    momentum = state["terms.adv._extra_state"]["d_optimizer"]["state"]
    assert len(momentum) == 6 and all("momentum_buffer" in v for v in momentum.values())
    fresh = Adversarial()
    fresh.setup({"logits": (10,)}, {"logits": (10,)})
    KnowledgeSet({"adv": fresh}).load_state_dict(state)  # a resumed run gets D and its momentum back
    assert torch.equal(fresh.optimizer().state_dict()["state"][0]["momentum_buffer"], momentum[0]["momentum_buffer"])


def test_bad_adv_settings_name_the_key():
    with pytest.raises(ConfigError, match=r"loss\.adv\.tap=stage3 has 16 channels in the student and 64"):
        Adversarial(tap="stage3").setup({"stage3": (16, 4, 4)}, {"stage3": (64, 4, 4)})
    with pytest.raises(ConfigError, match=r"loss\.adv\.reduction=4 leaves no unit"):
        Adversarial(reduction=4).setup({"logits": (10,)}, {"logits": (10,)})
    with pytest.raises(ConfigError, match=r"loss\.adv\.d_lr=0"):
        Adversarial(d_lr=0)
