"""Relation-based knowledge: terms on how the samples of a batch relate to one another.

Each term builds a batch x batch (or batch^3) structure from one network's features -- distances,
angles, similarities, kernel values -- and asks the student's to match the teacher's. The math runs
in float32 with autocast switched off (these terms are mostly matrix products, which autocast would
otherwise run in bf16/fp16); the teacher's features are detached.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.errors import ConfigError
from kdrun.knowledge.adapters import full_precision
from kdrun.knowledge.base import KnowledgeTerm, Step, Taps, require
from kdrun.knowledge.features.stages import stage_names


def flat32(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, D) in float32."""
    return x.float().flatten(1)


def last_stage(shapes: Mapping[str, tuple], side: str, term: str) -> str:
    """The deepest "stageK" tap among ``shapes`` (post-activation, before pooling)."""
    stages = stage_names(shapes)
    if not stages:
        raise ConfigError(f"loss.{term}: the {side} has no stage taps; it has {', '.join(sorted(shapes))}")
    return stages[-1]


def _zero(x: torch.Tensor) -> torch.Tensor:
    """A zero that keeps ``x`` in the graph (for batches too small to have any pair or triplet)."""
    return x.sum() * 0.0


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between the rows of ``e`` (B x B), zero on the diagonal."""
    sq = e.pow(2).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * e @ e.t()).clamp_min(eps)
    off_diagonal = 1.0 - torch.eye(len(e), device=e.device, dtype=e.dtype)
    return d2.sqrt() * off_diagonal


def angle_cosines(e: torch.Tensor) -> torch.Tensor:
    """``A[j, i, k] = <u(j->i), u(j->k)>``: cosine of the angle at apex ``e_j`` between ``e_i`` and
    ``e_k``, where ``u(j->i) = (e_i - e_j) / ||e_i - e_j||`` (B x B x B)."""
    u = F.normalize(e[None, :, :] - e[:, None, :], dim=2)  # u[j, i] = unit vector from e_j to e_i
    return u @ u.transpose(1, 2)


class RKD(KnowledgeTerm):
    """Park et al., CVPR 2019, "Relational Knowledge Distillation", on the ``embedding`` tap.

    Distance-wise potential ``psi_D(i, j) = ||t_i - t_j|| / mu`` with ``mu`` the mean distance over
    the pairs ``i != j`` of the batch; angle-wise potential ``psi_A(i, j, k) = cos angle(t_i, t_j, t_k)
    = <e_ji, e_jk>`` (unit vectors from t_j). Both are matched with the Huber loss (smooth L1,
    delta 1), averaged over the full B x B and B x B x B tensors, ``L = distance_weight * L_D +
    angle_weight * L_A``. The paper sums over X^2 and X^3; this mean over every entry -- the zero
    diagonal and the degenerate triplets (cosine 0 at a repeated apex, 1 for ``i == k``) count,
    but match exactly -- is RepDistiller's and mdistiller's, the normalisation of the published weights.
    """

    name = "rkd"
    tap = "embedding"

    def __init__(self, weight: float = 1.0, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__(weight)
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)
        require(self.distance_weight >= 0, self.name, "distance_weight", distance_weight, "must be >= 0")
        require(self.angle_weight >= 0, self.name, "angle_weight", angle_weight, "must be >= 0")

    def student_taps(self) -> set[str]:
        return {self.tap}

    def teacher_taps(self) -> set[str]:
        return {self.tap}

    @staticmethod
    def normalized_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
        b = len(e)
        d = pairwise_distances(e)
        mean = d.sum() / (b * (b - 1))
        return d / mean.clamp_min(eps)

    def distance_loss(self, e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
        """Huber loss of the normalised distances, mean over all B^2 entries (zero diagonal included)."""
        if len(e_s) < 2:
            return _zero(e_s)
        return F.smooth_l1_loss(self.normalized_distances(e_s), self.normalized_distances(e_t))

    def angle_loss(self, e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
        """Huber loss of the angle cosines, mean over all B^3 entries (degenerate triplets included)."""
        if len(e_s) < 3:
            return _zero(e_s)
        return F.smooth_l1_loss(angle_cosines(e_s), angle_cosines(e_t))

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        with full_precision(s[self.tap]):
            e_s, e_t = flat32(s[self.tap]), flat32(t[self.tap].detach())
            return self.distance_weight * self.distance_loss(e_s, e_t) + self.angle_weight * self.angle_loss(e_s, e_t)


def similarity_matrix(f: torch.Tensor) -> torch.Tensor:
    """``normalise_rows(F F^T)`` of the flattened features (B x B), each row scaled to unit L2 norm."""
    f = flat32(f)
    return F.normalize(f @ f.t(), dim=1)


class SP(KnowledgeTerm):
    """Tung & Mori, ICCV 2019, "Similarity-Preserving Knowledge Distillation".

    ``G = normalise_rows(Q Q^T)`` with ``Q`` the batch's feature maps flattened to (B, C*H*W);
    ``L = ||G_t - G_s||_F^2 / B^2``. Default tap: the last stage of each network ("stageK",
    post-activation, before pooling), resolved at setup, as RepDistiller does (its ``feat[-2]``);
    set ``student_tap``/``teacher_tap`` to a tap name to use another.
    """

    name = "sp"

    def __init__(self, weight: float = 3000.0, student_tap: str = "last", teacher_tap: str = "last") -> None:
        super().__init__(weight)
        self.s_tap, self.t_tap = str(student_tap), str(teacher_tap)

    # Until setup names it, "last" is reported as "stage1": a stage tap every zoo model has, so the
    # tap check passes and schemes that sort terms into logit-only and feature terms see a feature term.
    def student_taps(self) -> set[str]:
        return {"stage1" if self.s_tap == "last" else self.s_tap}

    def teacher_taps(self) -> set[str]:
        return {"stage1" if self.t_tap == "last" else self.t_tap}

    def setup(self, student_shapes, teacher_shapes, info=None) -> None:
        if self.s_tap == "last":
            self.s_tap = last_stage(student_shapes, "student", self.name)
        if self.t_tap == "last":
            self.t_tap = last_stage(teacher_shapes, "teacher", self.name)

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        if "last" in (self.s_tap, self.t_tap):
            self.setup(s, t)  # called without setup (tests, notebooks): name the taps from the dicts
        f_s = s[self.s_tap]
        with full_precision(f_s):
            g_s, g_t = similarity_matrix(f_s), similarity_matrix(t[self.t_tap].detach())
            return (g_t - g_s).pow(2).sum() / (len(f_s) ** 2)


def cosine_conditional_probabilities(f: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``P[i, j] = K(f_i, f_j) / sum_k K(f_i, f_k)`` with the cosine kernel ``K = (cos + 1) / 2``,
    the rows scaled by ``1 / (||f_i|| + eps)`` (an all-zero row stays zero: cosine 0)."""
    f = flat32(f)
    f = f / (f.norm(dim=1, keepdim=True) + eps)
    kernel = (f @ f.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


class PKT(KnowledgeTerm):
    """Passalis & Tefas, ECCV 2018, "Learning Deep Representations with Probabilistic Knowledge
    Transfer", on the ``embedding`` tap.

    The cosine-similarity kernel ``K(a, b) = (a.b / (|a| |b|) + 1) / 2`` of every pair of the batch
    becomes the conditional distributions ``p_{j|i} = K(x_i, x_j) / sum_k K(x_i, x_k)`` (teacher)
    and ``q_{j|i}`` (student); ``L = 1/B^2 sum_{i,j} p_{j|i} log((p_{j|i} + eps) / (q_{j|i} + eps))``,
    i.e. KL(P || Q) per row averaged over the B^2 entries (diagonal included, as in the authors' code,
    the normalisation the published weight was tuned for).
    """

    name = "pkt"
    tap = "embedding"
    eps = 1e-7

    def __init__(self, weight: float = 30000.0) -> None:
        super().__init__(weight)

    def student_taps(self) -> set[str]:
        return {self.tap}

    def teacher_taps(self) -> set[str]:
        return {self.tap}

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        with full_precision(s[self.tap]):
            q = cosine_conditional_probabilities(s[self.tap], self.eps)
            p = cosine_conditional_probabilities(t[self.tap].detach(), self.eps)
            return (p * torch.log((p + self.eps) / (q + self.eps))).mean()


def taylor_rbf_kernel(f: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """Gaussian RBF kernel of the L2-normalised rows, by its Taylor series (B x B).

    For unit vectors ``exp(-gamma ||x - y||^2) = exp(-2 gamma) exp(2 gamma x.y)
    ~= sum_{p=0}^{P} exp(-2 gamma) (2 gamma)^p / p! (x.y)^p``.
    """
    f = F.normalize(flat32(f), dim=1)
    cos = f @ f.t()
    kernel = torch.zeros_like(cos)
    for p in range(order + 1):
        kernel = kernel + math.exp(-2.0 * gamma) * (2.0 * gamma) ** p / math.factorial(p) * cos.pow(p)
    return kernel


def adjacent_correlation(e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    """RepDistiller's CC loss on two embeddings of one width: with ``delta = |e_s - e_t|`` (B x D),
    ``1/(B-1) sum_{i<B} sum_d delta[i, d] * delta[i+1, d]`` (each sample paired with the next)."""
    delta = (e_s - e_t).abs()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


class CC(KnowledgeTerm):
    """Peng et al., ICCV 2019, "Correlation Congruence for Knowledge Distillation", on ``embedding``.

    ``kernel="repdistiller"`` (default): RepDistiller's ``Correlation``, the code behind the
    published CIFAR-100 numbers and the weight 0.02. Both networks' embeddings pass their own linear
    embedding to ``embed_dim`` (128) -- two adapters, both trained with the student -- and
    ``L = 1/(B-1) sum_i sum_d |s_i - t_i|_d |s_{i+1} - t_{i+1}|_d`` (:func:`adjacent_correlation`).

    ``kernel="taylor"``: the paper's correlation congruence. Only the student's embedding passes a
    linear embedding (student dim -> teacher dim); the correlation matrix of a batch is the Gaussian
    RBF kernel of its L2-normalised features, Taylor-expanded to ``order`` P with ``gamma``
    (:func:`taylor_rbf_kernel`), and ``L = ||psi(F_t) - psi(F_s)||_F^2 / B^2``.
    ``weight=None`` takes the kernel's default, :data:`DEFAULT_WEIGHTS`.
    """

    name = "cc"
    tap = "embedding"
    #: weight=None: RepDistiller's 0.02; for the Taylor kernel see conf/loss/cc.yaml
    DEFAULT_WEIGHTS = {"repdistiller": 0.02, "taylor": 10.0}

    def __init__(
        self, weight: float | None = None, kernel: str = "repdistiller", embed_dim: int = 128,
        gamma: float = 0.4, order: int = 2,
    ) -> None:
        require(kernel in self.DEFAULT_WEIGHTS, self.name, "kernel", kernel, "must be repdistiller or taylor")
        super().__init__(self.DEFAULT_WEIGHTS[kernel] if weight is None else weight)
        self.kernel = kernel
        require(
            isinstance(embed_dim, int) and not isinstance(embed_dim, bool) and embed_dim >= 1,
            self.name, "embed_dim", embed_dim, "must be an integer >= 1 (width of the repdistiller embeddings)",
        )
        self.embed_dim = embed_dim
        self.gamma = float(gamma)
        require(self.gamma > 0, self.name, "gamma", gamma, "must be > 0")
        require(
            isinstance(order, int) and not isinstance(order, bool) and order >= 1,
            self.name, "order", order, "must be an integer >= 1 (order of the Taylor series)",
        )
        self.order = order
        self.embed_s: nn.Linear | None = None
        self.embed_t: nn.Linear | None = None

    def student_taps(self) -> set[str]:
        return {self.tap}

    def teacher_taps(self) -> set[str]:
        return {self.tap}

    def setup(self, student_shapes, teacher_shapes, info=None) -> None:
        s_dim, t_dim = math.prod(student_shapes[self.tap]), math.prod(teacher_shapes[self.tap])
        if self.kernel == "taylor":
            self.embed_s = nn.Linear(s_dim, t_dim)
        else:
            self.embed_s, self.embed_t = nn.Linear(s_dim, self.embed_dim), nn.Linear(t_dim, self.embed_dim)

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        if self.embed_s is None:
            raise RuntimeError("loss.cc: call setup() first (it builds the linear embeddings)")
        with full_precision(s[self.tap]):
            e_s, f_t = self.embed_s(flat32(s[self.tap])), flat32(t[self.tap].detach())
            if self.kernel == "taylor":
                k_s = taylor_rbf_kernel(e_s, self.gamma, self.order)
                k_t = taylor_rbf_kernel(f_t, self.gamma, self.order)
                return (k_t - k_s).pow(2).sum() / (len(k_s) ** 2)
            if len(e_s) < 2:  # no adjacent pair
                return _zero(e_s) + _zero(self.embed_t(f_t))
            return adjacent_correlation(e_s, self.embed_t(f_t))
