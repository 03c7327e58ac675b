"""Response terms (kd with standardisation, logit_mse, dkd, dist) and relation terms (rkd, sp, pkt, cc).

Each term is checked against a second, plainly written implementation (numpy loops) or a closed
form, against a property its paper states, for gradients (student and adapters yes, teacher no),
for finite fp32 values under bf16 autocast, and for rejecting bad hyper-parameters. A last test runs
one real training step of every term through KnowledgeSet on zoo teacher/student pairs.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kdrun.config import compose, instantiate
from kdrun.errors import ConfigError
from kdrun.knowledge import KnowledgeSet, Step
from kdrun.knowledge.logits import DIST, DKD, KD, LogitMSE, dkd_parts, kd_divergence, pearson_rows, standardize_logits
from kdrun.knowledge.relations import CC, PKT, RKD, SP, last_stage
from kdrun.models import create_model, tap_shapes

CONF = Path(__file__).resolve().parents[1] / "conf" / "loss"


def np64(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def np_kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1.0 else abs(x) - 0.5


# ---------------------------------------------------------------- kd with logit standardisation


def np_standardize(row: np.ndarray) -> np.ndarray:
    """LSKD's z-score: the sample std (ddof=1, 1/(K-1)) plus 1e-7."""
    return (row - row.mean()) / (row.std(ddof=1) + 1e-7)


def test_standardize_logits_matches_numpy():
    torch.manual_seed(0)
    z = torch.randn(4, 7) * 3 + 1
    expected = [np_standardize(row) for row in np64(z)]
    assert np.allclose(standardize_logits(z).numpy(), np.stack(expected), atol=1e-5)
    # the sample std, not the population one: every standardised row has sum of squares K - 1
    assert np.allclose((standardize_logits(z).double() ** 2).sum(dim=1).numpy(), 6.0, rtol=1e-5)
    # the eps is added to the std: a constant row stays finite (all zeros)
    assert torch.equal(standardize_logits(torch.full((1, 5), 3.0)), torch.zeros(1, 5))


def test_standardized_kd_matches_independent_value():
    torch.manual_seed(1)
    s, t, temp = torch.randn(3, 5) * 2, torch.randn(3, 5) * 5, 2.0
    total = 0.0
    for zs, zt in zip(np64(s), np64(t)):
        zs, zt = np_standardize(zs), np_standardize(zt)
        total += np_kl(np_softmax(zt / temp), np_softmax(zs / temp))
    value = KD(temperature=temp, standardize=True)({"logits": s}, {"logits": t}, Step(None))
    assert value.item() == pytest.approx(total / 3 * temp**2, rel=1e-4)
    # standardize=false is plain Hinton KD
    plain = KD(temperature=temp)({"logits": s}, {"logits": t}, Step(None))
    assert plain.item() == pytest.approx(kd_divergence(s, t, temp).item(), rel=1e-6)


def test_standardized_kd_invariant_to_per_sample_shift_and_scale_of_student():
    torch.manual_seed(2)
    s, t = torch.randn(5, 10), torch.randn(5, 10) * 4
    shift, scale = torch.randn(5, 1) * 10, torch.rand(5, 1) * 5 + 0.2
    term = KD(standardize=True)
    base = term({"logits": s}, {"logits": t}, Step(None)).item()
    moved = term({"logits": s * scale + shift}, {"logits": t}, Step(None)).item()
    assert moved == pytest.approx(base, rel=1e-4)
    assert term({"logits": t * 3 - 2}, {"logits": t}, Step(None)).item() == pytest.approx(0.0, abs=1e-5)
    # without standardisation the scale matters
    assert KD()({"logits": s * scale + shift}, {"logits": t}, Step(None)).item() != pytest.approx(
        KD()({"logits": s}, {"logits": t}, Step(None)).item(), rel=1e-3
    )


