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
            student = ctx.build_model(cfg.student)
            fit = ctx.fit(SupervisedStage(student, "student"), cfg.student)
            return {**fit.as_summary("student"), **ctx.model_stats(student, "student")}

        teacher = ctx.obtain_model(cfg.teacher, role="teacher")
        out.update(ctx.evaluate_summary(teacher, "teacher"))
        out.update(ctx.model_stats(teacher, "teacher"))

        student = ctx.build_model(cfg.student)
        fit = ctx.distill(student, teacher, cfg.student,
                          cache=lambda taps: ctx.teacher_cache(cfg.teacher, "teacher", taps))
        out.update(fit.as_summary("student"))
        out.update(ctx.model_stats(student, "student"))
        return out
