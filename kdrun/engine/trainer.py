"""The training loop: a stage asks for nothing but ``training_step(x, step)``.

Per step: autocast forward (bf16/fp16, KD math in fp32 inside the terms), backward (grad scaler for
fp16), optimizer step, with running sums kept on the device (no host sync inside the step except
every ``log_every`` steps for the live bar). Per epoch: evaluation, one metrics row, last and best
checkpoints. ``resume`` continues from ``last.pt``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.engine import distributed as dist
from kdrun.engine.checkpoint import load_into, read_checkpoint, save_checkpoint
from kdrun.engine.metrics import MetricsWriter
from kdrun.engine.progress import EpochProgress
from kdrun.engine.schedule import build_optimizer, build_schedule
from kdrun.errors import CheckpointError, DivergedError
from kdrun.faults import fault_point
from kdrun.knowledge.base import Step

log = logging.getLogger("kdrun")

NO_SCORE = {"test_loss": float("nan"), "test_top1": float("nan"), "test_top5": float("nan")}
#: a step loss this many times the stage's first step loss (and above it as a number) means divergence
EXPLODING = 1e4


class Stage(Protocol):
    """What the trainer needs from a scheme's stage (kdrun.schemes.stages.SupervisedStage is the base
    every stage extends, with the defaults of the optional parts)."""

    name: str
    model: nn.Module  # the model checkpointed (the student)
    eval_each_epoch: bool  # False: score only after the last epoch (init stages)
    primary: str | None  # which output of a several-output eval model is "the student" (None: the only one)

    def parameters_to_train(self) -> list[nn.Parameter]: ...
    def train(self) -> None: ...
    def training_step(self, x: torch.Tensor, step: Step): ...
    def eval_model(self) -> nn.Module: ...  # what evaluation scores (the model, or every exit/peer at once)
    def end_epoch(self, epoch: int) -> None: ...
    def extra_modules(self) -> dict[str, nn.Module]: ...  # trained beside the model: saved for resuming
    def extra_state(self) -> dict: ...
    def load_extra_state(self, state: dict) -> None: ...


@dataclass
class FitResult:
    top1_best: float = float("nan")
    top1_last: float = float("nan")
    top5_best: float = float("nan")
    top5_last: float = float("nan")
    best_epoch: int = 0
    epochs: int = 0
    train_seconds: float = 0.0
    images_per_second: float = float("nan")
    history: list[dict] = field(default_factory=list)
    models: dict[str, "FitResult"] = field(default_factory=dict)  # per model/exit when several are scored

    def state(self) -> dict:
        """Everything recorded so far (saved in last.pt): a resumed fit then reports best/last
        accuracies, best epochs, per-model results, seconds and images/s as if it never stopped."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> FitResult:
        models = {name: cls.from_state(sub) for name, sub in state.get("models", {}).items()}
        return cls(**{**state, "models": models})

    def as_summary(self, prefix: str) -> dict:
        return {
            f"{prefix}_top1_best": self.top1_best,
            f"{prefix}_top1_last": self.top1_last,
            f"{prefix}_top5_best": self.top5_best,
            f"{prefix}_best_epoch": self.best_epoch,
            f"{prefix}_train_seconds": round(self.train_seconds, 3),
            f"{prefix}_images_per_second": self.images_per_second,
        }


