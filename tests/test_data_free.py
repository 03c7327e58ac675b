"""scheme=data_free: DAFL's generator and losses, DeepInversion's BN prior, and a run that never reads a
training image for the student."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn as nn
from PIL import Image

from kdrun.data.module import InMemoryDataModule
from kdrun.engine.checkpoint import read_checkpoint
from kdrun.errors import ConfigError
from kdrun.run import run
from kdrun.schemes.data_free import BNStatistics, DAFLGenerator, DataFree, dafl_losses

# Reference numbers: /work/ref/dafl/parity.py, which runs DAFL's Generator class and the generator-loss
# lines of its training loop from huawei-noah/Efficient-Computing @ 225ddd2e6ca41915434557f7f49d395e4f801e3e,
# Data-Efficient-Model-Compression/DAFL/DAFL-train.py (opt.img_size 8, latent_dim 6, channels 1), and
# DeepInversionFeatureHook from NVlabs/DeepInversion @ 2413af1f97f6c73c4dcb47b6a44266aad458ff28,
# cifar10/deepinversion_cifar10.py, on the same seeded tensors as below.


def test_parity_generator_equals_dafl_given_the_same_weights():
    g = DAFLGenerator(latent_dim=6, channels=1, size=(8, 8))
    gen = torch.Generator().manual_seed(3)
    for p in g.parameters():  # the same parameter order as DAFL's Generator
        p.data = torch.randn(p.shape, generator=gen) * 0.3
    z = torch.randn(5, 6, generator=torch.Generator().manual_seed(4))
    img = g.train()(z)
    assert img.shape == (5, 1, 8, 8)
    assert (img ** 2).sum().item() == pytest.approx(319.9910888671875, rel=1e-6)
    assert img[0, 0, 0, :3].tolist() == pytest.approx([0.4032548666000366, -0.6036301255226135, -2.1945996284484863],
                                                      abs=1e-5)
    assert DAFLGenerator(6, 3, (30, 30))(z).shape == (5, 3, 30, 30)  # any size: the last upsampling goes there


def test_parity_generator_losses_equal_dafl():
    gen = torch.Generator().manual_seed(5)
    logits, features = torch.randn(7, 10, generator=gen) * 3, torch.randn(7, 16, generator=gen)
    parts = dafl_losses(logits, features)
    assert parts["onehot"].item() == pytest.approx(0.4876815676689148, abs=1e-6)
    assert parts["entropy"].item() == pytest.approx(-0.8454859256744385, abs=1e-6)
    assert parts["activation"].item() == pytest.approx(-0.7674802541732788, abs=1e-6)


def test_parity_bn_prior_equals_deepinversion_and_leaves_no_hook_behind():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5))
    gen = torch.Generator().manual_seed(6)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean = torch.randn(m.num_features, generator=gen)
            m.running_var = torch.rand(m.num_features, generator=gen) + 0.5
        elif isinstance(m, nn.Conv2d):
            m.weight.data = torch.randn(m.weight.shape, generator=gen) * 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=gen) * 0.1
    x = torch.randn(3, 3, 9, 9, generator=gen)
    prior = BNStatistics(net.eval())
    with prior.recording():
        net(x)
    assert [t.item() for t in prior.terms] == pytest.approx([10.560428619384766, 32.78126907348633], rel=1e-6)
    assert prior.total.item() == pytest.approx(43.341697692871094, rel=1e-6)
    net(x)
    assert len(prior.terms) == 2  # hooks removed after recording


def test_data_free_run_never_reads_a_training_image_for_the_student(compose_tiny, tmp_path, monkeypatch):
    calls = []
    real = InMemoryDataModule.train_batches
    monkeypatch.setattr(InMemoryDataModule, "train_batches", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    cfg, ov = compose_tiny("scheme=data_free", "teacher.epochs=2", "loss=kd", "scheme.iterations=2",
                           "scheme.bn_prior=10", "scheme.grid_every=1", "scheme.latent_dim=8")
    summary = run(cfg, run_dir=tmp_path / "r", overrides=ov)
    assert summary["status"] == "ok", summary["error"]
    assert len(calls) == 2  # the teacher's two epochs on real data; none for the student, nor its preflight
    assert summary["teacher_top1"] is not None and summary["student_top1_best"] is not None
    with open(tmp_path / "r" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    student = [r for r in rows if r["stage"] == "student"]
    assert len(student) == 1
    for key in ("loss_ce", "loss_kd", "gen_loss", "gen_onehot", "gen_entropy", "gen_activation", "gen_bn"):
        assert student[0][key] not in ("", "nan"), key
    gen_total = sum(w * float(student[0][k]) for w, k in [(1, "gen_onehot"), (5, "gen_entropy"),
                                                          (0.1, "gen_activation"), (10, "gen_bn")])
    assert gen_total == pytest.approx(float(student[0]["gen_loss"]), rel=1e-4)
    with Image.open(tmp_path / "r" / "generated" / "epoch_001.png") as grid:
        assert grid.format == "PNG" and grid.size[0] > 16
    state = read_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["extra_state"]["generator"]
    assert "generator.project.weight" in state and state["_extra_state"]["optimizer"]["state"]  # Adam state, for resuming


def test_bad_data_free_settings_are_one_line(compose_tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"scheme\.iterations=0 must be an integer >= 1"):
        DataFree(iterations=0)
    with pytest.raises(ConfigError, match=r"scheme\.bn_prior=-1 must be a number >= 0"):
        DataFree(bn_prior=-1)
    cfg, ov = compose_tiny("scheme=data_free", "loss=ft", "loss.ft.init_epochs=1")
    with pytest.raises(ConfigError, match=r"loss\.ft\.init_epochs=1: scheme=data_free has no training images"):
        run(cfg, run_dir=tmp_path / "r", overrides=ov)