def test_standardized_kd_needs_two_classes():
    with pytest.raises(ConfigError, match=r"loss\.kd\.standardize=true needs at least 2 classes"):
        KD(standardize=True).setup({"logits": (1,)}, {"logits": (1,)})
    KD().setup({"logits": (1,)}, {"logits": (1,)})  # plain KD has no such need
    KD(standardize=True).setup({"logits": (2,)}, {"logits": (2,)})


# ---------------------------------------------------------------- logit_mse


def test_logit_mse_closed_form_and_zero():
    s = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 3.0]])
    # squared differences (1 + 4 + 0) + (1 + 1 + 9) = 16 over B * C = 6 entries
    assert LogitMSE()({"logits": s}, {"logits": t}, Step(None)).item() == pytest.approx(16 / 6)
    # the paper's 1/(2B) sum_i ||z_s - z_t||^2 = 16 / 4 is the same term at weight C/2
    assert 1.5 * LogitMSE()({"logits": s}, {"logits": t}, Step(None)).item() == pytest.approx(16 / 4)
    assert LogitMSE()({"logits": t}, {"logits": t}, Step(None)).item() == 0.0


# ---------------------------------------------------------------- dkd


def np_dkd(zs: np.ndarray, zt: np.ndarray, target: int, temp: float) -> tuple[float, float]:
    ps, pt = np_softmax(zs / temp), np_softmax(zt / temp)
    tckd = np_kl([pt[target], 1 - pt[target]], [ps[target], 1 - ps[target]])
    keep = [c for c in range(len(zs)) if c != target]
    nckd = np_kl(np_softmax(zt[keep] / temp), np_softmax(zs[keep] / temp))
    return tckd * temp**2, nckd * temp**2


def test_dkd_matches_independent_value():
    torch.manual_seed(3)
    s, t, y = torch.randn(4, 6) * 2, torch.randn(4, 6) * 3, torch.tensor([0, 5, 2, 2])
    tckd, nckd = dkd_parts(s, t, y, 4.0)
    for i in range(4):
        ref_t, ref_n = np_dkd(np64(s[i]), np64(t[i]), int(y[i]), 4.0)
        # fp32 KL of close distributions cancels: compare to ~1e-5 absolute
        assert tckd[i].item() == pytest.approx(ref_t, rel=1e-4, abs=1e-5)
        assert nckd[i].item() == pytest.approx(ref_n, rel=1e-4, abs=1e-5)
    term = DKD(alpha=1.0, beta=8.0, temperature=4.0, warmup=20)
    value = term({"logits": s}, {"logits": t}, Step(y, epoch=25.0))
    assert value.item() == pytest.approx((tckd + 8.0 * nckd).mean().item(), rel=1e-5)


def test_dkd_decomposes_classic_kd():
    # Zhao et al. Eq. 1: KD = TCKD + (1 - p_target^teacher) * NCKD, per sample
    torch.manual_seed(4)
    s, t, y, temp = torch.randn(5, 8), torch.randn(5, 8) * 2, torch.randint(0, 8, (5,)), 3.0
    tckd, nckd = dkd_parts(s, t, y, temp)
    p_t = torch.softmax(t / temp, dim=1).gather(1, y[:, None]).squeeze(1)
    for i in range(5):
        kd_i = kd_divergence(s[i : i + 1], t[i : i + 1], temp).item()
        assert (tckd[i] + (1 - p_t[i]) * nckd[i]).item() == pytest.approx(kd_i, rel=1e-4)


# fractional 0-based epoch -> mdistiller's min(e / 20, 1) with the 1-based epoch number e, constant in an epoch
@pytest.mark.parametrize(
    "epoch,factor", [(0, 0.05), (0.99, 0.05), (1, 0.1), (9.5, 0.5), (18.7, 0.95), (19, 1.0), (30, 1.0)]
)
def test_dkd_warmup_factor(epoch, factor):
    term = DKD(warmup=20)
    assert term.warmup_factor(epoch) == pytest.approx(factor)
    torch.manual_seed(5)
    s, t, y = torch.randn(3, 5), torch.randn(3, 5), torch.tensor([1, 2, 3])
    full = term({"logits": s}, {"logits": t}, Step(y, epoch=40.0)).item()
    assert term({"logits": s}, {"logits": t}, Step(y, epoch=epoch)).item() == pytest.approx(factor * full, abs=1e-7)
    assert DKD(warmup=0).warmup_factor(0) == 1.0