class Trainer:
    def __init__(self, cfg, data, device: torch.device, amp_dtype: torch.dtype | None, progress: bool = False,
                 world: dist.World = dist.SINGLE, dry: bool = False):
        """``cfg``: the full run config (reads trainer, optim, sched). ``data``: a DataModule.
        ``world``: the data-parallel processes (each takes its share of every batch). ``dry``: the
        preflight: :meth:`fit` takes one step on two images, :meth:`evaluate` scores two images."""
        self.cfg = cfg
        self.tcfg = cfg.trainer
        self.data = data
        self.device = device
        self.amp_dtype = amp_dtype
        self.world = world
        self.dry = dry
        self.progress = progress and world.is_main and not dry

    # ------------------------------------------------------------------ helpers
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def steps_per_epoch(self) -> int:
        steps = self.data.steps_per_epoch
        limit = self.tcfg.limit_train_batches
        return min(steps, int(limit)) if limit is not None else steps

    def evaluate(self, model: nn.Module) -> dict:
        """Test loss, top-1 and top-5 (percent) of ``model`` on the test split.

        A model whose forward returns a dict of logits (several exits, peers, an ensemble) is
        scored per entry: the result is then ``{name: {"test_loss": .., ...}}``.
        """
        scores = self._evaluate_outputs(model)
        return scores[None] if list(scores) == [None] else scores

    @torch.inference_mode()
    def _evaluate_outputs(self, model: nn.Module) -> dict:
        """Every evaluation (per epoch in :meth:`fit`, or of a trained model) runs here, under
        inference mode: no autograd graph is kept, so scoring 10,000 images costs one batch's memory."""
        was_training = model.training
        model.eval()
        limit = 1 if self.dry else self.tcfg.limit_eval_batches
        sums: dict = {}
        n = 0
        world = self.world
        n_batches = self.data.eval_steps if limit is None else min(int(limit), self.data.eval_steps)
        shard = world.active and n_batches >= world.size and not self.dry  # each rank scores every size-th batch
        for i, (x, y) in enumerate(self.data.eval_batches()):
            if limit is not None and i >= int(limit):
                break
            if shard and i % world.size != world.rank:
                continue
            if self.dry:
                x, y = x[:2], y[:2]
            with self.autocast():
                out = model(x)
            outputs = out if isinstance(out, dict) else {None: out}
            for name, logits in outputs.items():
                logits = logits.float()
                acc = sums.setdefault(name, torch.zeros(3, device=self.device, dtype=torch.float64))
                k = min(5, logits.shape[1])
                hit = logits.topk(k, dim=1).indices.eq(y[:, None])
                acc[0] += F.cross_entropy(logits, y, reduction="sum").double()
                acc[1] += hit[:, 0].sum()
                acc[2] += hit.any(dim=1).sum()
            n += y.numel()
        model.train(was_training)
        if shard:
            n = int(dist.all_reduce_sum(torch.tensor([n], device=self.device), world).item())
            for name in sorted(sums, key=str):
                dist.all_reduce_sum(sums[name], world)
        if n == 0:
            return {None: dict(NO_SCORE)}
        return {
            name: {"test_loss": a[0].item() / n, "test_top1": 100.0 * a[1].item() / n, "test_top5": 100.0 * a[2].item() / n}
            for name, a in sums.items()
        }

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        stage: Stage,
        *,
        epochs: int,
        lr: float,
        ckpt_dir: Path | None,
        metrics: Sequence[MetricsWriter] = (),
        resume: bool = False,
        label: str | None = None,
    ) -> FitResult:
        """Train ``stage`` for ``epochs`` epochs at base learning rate ``lr``."""
        if self.dry:
            return self._dry_step(stage, epochs, lr)
        label = label or stage.name
        steps = self.steps_per_epoch()
        world = self.world
        params = stage.parameters_to_train()
        optimizer = build_optimizer(params, self.cfg.optim, lr)
        schedule = build_schedule(self.cfg.sched, lr, epochs, steps)
        scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        result = FitResult(epochs=epochs)
        start = 0
        last_path = ckpt_dir / "last.pt" if ckpt_dir is not None else None
        if resume and last_path is not None and last_path.is_file():
            start = self._resume(stage, optimizer, last_path, result)
            log.info("%s: resuming after epoch %d from %s", label, start, last_path)
        for m in metrics:  # rows of epochs after the checkpoint (a killed run) are trained again
            m.truncate(stage.name, start)
        log_every = max(1, int(self.tcfg.log_every))
        first_loss = None

        with EpochProgress(self.progress) as bar:
            for epoch in range(start, epochs):
                stage.train()
                bar.start(f"{label} {epoch + 1}/{epochs}", steps)
                t0 = time.perf_counter()
                loss_sum = torch.zeros((), device=self.device)
                loss_max = torch.zeros((), device=self.device)
                correct: dict = {}
                term_sums: dict[str, torch.Tensor] = {}
                seen = 0
                lr_now = lr
                for i, (x, y, index) in enumerate(self.data.train_batches(epoch, with_index=True)):
                    if i >= steps:
                        break
                    lr_now = schedule(epoch, i)
                    for group in optimizer.param_groups:
                        group["lr"] = lr_now
                    if world.active:
                        share = dist.local_slice(y.shape[0], world)
                        x, y, index = x[share], y[share], index[share]
                    with self.autocast():
                        loss, logits, logs = stage.training_step(
                            x, Step(targets=y, index=index, epoch=epoch + i / steps, epochs=epochs, batch=i)
                        )
                    optimizer.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        dist.average_gradients(params, world)
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        loss.backward()
                        dist.average_gradients(params, world)
                        optimizer.step()
                    fault_point("step")
                    b = y.shape[0]
                    seen += b
                    loss_sum += loss.detach().float() * b
                    loss_max = torch.maximum(loss_max, loss.detach().float())
                    if first_loss is None:
                        first_loss = loss.detach().float().clone()
                    for name, out in (logits.items() if isinstance(logits, dict) else [(None, logits)]):
                        hits = (out.detach().argmax(dim=1) == y).sum()
                        correct[name] = correct[name] + hits if name in correct else hits
                    for k, v in logs.items():
                        term_sums[k] = term_sums.get(k, 0.0) + v.float() * b
                    if bar.enabled and (i + 1) % log_every == 0:
                        first = next(iter(correct.values()))
                        bar.update(i + 1, f"loss {loss_sum.item() / seen:.3f}  acc {100.0 * first.item() / seen:.1f}%")
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                train_seconds = time.perf_counter() - t0
                stage.end_epoch(epoch)
                if world.active:
                    seen = self._reduce_epoch(stage, world, seen, loss_sum, correct, term_sums)
                train_loss = loss_sum.item() / max(seen, 1)
                self._check_divergence(label, epoch, lr, params, train_loss, loss_max, first_loss)
                base = {"stage": stage.name, "epoch": epoch + 1, "lr": lr_now, "train_loss": train_loss}
                base.update({k: v.item() / max(seen, 1) for k, v in term_sums.items()})
                every = max(1, int(self.tcfg.eval_every)) if stage.eval_each_epoch else epochs
                if epoch + 1 == epochs or (epoch + 1) % every == 0:
                    scores = self._evaluate_outputs(stage.eval_model())
                    bad = [n for n, sc in scores.items() if not math.isfinite(sc["test_loss"])]
                    if bad:
                        self._diverged(label, epoch, lr, "non-finite outputs on the test split")
                else:
                    scores = {name: dict(NO_SCORE) for name in correct}
                rows = []
                for name, score in scores.items():
                    row = dict(base) if name is None else {**base, "model": name}
                    hits = correct.get(name)
                    row["train_top1"] = 100.0 * hits.item() / max(seen, 1) if hits is not None else float("nan")
                    row.update(score)
                    row["epoch_seconds"] = time.perf_counter() - t0
                    row["images_per_second"] = seen / max(train_seconds, 1e-9)
                    rows.append(row)
                result.train_seconds += train_seconds
                primary = self._record(result, rows, stage.primary)
                for m in metrics:
                    for row in rows:
                        m.append(row)
                log.info(
                    "%s epoch %d/%d  loss %.4f  train %.2f%%  test %.2f%% (top-5 %.2f%%)  %.1fs  %.0f img/s%s",
                    label, epoch + 1, epochs, train_loss, primary["train_top1"], primary["test_top1"],
                    primary["test_top5"], primary["epoch_seconds"], primary["images_per_second"],
                    "".join(f"  | {r['model']} {r['test_top1']:.2f}%" for r in rows if r is not primary and "model" in r),
                )
                if ckpt_dir is not None and world.is_main:
                    self._save(stage, optimizer, ckpt_dir, epoch + 1, result, improved=result.best_epoch == epoch + 1)
        if result.history:
            ips = [r["images_per_second"] for r in result.history]
            result.images_per_second = sum(ips) / len(ips)
        return result

    def _dry_step(self, stage: Stage, epochs: int, lr: float) -> FitResult:
        """The preflight of a stage: its optimizer, and one forward and backward pass on two
        training images (every tap, term and adapter runs once); no update, nothing written."""
        params = stage.parameters_to_train()
        build_optimizer(params, self.cfg.optim, lr)
        build_schedule(self.cfg.sched, lr, epochs, self.steps_per_epoch())
        stage.train()
        x, y, index = next(iter(self.data.train_batches(0, with_index=True)))
        with self.autocast():
            loss, _, _ = stage.training_step(x[:2], Step(targets=y[:2], index=index[:2], epoch=0.0, epochs=epochs))
        loss.backward()
        for p in params:
            p.grad = None
        result = FitResult(epochs=epochs)
        scores = self._evaluate_outputs(stage.eval_model())
        rows = [{"epoch": 0, **score, **({} if name is None else {"model": name})} for name, score in scores.items()]
        self._record(result, rows, stage.primary)
        return result

    # ------------------------------------------------------------------ divergence
    def _check_divergence(self, label, epoch, lr, params, train_loss, loss_max, first_loss) -> None:
        """End the stage (DivergedError) on a non-finite loss or weight, or a loss that exploded;
        called before the epoch's checkpoint is written, so the checkpoints keep the last finite epoch."""
        if not math.isfinite(train_loss):
            self._diverged(label, epoch, lr, f"train loss {train_loss}")
        if first_loss is not None:
            peak, first = loss_max.item(), first_loss.item()
            if peak > EXPLODING * max(first, 1.0):
                self._diverged(label, epoch, lr, f"loss exploded from {first:.4g} to {peak:.3g}")
        finite = torch.stack([p.detach().isfinite().all() for p in params]).all() if params else torch.tensor(True)
        if not bool(finite):
            self._diverged(label, epoch, lr, "non-finite weights")

    def _diverged(self, label, epoch, lr, reason) -> None:
        amp = ", or try trainer.amp=off" if self.amp_dtype is not None else ""
        raise DivergedError(
            f"{label}: training diverged in epoch {epoch + 1} ({reason}); lower its learning rate "
            f"(lr {lr:g}: optim.lr, or teacher.lr / student.lr) or a loss weight{amp}"
        )

    # ------------------------------------------------------------------ bookkeeping
    def _reduce_epoch(self, stage, world, seen, loss_sum, correct, term_sums) -> int:
        """Sum the epoch's running totals over the ranks (in place) and average BN statistics."""
        dist.all_reduce_sum(loss_sum, world)
        for name in sorted(correct, key=str):
            correct[name] = dist.all_reduce_sum(correct[name].clone(), world)
        for name in sorted(term_sums):
            term_sums[name] = dist.all_reduce_sum(torch.as_tensor(term_sums[name], device=self.device).clone(), world)
        for module in (stage.model, *stage.extra_modules().values()):  # BN statistics of adapters and exits too
            dist.average_buffers(module, world)
        return int(dist.all_reduce_sum(torch.tensor([seen], device=self.device), world).item())

    @staticmethod
    def _record(result: FitResult, rows: list[dict], primary: str | None) -> dict:
        """Track best/last accuracy: of the primary row in ``result``, of each model in ``result.models``."""
        by_name = {r.get("model"): r for r in rows}
        main = by_name.get(primary, rows[0])
        targets = [(result, main)]
        if len(rows) > 1:
            targets += [(result.models.setdefault(r["model"], FitResult(epochs=result.epochs)), r) for r in rows]
        for res, row in targets:
            res.history.append(row)
            top1, top5 = row["test_top1"], row["test_top5"]
            if math.isnan(top1):
                continue
            res.top1_last, res.top5_last = top1, top5
            if math.isnan(res.top1_best) or top1 > res.top1_best:
                res.top1_best, res.best_epoch = top1, row["epoch"]
            if math.isnan(res.top5_best) or top5 > res.top5_best:
                res.top5_best = top5
        return main

    def _save(self, stage: Stage, optimizer, ckpt_dir: Path, epoch: int, result: FitResult, improved: bool) -> None:
        if not bool(self.tcfg.get("save_checkpoints", True)):
            return
        meta = {"epoch": epoch, "top1": result.top1_last, "top1_best": result.top1_best,
                "top5_best": result.top5_best, "best_epoch": result.best_epoch}
        # last.pt first: it names the best epoch; a kill before best.pt is written is mended on
        # resume from last.pt itself (then best epoch == last epoch), see _resume
        save_checkpoint(ckpt_dir / "last.pt", stage.model, optimizer=optimizer.state_dict(),
                        extra_state=stage.extra_state(), fit=result.state(), **meta)
        fault_point("between last.pt and best.pt")
        if improved:
            save_checkpoint(ckpt_dir / "best.pt", stage.model, **meta)

    def _resume(self, stage: Stage, optimizer, path: Path, result: FitResult) -> int:
        payload = read_checkpoint(path)
        load_into(stage.model, payload, path, role=stage.name)
        if "optimizer" in payload:
            optimizer.load_state_dict(payload["optimizer"])
        stage.load_extra_state(payload.get("extra_state", {}))
        if "fit" in payload:  # the whole record: per-model results, history, seconds
            vars(result).update(vars(FitResult.from_state({**payload["fit"], "epochs": result.epochs})))
        else:  # a last.pt of an older kdrun
            result.top1_best = float(payload.get("top1_best", float("nan")))
            result.top5_best = float(payload.get("top5_best", float("nan")))
            result.top1_last = float(payload.get("top1", float("nan")))
            result.best_epoch = int(payload.get("best_epoch", 0))
        epoch = int(payload["epoch"])
        best_path = path.parent / "best.pt"
        best_epoch = read_checkpoint(best_path).get("epoch") if best_path.is_file() else None
        if result.best_epoch and best_epoch != result.best_epoch:
            if result.best_epoch != epoch:  # not a kill between the two writes: nothing to mend it from
                raise CheckpointError(f"{best_path} holds epoch {best_epoch}, but {path} names epoch "
                                      f"{result.best_epoch} as the best; remove the run dir and train again")
            meta = {k: payload[k] for k in ("epoch", "top1", "top1_best", "top5_best", "best_epoch") if k in payload}
            save_checkpoint(best_path, stage.model, **meta)  # killed after last.pt, before best.pt
            log.info("%s: wrote the missing best.pt of epoch %d from %s", stage.name, epoch, path)
        return epoch
