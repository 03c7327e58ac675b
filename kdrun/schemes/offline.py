"""Offline distillation: a frozen teacher teaches the student through the selected knowledge terms."""

from __future__ import annotations

import logging

from kdrun.schemes.base import Scheme
from kdrun.schemes.stages import DistillStage, InitStage, SupervisedStage

log = logging.getLogger("kdrun")


class Offline(Scheme):
    name = "offline"

    def needs_teacher(self, ctx) -> bool:
        return ctx.knowledge.needs_teacher()

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
        ctx.setup_knowledge(ctx.knowledge, student, teacher)
        ctx.run_init_stages(student, teacher, ctx.knowledge, cfg.student)
        fit = ctx.fit(DistillStage(student, teacher, ctx.knowledge, "student"), cfg.student)
        out.update(fit.as_summary("student"))
        out.update(ctx.model_stats(student, "student"))
        return out
