"""Reference parity of the response and relation terms: kd, kd standardised, dkd, dist, rkd, sp, pkt, cc.

Every test rebuilds fixed seeded tensors (CPU, fp32; the recipe is in the test), runs kdrun's term
unweighted with the reference's own internal sub-weights, and compares with numbers the reference
implementation gave on the very same tensors (value, and the gradient w.r.t. the student input:
its norm and its first three entries in row-major order), within 1e-5 relative.

The numbers were obtained outside this project by running the reference code unchanged (torch
2.14.1, CPU) on the same recipes:
- RepDistiller: github.com/HobbitLong/RepDistiller @ b84f547c5db6a35318d4671d7d5c4de74c822403
- mdistiller: github.com/megvii-research/mdistiller @ a08d46f10d6102bd6e3f258ca5ac880b020ea259
- LSKD: github.com/sunshangquan/logit-standardization-KD @ f6e5aa5172bad618e801163c3385322eea673754
- DIST: github.com/hunto/image_classification_sota @ 6f7a70a1dd57fd88413d83909d3d53243068f701
  (the loss file that github.com/hunto/DIST_KD's README points to)
Where two references implement a term (RepDistiller and mdistiller for kd, rkd, sp, pkt) both gave
bit-identical numbers.
"""

from __future__ import annotations

import pytest
import torch

from kdrun.knowledge import Step
from kdrun.knowledge.logits import DIST, DKD, KD
from kdrun.knowledge.relations import CC, PKT, RKD, SP

REL = 1e-5


def student(x: torch.Tensor) -> torch.Tensor:
    return x.clone().requires_grad_(True)


def check(value: torch.Tensor, x: torch.Tensor, ref_value: float, ref_grad_norm: float, ref_grad_0: list[float]):
    """``value`` and its gradient w.r.t. ``x`` against the reference's numbers."""
    assert value.item() == pytest.approx(ref_value, rel=REL)
    value.backward()
    assert x.grad.norm().item() == pytest.approx(ref_grad_norm, rel=REL)
    assert x.grad.flatten()[:3].tolist() == pytest.approx(ref_grad_0, rel=REL, abs=1e-10)


def test_parity_kd():
    # RepDistiller distiller_zoo/KD.py DistillKL(T=4).forward(y_s, y_t) and mdistiller
    # mdistiller/distillers/KD.py kd_loss(logits_student, logits_teacher, 4.0): same numbers.
    # torch.manual_seed(0); z_s = randn(8, 100) * 2; z_t = randn(8, 100) * 3
    torch.manual_seed(0)
    z_s, z_t = torch.randn(8, 100) * 2, torch.randn(8, 100) * 3
    x = student(z_s)
    value = KD(temperature=4.0)({"logits": x}, {"logits": z_t}, Step(None))
    check(value, x, 7.018894672393799, 0.15628017485141754,
          [0.000900910294149071, 5.558850534725934e-05, 0.00020518552628345788])


def test_parity_kd_standardize():
    # LSKD mdistiller/distillers/KD.py kd_loss(logits_student, logits_teacher, 2.0, logit_stand=True)
    # (its `normalize`: (z - mean) / (1e-7 + std), torch's sample std).
    # torch.manual_seed(1); z_s = randn(8, 100) * 2 + 1; z_t = randn(8, 100) * 5 - 3; T = 2
    torch.manual_seed(1)
    z_s, z_t = torch.randn(8, 100) * 2 + 1, torch.randn(8, 100) * 5 - 3
    x = student(z_s)
    value = KD(temperature=2.0, standardize=True)({"logits": x}, {"logits": z_t}, Step(None))
    check(value, x, 0.9133846759796143, 0.019519982859492302,
          [-0.000600647006649524, 0.00014151743380352855, 0.000688491272740066])


def dkd_tensors():
    torch.manual_seed(2)
    z_s, z_t = torch.randn(8, 100) * 2, torch.randn(8, 100) * 3
    y = torch.randint(0, 100, (8,))
    return z_s, z_t, y


def test_parity_dkd():
    # mdistiller mdistiller/distillers/DKD.py dkd_loss(logits_student, logits_teacher, target,
    # alpha=1, beta=8, temperature=4); past the warm-up kdrun's term is that loss.
    # torch.manual_seed(2); z_s = randn(8, 100) * 2; z_t = randn(8, 100) * 3; y = randint(0, 100, (8,))
    z_s, z_t, y = dkd_tensors()
    assert y.tolist() == [92, 71, 82, 30, 15, 23, 70, 5]  # the targets the reference was given
    x = student(z_s)
    value = DKD(alpha=1.0, beta=8.0, temperature=4.0, warmup=20)({"logits": x}, {"logits": z_t}, Step(y, epoch=25.0))
    check(value, x, 52.74982452392578, 1.1931965351104736,
          [-0.049286067485809326, 0.0394119992852211, -0.026141515001654625])


def test_parity_dkd_warmup():
    # mdistiller DKD.forward_train(image, target, epoch=3) with CE_WEIGHT 1, ALPHA 1, BETA 8, T 4,
    # WARMUP 20 on the tensors of test_parity_dkd (stub networks returning them): losses_dict["loss_kd"].
    # mdistiller's epoch counts from 1, so its epoch 3 is kdrun's fractional epoch 2.x.
    z_s, z_t, y = dkd_tensors()
    term = DKD(alpha=1.0, beta=8.0, temperature=4.0, warmup=20)
    for epoch in (2.0, 2.5, 2.99):
        value = term({"logits": z_s}, {"logits": z_t}, Step(y, epoch=epoch))
        assert value.item() == pytest.approx(7.912474155426025, rel=REL), epoch


