"""Offline distillation: a frozen teacher teaches the student through the selected knowledge terms."""

from __future__ import annotations

import logging

from kdrun.errors import ConfigError
from kdrun.schemes.base import Scheme
from kdrun.schemes.stages import SupervisedStage

log = logging.getLogger("kdrun")


class Offline(Scheme):
    name = "offline"
    report_rows = (("teacher_top1", "teacher", "teacher"),)

    def validate(self, cfg) -> None:
        if "+" in str(cfg.teacher.name):
            raise ConfigError(f"teacher={cfg.teacher.name} names several teachers; use scheme=multi_teacher")

    def run(self, ctx) -> dict:
        cfg = ctx.cfg
        out: dict = {}
        if not ctx.knowledge.needs_teacher():
            log.info("loss=none: no knowledge terms, so the student trains from labels alone (no teacher)")
            student = ctx.models.build(cfg.student)
            fit = ctx.distiller.fit(SupervisedStage(student, "student"), cfg.student)
            return {**fit.as_summary("student"), **ctx.models.stats(student, "student")}

        teacher = ctx.teachers.obtain(cfg.teacher, role="teacher")
        out.update(ctx.evaluate_summary(teacher, "teacher"))
        out.update(ctx.models.stats(teacher, "teacher"))

        student = ctx.models.build(cfg.student)
        fit = ctx.distiller.distill(student, teacher, cfg.student,
                          cache=lambda taps: ctx.teachers.cache(cfg.teacher, "teacher", taps))
        out.update(fit.as_summary("student"))
        out.update(ctx.models.stats(student, "student"))
        return out