def test_dkd_zero_when_equal_and_finite_for_confident_teacher():
    torch.manual_seed(6)
    t, y = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    assert DKD()({"logits": t}, {"logits": t}, Step(y, epoch=30)).item() == pytest.approx(0.0, abs=1e-6)
    confident = torch.zeros(4, 10)
    confident[torch.arange(4), y] = 1e4  # p_target == 1.0 in fp32
    value = DKD()({"logits": torch.randn(4, 10)}, {"logits": confident}, Step(y, epoch=30))
    assert torch.isfinite(value)


# ---------------------------------------------------------------- dist


def test_dist_matches_independent_value():
    torch.manual_seed(7)
    s, t, tau = torch.randn(6, 5) * 2, torch.randn(6, 5) * 3, 4.0
    ys = np.stack([np_softmax(r / tau) for r in np64(s)])
    yt = np.stack([np_softmax(r / tau) for r in np64(t)])
    inter = 1 - np.mean([np.corrcoef(ys[i], yt[i])[0, 1] for i in range(6)])
    intra = 1 - np.mean([np.corrcoef(ys[:, c], yt[:, c])[0, 1] for c in range(5)])
    value = DIST(beta=2.0, gamma=3.0, temperature=tau)({"logits": s}, {"logits": t}, Step(None))
    assert value.item() == pytest.approx(tau**2 * (2.0 * inter + 3.0 * intra), rel=1e-4)


def test_dist_invariances():
    torch.manual_seed(8)
    s, t = torch.randn(6, 7), torch.randn(6, 7)
    term = DIST()
    base = term({"logits": s}, {"logits": t}, Step(None)).item()
    # a per-sample shift of the logits leaves the softened predictions, hence both relations, unchanged
    shifted = term({"logits": s + torch.randn(6, 1) * 5}, {"logits": t - torch.randn(6, 1) * 5}, Step(None))
    assert shifted.item() == pytest.approx(base, rel=1e-5)
    # the Pearson distance is invariant to a positive affine map of each prediction vector (the paper's
    # point: a relation, not an exact match); that is the inter-class relation on the probabilities
    y_s, y_t = torch.softmax(s, dim=1), torch.softmax(t, dim=1)
    a, b = torch.rand(6, 1) * 3 + 0.1, torch.randn(6, 1)
    assert torch.allclose(pearson_rows(a * y_s + b, y_t), pearson_rows(y_s, y_t), atol=1e-5)
    # equal predictions: zero up to the 1e-8 guard in the correlation's denominator
    assert term({"logits": t}, {"logits": t}, Step(None)).item() == pytest.approx(0.0, abs=1e-3)
    # one sample: no intra-class relation to learn (centred columns are zero), still finite
    one = torch.randn(1, 7, requires_grad=True)
    value = term({"logits": one}, {"logits": t[:1]}, Step(None))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(one.grad).all()


# ---------------------------------------------------------------- rkd


def np_rkd(s: np.ndarray, t: np.ndarray, w_d: float, w_a: float) -> float:
    b = len(s)

    # every pair and every triplet, as RepDistiller and mdistiller average them: the diagonal
    # distance is 0 and the mean distance mu is over the pairs i != j; a triplet with a repeated
    # apex (i == j or k == j) has a zero vector, cosine 0; i == k (apex apart) has cosine 1
    def distances(e):
        d = {(i, j): float(np.linalg.norm(e[i] - e[j])) for i in range(b) for j in range(b)}
        mu = sum(d.values()) / (b * (b - 1))
        return {k: v / mu for k, v in d.items()}

    def cosines(e):
        out = {}
        for j in range(b):
            for i in range(b):
                for k in range(b):
                    if j in (i, k):
                        out[(i, j, k)] = 0.0
                    else:
                        u, v = e[i] - e[j], e[k] - e[j]
                        out[(i, j, k)] = float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
        return out

    ds, dt = distances(s), distances(t)
    as_, at = cosines(s), cosines(t)
    assert len(ds) == b**2 and len(as_) == b**3
    loss_d = sum(huber(ds[k] - dt[k]) for k in ds) / b**2
    loss_a = sum(huber(as_[k] - at[k]) for k in as_) / b**3
    return w_d * loss_d + w_a * loss_a


