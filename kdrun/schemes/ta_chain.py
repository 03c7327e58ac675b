"""Teacher-assistant chain (Mirzadeh et al., AAAI 2020): teacher -> TA1 -> ... -> TAn -> student.

Each assistant is distilled from the model before it with the selected terms (cfg.loss) and the
student's recipe, then stored and reused like a teacher (its store key covers the chain above it).
"""

from __future__ import annotations

import logging

from kdrun.config import model_node, split_models
from kdrun.errors import ConfigError
from kdrun.schemes.base import Scheme

log = logging.getLogger("kdrun")


class TAChain(Scheme):
    name = "ta_chain"
    model_list_keys = ("ta",)
    report_rows = (("teacher_top1", "teacher", "teacher"), ("ta{k}_top1", "assistant {k}", "ta{k}"))

    @classmethod
    def models_label(cls, cfg) -> str:
        return "-".join([str(cfg.teacher.name), *cls.model_list(cfg, "ta"), str(cfg.student.name)])

    def validate(self, cfg) -> None:
        if not split_models(cfg.get("ta")):
            raise ConfigError("scheme=ta_chain needs teacher assistants: ta=[resnet56,resnet32] or ta=resnet56+resnet32")
        if not cfg.loss:
            raise ConfigError("scheme=ta_chain distils every link: choose knowledge terms, e.g. loss=kd")

    def run(self, ctx) -> dict:
        cfg = ctx.cfg
        self.validate(cfg)
        out: dict = {}
        teacher = ctx.teachers.obtain(cfg.teacher, role="teacher")
        out.update(ctx.evaluate_summary(teacher, "teacher"))
        out.update(ctx.models.stats(teacher, "teacher"))
        prev, prev_role = teacher, "teacher"
        chain = [str(cfg.teacher.name)]
        for k, name in enumerate(split_models(cfg.ta), start=1):
            role = f"ta{k}"
            ta = ctx.teachers.obtain(model_node(name), role=role, teacher=prev, teacher_role=prev_role)
            out[role] = name
            out.update(ctx.evaluate_summary(ta, role))
            out[f"{role}_params"] = ctx.models.stats(ta, role)[f"{role}_params"]
            prev, prev_role = ta, role
            chain.append(name)
        chain.append(str(cfg.student.name))
        out["chain"] = " -> ".join(chain)
        log.info("chain: %s", out["chain"])
        student = ctx.models.build(cfg.student)
        fit = ctx.distiller.distill(student, prev, cfg.student)
        out.update(fit.as_summary("student"))
        out.update(ctx.models.stats(student, "student"))
        return out
