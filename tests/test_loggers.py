"""Experiment trackers (conf/logger): TensorBoard event files, a local MLflow store, several at once,
metrics.csv always, resume without duplicate steps, nothing from the preflight, and the one line
that names the extra when a tracker's package is missing."""

from __future__ import annotations

import csv

import pytest

from kdrun.config import compose
from kdrun.config.checks import validate
from kdrun.errors import ConfigError
from kdrun.run import run
from tests.conftest import tiny

#: 3 steps an epoch, 2 epochs, no teacher: the smallest run with a per-step and a per-epoch record
BASE = ("scheme=baseline", "trainer.epochs=2", "trainer.limit_train_batches=3", "trainer.log_every=2")


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return acc


def mlflow_runs(root):
    import mlflow

    mlflow.set_tracking_uri((root / "outputs" / "mlruns").resolve().as_uri())
    return mlflow.search_runs(experiment_names=["kdrun"], output_format="list")


def test_csv_and_tensorboard_at_once(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from kdrun.loggers.tensorboard import TensorBoardLogger

    opened = []
    original = TensorBoardLogger.open
    monkeypatch.setattr(TensorBoardLogger, "open", lambda self, *a: (opened.append(a[0]), original(self, *a)))
    ov = tiny(tmp_path, *BASE, "logger=[csv,tensorboard]")
    summary = run(compose(ov), run_dir=tmp_path / "run", overrides=ov)
    assert opened == [tmp_path / "run"]  # the preflight opened no tracker
    rows = rows_of(tmp_path / "run" / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    student = events(tmp_path / "run" / "tensorboard" / "student")
    # every log_every=2 steps, and the last step of each epoch (steps count from 1 across epochs)
    assert [e.step for e in student.Scalars("step/loss")] == [2, 3, 5, 6]
    assert [e.value for e in student.Scalars("step/lr")] == pytest.approx([float(r["lr"]) for r in rows for _ in (0, 1)])
    # each epoch's row at the step that ended it, equal to metrics.csv
    for tag, column in (("epoch/test_top1", "test_top1"), ("epoch/train_loss", "train_loss")):
        logged = student.Scalars(tag)
        assert [e.step for e in logged] == [3, 6]
        assert [e.value for e in logged] == pytest.approx([float(r[column]) for r in rows], rel=1e-5)
    root = events(tmp_path / "run" / "tensorboard")
    assert root.Scalars("result/student_top1_best")[0].value == pytest.approx(summary["student_top1_best"])
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = root.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["trainer.epochs"].number_value == 2 and hparams["scheme.name"].string_value == "baseline"


def test_mlflow_local_store_holds_params_metrics_and_the_run_dir(tmp_path):
    pytest.importorskip("mlflow")
    ov = tiny(tmp_path, *BASE, "logger=mlflow")
    summary = run(compose(ov), run_dir=tmp_path / "run", overrides=ov)
    assert (tmp_path / "run" / "metrics.csv").is_file()  # always written
    (found,) = mlflow_runs(tmp_path)
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    assert found.data.params["trainer.epochs"] == "2" and found.data.params["loss.kd.temperature"] == "4.0"
    assert found.data.metrics["student_top1_best"] == pytest.approx(summary["student_top1_best"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    history = client.get_metric_history(found.info.run_id, "student/test_top1")
    rows = rows_of(tmp_path / "run" / "metrics.csv")
    history = sorted(history, key=lambda m: m.step)
    assert [m.step for m in history] == [3, 6]
    assert [m.value for m in history] == pytest.approx([float(r["test_top1"]) for r in rows], rel=1e-5)
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"summary.json", "metrics.csv", "config.yaml", "student.safetensors"} <= artifacts


def test_a_resumed_run_logs_each_step_once(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from kdrun.engine import trainer as trainer_mod

    original = trainer_mod.Trainer._save

    def stop_before_epoch_2_is_saved(self, stage, optimizer, ckpt_dir, epoch, result, improved):
        if epoch == 2:  # epoch 2's steps and row went to the trackers; its checkpoint did not
            raise KeyboardInterrupt
        original(self, stage, optimizer, ckpt_dir, epoch, result, improved)

    monkeypatch.setattr(trainer_mod.Trainer, "_save", stop_before_epoch_2_is_saved)
    ov = tiny(tmp_path, *BASE, "logger=[tensorboard,mlflow]")
    with pytest.raises(KeyboardInterrupt):
        run(compose(ov), run_dir=tmp_path / "run", overrides=ov)
    monkeypatch.setattr(trainer_mod.Trainer, "_save", original)
    ov = [*ov, "trainer.resume=true"]
    run(compose(ov), run_dir=tmp_path / "run", overrides=ov)
    assert [r["epoch"] for r in rows_of(tmp_path / "run" / "metrics.csv")] == ["1", "2"]
    student = events(tmp_path / "run" / "tensorboard" / "student")  # the redone epoch's first events purged
    assert [e.step for e in student.Scalars("step/loss")] == [2, 3, 5, 6]
    assert [e.step for e in student.Scalars("epoch/test_top1")] == [3, 6]
    (found,) = mlflow_runs(tmp_path)  # the same MLflow run goes on, without the steps it holds
    from mlflow.tracking import MlflowClient

    history = MlflowClient().get_metric_history(found.info.run_id, "student/step/loss")
    assert sorted(m.step for m in history) == [2, 3, 5, 6]
    assert found.info.status == "FINISHED"


def test_a_tracker_without_its_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    from kdrun.cli import main
    from kdrun.loggers.tensorboard import TensorBoardLogger

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(TensorBoardLogger, "requires", ("kdrun_no_such_package", "tensorboard"))
    with pytest.raises(SystemExit) as exit_info:
        main(tiny(tmp_path, "logger=[csv,tensorboard]"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "kdrun: error: logger=tensorboard needs the kdrun_no_such_package package, which is not installed: "
        "pip install 'kdrun[tensorboard]'")
    assert not (tmp_path / "outputs").exists()  # nothing trained, no run dir


def test_tracker_settings_are_checked_before_anything_trains():
    with pytest.raises(ConfigError, match=r"^logger.wandb.mode=sometimes is not one of offline, online, disabled$"):
        validate(compose(["logger=wandb", "logger.wandb.mode=sometimes"]))
    cfg = compose(["logger=tensorboard"])
    assert list(cfg.logger) == ["tensorboard"]  # a single option works too (metrics.csv is added by the run)