def test_rkd_matches_independent_value():
    torch.manual_seed(9)
    s, t = torch.randn(5, 4), torch.randn(5, 6) * 3
    value = RKD(distance_weight=25, angle_weight=50)({"embedding": s}, {"embedding": t}, Step(None))
    assert value.item() == pytest.approx(np_rkd(np64(s), np64(t), 25, 50), rel=1e-4)
    # a large gap takes the linear branch of the Huber loss
    s2 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 10.0], [0.1, 0.1]])
    t2 = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    value = RKD(distance_weight=1, angle_weight=1)({"embedding": s2}, {"embedding": t2}, Step(None))
    assert value.item() == pytest.approx(np_rkd(np64(s2), np64(t2), 1, 1), rel=1e-4)


def test_rkd_invariant_to_scale_and_translation():
    torch.manual_seed(10)
    s, t = torch.randn(6, 8), torch.randn(6, 8)
    term = RKD()
    base_d = term.distance_loss(s, t).item()
    assert term.distance_loss(s * 7.5, t).item() == pytest.approx(base_d, rel=1e-4)
    assert term.distance_loss(s, t * 0.01).item() == pytest.approx(base_d, rel=1e-4)
    base = term({"embedding": s}, {"embedding": t}, Step(None)).item()
    assert term({"embedding": 3 * s + 2}, {"embedding": t}, Step(None)).item() == pytest.approx(base, rel=1e-4)
    assert term({"embedding": 0.5 * t - 1}, {"embedding": t}, Step(None)).item() == pytest.approx(0.0, abs=1e-5)


def test_rkd_small_and_degenerate_batches_are_finite():
    term = RKD()
    for b in (1, 2):
        value = term({"embedding": torch.randn(b, 4)}, {"embedding": torch.randn(b, 4)}, Step(None))
        assert torch.isfinite(value) and value.item() == pytest.approx(0.0, abs=1e-6)
    same = torch.ones(4, 3, requires_grad=True)  # every embedding equal: all distances 0
    value = term({"embedding": same}, {"embedding": torch.randn(4, 3)}, Step(None))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(same.grad).all()


# ---------------------------------------------------------------- sp


def np_sp(fs: np.ndarray, ft: np.ndarray) -> float:
    b = len(fs)
    fs, ft = fs.reshape(b, -1), ft.reshape(b, -1)

    def g(f):
        rows = []
        for i in range(b):
            row = np.array([f[i] @ f[j] for j in range(b)])
            rows.append(row / np.linalg.norm(row))
        return np.stack(rows)

    diff = g(ft) - g(fs)
    return float(sum(diff[i, j] ** 2 for i in range(b) for j in range(b)) / b**2)


def test_sp_matches_independent_value_across_shapes():
    torch.manual_seed(11)
    fs, ft = torch.randn(5, 4, 3, 3), torch.randn(5, 8, 2, 2)
    term = SP()
    value = term({"stage3": fs}, {"stage3": ft}, Step(None))
    assert term.s_tap == term.t_tap == "stage3"
    assert value.item() == pytest.approx(np_sp(np64(fs), np64(ft)), rel=1e-4)


