"""Hydra's sweep syntax on kdrun's command line: every sweep function (`a,b`, choice, range, sort,
shuffle, glob) is read by Hydra's own override parser before Hydra starts, checked name by name,
listed as jobs, and names the jobs' folders. End to end (a real `kdrun -m 'loss=glob(...)'`):
tests/test_sweeps.py."""

from __future__ import annotations

import pytest

from kdrun.config import CONF_DIR, check_overrides, group_options, normalize_argv, parse_override
from kdrun.config.command_line import EXCLUDE_KEYS, job_dirname_override, jobs_of, parse
from kdrun.errors import ConfigError


def jobs(*overrides: str):
    return jobs_of(list(overrides), parse(list(overrides)))


def test_a_groups_glob_becomes_the_options_it_matches():
    # Hydra's own glob() sees only the top level of a group; kdrun's options include sub-folders
    pairs = sorted(p.stem for p in (CONF_DIR / "experiment" / "cifar100").glob("r5*.yaml"))
    assert len(pairs) >= 2
    assert normalize_argv(["-m", "experiment=glob(cifar100/r5*)"]) == [
        "-m", "experiment=" + ",".join(f"cifar100/{p}" for p in pairs)]
    assert normalize_argv(["loss=glob([kd,dist])"]) == ["loss=dist,kd"]
    assert normalize_argv(["student=glob(resnet5*,exclude=resnet50)"]) == ["student=resnet56"]
    # teacher lists are teacher combinations, also as sweep values
    assert normalize_argv(["teacher=[resnet56,resnet32],[resnet20,resnet8]", "ta=[resnet32]"]) == [
        "teacher=resnet56+resnet32,resnet20+resnet8", "ta=[resnet32]"]
    assert normalize_argv(["loss.kd.temperature=1,2", "--cfg", "job"]) == ["loss.kd.temperature=1,2", "--cfg", "job"]


@pytest.mark.parametrize(("text", "expected"), [
    ("loss=kd,kd+fitnet", ["loss=kd", "loss=kd+fitnet"]),
    ("loss=choice(kd,dist)", ["loss=kd", "loss=dist"]),
    ("loss=sort(kd,at,dist)", ["loss=at", "loss=dist", "loss=kd"]),
    ("seed=range(1,4)", ["seed=1", "seed=2", "seed=3"]),
    ("loss=glob([kd,dist])", ["loss=dist", "loss=kd"]),
])
def test_every_listable_sweep_function_gives_its_jobs(text, expected):
    assert [job for (job,) in jobs(text)] == expected


def test_shuffle_and_products_and_unlistable_sweeps():
    shuffled = jobs("seed=shuffle(range(5))", "loss=kd,dist")
    assert len(shuffled) == 10 and sorted({job[0] for job in shuffled}) == [f"seed={k}" for k in range(5)]
    assert jobs("loss.kd.temperature=interval(1,8)") is None  # only a search sweeper (Optuna) can draw from it


def test_every_value_of_a_sweep_is_checked_by_name():
    with pytest.raises(ConfigError, match=r"unknown loss 'fitnt' \(did you mean fitnet\?\)"):
        check_overrides(["-m", "loss=sort(kd,fitnt)"])
    with pytest.raises(ConfigError, match=r"loss=glob\(nomatch\*\) matches no loss option; valid: .*kd"):
        check_overrides(["-m", "loss=glob(nomatch*)"])
    with pytest.raises(ConfigError, match="unknown model 'resnet99' in ta=resnet56,resnet56\\+resnet99"):
        check_overrides(["-m", "ta=resnet56,resnet56+resnet99"])
    with pytest.raises(ConfigError, match="cannot read the override 'loss=glob\\(\\[kd'"):
        check_overrides(["loss=glob([kd"])
    check_overrides(["-m", "loss=shuffle(dist,dist+kd)"])  # a combination in a sweep is registered
    assert "dist+kd" in group_options("loss")


def test_sweep_job_folders_leave_out_the_keys_given_one_value():
    (override,) = job_dirname_override(["loss=glob([kd,dist])", "seed=0", "+tag=x", "paths.output_root=/tmp/o",
                                        "loss.kd.alpha=0.5,0.9", "hydra.sweep.dir=/tmp/s"])
    parsed = parse_override(override)
    assert parsed.key_or_group == EXCLUDE_KEYS == "hydra.job.config.override_dirname.exclude_keys"
    assert parsed.value() == ["seed", "tag", "paths.output_root"]
    assert job_dirname_override(["loss=kd,dist", f"{EXCLUDE_KEYS}=[seed]", "seed=0"]) == []  # the user's own list
    assert job_dirname_override(["loss=kd,dist", "seed=0,1"]) == []  # everything swept


def test_job_folder_names_are_safe_file_names(compose_tiny):
    from kdrun.config import MAX_JOB_DIRNAME, _job_dirname

    cfg, _ = compose_tiny()
    assert _job_dirname("experiment=cifar100/r56_r20,loss.kd.alpha=0.9", _root_=cfg) == \
        "experiment=cifar100-r56_r20,loss.kd.alpha=0.9"
    assert _job_dirname("loss=kd+fitnet,trainer.device=cuda:1,x='a b'", _root_=cfg) == \
        "loss=kd+fitnet,trainer.device=cuda_1,x=_a_b_"
    assert len(_job_dirname("x=" + "9" * 400, _root_=cfg)) == MAX_JOB_DIRNAME
    assert _job_dirname("", _root_=cfg) == "offline_resnet8-resnet8_kd_synthetic"  # nothing swept: the run's name
