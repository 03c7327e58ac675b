"""Crash safety: real ``kdrun`` processes killed (SIGKILL) or stopped (SIGTERM) at chosen points, then
resumed; the result must equal an uninterrupted run's, bit for bit.

Each scenario runs the real command in a subprocess with ``KDRUN_FAULT="<point>#<n>#<signal>"``
(kdrun/faults.py: the process signals itself the n-th time it passes that point), checks what the
kill left on disk, resumes, and compares with one uninterrupted reference run of the same config:
summary accuracies, metrics.csv rows (timing columns aside: no duplicate, none missing), last.pt
(weights, optimizer state, the fit record) and best.pt, and no ``.*.tmp`` file anywhere. On CPU with
one thread kdrun is deterministic, so a correct resume is exact.

The runs of the selected tests are started by a module fixture on a pool of two workers (the CPU
time is mostly each process's start-up: torch, timm, Hydra); each test waits for its own scenario.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import signal
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

TIMING = ("epoch_seconds", "images_per_second", "train_seconds")
KILLED = -signal.SIGKILL

# 192 training images in batches of 32: 6 steps per epoch, 18 per 3-epoch stage
DATA = (
    "dataset=synthetic", "dataset.n_train=192", "dataset.n_test=64", "dataset.image_size=16",
    "trainer.epochs=3", "trainer.batch_size=32",
    "trainer.threads=1", "trainer.amp=off", "trainer.progress=off", "trainer.device=cpu",
)
SCHEMES = {
    "baseline": ("scheme=baseline", "student=resnet8", *DATA),
    "offline": ("scheme=offline", "loss=kd", "teacher=resnet8", "student=resnet8", *DATA),
    "mutual": ("scheme=mutual", "peers=[resnet8,resnet8]", "loss=kd", *DATA),
}


# ---------------------------------------------------------------------------- helpers
def kdrun(cwd: Path, *args: str, fault: str | None = None, multirun: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KDRUN_FAULT"}
    if fault is not None:
        env["KDRUN_FAULT"] = fault
    cmd = ["kdrun", *(["-m"] if multirun else []), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def single(root: Path, base: tuple[str, ...], *extra: str, run: str = "run") -> tuple[str, ...]:
    """A single run in ``root/<run>`` with its store and outputs under ``root/outputs``."""
    return (*base, f"paths.output_root={root / 'outputs'}", f"hydra.run.dir={root / run}", *extra)


def raw_rows(path: Path) -> list[dict]:
    if not path.is_file() or not path.read_text().strip():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def rows(path: Path) -> list[dict]:
    """metrics.csv rows without the timing columns."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in raw_rows(path)]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def temp_files(root: Path) -> list[Path]:
    return sorted(root.rglob(".*.tmp"))


def same(a, b) -> bool:
    """Nested dicts/lists of tensors and numbers, compared exactly (NaN equals NaN); timing keys aside."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        keys = set(a) - set(TIMING)
        return isinstance(b, dict) and keys == set(b) - set(TIMING) and all(same(a[k], b[k]) for k in keys)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def assert_same_checkpoint(path: Path, ref: Path) -> None:
    got, want = ckpt(path), ckpt(ref)
    assert got.keys() == want.keys(), path
    for key in want:
        assert same(got[key], want[key]), f"{path}: {key} differs from the uninterrupted run's"


def assert_summary_matches_metrics(result: dict, metrics: Path, stage: str, prefix: str) -> None:
    """The summary's seconds and images/s cover every epoch of metrics.csv, the resumed ones too."""
    epochs = {r["epoch"]: r for r in raw_rows(metrics) if r["stage"] == stage}
    ips = [float(r["images_per_second"]) for r in epochs.values()]
    assert result[f"{prefix}_images_per_second"] == pytest.approx(sum(ips) / len(ips), rel=1e-5)
    assert 0 < result[f"{prefix}_train_seconds"] <= sum(float(r["epoch_seconds"]) for r in epochs.values()) + 1e-3


