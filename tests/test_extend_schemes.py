"""A scheme of your own is its class and one YAML in a config dir of ``hydra.searchpath``: the run-dir
name, the summary's teacher column, a root key of its own, the model names in it and the rows of the
end-of-run table all come from the class; nothing in kdrun lists schemes."""

from __future__ import annotations

import sys
import textwrap

import pytest

from kdrun.config import compose, config_groups, set_search_path
from kdrun.errors import ConfigError
from kdrun.report.console import render_summary
from kdrun.run import run

MODULE = "kdrun_toy_scheme"

TOY_MODULE = '''
from kdrun.schemes.base import Scheme
from kdrun.schemes.stages import SupervisedStage


class Twins(Scheme):
    """Trains the student and each model of ``twins`` from labels, side by side in one run."""

    name = "twins"
    has_teacher = False
    uses_knowledge = False
    model_list_keys = ("twins",)
    report_rows = (("twin{k}_top1", "twin {k}", "twin{k}"),)

    @classmethod
    def models_label(cls, cfg) -> str:
        return "+".join([str(cfg.student.name), *cls.model_list(cfg, "twins")])

    def validate(self, cfg) -> None:
        if not self.model_list(cfg, "twins"):
            from kdrun.errors import ConfigError
            raise ConfigError("scheme=twins needs twins=[a,b]")

    def run(self, ctx) -> dict:
        from kdrun.config import model_node

        out = {}
        for k, name in enumerate(self.model_list(ctx.cfg, "twins"), start=1):
            node = model_node(name)
            twin = ctx.models.build(node)
            fit = ctx.trainer.fit(SupervisedStage(twin, f"twin{k}"), epochs=1, lr=ctx.models.lr_for(node),
                                  ckpt_dir=None)
            out.update({f"twin{k}": name, f"twin{k}_top1": fit.top1_last})
        student = ctx.models.build(ctx.cfg.student)
        fit = ctx.distiller.fit(SupervisedStage(student, "student"), ctx.cfg.student)
        return {**out, **fit.as_summary("student"), **ctx.models.stats(student, "student")}
'''

TOY_YAML = f"""# @package _global_
scheme:
  _target_: {MODULE}.Twins
  name: twins
twins: null
"""


@pytest.fixture
def toy_conf(tmp_path, monkeypatch):
    (tmp_path / f"{MODULE}.py").write_text(textwrap.dedent(TOY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "conf" / "scheme").mkdir(parents=True)
    (tmp_path / "conf" / "scheme" / "twins.yaml").write_text(TOY_YAML)
    yield tmp_path / "conf"
    set_search_path([])
    sys.modules.pop(MODULE, None)


def overrides(conf, tmp_path, *extra):
    return [f"hydra.searchpath=[file://{conf}]", "scheme=twins", "student=resnet8", "dataset=synthetic",
            "dataset.n_train=96", "dataset.n_test=32", "dataset.image_size=16", "trainer.epochs=1",
            "trainer.batch_size=32", "trainer.progress=off", "trainer.device=cpu", "trainer.amp=off",
            f"paths.output_root={tmp_path / 'outputs'}", *extra]


def test_a_toy_scheme_from_a_search_path_dir_runs_and_reports(toy_conf, tmp_path):
    ov = overrides(toy_conf, tmp_path, "twins=[resnet14,resnet8]")
    cfg = compose(ov)
    from kdrun.config import _run_name

    assert _run_name(_root_=cfg) == "twins_resnet8+resnet14+resnet8_synthetic"  # the class names the run dir
    summary = run(cfg, run_dir=tmp_path / "run", overrides=ov)
    assert summary["status"] == "ok", summary["error"]
    assert summary["teacher"] is None and summary["loss"] == "none"  # has_teacher, uses_knowledge
    assert summary["twin1"] == "resnet14" and 0 <= summary["twin2_top1"] <= 100
    table = render_summary(summary, sys.modules[MODULE].Twins.report_rows)
    assert "twin 1" in table and "resnet14" in table and "twin 2" in table


def test_a_toy_schemes_root_key_is_checked_like_ta(toy_conf, tmp_path):
    from kdrun.cli import main

    assert "scheme" in config_groups()
    with pytest.raises(ConfigError, match="unknown model 'resnet9' in twins="):
        compose(overrides(toy_conf, tmp_path, "twins=[resnet9]"))
    set_search_path(overrides(toy_conf, tmp_path))
    with pytest.raises(SystemExit) as err:  # the scheme's own validation, before Hydra starts
        main(overrides(toy_conf, tmp_path))
    assert err.value.code == 2
    assert not (tmp_path / "outputs" / "runs").exists()
