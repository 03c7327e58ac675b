"""Sweeps (`kdrun -m`), the sweep table results.csv, `python -m kdrun.report` and `kdrun-compare`.

The sweeps run the real command in a subprocess on tiny generated data; they share one output
root, so the teacher is trained once for the whole module. The compare tests use a hand-written
CSV whose means and standard deviations are worked out by hand below.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kdrun.errors import ConfigError
from kdrun.report import compare as cmp
from kdrun.report.sweep import INCOMPLETE, file_lock, refresh_results
from tests.conftest import tiny

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def kdrun(cwd, *args, timeout=300):
    return subprocess.run(["kdrun", *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=timeout)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A module-wide dir: the teacher store of every sweep below lives in shared/outputs."""
    return tmp_path_factory.mktemp("sweeps")


def sweep(shared, name, *args, device="cpu"):
    sweep_dir = shared / name
    overrides = [a.replace("trainer.device=cpu", f"trainer.device={device}") for a in tiny(shared)]
    proc = kdrun(shared, "-m", *overrides, "trainer.threads=1", f"hydra.sweep.dir={sweep_dir}", *args)
    return proc, sweep_dir


@pytest.fixture(scope="module")
def grid(shared):
    """A 4-job sweep: two loss combinations x two temperatures, one of which (-1) fails validation."""
    return sweep(shared, "grid", "loss=kd,kd+fitnet", "loss.kd.temperature=-1,4")


# ---------------------------------------------------------------------------- sweeps
def test_sweep_writes_one_row_per_job_with_the_swept_columns(grid):
    proc, sweep_dir = grid
    rows = read_csv(sweep_dir / "results.csv")
    assert len(rows) == 4, proc.stderr[-2000:]
    header = list(rows[0])
    assert header[:2] == ["job", "loss.kd.temperature"]  # the job number, then the swept keys
    for col in ("scheme", "teacher", "student", "loss", "dataset", "seed", "epochs", "status",
                "student_top1_best", "student_top1_last", "teacher_top1", "student_params", "error", "job_dir"):
        assert col in header, col
    assert header[-1] == "job_dir"
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    # a group choice is the group's column, with the combination's name as its value
    assert [(r["loss"], r["loss.kd.temperature"], r["status"]) for r in rows] == [
        ("kd", "-1", "failed"), ("kd", "4", "ok"), ("kd+fitnet", "-1", "failed"), ("kd+fitnet", "4", "ok")]
    for r in rows:
        summary = json.loads((Path(r["job_dir"]) / "summary.json").read_text())
        assert r["status"] == summary["status"]
        if r["status"] == "ok":
            assert float(r["student_top1_best"]) == summary["student_top1_best"]
            assert 0 <= summary["student_top1_best"] <= 100 and r["error"] == ""


def test_failed_jobs_are_rows_the_sweep_goes_on_and_the_exit_code_is_1(grid):
    # the first job fails validation at start-up; the jobs after it still run
    proc, sweep_dir = grid
    assert proc.returncode == 1
    assert "kdrun: error: loss.kd.temperature=-1.0 must be > 0" in proc.stderr
    assert "kdrun: error: 2 of 4 jobs did not end ok (job 0, 2)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"sweep table: {sweep_dir / 'results.csv'} (4 jobs: 2 ok, 2 failed)" in proc.stdout
    rows = read_csv(sweep_dir / "results.csv")
    assert rows[0]["error"] == "loss.kd.temperature=-1.0 must be > 0" and rows[0]["student_top1_best"] == ""


def test_job_dirs_are_named_by_their_swept_values(grid):
    _, sweep_dir = grid
    names = ["0_loss.kd.temperature=-1,loss=kd", "1_loss.kd.temperature=4,loss=kd",  # key=value sorted, as Hydra's
             "2_loss.kd.temperature=-1,loss=kd+fitnet", "3_loss.kd.temperature=4,loss=kd+fitnet"]
    assert [Path(r["job_dir"]).name for r in read_csv(sweep_dir / "results.csv")] == names
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == names


def test_hydra_glob_sweeps_a_group(shared, grid):
    # Hydra's sweep syntax: glob() over the loss group (the teacher comes from the store the grid filled)
    proc, sweep_dir = sweep(shared, "glob", "loss=glob([kd,dist])")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_csv(sweep_dir / "results.csv")
    assert [(r["job"], r["loss"], r["status"]) for r in rows] == [("0", "dist", "ok"), ("1", "kd", "ok")]
    assert [Path(r["job_dir"]).name for r in rows] == ["0_loss=dist", "1_loss=kd"]


