"""Schemes beyond offline KD: teacher-assistant chain, multi-teacher, mutual, born-again, BYOT."""

from __future__ import annotations

import csv

import pytest
import torch

from kdrun.engine.checkpoint import read_checkpoint
from kdrun.errors import ConfigError
from kdrun.knowledge import KnowledgeSet, Step
from kdrun.knowledge.logits import KD
from kdrun.models import create_model
from kdrun.run import run
from kdrun.schemes.multi_teacher import confidence_weights
from kdrun.schemes.mutual import MutualStage, PeerGroup


def rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_ta_chain_trains_links_in_order_and_reuses_them(compose_tiny, tmp_path):
    cfg, ov = compose_tiny("scheme=ta_chain", "teacher=resnet14", "ta=[resnet8,resnet8]", "loss=kd")
    summary = run(cfg, run_dir=tmp_path / "a", overrides=ov)
    assert summary["status"] == "ok" and summary["chain"] == "resnet14 -> resnet8 -> resnet8 -> resnet8"
    for key in ("teacher_top1", "ta1_top1", "ta2_top1", "student_top1_best"):
        assert summary[key] is not None
    stages = [r["stage"] for r in rows(tmp_path / "a")]
    assert stages == ["teacher", "ta1", "ta2", "student"]  # one epoch each, in chain order
    # second run: the teacher and both assistants come from the store
    again = run(cfg, run_dir=tmp_path / "b", overrides=ov)
    assert [r["stage"] for r in rows(tmp_path / "b")] == ["student"]
    assert again["ta2_source"] == summary["ta2_source"] and again["ta1_top1"] == summary["ta1_top1"]
    # the + form is the same chain
    cfg2, ov2 = compose_tiny("scheme=ta_chain", "teacher=resnet14", "ta=resnet8+resnet8", "loss=kd")
    assert run(cfg2, run_dir=tmp_path / "c", overrides=ov2)["ta2_source"] == summary["ta2_source"]


def test_ta_chain_store_key_depends_on_the_teacher(compose_tiny, tmp_path):
    a, ov_a = compose_tiny("scheme=ta_chain", "teacher=resnet14", "ta=resnet8", "loss=kd")
    b, ov_b = compose_tiny("scheme=ta_chain", "teacher=resnet20", "ta=resnet8", "loss=kd")
    sa = run(a, run_dir=tmp_path / "a", overrides=ov_a)
    sb = run(b, run_dir=tmp_path / "b", overrides=ov_b)
    assert sa["ta1_source"] != sb["ta1_source"]


def test_ta_chain_without_assistants_is_a_clear_error(compose_tiny, tmp_path):
    cfg, ov = compose_tiny("scheme=ta_chain")
    with pytest.raises(ConfigError, match="needs teacher assistants"):
        run(cfg, run_dir=tmp_path / "r", overrides=ov)


def test_confidence_weights_sum_to_one_and_favour_the_right_teacher():
    torch.manual_seed(0)
    y = torch.randint(0, 5, (6,))
    right = torch.nn.functional.one_hot(y, 5).float() * 8.0
    wrong = torch.randn(6, 5)
    w = confidence_weights([right, wrong, torch.zeros(6, 5)], y)
    assert w.shape == (6, 3)
    assert torch.allclose(w.sum(dim=1), torch.ones(6))
    assert (w[:, 0] > w[:, 1]).all() and (w[:, 0] > w[:, 2]).all()
    # an independent computation for one sample
    ce = torch.stack([torch.nn.functional.cross_entropy(z[:1], y[:1]) for z in (right, wrong, torch.zeros(6, 5))])
    expected = (1 - torch.softmax(ce, 0)) / 2
    assert torch.allclose(w[0], expected, atol=1e-6)


@pytest.mark.parametrize("aggregation", ["mean", "confidence"])
def test_multi_teacher_reports_each_teacher_and_the_ensemble(compose_tiny, tmp_path, aggregation):
    cfg, ov = compose_tiny("scheme=multi_teacher", "teacher=resnet8+resnet14", "loss=kd+fitnet",
                           f"scheme.aggregation={aggregation}")
    summary = run(cfg, run_dir=tmp_path / "r", overrides=ov)
    assert summary["status"] == "ok"
    for key in ("teacher1_top1", "teacher2_top1", "teacher_ensemble_top1", "student_top1_best"):
        assert summary[key] is not None
    assert summary["teacher1"] == "resnet8" and summary["teacher2"] == "resnet14"
    student_rows = [r for r in rows(tmp_path / "r") if r["stage"] == "student"]
    assert float(student_rows[0]["loss_fitnet"]) > 0 and float(student_rows[0]["loss_kd"]) >= 0


def test_multi_teacher_rejects_mismatched_weights(compose_tiny, tmp_path):
    cfg, ov = compose_tiny("scheme=multi_teacher", "teacher=resnet8+resnet14", "scheme.aggregation=weights",
                           "scheme.weights=[1,2,3]")
    with pytest.raises(ConfigError, match="3 entries for 2 teachers"):
        run(cfg, run_dir=tmp_path / "r", overrides=ov)


def test_offline_refuses_several_teachers(compose_tiny, tmp_path):
    cfg, ov = compose_tiny("teacher=resnet8+resnet14")
    with pytest.raises(ConfigError, match="use scheme=multi_teacher"):
        run(cfg, run_dir=tmp_path / "r", overrides=ov)


