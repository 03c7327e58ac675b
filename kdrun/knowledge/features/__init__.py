"""Intermediate-feature knowledge: terms on stage outputs (hints, attention, selectivity, factors...).

Multi-layer terms pair the student's and the teacher's stage taps (``stage1``.. ``stageK``, or
their ``stageK_preact`` variants). When the two networks have a different number of stages, the
last ``min(K_s, K_t)`` stages of each are paired in order (e.g. vgg13's stage2..4 with resnet8's
stage1..3). Feature maps of different spatial sizes are matched by average-pooling the larger to
the smaller, as in the CRD benchmark. All loss arithmetic runs in fp32 (features are cast with
``.float()``); teacher features are always detached.

One module per method; each class is importable from here too.
"""

from kdrun.knowledge.features.ab import AB, ab_margin_loss
from kdrun.knowledge.features.at import AT, attention_map
from kdrun.knowledge.features.fitnet import FitNet
from kdrun.knowledge.features.fsp import FSP, fsp_matrix
from kdrun.knowledge.features.ft import FT, factor_transfer_loss, factor_vector
from kdrun.knowledge.features.nst import NST, nst_mmd
from kdrun.knowledge.features.ofd import OFD, gaussian_negative_mean, partial_l2
from kdrun.knowledge.features.reviewkd import ReviewKD, hcl
from kdrun.knowledge.features.stages import StagePairsTerm, stage_names
from kdrun.knowledge.features.vid import VID

__all__ = [
    "AB", "AT", "ab_margin_loss", "FSP", "FT", "FitNet", "NST", "OFD", "ReviewKD", "StagePairsTerm", "VID", "attention_map",
    "factor_transfer_loss", "factor_vector", "fsp_matrix", "gaussian_negative_mean", "hcl", "nst_mmd", "partial_l2",
    "stage_names",
]