def test_sp_invariant_to_global_scale_and_zero_when_equal():
    torch.manual_seed(12)
    fs, ft = torch.relu(torch.randn(4, 6, 2, 2)), torch.relu(torch.randn(4, 3, 4, 4))
    term = SP(student_tap="stage3", teacher_tap="stage3")
    base = term({"stage3": fs}, {"stage3": ft}, Step(None)).item()
    assert term({"stage3": 40.0 * fs}, {"stage3": ft}, Step(None)).item() == pytest.approx(base, rel=1e-4)
    assert term({"stage3": fs}, {"stage3": 0.02 * ft}, Step(None)).item() == pytest.approx(base, rel=1e-4)
    assert term({"stage3": fs}, {"stage3": fs * 3}, Step(None)).item() == pytest.approx(0.0, abs=1e-7)


def test_sp_last_stage_tap():
    assert last_stage({"stem": (1,), "stage1": (1,), "stage4": (1,), "stage4_preact": (1,), "stage3": (1,)}, "student", "sp") == "stage4"
    term = SP()
    assert term.student_taps() == term.teacher_taps() == {"stage1"}  # a feature term before setup too
    term.setup({"stage1": (4, 8, 8), "stage2": (8, 4, 4), "embedding": (8,)}, {"stage3": (16, 2, 2)})
    assert (term.s_tap, term.t_tap) == ("stage2", "stage3")
    assert term.student_taps() == {"stage2"} and term.teacher_taps() == {"stage3"}
    with pytest.raises(ConfigError, match="loss.sp"):
        SP().setup({"embedding": (8,)}, {"stage3": (16, 2, 2)})


# ---------------------------------------------------------------- pkt


def np_pkt(s: np.ndarray, t: np.ndarray, eps: float = 1e-7) -> float:
    b = len(s)

    def probs(f):
        k = np.zeros((b, b))
        for i in range(b):
            for j in range(b):
                k[i, j] = (f[i] @ f[j] / (np.linalg.norm(f[i]) * np.linalg.norm(f[j])) + 1) / 2
        return k / k.sum(axis=1, keepdims=True)

    p, q = probs(t), probs(s)
    return float(sum(p[i, j] * math.log((p[i, j] + eps) / (q[i, j] + eps)) for i in range(b) for j in range(b)) / b**2)


def test_pkt_matches_independent_value():
    torch.manual_seed(13)
    s, t = torch.randn(5, 6), torch.randn(5, 9)
    value = PKT()({"embedding": s}, {"embedding": t}, Step(None))
    assert value.item() == pytest.approx(np_pkt(np64(s), np64(t)), rel=1e-4)


def test_pkt_invariant_to_per_sample_scale_and_zero_when_equal():
    torch.manual_seed(14)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    term = PKT()
    base = term({"embedding": s}, {"embedding": t}, Step(None)).item()
    scaled = term({"embedding": s * (torch.rand(6, 1) * 10 + 0.1)}, {"embedding": t}, Step(None)).item()
    assert scaled == pytest.approx(base, rel=1e-4)
    assert term({"embedding": t * 2}, {"embedding": t}, Step(None)).item() == pytest.approx(0.0, abs=1e-7)
    s0 = s.clone()
    s0[0] = 0.0  # a dead (all-zero) embedding stays finite
    assert torch.isfinite(term({"embedding": s0}, {"embedding": t}, Step(None)))


# ---------------------------------------------------------------- cc


def np_cc(fs: np.ndarray, ft: np.ndarray, kernel) -> float:
    b = len(fs)
    fs = fs / np.linalg.norm(fs, axis=1, keepdims=True)
    ft = ft / np.linalg.norm(ft, axis=1, keepdims=True)
    total = 0.0
    for i in range(b):
        for j in range(b):
            total += (kernel(ft[i], ft[j]) - kernel(fs[i], fs[j])) ** 2
    return total / b**2


