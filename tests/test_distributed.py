"""torchrun on CPU (gloo, 2 processes): one set of outputs, the same results as one process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import tiny

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")


def run_cli(cwd, launcher, *args):
    proc = subprocess.run([*launcher, "-m", "kdrun", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dirs = sorted((cwd / "outputs" / "runs").glob("*/*"))
    return proc, dirs


def test_two_processes_match_one_and_write_one_run_dir(tmp_path):
    args = tiny(tmp_path, "scheme=baseline", "trainer.epochs=2", "trainer.limit_train_batches=3", "trainer.threads=1",
                "trainer.eval_batch_size=16")
    args = [a for a in args if not a.startswith("paths.output_root")]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    _, dirs_one = run_cli(one, [sys.executable], *args)
    proc, dirs_two = run_cli(two, ["torchrun", "--nproc_per_node=2"], *args)
    assert len(dirs_two) == 1  # only rank 0 writes
    assert proc.stdout.count("status ok") == 1  # and only rank 0 prints the final table
    s1 = json.loads((dirs_one[0] / "summary.json").read_text())
    s2 = json.loads((dirs_two[0] / "summary.json").read_text())
    assert s2["status"] == "ok" and s2["world_size"] == 2
    # same global batch, gradients averaged: the runs differ only through per-rank BatchNorm batches
    assert s2["student_top1_last"] == pytest.approx(s1["student_top1_last"], abs=5.0)
    m1 = (dirs_one[0] / "metrics.csv").read_text().splitlines()
    m2 = (dirs_two[0] / "metrics.csv").read_text().splitlines()
    assert len(m1) == len(m2) == 3
    loss1 = [float(r.split(",")[3]) for r in m1[1:]]
    loss2 = [float(r.split(",")[3]) for r in m2[1:]]
    assert loss2 == pytest.approx(loss1, rel=0.01)
