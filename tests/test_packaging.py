"""kdrun as a user installs it: a wheel built from this tree, installed with ``pip install --target``
(no dependencies, no index: offline), then run from another directory with PYTHONPATH set to the
target, so that the installed copy is the one imported, never this checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import kdrun

REPO = Path(__file__).resolve().parents[1]
#: what a build reads: the package, the top-level conf/ (shipped as kdrun/conf) and the metadata files
SOURCES = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "kdrun", "conf")


def pip(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args, "--no-index", "--disable-pip-version-check", "-q"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of the tree (the build writes build/ and *.egg-info beside its sources)."""
    root = tmp_path_factory.mktemp("wheel")
    (root / "src").mkdir()
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / "src" / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, root / "src" / name)
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(root / "src"))
    (built,) = (root / "dist").glob("kdrun-*.whl")
    return built


@pytest.fixture(scope="module")
def target(wheel, tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    pip("install", "--no-deps", "--target", str(site), str(wheel))
    return site


def installed(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target)}
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_ships_every_config_the_mini_dataset_and_the_published_numbers(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.removeprefix("kdrun/conf/") for n in names if n.startswith("kdrun/conf/")}
    assert shipped == {p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert "train.yaml" in shipped and "experiment/cifar100/r56_r20.yaml" in shipped
    assert {"kdrun/data/assets/fashion_mnist_mini.npz", "kdrun/reproduce/published_cifar100.csv"} <= names
    packages = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "kdrun").rglob("__init__.py")}
    assert {f"{p}/__init__.py" for p in packages} <= names  # every subpackage, new ones included
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for line in ("kdrun = kdrun.cli:main", "kdrun-report = kdrun.report.__main__:main",
                 "kdrun-reproduce = kdrun.reproduce:main"):
        assert line in text


def test_version_is_kdruns_not_hydras(capsys):
    from kdrun.cli import _main

    _main(["--version"])
    assert capsys.readouterr().out == f"kdrun {kdrun.__version__}\n"


PROBE = textwrap.dedent("""
    import json, kdrun, numpy
    from kdrun.config import CONF_DIR
    from kdrun.reproduce import catalog, published
    mini = numpy.load(CONF_DIR.parent / "data" / "assets" / "fashion_mnist_mini.npz")
    print(json.dumps({"package": kdrun.__file__, "conf": str(CONF_DIR), "pairs": catalog.available_pairs(),
                      "published": len(published.load()), "mini": len(mini["y_train"])}))
""")


@pytest.mark.slow
def test_the_installed_wheel_runs_from_another_directory(target, tmp_path):
    probe = installed(target, tmp_path, sys.executable, "-c", PROBE)
    assert probe.returncode == 0, probe.stderr[-2000:]
    found = json.loads(probe.stdout)
    assert Path(found["package"]).is_relative_to(target) and Path(found["conf"]) == target / "kdrun" / "conf"
    assert sorted(found["pairs"]) == sorted(p.stem for p in (REPO / "conf/experiment/cifar100").glob("*.yaml"))
    assert found["published"] > 0 and found["mini"] == 6000

    version = installed(target, tmp_path, str(target / "bin" / "kdrun"), "--version")
    assert version.stdout.strip() == f"kdrun {kdrun.__version__}", version.stderr[-2000:]  # not Hydra's
    help_text = installed(target, tmp_path, sys.executable, "-m", "kdrun", "--help")
    assert help_text.returncode == 0 and "loss" in help_text.stdout, help_text.stderr[-2000:]

    run = installed(target, tmp_path, sys.executable, "-m", "kdrun", "scheme=baseline", "dataset=synthetic",
                    "dataset.n_train=32", "dataset.n_test=16", "dataset.image_size=16", "student=resnet8",
                    "trainer.epochs=1", "trainer.batch_size=16", "trainer.limit_train_batches=1",
                    "trainer.progress=off", "trainer.device=cpu", "trainer.amp=off", "trainer.threads=1")
    assert run.returncode == 0, run.stderr[-3000:]
    (summary,) = (tmp_path / "outputs" / "runs").glob("*/*/summary.json")
    assert json.loads(summary.read_text())["status"] == "ok"
    assert (summary.parent / ".hydra" / "config.yaml").is_file()