def test_parity_dist():
    # hunto/image_classification_sota lib/models/losses/dist_kd.py DIST(beta=1, gamma=1, tau=4)
    # (the authors' CIFAR kd method dist_t4) forward(z_s, z_t); kdrun's defaults.
    # torch.manual_seed(3); z_s = randn(8, 100) * 2; z_t = randn(8, 100) * 3
    torch.manual_seed(3)
    z_s, z_t = torch.randn(8, 100) * 2, torch.randn(8, 100) * 3
    x = student(z_s)
    value = DIST()({"logits": x}, {"logits": z_t}, Step(None))
    check(value, x, 31.95258331298828, 0.5521070957183838,
          [0.010620249435305595, 0.018658634275197983, 0.004038996063172817])


def test_parity_rkd():
    # RepDistiller distiller_zoo/RKD.py RKDLoss(w_d=25, w_a=50).forward(f_s, f_t) and mdistiller
    # mdistiller/distillers/RKD.py rkd_loss(f_s, f_t, squared=False, eps=1e-12, 25, 50): same numbers.
    # torch.manual_seed(4); f_s = randn(8, 16); f_t = randn(8, 32) * 2
    torch.manual_seed(4)
    f_s, f_t = torch.randn(8, 16), torch.randn(8, 32) * 2
    x = student(f_s)
    value = RKD()({"embedding": x}, {"embedding": f_t}, Step(None))
    check(value, x, 1.7749950885772705, 0.6982678771018982,
          [0.028496036306023598, -0.05604690685868263, 0.002341574989259243])


def test_parity_sp():
    # RepDistiller distiller_zoo/SP.py Similarity().forward([f_s], [f_t]) and mdistiller
    # mdistiller/distillers/SP.py sp_loss([f_s], [f_t]): same numbers.
    # torch.manual_seed(5); f_s = relu(randn(8, 16, 4, 4)); f_t = relu(randn(8, 32, 4, 4))
    torch.manual_seed(5)
    f_s, f_t = torch.relu(torch.randn(8, 16, 4, 4)), torch.relu(torch.randn(8, 32, 4, 4))
    x = student(f_s)
    value = SP()({"stage3": x}, {"stage3": f_t}, Step(None))
    check(value, x, 0.0020880703814327717, 0.0013446453958749771, [8.431366950389929e-06, 4.2975581891369075e-05, 0.0])


def test_parity_pkt():
    # RepDistiller distiller_zoo/PKT.py PKT.cosine_similarity_loss(f_s, f_t) and mdistiller
    # mdistiller/distillers/PKT.py pkt_loss(f_s, f_t): same numbers.
    # torch.manual_seed(6); f_s = randn(8, 16); f_t = randn(8, 32)
    torch.manual_seed(6)
    f_s, f_t = torch.randn(8, 16), torch.randn(8, 32)
    x = student(f_s)
    value = PKT()({"embedding": x}, {"embedding": f_t}, Step(None))
    check(value, x, 0.005436946637928486, 0.002789852675050497,
          [-0.0004453686415217817, -5.830475492984988e-05, -0.0002848108415491879])
    # tiny student norms (the same student times 1e-6), where the reference's 1 / (||f|| + 1e-7)
    # row scaling departs from a plain normalisation; same two functions, same numbers
    tiny = PKT()({"embedding": f_s * 1e-6}, {"embedding": f_t}, Step(None))
    assert tiny.item() == pytest.approx(0.004981836304068565, rel=REL)


def test_parity_cc():
    # RepDistiller distiller_zoo/CC.py Correlation().forward(embed_s(f_s), embed_t(f_t)) with the
    # train_student.py wiring: embed_s = models/util.py LinearEmbed(16, 128), embed_t = LinearEmbed(32, 128)
    # (--feat_dim 128), their weights set to the ones below.
    # torch.manual_seed(7); f_s = randn(8, 16); f_t = randn(8, 32)
    # torch.manual_seed(8); W_s = randn(128, 16) * 0.1; b_s = randn(128) * 0.1;
    #                       W_t = randn(128, 32) * 0.1; b_t = randn(128) * 0.1
    torch.manual_seed(7)
    f_s, f_t = torch.randn(8, 16), torch.randn(8, 32)
    torch.manual_seed(8)
    w_s, b_s = torch.randn(128, 16) * 0.1, torch.randn(128) * 0.1
    w_t, b_t = torch.randn(128, 32) * 0.1, torch.randn(128) * 0.1
    term = CC()
    term.setup({"embedding": (16,)}, {"embedding": (32,)})
    with torch.no_grad():
        for layer, w, b in ((term.embed_s, w_s, b_s), (term.embed_t, w_t, b_t)):
            layer.weight.copy_(w)
            layer.bias.copy_(b)
    x = student(f_s)
    value = term({"embedding": x}, {"embedding": f_t}, Step(None))
    check(value, x, 33.47954177856445, 3.1372873783111572,
          [0.03913464397192001, -0.16986961662769318, 0.0904691144824028])
    # the reference trains both embeddings: the gradients of their weights
    assert term.embed_s.weight.grad.norm().item() == pytest.approx(19.62343978881836, rel=REL)
    assert term.embed_t.weight.grad.norm().item() == pytest.approx(25.174850463867188, rel=REL)
