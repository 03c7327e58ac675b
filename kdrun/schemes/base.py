"""The scheme interface: a scheme decides who teaches whom and runs its stages through the trainer.

A scheme class also answers what the rest of kdrun asks about it, so adding a scheme is its class
and its YAML (conf/scheme/<name>.yaml) and nothing else: whether it has a separate teacher, whether
the selected knowledge terms apply, which root keys hold model lists (``ta``, ``peers``; the scheme's
YAML declares them at the root with ``# @package _global_``), how its run dir is named and which rows
the end-of-run table shows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kdrun.config import loss_name, split_models

if TYPE_CHECKING:
    from kdrun.runtime import RunContext


class Scheme:
    """``run(ctx) -> dict`` of summary entries (flat keys)."""

    name = "scheme"
    #: a separate (frozen) teacher teaches: its top-1 and params are reported; False: self-taught or labels only
    has_teacher: bool = True
    #: the selected knowledge terms apply (False: the student learns from labels alone)
    uses_knowledge: bool = True
    #: root keys that hold a list of model names (``ta=[a,b]`` or ``ta=a+b``): checked as model names
    model_list_keys: tuple[str, ...] = ()
    #: rows of the end-of-run table besides the student's: (summary key, label, summary key of the
    #: arch name or None); ``{k}`` stands for 1, 2, ... (every matching key, in order)
    report_rows: tuple[tuple[str, str, str | None], ...] = ()

    def __init__(self, name: str | None = None) -> None:
        if name:
            self.name = name

    @classmethod
    def models_label(cls, cfg) -> str:
        """Who teaches whom, for the run dir's name: ``resnet56-resnet20``."""
        return f"{cfg.teacher.name}-{cfg.student.name}"

    @classmethod
    def run_name(cls, cfg) -> str:
        """``<scheme>_<models>_<loss>_<dataset>``, e.g. offline_resnet56-resnet20_kd+fitnet_cifar100."""
        loss = f"_{loss_name(cfg.loss)}" if cls.uses_knowledge else ""
        return f"{cfg.scheme.name}_{cls.models_label(cfg)}{loss}_{cfg.dataset.name}"

    @staticmethod
    def model_list(cfg, key: str) -> list[str]:
        return split_models(cfg.get(key))

    def validate(self, cfg) -> None:
        """Reject a configuration this scheme cannot run, before anything trains."""

    def run(self, ctx: "RunContext") -> dict:
        raise NotImplementedError
