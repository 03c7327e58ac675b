"""Be Your Own Teacher (Zhang et al., ICCV 2019): self-distillation through shallow exits.

A classifier is attached after each stage but the last (a bottleneck that brings the stage's
features to the deepest stage's shape, then pooling and a linear layer). The deepest classifier
(the student's own) learns from labels; every shallow exit learns from labels and from the deepest
classifier's detached outputs through the selected logit terms (BYOT's own setting:
loss=kd loss.kd.temperature=3 loss.kd.alpha=0.3), plus an L2 hint from the deepest stage's features
(``scheme.feature_weight``, 0.03 in the paper's code). The exits are dropped at inference: the
saved student is the plain network. The summary has every exit's accuracy and their ensemble.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.config import build_knowledge
from kdrun.errors import ConfigError
from kdrun.knowledge import KnowledgeSet, Step
from kdrun.schemes.base import Scheme
from kdrun.schemes.stages import SupervisedStage, log_mean_softmax


class ShallowExit(nn.Module):
    """Bottleneck (1x1 reduce, k x k stride-k conv, 1x1 expand) to the deepest stage's shape + classifier."""

    def __init__(self, in_shape: tuple, deep_shape: tuple, num_classes: int) -> None:
        super().__init__()
        c_in, h_in = in_shape[0], in_shape[1]
        c_out, h_out = deep_shape[0], deep_shape[1]
        stride = max(1, h_in // max(h_out, 1))
        mid = max(c_out // 4, 8)
        self.bottleneck = nn.Sequential(
            nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, stride, stride=stride, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        )
        self.out_hw = tuple(deep_shape[1:])
        self.fc = nn.Linear(c_out, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.bottleneck(x)
        if tuple(feat.shape[-2:]) != self.out_hw:
            feat = F.adaptive_avg_pool2d(feat, self.out_hw)
        return feat, self.fc(torch.flatten(F.adaptive_avg_pool2d(feat, 1), 1))


class ByotEval(nn.Module):
    """Every exit's logits from one forward pass, plus their ensemble."""

    def __init__(self, student: nn.Module, exits: nn.ModuleList, stage_taps: list[str]) -> None:
        super().__init__()
        self.student, self.exits, self.stage_taps = student, exits, stage_taps

    def forward(self, x: torch.Tensor) -> dict:
        taps = self.student.forward_taps(x)
        out = {f"exit{k}": head(taps[tap])[1] for k, (head, tap) in enumerate(zip(self.exits, self.stage_taps), 1)}
        out[f"exit{len(self.stage_taps) + 1}"] = taps["logits"]
        out["ensemble"] = log_mean_softmax(list(out.values()))
        return out


class ByotStage(SupervisedStage):
    def __init__(self, student, exits: nn.ModuleList, stage_taps: list[str], deep_tap: str,
                 exit_sets: list[KnowledgeSet], feature_weight: float) -> None:
        super().__init__(student, "student")
        self.exits, self.stage_taps, self.deep_tap = exits, stage_taps, deep_tap
        self.exit_sets = nn.ModuleList(exit_sets)
        self.feature_weight = feature_weight
        self.primary = f"exit{len(stage_taps) + 1}"
        self._eval = ByotEval(student, exits, stage_taps)

    def parameters_to_train(self):
        extra = list(self.exits.parameters()) + list(self.exit_sets.parameters())
        return super().parameters_to_train() + [p for p in extra if p.requires_grad]

    def train(self) -> None:
        self.model.train()
        self.exits.train()
        self.exit_sets.train()

    def eval_model(self) -> nn.Module:
        return self._eval

    def training_step(self, x: torch.Tensor, step: Step):
        taps = self.model.forward_taps(x)
        deep_logits = taps["logits"]
        loss = F.cross_entropy(deep_logits.float(), step.targets)
        logs = {"loss_ce": loss.detach()}
        teacher = {"logits": deep_logits.detach()}
        deep_feat = taps[self.deep_tap].detach().float()
        logits = {}
        for k, (head, tap, kset) in enumerate(zip(self.exits, self.stage_taps, self.exit_sets), start=1):
            feat, exit_logits = head(taps[tap])
            value, exit_logs = kset({"logits": exit_logits}, teacher, step)
            hint = self.feature_weight * F.mse_loss(feat.float(), deep_feat)
            loss = loss + value + hint
            for name, v in exit_logs.items():
                logs[name] = logs.get(name, 0.0) + v
            logs["loss_byot_hint"] = logs.get("loss_byot_hint", 0.0) + hint.detach()
            logits[f"exit{k}"] = exit_logits
        logits[self.primary] = deep_logits
        return loss, logits, logs

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"exits": self.exits, "exit_sets": self.exit_sets}


class Byot(Scheme):
    name = "byot"
    has_teacher = False
    report_rows = (("exit{k}_top1_best", "exit {k}", "student"), ("ensemble_top1_best", "exits' ensemble", None))

    @classmethod
    def models_label(cls, cfg) -> str:
        return str(cfg.student.name)

    def __init__(self, name: str | None = None, feature_weight: float = 0.03) -> None:
        super().__init__(name)
        if float(feature_weight) < 0:
            raise ConfigError(f"scheme.feature_weight={feature_weight} must be >= 0")
        self.feature_weight = float(feature_weight)

    def validate(self, cfg) -> None:
        for term in build_knowledge(cfg.loss).terms.values():
            if not term.reads_logits_only():
                raise ConfigError(f"scheme=byot passes knowledge between exits' logits; loss term '{term.name}' "
                                  "reads features (use logit terms such as kd, dkd, dist, logit_mse)")

    def run(self, ctx) -> dict:
        cfg = ctx.cfg
        self.validate(cfg)
        student = ctx.models.build(cfg.student)
        shapes = ctx.models.shapes(student)
        stages = sorted((t for t in shapes if t.startswith("stage") and t[5:].isdigit()), key=lambda t: int(t[5:]))
        if len(stages) < 2:
            raise ConfigError(f"scheme=byot needs a model with two or more stage taps; {cfg.student.name} has {stages}")
        shallow, deep = stages[:-1], stages[-1]
        n_cls = ctx.data.info.num_classes
        exits = ctx.models.place(nn.ModuleList(ShallowExit(shapes[t], shapes[deep], n_cls) for t in shallow))
        exit_sets = []
        for _ in shallow:
            kset = build_knowledge(cfg.loss, cfg.get("ce_weight", "auto"))
            kset.setup({"logits": shapes["logits"]}, {"logits": shapes["logits"]}, ctx.data.info)
            exit_sets.append(ctx.models.place(kset))
        stage = ByotStage(student, exits, shallow, deep, exit_sets, self.feature_weight)
        fit = ctx.distiller.fit(stage, cfg.student)
        out: dict = {"exits": len(shallow) + 1}
        for name, res in fit.models.items():
            out[f"{name}_top1_best"] = res.top1_best
            out[f"{name}_top1_last"] = res.top1_last
        out.update(fit.as_summary("student"))
        out.update(ctx.models.stats(student, "student"))
        return out
