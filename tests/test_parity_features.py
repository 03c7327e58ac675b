"""Reference parity of the feature terms fitnet, at, nst, ab, ft, fsp and vid.

Every expected number below was computed by running the reference implementation itself, outside
this project, on the very tensors these tests build, with the adapters' weights copied across:

- RepDistiller: github.com/HobbitLong/RepDistiller, commit b84f547c5db6a35318d4671d7d5c4de74c822403
- mdistiller: github.com/megvii-research/mdistiller, commit a08d46f10d6102bd6e3f258ca5ac880b020ea259
  (where it has the method; its numbers equal RepDistiller's for fitnet, at, nst and vid)

Tensor recipe (``taps``): batch 4; one ``torch.Generator().manual_seed(seed)`` draws
``torch.randn(4, *shape)`` for each tap in the order the shapes dict lists them. Adapter recipe
(``fill_params``): one ``torch.Generator().manual_seed(seed)`` redraws every parameter of kdrun's
adapter in ``named_parameters()`` order: conv weights ``randn / sqrt(fan)`` (fan = numel of
``weight[0]``), BN scales ``1 + 0.1 randn``, biases ``0.1 randn``; the same tensors were copied,
parameter by parameter in order, into the reference module. Adapters run in train mode (BN on
batch statistics), as the reference's training loop runs them. Values are the unweighted terms;
gradient statistics are the L2 norms of d(term)/d(student tap), one per tap. fp32 throughout.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdrun.knowledge import Step
from kdrun.knowledge.features import AB, AT, FSP, FT, NST, VID, FitNet

B = 4
STEP = Step(torch.zeros(B, dtype=torch.long))
STAGES = ["stage1", "stage2", "stage3"]
# student maps and teacher maps with other channel counts (same sizes / half the sizes)
S = {"stem": (16, 32, 32), "stage1": (16, 32, 32), "stage2": (32, 16, 16), "stage3": (64, 8, 8)}
T = {"stage1": (32, 32, 32), "stage2": (64, 16, 16), "stage3": (128, 8, 8)}
T_HALF = {"stage1": (32, 16, 16), "stage2": (64, 8, 8), "stage3": (128, 4, 4)}
REL = 1e-5


def taps(shapes, seed, grad=False):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(B, *v, generator=g).requires_grad_(grad) for k, v in shapes.items()}


def fill_params(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def run(term, s_shapes, t_shapes, s_seed, t_seed, grad_taps):
    """The term's value on the recipe's tensors and the gradient norm on each of ``grad_taps``."""
    s, t = taps(s_shapes, s_seed, grad=True), taps(t_shapes, t_seed)
    value = term(s, t, STEP)
    value.backward()
    return value.item(), [s[k].grad.norm().item() for k in grad_taps]


def stage_shapes(shapes):
    return {k: shapes[k] for k in STAGES}


# RepDistiller train_student.py --distill hint (hint_layer 2): models/util.py ConvReg +
# distiller_zoo/FitNet.py HintLoss; mdistiller distillers/FitNet.py (_common.py ConvReg, F.mse_loss)
# gives the same numbers. Student stage2 (32,16,16) seed 10; teacher stage2 (64,H,W) seed 11 with
# H=W=16 (1x1 conv), 8 (3x3 stride-2 conv), 32 (4x4 transposed conv); regressor fill_params seed 12.
@pytest.mark.parametrize("t_hw, value, grad", [
    (16, 1.5265616178512573, 0.006308657117187977),
    (8, 1.4983783960342407, 0.012226655147969723),
    (32, 1.5037553310394287, 0.0030260065104812384),
])
def test_parity_fitnet(t_hw, value, grad):
    s_shapes, t_shapes = {"stage2": (32, 16, 16)}, {"stage2": (64, t_hw, t_hw)}
    term = FitNet()
    term.setup(s_shapes, t_shapes)
    fill_params(term.regressor, 12)
    got, grads = run(term, s_shapes, t_shapes, 10, 11, ["stage2"])
    assert got == pytest.approx(value, rel=REL)
    assert grads == pytest.approx([grad], rel=REL)


# RepDistiller distiller_zoo/AT.py Attention (p=2), summed over feat[1:-1] as helper/loops.py
# train_distill does; mdistiller distillers/AT.py at_loss(p=2) gives the same numbers. Student
# stage1..3 of S seed 20, teacher stage1..3 of T (same sizes) or T_HALF (the student's maps pooled)
# seed 21. Gradient norms on the student's stage1..3.
@pytest.mark.parametrize("t_shapes, value, grads", [
    (T, 0.0011204973561689258, [5.835380306962179e-06, 2.550876888562925e-05, 9.268296707887203e-05]),
    (T_HALF, 0.004017271101474762, [4.6782024583080783e-05, 0.0001918707275763154, 0.0007012436981312931]),
], ids=["same", "half"])
def test_parity_at(t_shapes, value, grads):
    term = AT()
    term.setup(stage_shapes(S), t_shapes)
    got, got_grads = run(term, stage_shapes(S), t_shapes, 20, 21, STAGES)
    assert got == pytest.approx(value, rel=REL)
    assert got_grads == pytest.approx(grads, rel=REL)


# RepDistiller distiller_zoo/NST.py NSTLoss (full_loss, polynomial kernel degree 2), summed over
# feat[1:-1]; mdistiller distillers/NST.py nst_loss gives the same numbers. Same tensors as AT
# (student seed 20, teacher seed 21).
@pytest.mark.parametrize("t_shapes, value, grads", [
    (T, 0.1634289026260376, [0.000142076110932976, 0.00029877881752327085, 0.0006008071941323578]),
    (T_HALF, 0.1613418459892273, [0.000597659673076123, 0.0011425053235143423, 0.0023420306388288736]),
], ids=["same", "half"])
def test_parity_nst(t_shapes, value, grads):
    term = NST()
    term.setup(stage_shapes(S), t_shapes)
    got, got_grads = run(term, stage_shapes(S), t_shapes, 20, 21, STAGES)
    assert got == pytest.approx(value, rel=REL)
    assert got_grads == pytest.approx(grads, rel=REL)


# RepDistiller train_student.py --distill abound: models/util.py Connector (identity where the
# shapes agree, else ConvReg without ReLU) + distiller_zoo/AB.py ABLoss(3) summed (its init-stage
# loss in helper/pretrain.py init). Student preact stage1..3 of S, teacher preact stage1..3 of shapes
# (16,32,32) (identity connector), (64,16,16), (128,8,8); taps dicts list stageK then stageK_preact
# for each K, student seed 30, teacher seed 31; connectors fill_params seed 32.
def test_parity_ab():
    pre = [f"{k}_preact" for k in STAGES]
    s_shapes = {f"{k}{x}": S[k] for k in STAGES for x in ("", "_preact")}
    t_sizes = dict(zip(STAGES, [(16, 32, 32), (64, 16, 16), (128, 8, 8)]))
    t_shapes = {f"{k}{x}": t_sizes[k] for k in STAGES for x in ("", "_preact")}
    term = AB()
    term.setup(s_shapes, t_shapes)
    assert isinstance(term.connectors[0], torch.nn.Identity)
    fill_params(term.connectors, 32)
    got, grads = run(term, s_shapes, t_shapes, 30, 31, pre)
    assert got == pytest.approx(119.05132293701172, rel=REL)
    assert grads == pytest.approx([0.13307003676891327, 0.21419209241867065, 0.3078150749206543], rel=REL)
    s, t = taps(s_shapes, 30), taps(t_shapes, 31)
    assert term.init_loss(s, t, STEP).item() == pytest.approx(119.05132293701172, rel=REL)


# RepDistiller train_student.py --distill factor: models/util.py Paraphraser (k 0.5, no BN; eval in
# the main stage) and Translator (BN, train mode) + distiller_zoo/FT.py FactorTransfer (p1 2, p2 1);
# the init value is helper/pretrain.py init's MSELoss(reconstruction, teacher feature) with the
# paraphraser in train mode. Student stage3 (64,8,8) seed 40, teacher stage3 (128,8,8) seed 41;
# paraphraser fill_params seed 42, translator seed 43.
def test_parity_ft():
    s_shapes, t_shapes = {"stage3": S["stage3"]}, {"stage3": T["stage3"]}
    term = FT()
    term.setup(s_shapes, t_shapes)
    fill_params(term.paraphraser, 42)
    fill_params(term.translator, 43)
    got, grads = run(term, s_shapes, t_shapes, 40, 41, ["stage3"])
    assert got == pytest.approx(0.03621490299701691, rel=REL)
    assert grads == pytest.approx([0.0035254182294011116], rel=REL)
    init = term.init_loss(taps(s_shapes, 40), taps(t_shapes, 41), STEP)
    assert init.item() == pytest.approx(1.0196805000305176, rel=REL)


# RepDistiller train_student.py --distill fsp: distiller_zoo/FSP.py FSP on feat[:-1] (stem and
# every stage; equal channel counts, as it requires), summed (its init-stage loss in
# helper/pretrain.py init). Student S seed 50, teacher the same shapes seed 51; gradient norms on
# the student's stem, stage1..3.
def test_parity_fsp():
    term = FSP()
    term.setup(S, S)
    assert term.s_layers == ["stem", *STAGES]
    got, grads = run(term, S, S, 50, 51, ["stem", *STAGES])
    assert got == pytest.approx(0.0119395162910223, rel=REL)
    assert grads == pytest.approx([8.411341696046293e-05, 0.00010705966997193173, 0.00016770465299487114,
                                   0.00014063050912227482], rel=REL)


# RepDistiller train_student.py --distill vid: one distiller_zoo/VID.py VIDLoss(C_s, C_t, C_t)
# (init_pred_var 5, eps 1e-5) per stage pair of feat[1:-1], summed; mdistiller distillers/VID.py
# vid_loss gives the same values. Student stage1..3 of S seed 60, teacher stage1..3 of T or T_HALF
# seed 61; regressors fill_params seed 62, variance parameters left at their initial value (the
# reference's log_scale init). Gradient norms on the student's stage1..3 and on each alpha
# (RepDistiller's log_scale).
@pytest.mark.parametrize("t_shapes, value, grads, alpha_grads", [
    (T, 2.7869935035705566, [0.0003587113169487566, 0.0006827678880654275, 0.001010796520859003],
     [0.013465378433465958, 0.009275422431528568, 0.00652235746383667]),
    (T_HALF, 2.733447790145874, [0.0002802963135764003, 0.0004786409845110029, 0.0007031435379758477],
     [0.01388552226126194, 0.009796123020350933, 0.006874064914882183]),
], ids=["same", "half"])
def test_parity_vid(t_shapes, value, grads, alpha_grads):
    term = VID()
    term.setup(stage_shapes(S), t_shapes)
    fill_params(term.regressors, 62)
    got, got_grads = run(term, stage_shapes(S), t_shapes, 60, 61, STAGES)
    assert got == pytest.approx(value, rel=REL)
    assert got_grads == pytest.approx(grads, rel=REL)
    assert [a.grad.norm().item() for a in term.alphas] == pytest.approx(alpha_grads, rel=REL)
