"""The knowledge-term interface and the set that sums the selected terms with label cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.errors import ConfigError

Taps = Mapping[str, torch.Tensor]


def require(ok: bool, term: str, key: str, value, rule: str) -> None:
    """Raise the one-line ConfigError ``loss.<term>.<key>=<value> <rule>`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"loss.{term}.{key}={value} {rule}")


@dataclass
class Step:
    """What a training step knows besides the images: labels, sample positions, progress."""

    targets: torch.Tensor
    index: torch.Tensor | None = None  # training-set positions of the batch's samples
    epoch: float = 0.0  # fractional epoch: 2.5 is half-way through the third epoch
    epochs: int = 1  # length of the schedule in epochs
    batch: int = 0  # position of the batch within its epoch


class KnowledgeTerm(nn.Module):
    """One distillation term: ``forward(student_taps, teacher_taps, step) -> scalar`` (unweighted).

    Subclasses set ``name`` and the taps they read on each side (``student_taps``/``teacher_taps``;
    "logits", "embedding", "stage1".., "stage2_preact"...). A term that needs adapters (regressors,
    projections) builds them in :meth:`setup` from the probed feature shapes; they are its own
    parameters, trained with the student and never part of the saved student.
    """

    name: str = "term"
    #: epochs of this term's initialisation stage (AB, FT, FSP...); 0: none
    init_epochs: int = 0
    #: learning rate of the initialisation stage; None: the student's
    init_lr: float | None = None
    #: hyper-parameters counted in epochs (warm-ups, init stages): key -> the smallest value it may
    #: take when a recipe is scaled to a shorter schedule (scripts/reproduce.py --epochs)
    epoch_keys: dict[str, int] = {}

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        weight = float(weight)
        if weight < 0:
            raise ConfigError(f"loss.{self.name}.weight={weight} must be >= 0")
        self.weight = weight

    def requested_ce_weight(self) -> float | None:
        """The label cross-entropy weight this term asks for when ``ce_weight=auto`` (None: no
        opinion). KD's Hinton mix asks for ``1 - alpha``."""
        return None

    def own_parameters(self) -> list[nn.Parameter]:
        """Parameters this term trains itself, by its own optimizer step inside :meth:`forward` (an
        adversarial term's discriminator): every stage keeps them out of its optimizer (see
        :meth:`trainable_parameters`). Default: none."""
        return []

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The term's parameters a stage's optimizer trains: every one that wants a gradient but
        those of :meth:`own_parameters`."""
        own = {id(p) for p in self.own_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in own]

    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        """What the initialisation stage trains. Default: the term's own adapters and every
        student parameter but the classifier's (the student's feature layers)."""
        classifier = getattr(student, "classifier", None)
        skip = {id(p) for p in classifier.parameters()} if classifier is not None else set()
        return self.trainable_parameters() + [p for p in student.parameters() if p.requires_grad and id(p) not in skip]

    def extra_logs(self) -> dict[str, torch.Tensor]:
        """Values of the last :meth:`forward` to log beside the loss (not part of it), e.g. the
        discriminator's own loss: metrics.csv columns named as the keys. Default: none."""
        return {}

    def init_loss(self, s: Taps, t: Taps, step: "Step") -> torch.Tensor:
        """The loss of the initialisation stage. Default: the term itself."""
        return self(s, t, step)

    def student_taps(self) -> set[str]:
        return {"logits"}

    def teacher_taps(self) -> set[str]:
        return {"logits"}

    def reads_logits_only(self) -> bool:
        """A response term (it reads nothing but the logits of both networks): schemes that pass
        knowledge between classifiers (BYOT's exits, a multi-teacher's aggregated logits) ask this."""
        return self.student_taps() <= {"logits"} and self.teacher_taps() <= {"logits"}

    def setup(self, student_shapes: Mapping[str, tuple], teacher_shapes: Mapping[str, tuple], info=None) -> None:
        """Build adapters from tap shapes (without batch dim). ``info``: the dataset's DataInfo
        (n_train, num_classes...) for terms that keep per-sample state. Default: nothing to build."""

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        raise NotImplementedError


def resolve_ce_weight(value, terms) -> float:
    """``ce_weight`` as a number: ``auto`` takes the first selected term's request (KD: 1 - alpha), else 1."""
    if value is None or str(value) == "auto":
        asked = [w for w in (t.requested_ce_weight() for t in terms) if w is not None]
        return float(asked[0]) if asked else 1.0
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"ce_weight={value} must be auto or a number >= 0") from None
    if not weight >= 0 or weight == float("inf"):
        raise ConfigError(f"ce_weight={value} must be auto or a finite number >= 0")
    return weight


def check_taps(term: KnowledgeTerm, side: str, needed: set[str], shapes: Mapping[str, tuple]) -> None:
    missing = sorted(needed - set(shapes))
    if missing:
        raise ConfigError(
            f"loss.{term.name} needs {side} tap(s) {', '.join(missing)}; the {side} has: "
            f"{', '.join(sorted(shapes))}"
        )


class KnowledgeSet(nn.Module):
    """The selected terms plus label cross-entropy, summed with their weights.

    ``total = ce_weight * CE(student logits, labels) + sum_term term.weight * term(...)``.
    ``ce_weight="auto"``: the weight a selected term asks for (:meth:`KnowledgeTerm.requested_ce_weight`; KD's
    ``1 - alpha``), else 1. A number sets it outright (0: no label loss, e.g. a set that only adds
    terms to another set's loss). ``forward`` returns the total loss and ``{"loss_ce": ..,
    "loss_<term>": ..}``, each entry the term's weighted contribution to the total (detached).
    """

    def __init__(self, terms: Mapping[str, KnowledgeTerm], ce_weight: float | str = "auto") -> None:
        super().__init__()
        self.terms = nn.ModuleDict(dict(terms))
        self.ce_weight = resolve_ce_weight(ce_weight, self.terms.values())

    def formula(self) -> str:
        """The total loss in words, e.g. ``0.1*ce + 0.9*kd + 0.8*crd`` (logged at start-up)."""
        parts = [f"{self.ce_weight:g}*ce"] if self.ce_weight else []
        parts += [f"{t.weight:g}*{name}" for name, t in self.terms.items()]
        return " + ".join(parts) or "0"

    def student_taps(self) -> set[str]:
        return set().union({"logits"}, *(t.student_taps() for t in self.terms.values()))

    def teacher_taps(self) -> set[str]:
        return set().union(*(t.teacher_taps() for t in self.terms.values())) if self.terms else set()

    def needs_teacher(self) -> bool:
        return len(self.terms) > 0

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What a stage's optimizer trains of this set: the terms' adapters, without the parameters
        a term trains by its own optimizer step (:meth:`KnowledgeTerm.own_parameters`)."""
        return [p for term in self.terms.values() for p in term.trainable_parameters()]

    def setup(self, student_shapes: Mapping[str, tuple], teacher_shapes: Mapping[str, tuple], info=None) -> None:
        for term in self.terms.values():
            check_taps(term, "student", term.student_taps(), student_shapes)
            check_taps(term, "teacher", term.teacher_taps(), teacher_shapes)
            term.setup(student_shapes, teacher_shapes, info)

    def forward(self, s: Taps, t: Taps, step: Step):
        if self.ce_weight:
            ce = self.ce_weight * F.cross_entropy(s["logits"].float(), step.targets)
            total, logs = ce, {"loss_ce": ce.detach()}
        else:
            total, logs = s["logits"].new_zeros((), dtype=torch.float32), {}
        for name, term in self.terms.items():
            if term.weight == 0:  # e.g. AB and FSP after their init stage: not computed, logged as 0
                logs[f"loss_{name}"] = torch.zeros((), device=total.device)
                continue
            value = term.weight * term(s, t, step)
            total = total + value
            logs[f"loss_{name}"] = value.detach()
            logs.update(term.extra_logs())
        return total, logs
