"""Feature and contrastive knowledge terms (FitNet, AT, NST, AB, FT, FSP, OFD, ReviewKD, VID, CRD).

Values are checked against second, plainly written implementations or closed forms on small
hand-made tensors, plus the properties the papers state; then gradients, bf16 autocast, bad
hyper-parameters, CRD's memory, the init stages in real runs, and one real training step of every
term on several teacher/student pairs.
"""

from __future__ import annotations

import csv
import logging
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kdrun.config import build_knowledge, compose
from kdrun.errors import ConfigError
from kdrun.knowledge import KnowledgeSet, Step
from kdrun.knowledge.contrastive import CRD, memory_scores, nce_loss
from kdrun.knowledge.features import (
    AB,
    AT,
    FSP,
    FT,
    NST,
    OFD,
    VID,
    FitNet,
    ReviewKD,
    ab_margin_loss,
    factor_transfer_loss,
    fsp_matrix,
    gaussian_negative_mean,
    hcl,
    nst_mmd,
    partial_l2,
)
from kdrun.models import create_model, tap_shapes
from kdrun.run import run
from kdrun.schemes.stages import InitStage

INFO = SimpleNamespace(n_train=32, num_classes=10, train_labels=torch.arange(32) % 10)

# a student with 2 stages and a teacher with 3, of other widths and sizes: the last two teacher
# stages pair with the student's two, and every pair needs pooling (8x8 vs 4x4, 4x4 vs 2x2)
S_SHAPES = {
    "stem": (3, 8, 8), "stage1": (4, 8, 8), "stage1_preact": (4, 8, 8), "stage2": (6, 4, 4),
    "stage2_preact": (6, 4, 4), "embedding": (6,), "logits": (10,),
}
T_SHAPES = {
    "stem": (3, 8, 8), "stage1": (5, 8, 8), "stage1_preact": (5, 8, 8), "stage2": (8, 4, 4),
    "stage2_preact": (8, 4, 4), "stage3": (12, 2, 2), "stage3_preact": (12, 2, 2), "embedding": (12,),
    "logits": (10,),
}


def make_taps(shapes, batch=4, requires_grad=False, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(batch, *v, generator=g).to(dtype).requires_grad_(requires_grad) for k, v in shapes.items()}


def step(batch=4, epoch=0.5, n_train=32):
    return Step(torch.zeros(batch, dtype=torch.long), torch.randperm(n_train)[:batch], epoch, 1)


TERMS = {
    "fitnet": lambda: FitNet(),
    "at": lambda: AT(),
    "nst": lambda: NST(),
    "ab": lambda: AB(),
    "ft": lambda: FT(),
    "fsp": lambda: FSP(),
    "ofd": lambda: OFD(),
    "reviewkd": lambda: ReviewKD(warmup_epochs=0),
    "vid": lambda: VID(),
    "crd": lambda: CRD(nce_k=8),
}


def built(name):
    torch.manual_seed(0)
    term = TERMS[name]()
    term.setup(S_SHAPES, T_SHAPES, INFO)
    return term


# ---------------------------------------------------------------------------- pairing
def test_stage_pairing_takes_the_last_stages_and_preact_where_asked():
    at, ab = built("at"), built("ab")
    assert at.pairs == [("stage1", "stage2"), ("stage2", "stage3")]
    assert ab.pairs == [("stage1_preact", "stage2_preact"), ("stage2_preact", "stage3_preact")]
    # before setup the taps are ones every staged model has, so KnowledgeSet's check passes
    assert AT().student_taps() == {"stage1"} and AB().teacher_taps() == {"stage1"}
    fsp = built("fsp")  # stage counts differ: no stem, last two stages of each
    assert fsp.s_layers == ["stage1", "stage2"] and fsp.t_layers == ["stage2", "stage3"]


def test_terms_on_preact_taps_name_themselves_for_models_without_them():
    timm_like = {"stem": (3, 8, 8), "stage1": (4, 8, 8), "stage2": (6, 4, 4), "embedding": (6,), "logits": (10,)}
    for term in (AB(), OFD()):
        with pytest.raises(ConfigError, match=rf"loss\.{term.name} reads pre-activation taps"):
            KnowledgeSet({term.name: term}).setup(timm_like, T_SHAPES, INFO)


# ---------------------------------------------------------------------------- FitNet
def test_fitnet_regressor_conv_follows_the_spatial_sizes():
    def regressor(s_hw, t_hw):
        term = FitNet()
        term.setup({"stage2": (3, s_hw, s_hw)}, {"stage2": (5, t_hw, t_hw)})
        out = term.regressor(torch.randn(2, 3, s_hw, s_hw))
        assert out.shape == (2, 5, t_hw, t_hw) and (out >= 0).all()  # BN + ReLU
        conv = term.regressor.conv
        return type(conv).__name__, conv.kernel_size, conv.stride, conv.bias is not None

    assert regressor(8, 8) == ("Conv2d", (1, 1), (1, 1), True)
    assert regressor(8, 4) == ("Conv2d", (3, 3), (2, 2), True)
    assert regressor(4, 8) == ("ConvTranspose2d", (4, 4), (2, 2), True)
    assert regressor(8, 2) == ("Conv2d", (7, 7), (1, 1), True)  # 1 + 8 - 2
    assert regressor(2, 8) == ("Conv2d", (1, 1), (1, 1), True)  # upsampled first (kdrun extension)
    term = built("fitnet")
    s, t = make_taps(S_SHAPES), make_taps(T_SHAPES, seed=1)
    want = F.mse_loss(term.regressor(s["stage2"]), t["stage2"])  # stage2 on both sides
    assert term(s, t, step()).item() == pytest.approx(want.item(), rel=1e-6)


