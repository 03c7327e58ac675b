"""Intermediate-feature knowledge: terms on stage outputs (hints, attention, selectivity, factors...).

Multi-layer terms pair the student's and the teacher's stage taps (``stage1``.. ``stageK``, or
their ``stageK_preact`` variants). When the two networks have a different number of stages, the
last ``min(K_s, K_t)`` stages of each are paired in order (e.g. vgg13's stage2..4 with resnet8's
stage1..3). Feature maps of different spatial sizes are matched by average-pooling the larger to
the smaller, as in the CRD benchmark. All loss arithmetic runs in fp32 (features are cast with
``.float()``); teacher features are always detached.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import ConfigError
from kdrun.knowledge.adapters import (
    ABF,
    ConvBN,
    ConvRegressor,
    Paraphraser,
    Translator,
    VIDRegressor,
    full_precision,
    pool_to_common,
)
from kdrun.knowledge.base import KnowledgeTerm, Step, Taps, require

_STAGE = re.compile(r"stage(\d+)")
log = logging.getLogger("kdrun")


# ---------------------------------------------------------------------------- helpers
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
                "provide (timm models have none); use a kdrun zoo model"
            )
        return f"{tap}_preact"


# ---------------------------------------------------------------------------- FitNet
class FitNet(KnowledgeTerm):
    """Hints: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.

    A regressor r (:class:`ConvRegressor`: one conv chosen by the two spatial sizes, BN, ReLU;
    trained with the student) maps the student's hint tap onto the teacher's::

        L = mean_{b,c,h,w} ( r(S_hint) - T_hint )^2

    Default hint: ``stage2`` on both sides (the CRD benchmark's ``hint_layer 2``).
    """

    name = "fitnet"

    def __init__(self, weight: float = 100.0, student_tap: str = "stage2", teacher_tap: str = "stage2") -> None:
        super().__init__(weight)
        self.s_tap, self.t_tap = student_tap, teacher_tap
        self.regressor: ConvRegressor | None = None

    def student_taps(self) -> set[str]:
        return {self.s_tap}

    def teacher_taps(self) -> set[str]:
        return {self.t_tap}

    def setup(self, student_shapes, teacher_shapes, info=None) -> None:
        self.regressor = ConvRegressor(student_shapes[self.s_tap], teacher_shapes[self.t_tap])

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        hint = self.regressor(s[self.s_tap])
        return F.mse_loss(hint.float(), t[self.t_tap].detach().float())


# ---------------------------------------------------------------------------- AT
def attention_map(f: torch.Tensor, p: float) -> torch.Tensor:
    """``vec(mean_c |f_c|^p)``, L2-normalised per sample: (B, H*W), fp32."""
    return F.normalize(f.float().abs().pow(p).mean(dim=1).flatten(1), dim=1)


class AT(StagePairsTerm):
    """Attention transfer: Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017.

    For every stage pair j, with the spatial attention map ``Q^j = vec(mean_c |A_c|^p)`` of a
    feature map A (C, H, W)::

        L = sum_j mean_{b,i} ( Q_s^j / ||Q_s^j||_2 - Q_t^j / ||Q_t^j||_2 )^2

    (the authors' and the CRD benchmark's mean-squared form; the paper's beta = 1000 is the
    weight). The CRD benchmark raises A_c to the power p without the absolute value, which agrees
    with this for the default p = 2 (even p). Invariant to a positive scale of either feature map;
    needs no adapter, so any channel counts pair.
    """

    name = "at"

    def __init__(self, weight: float = 1000.0, p: float = 2.0) -> None:
        super().__init__(weight)
        require(float(p) > 0, self.name, "p", p, "must be > 0")
        self.p = float(p)

    def setup(self, student_shapes, teacher_shapes, info=None) -> None:
        self.pair_stages(student_shapes, teacher_shapes)

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        total = 0.0
        for sk, tk in self.pairs:
            fs, ft = pool_to_common(s[sk], t[tk].detach())
            total = total + (attention_map(fs, self.p) - attention_map(ft, self.p)).pow(2).mean()
        return total


# ---------------------------------------------------------------------------- NST
def nst_mmd(fs: torch.Tensor, ft: torch.Tensor, degree: int = 2, constant: float = 0.0) -> torch.Tensor:
    """Squared MMD between the channel "selectivity" distributions of two maps (fp32).

    Each channel's spatial map is L2-normalised; with the polynomial kernel
    ``k(x, y) = (x.y + c)^d``: ``mean k(t, t') + mean k(s, s') - 2 mean k(s, t)`` over all
    channel pairs (and the batch).
    """
    fs, ft = pool_to_common(fs.float(), ft.float())
    a = F.normalize(fs.flatten(2), dim=2)
    b = F.normalize(ft.flatten(2), dim=2)

    def kernel(x, y):
        return (x @ y.transpose(1, 2) + constant).pow(degree)

    with full_precision(a):
        return kernel(b, b).mean() + kernel(a, a).mean() - 2 * kernel(a, b).mean()


class NST(StagePairsTerm):
    """Neuron selectivity transfer: Huang & Wang, "Like What You Like: Knowledge Distill via Neuron
    Selectivity Transfer", 2017.

    Treats each channel's L2-normalised spatial map f^i (H*W) as a sample and matches the
    student's and the teacher's sample distributions with the squared MMD, polynomial kernel
    ``k(x, y) = (x^T y + c)^d`` (d = 2, c = 0 in the paper and the CRD benchmark)::

        L = sum_j [ 1/C_t^2 sum k(f_t^i, f_t^i') + 1/C_s^2 sum k(f_s^i, f_s^i')
                    - 2/(C_s C_t) sum k(f_s^i, f_t^i') ]

    over all stage pairs j. Zero when the student's features equal the teacher's.
    """

    name = "nst"

    def __init__(self, weight: float = 50.0, degree: int = 2, constant: float = 0.0) -> None:
        super().__init__(weight)
        require(isinstance(degree, int) and not isinstance(degree, bool) and degree >= 1,
                self.name, "degree", degree, "must be an integer >= 1")
        require(float(constant) >= 0, self.name, "constant", constant, "must be >= 0")
        self.degree, self.constant = int(degree), float(constant)

    def setup(self, student_shapes, teacher_shapes, info=None) -> None:
        self.pair_stages(student_shapes, teacher_shapes)

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        return sum(nst_mmd(s[sk], t[tk].detach(), self.degree, self.constant) for sk, tk in self.pairs)


# ---------------------------------------------------------------------------- AB
def ab_margin_loss(r: torch.Tensor, t: torch.Tensor, margin: float) -> torch.Tensor:
    """Activation-boundary loss summed over elements, averaged over the batch (fp32)::

        rho(t) * relu(margin - r)^2 + (1 - rho(t)) * relu(margin + r)^2,   rho(t) = [t > 0]
    """
    on = (t > 0).float()
    loss = on * F.relu(margin - r).pow(2) + (1.0 - on) * F.relu(margin + r).pow(2)
    return loss.sum() / r.shape[0]


class AB(StagePairsTerm):
    """Activation boundaries: Heo et al., "Knowledge Transfer via Distillation of Activation
    Boundaries Formed by Hidden Neurons", AAAI 2019.

    The student's pre-ReLU stage features r(S) should be on the same side of zero as the teacher's
    pre-ReLU features T, by a margin mu (the paper's alternative squared-hinge loss); the
    connector r is the identity where the two maps have the same shape, else a
    :class:`ConvRegressor` without ReLU (conv + BN, as the CRD benchmark's connector)::

        L_j = sum [ rho(T) relu(mu - r(S))^2 + (1 - rho(T)) relu(mu + r(S))^2 ] / batch
        L   = 3e-3 * sum_j 2^(j - n) L_j        (j = 1..n stage pairs, deepest weighted 1)

    with the layer weights and the 3e-3 scale of the CRD benchmark (RepDistiller). AB is an
    initialisation method: an init stage of ``init_epochs`` trains the connectors and the
    student's feature layers with this loss alone, then the main stage trains on labels. In
    RepDistiller's main loop the AB loss is 0 whatever its ``-b`` flag (1 in its scripts), so the
    default main-stage ``weight`` is 0; set e.g. ``loss.ab.weight=1`` to keep it in the main stage.
    The full recipe uses ``init_epochs: 30``; smoke runs should lower it (``loss.ab.init_epochs=1``).
    """

    name = "ab"
    student_preact = True
    teacher_preact = True
    scale = 3e-3

    def __init__(self, weight: float = 0.0, margin: float = 1.0, init_epochs: int = 30) -> None:
        super().__init__(weight)
        require(float(margin) > 0, self.name, "margin", margin, "must be > 0")
        self.margin = float(margin)
        self.init_epochs = init_epochs_arg(self.name, init_epochs)
        self.connectors = nn.ModuleList()

    def setup(self, student_shapes, teacher_shapes, info=None) -> None:
        pairs = self.pair_stages(student_shapes, teacher_shapes)
        self.connectors = nn.ModuleList(
            nn.Identity() if tuple(student_shapes[sk]) == tuple(teacher_shapes[tk])
            else ConvRegressor(student_shapes[sk], teacher_shapes[tk], relu=False)
            for sk, tk in pairs
        )

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        n = len(self.pairs)
        total = 0.0
        for j, ((sk, tk), connector) in enumerate(zip(self.pairs, self.connectors)):
            r, target = pool_to_common(connector(s[sk]).float(), t[tk].detach().float())
            total = total + 2.0 ** (j - n + 1) * ab_margin_loss(r, target, self.margin)
        return self.scale * total


# ---------------------------------------------------------------------------- FT
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


# ---------------------------------------------------------------------------- FSP
def fsp_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``G[i, j] = mean over positions of a_i * b_j``: (B, C_a, C_b), fp32; the larger map is
    average-pooled to the smaller one's size."""
    a, b = pool_to_common(a.float(), b.float())
    with full_precision(a):
        return a.flatten(2) @ b.flatten(2).transpose(1, 2) / (a.shape[-2] * a.shape[-1])


class FSP(KnowledgeTerm):
    """Flow of solution procedure: Yim et al., "A Gift from Knowledge Distillation: Fast
    Optimization, Network Minimization and Transfer Learning", CVPR 2017.

    The FSP matrix of two consecutive layers F1 (C1, h, w), F2 (C2, h, w) is
    ``G[i, j] = 1/(h w) sum_{x,y} F1_i(x, y) F2_j(x, y)``; the student matches the teacher's::

        L = sum_l mean (G_s^l - G_t^l)^2        (l over consecutive layer pairs)

    Layers: ``stem`` plus every stage when both networks have as many stages (RepDistiller's
    ``feat[:-1]``), else the last min(K_s, K_t) stages; the larger of two consecutive maps is
    average-pooled to the smaller one's size (as RepDistiller's FSP does). The paper needs equal
    channel counts; where a student layer's differ, a 1x1 conv maps it to the teacher's (a kdrun
    extension; identity otherwise). FSP is an
    initialisation method: the init stage trains the student's feature layers with this loss,
    then the main stage trains on labels; RepDistiller's main loop adds 0 for FSP (its ``-b 50``
    is inert), so the default main-stage ``weight`` is 0. Full recipe: ``init_epochs: 30``;
    smoke runs should lower it (``loss.fsp.init_epochs=1``). Zero for identical features.
    """

    name = "fsp"

    def __init__(self, weight: float = 0.0, init_epochs: int = 30) -> None:
        super().__init__(weight)
        self.init_epochs = init_epochs_arg(self.name, init_epochs)
        self.s_layers: list[str] = []
        self.t_layers: list[str] = []
        self.connectors = nn.ModuleList()

    def student_taps(self) -> set[str]:
        return set(self.s_layers) or {"stage1"}

    def teacher_taps(self) -> set[str]:
        return set(self.t_layers) or {"stage1"}

    def setup(self, student_shapes, teacher_shapes, info=None) -> None:
        s_stages, t_stages = stage_names(student_shapes), stage_names(teacher_shapes)
        n = min(len(s_stages), len(t_stages))
        s_layers, t_layers = s_stages[len(s_stages) - n:], t_stages[len(t_stages) - n:]
        if len(s_stages) == len(t_stages) and "stem" in student_shapes and "stem" in teacher_shapes:
            s_layers, t_layers = ["stem"] + s_layers, ["stem"] + t_layers
        if len(s_layers) < 2:
            raise ConfigError("loss.fsp needs at least two feature layers (stem/stage taps) on both models")
        self.s_layers, self.t_layers = s_layers, t_layers
        self.connectors = nn.ModuleList(
            nn.Identity() if student_shapes[sk][0] == teacher_shapes[tk][0]
            else nn.Conv2d(student_shapes[sk][0], teacher_shapes[tk][0], 1, bias=False)
            for sk, tk in zip(s_layers, t_layers)
        )

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        fs = [c(s[k]) for k, c in zip(self.s_layers, self.connectors)]
        ft = [t[k].detach() for k in self.t_layers]
        total = 0.0
        for i in range(len(fs) - 1):
            total = total + (fsp_matrix(fs[i], fs[i + 1]) - fsp_matrix(ft[i], ft[i + 1])).pow(2).mean()
        return total


# ---------------------------------------------------------------------------- OFD
def gaussian_negative_mean(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """OFD's margin: ``E[x | x < 0]`` for x ~ N(mean, std^2), i.e.
    ``mean - std * phi(mean/std) / Phi(-mean/std)``; ``-3 std`` where ``Phi(-mean/std) <= 1e-3``.
    Computed in fp64 (the difference loses digits; the authors compute it in Python floats) and
    returned in ``mean``'s dtype."""
    dtype = mean.dtype
    mean, std = mean.double(), std.double().clamp_min(1e-6)
    z = mean / std
    tail = torch.special.ndtr(-z)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    expected = mean - std * pdf / tail.clamp_min(1e-3)
    return torch.where(tail > 1e-3, expected, -3.0 * std).to(dtype)


def partial_l2(s: torch.Tensor, t: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """OFD's partial L2 summed over elements, averaged over the batch: with ``T = max(t, margin)``,
    ``(s - T)^2`` everywhere except where ``s <= T <= 0`` (fp32)."""
    target = torch.maximum(t, margin)
    keep = (s > target) | (target > 0)
    return ((s - target).pow(2) * keep).sum() / s.shape[0]


class OFD(StagePairsTerm):
    """Overhaul of feature distillation: Heo et al., "A Comprehensive Overhaul of Feature
    Distillation", ICCV 2019.

    Student and teacher pre-ReLU stage features; the student's go through a connector (1x1 conv +
    BN to the teacher's channels); the teacher's are clipped from below by a per-channel margin
    m = E[x | x < 0] under a Gaussian model of the teacher's pre-ReLU responses::

        T' = max(T, m),  d_p = sum [ (T' - r(S))^2  unless  r(S) <= T' <= 0 ]
        L  = sum_j d_p^j / (batch * 2^(n - j))      (j = 1..n stage pairs, deepest weighted 1)

    Given the same margin this equals the authors' Distiller loss divided by the batch size
    (clovaai/overhaul-distillation, CIFAR-100 distiller.py: distillation_loss, Distiller.forward;
    mdistiller's OFD.ofd_loss gives the same). The margin's source differs: the authors (and
    mdistiller) read the Gaussian's mean and std off the teacher's BN before the ReLU (its bias
    and |weight|); kdrun has no such BN for every tap, so the per-channel mean and std of the
    teacher's tap are accumulated over the training batches (fp64 buffers ``t_mean<j>`` and
    ``t_var<j>``, merged batch by batch, saved with the run) and the margin is computed from them.
    The authors' CIFAR-100 code divides by 1000: ``weight: 1.0e-3`` (also mdistiller's CIFAR
    default).
    """

    name = "ofd"
    student_preact = True
    teacher_preact = True

    def __init__(self, weight: float = 1e-3) -> None:
        super().__init__(weight)
        self.connectors = nn.ModuleList()
        self.register_buffer("seen", torch.zeros((), dtype=torch.float64))

    def setup(self, student_shapes, teacher_shapes, info=None) -> None:
        pairs = self.pair_stages(student_shapes, teacher_shapes)
        self.connectors = nn.ModuleList(ConvBN(student_shapes[sk][0], teacher_shapes[tk][0]) for sk, tk in pairs)
        for j, (_, tk) in enumerate(pairs):
            c = teacher_shapes[tk][0]
            self.register_buffer(f"t_mean{j}", torch.zeros(c, dtype=torch.float64))
            self.register_buffer(f"t_var{j}", torch.zeros(c, dtype=torch.float64))
        self.seen = torch.zeros((), dtype=torch.float64)

    def margin(self, j: int) -> torch.Tensor:
        """The current per-channel margin of pair j (fp32), shaped (1, C, 1, 1)."""
        mean, var = getattr(self, f"t_mean{j}"), getattr(self, f"t_var{j}")
        return gaussian_negative_mean(mean, var.clamp_min(0).sqrt()).float().view(1, -1, 1, 1)

    @torch.no_grad()
    def _update_stats(self, j: int, target: torch.Tensor) -> None:
        """Merge the batch's per-channel mean and (population) variance into the running ones:
        with f = batch / (seen + batch) and d = batch mean - mean::

            mean += f d,   var += f (batch var - var) + f (1 - f) d^2
        """
        frac = target.shape[0] / (self.seen + target.shape[0])  # a tensor: no host sync
        var_b, mean_b = torch.var_mean(target, dim=(0, 2, 3), correction=0)
        mean, var = getattr(self, f"t_mean{j}"), getattr(self, f"t_var{j}")
        delta = mean_b.double() - mean
        var += (var_b.double() - var) * frac + delta * delta * (frac * (1 - frac))
        mean += delta * frac

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        n = len(self.pairs)
        feats = []
        for j, ((sk, tk), connector) in enumerate(zip(self.pairs, self.connectors)):
            r, target = pool_to_common(connector(s[sk]).float(), t[tk].detach().float())
            if self.training:
                self._update_stats(j, target)
            feats.append((r, target))
        if self.training:
            self.seen += feats[0][0].shape[0]
        total = 0.0
        for j, (r, target) in enumerate(feats):
            total = total + partial_l2(r, target, self.margin(j)) / 2.0 ** (n - 1 - j)
        return total


# ---------------------------------------------------------------------------- ReviewKD
def hcl(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """ReviewKD's hierarchical context loss (fp32): MSE of the maps plus the MSE of their 4x4, 2x2
    and 1x1 average pools (those smaller than the map), weighted 1, 1/2, 1/4, 1/8 and normalised
    by the sum of the weights used."""
    fs, ft = fs.float(), ft.float()
    loss, total, w = F.mse_loss(fs, ft), 1.0, 1.0
    for size in (4, 2, 1):
        if size >= min(fs.shape[-2:]):
            continue
        w /= 2.0
        loss = loss + w * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
        total += w
    return loss / total


class ReviewKD(StagePairsTerm):
    """Knowledge review: Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021.

    Levels: the paired stages plus the pooled ``embedding`` (as a 1x1 map). Student features
    (post-ReLU stage taps) are fused from the deepest level down by attention-based fusion (ABF)
    modules, so each level's output "reviews" the deeper ones; each output is matched to the
    teacher's feature at that level (pre-ReLU stage taps, as in the authors' code, unless
    ``teacher_preact: false``; the pooled embedding) with the hierarchical context loss HCL (MSE
    at full size plus 4x4/2x2/1x1 pooled MSEs)::

        L = min(1, e / warmup_epochs) * sum_levels HCL(ABF_l(S_l, fused_{l+1}), T_l)

    with ``e`` the 0-based number of the current epoch (a step per epoch: 0 in the first epoch),
    as the authors' CIFAR-100 train.py (mdistiller counts epochs from 1, one epoch ahead). The
    default equals the authors' ReviewKD + hcl (dvlab-research/ReviewKD, CIFAR-100
    model/reviewkd.py). The ABF middle width is min(max_mid_channels, student embedding width).
    Defaults: weight 1, warm-up 20 epochs (the authors' and mdistiller's defaults); the authors'
    CIFAR-100 scripts use weight 5 for resnet32x4->resnet8x4 and the wrn_40_2 pairs, 8 for
    resnet32x4->ShuffleNetV2, 0.6 for resnet56->resnet20 and 1 for resnet110->resnet32.
    """

    name = "reviewkd"

    def __init__(self, weight: float = 1.0, warmup_epochs: float = 20.0, teacher_preact: bool = True,
                 max_mid_channels: int = 512) -> None:
        super().__init__(weight)
        require(float(warmup_epochs) >= 0, self.name, "warmup_epochs", warmup_epochs, "must be >= 0")
        require(isinstance(max_mid_channels, int) and max_mid_channels >= 1, self.name,
                "max_mid_channels", max_mid_channels, "must be an integer >= 1")
        self.warmup_epochs = float(warmup_epochs)
        self.teacher_preact = bool(teacher_preact)
        self.max_mid_channels = int(max_mid_channels)
        self.abfs = nn.ModuleList()

    def student_taps(self) -> set[str]:
        return super().student_taps() | {"embedding"}

    def teacher_taps(self) -> set[str]:
        return super().teacher_taps() | {"embedding"}

    def setup(self, student_shapes, teacher_shapes, info=None) -> None:
        pairs = self.pair_stages(student_shapes, teacher_shapes)
        s_shapes = [student_shapes[sk] for sk, _ in pairs] + [(student_shapes["embedding"][0], 1, 1)]
        t_shapes = [teacher_shapes[tk] for _, tk in pairs] + [(teacher_shapes["embedding"][0], 1, 1)]
        mid = min(self.max_mid_channels, student_shapes["embedding"][0])
        deepest = len(s_shapes) - 1
        self.abfs = nn.ModuleList(
            ABF(ss[0], mid, ts[0], ts[1:], fuse=i < deepest) for i, (ss, ts) in enumerate(zip(s_shapes, t_shapes))
        )

    def warmup(self, step: Step) -> float:
        """``min(1, floor(epoch) / warmup_epochs)``: constant within an epoch (1 without warm-up)."""
        return 1.0 if self.warmup_epochs <= 0 else min(1.0, math.floor(step.epoch) / self.warmup_epochs)

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        s_feats = [s[sk] for sk, _ in self.pairs] + [s["embedding"][:, :, None, None]]
        t_feats = [t[tk].detach() for _, tk in self.pairs] + [t["embedding"].detach()[:, :, None, None]]
        total, fused = 0.0, None
        for level in reversed(range(len(s_feats))):
            out, fused = self.abfs[level](s_feats[level], fused)
            total = total + hcl(out, t_feats[level])
        return self.warmup(step) * total


# ---------------------------------------------------------------------------- VID
class VID(StagePairsTerm):
    """Variational information distillation: Ahn et al., "Variational Information Distillation for
    Knowledge Transfer", CVPR 2019.

    Maximises a variational lower bound on I(T; S) by modelling each teacher stage feature as a
    Gaussian whose mean mu(S) a regressor (three 1x1 convs) predicts from the student's and whose
    variance is learned per channel, ``sigma_c^2 = softplus(alpha_c) + eps``::

        L = sum_j mean_{b,c,h,w} 0.5 * [ (t - mu(s))^2 / sigma_c^2 + log sigma_c^2 ]

    (the negative log-likelihood up to a constant). alpha starts where sigma^2 = init_pred_var and
    trains with the student, as in RepDistiller's VIDLoss (mdistiller's vid_loss has the same
    formula but keeps its variances in a plain list, so they never train).
    """

    name = "vid"

    def __init__(self, weight: float = 1.0, init_pred_var: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__(weight)
        require(float(eps) > 0, self.name, "eps", eps, "must be > 0")
        require(float(init_pred_var) > float(eps), self.name, "init_pred_var", init_pred_var,
                f"must be > eps ({eps})")
        self.init_pred_var, self.eps = float(init_pred_var), float(eps)
        self.regressors = nn.ModuleList()
        self.alphas = nn.ParameterList()

    def setup(self, student_shapes, teacher_shapes, info=None) -> None:
        pairs = self.pair_stages(student_shapes, teacher_shapes)
        self.regressors = nn.ModuleList(VIDRegressor(student_shapes[sk][0], teacher_shapes[tk][0]) for sk, tk in pairs)
        v = self.init_pred_var - self.eps
        alpha0 = v + math.log(-math.expm1(-v))  # softplus^-1(v)
        self.alphas = nn.ParameterList(
            nn.Parameter(torch.full((teacher_shapes[tk][0],), alpha0)) for _, tk in pairs
        )

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        total = 0.0
        for (sk, tk), regressor, alpha in zip(self.pairs, self.regressors, self.alphas):
            x, target = pool_to_common(s[sk], t[tk].detach())
            mu = regressor(x).float()
            var = (F.softplus(alpha.float()) + self.eps).view(1, -1, 1, 1)
            total = total + (0.5 * ((mu - target.float()).pow(2) / var + var.log())).mean()
        return total
