"""Multi-teacher distillation: several frozen teachers teach one student.

Logit terms (kd, dkd, dist, logit_mse...) read the teachers' logits aggregated per sample,
``z = sum_k w_k(x) z_k`` with weights that sum to one per sample:
- ``mean``: w_k = 1/K;
- ``weights``: fixed weights from ``scheme.weights`` (normalised);
- ``confidence``: CA-MKD (Zhang et al., ICASSP 2022): with CE_k teacher k's cross-entropy on the
  true label, w_k = (1 - softmax_k(CE)) / (K - 1), so a teacher that is confidently right weighs more.
Feature terms (fitnet, at, crd...) get one copy per teacher (own adapters), each weighted by the
batch mean of its teacher's weight.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.config import build_knowledge, model_node, split_models
from kdrun.errors import ConfigError
from kdrun.knowledge import KnowledgeSet, Step
from kdrun.schemes.base import Scheme
from kdrun.schemes.stages import EnsembleEval, SupervisedStage, freeze, tapped_forward

log = logging.getLogger("kdrun")

AGGREGATIONS = ("mean", "weights", "confidence")


def confidence_weights(teacher_logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """CA-MKD per-sample teacher weights, (B, K), rows summing to one.

    With CE_k the cross-entropy of teacher k on the true label, w_k = (1 - softmax_k(CE)) / (K - 1):
    a confident, correct teacher (low CE) gets a large weight. One teacher: weight 1.
    """
    k = len(teacher_logits)
    if k == 1:
        return torch.ones(targets.shape[0], 1, device=targets.device)
    ce = torch.stack([F.cross_entropy(z.float(), targets, reduction="none") for z in teacher_logits], dim=1)
    return (1.0 - F.softmax(ce, dim=1)) / (k - 1)



class MultiTeacherStage(SupervisedStage):
    def __init__(self, student, teachers: list[nn.Module], logit_set: KnowledgeSet,
                 feature_sets: list[KnowledgeSet], aggregation: str, weights: list[float] | None) -> None:
        super().__init__(student, "student")
        self.teachers = [freeze(t) for t in teachers]
        self.logit_set = logit_set
        self.feature_sets = nn.ModuleList(feature_sets)
        self.aggregation = aggregation
        self.fixed = torch.tensor(weights, dtype=torch.float32) if weights is not None else None
        self.s_taps = logit_set.student_taps().union(*(f.student_taps() for f in feature_sets))
        self.t_taps = [f.teacher_taps() | {"logits"} for f in feature_sets]

    def parameters_to_train(self):
        own = [p for p in self.feature_sets.parameters() if p.requires_grad]
        return super().parameters_to_train() + [p for p in self.logit_set.parameters() if p.requires_grad] + own

    def train(self) -> None:
        self.model.train()
        self.logit_set.train()
        self.feature_sets.train()
        for t in self.teachers:
            t.eval()

    def teacher_weights(self, teacher_logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        b, k = targets.shape[0], len(teacher_logits)
        if self.aggregation == "confidence":
            return confidence_weights(teacher_logits, targets)
        if self.aggregation == "weights":
            return self.fixed.to(targets.device).expand(b, k)
        return torch.full((b, k), 1.0 / k, device=targets.device)

    def training_step(self, x: torch.Tensor, step: Step):
        with torch.no_grad():
            t_outs = [tapped_forward(t, x, taps) for t, taps in zip(self.teachers, self.t_taps)]
        s_out = tapped_forward(self.model, x, self.s_taps)
        w = self.teacher_weights([o["logits"] for o in t_outs], step.targets)
        agg = sum(w[:, k, None] * o["logits"].float() for k, o in enumerate(t_outs))
        loss, logs = self.logit_set(s_out, {"logits": agg}, step)
        for k, fset in enumerate(self.feature_sets):
            value, flogs = fset(s_out, t_outs[k], step)
            scale = w[:, k].mean()
            loss = loss + scale * value
            for name, v in flogs.items():
                logs[name] = logs.get(name, 0.0) + scale.detach() * v
        return loss, s_out["logits"], logs

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"logit_set": self.logit_set, "feature_sets": self.feature_sets}


class MultiTeacher(Scheme):
    name = "multi_teacher"
    report_rows = (("teacher{k}_top1", "teacher {k}", "teacher{k}"),
                   ("teacher_ensemble_top1", "teachers' ensemble", None))

    def __init__(self, name: str | None = None, aggregation: str = "mean", weights=None) -> None:
        super().__init__(name)
        if aggregation not in AGGREGATIONS:
            raise ConfigError(f"unknown scheme.aggregation '{aggregation}'; valid: {', '.join(AGGREGATIONS)}")
        self.aggregation = aggregation
        self.weights = [float(w) for w in weights] if weights is not None else None
        if aggregation == "weights":
            if not self.weights or any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ConfigError("scheme.aggregation=weights needs scheme.weights=[w1,...] (one per teacher, >= 0)")
            total = sum(self.weights)
            self.weights = [w / total for w in self.weights]

    def validate(self, cfg) -> None:
        names = split_models(cfg.teacher.name)
        if self.weights is not None and self.aggregation == "weights" and len(self.weights) != len(names):
            raise ConfigError(f"scheme.weights has {len(self.weights)} entries for {len(names)} teachers ({cfg.teacher.name})")

    def teacher_nodes(self, cfg) -> list:
        names = split_models(cfg.teacher.name)
        ckpts = cfg.teacher.get("checkpoint")
        ckpts = list(ckpts) if isinstance(ckpts, (list, tuple)) or (ckpts is not None and not isinstance(ckpts, str)) else (
            [ckpts] if ckpts else [None] * len(names))
        if len(ckpts) != len(names):
            raise ConfigError(f"teacher.checkpoint has {len(ckpts)} entries for {len(names)} teachers; give one per teacher")
        nodes = []
        for name, ckpt in zip(names, ckpts):
            node = model_node(name)
            node.checkpoint = ckpt
            if cfg.teacher.get("epochs") is not None:
                node.epochs = cfg.teacher.epochs
            nodes.append(node)
        return nodes

    def run(self, ctx) -> dict:
        cfg = ctx.cfg
        self.validate(cfg)
        nodes = self.teacher_nodes(cfg)
        out: dict = {"teachers": cfg.teacher.name, "aggregation": self.aggregation}
        teachers = []
        for k, node in enumerate(nodes, start=1):
            role = f"teacher{k}"
            teacher = ctx.teachers.obtain(node, role=role)
            teachers.append(teacher)
            out[role] = str(node.name)
            out[f"{role}_params"] = ctx.models.stats(teacher, role)[f"{role}_params"]
        scores = ctx.trainer.evaluate(EnsembleEval({f"teacher{k}": t for k, t in enumerate(teachers, start=1)}))
        for name, score in scores.items():
            out[f"{name}_top1"] = score["test_top1"]
        out["teacher_ensemble_top1"] = out.pop("ensemble_top1")
        out["teacher_top1"] = out["teacher_ensemble_top1"]
        log.info("teachers: %s | ensemble top-1 %.2f%%", ", ".join(
            f"{out[f'teacher{k}']} {out[f'teacher{k}_top1']:.2f}%" for k in range(1, len(teachers) + 1)),
            out["teacher_ensemble_top1"])

        student = ctx.models.build(cfg.student)
        s_shapes = ctx.models.shapes(student)
        logit_terms = {n: t for n, t in build_knowledge(cfg.loss).terms.items() if t.reads_logits_only()}
        logit_set = KnowledgeSet(logit_terms, cfg.get("ce_weight", "auto"))
        logit_set.setup(s_shapes, {"logits": s_shapes["logits"]}, ctx.data.info)
        ctx.models.place(logit_set)
        feature_sets = []
        for teacher in teachers:
            terms = {n: t for n, t in build_knowledge(cfg.loss).terms.items() if not t.reads_logits_only()}
            fset = KnowledgeSet(terms, ce_weight=0)
            fset.setup(s_shapes, ctx.models.shapes(teacher), ctx.data.info)
            feature_sets.append(ctx.models.place(fset))
        stage = MultiTeacherStage(student, teachers, logit_set, feature_sets, self.aggregation, self.weights)
        fit = ctx.distiller.fit(stage, cfg.student)
        out.update(fit.as_summary("student"))
        out.update(ctx.models.stats(student, "student"))
        out["teacher_params"] = sum(out[f"teacher{k}_params"] for k in range(1, len(teachers) + 1))
        return out
