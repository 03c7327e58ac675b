"""Engine pieces: checkpoints, metrics file, schedules, the model store's locking."""

import csv
import multiprocessing as mp
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from kdrun.engine.checkpoint import load_into, read_checkpoint, save_checkpoint
from kdrun.engine.metrics import MetricsWriter
from kdrun.engine.schedule import Cosine, MultiStep
from kdrun.engine.store import ModelStore
from kdrun.errors import CheckpointError


class Tiny(nn.Module):
    def __init__(self, arch="tiny", num_classes=3, in_chans=1):
        super().__init__()
        self.arch, self.num_classes, self.in_chans = arch, num_classes, in_chans
        self.fc = nn.Linear(4, num_classes)


def test_checkpoint_roundtrip_and_checks(tmp_path):
    src = Tiny()
    save_checkpoint(tmp_path / "a.pt", src, epoch=3)
    payload = read_checkpoint(tmp_path / "a.pt")
    assert payload["epoch"] == 3 and payload["arch"] == "tiny"
    dst = Tiny()
    load_into(dst, payload, tmp_path / "a.pt")
    assert torch.equal(dst.fc.weight, src.fc.weight)
    with pytest.raises(CheckpointError, match="holds a tiny, but teacher is other"):
        load_into(Tiny(arch="other"), payload, "a.pt", role="teacher")
    with pytest.raises(CheckpointError, match="num_classes=3"):
        load_into(Tiny(num_classes=5), payload, "a.pt")


