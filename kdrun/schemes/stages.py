"""Stages: what the trainer runs. A stage owns the trainable model(s) and computes one step's loss."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.knowledge import KnowledgeSet, KnowledgeTerm, Step


def freeze(model: nn.Module) -> nn.Module:
    """A frozen teacher: no gradients, always in eval mode."""
    model.requires_grad_(False)
    model.eval()
    return model


def wants_features(taps: set[str]) -> bool:
    return bool(taps - {"logits"})


def wants_preact(taps: set[str]) -> bool:
    return any(t.endswith("_preact") for t in taps)


def to_cpu(value):
    """A state-dict entry on the CPU: tensors detached, and inside the nested dicts and lists of a
    module's ``get_extra_state`` (an own optimizer's state) too."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


def tapped_forward(model: nn.Module, x: torch.Tensor, taps: set[str]) -> dict:
    """Logits alone when that is all that is needed, else every tap from one forward pass."""
    if wants_features(taps):
        return model.forward_taps(x, preact=wants_preact(taps))
    return {"logits": model(x)}


class SupervisedStage:
    """Train ``model`` from labels alone (cross-entropy); the base of every stage (the trainer's
    :class:`~kdrun.engine.trainer.Stage` protocol, with the defaults of its optional parts)."""

    eval_each_epoch = True
    primary: str | None = None

    def __init__(self, model: nn.Module, name: str = "student") -> None:
        self.model, self.name = model, name

    def eval_model(self) -> nn.Module:
        return self.model

    def end_epoch(self, epoch: int) -> None:
        """Called after each epoch's last step (a teacher cache writes its epoch here)."""

    def parameters_to_train(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def train(self) -> None:
        self.model.train()

    def training_step(self, x: torch.Tensor, step: Step):
        logits = self.model(x)
        loss = F.cross_entropy(logits.float(), step.targets)
        return loss, logits, {"loss_ce": loss.detach()}

    def extra_modules(self) -> dict[str, nn.Module]:
        """Modules trained with the model but not part of it (adapters, exits): saved for resuming."""
        return {}

    def extra_state(self) -> dict:
        return {name: {k: to_cpu(v) for k, v in m.state_dict().items()} for name, m in self.extra_modules().items()}

    def load_extra_state(self, state: dict) -> None:
        for name, module in self.extra_modules().items():
            if name in state:
                module.load_state_dict(state[name])


class DistillStage(SupervisedStage):
    """A student taught by a frozen teacher through a knowledge set (whose adapters train too)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, knowledge: KnowledgeSet, name: str = "student",
                 cache=None) -> None:
        """``cache``: a TeacherCache; the teacher forward is skipped for batches it already holds."""
        super().__init__(student, name)
        self.teacher = freeze(teacher)
        self.knowledge = knowledge
        self.s_taps = knowledge.student_taps()
        self.t_taps = knowledge.teacher_taps() | {"logits"}
        self.cache = cache

    def parameters_to_train(self) -> list[nn.Parameter]:
        """The student's and the terms' adapters; not what a term trains by its own step (a discriminator)."""
        return super().parameters_to_train() + self.knowledge.trainable_parameters()

    def train(self) -> None:
        self.model.train()
        self.knowledge.train()
        self.teacher.eval()

    def teacher_forward(self, x: torch.Tensor, step: Step | None = None) -> dict:
        epoch = int(step.epoch) if step is not None else None
        if self.cache is not None and step is not None:
            hit = self.cache.lookup(epoch, step.batch)
            if hit is not None:
                return hit
        with torch.no_grad():
            out = tapped_forward(self.teacher, x, self.t_taps)
        if self.cache is not None and step is not None:
            self.cache.store(epoch, step.batch, {k: v for k, v in out.items() if k in self.t_taps})
        return out

    def end_epoch(self, epoch: int) -> None:
        if self.cache is not None:
            self.cache.end_epoch(epoch)

    def training_step(self, x: torch.Tensor, step: Step):
        t_out = self.teacher_forward(x, step)
        s_out = tapped_forward(self.model, x, self.s_taps)
        loss, logs = self.knowledge(s_out, t_out, step)
        return loss, s_out["logits"], logs

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"knowledge": self.knowledge}


class InitStage(SupervisedStage):
    """A term's initialisation stage (AB connectors, FT paraphraser, FSP...) before the main stage.

    Trains ``term.init_parameters(student)`` with ``term.init_loss`` alone (no label loss). When
    that trains none of the student's parameters (FT's paraphraser) the student stays in eval mode,
    so its BatchNorm statistics do not drift. The student is scored after the last init epoch only.
    """

    eval_each_epoch = False

    def __init__(self, student: nn.Module, teacher: nn.Module, term: KnowledgeTerm, owner: str = "student") -> None:
        """``owner``: the stage it prepares; its rows in metrics.csv are ``init_<term>`` for the
        student, ``<owner>_init_<term>`` for an assistant or a generation."""
        super().__init__(student, f"init_{term.name}" if owner == "student" else f"{owner}_init_{term.name}")
        self.teacher = freeze(teacher)
        self.term = term
        self.s_taps = term.student_taps() | {"logits"}
        self.t_taps = term.teacher_taps() | {"logits"}
        own = {id(p) for p in student.parameters()}
        self.trains_student = any(id(p) in own for p in term.init_parameters(student))

    def parameters_to_train(self) -> list[nn.Parameter]:
        return self.term.init_parameters(self.model)

    def train(self) -> None:
        self.model.train(self.trains_student)
        self.term.train()
        self.teacher.eval()

    def training_step(self, x: torch.Tensor, step: Step):
        with torch.no_grad():
            t_out = tapped_forward(self.teacher, x, self.t_taps)
        s_out = tapped_forward(self.model, x, self.s_taps)
        loss = self.term.init_loss(s_out, t_out, step)
        return loss, s_out["logits"], {f"loss_{self.term.name}_init": loss.detach()}


def detached(taps: dict) -> dict:
    return {k: v.detach() for k, v in taps.items()}


def log_mean_softmax(logits: list[torch.Tensor]) -> torch.Tensor:
    """log of the averaged class probabilities: the ensemble's output (a valid log-probability)."""
    logp = torch.stack([F.log_softmax(z.float(), dim=1) for z in logits])
    return torch.logsumexp(logp, dim=0) - torch.log(torch.tensor(float(len(logits)), device=logp.device))


class EnsembleEval(nn.Module):
    """Scores several models at once: forward returns ``{name: logits, ..., "ensemble": log p}``."""

    def __init__(self, models: dict[str, nn.Module]) -> None:
        super().__init__()
        self.names = list(models)
        self.members = nn.ModuleList(models.values())
        self.eval()  # scores trained models; scoring leaves them in eval mode

    def forward(self, x: torch.Tensor) -> dict:
        out = {name: m(x) for name, m in zip(self.names, self.members)}
        out["ensemble"] = log_mean_softmax(list(out.values()))
        return out
