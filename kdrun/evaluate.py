"""``kdrun-eval RUN_DIR|CHECKPOINT [KEY=VALUE ...] [--teacher CHECKPOINT]``: score a checkpoint without training.

Top-1 and top-5 on the test split, the expected calibration error (15 bins) and, when a teacher is
given (``--teacher``) or the run dir has one (its summary's ``teacher_source``), the teacher's
scores and the teacher-student agreement (the share of test images on which both predict the same
class). The data is the run's (its config.yaml) unless overrides say otherwise (``dataset=cifar10
dataset.root=/data``, ``trainer.device=cuda``, ``trainer.limit_eval_batches=null``); a checkpoint
outside a run dir needs ``dataset=NAME``. ``kdrun-eval RUN_DIR`` scores checkpoints/best.pt, the
student of the run's best epoch, so its top-1 is the summary's ``student_top1_best``.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from kdrun.errors import CheckpointError, ConfigError, KdrunError, OneLineParser

#: confidence bins of the expected calibration error
ECE_BINS = 15


@dataclass
class Scores:
    """Running counts of one model over the test split (on the device until :meth:`result`)."""

    bins: int = ECE_BINS
    n: int = 0
    top1: float = 0.0
    top5: float = 0.0
    count: torch.Tensor | None = None  # per confidence bin: images, summed confidence, correct
    conf: torch.Tensor | None = None
    hits: torch.Tensor | None = None
    predictions: list = field(default_factory=list)

    def add(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        logits = logits.float()
        prob = logits.softmax(dim=1)
        confidence, predicted = prob.max(dim=1)
        k = min(5, logits.shape[1])
        hit = logits.topk(k, dim=1).indices.eq(y[:, None])
        correct = hit[:, 0]
        index = (confidence * self.bins).long().clamp_(0, self.bins - 1)
        if self.count is None:
            self.count, self.conf, self.hits = (torch.zeros(self.bins, dtype=torch.float64, device=logits.device)
                                                for _ in range(3))
        self.count.index_add_(0, index, torch.ones_like(confidence, dtype=torch.float64))
        self.conf.index_add_(0, index, confidence.double())
        self.hits.index_add_(0, index, correct.double())
        self.top1 += correct.sum()
        self.top5 += hit.any(dim=1).sum()
        self.n += y.numel()
        self.predictions.append(predicted)

    def result(self) -> dict:
        n = max(self.n, 1)
        return {"top1": 100.0 * float(self.top1) / n, "top5": 100.0 * float(self.top5) / n,
                "ece": expected_calibration_error(self.count, self.conf, self.hits)}


def expected_calibration_error(count: torch.Tensor | None, conf: torch.Tensor | None, hits: torch.Tensor | None) -> float:
    """ECE (Guo et al., ICML 2017): ``sum_b |B_b| / n * |acc(B_b) - conf(B_b)| = sum_b |hits_b - conf_b| / n``,
    the top-class probability binned in equal widths over [0, 1] (bin b: [b/B, (b+1)/B), 1.0 in the last)."""
    if count is None or float(count.sum()) == 0:
        return float("nan")
    return float((hits - conf).abs().sum() / count.sum())


def ece_of(logits: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS) -> float:
    """The expected calibration error of ``logits`` against labels ``y`` (one batch)."""
    scores = Scores(bins=bins)
    scores.add(logits, y)
    return scores.result()["ece"]


# ---------------------------------------------------------------------------- what to score
def resolve_target(target: str) -> tuple[Path, Path | None]:
    """(student weights, run dir or None) of ``RUN_DIR`` or ``CHECKPOINT``; a bad path is one line."""
    from kdrun.runtime.shipping import find_run_dir, student_weights

    path = Path(target).expanduser()
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise ConfigError(f"{target} is not a kdrun run dir (no config.yaml); give a run dir "
                              "(outputs/runs/<date>/<time>_...) or a checkpoint file")
        return student_weights(path), path.resolve()
    if path.is_file():
        return path.resolve(), find_run_dir(path.parent)
    raise ConfigError(f"{target}: no such run dir or checkpoint file")


def run_config(run_dir: Path | None, overrides: Sequence[str]) -> DictConfig:
    """The run's config.yaml with ``overrides`` applied (a group choice recomposes that group, a key is
    set); without a run dir, kdrun's default config composed with them (``dataset=`` required)."""
    from kdrun.config import compose, config_groups, parse_overrides

    groups = set(config_groups())
    root = {o.split("=", 1)[0].lstrip("+~").split(".")[0] for o in overrides}
    chosen = {g for g in root if g in groups and any(o.split("=", 1)[0].lstrip("+~") == g for o in overrides)}
    if run_dir is None:
        if "dataset" not in chosen:
            raise ConfigError("this checkpoint is not in a run dir: name the data to score it on, "
                              "e.g. kdrun-eval CHECKPOINT dataset=cifar100")
        return compose(list(overrides))
    cfg = OmegaConf.load(run_dir / "config.yaml")
    if chosen:
        composed = compose([o for o in overrides if o.split("=", 1)[0].lstrip("+~").split(".")[0] in chosen])
        for group in chosen:
            cfg[group] = composed[group]
    for key, value in parse_overrides([o for o in overrides if o.split("=", 1)[0].lstrip("+~").split(".")[0]
                                       not in chosen]):
        if OmegaConf.select(cfg, key, default="<missing>") == "<missing>":
            raise ConfigError(f"unknown key {key} in the run's config.yaml")
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def _teacher_source(teacher: str | None, run_dir: Path | None, summary: dict) -> tuple[Path | None, bool]:
    """(the teacher's weights, whether they are the run's own teacher) or (None, False)."""
    from kdrun.runtime.shipping import teacher_weights

    if teacher:
        path = Path(teacher).expanduser()
        if path.is_dir():
            raise ConfigError(f"--teacher {teacher} is a folder; give the teacher's checkpoint file (model.pt, "
                              "model.safetensors or a run's checkpoints/best.pt)")
        if not path.is_file():
            raise ConfigError(f"--teacher {teacher}: no such file")
        return path, False
    path = teacher_weights(run_dir, summary)
    return path, path is not None