def test_python_m_kdrun_report_rebuilds_the_same_table(grid, tmp_path):
    _, sweep_dir = grid
    table = sweep_dir / "results.csv"
    before = table.read_bytes()
    table.unlink()
    proc = subprocess.run([sys.executable, "-m", "kdrun.report", str(sweep_dir)], cwd=tmp_path,
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert table.read_bytes() == before
    assert proc.stdout.strip() == f"{table}: 4 jobs: 2 ok, 2 failed"
    proc = subprocess.run([sys.executable, "-m", "kdrun.report", str(tmp_path / "nope")], cwd=tmp_path,
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"kdrun-report: error: sweep dir '{tmp_path / 'nope'}' does not exist"]


def test_compare_on_a_real_sweep_dir(grid, tmp_path, capsys, monkeypatch):
    _, sweep_dir = grid
    monkeypatch.setenv("COLUMNS", "200")
    cmp.main([str(sweep_dir), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "left out 2 rows that did not end ok (2 failed)" in out and "kd+fitnet" in out
    rows = read_csv(tmp_path / "compare.csv")  # grouped by what varies among the ok rows: the loss
    assert [(r["loss"], r["metric"], r["n"]) for r in rows] == [
        ("kd", "student_top1_best", "1"), ("kd+fitnet", "student_top1_best", "1")]


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is None,
                    reason="hydra-joblib-launcher is not installed (pip install 'kdrun[joblib]')")
def test_parallel_launcher_two_jobs_at_once(shared, grid):
    proc, sweep_dir = sweep(shared, "parallel", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
                            "loss.kd.temperature=1,-1", device="auto")
    assert proc.returncode == 1, proc.stderr[-2000:]
    rows = read_csv(sweep_dir / "results.csv")
    assert [(r["loss.kd.temperature"], r["status"]) for r in rows] == [("1", "ok"), ("-1", "failed")]
    # the job dirs are named in the joblib workers too
    assert [Path(r["job_dir"]).name for r in rows] == ["0_loss.kd.temperature=1", "1_loss.kd.temperature=-1"]
    if sys.modules["torch"].cuda.device_count() == 0:
        assert rows[0]["device"] == "cpu"  # trainer.device=auto: pinning to GPUs is a no-op on CPU


# ---------------------------------------------------------------------------- the table under concurrency
WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from kdrun.engine.io import write_json
    from kdrun.report.sweep import refresh_results
    sweep_dir, i, start = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    while time.time() < start:
        time.sleep(0.005)
    job = sweep_dir / f"{i}_job"
    write_json(job / "summary.json", {"status": "ok", "error": None, "scheme": "offline", "loss": "kd",
                                      "seed": i % 3, "student_top1_best": 50.0 + i, "overrides": f"seed={i % 3}"})
    for _ in range(5):
        refresh_results(sweep_dir)
""")


def test_results_csv_survives_concurrent_refreshes(tmp_path):
    # each process writes its job's summary, then refreshes; the last table written must hold every
    # job (a refresh that read the dir before a summary appeared must not overwrite a newer table)
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    n = 8
    start = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(sweep_dir), str(i), str(start)],
                              stderr=subprocess.PIPE, text=True) for i in range(n)]
    reads = 0
    while any(p.poll() is None for p in procs):  # the table is whole whenever anyone reads it
        table = sweep_dir / "results.csv"
        if table.exists():
            rows = list(csv.reader(table.open(newline="")))
            assert rows and all(len(r) == len(rows[0]) for r in rows) and len(rows) - 1 <= n
            reads += 1
        time.sleep(0.01)
    assert all(p.wait() == 0 for p in procs), [p.stderr.read() for p in procs]
    rows = read_csv(sweep_dir / "results.csv")
    assert sorted(int(r["job"]) for r in rows) == list(range(n))
    assert not list(sweep_dir.glob(".results.csv.*.tmp"))
    assert reads > 0


def test_the_lock_makes_a_refresh_wait(tmp_path):
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "0_job").mkdir(parents=True)
    (sweep_dir / "0_job" / "summary.json").write_text(json.dumps({"status": "ok", "scheme": "offline"}))
    with file_lock(sweep_dir / ".results.csv.lock"):
        proc = subprocess.Popen([sys.executable, "-m", "kdrun.report", str(sweep_dir)],
                                stdout=subprocess.PIPE, text=True)
        time.sleep(2.0)
        assert proc.poll() is None and not (sweep_dir / "results.csv").exists()
    assert proc.wait(timeout=60) == 0
    assert len(read_csv(sweep_dir / "results.csv")) == 1


def test_a_job_without_summary_is_an_incomplete_row(tmp_path):
    job = tmp_path / "sweep" / "3_offline_resnet8-resnet8_kd_synthetic" / ".hydra"
    job.mkdir(parents=True)
    (job / "overrides.yaml").write_text("- loss=kd\n- loss.kd.temperature=8\n- seed=2\n")
    teacher = tmp_path / "sweep" / "teachers" / "resnet8"  # another kind of summary.json: not a job
    teacher.mkdir(parents=True)
    (teacher / "summary.json").write_text(json.dumps({"status": "ok", "model": "resnet8"}))
    table = refresh_results(tmp_path / "sweep")
    (row,) = read_csv(table.path)
    assert row["job"] == "3" and row["status"] == INCOMPLETE and "no summary.json" in row["error"]
    assert row["loss"] == "kd" and row["loss.kd.temperature"] == "8" and row["seed"] == "2"
    with pytest.raises(ConfigError, match="no job dirs"):
        refresh_results(teacher.parent)


# ---------------------------------------------------------------------------- compare
# student_top1_best per (temperature, alpha) over seeds 0, 1, 2, and one failed row:
#   T=1 a=0.5: 60, 62, 64 -> mean 62, std 2          T=1 a=0.9: 61, 61, 64 -> mean 62, std sqrt(3)
#   T=4 a=0.5: 66 (seed 0 only) -> mean 66, std -     T=4 a=0.9: 70, 72, 77 -> mean 73, std sqrt(13)
HAND = {(1, 0.5): [60, 62, 64], (1, 0.9): [61, 61, 64], (4, 0.5): [66], (4, 0.9): [70, 72, 77]}


@pytest.fixture
def hand_csv(tmp_path):
    path = tmp_path / "hand.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["loss.kd.temperature", "loss.kd.alpha", "seed", "loss", "status", "student_top1_best",
                    "student_top1_last", "job_dir"])
        for (t, a), values in HAND.items():
            for seed, v in enumerate(values):
                w.writerow([t, a, seed, "kd", "ok", v, v - 1, f"/x/{t}_{a}_{seed}"])
        w.writerow([4, 0.5, 1, "kd", "failed", "", "", "/x/failed"])
    return path


@pytest.fixture
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


def test_pivot_of_a_hand_written_csv(hand_csv, tmp_path, capsys, wide):
    out_dir = tmp_path / "out"
    cmp.main([str(hand_csv), "--pivot", "loss.kd.temperature", "loss.kd.alpha", "--out", str(out_dir)])
    out = capsys.readouterr().out
    for cell in ("62.00 ± 2.00 (3)", "62.00 ± 1.73 (3)", "66.00 ± - (1)", "73.00 ± 3.61 (3)"):
        assert cell in out, cell
    assert "left out 1 row that did not end ok (1 failed)" in out
    rows = read_csv(out_dir / "compare.csv")
    assert list(rows[0]) == ["loss.kd.temperature", "loss.kd.alpha", "metric", "mean", "std", "n"]
    got = {(float(r["loss.kd.temperature"]), float(r["loss.kd.alpha"])): r for r in rows}
    for key, values in HAND.items():
        r = got[key]
        mean = sum(values) / len(values)
        assert float(r["mean"]) == pytest.approx(mean) and int(r["n"]) == len(values)
        if len(values) > 1:
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
            assert float(r["std"]) == pytest.approx(std)
        else:
            assert r["std"] == ""  # no std from one seed
    assert float(got[(4, 0.9)]["std"]) == pytest.approx(math.sqrt(13))
    md = (out_dir / "compare.md").read_text()
    assert "| 4 | 66.00 ± - (1) | 73.00 ± 3.61 (3) |" in md and "left out 1 row" in md


def test_default_grouping_and_several_sources(hand_csv, tmp_path, capsys, wide):
    # without --pivot the rows group by every config column that varies, except seed
    c = cmp.compare(cmp.load([hand_csv]), sources=[str(hand_csv)])
    assert c.keys == ["loss.kd.temperature", "loss.kd.alpha"]
    # two sources: rows concatenated, a source column; seeds still pool
    other = tmp_path / "other.csv"
    shutil.copy(hand_csv, other)
    df = cmp.load([hand_csv, other])
    assert set(df["source"]) == {str(hand_csv), str(other)} and len(df) == 2 * 11
    c = cmp.compare(df, group_by=["loss.kd.temperature"])
    assert c.table["n"].tolist() == [12, 8]  # T=1: 6 ok rows x 2 files; T=4: 4 ok rows x 2 files
    assert any("pool rows that differ in loss.kd.alpha" in n for n in c.notes)
    cmp.main([str(hand_csv), str(other), "--group-by", "loss.kd.alpha", "--metric", "student_top1_last",
              "--out", str(tmp_path / "o2")])
    rows = read_csv(tmp_path / "o2" / "compare.csv")
    assert [(r["loss.kd.alpha"], r["metric"], r["n"]) for r in rows] == [
        ("0.5", "student_top1_last", "8"), ("0.9", "student_top1_last", "12")]


def _check_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_plots_are_valid_png_images(hand_csv, tmp_path, capsys, wide):
    pytest.importorskip("matplotlib", reason="matplotlib is in the dev extra")
    cmp.main([str(hand_csv), "--pivot", "loss.kd.temperature", "loss.kd.alpha", "--plot", "--out", str(tmp_path / "h")])
    _check_png(tmp_path / "h" / "compare.png")  # heatmap
    cmp.main([str(hand_csv), "--plot", "--out", str(tmp_path / "l")])
    _check_png(tmp_path / "l" / "compare.png")  # lines: metric vs temperature, one line per alpha
    assert "compare.png" in capsys.readouterr().out


def _one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        cmp.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdrun-compare: error: ") and "Traceback" not in err
    return lines[0]


def test_unknown_key_or_metric_is_one_line_listing_the_columns(hand_csv, capsys, tmp_path):
    line = _one_line_error(capsys, [str(hand_csv), "--pivot", "loss.kd.temprature", "loss.kd.alpha"])
    assert "unknown pivot key 'loss.kd.temprature'" in line
    assert "loss.kd.temperature, loss.kd.alpha, seed, loss, status, student_top1_best" in line
    line = _one_line_error(capsys, [str(hand_csv), "--group-by", "nope"])
    assert "unknown group-by key 'nope'" in line
    line = _one_line_error(capsys, [str(hand_csv), "--metric", "top1"])
    assert "unknown metric 'top1'" in line and "student_top1_best, student_top1_last" in line
    line = _one_line_error(capsys, [str(hand_csv), "--metric", "loss"])
    assert "metric 'loss' has no numbers" in line
    line = _one_line_error(capsys, [str(tmp_path / "missing.csv")])
    assert "neither a sweep dir nor a results CSV" in line
    line = _one_line_error(capsys, [str(hand_csv), "--pivot", "seed"])  # argparse's own errors: one line too
    assert "--pivot" in line


def test_plot_without_matplotlib_says_how_to_install_it(hand_csv, capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    line = _one_line_error(capsys, [str(hand_csv), "--plot", "--out", str(tmp_path)])
    assert "pip install 'kdrun[plot]'" in line
    assert not (tmp_path / "compare.md").exists()  # checked before anything is written


def test_console_script_errors_are_one_line(tmp_path):
    proc = subprocess.run(["kdrun-compare", str(tmp_path / "nope")], capture_output=True, text=True, check=False,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"kdrun-compare: error: '{tmp_path / 'nope'}' is neither a sweep dir "
                                   "nor a results CSV file")


# ---------------------------------------------------------------------------- launchers and devices
def test_gpu_pinning_is_a_no_op_on_cpu(compose_tiny):
    import torch

    from kdrun.cli import pin_job_device

    cfg, _ = compose_tiny("trainer.device=auto")
    if torch.cuda.device_count() < 2:
        assert pin_job_device(cfg, job_num=3) is None and cfg.trainer.device == "auto"
    assert pin_job_device(cfg, job_num=3, device_count=0) is None and cfg.trainer.device == "auto"
    assert pin_job_device(cfg, job_num=3, device_count=1) is None and cfg.trainer.device == "auto"
    assert pin_job_device(cfg, job_num=3, device_count=2) == "cuda:1" and cfg.trainer.device == "cuda:1"
    cfg, _ = compose_tiny("trainer.device=cpu")
    assert pin_job_device(cfg, job_num=3, device_count=4) is None and cfg.trainer.device == "cpu"


def test_missing_launcher_plugin_is_one_line_naming_the_extra(monkeypatch):
    from kdrun import cli

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"hydra/launcher=slurm needs a Hydra plugin .*pip install 'kdrun\[slurm\]'"):
        cli.check_plugins(["loss=kd", "hydra/launcher=slurm"])
    with pytest.raises(ConfigError, match=r"kdrun\[optuna\]"):
        cli.check_plugins(["hydra/sweeper=kd_optuna"])
    cli.check_plugins(["hydra/launcher=sequential", "hydra/launcher=basic"])  # built in