# ---------------------------------------------------------------------------- AT
def plain_attention(f, p):
    """f: nested lists [C][H][W] of one sample -> normalised list of H*W values."""
    c, h, w = len(f), len(f[0]), len(f[0][0])
    q = [sum(abs(f[k][i][j]) ** p for k in range(c)) / c for i in range(h) for j in range(w)]
    norm = math.sqrt(sum(v * v for v in q))
    return [v / norm for v in q]


def test_at_matches_a_plain_implementation_and_is_zero_and_scale_invariant():
    torch.manual_seed(1)
    term = AT(p=2.0)
    term.setup({"stage1": (2, 2, 2)}, {"stage1": (3, 2, 2)})
    fs, ft = torch.randn(3, 2, 2, 2), torch.randn(3, 3, 2, 2)
    value = term({"stage1": fs}, {"stage1": ft}, step(3))
    expected = 0.0
    for b in range(3):
        qs, qt = plain_attention(fs[b].tolist(), 2), plain_attention(ft[b].tolist(), 2)
        expected += sum((a - c) ** 2 for a, c in zip(qs, qt)) / 4
    assert value.item() == pytest.approx(expected / 3, rel=1e-5)
    # zero for identical maps; invariant to a positive scale of either side (the normalisation)
    assert term({"stage1": ft}, {"stage1": ft}, step(3)).item() == pytest.approx(0.0, abs=1e-10)
    scaled = term({"stage1": 7.5 * fs}, {"stage1": 0.2 * ft}, step(3))
    assert scaled.item() == pytest.approx(value.item(), rel=1e-5)
    # p = 1 uses |f|
    term1 = AT(p=1.0)
    term1.setup({"stage1": (2, 2, 2)}, {"stage1": (3, 2, 2)})
    qs, qt = plain_attention(fs[0].tolist(), 1), plain_attention(ft[0].tolist(), 1)
    v1 = term1({"stage1": fs[:1]}, {"stage1": ft[:1]}, step(1))
    assert v1.item() == pytest.approx(sum((a - c) ** 2 for a, c in zip(qs, qt)) / 4, rel=1e-5)


def test_at_pools_the_larger_map_and_sums_over_pairs():
    term = built("at")
    s, t = make_taps(S_SHAPES), make_taps(T_SHAPES, seed=1)
    expected = 0.0
    for sk, tk in (("stage1", "stage2"), ("stage2", "stage3")):
        a = F.normalize(F.adaptive_avg_pool2d(s[sk], t[tk].shape[-2:]).pow(2).mean(1).flatten(1), dim=1)
        b = F.normalize(t[tk].pow(2).mean(1).flatten(1), dim=1)
        expected += (a - b).pow(2).mean().item()
    assert term(s, t, step()).item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------- NST
def test_nst_matches_a_plain_mmd_and_is_zero_for_identical_features():
    torch.manual_seed(2)
    fs, ft = torch.randn(1, 2, 2, 2), torch.randn(1, 3, 2, 2)

    def channels(f):
        out = []
        for c in f[0].reshape(f.shape[1], -1).tolist():
            n = math.sqrt(sum(v * v for v in c))
            out.append([v / n for v in c])
        return out

    def k(x, y):
        return sum(a * b for a, b in zip(x, y)) ** 2

    a, b = channels(fs), channels(ft)
    mmd = (sum(k(x, y) for x in b for y in b) / 9 + sum(k(x, y) for x in a for y in a) / 4
           - 2 * sum(k(x, y) for x in a for y in b) / 6)
    assert nst_mmd(fs, ft).item() == pytest.approx(mmd, rel=1e-5)
    term = NST()
    term.setup({"stage1": (3, 2, 2)}, {"stage1": (3, 2, 2)})
    assert term({"stage1": ft}, {"stage1": ft}, step(1)).item() == pytest.approx(0.0, abs=1e-6)
    # also zero for a positively scaled copy (each channel is normalised)
    assert term({"stage1": 3 * ft}, {"stage1": ft}, step(1)).item() == pytest.approx(0.0, abs=1e-6)
    assert term({"stage1": fs.repeat(1, 2, 1, 1)[:, :3]}, {"stage1": ft}, step(1)).item() > 0


# ---------------------------------------------------------------------------- AB
def test_ab_margin_loss_closed_form():
    t = torch.tensor([[1.0, -1.0, 1.0, -1.0, 0.0]])
    r = torch.tensor([[0.5, 0.5, 2.0, -2.0, -0.25]])
    # on, r=.5: (1-.5)^2; off, r=.5: (1+.5)^2; on, r=2: 0; off, r=-2: 0; t=0 is off: (1-.25)^2
    assert ab_margin_loss(r, t, 1.0).item() == pytest.approx(0.25 + 2.25 + 0.5625)
    assert ab_margin_loss(r.repeat(2, 1), t.repeat(2, 1), 1.0).item() == pytest.approx(0.25 + 2.25 + 0.5625)