def test_mutual_reports_every_peer_and_the_ensemble(compose_tiny, tmp_path):
    cfg, ov = compose_tiny("scheme=mutual", "peers=[resnet14,resnet8]", "loss=kd")
    summary = run(cfg, run_dir=tmp_path / "r", overrides=ov)
    assert summary["status"] == "ok" and summary["teacher"] is None
    for key in ("peer1_top1_best", "peer2_top1_best", "peers_ensemble_top1_best"):
        assert summary[key] is not None
    models = {r["model"] for r in rows(tmp_path / "r")}
    assert models == {"peer1", "peer2", "ensemble"}


def _tiny_peers():
    torch.manual_seed(0)
    peers = [create_model("resnet8", 5, 3, 16), create_model("resnet8", 5, 3, 16)]
    edges = {(0, 1): KnowledgeSet({"kd": KD(0.5, 2.0)}), (1, 0): KnowledgeSet({"kd": KD(0.5, 2.0)})}
    return PeerGroup(peers), edges


def test_mutual_updates_every_peer_and_targets_carry_no_gradient():
    group, edges = _tiny_peers()
    stage = MutualStage(group, edges)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    loss, logits, _ = stage.training_step(x, Step(y))
    # gradient of peer 1's KL part alone: it must not reach peer 2 through the target
    s0 = group.peers[0](x)
    with torch.no_grad():
        s1 = group.peers[1](x)
    kd = KD(0.5, 2.0)({"logits": s0}, {"logits": s1}, Step(y))
    kd.backward()
    assert all(p.grad is None for p in group.peers[1].parameters())
    group.zero_grad(set_to_none=True)
    loss.backward()
    for peer in group.peers:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in peer.parameters())
    # and the stage itself detaches targets: peer 2's gradient equals that of its own loss alone
    g_total = group.peers[1].classifier.weight.grad.clone()
    group.zero_grad(set_to_none=True)
    out0 = group.peers[0](x).detach()
    own = edges[(1, 0)]({"logits": group.peers[1](x)}, {"logits": out0}, Step(y))[0]
    own.backward()
    assert torch.allclose(group.peers[1].classifier.weight.grad, g_total, atol=1e-6)


def test_born_again_generations_fresh_and_taught_by_the_previous(compose_tiny, tmp_path, monkeypatch):
    from kdrun.runtime import Distiller, ModelFactory

    built, taught = [], []
    original_build = ModelFactory.build
    original_distill = Distiller.distill

    def build(self, node, seed=None):
        model = original_build(self, node, seed)
        if not self.dry:  # the preflight's models are stand-ins
            built.append((seed, {k: v.clone() for k, v in model.state_dict().items()}))
        return model

    def distill(self, student, teacher, node, **kw):
        if not self.dry:
            taught.append((kw.get("name"), {k: v.clone() for k, v in teacher.state_dict().items()}))
        return original_distill(self, student, teacher, node, **kw)

    monkeypatch.setattr(ModelFactory, "build", build)
    monkeypatch.setattr(Distiller, "distill", distill)
    cfg, ov = compose_tiny("scheme=born_again", "scheme.generations=2", "loss=kd")
    summary = run(cfg, run_dir=tmp_path / "r", overrides=ov)
    assert summary["status"] == "ok"
    for key in ("gen0_top1", "gen1_top1", "gen2_top1", "ensemble_top1", "student_top1_best"):
        assert summary[key] is not None
    assert [name for name, _ in taught] == ["gen1", "gen2"]
    # generation 2 is taught by generation 1 as stored after its training
    gen1 = read_checkpoint(summary["gen1_source"])["state_dict"]
    assert all(torch.equal(taught[1][1][k].cpu(), gen1[k]) for k in gen1)
    # generation k starts from its own initialisation, not from generation k-1's weights
    seeds = [s for s, _ in built]
    assert 1 in seeds and 2 in seeds  # seed + k with seed 0
    init_gen2 = next(sd for s, sd in built if s == 2)
    assert not torch.equal(init_gen2["classifier.weight"].cpu(), gen1["classifier.weight"])
    stages = [r["stage"] for r in rows(tmp_path / "r")]
    assert stages.index("gen0") < stages.index("gen1") < stages.index("gen2")


def test_byot_reports_every_exit_and_saves_the_plain_student(compose_tiny, tmp_path):
    cfg, ov = compose_tiny("scheme=byot", "student=resnet14", "loss=kd")
    summary = run(cfg, run_dir=tmp_path / "r", overrides=ov)
    assert summary["status"] == "ok" and summary["exits"] == 3
    for key in ("exit1_top1_best", "exit2_top1_best", "exit3_top1_best", "ensemble_top1_best"):
        assert summary[key] is not None
    assert summary["student_top1_best"] == summary["exit3_top1_best"]
    saved = read_checkpoint(tmp_path / "r" / "checkpoints" / "best.pt")
    fresh = create_model("resnet14", 10, 3, 16)
    assert set(saved["state_dict"]) == set(fresh.state_dict())  # no exit heads in the saved student
    header = rows(tmp_path / "r")[0]
    assert "loss_byot_hint" in header and "loss_kd" in header


def test_byot_rejects_feature_terms(compose_tiny, tmp_path):
    cfg, ov = compose_tiny("scheme=byot", "loss=kd+fitnet")
    with pytest.raises(ConfigError, match="'fitnet' reads features"):
        run(cfg, run_dir=tmp_path / "r", overrides=ov)
