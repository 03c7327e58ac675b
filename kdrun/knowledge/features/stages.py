"""What the feature terms share: the stage taps of a model and the pairing of student and teacher stages."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from kdrun.errors import ConfigError
from kdrun.knowledge.base import KnowledgeTerm, require

log = logging.getLogger("kdrun")

_STAGE = re.compile(r"stage(\d+)")


def stage_names(shapes: Mapping[str, tuple]) -> list[str]:
    """The ``stageK`` taps of a shapes dict, in stage order."""
    return sorted((k for k in shapes if _STAGE.fullmatch(k)), key=lambda k: int(k[5:]))


def init_epochs_arg(term: str, value) -> int:
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
            term, "init_epochs", value, "must be an integer >= 0")
    return int(value)


class StagePairsTerm(KnowledgeTerm):
    """A term on pairs of stage taps, decided in :meth:`setup` from the shapes (see the module
    docstring). Before setup the taps are ``{"stage1"}``, which every staged model has, so that
    KnowledgeSet's tap check passes and setup can give the precise message."""

    student_preact: bool = False
    teacher_preact: bool = False

    def __init__(self, weight: float) -> None:
        super().__init__(weight)
        self.pairs: list[tuple[str, str]] = []

    def student_taps(self) -> set[str]:
        return {s for s, _ in self.pairs} or {"stage1"}

    def teacher_taps(self) -> set[str]:
        return {t for _, t in self.pairs} or {"stage1"}

    def pair_stages(self, student_shapes, teacher_shapes) -> list[tuple[str, str]]:
        s_stages, t_stages = stage_names(student_shapes), stage_names(teacher_shapes)
        n = min(len(s_stages), len(t_stages))
        if n == 0:
            raise ConfigError(f"loss.{self.name} needs stage taps (stage1, stage2...) on both models")
        pairs = []
        for s, t in zip(s_stages[-n:], t_stages[-n:]):
            if self.student_preact:
                s = self._preact(s, student_shapes, "student")
            if self.teacher_preact:
                t = self._preact(t, teacher_shapes, "teacher")
            pairs.append((s, t))
        self.pairs = pairs
        return pairs

    def _preact(self, tap: str, shapes, side: str) -> str:
        if f"{tap}_preact" not in shapes:
            raise ConfigError(
                f"loss.{self.name} reads pre-activation taps ({tap}_preact) that the {side} does not "
                "provide (timm models and a student.quantize student have none); use a kdrun zoo model "
                "without student.quantize"
            )
        return f"{tap}_preact"