def assert_same_run(run_dir: Path, ref_dir: Path) -> None:
    """summary accuracies, metrics.csv rows, last.pt and best.pt equal the reference run's."""
    got, want = summary(run_dir), summary(ref_dir)
    assert got["status"] == "ok", got["error"]
    scores = [k for k in want if "top1" in k or "top5" in k or k.endswith("best_epoch")]
    assert {k: got.get(k) for k in scores} == {k: want[k] for k in scores}
    got_rows = rows(run_dir / "metrics.csv")
    keys = [(r["stage"], r["epoch"], r.get("model")) for r in got_rows]
    assert len(keys) == len(set(keys)), f"duplicate metrics rows: {keys}"
    assert got_rows == rows(ref_dir / "metrics.csv")
    # the student's stage is the last one (offline: after the teacher's; mutual: stage "mutual")
    assert_summary_matches_metrics(got, run_dir / "metrics.csv", got_rows[-1]["stage"], "student")
    for name in ("last.pt", "best.pt"):
        assert (run_dir / "checkpoints" / name).is_file(), name
        assert_same_checkpoint(run_dir / "checkpoints" / name, ref_dir / "checkpoints" / name)


def store_entry(root: Path) -> Path:
    (entry,) = [p for p in (root / "outputs" / "teachers").glob("*/*/seed*/*") if p.is_dir()]
    return entry


def check_left(left: dict, expected: dict) -> None:
    for key, value in expected.items():
        assert left[key] == value, f"after the kill: {key} is {left[key]!r}, expected {value!r}"


