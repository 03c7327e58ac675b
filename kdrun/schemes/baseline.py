"""Baseline: train the student from labels alone (teachers and student baselines)."""

from __future__ import annotations

from kdrun.schemes.base import Scheme
from kdrun.schemes.stages import SupervisedStage


class Baseline(Scheme):
    name = "baseline"
    has_teacher = False
    uses_knowledge = False

    @classmethod
    def models_label(cls, cfg) -> str:
        return str(cfg.student.name)

    def run(self, ctx) -> dict:
        student = ctx.models.build(ctx.cfg.student)
        fit = ctx.distiller.fit(SupervisedStage(student, "student"), ctx.cfg.student)
        return {**fit.as_summary("student"), **ctx.models.stats(student, "student")}
