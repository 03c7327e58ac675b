"""Data parallel on CPU (gloo, 2 processes): the same optimisation as one process at the same global batch.

Two levels:
- the Trainer in two spawned processes against the Trainer in this one, on a stage that trains a
  model, an extra module, a parameter no module holds, and an extra module no step uses (DDP must
  still finish such steps). Without BatchNorm the two ranks' shares make exactly the one-process
  gradient (unequal shares weighed by their size), so weights, losses and scores agree to float
  rounding; with BatchNorm they agree within the noise of per-share batch statistics. Either way the
  two ranks end with identical weights and BatchNorm statistics.
- `torchrun --nproc_per_node=2 -m kdrun` against `python -m kdrun`: one run dir, the same loss curve
  within BatchNorm noise.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F

from kdrun.config import compose, trainer_factories
from kdrun.data import build_data
from kdrun.data.augment import make_epoch_plan, shard_plan
from kdrun.engine import distributed as dist
from kdrun.engine.trainer import Trainer
from kdrun.run import validate_run_config
from kdrun.schemes.stages import SupervisedStage
from tests.conftest import tiny

# ---------------------------------------------------------------------------------------------- sharding


def test_shards_of_an_epoch_plan_are_the_one_process_batches():
    plan = make_epoch_plan(41, 9, seed=3, epoch=2, pad=4, hflip=True, drop_last=False)
    parts = [shard_plan(plan, r, 2) for r in range(2)]
    # batches 9,9,9,9,5: shares 4+5 and 2+3 (the last batch's smallest share still holds two images)
    assert [len(p.bounds) for p in parts] == [5, 5]
    for b, (start, stop) in enumerate(plan.bounds):
        pieces = [(p.order[slice(*p.bounds[b])], p.dx[slice(*p.bounds[b])], p.flip[slice(*p.bounds[b])])
                  for p in parts]
        assert torch.equal(torch.cat([o for o, _, _ in pieces]), plan.order[start:stop])
        assert torch.equal(torch.cat([d for _, d, _ in pieces]), plan.dx[start:stop])
        for p, (_, _, flip) in zip(parts, pieces):  # mirrored samples first within each share
            assert flip[: p.n_flip[b]].all() and not flip[p.n_flip[b]:].any()
    three = [shard_plan(plan, r, 3) for r in range(3)]
    assert [len(p.bounds) for p in three] == [4, 4, 4]  # 5 // 3 < 2: the short batch is left out everywhere


def test_sharded_data_module_augments_only_its_share(compose_tiny):
    cfg, _ = compose_tiny("dataset.n_train=40")
    whole = build_data(cfg.dataset, batch_size=9, device="cpu", seed=0)
    shards = [build_data(cfg.dataset, batch_size=9, device="cpu", seed=0) for _ in range(2)]
    for r, d in enumerate(shards):
        d.shard(r, 2)
    assert whole.steps_per_epoch == shards[0].steps_per_epoch == 5
    per_rank = [list(d.train_batches(1, with_index=True)) for d in shards]
    for i, (x, y, index) in enumerate(whole.train_batches(1, with_index=True)):
        xs = torch.cat([per_rank[r][i][0] for r in range(2)])
        assert torch.equal(xs, x) and torch.equal(torch.cat([per_rank[r][i][2] for r in range(2)]), index)
    factors = [shards[0].share_factor(0), shards[1].share_factor(0)]
    assert factors == pytest.approx([8 / 9, 10 / 9]) and shards[0].share_factor(4) == 1.0


# ---------------------------------------------------------------------------------------------- Trainer + DDP
class Net(nn.Module):
    def __init__(self, norm: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8) if norm else nn.Identity()
        self.fc = nn.Linear(8, 10)

    def features(self, x):
        return F.adaptive_avg_pool2d(F.relu(self.norm(self.conv(x))), 1).flatten(1)

    def forward(self, x):
        return self.fc(self.features(x))


class ProbeStage(SupervisedStage):
    """Trains the model but fc.bias (left to DDP's ignore list), an extra head, a loose scale, and an
    extra module that no step uses."""

    def __init__(self, model: Net) -> None:
        super().__init__(model, "probe")
        self.head, self.idle = nn.Linear(8, 10), nn.Linear(2, 2)
        self.scale = nn.Parameter(torch.ones(()))

    def parameters_to_train(self):
        model = [p for n, p in self.model.named_parameters() if n != "fc.bias"]
        return model + list(self.head.parameters()) + list(self.idle.parameters()) + [self.scale]

    def train(self) -> None:
        self.model.train()
        self.head.train()

    def training_step(self, x, step):
        feats = self.model.features(x)
        logits = self.model.fc(feats)
        aux = self.head(feats) * self.scale
        ce = F.cross_entropy(logits, step.targets)
        loss = ce + 0.5 * F.cross_entropy(aux, step.targets)
        return loss, logits, {"loss_ce": ce.detach()}

    def extra_modules(self):
        return {"head": self.head, "idle": self.idle}


def fit_probes(cfg, world) -> dict:
    """Train the BN-free and the BatchNorm probe for 2 epochs; their weights, buffers and history."""
    data = build_data(cfg.dataset, batch_size=int(cfg.trainer.batch_size), eval_batch_size=16, device="cpu",
                      seed=0)
    out = {}
    for norm in (False, True):
        torch.manual_seed(1)
        stage = ProbeStage(Net(norm))
        trainer = Trainer(cfg, data, torch.device("cpu"), None, **trainer_factories(cfg), world=world)
        fit = trainer.fit(stage, epochs=2, lr=0.2, ckpt_dir=None)
        state = {f"model.{k}": v for k, v in stage.model.state_dict().items()}
        state.update({f"head.{k}": v for k, v in stage.head.state_dict().items()}, scale=stage.scale.detach())
        rows = [{k: r[k] for k in ("train_loss", "test_loss", "test_top1", "train_top1")} for r in fit.history]
        out[norm] = {"state": state, "history": rows}
    return out


def _rank(rank: int, cfg, path) -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{path}/rendezvous", rank=rank, world_size=2)
    try:
        torch.save(fit_probes(cfg, dist.World(rank, 2, rank)), path / f"rank{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp")
    cfg = compose(tiny(path, "dataset.n_train=40", "trainer.batch_size=9", "trainer.limit_train_batches=null",
                       "optim.momentum=0.9", "sched=cosine"))
    # fork: the ranks start with this process's imports (one torch thread each: nothing to break)
    torch.multiprocessing.start_processes(_rank, args=(cfg, path), nprocs=2, start_method="fork")
    return fit_probes(cfg, dist.SINGLE), [torch.load(path / f"rank{r}.pt") for r in range(2)]


def test_ranks_end_with_identical_weights_and_batchnorm_statistics(probes):
    _, ranks = probes
    for norm in (False, True):
        a, b = ranks[0][norm]["state"], ranks[1][norm]["state"]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
        assert ranks[0][norm]["history"] == ranks[1][norm]["history"]  # reduced metrics: the same on both


def test_two_ranks_without_batchnorm_equal_one_process(probes):
    """Unequal shares (4 + 5 of each batch of 9) weighed by size: the one-process gradient exactly."""
    one, ranks = probes
    single, ddp = one[False], ranks[0][False]
    for k, v in single["state"].items():
        assert torch.allclose(ddp["state"][k], v, rtol=1e-5, atol=1e-6), k
    assert not torch.equal(single["state"]["model.fc.weight"], torch.zeros(10, 8))
    for r1, r2 in zip(single["history"], ddp["history"], strict=True):
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=1e-5)
        assert r2["test_loss"] == pytest.approx(r1["test_loss"], rel=1e-5)
        assert r2["test_top1"] == r1["test_top1"] and r2["train_top1"] == r1["train_top1"]


def test_two_ranks_with_batchnorm_are_within_batch_statistics_noise(probes):
    """Per-share batch statistics change the steps a little: 1 % on the train and the test loss."""
    one, ranks = probes
    single, ddp = one[True], ranks[0][True]
    for r1, r2 in zip(single["history"], ddp["history"], strict=True):
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=0.01)
        assert r2["test_loss"] == pytest.approx(r1["test_loss"], rel=0.01)


def test_data_parallel_is_the_plain_step_in_one_process():
    stage = ProbeStage(Net(False))
    assert dist.data_parallel(stage.training_step, [stage.model], stage.parameters_to_train(), dist.SINGLE) \
        == stage.training_step


# ---------------------------------------------------------------------------------------------- torchrun
torchrun = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")


def run_cli(cwd, launcher, *args):
    proc = subprocess.run([*launcher, "-m", "kdrun", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dirs = sorted((cwd / "outputs" / "runs").glob("*/*"))
    return proc, dirs


def metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@torchrun
def test_torchrun_two_processes_match_one_and_write_one_run_dir(tmp_path):
    """KD with a FitNet regressor (an adapter with BatchNorm) in 2 processes against one, per epoch of
    the teacher's and the student's training: cross-entropy within 1 %, the total train loss within
    5 % (the hint loss goes through the regressor's BatchNorm, which sees 16 images per rank instead
    of 32: the noisiest part), final accuracy within 5 points."""
    args = tiny(tmp_path, "loss=kd+fitnet", "trainer.epochs=2", "trainer.limit_train_batches=3", "trainer.threads=1",
                "trainer.eval_batch_size=16")
    args = [a for a in args if not a.startswith("paths.output_root")]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    _, dirs_one = run_cli(one, [sys.executable], *args)
    proc, dirs_two = run_cli(two, ["torchrun", "--nproc_per_node=2"], *args)
    assert len(dirs_two) == 1  # only rank 0 writes
    assert proc.stdout.count("status ok") == 1  # and only rank 0 prints the final table
    s1 = json.loads((dirs_one[0] / "summary.json").read_text())
    s2 = json.loads((dirs_two[0] / "summary.json").read_text())
    assert s2["status"] == "ok" and s2["world_size"] == 2
    assert s2["student_top1_last"] == pytest.approx(s1["student_top1_last"], abs=5.0)
    m1, m2 = metrics(dirs_one[0]), metrics(dirs_two[0])
    assert [(r["stage"], r["epoch"]) for r in m1] == [(r["stage"], r["epoch"]) for r in m2]
    assert len([r for r in m2 if r["stage"] == "student"]) == 2
    for r1, r2 in zip(m1, m2):
        assert float(r2["loss_ce"]) == pytest.approx(float(r1["loss_ce"]), rel=0.01), r1["stage"]
        assert float(r2["train_loss"]) == pytest.approx(float(r1["train_loss"]), rel=0.05), r1["stage"]


# ---------------------------------------------------------------------------------------------- the GPU check
REPO = Path(__file__).resolve().parents[1]
GPU_STEPS = ["device", "cuda-tests", "amp-bf16", "amp-fp16-scaler", "torchrun-1gpu", "epoch-50k", "bench-eager",
             "bench-compile", "bench-cuda-graphs"]


def test_gpu_check_dry_run_prints_valid_commands(tmp_path):
    """scripts/gpu_check.sh parses (bash -n), and --dry-run lists its steps without a GPU: every kdrun
    command's overrides compose and pass kdrun's checks, every bench.py command line parses."""
    script = REPO / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    proc = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")})
    assert proc.returncode == 0, proc.stderr
    steps = {line[3:].split(" ", 1)[0]: shlex.split(line.split("): ", 1)[1])
             for line in proc.stdout.splitlines() if line.startswith("== ")}
    assert list(steps) == GPU_STEPS and not (tmp_path / "out").exists()  # a dry run writes nothing
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    modes = set()
    for name, cmd in steps.items():
        if "kdrun" in cmd:
            overrides = cmd[cmd.index("kdrun") + 1:]
            validate_run_config(compose([o.replace("trainer.device=cuda", "trainer.device=cpu") for o in overrides]))
        if "scripts/bench.py" in cmd:
            args = bench.parse_args(cmd[cmd.index("scripts/bench.py") + 1:])
            assert (args.device, args.batch, args.big_batch) == ("cuda", 64, 256)
            modes.add(args.mode)
    assert modes == {"eager", "compile", "cuda-graphs"}
    assert "--nproc_per_node=1" in steps["torchrun-1gpu"] and "trainer.amp=fp16" in steps["amp-fp16-scaler"]


def test_a_task_of_a_several_task_submitit_job_is_a_rank(monkeypatch):
    """The slurm launcher with tasks_per_node > 1: submitit's view of the job becomes torch's env://
    variables (its API: submitit e49d5e7, submitit/helpers.py TorchDistributedEnvironment.export)."""
    calls = []

    class JobEnvironment:
        num_tasks = 4

    class TorchDistributedEnvironment:
        def export(self, set_cuda_visible_devices=True):
            calls.append(set_cuda_visible_devices)
            for key, value in dict(WORLD_SIZE="4", RANK="2", LOCAL_RANK="0", MASTER_ADDR="n1").items():
                monkeypatch.setenv(key, value)
            return self

    submitit, helpers = types.ModuleType("submitit"), types.ModuleType("submitit.helpers")
    submitit.JobEnvironment, helpers.TorchDistributedEnvironment = JobEnvironment, TorchDistributedEnvironment
    monkeypatch.setitem(sys.modules, "submitit", submitit)
    monkeypatch.setitem(sys.modules, "submitit.helpers", helpers)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert dist.env_world() == dist.SINGLE  # not a submitit task
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    JobEnvironment.num_tasks = 1
    assert dist.env_world() == dist.SINGLE and calls == []  # a sweep job: one task
    JobEnvironment.num_tasks = 4
    assert dist.env_world() == dist.World(rank=2, size=4, local_rank=0)
    assert calls == [False]  # every GPU stays visible: the rank picks cuda:<LOCAL_RANK>