def test_ab_term_applies_connectors_layer_weights_and_scale():
    term = built("ab")
    # connectors: conv + BN without ReLU (stride-2 3x3 here: the student maps are twice as large)
    assert all(not c.relu and c.conv.stride == (2, 2) for c in term.connectors)
    same = AB()
    same.setup(S_SHAPES, S_SHAPES)  # identical shapes: identity connectors
    assert all(isinstance(c, torch.nn.Identity) for c in same.connectors)
    s, t = make_taps(S_SHAPES), make_taps(T_SHAPES, seed=1)
    expected = 0.0
    for j, ((sk, tk), conn) in enumerate(zip(term.pairs, term.connectors)):
        r = F.adaptive_avg_pool2d(conn(s[sk]), t[tk].shape[-2:])
        on = (t[tk] > 0).float()
        per = (on * (1 - r).clamp_min(0) ** 2 + (1 - on) * (1 + r).clamp_min(0) ** 2).sum() / 4
        expected += per.item() * (0.5 if j == 0 else 1.0)
    assert term(s, t, step()).item() == pytest.approx(3e-3 * expected, rel=1e-5)
    assert term.init_epochs == 30 and term.weight == 0.0


# ---------------------------------------------------------------------------- FT
def test_factor_transfer_loss_closed_form_and_normalisation():
    fs = torch.tensor([3.0, 4.0]).view(1, 1, 1, 2)
    ft = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    # whole factor (the paper's form):
    # [0.6, 0.8] - [1, 0] -> |.| = [0.4, 0.8], mean 0.6 (p=1); squares 0.16, 0.64 -> 0.4 (p=2)
    assert factor_transfer_loss(fs, ft, 1, factor="whole").item() == pytest.approx(0.6)
    assert factor_transfer_loss(fs, ft, 2, factor="whole").item() == pytest.approx(0.4)
    f = torch.randn(2, 3, 2, 2)
    assert factor_transfer_loss(2.5 * f, f, factor="whole").item() == pytest.approx(0.0, abs=1e-7)
    # default: channel mean of squares, then normalised. Student channels [1, 0] and [1, 2] ->
    # [1, 2] / sqrt(5); teacher's one channel [2, 0] -> [4, 0] -> [1, 0]
    fs2 = torch.tensor([[1.0, 0.0], [1.0, 2.0]]).view(1, 2, 1, 2)
    d = [1 - 1 / math.sqrt(5), 2 / math.sqrt(5)]
    assert factor_transfer_loss(fs2, ft, 1).item() == pytest.approx(sum(d) / 2, rel=1e-6)
    assert factor_transfer_loss(fs2, ft, 2).item() == pytest.approx((d[0] ** 2 + d[1] ** 2) / 2, rel=1e-6)
    # blind to a scale and a sign of either factor, and to channels being permuted
    assert factor_transfer_loss(-2.5 * f, f).item() == pytest.approx(0.0, abs=1e-7)
    assert factor_transfer_loss(f.flip(1), f).item() == pytest.approx(0.0, abs=1e-7)
    assert factor_transfer_loss(fs, ft, 1).item() > 0


def test_ft_init_stage_trains_only_the_paraphraser_on_reconstruction():
    term = built("ft")
    assert (term.s_tap, term.t_tap) == ("stage2", "stage3")  # the last stage of each
    assert term.translator.encoder[3].out_channels == 6 and term.paraphraser.decoder[0].in_channels == 6
    student = create_model("resnet8", num_classes=10, in_chans=3, image_size=16)
    assert {id(p) for p in term.init_parameters(student)} == {id(p) for p in term.paraphraser.parameters()}
    s, t = make_taps(S_SHAPES), make_taps(T_SHAPES, seed=1)
    rec = term.paraphraser.decoder(term.paraphraser.encoder(t["stage3"]))
    assert term.init_loss(s, t, step()).item() == pytest.approx(F.mse_loss(rec, t["stage3"]).item(), rel=1e-6)
    # main stage: the frozen paraphraser (eval mode) gets no gradient, the translator does
    term.train()
    term(make_taps(S_SHAPES, requires_grad=True), t, step()).backward()
    assert not term.paraphraser.training
    assert all(p.grad is None for p in term.paraphraser.parameters())
    assert all(p.grad is not None for p in term.translator.parameters())
    assert term.init_lr == 0.01
    # the default paraphraser has no BN (RepDistiller's); with paraphraser_bn its BN statistics
    # stay those of the init stage in the main stage
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in term.paraphraser.modules())
    with_bn = FT(paraphraser_bn=True)
    with_bn.setup(S_SHAPES, T_SHAPES, INFO)
    stats = with_bn.paraphraser.encoder[1].running_mean.clone()
    with_bn.train()
    with_bn(make_taps(S_SHAPES), t, step())
    assert not with_bn.paraphraser.training and torch.equal(with_bn.paraphraser.encoder[1].running_mean, stats)