# ---------------------------------------------------------------------------- scenarios
def reference(root: Path, scheme: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    proc = kdrun(root, *single(root, SCHEMES[scheme]))
    assert proc.returncode == 0, proc.stderr
    return root / "run"


def after_kill(root: Path) -> dict:
    """What a killed run left: its checkpoints' epochs, metrics rows, temp files, summary, store entry."""
    run_dir = root / "run"
    ckpts = run_dir / "checkpoints"
    state = {
        "last_epoch": ckpt(ckpts / "last.pt")["epoch"] if (ckpts / "last.pt").is_file() else None,
        "best_epoch": ckpt(ckpts / "best.pt")["epoch"] if (ckpts / "best.pt").is_file() else None,
        "rows": [(r["stage"], int(r["epoch"])) for r in rows(run_dir / "metrics.csv")],
        "temp": [".".join(p.name.split(".")[1:3]) for p in temp_files(root)],  # .last.pt.<random>.tmp
        "summary": summary(run_dir) if (run_dir / "summary.json").is_file() else None,
    }
    if (root / "outputs" / "teachers").is_dir():
        entry = store_entry(root)
        last = entry / "checkpoints" / "last.pt"
        state["store_model"] = (entry / "model.pt").is_file()
        state["store_last_epoch"] = ckpt(last)["epoch"] if last.is_file() else None
        state["store_rows"] = [int(r["epoch"]) for r in rows(entry / "metrics.csv")]
    return state


def kill_and_resume(root: Path, scheme: str, fault: str, resume: str = "same") -> dict:
    """Run with ``fault``, note what it left, then resume: the ``same`` run dir with
    trainer.resume=true, or a ``new`` run (another run dir, same store) that needs the teacher."""
    root.mkdir(parents=True, exist_ok=True)
    base = SCHEMES[scheme]
    killed = kdrun(root, *single(root, base), fault=fault)
    out = {"root": root, "killed": killed, "left": after_kill(root)}
    if resume == "same":
        out["resumed"] = kdrun(root, *single(root, base, "trainer.resume=true"))
        out["run_dir"] = root / "run"
    else:
        out["resumed"] = kdrun(root, *single(root, base, run="run2"))
        out["run_dir"] = root / "run2"
    return out


def term_and_resume_verbatim(root: Path, scheme: str, fault: str) -> dict:
    """SIGTERM, then the resume command kdrun printed, run as printed (through a shell)."""
    root.mkdir(parents=True, exist_ok=True)
    stopped = kdrun(root, *single(root, SCHEMES[scheme]), fault=fault)
    out = {"root": root, "killed": stopped, "left": after_kill(root), "run_dir": root / "run"}
    lines = stopped.stderr.strip().splitlines()
    out["command"] = lines[-1] if lines else ""
    if out["command"].startswith("kdrun "):
        env = {k: v for k, v in os.environ.items() if k != "KDRUN_FAULT"}
        out["resumed"] = subprocess.run(out["command"], shell=True, cwd=root, env=env, capture_output=True,
                                        text=True, timeout=300, check=False)
    return out


def kill_at_best(root: Path, point: str, ref: Future) -> dict:
    """SIGKILL at ``point`` of the reference's best epoch (its last improvement): no later epoch
    writes best.pt again, so only the mend from last.pt can give the resumed run its best.pt."""
    ref_dir = ref.result()
    best, improvements, top = 0, 0, -1.0
    for r in raw_rows(ref_dir / "metrics.csv"):
        if float(r["test_top1"]) > top:
            best, improvements, top = int(r["epoch"]), improvements + 1, float(r["test_top1"])
    n = improvements if point == "write best.pt" else best  # best.pt is written on improvements only
    return {**kill_and_resume(root, "baseline", f"{point}#{n}#KILL"), "best": best}


def sweep_kill_and_resume(root: Path, fault: str) -> dict:
    """A two-job sweep (job 1, seed 0, is the baseline reference's config) killed in job 1, then run
    again with trainer.resume=true into the same sweep dir."""
    root.mkdir(parents=True, exist_ok=True)
    args = (*SCHEMES["baseline"], "seed=1,0", f"paths.output_root={root / 'outputs'}",
            f"hydra.sweep.dir={root / 'sweep'}")
    killed = kdrun(root, *args, fault=fault, multirun=True)
    jobs = sorted(p for p in (root / "sweep").iterdir() if p.is_dir() and p.name[0].isdigit())
    left = {"jobs": [p.name for p in jobs], "summaries": [(p / "summary.json").is_file() for p in jobs]}
    resumed = kdrun(root, *args, "trainer.resume=true", multirun=True)
    return {"root": root, "killed": killed, "left": left, "resumed": resumed}


#: SIGKILL points of a 3-epoch run (6 steps an epoch; metrics.csv is written once when the stage
#: starts, then once per epoch): name -> (scheme, KDRUN_FAULT, what the kill must have left)
KILLS = {
    "mid_epoch": ("baseline", "step#9#KILL", {"last_epoch": 1, "rows": [("student", 1)], "temp": []}),
    "first_last_pt": ("baseline", "write last.pt#1#KILL",
                      {"last_epoch": None, "rows": [("student", 1)], "temp": ["last.pt"]}),
    "final_last_pt": ("baseline", "write last.pt#3#KILL",
                      {"last_epoch": 2, "rows": [("student", e) for e in (1, 2, 3)], "temp": ["last.pt"]}),
    "first_best_pt": ("baseline", "write best.pt#1#KILL", {"last_epoch": 1, "best_epoch": None, "temp": ["best.pt"]}),
    "metrics_csv": ("baseline", "write metrics.csv#3#KILL",
                    {"last_epoch": 1, "rows": [("student", 1)], "temp": ["metrics.csv"]}),
    "summary_json": ("baseline", "write summary.json#1#KILL", {"last_epoch": 3, "temp": ["summary.json"]}),
    # everything trained: the resumed run trains nothing, yet reports every peer's and the ensemble's
    # best and last accuracy (kept in last.pt)
    "mutual_summary_json": ("mutual", "write summary.json#1#KILL", {"last_epoch": 3, "temp": ["summary.json"]}),
}
#: SIGKILL while the offline scheme trains its teacher into the store (teacher steps 1-18 come first):
#: name -> (KDRUN_FAULT, how to go on, what the kill must have left)
TEACHER_KILLS = {
    # mid-epoch 2 of the teacher; the next run (a new run dir) resumes the teacher from the store
    "teacher_mid_epoch": ("step#8#KILL", "new", {"store_model": False, "store_last_epoch": 1, "store_rows": [1]}),
    # before the store's first last.pt is complete: its metrics row of epoch 1 must not be doubled
    "teacher_first_last_pt": ("write last.pt#1#KILL", "same",
                              {"store_model": False, "store_last_epoch": None, "store_rows": [1], "temp": ["last.pt"]}),
    # the teacher's final weights half-written: the entry is not complete without model.pt
    "teacher_model_pt": ("write model.pt#1#KILL", "same",
                         {"store_model": False, "store_last_epoch": 3, "temp": ["model.pt"]}),
}


#: SIGTERM points of a baseline run: name -> (KDRUN_FAULT, what the stop must have left)
TERMS = {
    "sigterm_mid_epoch": ("step#9#TERM", {"last_epoch": 1, "rows": [("student", 1)], "temp": []}),
    # training is over; the summary being written when the signal comes must say interrupted
    "sigterm_summary_json": ("write summary.json#1#TERM", {"last_epoch": 3, "temp": []}),
}
#: points where a kill leaves last.pt naming an epoch as the best whose best.pt is not written yet
BEST_EPOCH_KILLS = ("write best.pt", "between last.pt and best.pt")


def planned(root: Path) -> dict[str, tuple]:
    """Every run of this file: name -> (reference it is compared with, function, its arguments),
    longest first, so that the two workers end together. A function that waits for its reference
    gets the reference's future as its last argument (it is planned after the reference)."""
    plan: dict[str, tuple] = {"ref offline": (None, reference, (root / "ref_offline", "offline"))}
    for name, (fault, how, _) in TEACHER_KILLS.items():
        plan[name] = ("ref offline", kill_and_resume, (root / name, "offline", fault, how))
    plan["ref mutual"] = (None, reference, (root / "ref_mutual", "mutual"))
    plan["sweep"] = ("ref baseline", sweep_kill_and_resume, (root / "sweep", "step#21#KILL"))
    plan["ref baseline"] = (None, reference, (root / "ref_baseline", "baseline"))
    for name, (fault, _) in TERMS.items():
        plan[name] = ("ref baseline", term_and_resume_verbatim, (root / name, "baseline", fault))
    for name, (scheme, fault, _) in sorted(KILLS.items(), key=lambda kv: kv[1][0] != "mutual"):
        plan[name] = (f"ref {scheme}", kill_and_resume, (root / name, scheme, fault))
    for point in BEST_EPOCH_KILLS:
        plan[point] = ("ref baseline", kill_at_best, (root / point.replace(" ", "_"), point))
    return plan


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """The runs of the selected tests (and their references), started at once on two workers:
    name -> Future. Each test is parametrized by the name of its scenario."""
    plan = planned(tmp_path_factory.mktemp("faults"))
    wanted = {item.callspec.params["name"] for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec")}
    wanted |= {plan[name][0] for name in wanted} - {None}
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        futures: dict[str, Future] = {}
        for name, (ref, fn, args) in plan.items():
            if name in wanted:
                waits = fn is kill_at_best
                futures[name] = pool.submit(fn, *args, *([futures[ref]] if waits else []))
        yield futures
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after a failure with -x: start no more runs


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(KILLS))
def test_sigkill_then_resume_equals_an_uninterrupted_run(runs, name):
    scheme, _, left = KILLS[name]
    ref = runs[f"ref {scheme}"].result()
    out = runs[name].result()
    assert out["killed"].returncode == KILLED, out["killed"].stderr[-2000:]
    check_left(out["left"], {"summary": None, **left})
    resumed = out["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Traceback" not in resumed.stderr
    assert_same_run(out["run_dir"], ref)
    assert temp_files(out["root"]) == []


@pytest.mark.parametrize("name", BEST_EPOCH_KILLS, ids=lambda point: point.replace(" ", "_"))
def test_sigkill_before_best_pt_of_the_best_epoch_then_resume_mends_it(runs, name):
    ref = runs["ref baseline"].result()
    out = runs[name].result()
    assert out["killed"].returncode == KILLED, out["killed"].stderr[-2000:]
    left = out["left"]
    # last.pt names its own epoch the best; best.pt is missing or holds an earlier epoch
    assert left["last_epoch"] == out["best"] and left["summary"] is None
    assert left["best_epoch"] is None or left["best_epoch"] < out["best"]
    assert left["temp"] == (["best.pt"] if name == "write best.pt" else [])
    assert out["resumed"].returncode == 0, out["resumed"].stderr[-2000:]
    assert_same_run(out["run_dir"], ref)
    assert ckpt(out["run_dir"] / "checkpoints" / "best.pt")["epoch"] == summary(ref)["student_best_epoch"]
    assert temp_files(out["root"]) == []


@pytest.mark.parametrize("name", list(TERMS))
def test_sigterm_is_interrupted_and_the_printed_command_resumes(runs, name):
    ref = runs["ref baseline"].result()
    out = runs[name].result()
    stopped = out["killed"]
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    assert "kdrun: error: interrupted by SIGTERM" in stopped.stderr
    check_left(out["left"], TERMS[name][1])
    assert out["left"]["summary"] is not None, "no summary.json after SIGTERM"
    assert out["left"]["summary"]["status"] == "interrupted"
    command = shlex.split(out["command"])
    assert command[0] == "kdrun" and command[-1] == "trainer.resume=true"
    assert f"hydra.run.dir={out['run_dir']}" in command
    assert out["resumed"].returncode == 0, out["resumed"].stderr[-2000:]
    assert_same_run(out["run_dir"], ref)
    assert temp_files(out["root"]) == []


@pytest.mark.parametrize("name", list(TEACHER_KILLS))
def test_sigkill_while_training_the_teacher_into_the_store(runs, name):
    ref = runs["ref offline"].result()
    out = runs[name].result()
    _, how, left = TEACHER_KILLS[name]
    assert out["killed"].returncode == KILLED, out["killed"].stderr[-2000:]
    check_left(out["left"], {"summary": None, **left})
    resumed = out["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    if left["store_last_epoch"]:  # resumed from the store's checkpoint, not trained again
        assert f"resuming after epoch {left['store_last_epoch']}" in (out["run_dir"] / "kdrun.log").read_text()
    # the store: one complete entry whose weights, summary and rows equal the uninterrupted run's
    entry, ref_entry = store_entry(out["root"]), store_entry(ref.parent)
    assert entry.name == ref_entry.name
    assert_same_checkpoint(entry / "model.pt", ref_entry / "model.pt")
    assert rows(entry / "metrics.csv") == rows(ref_entry / "metrics.csv")
    got, want = json.loads((entry / "summary.json").read_text()), json.loads((ref_entry / "summary.json").read_text())
    assert got["status"] == "ok"
    scores = [k for k in want if "top" in k or "epoch" in k]
    assert {k: got[k] for k in scores} == {k: want[k] for k in scores}
    assert_summary_matches_metrics(got, entry / "metrics.csv", "teacher", "model")
    if how == "same":
        assert_same_run(out["run_dir"], ref)
    else:  # a new run: it trained the teacher's remaining epochs and the whole student
        got_rows, ref_rows = rows(out["run_dir"] / "metrics.csv"), rows(ref / "metrics.csv")
        assert [r for r in got_rows if r["stage"] == "teacher"] == \
            [r for r in ref_rows if r["stage"] == "teacher" and r["epoch"] != "1"]
        assert [r for r in got_rows if r["stage"] != "teacher"] == [r for r in ref_rows if r["stage"] != "teacher"]
        got, want = summary(out["run_dir"]), summary(ref)
        assert got["status"] == "ok"
        scores = [k for k in want if "top1" in k or "top5" in k or k.endswith("best_epoch")]
        assert {k: got[k] for k in scores} == {k: want[k] for k in scores}
        for file in ("last.pt", "best.pt"):
            assert_same_checkpoint(out["run_dir"] / "checkpoints" / file, ref / "checkpoints" / file)
    assert temp_files(out["root"]) == []


@pytest.mark.parametrize("name", ["sweep"])
def test_sigkill_in_a_sweep_job_then_the_sweep_resumes(runs, name):
    ref = runs["ref baseline"].result()
    out = runs[name].result()
    assert out["killed"].returncode == KILLED, out["killed"].stderr[-2000:]
    # job 0 (18 steps) finished; job 1 was killed in its first epoch
    assert len(out["left"]["jobs"]) == 2 and out["left"]["summaries"] == [True, False]
    assert out["resumed"].returncode == 0, out["resumed"].stderr[-2000:]
    sweep = out["root"] / "sweep"
    with open(sweep / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["job"], r["status"]) for r in table] == [("0", "ok"), ("1", "ok")]
    job0, job1 = (next(sweep.glob(f"{k}_*")) for k in (0, 1))
    assert_same_run(job1, ref)
    # job 0 had ended: resumed, it trains nothing and still reports all of its training
    assert_summary_matches_metrics(summary(job0), job0 / "metrics.csv", "student", "student")
    assert temp_files(out["root"]) == []
