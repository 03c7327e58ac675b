"""A dataset and an optimizer of your own are each a class and one YAML in a config dir of
``hydra.searchpath``: nothing in kdrun lists them. Both toys are written here, in tmp_path."""

from __future__ import annotations

import csv
import sys
import textwrap

import pytest

from kdrun.config import compose, set_search_path
from kdrun.errors import ConfigError
from kdrun.run import run

MODULE = "kdrun_toy_extension"

TOY_MODULE = '''
from dataclasses import dataclass

import numpy as np
import torch

from kdrun.data import ArraySource, Splits

STEPS = []  # the lr of every step CountingSGD takes


@dataclass
class Stripes(ArraySource):
    """Two classes of noisy 16x16 grey images: horizontal or vertical stripes of width ``width``."""

    per_class: int
    width: int

    def load(self) -> Splits:
        rng = np.random.default_rng(0)
        lines = (np.arange(16) // self.width) % 2 * 160
        pattern = np.stack([np.tile(lines[:, None], (1, 16)), np.tile(lines[None, :], (16, 1))])
        def split(n):
            y = np.arange(2 * n) % 2
            x = pattern[y] + rng.integers(0, 60, (2 * n, 16, 16))
            return x.astype(np.uint8)[..., None], y.astype(np.int64)
        (x_train, y_train), (x_test, y_test) = split(self.per_class), split(4)
        return Splits(x_train, y_train, x_test, y_test, 2, ("horizontal", "vertical"))


class CountingSGD(torch.optim.SGD):
    """SGD that notes the lr of each step."""

    def step(self, closure=None):
        STEPS.append(self.param_groups[0]["lr"])
        return super().step(closure)
'''

TOY_DATASET = f"""
_target_: {MODULE}.Stripes
name: stripes
per_class: 24
width: 2
augment:
  crop_padding: 2
  hflip: false
mean: null
std: null
train_subset: null
test_subset: null
"""

TOY_OPTIM = f"""
_target_: {MODULE}.CountingSGD
_partial_: true
lr: 0.2
momentum: 0.5
"""


@pytest.fixture
def toy_dir(tmp_path, monkeypatch):
    """<tmp>/conf with dataset/toy.yaml and optim/toy.yaml, and the toy module importable."""
    (tmp_path / f"{MODULE}.py").write_text(textwrap.dedent(TOY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    for group, text in (("dataset", TOY_DATASET), ("optim", TOY_OPTIM)):
        (tmp_path / "conf" / group).mkdir(parents=True)
        (tmp_path / "conf" / group / "toy.yaml").write_text(text)
    yield tmp_path / "conf"
    set_search_path([])  # later composes see kdrun's conf/ alone
    sys.modules.pop(MODULE, None)


def toy_overrides(conf, tmp_path, *extra):
    return [
        f"hydra.searchpath=[file://{conf}]", "dataset=toy", "optim=toy", "scheme=baseline", "student=resnet8",
        "trainer.epochs=2", "trainer.batch_size=16", "trainer.progress=off", "trainer.device=cpu",
        "trainer.amp=off", f"paths.output_root={tmp_path / 'outputs'}", *extra,
    ]


def test_a_toy_dataset_and_optimizer_from_a_search_path_dir_train(toy_dir, tmp_path):
    overrides = toy_overrides(toy_dir, tmp_path)
    summary = run(compose(overrides), run_dir=tmp_path / "run", overrides=overrides)
    assert summary["status"] == "ok", summary.get("error")
    assert summary["dataset"] == "stripes"
    # 48 training images in batches of 16 for two epochs: six steps, each taken by the toy optimizer
    # at its YAML's lr (multistep's milestones lie beyond two epochs)
    assert sys.modules[MODULE].STEPS == [0.2] * 6
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["stage"] == "student"]
    assert [(r["epoch"], float(r["lr"])) for r in rows] == [("1", 0.2), ("2", 0.2)]
    assert 0 <= float(rows[-1]["test_top1"]) <= 100


def test_a_toy_dataset_is_typed_by_its_class_and_the_optimizer_by_its_signature(toy_dir, tmp_path):
    from kdrun.run import validate_run_config

    with pytest.raises(ConfigError, match=r"^dataset\.width='wide' is invalid: expected an integer$"):
        validate_run_config(compose(toy_overrides(toy_dir, tmp_path, "dataset.width=wide")))
    with pytest.raises(ConfigError, match=r"optim\._target_=kdrun_toy_extension\.CountingSGD refuses its settings "
                                          r"\(.*'dampening_typo'\)"):
        validate_run_config(compose(toy_overrides(toy_dir, tmp_path, "+optim.dampening_typo=0")))
