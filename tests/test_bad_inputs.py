"""Every bad input is one line ``kdrun: error: <key>=<value> ...``, exit 2, before anything trains.

A table of bad inputs of every kind (config values of each type, keys and group options with their
near misses, models, files, checkpoints, datasets, output locations, sweep syntax, schemes, resume),
each given to the real command, :func:`kdrun.cli.main`, in this process with the test's tmp dir as
the working directory. Each must print exactly one stderr line naming the key and the bad value,
exit with status 2, show no traceback, and leave no ``outputs/`` (no run dir, no teacher in the
store: nothing trained) and no ``./data`` behind, within seconds. A valid base command (tiny
generated data, small models) makes sure each input is rejected for its own fault.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
import urllib.error

import numpy as np
import pytest

from kdrun.cli import main

#: a valid command on tiny generated data: each row adds one bad input to it
BASE = (
    "dataset=synthetic", "dataset.n_train=64", "dataset.n_test=32", "dataset.image_size=16",
    "teacher=resnet8", "student=resnet8", "teacher.epochs=1", "trainer.epochs=1",
    "trainer.limit_train_batches=1", "trainer.progress=off", "trainer.device=cpu", "trainer.amp=off",
)
MODELS = BASE[4:]  # the same without the dataset
NPZ = ("dataset=npz", "dataset.augment.crop_padding=2", *MODELS)
TIMM = ("student=timm", "student.name=resnet18")

# (id, arguments, fragments the one error line must hold); {files} is the folder of bad files
CASES = [
    # values of every type: integers, numbers, booleans, choices, lists
    ("batch_size_float", (*BASE, "trainer.batch_size=1.5"), ["trainer.batch_size=1.5", "integer"]),
    ("epochs_text", (*BASE, "trainer.epochs=abc"), ["trainer.epochs=abc", "integer"]),
    ("seed_text", (*BASE, "seed=abc"), ["seed=abc"]),
    ("lr_nan", (*BASE, "optim.lr=nan"), ["optim.lr=nan", "finite"]),
    ("lr_inf", (*BASE, "optim.lr=inf"), ["optim.lr=inf", "finite"]),
    ("lr_list", (*BASE, "optim.lr=[0.1,0.2]"), ["optim.lr=[0.1, 0.2]"]),
    ("lr_empty", (*BASE, "optim.lr="), ["optim.lr= must be"]),
    ("momentum_text", (*BASE, "optim.momentum=x"), ["optim.momentum=x"]),
    ("nesterov_text", (*BASE, "optim.nesterov=maybe"), ["optim.nesterov=maybe", "true or false"]),
    ("betas_one", (*BASE, "optim=adamw", "optim.betas=[0.9]"), ["optim.betas=[0.9]", "two numbers"]),
    ("amp_choice", (*BASE, "trainer.amp=fp8"), ["trainer.amp=fp8", "bf16"]),
    ("device_choice", (*BASE, "trainer.device=gpu"), ["trainer.device=gpu", "cuda:N"]),
    ("device_absent", (*BASE, "trainer.device=cuda:99"), ["trainer.device=cuda:99", "CUDA"]),
    ("milestones_text", (*BASE, "sched.milestones=abc"), ["sched.milestones=abc", "[150,180,210]"]),
    ("gamma_zero", (*BASE, "sched.gamma=0"), ["sched.gamma=0", "> 0"]),
    ("warmup_negative", (*BASE, "sched.warmup_epochs=-1"), ["sched.warmup_epochs=-1"]),
    ("teacher_epochs_negative", (*BASE, "teacher.epochs=-1"), ["teacher.epochs=-1"]),
    ("cache_dtype_choice", (*BASE, "teacher.cache_dtype=int8"), ["teacher.cache_dtype=int8", "float16"]),
    ("ce_weight_text", (*BASE, "ce_weight=abc"), ["ce_weight=abc"]),
    ("compare_baseline_int", (*BASE, "compare_baseline=2"), ["compare_baseline=2", "true or false"]),
    ("kd_temperature_nan", (*BASE, "loss.kd.temperature=nan"), ["loss.kd.temperature=nan", "finite"]),
    ("kd_alpha_range", (*BASE, "loss.kd.alpha=2"), ["loss.kd.alpha=2", "[0, 1]"]),
    ("kd_alpha_list", (*BASE, "loss.kd.alpha=[1,2]"), ["loss.kd.alpha=[1,2]", "number"]),
    ("kd_weight_text", (*BASE, "loss.kd.weight=abc"), ["loss.kd.weight=abc", "number"]),
    ("kd_standardize_text", (*BASE, "loss.kd.standardize=maybe"), ["loss.kd.standardize=maybe", "true or false"]),
    ("dkd_beta_text", (*BASE, "loss=dkd", "loss.dkd.beta=x"), ["loss.dkd.beta=x", "number"]),
    ("tap_list", (*BASE, "loss=fitnet", "loss.fitnet.student_tap=[stage1,stage2]"), ["loss.fitnet.student_tap="]),
    # keys: near misses, unselected terms, root keys
    ("key_near_miss", (*BASE, "trainer.epoch=1"), ["trainer.epoch", "did you mean trainer.epochs?"]),
    ("key_plus_near_miss", (*BASE, "+trainer.epoch=1"), ["trainer.epoch", "did you mean trainer.epochs?"]),
    ("root_key_near_miss", (*BASE, "sede=1"), ["sede", "did you mean seed?"]),
    ("term_key_near_miss", (*BASE, "loss.kd.temprature=4"), ["did you mean loss.kd.temperature?"]),
    ("term_not_selected", (*BASE, "loss.fitnet.weight=10"), ["loss.fitnet.weight", "loss=kd+fitnet"]),
    ("dataset_key_near_miss", (*BASE, "dataset.augment.crop_pading=0"),
     ["did you mean dataset.augment.crop_padding?"]),
    # group options
    ("student_near_miss", (*BASE, "student=resnet2O"), ["'resnet2O'", "did you mean resnet20?"]),
    ("loss_term_unknown", (*BASE, "loss=kd+nosuch"), ["'nosuch'", "fitnet"]),
    ("scheme_near_miss", (*BASE, "scheme=offlin"), ["'offlin'", "did you mean offline?"]),
    ("experiment_unknown", (*BASE, "experiment=nosuch"), ["'nosuch'", "quickstart"]),
    ("teacher_twice", (*BASE, "scheme=multi_teacher", "teacher=[resnet8,resnet8]"), ["resnet8 twice"]),
    # models, taps and terms that cannot pair the models
    ("timm_unknown", (*BASE, "student=timm", "student.name=resnet999"), ["student.name=resnet999", "timm"]),
    ("timm_without_name", (*BASE, "student=timm"), ["student.name="]),
    ("pretrained_missing", (*BASE, *TIMM, "student.pretrained=/nope"), ["student.pretrained=/nope", "no such file"]),
    ("pretrained_garbage", (*BASE, *TIMM, "student.pretrained={files}/garbage.safetensors"),
     ["student.pretrained=", "garbage.safetensors"]),
    ("tap_missing", (*BASE, "loss=kd+fitnet", "loss.fitnet.student_tap=stage9"), ["loss.fitnet", "stage9", "stage2"]),
    ("preact_term_timm_student", (*BASE, "loss=ab", *TIMM), ["loss.ab", "pre-activation", "timm"]),
    # checkpoints
    ("checkpoint_missing", (*BASE, "teacher.checkpoint=/nope.pt"), ["teacher.checkpoint=/nope.pt", "no such file"]),
    ("checkpoint_folder", (*BASE, "teacher.checkpoint={files}"), ["teacher.checkpoint=", "directory"]),
    ("checkpoint_empty", (*BASE, "teacher.checkpoint={files}/empty.pt"), ["teacher.checkpoint=", "empty"]),
    ("checkpoint_truncated", (*BASE, "teacher.checkpoint={files}/truncated.pt"), ["teacher.checkpoint=", "truncated"]),
    ("checkpoint_foreign", (*BASE, "teacher.checkpoint={files}/foreign.pt"), ["teacher.checkpoint=", "not a kdrun"]),
    ("checkpoint_other_arch", (*BASE, "teacher.checkpoint={files}/resnet14.pt"),
     ["teacher.checkpoint=", "holds a resnet14", "teacher=resnet14"]),
    ("checkpoint_other_classes", (*BASE, "teacher.checkpoint={files}/resnet8_100.pt"),
     ["teacher.checkpoint=", "num_classes=100"]),
    ("checkpoints_per_teacher", (*BASE, "scheme=multi_teacher", "teacher=[resnet8,resnet14]",
                                 "teacher.checkpoint=[{files}/resnet8.pt]"), ["teacher.checkpoint", "2 teachers"]),
    # datasets
    ("npz_without_path", NPZ, ["dataset.path="]),
    ("npz_missing", (*NPZ, "dataset.path={files}/nope.npz"), ["dataset.path=", "nope.npz", "no such file"]),
    ("npz_not_zip", (*NPZ, "dataset.path={files}/notzip.npz"), ["notzip.npz", "not a .npz", "np.savez"]),
    ("npz_missing_array", (*NPZ, "dataset.path={files}/no_y_test.npz"), ["lacks array 'y_test'"]),
    ("npz_float_pixels", (*NPZ, "dataset.path={files}/float.npz"), ["x_train has dtype float32", "uint8"]),
    ("npz_negative_label", (*NPZ, "dataset.path={files}/negative.npz"), ["negative label (-1)"]),
    ("npz_label_1e6", (*NPZ, "dataset.path={files}/huge_label.npz"),
     ["1000001 classes", "np.unique"]),
    ("npz_label_only_in_test", (*NPZ, "dataset.path={files}/test_only.npz"), ["label 7 occurs in y_test"]),
    ("npz_label_gap", (*NPZ, "dataset.path={files}/gap.npz"), ["class 2 has no training image", "np.unique"]),
    ("npz_label_count", (*NPZ, "dataset.path={files}/short_labels.npz"), ["y_train has 29 labels", "32 images"]),
    ("npz_shapes_differ", (*NPZ, "dataset.path={files}/shapes.npz"), ["x_test images are (20, 20, 3)"]),
    ("imagefolder_without_root", ("dataset=imagefolder", *MODELS), ["dataset.root="]),
    ("imagefolder_empty_root", ("dataset=imagefolder", "dataset.root={files}/empty_dir", *MODELS),
     ["dataset.root=", "has no train/ folder"]),
    ("fashion_mnist_wrong_root", ("dataset=fashion_mnist", "dataset.root={files}/empty_dir", *MODELS),
     ["empty_dir", "dataset.root=DIR", "fashion_mnist_mini"]),
    ("cifar100_offline_no_download", ("dataset=cifar100", "dataset.download=false", *MODELS),
     ["cifar100 not found", "dataset.download=true"]),
    ("cifar100_offline_download", ("dataset=cifar100", "dataset.download=true", *MODELS),
     ["cifar100 not found", "download failed", "dataset=synthetic"]),
    # Hydra types dataset.download as a bool, which reads yes/no/on/off as true/false
    ("download_text", ("dataset=cifar10", "dataset.download=maybe", *MODELS),
     ["dataset.download='maybe'", "true or false"]),
    ("synthetic_one_class", (*BASE, "dataset.num_classes=1"), ["dataset.num_classes=1"]),
    ("crop_padding_too_big", (*BASE, "dataset.augment.crop_padding=16"), ["dataset.augment.crop_padding=16"]),
    ("std_zero", (*BASE, "dataset.std=[0,0,0]"), ["dataset.std=[0, 0, 0]", "> 0"]),
    # output locations
    ("output_root_unwritable", (*BASE, "paths.output_root=/proc/x"), ["/proc/x", "paths.output_root=DIR"]),
    ("output_root_is_file", (*BASE, "paths.output_root={files}/a_file"), ["paths.output_root=", "is a file"]),
    ("run_dir_is_file", (*BASE, "hydra.run.dir={files}/a_file"), ["hydra.run.dir=", "is a file"]),
    ("store_is_file", (*BASE, "paths.store={files}/a_file"), ["paths.store=", "is a file"]),
    # sweep and override syntax
    ("sweep_unclosed_list", ("-m", *BASE, "loss.kd.temperature=[1,2"), ["loss.kd.temperature=[1,2"]),
    ("sweep_unknown_option", ("-m", *BASE, "loss=kd,nosuch"), ["'nosuch'"]),
    ("sweep_every_job_bad", ("-m", *BASE, "loss.kd.temperature=0,-1"), ["every job", "loss.kd.temperature=0"]),
    ("sweep_without_m", (*BASE, "loss.kd.temperature=1,2"), ["loss.kd.temperature=1,2", "kdrun -m"]),
    ("multirun_and_cfg", ("-m", *BASE, "--cfg", "job"), ["--cfg and --multirun"]),
    ("override_double_equals", (*BASE, "trainer.epochs==3"), ["trainer.epochs==3"]),
    # schemes
    ("ta_chain_without_ta", (*BASE, "scheme=ta_chain"), ["scheme=ta_chain", "ta=["]),
    ("ta_unknown_model", (*BASE, "scheme=ta_chain", "ta=[nosuch]"), ["'nosuch'", "ta=[nosuch]"]),
    ("mutual_one_peer", (*BASE, "scheme=mutual", "peers=[resnet8]"), ["scheme=mutual", "peers=["]),
    ("aggregation_unknown", (*BASE, "scheme=multi_teacher", "teacher=[resnet8,resnet14]", "scheme.aggregation=foo"),
     ["scheme.aggregation", "foo", "confidence"]),
    ("weights_length", (*BASE, "scheme=multi_teacher", "teacher=[resnet8,resnet14]", "scheme.aggregation=weights",
                        "scheme.weights=[1]"), ["scheme.weights", "2 teachers"]),
    ("generations_zero", (*BASE, "scheme=born_again", "scheme.generations=0"), ["scheme.generations=0"]),
    # resume
    ("resume_damaged_config", (*BASE, "hydra.run.dir={files}/damaged_run", "trainer.resume=true"),
     ["trainer.resume=true", "config.yaml"]),
    ("resume_missing_dir", (*BASE, "hydra.run.dir={files}/no_such_run", "trainer.resume=true"),
     ["trainer.resume=true", "no_such_run", "does not exist"]),
    ("resume_without_run_dir", (*BASE, "trainer.resume=true"), ["trainer.resume=true", "hydra.run.dir=DIR"]),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad files of every kind: npz datasets, checkpoints, weights, a file where a folder belongs."""
    import torch

    from kdrun.engine.checkpoint import save_checkpoint
    from kdrun.models import create_model

    d = tmp_path_factory.mktemp("bad_files")
    rng = np.random.default_rng(0)

    def images(n, side=16):
        return rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)

    good = {"x_train": images(32), "y_train": np.arange(32) % 4, "x_test": images(8), "y_test": np.arange(8) % 4}

    def npz(name, **change):
        np.savez(d / name, **{k: v for k, v in {**good, **change}.items() if v is not None})

    npz("no_y_test.npz", y_test=None)
    npz("float.npz", x_train=good["x_train"].astype(np.float32) / 255)
    npz("negative.npz", y_train=good["y_train"] - 1)
    npz("huge_label.npz", y_train=np.where(np.arange(32) == 0, 10**6, good["y_train"]))
    npz("test_only.npz", y_test=np.where(np.arange(8) == 0, 7, good["y_test"]))
    npz("gap.npz", y_train=np.where(good["y_train"] == 2, 3, good["y_train"]),
        y_test=np.where(good["y_test"] == 2, 3, good["y_test"]))
    npz("short_labels.npz", y_train=good["y_train"][:29])
    npz("shapes.npz", x_test=images(8, 20))
    (d / "notzip.npz").write_text("not an archive")
    save_checkpoint(d / "resnet8.pt", create_model("resnet8", num_classes=10, image_size=16))
    save_checkpoint(d / "resnet14.pt", create_model("resnet14", num_classes=10, image_size=16))
    save_checkpoint(d / "resnet8_100.pt", create_model("resnet8", num_classes=100, image_size=16))
    whole = (d / "resnet8.pt").read_bytes()
    (d / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    torch.save({"foo": 1}, d / "foreign.pt")
    (d / "empty.pt").write_bytes(b"")
    (d / "garbage.safetensors").write_text("not safetensors")
    (d / "a_file").write_text("a file, not a folder")
    (d / "empty_dir").mkdir()
    (d / "damaged_run").mkdir()
    (d / "damaged_run" / "config.yaml").write_text("trainer: [unclosed\n  : :")
    return d


@pytest.fixture
def in_process(tmp_path, monkeypatch):
    """Run kdrun's main() here with tmp_path as the working directory; put back what it changes
    (argv, the SIGTERM handler, logging handlers, Hydra's global config, `a+b` combos it registered)."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from kdrun.config import COMBO_GROUPS

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["kdrun"])
    monkeypatch.setenv("COLUMNS", "160")
    monkeypatch.delenv("KDRUN_DATA", raising=False)
    root, kdrun_log = logging.getLogger(), logging.getLogger("kdrun")
    saved = (list(root.handlers), root.level, list(kdrun_log.handlers), kdrun_log.level, kdrun_log.propagate)
    sigterm = signal.getsignal(signal.SIGTERM)
    repo = ConfigStore.instance().repo
    combos = {group: set(repo.get(group, {})) for group in COMBO_GROUPS}
    yield
    for group, names in combos.items():
        for name in set(repo.get(group, {})) - names:
            del repo[group][name]
    signal.signal(signal.SIGTERM, sigterm)
    root.handlers[:], root.level = saved[0], saved[1]
    kdrun_log.handlers[:], kdrun_log.level, kdrun_log.propagate = saved[2], saved[3], saved[4]
    HydraConfig.instance().cfg = None
    GlobalHydra.instance().clear()


def offline(monkeypatch):
    """No network, as on an offline machine: the download fails after torchvision made its folder."""
    from torchvision.datasets import utils

    def fail(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(utils, "_get_redirect_url", fail)
    monkeypatch.setattr(utils, "_urlretrieve", fail)


@pytest.mark.parametrize("case, args, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, args, fragments, files, in_process, tmp_path,
                                                         capsys, monkeypatch):
    if case == "cifar100_offline_download":
        offline(monkeypatch)
    damaged = (files / "damaged_run" / "config.yaml").read_text()
    argv = [a.format(files=files) for a in args]
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    seconds = time.perf_counter() - start
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("kdrun: error: "), err
    assert "Traceback" not in err + out
    for fragment in fragments:
        assert fragment in lines[0]
    assert not (tmp_path / "outputs").exists(), sorted(p.name for p in (tmp_path / "outputs").rglob("*"))
    assert not (tmp_path / "data").exists()
    assert "training it" not in out  # no teacher (or baseline) started training
    assert (files / "damaged_run" / "config.yaml").read_text() == damaged
    assert seconds < 30


def test_the_table_covers_at_least_40_inputs_of_every_kind():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
    text = " ".join(" ".join(c[1]) for c in CASES)
    for kind in ("trainer.", "optim.", "sched.", "teacher.", "student.", "loss.", "scheme.", "dataset.",
                 "checkpoint=", "paths.", "hydra.run.dir", "-m", "trainer.resume=true"):
        assert kind in text, kind


def test_help_into_a_closed_pipe_is_quiet(tmp_path):
    # `kdrun --help | head -1`: the reader leaves early; kdrun ends without a BrokenPipeError traceback
    proc = subprocess.run(["bash", "-c", "kdrun --help | head -1; exit ${PIPESTATUS[0]}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1 and "Traceback" not in proc.stderr and "Error" not in proc.stderr