def test_truncated_foreign_and_pickled_checkpoints_are_clear_errors(tmp_path):
    save_checkpoint(tmp_path / "a.pt", Tiny())
    data = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(tmp_path / "cut.pt")
    torch.save(Tiny().state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a kdrun checkpoint"):
        read_checkpoint(tmp_path / "plain.pt")
    torch.save({"format": "kdrun", "state_dict": {}, "obj": Path("x")}, tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match="weights-only"):
        read_checkpoint(tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "missing.pt")


def test_metrics_writer_columns_and_resume(tmp_path):
    path = tmp_path / "metrics.csv"
    w = MetricsWriter(path)
    w.append({"stage": "student", "epoch": 1, "lr": 0.1, "train_loss": 1.0, "loss_ce": 0.1, "loss_kd": 0.9,
              "train_top1": 50.0, "test_loss": 1.2, "test_top1": 40.0, "test_top5": 90.0,
              "epoch_seconds": 1.0, "images_per_second": 100.0})
    w.append({"stage": "student", "epoch": 2, "lr": 0.1, "train_loss": 0.8, "loss_ce": 0.1, "loss_kd": 0.7,
              "train_top1": 60.0, "test_loss": float("nan"), "test_top1": float("nan"), "test_top5": float("nan"),
              "epoch_seconds": 1.0, "images_per_second": 100.0})
    rows = list(csv.DictReader(open(path)))
    assert list(rows[0]) == ["stage", "epoch", "lr", "train_loss", "loss_ce", "loss_kd", "train_top1", "test_loss",
                             "test_top1", "test_top5", "epoch_seconds", "images_per_second"]
    assert rows[1]["test_top1"] == "nan"
    again = MetricsWriter(path)
    again.truncate("student", 1)
    assert [r["epoch"] for r in csv.DictReader(open(path))] == ["1"]
    assert not list(tmp_path.glob(".metrics.csv.*"))  # no temp files left behind


def test_multistep_and_cosine_schedules():
    ms = MultiStep(0.05, 6, 10, milestones=[2, 4], gamma=0.1)
    assert [round(ms(e, 0), 6) for e in range(6)] == [0.05, 0.05, 0.005, 0.005, 0.0005, 0.0005]
    cos = Cosine(0.1, 5, 4, min_lr=0.0, warmup_epochs=1)
    assert cos(0, 0) == pytest.approx(0.1 * 0.25)  # warm-up, first step
    assert cos(1, 0) == pytest.approx(0.1)  # end of warm-up: the peak
    assert cos(3, 0) == pytest.approx(0.05)  # half-way through the decay
    assert cos(4, 3) < cos(4, 0) < cos(3, 0)


def _obtain(root, counter, barrier):
    store = ModelStore(root)
    recipe = {"model": "m", "epochs": 3}
    entry = store.entry("ds", "m", 0, recipe)

    def train(d):
        with open(counter, "a") as f:
            f.write("x")
        time.sleep(0.5)
        (d / "model.pt").write_bytes(b"weights")

    barrier.wait()
    store.obtain(entry, recipe, "teacher m", train)


def test_store_two_processes_train_once(tmp_path):
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    counter = tmp_path / "count"
    procs = [ctx.Process(target=_obtain, args=(tmp_path / "store", counter, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    assert counter.read_text() == "x"  # trained once; the other process waited and reused it


def test_store_hash_separates_recipes(tmp_path):
    store = ModelStore(tmp_path)
    a = store.entry("ds", "resnet56", 0, {"epochs": 3})
    b = store.entry("ds", "resnet56", 0, {"epochs": 240})
    assert a != b and a.parent == b.parent == tmp_path / "ds" / "resnet56" / "seed0"


def test_atomic_writes_get_the_umask_permissions_not_0600(tmp_path):
    import os
    import stat

    from kdrun.engine.io import write_json

    write_json(tmp_path / "s.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "s.json").stat().st_mode) == 0o666 & ~mask


class GradSpy(nn.Module):
    """A model that records, for every forward in eval mode, whether its output could carry a graph."""

    def __init__(self, classes: int = 10, chans: int = 3):
        super().__init__()
        self.arch, self.num_classes, self.in_chans = "spy", classes, chans
        self.conv = nn.Conv2d(chans, 4, 3, padding=1)
        self.classifier = nn.Linear(4, classes)
        self.eval_outputs_with_grad = 0
        self.eval_forwards = 0

    def forward(self, x):
        out = self.classifier(self.conv(x).mean(dim=(2, 3)))
        if not self.training:
            self.eval_forwards += 1
            self.eval_outputs_with_grad += int(out.requires_grad or torch.is_grad_enabled())
        return out


def test_every_evaluation_runs_without_autograd(tmp_path):
    """Evaluation during fit and of a trained model keeps no graph (a kept graph per test batch cost
    17.5 GB on a 10k-image test split): no evaluation output may require grad."""
    from kdrun.config import compose, trainer_factories
    from kdrun.data import build_data
    from kdrun.engine.trainer import Trainer
    from kdrun.schemes.stages import SupervisedStage

    cfg = compose(["dataset=synthetic", "dataset.n_train=64", "dataset.n_test=48", "dataset.image_size=16",
                   "trainer.batch_size=16", "trainer.eval_batch_size=16", "trainer.progress=off"])
    data = build_data(cfg.dataset, batch_size=16, eval_batch_size=16, device="cpu", seed=0)
    model = GradSpy()
    trainer = Trainer(cfg, data, torch.device("cpu"), None, **trainer_factories(cfg))
    trainer.fit(SupervisedStage(model), epochs=2, lr=0.01, ckpt_dir=None)
    trainer.evaluate(model)
    assert model.eval_forwards == 3 * 3  # 3 test batches per evaluation: 2 epochs + 1 final
    assert model.eval_outputs_with_grad == 0


def test_divergence_keeps_the_last_finite_checkpoint(tmp_path):
    """A loss that explodes in epoch 2 ends the stage there; last/best stay at epoch 1."""
    from kdrun.config import compose, trainer_factories
    from kdrun.data import build_data
    from kdrun.engine.trainer import Trainer
    from kdrun.errors import DivergedError
    from kdrun.models import create_model
    from kdrun.schemes.stages import SupervisedStage

    class Exploding(SupervisedStage):
        def training_step(self, x, step):
            loss, logits, logs = super().training_step(x, step)
            return (loss * 1e6 if step.epoch >= 1 else loss), logits, logs

    cfg = compose(["dataset=synthetic", "dataset.n_train=64", "dataset.n_test=32", "dataset.image_size=16",
                   "trainer.progress=off"])
    data = build_data(cfg.dataset, batch_size=16, eval_batch_size=32, device="cpu", seed=0)
    model = create_model("resnet8", 10, 3, 16)
    trainer = Trainer(cfg, data, torch.device("cpu"), None, **trainer_factories(cfg))
    with pytest.raises(DivergedError, match=r"student: training diverged in epoch 2 \(loss exploded"):
        trainer.fit(Exploding(model), epochs=3, lr=1e-3, ckpt_dir=tmp_path)
    assert read_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert read_checkpoint(tmp_path / "best.pt")["epoch"] == 1
