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
from typing import Callable, Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.engine import distributed as dist
from kdrun.engine.checkpoint import load_into, read_checkpoint, save_checkpoint
from kdrun.engine.metrics import MetricsWriter
from kdrun.engine.progress import EpochProgress
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
    counts: dict[str, int] = field(default_factory=dict)  # what the stage's helpers counted (summary keys as given)

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
            **self.counts,
        }


class _Optimization:
    """A stage's optimizer, lr schedule and (fp16) grad scaler, and the step that uses them."""

    def __init__(self, params, make_optimizer, make_schedule, lr: float, epochs: int, steps: int, amp_dtype) -> None:
        self.params, self.base_lr, self.epochs, self.steps = params, lr, epochs, steps
        self.optimizer = make_optimizer(params, lr)
        self.schedule = make_schedule(lr, epochs, steps)
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    def set_lr(self, epoch: int, batch: int) -> float:
        lr = self.schedule(epoch, batch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step(self, loss: torch.Tensor) -> None:
        """One backward pass and update (under torchrun DDP averages the gradients during the backward)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()


class EpochTotals:
    """One epoch's running sums, kept on the device: no host sync per step."""

    def __init__(self, device: torch.device, lr: float) -> None:
        self.started = time.perf_counter()
        self.seconds = 0.0
        self.lr = lr
        self.seen = 0
        self.loss_sum = torch.zeros((), device=device)
        self.loss_max = torch.zeros((), device=device)
        self.first_loss: torch.Tensor | None = None  # the epoch's first step (divergence is judged against it)
        self.correct: dict = {}  # output name (None: the only one) -> correct predictions
        self.terms: dict[str, torch.Tensor] = {}  # "loss_<term>" -> weighted sum
        self.steps: list | None = None  # recorded steps for the trackers (None: no sink takes them)

    def add(self, loss: torch.Tensor, logits, logs: dict, y: torch.Tensor) -> None:
        b = y.shape[0]
        value = loss.detach().float()
        self.seen += b
        self.loss_sum += value * b
        self.loss_max = torch.maximum(self.loss_max, value)
        if self.first_loss is None:
            self.first_loss = value.clone()
        for name, out in (logits.items() if isinstance(logits, dict) else [(None, logits)]):
            hits = (out.detach().argmax(dim=1) == y).sum()
            self.correct[name] = self.correct[name] + hits if name in self.correct else hits
        for k, v in logs.items():
            self.terms[k] = self.terms.get(k, 0.0) + v.float() * b

    def progress_text(self) -> str:
        first = next(iter(self.correct.values()))
        return f"loss {self.loss_sum.item() / self.seen:.3f}  acc {100.0 * first.item() / self.seen:.1f}%"

    def record_step(self, step: int, loss: torch.Tensor, logs: dict) -> None:
        """Keep step ``step``'s loss, weighted term losses and lr for the trackers (device tensors: no sync)."""
        values = torch.stack([loss.detach().float(), *(torch.as_tensor(v).detach().float() for v in logs.values())])
        self.steps.append((step, self.lr, ["loss", *logs], values))


class Trainer:
    def __init__(self, cfg, data, device: torch.device, amp_dtype: torch.dtype | None, *,
                 optimizer: Callable[[list, float], torch.optim.Optimizer],
                 schedule: Callable[[float, int, int], Callable[[int, int], float]],
                 progress: bool = False, world: dist.World = dist.SINGLE, dry: bool = False):
        """``cfg``: the run config (reads its ``trainer`` section). ``data``: a DataModule.
        ``optimizer(params, lr)`` and ``schedule(base_lr, epochs, steps_per_epoch)`` build a stage's
        optimizer and lr schedule (kdrun.config.optimizer_factory / schedule_factory of the optim and
        sched configs). ``world``: the data-parallel processes: each augments and trains on its share
        of every batch (``data`` is sharded here), what a stage trains is wrapped in DDP.
        ``dry``: the preflight: :meth:`fit` takes one step on two images, :meth:`evaluate` scores two."""
        self.cfg = cfg
        self.tcfg = cfg.trainer
        self.optimizer_factory, self.schedule_factory = optimizer, schedule
        self.data = data
        self.device = device
        self.amp_dtype = amp_dtype
        self.world = world
        self.dry = dry
        self.progress = progress and world.is_main and not dry
        self._step_sinks: list = []  # the metrics sinks of the stage being fit that take per-step scalars
        if world.active:
            data.shard(world.rank, world.size)

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
    def fit(self, stage: Stage, *, epochs: int, lr: float, ckpt_dir: Path | None,
            metrics: Sequence[MetricsWriter] = (), resume: bool = False, label: str | None = None) -> FitResult:
        """Train ``stage`` for ``epochs`` epochs at base learning rate ``lr``: per epoch the steps,
        a divergence check, evaluation, one metrics row per scored model, last/best checkpoints.
        ``metrics``: sinks with ``truncate(stage, epoch)`` and ``append(row)``; those whose ``wants_steps``
        is true also get ``log_step(stage, step, scalars)`` (loss, each term's weighted loss, lr) every
        ``trainer.log_every`` steps and at each epoch's last step, handed over when the epoch ends."""
        if self.dry:
            return self._dry_step(stage, epochs, lr)
        label = label or stage.name
        opt = _Optimization(stage.parameters_to_train(), self.optimizer_factory, self.schedule_factory, lr, epochs,
                            self.steps_per_epoch(), self.amp_dtype)
        result = FitResult(epochs=epochs)
        start = 0
        if resume and ckpt_dir is not None and (ckpt_dir / "last.pt").is_file():
            start = self._resume(stage, opt.optimizer, ckpt_dir / "last.pt", result)
            log.info("%s: resuming after epoch %d from %s", label, start, ckpt_dir / "last.pt")
        for m in metrics:  # rows of epochs after the checkpoint (a killed run) are trained again
            m.truncate(stage.name, start)
        self._step_sinks = [m for m in metrics if getattr(m, "wants_steps", False)]
        first_loss = None
        step = dist.data_parallel(stage.training_step, [stage.model, *stage.extra_modules().values()], opt.params,
                                  self.world, sync_bn=bool(self.tcfg.get("sync_bn", False)))
        with EpochProgress(self.progress) as bar:
            for epoch in range(start, epochs):
                totals = self._train_epoch(stage, epoch, opt, bar, label, step)
                self._log_steps(stage.name, totals)
                first_loss = totals.first_loss if first_loss is None else first_loss
                self._check_divergence(label, epoch, lr, opt.params, totals, first_loss)
                rows = self._score_epoch(stage, epoch, epochs, totals, label, lr)
                result.train_seconds += totals.seconds
                primary = self._record(result, rows, stage.primary)
                for m in metrics:
                    for row in rows:
                        m.append(row)
                self._log_epoch(label, epoch, epochs, primary, rows)
                if ckpt_dir is not None and self.world.is_main:
                    self._save(stage, opt.optimizer, ckpt_dir, epoch + 1, result, improved=result.best_epoch == epoch + 1)
        if result.history:
            ips = [r["images_per_second"] for r in result.history]
            result.images_per_second = sum(ips) / len(ips)
        return result

    def _train_epoch(self, stage: Stage, epoch: int, opt: "_Optimization", bar: EpochProgress, label: str,
                     training_step: Callable | None = None) -> EpochTotals:
        """The steps of one epoch; running sums stay on the device (a host sync only for the live bar).
        ``training_step``: the stage's, or its DDP wrapper under torchrun (this rank's share of each batch)."""
        training_step = training_step or stage.training_step
        stage.train()
        bar.start(f"{label} {epoch + 1}/{opt.epochs}", opt.steps)
        totals = EpochTotals(self.device, lr=opt.base_lr)
        totals.steps = [] if self._step_sinks else None
        log_every = max(1, int(self.tcfg.log_every))
        for i, (x, y, index) in enumerate(self.data.train_batches(epoch, with_index=True)):
            if i >= opt.steps:
                break
            totals.lr = opt.set_lr(epoch, i)
            with self.autocast():
                loss, logits, logs = training_step(
                    x, Step(targets=y, index=index, epoch=epoch + i / opt.steps, epochs=opt.epochs, batch=i))
            share = self.data.share_factor(i) if self.world.active else 1.0
            opt.step(loss if share == 1.0 else loss * share)  # unequal shares: weigh as in the whole batch
            fault_point("step")
            totals.add(loss, logits, logs, y)
            if totals.steps is not None and ((i + 1) % log_every == 0 or i + 1 == opt.steps):
                totals.record_step(epoch * opt.steps + i + 1, loss, logs)  # every epoch's last step too
            if bar.enabled and (i + 1) % log_every == 0:
                bar.update(i + 1, totals.progress_text())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        totals.seconds = time.perf_counter() - totals.started
        stage.end_epoch(epoch)
        if self.world.active:
            totals.seen = self._reduce_epoch(stage, self.world, totals)
        return totals

    def _log_steps(self, stage_name: str, totals: EpochTotals) -> None:
        """The epoch's recorded steps to the sinks that take them (``log_step(stage, step, scalars)``):
        one device-to-host copy per epoch, none inside the steps."""
        if not totals.steps:
            return
        flat = torch.cat([values for *_, values in totals.steps]).cpu().tolist()
        at = 0
        for step, lr, names, _ in totals.steps:
            scalars = dict(zip(names, flat[at:at + len(names)]), lr=lr)
            at += len(names)
            for sink in self._step_sinks:
                sink.log_step(stage_name, step, scalars)

    def _score_epoch(self, stage: Stage, epoch: int, epochs: int, totals: "EpochTotals", label: str,
                     lr: float) -> list[dict]:
        """The epoch's metrics rows: the training means, and the test scores when this epoch is scored."""
        seen = max(totals.seen, 1)
        base = {"stage": stage.name, "epoch": epoch + 1, "lr": totals.lr, "train_loss": totals.loss_sum.item() / seen}
        base.update({k: v.item() / seen for k, v in totals.terms.items()})
        every = max(1, int(self.tcfg.eval_every)) if stage.eval_each_epoch else epochs
        if epoch + 1 == epochs or (epoch + 1) % every == 0:
            scores = self._evaluate_outputs(stage.eval_model())
            if any(not math.isfinite(sc["test_loss"]) for sc in scores.values()):
                self._diverged(label, epoch, lr, "non-finite outputs on the test split")
        else:
            scores = {name: dict(NO_SCORE) for name in totals.correct}
        rows = []
        for name, score in scores.items():
            row = dict(base) if name is None else {**base, "model": name}
            hits = totals.correct.get(name)
            row["train_top1"] = 100.0 * hits.item() / seen if hits is not None else float("nan")
            row.update(score)
            row["epoch_seconds"] = time.perf_counter() - totals.started
            row["images_per_second"] = totals.seen / max(totals.seconds, 1e-9)
            rows.append(row)
        return rows

    @staticmethod
    def _log_epoch(label: str, epoch: int, epochs: int, primary: dict, rows: list[dict]) -> None:
        others = "".join(f"  | {r['model']} {r['test_top1']:.2f}%" for r in rows if r is not primary and "model" in r)
        log.info("%s epoch %d/%d  loss %.4f  train %.2f%%  test %.2f%% (top-5 %.2f%%)  %.1fs  %.0f img/s%s",
                 label, epoch + 1, epochs, primary["train_loss"], primary["train_top1"], primary["test_top1"],
                 primary["test_top5"], primary["epoch_seconds"], primary["images_per_second"], others)

    def _dry_step(self, stage: Stage, epochs: int, lr: float) -> FitResult:
        """The preflight of a stage: its optimizer, and one forward and backward pass on two
        training images (every tap, term and adapter runs once); no update, nothing written."""
        params = stage.parameters_to_train()
        self.optimizer_factory(params, lr)
        self.schedule_factory(lr, epochs, self.steps_per_epoch())
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
    def _check_divergence(self, label, epoch, lr, params, totals: "EpochTotals", first_loss) -> None:
        """End the stage (DivergedError) on a non-finite loss or weight, or a loss that exploded;
        called before the epoch's checkpoint is written, so the checkpoints keep the last finite epoch."""
        train_loss = totals.loss_sum.item() / max(totals.seen, 1)
        if not math.isfinite(train_loss):
            self._diverged(label, epoch, lr, f"train loss {train_loss}")
        if first_loss is not None:
            peak, first = totals.loss_max.item(), first_loss.item()
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
    def _reduce_epoch(self, stage, world, totals: "EpochTotals") -> int:
        """Sum the epoch's running totals over the ranks (in place) and average BatchNorm statistics."""
        dist.all_reduce_sum(totals.loss_sum, world)
        dist.all_reduce_max(totals.loss_max, world)
        for name in sorted(totals.correct, key=str):
            totals.correct[name] = dist.all_reduce_sum(totals.correct[name].clone(), world)
        for name in sorted(totals.terms):
            totals.terms[name] = dist.all_reduce_sum(torch.as_tensor(totals.terms[name], device=self.device).clone(),
                                                     world)
        seen = totals.seen
        dist.average_norm_statistics([stage.model, *stage.extra_modules().values()], world)  # adapters', exits' too
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
