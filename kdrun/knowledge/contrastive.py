"""Contrastive knowledge: CRD (a student-teacher NCE objective over a memory of the training set)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdrun.errors import ConfigError, KdrunError
from kdrun.knowledge.adapters import Embed, full_precision
from kdrun.knowledge.base import KnowledgeTerm, Step, Taps, require

#: how CRD draws its negatives: from the samples of the other classes (RepDistiller's CIFAR loader,
#: mode ``exact``), or uniformly from every other sample
NEGATIVES = ("other_class", "uniform")


def memory_scores(memory: torch.Tensor, rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``memory[rows[b, k]] . v[b]`` for every b, k: (B, K+1).

    Two equal ways: gather the rows (B*(K+1)*d numbers) or score the whole memory and pick
    (n*B numbers); the smaller is used. Neither writes into ``memory``.
    """
    n, d = memory.shape
    if n <= rows.shape[1] * d:
        return (memory @ v.t()).gather(0, rows.t()).t()
    return torch.einsum("bkd,bd->bk", memory[rows], v)


def nce_loss(scores: torch.Tensor, log_z: torch.Tensor | float, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    """CRD's NCE loss (Tian et al. 2020, Eq. 18), in log space (fp32).

    ``scores[:, 0]`` is the positive, ``scores[:, 1:]`` the K negatives, each ``v.m / T``; the
    model's probability is ``P = exp(score) / Z`` and the noise's ``P_n = 1/N``. With ``c = K/N``
    and RepDistiller's ``eps = 1e-7`` in the denominators::

        L = -1/B sum_b [ log P_b0 / (P_b0 + c + eps) + sum_k log c / (P_bk + c + eps) ]
    """
    k = scores.shape[1] - 1
    log_c = math.log(k / n_data)
    log_den = math.log(k / n_data + eps)
    log_p = scores - log_z
    log_pos = -F.softplus(log_den - log_p[:, 0])                    # log P / (P + c + eps)
    log_neg = (log_c - log_den) - F.softplus(log_p[:, 1:] - log_den)  # log c / (P + c + eps)
    return -(log_pos.sum() + log_neg.sum()) / scores.shape[0]


def init_memory(n: int, dim: int) -> torch.Tensor:
    """A fresh memory: ``n`` rows of ``dim`` values uniform in [-s, s], ``s = 1 / sqrt(dim / 3)``
    (so each row has unit expected squared norm; not normalised), as RepDistiller's ContrastMemory."""
    stdv = 1.0 / math.sqrt(dim / 3)
    return torch.rand(n, dim) * (2 * stdv) - stdv


class CRD(KnowledgeTerm):
    """Contrastive representation distillation: Tian et al., "Contrastive Representation
    Distillation", ICLR 2020.

    Student and teacher embeddings go through linear heads to ``feat_dim`` and are L2-normalised
    (v_s, v_t). A memory per side holds one vector per training sample (rows = dataset positions,
    ``step.index``; initialised uniform in [-s, s], s = 1/sqrt(feat_dim/3)). For each sample, the
    positive is its own row and ``nce_k`` negatives are drawn (with replacement) from the samples
    of the other classes (``negatives: other_class``) or uniformly from every other sample
    (``uniform``); with the scores ``v . m / T`` an NCE loss (the critic h = P / (P + K/N),
    P = exp(v . m / T) / Z, Z fixed from the first batch as N times the mean exp score) is taken
    both ways::

        L = NCE(v_s against the teacher memory) + NCE(v_t against the student memory)

    After each training step the batch's rows are updated with momentum and re-normalised:
    ``m <- normalise(momentum * m + (1 - momentum) * v)``.

    The default equals RepDistiller's CRDLoss fed by its CIFAR loader (CIFAR100InstanceSample,
    mode ``exact``), which draws the negatives of a sample from the other classes; it draws
    them without replacement when there are at least nce_k such samples, kdrun always with
    replacement (the same distribution for each negative, on the device, no loop per sample), so
    nce_k stays as given on datasets with fewer other samples (RepDistiller's loader then draws
    with replacement as well). ``other_class`` needs every training sample's label
    (``DataInfo.train_labels``). ``uniform`` never draws the sample's own row (RepDistiller's
    memory sampler, used when its loader gives no negatives, may).
    Defaults (RepDistiller CIFAR-100): feat_dim 128, nce_k 16384, T 0.07, momentum 0.5, weight 0.8.
    """

    name = "crd"

    def __init__(self, weight: float = 0.8, feat_dim: int = 128, nce_k: int = 16384, temperature: float = 0.07,
                 momentum: float = 0.5, negatives: str = "other_class", student_tap: str = "embedding",
                 teacher_tap: str = "embedding") -> None:
        super().__init__(weight)
        integer = lambda v: isinstance(v, int) and not isinstance(v, bool)
        require(integer(feat_dim) and feat_dim >= 1, self.name, "feat_dim", feat_dim, "must be an integer >= 1")
        require(integer(nce_k) and nce_k >= 1, self.name, "nce_k", nce_k, "must be an integer >= 1")
        require(float(temperature) > 0, self.name, "temperature", temperature, "must be > 0")
        require(0.0 <= float(momentum) < 1.0, self.name, "momentum", momentum, "is outside [0, 1)")
        require(negatives in NEGATIVES, self.name, "negatives", negatives, "must be other_class or uniform")
        self.feat_dim, self.nce_k = int(feat_dim), int(nce_k)
        self.temperature, self.momentum = float(temperature), float(momentum)
        self.negatives = str(negatives)
        self.s_tap, self.t_tap = student_tap, teacher_tap
        self.k = self.nce_k
        self.n_data = 0
        self.embed_s: Embed | None = None
        self.embed_t: Embed | None = None
        self.register_buffer("memory_s", None)
        self.register_buffer("memory_t", None)
        self.register_buffer("log_z", torch.full((2,), float("nan")))  # [student anchor, teacher anchor]
        # other_class tables, rebuilt from the dataset by setup (not saved): each sample's label,
        # the sample positions sorted by class, and each class's first place and size in that order
        for name in ("train_labels", "by_class", "class_start", "class_count"):
            self.register_buffer(name, None, persistent=False)
        self._z_ready = False

    def student_taps(self) -> set[str]:
        return {self.s_tap}

    def teacher_taps(self) -> set[str]:
        return {self.t_tap}

    def setup(self, student_shapes, teacher_shapes, info=None) -> None:
        n = int(getattr(info, "n_train", 0) or 0)
        if n < 2:
            raise ConfigError(f"loss.crd needs the training-set size (n_train >= 2) for its memory; got {n}")
        self.n_data = n
        self.embed_s = Embed(math.prod(student_shapes[self.s_tap]), self.feat_dim)
        self.embed_t = Embed(math.prod(teacher_shapes[self.t_tap]), self.feat_dim)
        self.memory_s = init_memory(n, self.feat_dim)
        self.memory_t = init_memory(n, self.feat_dim)
        self.log_z = torch.full((2,), float("nan"))
        self._z_ready = False
        if self.negatives == "other_class":
            self._class_tables(getattr(info, "train_labels", None), n)

    def _class_tables(self, labels, n: int) -> None:
        key = "loss.crd.negatives=other_class"
        if labels is None:
            raise ConfigError(f"{key} needs every training sample's label (DataInfo.train_labels), which this "
                              "dataset does not give; use loss.crd.negatives=uniform")
        labels = torch.as_tensor(labels).detach().to("cpu", torch.int64).flatten()
        if labels.numel() != n or int(labels.min()) < 0:
            raise ConfigError(f"{key} needs one label >= 0 per training sample (n_train={n}); "
                              f"got {labels.numel()} labels")
        count = torch.bincount(labels)
        if int(count.max()) == n:
            raise ConfigError(f"{key} needs training samples of at least two classes")
        self.train_labels = labels
        self.by_class = torch.argsort(labels, stable=True)
        self.class_start = torch.cumsum(count, 0) - count
        self.class_count = count

    def sample_negatives(self, index: torch.Tensor) -> torch.Tensor:
        """(B, K) rows, never the sample's own: with ``other_class``, uniform over the samples of
        the other classes (an offset into the class-sorted positions that skips the sample's own
        class block); with ``uniform``, uniform over all other rows."""
        shape = (index.shape[0], self.k)
        if self.negatives == "uniform":
            draw = torch.randint(0, self.n_data - 1, shape, device=index.device)
            return draw + (draw >= index[:, None]).long()
        label = self.train_labels[index]
        start, count = self.class_start[label][:, None], self.class_count[label][:, None]
        offset = torch.randint(0, 1 << 62, shape, device=index.device) % (self.n_data - count)
        return self.by_class[offset + count * (offset >= start).long()]

    def forward(self, s: Taps, t: Taps, step: Step) -> torch.Tensor:
        if step.index is None:
            raise KdrunError("loss.crd needs the training-set positions of the batch (Step.index)")
        index = step.index.to(self.memory_s.device).long()
        v_s = self.embed_s(s[self.s_tap])
        v_t = self.embed_t(t[self.t_tap].detach())
        rows = torch.cat([index[:, None], self.sample_negatives(index)], dim=1)
        with full_precision(v_s):
            score_s = memory_scores(self.memory_t, rows, v_s) / self.temperature  # student vs teacher memory
            score_t = memory_scores(self.memory_s, rows, v_t) / self.temperature  # teacher vs student memory
            if not self._z_ready:  # set once (or restored with the state dict); checked until then
                if torch.isnan(self.log_z).any():
                    self.log_z = torch.stack([self._log_z(score_s), self._log_z(score_t)])
                self._z_ready = True
            loss = nce_loss(score_s, self.log_z[0], self.n_data) + nce_loss(score_t, self.log_z[1], self.n_data)
        if self.training:
            self.update_memory(index, v_s.detach(), v_t.detach())
        return loss

    def _log_z(self, scores: torch.Tensor) -> torch.Tensor:
        """log Z = log(N * mean exp(score)), CRD's one-off estimate of the partition function."""
        return torch.logsumexp(scores.detach().flatten(), 0) - math.log(scores.numel()) + math.log(self.n_data)

    @torch.no_grad()
    def update_memory(self, index: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        """Momentum update of the rows ``index`` of both memories, re-normalised to unit length.

        Out of place (a new tensor per memory) so that the scores computed from the old memory
        keep what autograd saved for the backward pass.
        """
        m = self.momentum
        for name, v in (("memory_s", v_s), ("memory_t", v_t)):
            memory = getattr(self, name)
            rows = F.normalize(memory[index] * m + v.float() * (1.0 - m), dim=1)
            setattr(self, name, memory.index_copy(0, index, rows))
