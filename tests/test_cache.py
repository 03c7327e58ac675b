"""Teacher-output cache: the second run of a sweep skips the teacher and trains exactly the same."""

from __future__ import annotations

import csv

import pytest
import torch

from kdrun.engine.cache import TeacherCache, compress_topk, expand_topk
from kdrun.run import run
from kdrun.schemes import stages


def losses(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return [(r["stage"], r["train_loss"], r["loss_kd"]) for r in csv.DictReader(f) if r["stage"] == "student"]


def count_teacher_forwards(monkeypatch):
    calls = {"n": 0}
    original = stages.tapped_forward

    def counting(model, x, taps):
        if not model.training and x.shape[0] > 2:  # the frozen teacher (the student trains), outside the
            calls["n"] += 1                         # preflight's one two-image step
        return original(model, x, taps)

    monkeypatch.setattr(stages, "tapped_forward", counting)
    return calls


@pytest.mark.parametrize("loss", ["kd", "kd+fitnet"])
def test_second_run_reads_the_cache_and_trains_identically(compose_tiny, tmp_path, monkeypatch, loss):
    calls = count_teacher_forwards(monkeypatch)
    base = ["trainer.epochs=2", f"loss={loss}"]
    cfg, ov = compose_tiny(*base)
    plain = run(cfg, run_dir=tmp_path / "plain", overrides=ov)
    n_plain = calls["n"]
    cfg, ov = compose_tiny(*base, "teacher.cache=true")
    run(cfg, run_dir=tmp_path / "first", overrides=ov)
    n_first = calls["n"] - n_plain
    second = run(cfg, run_dir=tmp_path / "second", overrides=ov)
    n_second = calls["n"] - n_plain - n_first
    assert n_first == n_plain == 4  # 2 epochs x 2 batches
    assert n_second == 0  # every teacher output came from the cache
    assert losses(tmp_path / "plain") == losses(tmp_path / "first") == losses(tmp_path / "second")
    assert plain["student_top1_last"] == second["student_top1_last"]
    assert len(list((tmp_path / "outputs" / "cache").glob("*/epoch*.pt"))) == 2


def test_cache_key_separates_augmentation_seeds_and_extends_short_epochs(compose_tiny, tmp_path, monkeypatch):
    from kdrun.engine.checkpoint import save_checkpoint
    from kdrun.models import create_model

    save_checkpoint(tmp_path / "t.pt", create_model("resnet8", 10, 3, 16))
    fixed = (f"teacher.checkpoint={tmp_path / 't.pt'}", "teacher.cache=true")
    calls = count_teacher_forwards(monkeypatch)
    cfg, ov = compose_tiny(*fixed)
    run(cfg, run_dir=tmp_path / "a", overrides=ov)
    before = calls["n"]
    cfg, ov = compose_tiny(*fixed, "seed=1")  # other crops and flips: other entries
    run(cfg, run_dir=tmp_path / "b", overrides=ov)
    assert calls["n"] - before == 2
    # a longer epoch than the one cached: the cached batches are read, the others computed and added
    before = calls["n"]
    cfg, ov = compose_tiny(*fixed, "trainer.limit_train_batches=4")
    run(cfg, run_dir=tmp_path / "c", overrides=ov)
    assert calls["n"] - before == 2
    before = calls["n"]
    run(cfg, run_dir=tmp_path / "d", overrides=ov)
    assert calls["n"] - before == 0


def test_topk_keeps_the_top_probabilities_exactly():
    torch.manual_seed(0)
    logits = torch.randn(6, 20) * 3
    rebuilt = expand_topk(compress_topk(logits, 5), 20)
    p, q = torch.softmax(logits, 1), torch.softmax(rebuilt, 1)
    top = logits.topk(5, dim=1).indices
    assert torch.allclose(p.gather(1, top), q.gather(1, top), atol=2e-3)  # fp16 storage of the values
    assert torch.allclose(q.sum(1), torch.ones(6), atol=1e-5)
    rest = torch.ones_like(q, dtype=torch.bool).scatter_(1, top, False)
    spread = q[rest].view(6, 15)
    assert torch.allclose(spread, spread[:, :1].expand_as(spread), atol=1e-6)  # the rest is uniform


def test_cache_store_and_lookup_roundtrip(tmp_path):
    cache = TeacherCache(tmp_path, {"k": 1}, torch.device("cpu"), torch.float32)
    outs = [{"logits": torch.randn(4, 10)}, {"logits": torch.randn(3, 10)}]
    for b, out in enumerate(outs):
        assert cache.lookup(0, b) is None
        cache.store(0, b, out)
    cache.end_epoch(0)
    again = TeacherCache(tmp_path, {"k": 1}, torch.device("cpu"), torch.float32)
    for b, out in enumerate(outs):
        assert torch.equal(again.lookup(0, b)["logits"], out["logits"])
    assert TeacherCache(tmp_path, {"k": 2}, torch.device("cpu"), torch.float32).lookup(0, 0) is None