# ---------------------------------------------------------------------------- scoring
def evaluate(target: str, overrides: Sequence[str] = (), teacher: str | None = None) -> dict:
    """Score ``target`` (a run dir or a checkpoint), and a teacher where there is one; returns the numbers."""
    from kdrun.data import build_data
    from kdrun.engine.device import resolve_amp, resolve_device
    from kdrun.runtime.models import ModelFactory
    from kdrun.runtime.shipping import load_model, read_summary

    weights, run_dir = resolve_target(target)
    cfg = run_config(run_dir, overrides)
    summary = read_summary(run_dir)
    device = resolve_device(cfg.trainer.device)
    amp_dtype = resolve_amp(cfg.trainer.amp, device)
    data = build_data(cfg.dataset, batch_size=int(cfg.trainer.batch_size),
                      eval_batch_size=int(cfg.trainer.eval_batch_size), device=device, seed=int(cfg.seed),
                      channels_last=bool(cfg.trainer.channels_last))
    info = data.info
    factory = ModelFactory(cfg, info, device)
    models = {"student": factory.place(load_model(weights, cfg.student if run_dir else None, info.image_size,
                                                  role="student"))}
    teacher_path, own = _teacher_source(teacher, run_dir, summary)
    if teacher_path is not None:
        node = cfg.get("teacher") if own and "+" not in str(cfg.teacher.get("name", "")) else None
        models["teacher"] = factory.place(load_model(teacher_path, node, info.image_size, role="teacher"))
    scores, agreement, n = score_models(models, data, cfg.trainer.get("limit_eval_batches"), amp_dtype, device)
    out = {"checkpoint": str(weights), "run_dir": str(run_dir) if run_dir else None, "dataset": info.name,
           "images": n, **{f"{name}_{k}": v for name, s in scores.items() for k, v in s.items()},
           "arch": {name: getattr(m, "arch", type(m).__name__) for name, m in models.items()}}
    if teacher_path is not None:
        out.update(teacher_checkpoint=str(teacher_path), agreement=agreement)
    if weights.name == "best.pt" and summary.get("student_top1_best") is not None:
        out["summary_top1_best"] = summary["student_top1_best"]
    return out


@torch.inference_mode()
def score_models(models: dict, data, limit, amp_dtype, device) -> tuple[dict, float | None, int]:
    """Every model over the test split (``limit`` batches at most, as the run scored it): per model
    top-1, top-5 and ECE; the share of images on which the student and the teacher agree."""
    import contextlib

    scores = {name: Scores() for name in models}
    autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    for i, (x, y) in enumerate(data.eval_batches()):
        if limit is not None and i >= int(limit):
            break
        for name, model in models.items():
            with autocast:
                scores[name].add(model(x), y)
    agreement = None
    if "teacher" in scores and scores["student"].predictions:
        same = torch.cat(scores["student"].predictions).eq(torch.cat(scores["teacher"].predictions))
        agreement = 100.0 * float(same.float().mean())
    return {name: s.result() for name, s in scores.items()}, agreement, scores["student"].n


# ---------------------------------------------------------------------------- the command
def print_result(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"{result['checkpoint']} on {result['dataset']}, test split ({result['images']} images)",
                  highlight=False, soft_wrap=True)
    table = Table()
    for column in ("model", "arch", "top-1", "top-5", f"ECE ({ECE_BINS} bins)"):
        table.add_column(column, justify="left" if column in ("model", "arch") else "right")
    for name, arch in result["arch"].items():
        table.add_row(name, arch, f"{result[f'{name}_top1']:.2f}", f"{result[f'{name}_top5']:.2f}",
                      f"{result[f'{name}_ece']:.4f}")
    console.print(table)
    if result.get("agreement") is not None:
        console.print(f"teacher-student agreement (same predicted class): {result['agreement']:.2f}%"
                      f"  (teacher: {result['teacher_checkpoint']})")
    if result.get("summary_top1_best") is not None:
        same = "the same" if abs(result["summary_top1_best"] - result["student_top1"]) < 5e-5 else "DIFFERENT"
        console.print(f"summary.json student_top1_best: {result['summary_top1_best']:.2f} ({same})")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="kdrun-eval", description=__doc__.split("\n\n")[0].replace("``", ""))
    parser.add_argument("target", metavar="RUN_DIR|CHECKPOINT", help="a run dir (its checkpoints/best.pt) or a "
                        "checkpoint: best.pt, last.pt, a store's model.pt, student.safetensors")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides: dataset=NAME, dataset.root=DIR, trainer.device=cuda, ...")
    parser.add_argument("--teacher", metavar="CHECKPOINT", help="a teacher to compare with (default: the run's)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    if not sys.stdout.isatty():
        os.environ.setdefault("COLUMNS", "160")
    args = build_parser().parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    try:
        if bad:
            raise ConfigError(f"'{bad[0]}' is not an override; write KEY=VALUE, e.g. dataset=cifar100")
        print_result(evaluate(args.target, args.overrides, args.teacher))
    except (KdrunError, CheckpointError) as exc:
        print(f"kdrun-eval: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
