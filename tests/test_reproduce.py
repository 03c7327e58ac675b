"""scripts/reproduce.py (kdrun.reproduce): benchmark pair configs, published numbers, runner, tables.

The end-to-end run uses the real r56_r20 experiment with its models swapped for resnet8 through the
pass-through --override, on tiny generated data (1 epoch of 2 batches), so it stays a few seconds
of training per kdrun process. Gaps are made by deleting job dirs and by a job that fails.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdrun.config import compose
from kdrun.errors import ConfigError
from kdrun.reproduce import catalog, main
from kdrun.reproduce import published as pub
from kdrun.reproduce.plan import Recipe
from kdrun.reproduce.report import GAP

REPO = Path(__file__).resolve().parents[1]

# pair -> (teacher, student, DKD beta): the CRD benchmark pairs; betas from mdistiller's configs
EXPECTED = {
    "w402_w162": ("wrn_40_2", "wrn_16_2", 6.0),
    "w402_w401": ("wrn_40_2", "wrn_40_1", 6.0),
    "r56_r20": ("resnet56", "resnet20", 2.0),
    "r110_r20": ("resnet110", "resnet20", 2.0),
    "r110_r32": ("resnet110", "resnet32", 2.0),
    "r32x4_r8x4": ("resnet32x4", "resnet8x4", 8.0),
    "vgg13_vgg8": ("vgg13", "vgg8", 6.0),
    "vgg13_mv2": ("vgg13", "mobilenetv2", 6.0),
    "r50_mv2": ("resnet50", "mobilenetv2", 8.0),
    "r50_vgg8": ("resnet50", "vgg8", 8.0),
    "r32x4_sv1": ("resnet32x4", "shufflenetv1", 8.0),
    "r32x4_sv2": ("resnet32x4", "shufflenetv2", 8.0),
    "w402_sv1": ("wrn_40_2", "shufflenetv1", 8.0),
}

TINY = [
    "--seeds", "0", "--dataset", "synthetic", "--epochs", "1", "--limit-train-batches", "2",
    "--override", "teacher=resnet8", "--override", "student=resnet8",
    "--override", "dataset.n_train=128", "--override", "dataset.n_test=64", "--override", "dataset.image_size=16",
    "--override", "trainer.batch_size=32", "--override", "trainer.progress=off",
    "--override", "trainer.threads=1", "--override", "trainer.device=cpu",
]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def md_row(md: str, table: str, label: str) -> list[str]:
    """The cells of row ``label`` in the table under heading ``table`` (pipes inside cells are \\|)."""
    section = md.split(f"## {table}", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.replace("\\|", "¦").strip().strip("|").split("|")]
        if cells and cells[0] == label:
            return [[p.strip() for p in c.split("¦")] for c in cells[1:]]
    raise AssertionError(f"no row {label} in {table}")


# ---------------------------------------------------------------------------- experiment files
@pytest.mark.parametrize("pair", sorted(EXPECTED))
def test_every_experiment_file_composes_with_its_pair(pair):
    teacher, student, beta = EXPECTED[pair]
    cfg = compose([f"experiment=cifar100/{pair}"])
    assert (cfg.teacher.name, cfg.student.name) == (teacher, student)
    assert cfg.pair.name == pair
    assert cfg.dataset.name == "cifar100" and cfg.trainer.epochs == 240 and cfg.optim.lr == 0.05
    assert list(cfg.sched.milestones) == [150, 180, 210]
    # CRD recipe: lr 0.01 for MobileNetV2/ShuffleNet students (the experiment file's student.lr), the rest optim.lr
    assert cfg.student.lr == (0.01 if student in ("mobilenetv2", "shufflenetv1", "shufflenetv2") else None)
    assert "dkd" not in cfg.loss  # the pair's DKD beta must not break other methods
    # the pair's beta applies by itself whenever dkd is selected (alone or in a combination) ...
    assert float(compose([f"experiment=cifar100/{pair}", "loss=dkd"]).loss.dkd.beta) == beta
    assert float(compose([f"experiment=cifar100/{pair}", "loss=kd+dkd"]).loss.dkd.beta) == beta
    # ... and a value on the command line still wins
    assert float(compose([f"experiment=cifar100/{pair}", "loss=dkd", "loss.dkd.beta=3"]).loss.dkd.beta) == 3


def test_pairs_are_the_experiment_files_in_table_order():
    files = {p.stem for p in (REPO / "conf" / "experiment" / "cifar100").glob("*.yaml")}
    assert files == set(EXPECTED) == set(catalog.PAIR_ORDER)
    assert catalog.available_pairs() == list(catalog.PAIR_ORDER)


def test_command_line_choices_beat_the_experiment_file():
    cfg = compose(["experiment=cifar100/r56_r20", "dataset=synthetic", "teacher=resnet8", "scheme=baseline"])
    assert (cfg.dataset.name, cfg.teacher.name, cfg.student.name, cfg.scheme.name) == (
        "synthetic", "resnet8", "resnet20", "baseline")


# ---------------------------------------------------------------------------- published numbers
def test_published_csv_has_the_columns_and_the_known_numbers():
    text = pub.default_text()
    assert text.splitlines()[0] == ",".join(pub.COLUMNS)
    rows = pub.load()
    kd, dkd = rows[("kd", "r56_r20")], rows[("dkd", "r56_r20")]
    assert (kd.top1, kd.epoch_kind) == (70.66, "last") and "RepDistiller README.md" in kd.source
    assert (dkd.top1, dkd.epoch_kind, dkd.runs) == (71.97, "best", 5) and "mdistiller README.md" in dkd.source
    assert rows[("teacher", "r32x4_r8x4")].top1 == 79.42 and rows[("vanilla", "r50_mv2")].top1 == 64.60
    assert rows[("crd+kd", "r32x4_r8x4")].top1 == 75.46 and "Table 1" in rows[("crd+kd", "r32x4_r8x4")].source
    assert {m for m, _ in rows} <= {m.name for m in catalog.METHODS}
    assert {p for _, p in rows} == set(EXPECTED)
    for pair in EXPECTED:  # every RepDistiller row for every pair, FSP only in the same-family table
        for method in ("teacher", "vanilla", "kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft",
                       "nst", "crd", "crd+kd"):
            assert rows[(method, pair)].top1 is not None, (method, pair)
    assert rows[("fsp", "w402_w401")].top1 is None  # the README prints 0.00: not run
    assert ("dkd", "r110_r20") not in rows and ("dkd", "r50_vgg8") not in rows  # mdistiller has none
    assert all(r.source and r.epoch_kind in ("last", "best") for r in rows.values())


@pytest.mark.parametrize("text, message", [
    ("method,pair,top1\nkd,r56_r20,1\n", "columns are"),
    ("method,pair,top1,source,epoch_kind,runs,note\nkd,r56_r20,7o.1,x,last,,\n", "top1 '7o.1'"),
    ("method,pair,top1,source,epoch_kind,runs,note\nkd,r56_r20,70.1,x,final,,\n", "epoch_kind 'final'"),
    ("method,pair,top1,source,epoch_kind,runs,note\nkd,r56_r20,70.1,,last,,\n", "source is empty"),
])
def test_a_malformed_published_csv_is_one_line_naming_the_value(text, message):
    with pytest.raises(ConfigError, match=message) as info:
        pub.parse(text, "x.csv")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------- command line
@pytest.mark.parametrize("args, message", [
    (["--pairs", "r56_r20,r99_r1"], "unknown pair 'r99_r1'; valid: w402_w162, w402_w401, r56_r20"),
    (["--methods", "kd,fitnets"], "unknown method 'fitnets'; valid: teacher, vanilla, kd, fitnet"),
    (["--seeds", "0,x"], "--seeds '0,x'"),
    (["--dataset", "cifar1000"], "unknown dataset 'cifar1000'; valid: cifar10, cifar100"),
    (["--override", "loss=kd"], "loss is set by the runner; use --methods"),
    (["--override", "crd+kdd:loss.kd.alpha=0.5"], "unknown method 'crd+kdd'"),
    (["--override", "trainer.epochs=1,2"], "is a sweep"),
])
def test_bad_input_is_one_line_and_exit_status_2(args, message, capsys, tmp_path):
    assert main([*args, "--out", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdrun-reproduce: error: ") and message in err and err.count("\n") == 1


def test_the_script_is_a_thin_wrapper(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "reproduce.py"), "--pairs", "nope",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("kdrun-reproduce: error: unknown pair 'nope'; valid: ")


def test_dry_run_commands(capsys, tmp_path):
    rc = main(["--pairs", "r56_r20,r110_r20", "--methods", "kd,ab,dkd,crd+kd", "--seeds", "0,1",
               "--epochs", "24", "--dataset", "synthetic", "--out", str(tmp_path), "--launcher", "parallel",
               "--override", "crd+kd:loss.kd.alpha=0.5", "--dry-run"])
    assert rc == 0
    out = capsys.readouterr().out
    cmds = [line for line in out.splitlines() if line.startswith("kdrun -m")]
    assert all("hydra/launcher=parallel" in c and "'sched.milestones=[15,18,21]'" in c for c in cmds)
    dkd = [c for c in cmds if "loss=dkd" in c]
    assert len(dkd) == 2 and all("loss.dkd.warmup=2" in c for c in dkd)  # 20 of 240 epochs -> 2 of 24
    assert "loss.dkd.beta" not in " ".join(cmds)  # the pair's beta comes with its experiment file
    assert sum("loss=ab " in c and "loss.ab.init_epochs=3" in c for c in cmds) == 2  # 30 of 240 -> 3 of 24
    assert sum("loss=kd " in c and "loss.kd.alpha" not in c for c in cmds) == 2
    assert sum("loss=crd+kd " in c and "loss.kd.alpha=0.5" in c for c in cmds) == 2
    # RepDistiller's CRD+KD recipe: CE 1 + KD 1 + CRD 0.8 (-r 1 -a 1 -b 0.8)
    assert all("ce_weight=1 loss.kd.weight=1" in c for c in cmds if "loss=crd+kd " in c)
    vanilla = [c for c in cmds if "scheme=baseline" in c]  # both pairs' students are resnet20: one baseline
    assert len(vanilla) == 1 and "experiment=cifar100/r56_r20 " in vanilla[0] and "seed=0,1" in vanilla[0]
    assert not (tmp_path / "reproduction.md").exists()


def test_full_recipe_commands_keep_the_recipe(capsys, tmp_path):
    assert main(["--pairs", "r32x4_sv1", "--methods", "ab,fsp,dkd", "--out", str(tmp_path), "--dry-run"]) == 0
    cmds = [line for line in capsys.readouterr().out.splitlines() if line.startswith("kdrun -m")]
    # no scaling: init stages keep their 30 epochs; nothing sets dkd apart (its beta comes with the pair)
    assert any("loss=ab,fsp,dkd seed=0,1,2 " in c for c in cmds)
    assert not any("init_epochs" in c or "milestones" in c or "warmup" in c for c in cmds)
    assert not any("loss.dkd.beta" in c for c in cmds)


def test_init_and_schedule_lengths_scale_with_the_epochs():
    r = Recipe(full_epochs=240, epochs=1, milestones=[150, 180, 210], term_epochs={"ab": {"init_epochs": (30, 1)}})
    assert r.scaled and r.scale(30, 1) == 1 and r.scale(20, 0) == 0 and r.scale(150, 1) == 1
    r.epochs = 60
    assert [r.scale(m, 1) for m in (150, 180, 210)] == [38, 45, 53] and r.scale(30, 1) == 8
    r.epochs = 240
    assert not r.scaled and r.scale(30, 1) == 30


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """kd and dkd on r56_r20 (models swapped for resnet8), and an AT job that fails while running
    (its teacher checkpoint is not a checkpoint: the preflight stops that job; the others go on)."""
    root = tmp_path_factory.mktemp("repro")
    (root / "t.pt").write_bytes(b"not a checkpoint")  # a missing file would stop the sweep before it starts
    args = ["--pairs", "r56_r20", "--methods", "kd,dkd,at", *TINY, "--override", f"at:teacher.checkpoint={root / 't.pt'}",
            "--store", str(root / "store"), "--out", str(root / "out")]
    rc = main(args)
    return root, args, rc


def test_runner_writes_both_tables_with_ours_and_published(e2e):
    root, _, rc = e2e
    out = root / "out"
    assert rc == 1  # the AT job failed; the tables are written all the same
    md = (out / "reproduction.md").read_text()
    for table in ("Last-epoch top-1 (%)", "Best-epoch top-1 (%)"):
        kd, dkd, at = (md_row(md, table, label)[0] for label in ("KD", "DKD", "AT"))
        assert kd[1].rstrip("†") == "70.66" and dkd[1].rstrip("†") == "71.97" and at[1].rstrip("†") == "70.55"
        for ours, _, delta in (kd, dkd):
            assert ours.endswith("± – (1)") and delta != GAP
            assert abs(float(delta) - (float(ours.split()[0]) - float(_.rstrip("†")))) < 0.006
        assert at[0] == GAP and at[2] == GAP  # failed: a gap, not a crash
        teacher, vanilla = md_row(md, table, "Teacher")[0], md_row(md, table, "Vanilla student")[0]
        assert teacher[1].rstrip("†") == "72.34" and vanilla[1].rstrip("†") == "69.06"
        assert teacher[0] != GAP and vanilla[0] != GAP
    assert md_row(md, "Last-epoch top-1 (%)", "DKD")[0][1] == "71.97†"  # best-epoch number, last table
    assert md_row(md, "Best-epoch top-1 (%)", "DKD")[0][1] == "71.97"
    assert "r56_r20 at seed 0: failed: teacher.checkpoint=" in md and "t.pt: cannot read checkpoint" in md
    assert "this run used resnet8 -> resnet8" in md

    wide = read_csv(out / "reproduction.csv")
    assert [r["method"] for r in wide] == ["teacher", "vanilla", "kd", "at", "dkd"]
    kd = next(r for r in wide if r["method"] == "kd")
    assert kd["last: r56_r20"].split(" | ")[1] == "70.66" and kd["best: r56_r20"].split(" | ")[1] == "70.66†"
    cells = read_csv(out / "reproduction_cells.csv")
    by = {(c["method"], c["epoch_kind"]): c for c in cells}
    assert by[("dkd", "best")]["published_top1"] == "71.9700" and by[("dkd", "best")]["published_epoch_kind"] == "best"
    assert by[("kd", "last")]["ours_n"] == "1" and by[("at", "last")]["ours_n"] == "0"
    summary = json.loads(next((out / "sweeps" / "r56_r20").glob("*/*/summary.json")).read_text())
    assert summary["teacher"] == "resnet8"


def test_dkd_jobs_get_the_pairs_beta_and_init_lengths_scale(e2e):
    root, _, _ = e2e
    overrides, configs = {}, {}
    for path in (root / "out" / "sweeps" / "r56_r20").glob("*/*/.hydra/overrides.yaml"):
        text = path.read_text()
        loss = next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("- loss="))
        overrides[loss] = text
        configs[loss] = OmegaConf.load(path.parent.parent / "config.yaml")
    assert set(overrides) == {"kd", "dkd", "at"}
    assert "loss.dkd.warmup=0" in overrides["dkd"]
    assert configs["dkd"].loss.dkd.beta == 2.0  # r56_r20's DKD beta, from conf/recipe/dkd/cifar100/
    assert "loss.dkd" not in overrides["kd"] and "teacher.checkpoint=" in overrides["at"]


def test_a_second_run_reuses_what_is_done(e2e, capsys):
    _, args, _ = e2e
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1 kdrun sweeps, 1 jobs (3 already have an ok run")  # only the failed AT job again
    assert "loss=at " in out


def test_deleted_jobs_and_a_pair_never_run_are_gaps(e2e, tmp_path, capsys):
    root, args, _ = e2e
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    for summary in (out / "sweeps" / "r56_r20").glob("*/*/summary.json"):
        if json.loads(summary.read_text())["loss"] == "dkd":
            shutil.rmtree(summary.parent)
    args = [a if a != str(root / "out") else str(out) for a in args]
    args[args.index("r56_r20")] = "r56_r20,r32x4_r8x4"
    assert main([*args, "--report-only"]) == 0
    md = (out / "reproduction.md").read_text()
    dkd = md_row(md, "Best-epoch top-1 (%)", "DKD")
    assert dkd[0] == [GAP, "71.97", GAP]  # r56_r20: its jobs were deleted
    assert dkd[1] == [GAP, "76.32", GAP]  # r32x4_r8x4: never run, published still filled
    assert md_row(md, "Last-epoch top-1 (%)", "KD")[1] == [GAP, "73.33", GAP]
    assert md_row(md, "Last-epoch top-1 (%)", "KD")[0][0] != GAP
    assert "r56_r20 dkd seed 0: not run" in md and "r32x4_r8x4 kd seed 0: not run" in md
    capsys.readouterr()


def test_a_job_marked_failed_is_a_gap(e2e, tmp_path):
    root, args, _ = e2e
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    for path in (out / "sweeps" / "r56_r20").glob("*/*/summary.json"):
        summary = json.loads(path.read_text())
        if summary["loss"] == "kd":
            summary.update(status="failed", error="boom")
            path.write_text(json.dumps(summary))
    args = [a if a != str(root / "out") else str(out) for a in args]
    assert main([*args, "--report-only"]) == 0
    md = (out / "reproduction.md").read_text()
    assert md_row(md, "Last-epoch top-1 (%)", "KD")[0] == [GAP, "70.66", GAP]
    assert "r56_r20 kd seed 0: failed: boom" in md
    assert md_row(md, "Last-epoch top-1 (%)", "Teacher")[0][0] != GAP  # its teacher still counts
