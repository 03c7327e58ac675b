"""Response-based knowledge: terms on the logits.

Every term reads the "logits" tap of both networks, casts them to float32 (the math stays in fp32
under bf16/fp16 autocast) and detaches the teacher's, so gradients reach only the student.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdrun.errors import ConfigError
from kdrun.knowledge.base import KnowledgeTerm, Step, Taps, require


def as_bool(term: str, key: str, value) -> bool:
    require(isinstance(value, bool), term, key, value, "must be true or false")
    return value


def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher_T || student_T) summed over classes, averaged over the batch, times T^2 (fp32)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
    return kl * (t * t)


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score every row: ``(z - mean(z)) / (std(z) + eps)``, fp32, with the sample std
    ``std(z) = sqrt(sum_k (z_k - mean(z))^2 / (K - 1))`` and ``eps = 1e-7`` (LSKD's ``normalize``)."""
    z = logits.float()
    centred = z - z.mean(dim=1, keepdim=True)
    std = (centred.pow(2).sum(dim=1, keepdim=True) / (z.shape[1] - 1)).sqrt()
    return centred / (std + eps)


class KD(KnowledgeTerm):
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network".

    ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, batch mean. Hinton's mix: the weight is
    ``alpha`` and label cross-entropy gets ``1 - alpha`` (under the root ``ce_weight=auto``).
    ``weight`` set explicitly replaces alpha as this term's weight (RepDistiller's ``-a``, LSKD's
    ``--kd-weight``); the CE weight then still follows alpha unless ``ce_weight`` is given.

    ``standardize=True``: logit standardisation of Sun et al., CVPR 2024, "Logit Standardization in
    Knowledge Distillation": both networks' logits are z-scored per sample,
    ``Z(z) = (z - mean(z)) / (std(z) + 1e-7)`` with the sample std (1/(K-1)), before the division
    by T, so the student matches the teacher's logit *relations* rather than their range and scale.
    """

    name = "kd"

    def __init__(self, alpha: float = 0.9, temperature: float = 4.0, standardize: bool = False,
                 weight: float | None = None) -> None:
        alpha, temperature = float(alpha), float(temperature)
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"loss.kd.alpha={alpha} is outside [0, 1]")
        if temperature <= 0:
            raise ConfigError(f"loss.kd.temperature={temperature} must be > 0")
        super().__init__(weight=alpha if weight is None else weight)
        self.alpha = alpha
        self.temperature = temperature
        self.standardize = as_bool(self.name, "standardize", standardize)

    def requested_ce_weight(self) -> float:
        return 1.0 - self.alpha

    def setup(self, student_shapes, teacher_shapes, info=None) -> None:
        if self.standardize and student_shapes["logits"][0] < 2:
            raise ConfigError("loss.kd.standardize=true needs at least 2 classes (the std of one logit is undefined)")

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        z_s, z_t = s["logits"], t["logits"].detach()
        if self.standardize:
            z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)
        return kd_divergence(z_s, z_t, self.temperature)


class LogitMSE(KnowledgeTerm):
    """Ba & Caruana, NeurIPS 2014, "Do Deep Nets Really Need to be Deep?": logit regression.

    The student regresses the teacher's logits (pre-softmax) with the mean squared error over the
    batch and the classes, ``L = 1/(B C) * sum_i ||z_s(i) - z_t(i)||_2^2``. The paper's objective,
    ``1/(2B) * sum_i ||z_s(i) - z_t(i)||^2``, is this times C/2 (``weight = C/2`` reproduces it);
    the mean keeps the default weight independent of the number of classes.
    """

    name = "logit_mse"

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        return F.mse_loss(s["logits"].float(), t["logits"].detach().float())


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of every row, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def dkd_parts(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (TCKD, NCKD) of Decoupled KD, each times T^2 (fp32).

    TCKD: KL between the binary distributions ``b = [p_target, 1 - p_target]`` of teacher and
    student. NCKD: KL between the distributions over the non-target classes alone (softmax of the
    non-target logits). Both are computed in log space, so confident teachers stay finite.
    Classic KD decomposes as ``KD = TCKD + (1 - p_target^teacher) * NCKD`` (Zhao et al., Eq. 1).
    """
    z_s = student_logits.float() / temperature
    z_t = teacher_logits.float() / temperature
    batch, classes = z_s.shape
    is_target = F.one_hot(targets, classes).bool()

    def split(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log b, non-target logits) of one network."""
        others = z[~is_target].view(batch, classes - 1)
        log_total = torch.logsumexp(z, dim=1)
        log_b = torch.stack([z[is_target] - log_total, torch.logsumexp(others, dim=1) - log_total], dim=1)
        return log_b, others

    log_b_s, others_s = split(z_s)
    log_b_t, others_t = split(z_t)
    tckd = _kl_rows(log_b_t, log_b_s)
    nckd = _kl_rows(F.log_softmax(others_t, dim=1), F.log_softmax(others_s, dim=1))
    scale = temperature * temperature
    return tckd * scale, nckd * scale


class DKD(KnowledgeTerm):
    """Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation".

    ``L = min(e / warmup, 1) * (alpha * TCKD + beta * NCKD)``, batch mean, where TCKD is the
    target-class KD (binary target / non-target distributions) and NCKD the non-target-class KD
    (distribution over the non-target classes), both at temperature T and scaled by T^2 (see
    :func:`dkd_parts`). ``e`` is the 1-based number of the step's epoch, constant within the epoch
    (``floor(step.epoch) + 1``), as mdistiller counts it: the first epoch already gets ``1 / warmup``.
    """

    name = "dkd"
    epoch_keys = {"warmup": 0}

    def __init__(
        self, weight: float = 1.0, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup: float = 20
    ) -> None:
        super().__init__(weight)
        self.alpha, self.beta = float(alpha), float(beta)
        self.temperature, self.warmup = float(temperature), float(warmup)
        require(self.alpha >= 0, self.name, "alpha", alpha, "must be >= 0")
        require(self.beta >= 0, self.name, "beta", beta, "must be >= 0")
        require(self.temperature > 0, self.name, "temperature", temperature, "must be > 0")
        require(self.warmup >= 0, self.name, "warmup", warmup, "must be >= 0 (epochs; 0: no warm-up)")

    def setup(self, student_shapes, teacher_shapes, info=None) -> None:
        classes = student_shapes["logits"][0]
        if classes < 2:
            raise ConfigError(f"loss.dkd needs at least 2 classes; the dataset has {classes}")

    def warmup_factor(self, epoch: float) -> float:
        """Warm-up of the whole term at the fractional 0-based ``epoch``: ``min((floor(epoch) + 1) / warmup, 1)``."""
        return 1.0 if self.warmup == 0 else min((math.floor(epoch) + 1) / self.warmup, 1.0)

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        tckd, nckd = dkd_parts(s["logits"], t["logits"].detach(), step.targets, self.temperature)
        return self.warmup_factor(step.epoch) * (self.alpha * tckd + self.beta * nckd).mean()


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of every row of ``a`` with the same row of ``b``."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


class DIST(KnowledgeTerm):
    """Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher" (DIST).

    With ``Y = softmax(Z / tau)`` (B x C) for each network and the Pearson distance
    ``d(u, v) = 1 - rho(u, v)``:
    inter-class relation ``L_inter = 1/B sum_i d(Y_s[i, :], Y_t[i, :])`` (each sample's
    predictions across classes), intra-class relation ``L_intra = 1/C sum_c d(Y_s[:, c], Y_t[:, c])``
    (each class's predictions across the batch), ``L = tau^2 * (beta * L_inter + gamma * L_intra)``.
    The defaults split the paper's CIFAR-100 beta = gamma = 2 as the authors' code does: the loss
    with beta = gamma = 1 and tau = 4 (their ``dist_t4``), weighted 2 (their ``kd_loss_weight``).
    """

    name = "dist"

    def __init__(self, weight: float = 2.0, beta: float = 1.0, gamma: float = 1.0, temperature: float = 4.0) -> None:
        super().__init__(weight)
        self.beta, self.gamma, self.temperature = float(beta), float(gamma), float(temperature)
        require(self.beta >= 0, self.name, "beta", beta, "must be >= 0")
        require(self.gamma >= 0, self.name, "gamma", gamma, "must be >= 0")
        require(self.temperature > 0, self.name, "temperature", temperature, "must be > 0")

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        y_s = F.softmax(s["logits"].float() / self.temperature, dim=1)
        y_t = F.softmax(t["logits"].detach().float() / self.temperature, dim=1)
        inter = 1.0 - pearson_rows(y_s, y_t).mean()
        intra = 1.0 - pearson_rows(y_s.t(), y_t.t()).mean()
        return self.temperature**2 * (self.beta * inter + self.gamma * intra)
