"""Born-again networks (Furlanello et al., ICML 2018): generations of one architecture.

Generation 0 is trained from labels (it is the student's baseline, reused from the store). Each
generation k = 1..N starts from a fresh initialisation (seed + k) and is distilled from generation
k - 1 with the selected terms. Generations 1..N-1 are stored and reused like teachers; generation N
trains in this run. The summary has every generation's accuracy and the ensemble of generations
1..N (the paper's BANE).
"""

from __future__ import annotations

from kdrun.errors import ConfigError
from kdrun.schemes.base import Scheme
from kdrun.schemes.stages import EnsembleEval


class BornAgain(Scheme):
    name = "born_again"
    has_teacher = False
    report_rows = (("gen0_top1", "generation 0 (labels)", "student"), ("gen{k}_top1", "generation {k}", "student"),
                   ("ensemble_top1", "generations' ensemble", None))

    @classmethod
    def models_label(cls, cfg) -> str:
        return str(cfg.student.name)

    def __init__(self, name: str | None = None, generations: int = 2) -> None:
        super().__init__(name)
        if int(generations) < 1:
            raise ConfigError(f"scheme.generations={generations} must be >= 1")
        self.generations = int(generations)

    def validate(self, cfg) -> None:
        if not cfg.loss:
            raise ConfigError("scheme=born_again distils each generation: choose knowledge terms, e.g. loss=kd")

    def run(self, ctx) -> dict:
        cfg = ctx.cfg
        self.validate(cfg)
        node, seed, n = cfg.student, int(cfg.seed), self.generations
        out: dict = {"generations": n}
        prev = ctx.teachers.obtain(node, role="gen0")
        out.update(ctx.evaluate_summary(prev, "gen0"))
        out["teacher_top1"] = out["gen0_top1"]
        gens = {}
        for k in range(1, n):
            gen = ctx.teachers.obtain(node, role=f"gen{k}", teacher=prev, teacher_role=f"gen{k - 1}", init_seed=seed + k)
            out.update(ctx.evaluate_summary(gen, f"gen{k}"))
            gens[f"gen{k}"] = prev = gen
        last = ctx.models.build(node, seed + n)
        fit = ctx.distiller.distill(last, prev, node, name=f"gen{n}")
        out.update({f"gen{n}_top1": fit.top1_last, f"gen{n}_top1_best": fit.top1_best})
        gens[f"gen{n}"] = last
        scores = ctx.trainer.evaluate(EnsembleEval(gens)) if n > 1 else {"ensemble": {"test_top1": fit.top1_last}}
        out["ensemble_top1"] = scores["ensemble"]["test_top1"]
        out.update(fit.as_summary("student"))
        out.update(ctx.models.stats(last, "student"))
        return out
