"""The installed commands, run as a user runs them: from another directory, in a subprocess."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

from tests.conftest import tiny


def kdrun(cwd, *args, module=False):
    cmd = [sys.executable, "-m", "kdrun", *args] if module else ["kdrun", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def run_dirs(root):
    return [p.parent for p in (root / "outputs" / "runs").glob("*/*/summary.json")]


def test_acceptance_command_from_another_directory(tmp_path):
    # the smoke command, on generated data, started outside the repository
    proc = kdrun(tmp_path, "teacher=resnet56", "student=resnet20", "loss=kd+fitnet", "dataset=synthetic",
                 "trainer.epochs=1", "trainer.limit_train_batches=3", "trainer.limit_eval_batches=1",
                 "teacher.epochs=1")
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(tmp_path)
    assert run_dir.name.endswith("offline_resnet56-resnet20_kd+fitnet_synthetic")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok"
    header = next(csv.reader(open(run_dir / "metrics.csv")))
    assert "loss_kd" in header and "loss_fitnet" in header
    assert "student, kd+fitnet" in proc.stdout  # the final table


def test_unknown_student_is_one_line_listing_the_valid_ones(tmp_path):
    proc = kdrun(tmp_path, "student=nosuchnet")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "nosuchnet" in lines[0] and "resnet20" in lines[0] and "mobilenetv2" in lines[0]
    assert not (tmp_path / "outputs").exists()


def test_unknown_loss_term_and_bad_numbers(tmp_path):
    proc = kdrun(tmp_path, "loss=kd+nosuch")
    assert proc.returncode != 0 and "unknown loss term 'nosuch'" in proc.stderr and "fitnet" in proc.stderr
    proc = kdrun(tmp_path, *tiny(tmp_path, "trainer.epochs=-3"), module=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "kdrun: error: trainer.epochs=-3 must be an integer >= 0"
    assert not (tmp_path / "outputs").exists()  # rejected before Hydra made a run dir


def test_missing_dataset_names_the_path(tmp_path):
    proc = kdrun(tmp_path, "dataset=npz", f"dataset.path={tmp_path / 'nope.npz'}", "trainer.progress=off")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert str(tmp_path / "nope.npz") in proc.stderr


def test_help_lists_the_groups(tmp_path):
    proc = kdrun(tmp_path, "--help")
    assert proc.returncode == 0
    for group in ("teacher", "student", "loss", "scheme", "dataset", "optim", "sched", "trainer", "experiment"):
        assert f"{group}:" in proc.stdout


def test_zoo_csv(tmp_path):
    proc = subprocess.run(["kdrun-zoo", "--csv"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    rows = {r["name"]: r for r in csv.DictReader(proc.stdout.splitlines())}
    assert abs(int(rows["resnet56"]["params"]) / 0.86e6 - 1) < 0.03
    assert abs(int(rows["resnet32x4"]["params"]) / 7.43e6 - 1) < 0.03