def test_cc_repdistiller_matches_independent_value():
    torch.manual_seed(15)
    s, t = torch.randn(5, 4), torch.randn(5, 6)
    term = CC(embed_dim=3)
    term.setup({"embedding": (4,)}, {"embedding": (6,)})
    assert (term.embed_s.in_features, term.embed_s.out_features) == (4, 3)
    assert (term.embed_t.in_features, term.embed_t.out_features) == (6, 3)
    value = term({"embedding": s}, {"embedding": t}, Step(None))
    e_s, e_t = np64(term.embed_s(s)), np64(term.embed_t(t))
    delta = np.abs(e_s - e_t)
    # each sample's |difference| times the next sample's, summed over the features; mean over the 4 pairs
    expected = sum(float(delta[i] @ delta[i + 1]) for i in range(4)) / 4
    assert value.item() == pytest.approx(expected, rel=1e-5)
    # one sample: no adjacent pair, zero but in the graph of both embeddings
    one = term({"embedding": s[:1]}, {"embedding": t[:1]}, Step(None))
    one.backward()
    assert one.item() == 0.0 and term.embed_t.weight.grad is not None


def test_cc_kernel_choice_and_weights():
    assert CC().weight == 0.02 and CC(kernel="taylor").weight == 10.0
    assert CC(weight=0.5, kernel="taylor").weight == 0.5
    term = CC(kernel="taylor")
    term.setup({"embedding": (4,)}, {"embedding": (6,)})
    assert term.embed_t is None and (term.embed_s.in_features, term.embed_s.out_features) == (4, 6)
    assert len(list(term.parameters())) == 2
    with pytest.raises(RuntimeError, match="setup"):
        CC()({"embedding": torch.randn(3, 4)}, {"embedding": torch.randn(3, 6)}, Step(None))


def test_cc_taylor_matches_independent_value():
    torch.manual_seed(15)
    s, t = torch.randn(5, 4), torch.randn(5, 6)
    term = CC(kernel="taylor", gamma=0.4, order=2)
    term.setup({"embedding": (4,)}, {"embedding": (6,)})
    value = term({"embedding": s}, {"embedding": t}, Step(None))
    g = 0.4

    def taylor2(x, y):
        c = float(x @ y)
        return math.exp(-2 * g) * (1 + 2 * g * c + (2 * g * c) ** 2 / 2)

    embedded = np64(term.embed_s(s))
    assert value.item() == pytest.approx(np_cc(embedded, np64(t), taylor2), rel=1e-4)
    # a long series is the exact Gaussian RBF kernel exp(-gamma ||x - y||^2) of the unit vectors
    term.order = 25
    exact = np_cc(embedded, np64(t), lambda x, y: math.exp(-g * float(np.sum((x - y) ** 2))))
    assert term({"embedding": s}, {"embedding": t}, Step(None)).item() == pytest.approx(exact, rel=1e-4)


@pytest.mark.parametrize("kernel", ["repdistiller", "taylor"])
def test_cc_zero_when_embedded_student_equals_teacher(kernel):
    term = CC(kernel=kernel, embed_dim=5)
    term.setup({"embedding": (5,)}, {"embedding": (5,)})
    with torch.no_grad():
        for layer in (term.embed_s, term.embed_t):
            if layer is not None:
                layer.weight.copy_(torch.eye(5))
                layer.bias.zero_()
    t = torch.randn(4, 5)
    assert term({"embedding": t}, {"embedding": t}, Step(None)).item() == pytest.approx(0.0, abs=1e-8)
    assert term.embed_s.in_features == 5 and term.embed_s.out_features == 5


# ---------------------------------------------------------------- every term: gradients, bf16, bad values


def make_terms() -> dict:
    """One of each term, set up for the tap shapes of ``make_taps``."""
    s_shapes = {"logits": (10,), "embedding": (16,), "stage2": (8, 4, 4), "stage3": (8, 2, 2)}
    t_shapes = {"logits": (10,), "embedding": (24,), "stage2": (12, 4, 4), "stage3": (12, 2, 2)}
    terms = {
        "kd": KD(),
        "kd_std": KD(standardize=True),
        "logit_mse": LogitMSE(),
        "dkd": DKD(),
        "dist": DIST(),
        "rkd": RKD(),
        "sp": SP(),
        "pkt": PKT(),
        "cc": CC(),
        "cc_taylor": CC(kernel="taylor"),
    }
    for term in terms.values():
        term.setup(s_shapes, t_shapes, SimpleNamespace(n_train=100, num_classes=10))
    return terms


