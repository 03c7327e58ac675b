"""Teacher-output cache: the second run of a sweep skips the teacher and trains exactly the same."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch

from kdrun.engine.cache import TeacherCache, compress_topk, expand_topk
from kdrun.run import run
from kdrun.runtime import cache_policy
from kdrun.schemes import stages
from tests.conftest import tiny


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


# ---------------------------------------------------------------------------------------------- exact under AMP
def cached_dtypes(root) -> dict:
    files = sorted(root.glob("*/epoch*.pt"))
    return torch.load(files[0], weights_only=True)["dtypes"] if files else {}


def exact_under_amp(compose_tiny, tmp_path, monkeypatch, *extra):
    calls = count_teacher_forwards(monkeypatch)
    base = ["trainer.epochs=2", "loss=kd+fitnet", *extra]
    cfg, ov = compose_tiny(*base)
    plain = run(cfg, run_dir=tmp_path / "plain", overrides=ov)
    cfg, ov = compose_tiny(*base, "teacher.cache=true")
    run(cfg, run_dir=tmp_path / "first", overrides=ov)
    before = calls["n"]
    second = run(cfg, run_dir=tmp_path / "second", overrides=ov)
    assert calls["n"] == before and second["teacher_batches_cached"] == 4 and second["teacher_batches_computed"] == 0
    assert losses(tmp_path / "plain") == losses(tmp_path / "second")  # bit-for-bit the computed outputs
    assert plain["student_top1_last"] == second["student_top1_last"]
    return cached_dtypes(tmp_path / "outputs" / "cache")


def test_cache_is_exact_under_bf16_autocast(compose_tiny, tmp_path, monkeypatch):
    """cache_dtype=auto keeps what autocast computed (bf16 logits and features): reading it back
    trains exactly as computing it (fp16 storage would round bf16's 8-bit exponent range)."""
    assert exact_under_amp(compose_tiny, tmp_path, monkeypatch, "trainer.amp=bf16") == {
        "logits": "bfloat16", "stage2": "bfloat16"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cache_is_exact_under_amp_on_cuda(compose_tiny, tmp_path, monkeypatch, amp):
    """On the GPU: bf16 autocast, and fp16 autocast with the grad scaler."""
    dtypes = exact_under_amp(compose_tiny, tmp_path, monkeypatch, "trainer.device=cuda", f"trainer.amp={amp}")
    assert set(dtypes.values()) == {"bfloat16" if amp == "bf16" else "float16"}


def test_an_explicit_storage_dtype_is_converted_back_to_the_computed_one(tmp_path):
    cache = TeacherCache(tmp_path, {"k": 3}, torch.device("cpu"), torch.float16)
    out = {"logits": (torch.randn(4, 10) * 4).bfloat16(),
           "stage2": torch.randn(4, 8, 2, 2).contiguous(memory_format=torch.channels_last)}
    cache.lookup(0, 0)
    cache.store(0, 0, out)
    cache.end_epoch(0)
    back = TeacherCache(tmp_path, {"k": 3}, torch.device("cpu"), torch.float16).lookup(0, 0)
    assert back["logits"].dtype == torch.bfloat16 and torch.equal(back["logits"], out["logits"])  # fits fp16
    assert back["stage2"].dtype == torch.float32 and back["stage2"].is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(back["stage2"], out["stage2"], rtol=1e-3) and not torch.equal(back["stage2"], out["stage2"])


# ---------------------------------------------------------------------------------------------- the sweep default
def in_sweep(monkeypatch, swept, job_keys=None):
    monkeypatch.setattr(cache_policy, "sweep_context", lambda: (list(swept), list(job_keys or swept)))


def test_a_sweep_over_student_side_keys_pays_for_the_teacher_once(compose_tiny, tmp_path, monkeypatch):
    calls = count_teacher_forwards(monkeypatch)
    in_sweep(monkeypatch, ["seed", "loss.kd.temperature", "loss.kd.alpha"])  # the seed: groups that share
    summaries = []
    for k, (t, a) in enumerate([(4, 0.9), (2, 0.5)]):
        cfg, ov = compose_tiny("trainer.epochs=2", f"loss.kd.temperature={t}", f"loss.kd.alpha={a}")
        summaries.append(run(cfg, run_dir=tmp_path / f"job{k}", overrides=ov))
    assert calls["n"] == 4  # 2 epochs x 2 batches, all in the first job
    assert [(s["teacher_batches_cached"], s["teacher_batches_computed"]) for s in summaries] == [(0, 4), (4, 0)]
    # the same jobs outside a sweep: no cache, no counts
    monkeypatch.setattr(cache_policy, "sweep_context", lambda: None)
    cfg, ov = compose_tiny("trainer.epochs=2")
    assert "teacher_batches_cached" not in run(cfg, run_dir=tmp_path / "single", overrides=ov)


@pytest.mark.parametrize("swept, job_keys, extra", [
    (["seed", "teacher"], None, ()),  # another teacher or other batches in every job
    (["loss.kd.temperature"], ["loss.kd.temperature", "teacher.cache"], ("teacher.cache=false",)),  # said so
    (["loss.kd.temperature"], None, ("teacher.cache_topk=3",)),  # not exact
])
def test_no_cache_by_default_where_it_would_not_be_shared_or_exact(compose_tiny, tmp_path, monkeypatch, swept,
                                                                   job_keys, extra):
    in_sweep(monkeypatch, swept, job_keys)
    cfg, ov = compose_tiny(*extra)
    assert "teacher_batches_cached" not in run(cfg, run_dir=tmp_path / "job", overrides=ov)
    assert not (tmp_path / "outputs" / "cache").exists()


def test_which_swept_keys_let_jobs_share_the_teachers_outputs(compose_tiny, tmp_path):
    cfg, _ = compose_tiny()
    shared = lambda keys, node=cfg.teacher: cache_policy.sharing_key(cfg, node, keys)  # noqa: E731
    for key in ("loss", "loss.kd.temperature", "ce_weight", "student", "student.lr", "trainer.eval_every"):
        assert shared(["seed", key]) == key  # the seeds split the jobs into groups that share
    for key in ("seed", "teacher", "teacher.lr", "dataset.n_train", "trainer.batch_size", "trainer.amp",
                "hydra.launcher.n_jobs", "optim.lr", "trainer.epochs"):  # optim, epochs: the store teacher's recipe
        assert shared([key]) is None, key
    given = compose_tiny("teacher.checkpoint=/x.pt")[0].teacher
    assert shared(["seed", "optim.lr"], given) == "optim.lr"  # a given teacher stays the same


def test_swept_keys_come_from_multirun_yaml(tmp_path):
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task: ['loss.kd.temperature=1,2', 'seed=0', 'loss=glob([kd,dist])',"
        " 'student=range(1,3)']\n  sweeper:\n    params:\n      loss.kd.alpha: interval(0.1, 0.9)\n")
    assert cache_policy.swept_keys(tmp_path / "multirun.yaml") == [
        "loss.kd.alpha", "loss.kd.temperature", "loss", "student"]
    assert cache_policy.swept_keys(tmp_path / "missing.yaml") is None


def test_a_real_multirun_reports_the_saving_in_results_csv(tmp_path):
    """`kdrun -m` over two temperatures: the first job computes every teacher batch, the second reads them."""
    args = tiny(tmp_path, "trainer.threads=1", f"hydra.sweep.dir={tmp_path / 'sweep'}", "loss.kd.temperature=2,4")
    proc = subprocess.run([sys.executable, "-m", "kdrun", "-m", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "sweep" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["teacher_batches_cached"], r["teacher_batches_computed"]) for r in rows] == [("0", "2"), ("2", "0")]
    assert "teacher outputs: 2 of 4 batches read from the cache, computed for 2" in proc.stdout