def test_ft_warns_that_the_mean_factor_of_1x1_maps_is_constant(caplog):
    shapes = {"stage1": (4, 1, 1)}
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        term = FT()
        term.setup(shapes, shapes)
    assert "loss.ft.factor=mean" in caplog.text
    s, t = make_taps(shapes), make_taps(shapes, seed=1)
    assert term(s, t, step()).item() == 0.0
    caplog.clear()
    whole = FT(factor="whole")
    whole.setup(shapes, shapes)
    assert not caplog.text and whole(s, t, step()).item() > 0


# ---------------------------------------------------------------------------- FSP
def test_fsp_matrix_matches_explicit_sums():
    torch.manual_seed(3)
    a, b = torch.randn(2, 2, 2, 2), torch.randn(2, 3, 2, 2)
    g = fsp_matrix(a, b)
    for n in range(2):
        for i in range(2):
            for j in range(3):
                want = sum(a[n, i, x, y] * b[n, j, x, y] for x in range(2) for y in range(2)) / 4
                assert g[n, i, j].item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    # a larger map is pooled to the smaller one's size first
    big = torch.randn(1, 2, 4, 4)
    assert torch.allclose(fsp_matrix(big, b[:1]), fsp_matrix(F.avg_pool2d(big, 2), b[:1]), atol=1e-6)


def test_fsp_term_value_and_zero_for_identical_features():
    shapes = {"stem": (2, 4, 4), "stage1": (3, 4, 4), "stage2": (4, 2, 2)}
    term = FSP()
    term.setup(shapes, shapes)
    assert term.s_layers == ["stem", "stage1", "stage2"]
    s, t = make_taps(shapes, 2), make_taps(shapes, 2, seed=5)
    assert term(t, t, step(2)).item() == pytest.approx(0.0, abs=1e-8)
    expected = sum(
        (fsp_matrix(s[a], s[b]) - fsp_matrix(t[a], t[b])).pow(2).mean().item()
        for a, b in (("stem", "stage1"), ("stage1", "stage2"))
    )
    assert term(s, t, step(2)).item() == pytest.approx(expected, rel=1e-5)
    # channel counts that differ get a 1x1 conv on the student side (identity where they agree)
    other = built("fsp")
    assert [type(c).__name__ for c in other.connectors] == ["Conv2d", "Conv2d"]


# ---------------------------------------------------------------------------- OFD
def normal_cdf(x):
    return 0.5 * math.erfc(-x / math.sqrt(2))


def test_ofd_margin_is_the_expected_negative_response():
    mean = torch.tensor([0.0, 3.0, 4.0, -1.0])
    std = torch.tensor([1.0, 1.0, 1.0, 2.0])
    got = gaussian_negative_mean(mean, std)
    pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    assert got[0].item() == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-5)
    assert got[1].item() == pytest.approx(3 - pdf(3) / normal_cdf(-3), rel=1e-4)  # Phi(-3) > 1e-3
    assert got[2].item() == pytest.approx(-3.0)  # Phi(-4) < 1e-3: -3 std
    assert got[3].item() == pytest.approx(-1 - 2 * pdf(-0.5) / normal_cdf(0.5), rel=1e-5)


def test_ofd_partial_l2_matches_an_elementwise_rule():
    torch.manual_seed(4)
    s, t = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    margin = torch.tensor([-0.5, -0.1, -1.0]).view(1, 3, 1, 1)
    expected = 0.0
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in s.shape)):
        b, c, i, j = idx.tolist()
        target = max(t[b, c, i, j].item(), margin[0, c, 0, 0].item())
        sv = s[b, c, i, j].item()
        if not (sv <= target <= 0):
            expected += (sv - target) ** 2
    assert partial_l2(s, t, margin).item() == pytest.approx(expected / 2, rel=1e-5)
    # nothing to learn where the student is below a non-positive target
    assert partial_l2(torch.full((1, 3, 1, 1), -2.0), torch.full((1, 3, 1, 1), -0.3), margin).item() == 0.0


