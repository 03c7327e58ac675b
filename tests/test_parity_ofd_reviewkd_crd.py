"""OFD, ReviewKD and CRD against their reference implementations, on the same tensors.

Each expected number was printed by the reference code itself, run outside kdrun (unmodified
reference files; on the CPU, with the reference's ``.cuda()``/``.to('cuda')`` calls shimmed out)
with torch 2.14.1 on the tensors of the recipe functions below, which the reference script built
the same way (the same generator seeds and calls). Adapter weights (connectors, ABF modules,
embedding heads), the memories and the negatives come from the recipes and were copied into the
reference modules. Only the numbers are kept here.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kdrun.knowledge import Step
from kdrun.knowledge.contrastive import CRD
from kdrun.knowledge.features import OFD, ReviewKD

REL = 1e-5


def approx(value):
    return pytest.approx(value, rel=REL)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- OFD
OFD_S = [(4, 8, 8), (6, 4, 4), (8, 2, 2)]
OFD_T = [(5, 8, 8), (7, 4, 4), (9, 2, 2)]


def ofd_recipe(batch=4):
    g = gen(0)
    s = [torch.randn(batch, *sh, generator=g) for sh in OFD_S]
    t = [torch.randn(batch, *sh, generator=g) * 1.5 + 0.2 for sh in OFD_T]
    gamma = [torch.randn(sh[0], generator=g) for sh in OFD_T]  # teacher BN weight (some < 0)
    beta = [torch.randn(sh[0], generator=g) for sh in OFD_T]   # teacher BN bias
    for j in range(len(OFD_T)):
        beta[j][0] = 3.5 * gamma[j][0].abs()  # Phi(-3.5) < 1e-3: the margin's -3 std branch
    conn = []
    for ss, ts in zip(OFD_S, OFD_T):
        w = torch.randn(ts[0], ss[0], 1, 1, generator=g) * 0.5
        bw = 1 + 0.1 * torch.randn(ts[0], generator=g)
        bb = 0.1 * torch.randn(ts[0], generator=g)
        conn.append((w, bw, bb))
    return s, t, gamma, beta, conn


def staged(shapes, preact=True):
    out = {}
    for j, sh in enumerate(shapes, 1):
        out[f"stage{j}"] = sh
        if preact:
            out[f"stage{j}_preact"] = sh
    return out


# Reference: clovaai/overhaul-distillation @ 76344a84a7ce23c894f41a2e05b866c9b73fd85a,
# CIFAR-100/distiller.py: Distiller (build_feature_connector, get_margin_from_BN,
# distillation_loss, Distiller.forward) with stub networks whose extract_feature(preReLU=True)
# returns the recipe's features and whose get_bn_before_relu() returns BNs with weight gamma and
# bias beta; connectors loaded with the recipe weights, all in train mode; the value is
# loss_distill / batch_size (train_with_distillation.py divides by the batch and by 1000, the
# weight). Gradients: norms of d(value)/d(student feature) per pair. mdistiller @ a08d46f1
# (mdistiller/distillers/OFD.py feat_loss, as in OFD.ofd_loss) gives 455.60977 on the same tensors.
# kdrun is given the same margin: its running teacher statistics are set to mean = beta and
# variance = gamma^2, so its Gaussian is N(beta, gamma^2) like the reference's.
OFD_MARGINS = [
    [-0.7780729532241821, -1.4960075616836548, -0.5651697516441345, -0.902056872844696, -0.89176344871521],
    [-0.3658025860786438, -2.05562424659729, -0.41964003443717957, -1.3327183723449707, -0.990877091884613,
     -0.9694284200668335, -0.14671041071414948],
    [-0.9294975399971008, -0.884275496006012, -1.0349493026733398, -0.7802927494049072, -0.5467956066131592,
     -0.9898634552955627, -0.9011666774749756, -2.2672526836395264, -0.3312559127807617],
]
OFD_VALUE = 455.6097412109375
OFD_GRAD_NORMS = [5.28134298324585, 6.385694980621338, 7.022823810577393]


def test_parity_ofd():
    s, t, gamma, beta, conn = ofd_recipe()
    term = OFD()
    term.setup(staged(OFD_S), staged(OFD_T))
    assert term.pairs == [(f"stage{j}_preact", f"stage{j}_preact") for j in (1, 2, 3)]
    with torch.no_grad():
        for j, (connector, (w, bw, bb)) in enumerate(zip(term.connectors, conn)):
            connector[0].weight.copy_(w)
            connector[1].weight.copy_(bw)
            connector[1].bias.copy_(bb)
            getattr(term, f"t_mean{j}").copy_(beta[j])
            getattr(term, f"t_var{j}").copy_(gamma[j].double() ** 2)
    for j, want in enumerate(OFD_MARGINS):
        assert term.margin(j).flatten().tolist() == approx(want)
    term.eval()  # keep the statistics (and so the margin) fixed ...
    term.connectors.train()  # ... but the connectors' BN on batch statistics, as the reference
    s_taps = {f"stage{j}_preact": x.clone().requires_grad_(True) for j, x in enumerate(s, 1)}
    t_taps = {f"stage{j}_preact": x for j, x in enumerate(t, 1)}
    value = term(s_taps, t_taps, Step(None, None, 0.0, 1))
    assert value.item() == approx(OFD_VALUE)
    value.backward()
    assert [s_taps[f"stage{j}_preact"].grad.norm().item() for j in (1, 2, 3)] == approx(OFD_GRAD_NORMS)


# ---------------------------------------------------------------------------- ReviewKD
RK_S = [(4, 8, 8), (6, 4, 4), (8, 4, 4)]  # the deepest student stage is larger than the teacher's
RK_T = [(5, 8, 8), (7, 4, 4), (9, 2, 2)]
RK_SE, RK_TE = 8, 9


def reviewkd_recipe(batch=4):
    g = gen(1)
    s = [torch.randn(batch, *sh, generator=g).relu() for sh in RK_S] + [torch.rand(batch, RK_SE, generator=g)]
    t = [torch.randn(batch, *sh, generator=g) for sh in RK_T] + [torch.rand(batch, RK_TE, generator=g)]
    in_ch = [sh[0] for sh in RK_S] + [RK_SE]
    out_ch = [sh[0] for sh in RK_T] + [RK_TE]
    mid = min(512, RK_SE)
    params = []  # per level, shallowest first
    for level, (ci, co) in enumerate(zip(in_ch, out_ch)):
        p = {
            "c1": torch.randn(mid, ci, 1, 1, generator=g) * 0.4,
            "b1w": 1 + 0.1 * torch.randn(mid, generator=g), "b1b": 0.1 * torch.randn(mid, generator=g),
            "c2": torch.randn(co, mid, 3, 3, generator=g) * 0.2,
            "b2w": 1 + 0.1 * torch.randn(co, generator=g), "b2b": 0.1 * torch.randn(co, generator=g),
        }
        if level < len(in_ch) - 1:
            p["aw"] = torch.randn(2, 2 * mid, 1, 1, generator=g) * 0.3
            p["ab"] = 0.1 * torch.randn(2, generator=g)
        params.append(p)
    return s, t, params


# Reference: dvlab-research/ReviewKD @ cede6ea6387ae9b6127de0e561507177bf19c11e,
# CIFAR-100/model/reviewkd.py: ReviewKD (its ABF modules) with a stub student whose
# forward(is_feat=True) returns [f0, f1, f2, f3, pooled] = [unused, recipe s[0..2], s[3] as 1x1],
# in_channels [4, 6, 8, 8], out_channels [5, 7, 9, 9], shapes [1, 4, 4, 8] (student sizes, deepest
# first), out_shapes [1, 2, 4, 8] (teacher sizes); ABF weights loaded from the recipe, train mode;
# then hcl(results, teacher pre-ReLU stages + pooled as 1x1), as train.py computes it before
# min(1, epoch / kd_warm_up) and --kd-loss-weight. Gradients: norms of d(hcl)/d(student feature).
# mdistiller @ a08d46f1 (mdistiller/distillers/ReviewKD.py ABF + hcl_loss) gives the same 5.197053.
REVIEWKD_VALUE = 5.197052955627441
REVIEWKD_GRAD_NORMS = [0.062478162348270416, 0.09988337755203247, 0.16896317899227142, 0.658128023147583]


def test_parity_reviewkd():
    s, t, params = reviewkd_recipe()
    term = ReviewKD()  # defaults: teacher pre-ReLU stages, warm-up 20 epochs
    term.setup({**staged(RK_S, preact=False), "embedding": (RK_SE,)}, {**staged(RK_T), "embedding": (RK_TE,)})
    assert term.pairs == [(f"stage{j}", f"stage{j}_preact") for j in (1, 2, 3)]
    with torch.no_grad():
        for abf, p in zip(term.abfs, params):
            abf.reduce[0].weight.copy_(p["c1"])
            abf.reduce[1].weight.copy_(p["b1w"])
            abf.reduce[1].bias.copy_(p["b1b"])
            abf.out[0].weight.copy_(p["c2"])
            abf.out[1].weight.copy_(p["b2w"])
            abf.out[1].bias.copy_(p["b2b"])
            if "aw" in p:
                abf.attention[0].weight.copy_(p["aw"])
                abf.attention[0].bias.copy_(p["ab"])
    s_taps = {f"stage{j}": x.clone().requires_grad_(True) for j, x in enumerate(s[:3], 1)}
    s_taps["embedding"] = s[3].clone().requires_grad_(True)
    t_taps = {f"stage{j}_preact": x for j, x in enumerate(t[:3], 1)}
    t_taps["embedding"] = t[3]
    value = term(s_taps, t_taps, Step(None, None, 20.0, 240))  # 21st epoch: warm-up factor 1
    assert value.item() == approx(REVIEWKD_VALUE)
    value.backward()
    grads = [s_taps[k].grad.norm().item() for k in ("stage1", "stage2", "stage3", "embedding")]
    assert grads == approx(REVIEWKD_GRAD_NORMS)
    # train.py's warm-up min(1, epoch / 20) with 0-based epochs: 0, 0.05, 0.25, 0.95 at epochs 0, 1, 5, 19
    for epoch, factor in ((0.0, 0.0), (0.99, 0.0), (1.0, 0.05), (5.5, 0.25), (19.9, 0.95)):
        assert term.warmup(Step(None, None, epoch, 240)) == pytest.approx(factor)


# ---------------------------------------------------------------------------- CRD
CRD_N, CRD_CLASSES, CRD_K, CRD_D, CRD_SD, CRD_TD, CRD_B = 40, 4, 10, 8, 6, 12, 6


def crd_recipe():
    g = gen(2)
    labels = torch.arange(CRD_N) % CRD_CLASSES
    stdv = 1.0 / math.sqrt(CRD_D / 3)
    mem_s = torch.rand(CRD_N, CRD_D, generator=g) * 2 * stdv - stdv  # the reference's init formula
    mem_t = torch.rand(CRD_N, CRD_D, generator=g) * 2 * stdv - stdv
    ws, bs = torch.randn(CRD_D, CRD_SD, generator=g) * 0.3, torch.randn(CRD_D, generator=g) * 0.1
    wt, bt = torch.randn(CRD_D, CRD_TD, generator=g) * 0.3, torch.randn(CRD_D, generator=g) * 0.1
    calls = []
    for index in (torch.tensor([0, 5, 10, 15, 22, 39]), torch.tensor([5, 1, 22, 30, 11, 2])):
        f_s = torch.randn(CRD_B, CRD_SD, generator=g)
        f_t = torch.randn(CRD_B, CRD_TD, generator=g).relu()
        other = [torch.nonzero(labels != labels[i]).flatten() for i in index.tolist()]
        neg = torch.stack([o[torch.randint(0, len(o), (CRD_K,), generator=g)] for o in other])
        calls.append((index, f_s, f_t, neg))
    return labels, mem_s, mem_t, (ws, bs, wt, bt), calls


# Reference: HobbitLong/RepDistiller @ b84f547c5db6a35318d4671d7d5c4de74c822403, crd/criterion.py
# CRDLoss (Embed, ContrastLoss) with crd/memory.py ContrastMemory (nce_k 10, nce_t 0.07, nce_m 0.5,
# n_data 40, feat_dim 8, s_dim 6, t_dim 12): embedding heads, memory_v1 (student) and memory_v2
# (teacher) loaded from the recipe, then two calls CRDLoss(f_s, f_t, idx, contrast_idx) with
# contrast_idx = [idx, recipe negatives] (drawn from the other classes, as
# dataset/cifar100.py CIFAR100InstanceSample does in mode 'exact'); the second call uses the Z
# set by the first and the memory it updated. Per call: the loss, the norms of d(loss)/d(f_s)
# and d(loss)/d(embed_s.linear.weight), Z (params[2] student anchor, params[3] teacher anchor) and
# the sum and squared sum of each memory after the call's update.
CRD_CALLS = [
    dict(loss=17.325756072998047, grad_f_s=3.377229690551758, grad_w_s=8.77237319946289,
         memory_s=(-8.270539283752441, 38.660919189453125), memory_t=(2.9538373947143555, 41.4593505859375)),
    dict(loss=19.771394729614258, grad_f_s=2.9944121837615967, grad_w_s=9.60544204711914,
         memory_s=(-7.535391807556152, 38.77005386352539), memory_t=(6.531209945678711, 41.39585876464844)),
]
CRD_Z = (60635.203125, 9617.431640625)


def test_parity_crd():
    labels, mem_s, mem_t, (ws, bs, wt, bt), calls = crd_recipe()
    term = CRD(feat_dim=CRD_D, nce_k=CRD_K)  # defaults: T 0.07, momentum 0.5, other_class negatives
    term.setup({"embedding": (CRD_SD,)}, {"embedding": (CRD_TD,)},
               SimpleNamespace(n_train=CRD_N, train_labels=labels))
    with torch.no_grad():
        term.embed_s.linear.weight.copy_(ws)
        term.embed_s.linear.bias.copy_(bs)
        term.embed_t.linear.weight.copy_(wt)
        term.embed_t.linear.bias.copy_(bt)
    term.memory_s, term.memory_t = mem_s.clone(), mem_t.clone()
    for (index, f_s, f_t, neg), want in zip(calls, CRD_CALLS):
        assert not (labels[neg] == labels[index][:, None]).any()  # the recipe's negatives: other classes
        term.sample_negatives = lambda idx, neg=neg: neg  # the reference's contrast_idx
        f_s = f_s.clone().requires_grad_(True)
        value = term({"embedding": f_s}, {"embedding": f_t}, Step(labels[index], index, 0.0, 1))
        assert value.item() == approx(want["loss"])
        value.backward()
        assert f_s.grad.norm().item() == approx(want["grad_f_s"])
        assert term.embed_s.linear.weight.grad.norm().item() == approx(want["grad_w_s"])
        term.zero_grad()
        assert term.log_z.exp().tolist() == approx(list(CRD_Z))
        for name in ("memory_s", "memory_t"):
            memory = getattr(term, name)
            assert (memory.sum().item(), memory.pow(2).sum().item()) == approx(want[name])
