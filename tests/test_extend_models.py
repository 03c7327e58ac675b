"""Adding a model is its builder plus one YAML in a config dir of your own (hydra.searchpath):
it is then a student, a teacher, an assistant, as the zoo's models are."""

from __future__ import annotations

import sys

import pytest

from kdrun.config import check_overrides, compose, group_options, model_node, set_search_path
from kdrun.errors import ConfigError
from kdrun.run import run

# a tiny two-stage network with kdrun's tap interface, in a module of the user's own
TOY_MODULE = '''
from kdrun.models.base import Stage, ZooModel, conv_bn


def build(name, num_classes, in_chans, width=4, head_width=8):
    stages = [Stage(conv_bn(width, width, stride=2)), Stage(conv_bn(width, head_width, stride=2))]
    return ZooModel(name, num_classes, in_chans, conv_bn(in_chans, width), stages, head_width)
'''
# toy.yaml takes its builder from toy_base.yaml (a defaults list) and sizes its head by interpolation
TOY_BASE_YAML = "_target_: kdrun_toy_model.build\nwidth: 4\n"
TOY_YAML = "defaults:\n  - toy_base\n  - _self_\nname: toy\nhead_width: ${.width}\n"


@pytest.fixture
def toy_dir(tmp_path, monkeypatch):
    (tmp_path / "kdrun_toy_model.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "kdrun_toy_model", raising=False)
    conf = tmp_path / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "toy_base.yaml").write_text(TOY_BASE_YAML)
    (conf / "model" / "toy.yaml").write_text(TOY_YAML)
    yield conf
    set_search_path([])  # later tests compose without this dir


def _overrides(tmp_path, conf, *extra):
    return [
        f"hydra.searchpath=[file://{conf}]", "dataset=synthetic", "dataset.n_train=64", "dataset.n_test=32",
        "dataset.image_size=16", "trainer.epochs=1", "trainer.batch_size=32", "trainer.limit_train_batches=1",
        "trainer.progress=off", "trainer.device=cpu", "trainer.amp=off", f"paths.output_root={tmp_path / 'out'}",
        *extra,
    ]


def _toy_params(num_classes: int) -> int:
    # stem conv 3->4 + BN, stage1 conv 4->4 + BN, stage2 conv 4->4 (head_width = width) + BN, fc 4->classes
    return (3 * 4 * 9 + 8) + (4 * 4 * 9 + 8) + (4 * 4 * 9 + 8) + (4 * num_classes + num_classes)


def test_toy_model_is_a_student(tmp_path, toy_dir):
    ov = _overrides(tmp_path, toy_dir, "scheme=baseline", "student=toy")
    summary = run(compose(ov), run_dir=tmp_path / "run", overrides=ov)
    assert summary["status"] == "ok" and summary["student"] == "toy"
    assert summary["student_params"] == _toy_params(10)  # synthetic data: 10 classes


def test_toy_model_is_a_teacher(tmp_path, toy_dir):
    ov = _overrides(tmp_path, toy_dir, "teacher=toy", "student=resnet8", "loss=kd")
    summary = run(compose(ov), run_dir=tmp_path / "run", overrides=ov)
    assert summary["status"] == "ok" and (summary["teacher"], summary["student"]) == ("toy", "resnet8")
    assert summary["teacher_params"] == _toy_params(10)
    assert "/teachers/synthetic/toy/seed0/" in summary["teacher_source"]


def test_toy_model_composes_for_assistants_and_only_while_searched(toy_dir):
    compose([f"hydra.searchpath=[file://{toy_dir}]"])
    assert {"toy", "toy_base"} <= set(group_options("teacher")) & set(group_options("student"))
    # assistants, peers and extra teachers get the model's composed config: defaults list, interpolation
    assert model_node("toy") == {"_target_": "kdrun_toy_model.build", "width": 4, "name": "toy", "head_width": 4}
    check_overrides(["ta=[resnet20,toy]", "peers=toy+toy"])
    set_search_path([])
    assert "toy" not in group_options("teacher")
    with pytest.raises(ConfigError, match="unknown student 'toy'"):
        check_overrides(["student=toy"])
