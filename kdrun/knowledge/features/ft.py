"""Factor transfer (Kim et al., NeurIPS 2018): a paraphraser's teacher factor, a translator's student factor."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import ConfigError
from kdrun.knowledge.adapters import (
    Paraphraser,
    Translator,
    pool_to_common,
)
from kdrun.knowledge.base import KnowledgeTerm, Step, Taps, require
from kdrun.knowledge.features.stages import init_epochs_arg, stage_names

log = logging.getLogger("kdrun")


FACTOR_FORMS = ("mean", "whole")


def factor_vector(f: torch.Tensor, factor: str = "mean") -> torch.Tensor:
    """A factor map (B, C, H, W) as the L2-normalised per-sample vector the loss compares (fp32):
    ``mean``: vec(mean_c F_c^2), H*W values (the CRD benchmark's form); ``whole``: vec(F), C*H*W
    values (the paper's)."""
    f = f.float()
    if factor == "mean":
        f = f.pow(2).mean(dim=1)
    return F.normalize(f.flatten(1), dim=1)


def factor_transfer_loss(fs: torch.Tensor, ft: torch.Tensor, p: int = 1, factor: str = "mean") -> torch.Tensor:
    """``mean | v(F_s) - v(F_t) |^p`` over the batch and the vector elements, v =
    :func:`factor_vector`; the larger map is average-pooled to the smaller one's size first."""
    fs, ft = pool_to_common(fs.float(), ft.float())
    return (factor_vector(fs, factor) - factor_vector(ft, factor)).abs().pow(p).mean()


class FT(KnowledgeTerm):
    """Factor transfer: Kim et al., "Paraphrasing Complex Network: Network Compression via Factor
    Transfer", NeurIPS 2018.

    A paraphraser (teacher side: conv encoder to ``rate`` x C_t channels + transposed-conv decoder)
    is first trained to reconstruct the teacher's last-stage features (init stage, MSE, only the
    paraphraser trains); then it is frozen and a translator (student side) learns to produce the
    teacher's factor::

        L = mean | v(F_s) - v(F_t) |^p,   F_t = encoder(T), F_s = translator(S)

    with p = 1 and, by default (``factor: mean``), ``v(F) = vec(mean_c F_c^2) / ||.||_2``: each
    factor reduced to its channel mean of squares like an attention map, as the CRD benchmark
    (RepDistiller) computes it, and as its weight 200 was used with. ``factor: whole`` is the
    paper's ``v(F) = vec(F) / ||vec(F)||_2`` over all C*H*W elements (the mean of |.|^p then runs
    over those), much weaker at the same weight (untrained CIFAR ResNet/WRN/VGG pairs at 32 px:
    values 0.3-0.4x, student gradients 0.01-0.03x those of the default). The default form is
    constant (0) on 1x1 maps; setup warns then.
    The paraphraser has no BN unless ``paraphraser_bn`` (RepDistiller has none) and runs in eval
    mode in the main stage, where it is frozen; the translator has BN. The init stage uses lr 0.01
    as RepDistiller does for its CIFAR ResNet/WRN (and MobileNetV2/ShuffleNet) students
    (``init_lr``; RepDistiller's VGG students use their own lr: ``loss.ft.init_lr=null``); full
    recipe 30 init epochs, lower for smoke runs (``loss.ft.init_epochs=1``). Taps: the last stage
    of each network unless ``student_tap``/``teacher_tap`` are given.
    """

    name = "ft"
    epoch_keys = {"init_epochs": 1}

    def __init__(self, weight: float = 200.0, rate: float = 0.5, p: int = 1, factor: str = "mean",
                 init_epochs: int = 30, init_lr: float | None = 0.01, paraphraser_bn: bool = False,
                 student_tap: str | None = None, teacher_tap: str | None = None) -> None:
        super().__init__(weight)
        require(float(rate) > 0, self.name, "rate", rate, "must be > 0 (the paper uses 0.5)")
        require(p in (1, 2), self.name, "p", p, "must be 1 or 2")
        require(factor in FACTOR_FORMS, self.name, "factor", factor, "must be mean or whole")
        require(init_lr is None or float(init_lr) > 0, self.name, "init_lr", init_lr, "must be > 0 or null")
        self.rate, self.p, self.factor = float(rate), int(p), str(factor)
        self.init_epochs = init_epochs_arg(self.name, init_epochs)
        self.init_lr = None if init_lr is None else float(init_lr)
        self.paraphraser_bn = bool(paraphraser_bn)
        self.s_tap, self.t_tap = student_tap, teacher_tap
        self.paraphraser: Paraphraser | None = None
        self.translator: Translator | None = None

    def student_taps(self) -> set[str]:
        return {self.s_tap or "stage1"}

    def teacher_taps(self) -> set[str]:
        return {self.t_tap or "stage1"}

    def setup(self, student_shapes, teacher_shapes, info=None) -> None:
        for side, shapes in (("student", student_shapes), ("teacher", teacher_shapes)):
            if not stage_names(shapes):
                raise ConfigError(f"loss.ft needs stage taps (stage1, stage2...) on the {side}")
        self.s_tap = self.s_tap or stage_names(student_shapes)[-1]
        self.t_tap = self.t_tap or stage_names(teacher_shapes)[-1]
        c_s, c_t = student_shapes[self.s_tap][0], teacher_shapes[self.t_tap][0]
        (_, h_s, w_s), (_, h_t, w_t) = student_shapes[self.s_tap], teacher_shapes[self.t_tap]
        if self.factor == "mean" and min(h_s, h_t) * min(w_s, w_t) == 1:
            log.warning("loss.ft.factor=mean compares spatial maps, and %s/%s are 1x1: the term is always 0 "
                        "(loss.ft.factor=whole compares whole factors)", self.s_tap, self.t_tap)
        self.paraphraser = Paraphraser(c_t, self.rate, bn=self.paraphraser_bn)
        self.translator = Translator(c_s, c_t, self.rate)

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        self.paraphraser.eval()  # frozen after its init stage (BN keeps the statistics learned there)
        with torch.no_grad():
            factor_t = self.paraphraser(t[self.t_tap].detach())
        factor_s = self.translator(s[self.s_tap])
        return factor_transfer_loss(factor_s, factor_t, self.p, self.factor)

    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        return list(self.paraphraser.parameters())

    def init_loss(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        target = t[self.t_tap].detach()
        self.paraphraser.train(self.training)
        return F.mse_loss(self.paraphraser.reconstruct(target).float(), target.float())
