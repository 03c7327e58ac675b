"""End-to-end runs through run(cfg) with the real configs on tiny generated data."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from kdrun.engine.checkpoint import read_checkpoint, save_checkpoint
from kdrun.errors import CheckpointError, ConfigError
from kdrun.models import create_model
from kdrun.run import run

SUMMARY_KEYS = {
    "status", "error", "scheme", "teacher", "student", "loss", "dataset", "seed", "epochs",
    "student_top1_best", "student_top1_last", "student_top5_best", "teacher_top1", "student_params",
    "teacher_params", "student_macs", "teacher_macs", "wall_seconds", "device", "amp", "git_sha",
}


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_offline_kd_fitnet_writes_every_output(compose_tiny, tmp_path):
    cfg, ov = compose_tiny("loss=kd+fitnet", "teacher=resnet14")
    run_dir = tmp_path / "run"
    summary = run(cfg, run_dir=run_dir, overrides=ov)
    assert summary["status"] == "ok"
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(on_disk)
    assert on_disk["loss"] == "kd+fitnet" and on_disk["teacher"] == "resnet14"
    assert on_disk["trainer.limit_train_batches"] == 2  # every command-line override is a key
    assert on_disk["student_params"] == sum(p.numel() for p in create_model("resnet8", 10, 3, 16).parameters())
    rows = read_rows(run_dir / "metrics.csv")
    student = [r for r in rows if r["stage"] == "student"]
    assert len(student) == 1
    for col in ("epoch", "lr", "train_loss", "loss_ce", "loss_kd", "loss_fitnet", "train_top1", "test_loss",
                "test_top1", "test_top5", "epoch_seconds", "images_per_second"):
        assert math.isfinite(float(student[0][col])), col
    # the term columns are the weighted parts of the training loss
    parts = sum(float(student[0][c]) for c in ("loss_ce", "loss_kd", "loss_fitnet"))
    assert parts == pytest.approx(float(student[0]["train_loss"]), rel=1e-4)
    assert (run_dir / "checkpoints" / "best.pt").is_file() and (run_dir / "checkpoints" / "last.pt").is_file()
    assert "fitnet" in (run_dir / "config.yaml").read_text() and (run_dir / "kdrun.log").stat().st_size > 0
    # the saved student is the student alone (adapters are not part of it)
    best = read_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert not any(k.startswith("terms.") or "regressor" in k for k in best["state_dict"])


def test_teacher_is_trained_once_then_reused_and_keyed_by_recipe(compose_tiny, tmp_path):
    cfg, ov = compose_tiny()
    first = run(cfg, run_dir=tmp_path / "a", overrides=ov)
    second = run(cfg, run_dir=tmp_path / "b", overrides=ov)
    assert first["teacher_source"] == second["teacher_source"]
    assert "/teachers/synthetic/resnet8/seed0/" in first["teacher_source"]
    assert first["teacher_top1"] == second["teacher_top1"]
    assert {r["stage"] for r in read_rows(tmp_path / "a" / "metrics.csv")} == {"teacher", "student"}
    assert {r["stage"] for r in read_rows(tmp_path / "b" / "metrics.csv")} == {"student"}
    # a longer teacher schedule is another recipe: not reused
    cfg3, ov3 = compose_tiny("teacher.epochs=2")
    third = run(cfg3, run_dir=tmp_path / "c", overrides=ov3)
    assert third["teacher_source"] != first["teacher_source"]
    recipe = json.loads((tmp_path / "outputs" / "teachers").glob("synthetic/resnet8/seed0/*/recipe.json").__next__().read_text())
    assert recipe["model"] == "resnet8" and "epochs" in recipe


def test_same_seed_same_result_and_compare_baseline(compose_tiny, tmp_path):
    cfg, ov = compose_tiny("compare_baseline=true", "loss=kd")
    summary = run(cfg, run_dir=tmp_path / "kd", overrides=ov)
    assert summary["student_baseline_top1"] is not None
    assert summary["gain_top1"] == pytest.approx(summary["student_top1_best"] - summary["student_baseline_top1"])
    # the baseline is what scheme=baseline gives with the same recipe and seed
    cfg_b, ov_b = compose_tiny("scheme=baseline")
    base = run(cfg_b, run_dir=tmp_path / "base", overrides=ov_b)
    assert base["student_top1_best"] == pytest.approx(summary["student_baseline_top1"])
    assert base["teacher"] is None and base["loss"] == "none"


def test_teacher_checkpoint_that_does_not_fit_is_a_clear_error(compose_tiny, tmp_path):
    wrong_arch = create_model("resnet14", 10, 3, 16)
    save_checkpoint(tmp_path / "r14.pt", wrong_arch)
    cfg, ov = compose_tiny(f"teacher.checkpoint={tmp_path / 'r14.pt'}")
    with pytest.raises(CheckpointError, match="holds a resnet14, but teacher is resnet8"):
        run(cfg, run_dir=tmp_path / "run", overrides=ov)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "resnet14" in summary["error"]

    wrong_classes = create_model("resnet8", 100, 3, 16)
    save_checkpoint(tmp_path / "r8_100.pt", wrong_classes)
    cfg, ov = compose_tiny(f"teacher.checkpoint={tmp_path / 'r8_100.pt'}")
    with pytest.raises(CheckpointError, match="num_classes=100"):
        run(cfg, run_dir=tmp_path / "run2", overrides=ov)


def test_teacher_checkpoint_is_used_as_given(compose_tiny, tmp_path):
    teacher = create_model("resnet8", 10, 3, 16)
    save_checkpoint(tmp_path / "t.pt", teacher)
    cfg, ov = compose_tiny(f"teacher.checkpoint={tmp_path / 't.pt'}")
    summary = run(cfg, run_dir=tmp_path / "run", overrides=ov)
    assert summary["teacher_source"] == str(tmp_path / "t.pt")
    assert not (tmp_path / "outputs" / "teachers").exists()  # nothing trained


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.epochs=-1", "trainer.epochs=-1 must be an integer >= 0"),
        ("loss.kd.temperature=0", "loss.kd.temperature=0.0 must be > 0"),
        ("loss.kd.alpha=1.5", "loss.kd.alpha=1.5 is outside [0, 1]"),
    ],
)
def test_bad_numbers_are_rejected_before_anything_trains(compose_tiny, tmp_path, override, message):
    cfg, ov = compose_tiny(override)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run(cfg, run_dir=tmp_path / "run", overrides=ov)
    assert not (tmp_path / "outputs" / "teachers").exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and message.split()[0] in summary["error"]


def test_a_run_that_breaks_still_writes_its_summary(compose_tiny, tmp_path, monkeypatch):
    from kdrun.schemes.offline import Offline

    def boom(self, ctx):
        raise RuntimeError("simulated failure\nsecond line")

    monkeypatch.setattr(Offline, "run", boom)
    cfg, ov = compose_tiny()
    with pytest.raises(RuntimeError):
        run(cfg, run_dir=tmp_path / "run", overrides=ov)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "RuntimeError: simulated failure"
    assert "Traceback" in (tmp_path / "run" / "kdrun.log").read_text()


def test_resume_continues_an_interrupted_run_exactly(compose_tiny, tmp_path, monkeypatch):
    cfg, ov = compose_tiny("trainer.epochs=2", "scheme=baseline")
    straight = run(cfg, run_dir=tmp_path / "straight", overrides=ov)

    from kdrun.engine import trainer as trainer_mod

    original = trainer_mod.Trainer._save

    def save_then_stop(self, stage, optimizer, ckpt_dir, epoch, result, improved):
        original(self, stage, optimizer, ckpt_dir, epoch, result, improved)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_mod.Trainer, "_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, run_dir=tmp_path / "resumed", overrides=ov)
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(trainer_mod.Trainer, "_save", original)

    cfg_r, ov_r = compose_tiny("trainer.epochs=2", "scheme=baseline", "trainer.resume=true")
    resumed = run(cfg_r, run_dir=tmp_path / "resumed", overrides=ov_r)
    assert [r["epoch"] for r in read_rows(tmp_path / "resumed" / "metrics.csv")] == ["1", "2"]
    assert resumed["student_top1_last"] == straight["student_top1_last"]
    a = read_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["state_dict"]
    b = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loss_none_trains_from_labels_without_a_teacher(compose_tiny, tmp_path):
    cfg, ov = compose_tiny("loss=none")
    summary = run(cfg, run_dir=tmp_path / "run", overrides=ov)
    assert summary["status"] == "ok" and summary["loss"] == "none"
    assert not (tmp_path / "outputs" / "teachers").exists()
    assert "loss_kd" not in read_rows(tmp_path / "run" / "metrics.csv")[0]


def test_timm_student_by_name(compose_tiny, tmp_path):
    cfg, ov = compose_tiny("student=timm", "student.name=mobilenetv3_small_050", "loss=kd")
    summary = run(cfg, run_dir=tmp_path / "run", overrides=ov)
    assert summary["status"] == "ok" and summary["student"] == "mobilenetv3_small_050"


def test_bf16_autocast_run_on_cpu_trains_in_bf16_with_fp32_kd_math(compose_tiny, tmp_path, monkeypatch):
    """trainer.amp=bf16 on CPU (what amp=auto picks on a CPU with bf16 instructions): the models run in
    bf16, the KD term gets bf16 logits and returns an fp32 loss, and the run ends ok with finite losses."""
    from kdrun.knowledge.logits import KD

    seen = []
    forward = KD.forward

    def spy(self, s, t, step):
        out = forward(self, s, t, step)
        seen.append((s["logits"].dtype, t["logits"].dtype, out.dtype))
        return out

    monkeypatch.setattr(KD, "forward", spy)
    cfg, ov = compose_tiny("loss=kd+fitnet", "trainer.amp=bf16")
    summary = run(cfg, run_dir=tmp_path / "bf16", overrides=ov)
    assert summary["status"] == "ok" and summary["amp"] == "bf16"
    assert seen and all(d == (torch.bfloat16, torch.bfloat16, torch.float32) for d in seen)
    rows = [r for r in read_rows(tmp_path / "bf16" / "metrics.csv") if r["stage"] == "student"]
    assert rows and all(math.isfinite(float(r[c])) for r in rows for c in ("loss_ce", "loss_kd", "loss_fitnet"))


def test_divergence_ends_the_run_with_status_diverged(compose_tiny, tmp_path):
    from kdrun.errors import DivergedError

    cfg, ov = compose_tiny("scheme=baseline", "optim.lr=1e6")
    with pytest.raises(DivergedError, match=r"student: training diverged in epoch 1 \(.*lower its learning rate"):
        run(cfg, run_dir=tmp_path / "run", overrides=ov)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and "optim.lr" in summary["error"]
    assert not (tmp_path / "run" / "checkpoints" / "best.pt").exists()  # nothing finite to keep


def test_a_diverged_teacher_never_lands_in_the_store(compose_tiny, tmp_path):
    from kdrun.errors import DivergedError

    cfg, ov = compose_tiny("teacher.lr=1e6")
    with pytest.raises(DivergedError, match="teacher resnet8: training diverged"):
        run(cfg, run_dir=tmp_path / "run", overrides=ov)
    store = tmp_path / "outputs" / "teachers"
    assert not list(store.rglob("model.pt"))
    (entry_summary,) = store.rglob("summary.json")
    assert json.loads(entry_summary.read_text())["status"] == "diverged"