def make_taps(dtype=torch.float32, b: int = 6):
    g = torch.Generator().manual_seed(16)
    s = {
        "logits": torch.randn(b, 10, generator=g) * 3,
        "embedding": torch.relu(torch.randn(b, 16, generator=g)),
        "stage2": torch.relu(torch.randn(b, 8, 4, 4, generator=g)),
        "stage3": torch.relu(torch.randn(b, 8, 2, 2, generator=g)),
    }
    t = {
        "logits": torch.randn(b, 10, generator=g) * 5,
        "embedding": torch.relu(torch.randn(b, 24, generator=g)),
        "stage2": torch.relu(torch.randn(b, 12, 4, 4, generator=g)),
        "stage3": torch.relu(torch.randn(b, 12, 2, 2, generator=g)),
    }
    for taps in (s, t):
        for k in taps:
            taps[k] = taps[k].to(dtype).requires_grad_(True)
    return s, t


TERM_NAMES = ["kd", "kd_std", "logit_mse", "dkd", "dist", "rkd", "sp", "pkt", "cc", "cc_taylor"]
STEP = Step(targets=torch.tensor([0, 1, 2, 3, 4, 5]), epoch=25.0, epochs=30)


@pytest.mark.parametrize("name", TERM_NAMES)
def test_gradients_reach_student_and_adapters_never_teacher(name):
    term = make_terms()[name]
    s, t = make_taps()
    value = term(s, t, STEP)
    assert value.dim() == 0 and torch.isfinite(value) and value.item() > 0
    value.backward()
    for tap in term.student_taps():  # sp: its "last" tap is named at setup
        assert s[tap].grad is not None and s[tap].grad.abs().sum() > 0, tap
        assert torch.isfinite(s[tap].grad).all()
    assert all(x.grad is None for x in t.values())
    for p in term.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    if name == "cc":
        assert len(list(term.parameters())) == 4  # the student's and the teacher's linear embeddings
    if name == "cc_taylor":
        assert len(list(term.parameters())) == 2  # the student -> teacher linear embedding