def test_ofd_term_accumulates_teacher_statistics_and_weights_deeper_pairs_more():
    term = built("ofd")
    s, t = make_taps(S_SHAPES), make_taps(T_SHAPES, seed=1)
    value = term(s, t, step())
    target = t["stage2_preact"]
    assert torch.allclose(term.t_mean0.float(), target.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(term.t_var0.float(), target.var(dim=(0, 2, 3), unbiased=False), atol=1e-6)
    assert term.seen.item() == 4
    expected = 0.0
    for j, ((sk, tk), conn) in enumerate(zip(term.pairs, term.connectors)):
        r = F.adaptive_avg_pool2d(conn(s[sk]), t[tk].shape[-2:])
        expected += partial_l2(r, t[tk], term.margin(j)).item() / (2.0 if j == 0 else 1.0)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    # a second batch: the statistics are the mean over all samples seen
    t2 = make_taps(T_SHAPES, seed=9)
    term(s, t2, step())
    both = torch.cat([target, t2["stage2_preact"]])
    assert torch.allclose(term.t_mean0.float(), both.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(term.t_var0.float(), both.var(dim=(0, 2, 3), unbiased=False), atol=1e-5)


def test_ofd_statistics_keep_a_small_spread_around_a_large_mean():
    term = built("ofd")
    s = make_taps(S_SHAPES)
    feats = [make_taps(T_SHAPES, seed=k) for k in (1, 2, 3)]
    for t in feats:
        t["stage2_preact"] = 30.0 + 0.01 * t["stage2_preact"]  # std 0.01 around 30: E[x^2] - mean^2 fails
        term(s, t, step())
    both = torch.cat([t["stage2_preact"].double() for t in feats])
    assert torch.allclose(term.t_var0, both.var(dim=(0, 2, 3), unbiased=False), rtol=1e-3)
    assert torch.allclose(term.margin(0).flatten().double(),
                          gaussian_negative_mean(both.mean(dim=(0, 2, 3)), both.std(dim=(0, 2, 3), unbiased=False)),
                          rtol=1e-3)


# ---------------------------------------------------------------------------- ReviewKD
def test_hcl_matches_a_plain_pyramid():
    torch.manual_seed(5)
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)

    def mse(x, y):
        return ((x - y) ** 2).mean()

    pool2 = lambda x: x.reshape(2, 3, 2, 2, 2, 2).mean(dim=(3, 5))
    pool1 = lambda x: x.mean(dim=(2, 3), keepdim=True)
    # 4x4 maps: the 4x4 level is skipped, 2x2 weighs 1/2, 1x1 1/4; normalised by 1.75
    expected = (mse(a, b) + 0.5 * mse(pool2(a), pool2(b)) + 0.25 * mse(pool1(a), pool1(b))) / 1.75
    assert hcl(a, b).item() == pytest.approx(expected.item(), rel=1e-5)
    assert hcl(b, b).item() == 0.0
    one = torch.randn(2, 3, 1, 1)
    assert hcl(one, b[:, :, :1, :1]).item() == pytest.approx(mse(one, b[:, :, :1, :1]).item(), rel=1e-6)


def test_reviewkd_levels_and_linear_warmup():
    torch.manual_seed(0)
    term = ReviewKD(warmup_epochs=20)
    term.setup(S_SHAPES, T_SHAPES, INFO)
    assert term.pairs == [("stage1", "stage2_preact"), ("stage2", "stage3_preact")]
    assert len(term.abfs) == 3 and term.abfs[-1].attention is None  # the embedding level fuses nothing
    assert [abf.out[0].out_channels for abf in term.abfs] == [8, 12, 12]
    assert term.abfs[0].reduce[0].out_channels == 6  # min(512, student embedding width)
    term.eval()  # fixed BN statistics: the same inputs give the same unscaled value
    s, t = make_taps(S_SHAPES), make_taps(T_SHAPES, seed=1)
    full = term(s, t, Step(None, None, 25.0, 240))
    assert term(s, t, Step(None, None, 5.0, 240)).item() == pytest.approx(0.25 * full.item(), rel=1e-5)
    assert term(s, t, Step(None, None, 0.0, 240)).item() == 0.0
    # one step per epoch, from the 0-based epoch number (the authors' train.py): constant within an epoch
    assert term(s, t, Step(None, None, 5.9, 240)).item() == pytest.approx(0.25 * full.item(), rel=1e-5)
    assert term(s, t, Step(None, None, 0.9, 240)).item() == 0.0
    assert full.item() > 0


# ---------------------------------------------------------------------------- VID
def test_vid_closed_form_with_a_zero_regressor():
    term = VID(init_pred_var=5.0, eps=1e-5)
    term.setup({"stage1": (3, 2, 2)}, {"stage1": (4, 2, 2)})
    for p in term.regressors.parameters():
        torch.nn.init.zeros_(p)
    t = torch.randn(2, 4, 2, 2)
    value = term({"stage1": torch.randn(2, 3, 2, 2)}, {"stage1": t}, step(2))
    # mu = 0 and sigma^2 = init_pred_var: 0.5 * mean(t^2 / 5 + log 5)
    assert value.item() == pytest.approx(0.5 * ((t ** 2).mean().item() / 5.0 + math.log(5.0)), rel=1e-5)


# ---------------------------------------------------------------------------- CRD
def test_nce_loss_matches_the_papers_probability_form():
    torch.manual_seed(6)
    scores = torch.randn(3, 6)
    n_data, log_z = 50, 1.3
    p = torch.exp(scores) / math.exp(log_z)
    c = 5 / n_data
    log_d1 = torch.log(p[:, 0] / (p[:, 0] + c))
    log_d0 = torch.log(c / (p[:, 1:] + c))
    expected = -(log_d1.sum() + log_d0.sum()) / 3
    assert nce_loss(scores, log_z, n_data).item() == pytest.approx(expected.item(), rel=1e-5)


def test_memory_scores_both_ways_agree_with_explicit_dots():
    torch.manual_seed(7)
    memory, v = torch.randn(10, 4), torch.randn(3, 4)
    rows = torch.randint(0, 10, (3, 5))
    explicit = torch.tensor([[float(memory[rows[b, k]] @ v[b]) for k in range(5)] for b in range(3)])
    assert torch.allclose(memory_scores(memory, rows, v), explicit, atol=1e-5)  # n <= (K+1) d: matmul
    wide = torch.randn(40, 4)
    explicit = torch.tensor([[float(wide[rows[b, k]] @ v[b]) for k in range(5)] for b in range(3)])
    assert torch.allclose(memory_scores(wide, rows, v), explicit, atol=1e-5)  # gather


def test_crd_negatives_default_to_the_other_classes_uniformly(loss_cfg):
    assert CRD().negatives == loss_cfg.crd.negatives == "other_class"
    labels = torch.arange(5000) % 7  # classes of 715 and 714 samples
    term = CRD(nce_k=4000)
    term.setup({"embedding": (6,)}, {"embedding": (12,)}, SimpleNamespace(n_train=5000, train_labels=labels))
    index = torch.tensor([0, 17, 4999, 3])
    neg = term.sample_negatives(index)
    assert neg.shape == (4, 4000) and neg.min() >= 0 and neg.max() < 5000
    assert not (labels[neg] == labels[index][:, None]).any()  # never of the sample's class (nor itself)
    # unsorted labels: every row of another class about equally often, none of the own class
    labels = torch.tensor([2, 0, 1, 2, 0, 2, 1, 2, 3, 2, 0, 3])
    small = CRD(nce_k=70)
    small.setup({"embedding": (6,)}, {"embedding": (12,)}, SimpleNamespace(n_train=12, train_labels=labels))
    index = torch.tensor([3, 8]).repeat(200)  # a class-2 and a class-3 sample
    neg = small.sample_negatives(index)
    for row, own in ((3, 2), (8, 3)):
        counts = torch.bincount(neg[index == row].flatten(), minlength=12)
        other = labels != own
        assert counts[~other].sum() == 0  # 200 x 70 draws over the other-class rows
        assert ((counts[other] - 14000 / other.sum()).abs() < 300).all()


def test_crd_uniform_negatives_are_any_other_row_and_other_class_needs_labels():
    term = CRD(nce_k=4000, negatives="uniform")
    term.setup({"embedding": (6,)}, {"embedding": (12,)}, SimpleNamespace(n_train=5000))  # no labels needed
    index = torch.tensor([0, 17, 4999])
    neg = term.sample_negatives(index)
    assert neg.shape == (3, 4000) and neg.min() >= 0 and neg.max() < 5000
    assert not (neg == index[:, None]).any()
    small = CRD(nce_k=5, negatives="uniform")
    small.setup({"embedding": (6,)}, {"embedding": (12,)}, SimpleNamespace(n_train=6))
    counts = torch.bincount(small.sample_negatives(torch.full((400,), 2)).flatten(), minlength=6)
    assert counts[2] == 0  # never the positive; every other row about equally often (400 x 5 draws)
    assert ((counts[[0, 1, 3, 4, 5]] - 400).abs() < 100).all()
    with pytest.raises(ConfigError, match=r"^loss\.crd\.negatives=other_class .*train_labels"):
        CRD().setup({"embedding": (6,)}, {"embedding": (12,)}, SimpleNamespace(n_train=6))
    with pytest.raises(ConfigError, match="two classes"):
        CRD().setup({"embedding": (6,)}, {"embedding": (12,)},
                    SimpleNamespace(n_train=6, train_labels=torch.zeros(6, dtype=torch.long)))
    with pytest.raises(ConfigError, match="one label"):
        CRD().setup({"embedding": (6,)}, {"embedding": (12,)}, SimpleNamespace(n_train=6, train_labels=torch.arange(5)))


def test_crd_memory_starts_uniform_and_updates_only_the_batch_rows_with_momentum():
    torch.manual_seed(8)
    term = built("crd")
    stdv = 1 / math.sqrt(128 / 3)  # RepDistiller: uniform in [-stdv, stdv], rows not normalised
    for memory in (term.memory_s, term.memory_t):
        assert memory.shape == (32, 128) and memory.abs().max() <= stdv and memory.abs().max() > 0.95 * stdv
        assert memory.pow(2).sum(dim=1).mean().item() == pytest.approx(1.0, abs=0.1)  # E|m|^2 = 1
        assert not torch.allclose(memory.norm(dim=1), torch.ones(32), atol=1e-3)
    before_s, before_t = term.memory_s.clone(), term.memory_t.clone()
    s, t = make_taps(S_SHAPES), make_taps(T_SHAPES, seed=1)
    index = torch.tensor([3, 9, 20, 31])
    term(s, t, Step(torch.zeros(4, dtype=torch.long), index, 0.0, 1))
    v_s, v_t = term.embed_s(s["embedding"]).detach(), term.embed_t(t["embedding"]).detach()
    others = torch.ones(32, dtype=torch.bool)
    others[index] = False
    for after, before, v in ((term.memory_s, before_s, v_s), (term.memory_t, before_t, v_t)):
        assert torch.equal(after[others], before[others])
        want = 0.5 * before[index] + 0.5 * v
        assert torch.allclose(after[index], want / want.norm(dim=1, keepdim=True), atol=1e-6)
        assert torch.allclose(after[index].norm(dim=1), torch.ones(4), atol=1e-5)
    # in eval mode nothing is written
    term.eval()
    frozen = term.memory_s.clone()
    term(s, t, Step(None, index, 0.0, 1))
    assert torch.equal(term.memory_s, frozen)


def test_crd_normalisation_constant_is_set_once_and_value_matches_hand_computation():
    torch.manual_seed(9)
    term = built("crd")
    s, t = make_taps(S_SHAPES), make_taps(T_SHAPES, seed=1)
    index = torch.tensor([0, 1, 2, 3])
    memory_s, memory_t = term.memory_s.clone(), term.memory_t.clone()
    torch.manual_seed(10)
    value = term(s, t, Step(None, index, 0.0, 1))
    torch.manual_seed(10)
    neg = term.sample_negatives(index)  # the same draw as inside the forward
    rows = torch.cat([index[:, None], neg], 1)
    v_s, v_t = term.embed_s(s["embedding"]), term.embed_t(t["embedding"])
    sc_s = torch.einsum("bkd,bd->bk", memory_t[rows], v_s) / 0.07
    sc_t = torch.einsum("bkd,bd->bk", memory_s[rows], v_t) / 0.07
    z_s, z_t = torch.exp(sc_s).mean() * 32, torch.exp(sc_t).mean() * 32  # Z = N * mean exp(score)
    assert term.log_z.tolist() == pytest.approx([math.log(z_s.item()), math.log(z_t.item())], rel=1e-5)
    expected = nce_loss(sc_s, math.log(z_s.item()), 32) + nce_loss(sc_t, math.log(z_t.item()), 32)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    fixed = term.log_z.clone()
    term(s, t, Step(None, index, 0.0, 1))
    assert torch.equal(term.log_z, fixed)


def test_crd_keeps_nce_k_on_small_datasets():
    # as RepDistiller's loader, which draws with replacement when nce_k exceeds the other samples
    term = CRD()
    term.setup({"embedding": (6,)}, {"embedding": (12,)},
               SimpleNamespace(n_train=100, train_labels=torch.arange(100) % 10))
    assert term.k == 16384 and term.sample_negatives(torch.tensor([4, 7])).shape == (2, 16384)
    with pytest.raises(ConfigError, match="n_train"):
        CRD().setup({"embedding": (6,)}, {"embedding": (12,)}, SimpleNamespace(n_train=1))


# ---------------------------------------------------------------------------- every term
@pytest.mark.parametrize("name", sorted(TERMS))
def test_gradients_reach_student_and_adapters_never_teacher(name):
    term = built(name)
    s = make_taps(S_SHAPES, requires_grad=True)
    t = make_taps(T_SHAPES, requires_grad=True, seed=1)
    value = term(s, t, step())
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    read = term.student_taps()
    assert any(s[k].grad is not None and s[k].grad.abs().sum() > 0 for k in read)
    assert all(s[k].grad is None or torch.isfinite(s[k].grad).all() for k in read)
    assert all(v.grad is None for v in t.values())
    params = [p for p in term.parameters() if p.requires_grad]
    if params:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("name", sorted(TERMS))
def test_finite_under_bf16_autocast(name):
    term = built(name)
    s = make_taps(S_SHAPES, dtype=torch.bfloat16, requires_grad=True)
    t = make_taps(T_SHAPES, dtype=torch.bfloat16, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = term(s, t, step())
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert all(torch.isfinite(v.grad.float()).all() for v in s.values() if v.grad is not None)


@pytest.mark.parametrize("cls, kwargs", [
    (FitNet, {"weight": -1}),
    (AT, {"p": 0}), (AT, {"weight": -5}),
    (NST, {"degree": 0}), (NST, {"degree": 1.5}), (NST, {"constant": -1}),
    (AB, {"margin": 0}), (AB, {"init_epochs": -1}), (AB, {"init_epochs": 1.5}),
    (FT, {"rate": 0}), (FT, {"p": 3}), (FT, {"init_lr": 0}), (FT, {"init_epochs": -2}), (FT, {"factor": "sum"}),
    (FSP, {"init_epochs": -1}), (FSP, {"weight": -0.5}),
    (OFD, {"weight": -1e-3}),
    (ReviewKD, {"warmup_epochs": -1}), (ReviewKD, {"max_mid_channels": 0}),
    (VID, {"eps": 0}), (VID, {"init_pred_var": 0}),
    (CRD, {"feat_dim": 0}), (CRD, {"nce_k": 0}), (CRD, {"temperature": 0}), (CRD, {"momentum": 1.0}),
    (CRD, {"momentum": -0.1}), (CRD, {"negatives": "random"}),
])
def test_bad_hyperparameters_raise_config_error(cls, kwargs):
    key = next(iter(kwargs))
    with pytest.raises(ConfigError, match=rf"^loss\.{cls.name}\.{key}="):
        cls(**kwargs)


# ---------------------------------------------------------------------------- configs
ALL = "fitnet+at+nst+ab+ft+fsp+ofd+reviewkd+vid+crd"


@pytest.fixture(scope="module")
def loss_cfg():
    return compose([f"loss={ALL}"]).loss


def test_yaml_files_carry_the_published_defaults(loss_cfg):
    assert list(loss_cfg) == ALL.split("+")
    weights = {name: float(node.weight) for name, node in loss_cfg.items()}
    assert weights == {"fitnet": 100.0, "at": 1000.0, "nst": 50.0, "ab": 0.0, "ft": 200.0, "fsp": 0.0,
                       "ofd": 1e-3, "reviewkd": 1.0, "vid": 1.0, "crd": 0.8}
    assert loss_cfg.ab.init_epochs == loss_cfg.ft.init_epochs == loss_cfg.fsp.init_epochs == 30
    crd = loss_cfg.crd
    assert (crd.feat_dim, crd.nce_k, crd.temperature, crd.momentum) == (128, 16384, 0.07, 0.5)
    assert (loss_cfg.ft.rate, loss_cfg.reviewkd.warmup_epochs, loss_cfg.vid.init_pred_var) == (0.5, 20.0, 5.0)
    # ft: RepDistiller's channel-mean factor and BN-free paraphraser, init lr 0.01
    assert (loss_cfg.ft.factor, loss_cfg.ft.paraphraser_bn, loss_cfg.ft.init_lr) == ("mean", False, 0.01)
    knowledge = build_knowledge(loss_cfg)
    assert [t.init_epochs for t in knowledge.terms.values()] == [0, 0, 0, 30, 30, 30, 0, 0, 0, 0]


# ---------------------------------------------------------------------------- init stages, real runs
@pytest.mark.parametrize("name", ["ab", "ft", "fsp"])
def test_init_stage_runs_before_the_main_stage(compose_tiny, tmp_path, name):
    cfg, ov = compose_tiny(f"loss={name}", f"loss.{name}.init_epochs=1", "dataset.n_train=128")
    summary = run(cfg, run_dir=tmp_path / "run", overrides=ov)
    assert summary["status"] == "ok"
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["stage"] != "teacher"]
    assert [r["stage"] for r in rows] == [f"init_{name}", "student"]
    assert math.isfinite(float(rows[0][f"loss_{name}_init"])) and float(rows[0][f"loss_{name}_init"]) > 0
    assert math.isfinite(float(rows[1][f"loss_{name}"]))


def test_init_stage_trains_the_terms_parameters_and_the_student_features():
    torch.manual_seed(0)
    teacher = create_model("resnet8", num_classes=10, in_chans=3, image_size=16)
    student = create_model("resnet8", num_classes=10, in_chans=3, image_size=16)
    shapes = tap_shapes(student, 3, 16, preact=True)
    term = AB()
    term.setup(shapes, tap_shapes(teacher, 3, 16, preact=True), INFO)
    stage = InitStage(student, teacher, term)
    trained = {id(p) for p in stage.parameters_to_train()}
    assert {id(p) for p in term.connectors.parameters()} <= trained
    assert {id(p) for p in student.stages.parameters()} <= trained
    assert not {id(p) for p in student.classifier.parameters()} & trained
    loss, _, logs = stage.training_step(torch.randn(4, 3, 16, 16), step())
    assert torch.isfinite(loss) and "loss_ab_init" in logs


# ---------------------------------------------------------------------------- real models
PAIRS = [("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("vgg13", "mobilenetv2"),
         ("resnet32x4", "shufflenetv2")]
_MODELS: dict = {}


def models(name):
    if name not in _MODELS:
        torch.manual_seed(0)
        model = create_model(name, num_classes=10, in_chans=3, image_size=16)
        _MODELS[name] = (model, tap_shapes(model, 3, 16, preact=True))
    return _MODELS[name]


@pytest.mark.parametrize("pair", PAIRS, ids=["-".join(p) for p in PAIRS])
@pytest.mark.parametrize("name", ALL.split("+"))
def test_one_training_step_on_real_pairs(loss_cfg, pair, name):
    (teacher, t_shapes), (student, s_shapes) = models(pair[0]), models(pair[1])
    knowledge = build_knowledge({name: loss_cfg[name]})
    term = knowledge.terms[name]
    term.weight = term.weight or 1.0  # ab/fsp default to 0 in the main stage: exercise the term anyway
    if name == "reviewkd":
        term.warmup_epochs = 0.0  # its warm-up factor is 0 throughout the first epoch
    knowledge.setup(s_shapes, t_shapes, SimpleNamespace(n_train=64, num_classes=10, train_labels=torch.arange(64) % 10))
    teacher.eval()
    student.train()
    student.zero_grad(set_to_none=True)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    with torch.no_grad():
        t_out = teacher.forward_taps(x, preact=True)
    s_out = student.forward_taps(x, preact=True)
    loss, logs = knowledge(s_out, t_out, Step(y, torch.randperm(64)[:8], 0.5, 1))
    # ft's default (channel-mean) factor of 1x1 maps is constant: 0 for vgg13/mobilenetv2 at 16px
    degenerate = name == "ft" and min(s_shapes[term.s_tap][1], t_shapes[term.t_tap][1]) == 1
    assert torch.isfinite(loss) and torch.isfinite(logs[f"loss_{name}"])
    assert (logs[f"loss_{name}"] == 0) == degenerate
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in teacher.parameters())