@pytest.mark.parametrize("name", TERM_NAMES)
def test_finite_fp32_values_under_bf16_autocast(name):
    term = make_terms()[name]
    s32, t32 = make_taps()
    s, t = make_taps(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = term(s, t, STEP)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert all(torch.isfinite(x.grad).all() for x in s.values() if x.grad is not None)
    # the math runs in fp32: the bf16 result is the fp32 result on bf16-rounded inputs
    s_r = {k: v.detach().bfloat16().float() for k, v in s32.items()}
    t_r = {k: v.detach().bfloat16().float() for k, v in t32.items()}
    assert value.item() == pytest.approx(term(s_r, t_r, STEP).item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize(
    "factory,message",
    [
        (lambda: KD(standardize="yes"), "loss.kd.standardize=yes"),
        (lambda: LogitMSE(weight=-1), "loss.logit_mse.weight=-1"),
        (lambda: DKD(temperature=0), "loss.dkd.temperature=0"),
        (lambda: DKD(alpha=-1), "loss.dkd.alpha=-1"),
        (lambda: DKD(beta=-0.5), "loss.dkd.beta=-0.5"),
        (lambda: DKD(warmup=-1), "loss.dkd.warmup=-1"),
        (lambda: DKD(weight=-1), "loss.dkd.weight=-1"),
        (lambda: DIST(temperature=-2), "loss.dist.temperature=-2"),
        (lambda: DIST(beta=-1), "loss.dist.beta=-1"),
        (lambda: DIST(gamma=-1), "loss.dist.gamma=-1"),
        (lambda: RKD(distance_weight=-25), "loss.rkd.distance_weight=-25"),
        (lambda: RKD(angle_weight=-50), "loss.rkd.angle_weight=-50"),
        (lambda: SP(weight=-3000), "loss.sp.weight=-3000"),
        (lambda: PKT(weight=-1), "loss.pkt.weight=-1"),
        (lambda: CC(gamma=0), "loss.cc.gamma=0"),
        (lambda: CC(order=0), "loss.cc.order=0"),
        (lambda: CC(order=1.5), "loss.cc.order=1.5"),
        (lambda: CC(kernel="rbf"), "loss.cc.kernel=rbf"),
        (lambda: CC(embed_dim=0), "loss.cc.embed_dim=0"),
        (lambda: CC(weight=-1), "loss.cc.weight=-1"),
    ],
)
def test_bad_hyperparameters_raise_config_error(factory, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")) as err:
        factory()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "name,cls,expected",
    [
        ("kd", KD, {"weight": 0.9, "temperature": 4.0, "standardize": False}),
        ("logit_mse", LogitMSE, {"weight": 1.0}),
        ("dkd", DKD, {"weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 20}),
        ("dist", DIST, {"weight": 2.0, "beta": 1.0, "gamma": 1.0, "temperature": 4.0}),
        ("rkd", RKD, {"weight": 1.0, "distance_weight": 25.0, "angle_weight": 50.0}),
        ("sp", SP, {"weight": 3000.0, "s_tap": "last", "t_tap": "last"}),
        ("pkt", PKT, {"weight": 30000.0}),
        ("cc", CC, {"weight": 0.02, "kernel": "repdistiller", "embed_dim": 128, "gamma": 0.4, "order": 2}),
    ],
)
def test_yaml_defaults(name, cls, expected):
    path = CONF / f"{name}.yaml"
    assert path.read_text().splitlines()[0] == f"# @package loss.{name}"
    term = instantiate(compose([f"loss={name}"]).loss[name])  # as Hydra composes it (defaults lists too)
    assert type(term) is cls and term.name == name
    for key, value in expected.items():
        assert getattr(term, key) == value, key


def test_yaml_cc_taylor_takes_its_own_default_weight():
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "cc.yaml"), {"kernel": "taylor"})
    assert instantiate(cfg).weight == 10.0


# ---------------------------------------------------------------- one real step through KnowledgeSet


def all_terms() -> KnowledgeSet:
    return KnowledgeSet(
        {"kd": KD(), "logit_mse": LogitMSE(), "dkd": DKD(), "dist": DIST(), "rkd": RKD(), "sp": SP(), "pkt": PKT(), "cc": CC()}
    )


@pytest.mark.parametrize(
    "teacher_name,student_name",
    [("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("vgg13", "mobilenetv2"), ("resnet32x4", "shufflenetv2")],
)
def test_one_training_step_on_zoo_pairs(teacher_name, student_name):
    torch.manual_seed(17)
    teacher = create_model(teacher_name, num_classes=10, in_chans=3, image_size=16).eval()
    student = create_model(student_name, num_classes=10, in_chans=3, image_size=16).train()
    teacher.requires_grad_(False)
    kset = all_terms()
    kset.setup(tap_shapes(student, 3, 16, preact=True), tap_shapes(teacher, 3, 16, preact=True),
               SimpleNamespace(n_train=64, num_classes=10))
    assert kset.terms["sp"].s_tap == f"stage{3 if student_name in ('resnet8x4', 'wrn_16_2', 'shufflenetv2') else 4}"
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    with torch.no_grad():
        t_out = teacher.forward_taps(x, preact=True)
    s_out = student.forward_taps(x, preact=True)
    total, logs = kset(s_out, t_out, Step(targets=y, index=torch.arange(8), epoch=25.0, epochs=30))
    total.backward()
    assert torch.isfinite(total)
    assert set(logs) == {"loss_ce", *(f"loss_{n}" for n in kset.terms)}
    assert all(torch.isfinite(v) for v in logs.values())
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    for layer in (kset.terms["cc"].embed_s, kset.terms["cc"].embed_t):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
