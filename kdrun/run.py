"""``run(cfg) -> summary``: one kdrun run, from a composed config to the files in its run dir.

compose config -> build data -> build the scheme's models -> train its stages -> write outputs.
Tests call :func:`run` directly; the CLI calls it from the Hydra entrypoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import platform
import shutil
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import torch
from omegaconf import DictConfig, OmegaConf

from kdrun.config import (
    build_knowledge,
    component_class,
    instantiate,
    loss_name,
    parse_overrides,
)
from kdrun.config.checks import validate
from kdrun.data import build_data
from kdrun.engine import distributed as dist
from kdrun.engine.device import amp_name, resolve_amp, resolve_device
from kdrun.engine.io import clean_temp_files, write_json, write_text
from kdrun.errors import ConfigError, KdrunError
from kdrun.knowledge import KnowledgeSet
from kdrun.models.quantize import int8_report
from kdrun.runtime import RunContext
from kdrun.runtime.shipping import ship_student

log = logging.getLogger("kdrun")

# every scheme reports these, so a sweep table has the same columns whatever ran
RESULT_KEYS = (
    "student_top1_best", "student_top1_last", "student_top5_best", "teacher_top1",
    "student_params", "teacher_params", "student_macs", "teacher_macs",
)


# ---------------------------------------------------------------------------- start-up checks
def validate_run_config(cfg: DictConfig) -> None:
    """Every check that needs no data and no model: values, knowledge terms, the scheme's wishes.

    The CLI calls it before Hydra creates the run dir; :func:`run` calls it again first thing.
    """
    validate(cfg)
    run_knowledge(cfg)
    instantiate(cfg.scheme).validate(cfg)


def run_knowledge(cfg: DictConfig) -> KnowledgeSet:
    """The run's knowledge set: the selected terms, or none where the scheme trains from labels."""
    uses = component_class(cfg.scheme).uses_knowledge
    return build_knowledge(cfg.loss if uses else {}, cfg.get("ce_weight", "auto"))


# ---------------------------------------------------------------------------- summary
def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def initial_summary(cfg: DictConfig, overrides: Iterable[str]) -> dict:
    scheme = component_class(cfg.scheme)
    summary: dict[str, Any] = {
        "status": "running",
        "error": None,
        "scheme": str(cfg.scheme.name),
        "teacher": _model_label(cfg.get("teacher")) if scheme.has_teacher else None,
        "student": _model_label(cfg.get("student")),
        "loss": loss_name(cfg.loss) if scheme.uses_knowledge else "none",
        "dataset": str(cfg.dataset.name),
        "seed": cfg.get("seed"),
        "epochs": cfg.trainer.get("epochs"),
    }
    summary.update({k: None for k in RESULT_KEYS})
    if cfg.get("compare_baseline"):
        summary.update({"student_baseline_top1": None, "gain_top1": None})
    summary.update({"wall_seconds": None, "device": None, "amp": None, "git_sha": _git_sha()})
    summary["overrides"] = " ".join(overrides)
    for key, value in parse_overrides(overrides):
        if key not in summary:  # group choices (teacher=, loss=...) are there already
            summary[key] = value
    return summary


def _model_label(node) -> str | None:
    if node is None:
        return None
    return str(node.name)


def _run_dir_from_hydra() -> Path | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return None


def _overrides_from_hydra() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:
        return []


def _default_run_dir(cfg: DictConfig) -> Path:
    now = datetime.now()
    from kdrun.config import _run_name

    return Path(cfg.paths.output_root) / "runs" / now.strftime("%Y-%m-%d") / (
        now.strftime("%H-%M-%S") + "_" + _run_name(_root_=cfg)
    )


def _attach_log_file(run_dir: Path) -> logging.Handler:
    """kdrun.log: everything the console shows (kdrun's lines, warnings of torch, timm and Hydra,
    the final table or the error line) with times, for runs under SLURM or nohup."""
    handler = logging.FileHandler(run_dir / "kdrun.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    logger = logging.getLogger("kdrun")
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    logging.captureWarnings(True)
    return handler


def _detach_log_file(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    logging.captureWarnings(False)
    handler.close()


def _log_outcome(handler: logging.FileHandler, summary: dict, cfg: DictConfig) -> None:
    """The end of the console output, into kdrun.log only: the final table, or the error line."""
    from kdrun.report.console import render_summary

    if summary["status"] == "ok":
        text = render_summary(summary, component_class(cfg.scheme).report_rows)
    else:
        text = f"kdrun: error: {summary['error']} (status {summary['status']})"
    try:
        handler.acquire()
        handler.stream.write(text.rstrip("\n") + "\n")
        handler.flush()
    except (OSError, ValueError):
        pass
    finally:
        handler.release()


# ---------------------------------------------------------------------------- run
def run(cfg: DictConfig, run_dir: str | Path | None = None, overrides: Iterable[str] | None = None, *,
        keep_rejected: bool = True) -> dict:
    """Run one experiment; writes ``summary.json`` (status ok, failed, diverged or interrupted) in ``run_dir``.

    Two cases leave the run dir as it was: ``trainer.resume=true`` with a config that differs from the
    run dir's (:func:`check_resume`), and, with ``keep_rejected=False`` (the CLI's single runs), input
    rejected before anything trained in a run dir this run created: it is removed again.
    """
    world = dist.env_world()
    run_dir, fresh = _prepare_run_dir(cfg, run_dir, world)
    overrides = list(overrides) if overrides is not None else _overrides_from_hydra()
    t0 = time.perf_counter()
    summary = initial_summary(cfg, overrides)
    handler = _attach_log_file(run_dir)
    progress = {"started": False}  # set once the preflight passed: from then on, training
    rejected = False
    try:
        _execute(cfg, run_dir, world, summary, progress)
        summary["status"] = "ok"
    except BaseException as exc:
        summary["status"] = getattr(exc, "status", "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
        summary["error"] = error_text(exc)
        if not isinstance(exc, (KdrunError, KeyboardInterrupt)):
            handler.handle(logging.makeLogRecord(  # the traceback goes to kdrun.log only
                {"name": "kdrun", "levelno": logging.ERROR, "levelname": "ERROR",
                 "msg": "run failed", "exc_info": (type(exc), exc, exc.__traceback__)}))
        rejected = (not keep_rejected and fresh and not progress["started"] and world.is_main
                    and isinstance(exc, KdrunError) and exc.exit_code == 2)
        raise
    finally:
        summary.update(wall_seconds=round(time.perf_counter() - t0, 3), run_dir=str(run_dir), host=platform.node())
        _finish(cfg, run_dir, world, summary, handler, rejected, progress.get("log"))
    return summary


def _prepare_run_dir(cfg: DictConfig, run_dir, world: dist.World) -> tuple[Path, bool]:
    """The run dir (a scratch dir on torchrun's other ranks), created, without stale temp files; and
    whether it is fresh. A resume with another config is refused here, before anything is written."""
    if not world.is_main:  # under torchrun only rank 0 writes; the others work in a scratch dir
        run_dir = Path(tempfile.mkdtemp(prefix=f"kdrun-rank{world.rank}-"))
        logging.getLogger("kdrun").setLevel(logging.WARNING)
    run_dir = Path(run_dir) if run_dir is not None else (_run_dir_from_hydra() or _default_run_dir(cfg))
    fresh = not (run_dir / "config.yaml").exists()
    if not fresh and cfg.trainer.get("resume") is True:
        check_resume(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_temp_files(run_dir)
    return run_dir, fresh


def _execute(cfg: DictConfig, run_dir: Path, world: dist.World, summary: dict, progress: dict) -> None:
    """Checks, device, knowledge, data, the preflight, then the scheme (and the labels-only control)."""
    validate_run_config(cfg)
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    device, amp_dtype = _start_device(cfg, world, summary)
    knowledge = run_knowledge(cfg)
    scheme = instantiate(cfg.scheme)
    log.info("run dir: %s", run_dir)
    if knowledge.terms:
        summary["loss_formula"] = knowledge.formula()
        log.info("loss = %s", summary["loss_formula"])
    data = build_data(
        cfg.dataset, batch_size=int(cfg.trainer.batch_size), eval_batch_size=int(cfg.trainer.eval_batch_size),
        device=device, seed=int(cfg.seed), channels_last=bool(cfg.trainer.channels_last),
    )
    log.info("data: %s | device %s, amp %s", data, device, amp_name(amp_dtype))
    seconds = preflight(scheme, cfg, run_dir, data, device, amp_dtype, knowledge, world)
    log.info("preflight: every model, term and adapter of the run built and stepped once (%.1f s)", seconds)
    progress["started"] = True
    ctx = RunContext(cfg, run_dir, data, device, amp_dtype, knowledge, world)
    progress["log"] = ctx.log  # closed with the final summary (trackers: results, status, artifacts)
    summary.update(scheme.run(ctx))
    summary.update(int8_summary(ctx))
    if cfg.get("compare_baseline"):
        summary.update(_compare_baseline(ctx, summary))
    for role, src in ctx.teachers.sources.items():
        summary[f"{role}_source"] = src
    if world.is_main:
        ship_student(run_dir, cfg.student, data.info, summary)


def _start_device(cfg: DictConfig, world: dist.World, summary: dict):
    """The device and autocast dtype of this process (and the process group under torchrun)."""
    if cfg.trainer.get("threads"):
        torch.set_num_threads(int(cfg.trainer.threads))
    device = resolve_device(cfg.trainer.device, world)
    if world.active:
        if bool(cfg.trainer.resume):
            raise ConfigError("trainer.resume=true is not supported under torchrun yet; resume in one process")
        if int(cfg.trainer.batch_size) < 2 * world.size:
            raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} is too small to split over "
                              f"{world.size} processes; use at least {2 * world.size}")
        if bool(cfg.trainer.sync_bn) and device.type != "cuda":
            raise ConfigError("trainer.sync_bn=true needs CUDA devices (PyTorch's SyncBatchNorm has no CPU "
                              "kernel); leave it false on CPU")
        dist.init(world, device)
        summary["world_size"] = world.size
    amp_dtype = resolve_amp(cfg.trainer.amp, device)
    summary.update({"device": str(device), "amp": amp_name(amp_dtype)})
    return device, amp_dtype


def _finish(cfg: DictConfig, run_dir: Path, world: dist.World, summary: dict, handler, rejected: bool,
            sinks=None) -> None:
    """summary.json (unless the run dir is being removed), the end of kdrun.log, the trackers' end
    (``sinks``: results, status, the run dir as artifacts), clean-up. An interrupt while summary.json
    is written still leaves it (status interrupted), then stops the run."""
    stop = None
    if not rejected:
        try:
            write_json(run_dir / "summary.json", _finite(summary))
        except KeyboardInterrupt as exc:  # SIGTERM/Ctrl-C while writing it: it says so, then we stop
            stop = exc
            summary.update(status="interrupted", error=error_text(exc))
            write_json(run_dir / "summary.json", _finite(summary))
        except OSError as exc:  # a full disk: say so, keep the run's own error
            log.error("could not write %s: %s", run_dir / "summary.json", exc.strerror or exc)
        _log_outcome(handler, summary, cfg)
    _detach_log_file(handler)
    if sinks is not None:
        sinks.close(_finite(summary))
    if rejected or not world.is_main:
        remove_run_dir(run_dir)
    dist.shutdown(world)
    if stop is not None:
        raise stop


def error_text(exc: BaseException) -> str:
    """The one-line error of a run: a KdrunError's message, 'interrupted', or ``Type: first line``."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, KdrunError):
        return str(exc)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"


def preflight(scheme, cfg, run_dir, data, device, amp_dtype, knowledge, world) -> float:
    """Run the scheme once in dry mode (:class:`kdrun.runtime.RunContext` ``dry=True``): every model is built (and
    its checkpoint loaded), every knowledge set and adapter set up, and every stage takes one step
    on two images, before anything trains, so a student-side mistake never waits for a teacher's
    training. Nothing is written; the RNG state is restored; log lines below errors are dropped."""
    t0 = time.perf_counter()
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    logger = logging.getLogger("kdrun")
    quiet = _Quiet()
    logger.addFilter(quiet)
    try:
        ctx = RunContext(cfg, run_dir, data, device, amp_dtype, knowledge, world, dry=True)
        scheme.run(ctx)
        int8_summary(ctx)  # a student that does not convert to int8 fails here, before training
    finally:
        logger.removeFilter(quiet)
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return time.perf_counter() - t0


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def check_resume(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse ``trainer.resume=true`` when the config differs from the run dir's config.yaml in a key
    that can change the result (one line naming the keys); nothing in the run dir is touched."""
    try:
        before = OmegaConf.load(run_dir / "config.yaml")
        old = _flatten(OmegaConf.to_container(before, resolve=False))
    except Exception as exc:  # noqa: BLE001 - a damaged config.yaml
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__  # YAML errors span lines
        raise ConfigError(f"trainer.resume=true: cannot read {run_dir / 'config.yaml'} ({reason}); "
                          "start a new run without trainer.resume") from None
    try:
        new = _flatten(OmegaConf.to_container(cfg, resolve=True))
    except Exception as exc:  # noqa: BLE001 - validation names the bad key later
        raise ConfigError(f"cannot resolve the config: {str(exc).splitlines()[0]}") from None
    changed = [k for k in sorted(set(old) | set(new))
               if old.get(k, _MISSING) != new.get(k, _MISSING) and not k.startswith(RESUME_FREE)]
    if changed:
        shown = ", ".join(f"{k} ({_show(old.get(k, _MISSING))} there, {_show(new.get(k, _MISSING))} now)"
                          for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise ConfigError(f"trainer.resume=true: the config differs from {run_dir / 'config.yaml'} in {shown}{more}; "
                          "resume with the run's values, or start a new run without trainer.resume")


#: keys that cannot change a run's result: they may differ when resuming
RESUME_FREE = ("trainer.resume", "trainer.progress", "trainer.log_every", "trainer.threads", "paths.",
               "sweep_name", "optimize_metric", "logger")
_MISSING = object()


def _show(value) -> str:
    return "unset" if value is _MISSING else str(value)


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out: dict = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): node}


def remove_run_dir(run_dir: Path) -> None:
    """Remove a run dir that holds only what this run and Hydra wrote, and its date dir if empty."""
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.parent
    with contextlib.suppress(OSError):
        parent.rmdir()  # only when empty


def int8_summary(ctx: RunContext) -> dict:
    """``student.quantize``: the trained QAT student converted to int8, scored on the CPU beside the
    same weights in fp32, with both sizes and batch-1 latencies (:func:`kdrun.models.quantize.int8_report`)."""
    kind = ctx.cfg.student.get("quantize")
    if not kind:
        return {}
    if ctx.models.quantized is None:
        raise ConfigError(f"student.quantize={kind}: scheme={ctx.cfg.scheme.name} trains no model from student=; "
                          "use it with a scheme that does (offline, baseline, data_free, born_again, ...)")
    limit = ctx.cfg.trainer.limit_eval_batches
    shipped = ctx.run_dir / "student_int8.pt" if ctx.trainer.world.is_main and not ctx.dry else None
    out = int8_report(ctx.models.quantized, ctx.data.eval_batches, None if limit is None else int(limit), dry=ctx.dry,
                      save_to=shipped)
    if not ctx.dry:
        log.info("student %s: test top-1 %.2f%% (same weights in fp32: %.2f%%), %d bytes (fp32 %d, %.1f%%), batch-1 "
                 "CPU latency %.2f ms (fp32 %.2f ms)", kind, out["student_int8_top1"], out["student_fp32_top1"],
                 out["student_int8_bytes"], out["student_fp32_bytes"], 100 * out["student_int8_size_ratio"],
                 out["student_int8_latency_ms"], out["student_fp32_latency_ms"])
    if shipped is not None:
        log.info("student %s: %s (TorchScript: torch.jit.load(path)(x) gives the logits)", kind, shipped)
    return out


def _compare_baseline(ctx: RunContext, summary: dict) -> dict:
    """Train (or reuse) the student from labels alone with the same recipe and seed."""
    node = ctx.cfg.student
    model = ctx.teachers.obtain(node, role="student_baseline")
    ev = ctx.trainer.evaluate(model)
    stored = ctx.teachers.stored.get("student_baseline", {})
    base_best = float(stored.get("top1_best", ev["test_top1"]))
    out = {"student_baseline_top1": base_best, "student_baseline_top1_last": ev["test_top1"]}
    if summary.get("student_top1_best") is not None:
        out["gain_top1"] = summary["student_top1_best"] - base_best
        out["gain_top1_last"] = summary["student_top1_last"] - ev["test_top1"]
    return out


def _finite(summary: dict) -> dict:
    """JSON has no NaN: write null instead; round floats to 6 decimals (no 0.4000000000000057)."""
    def clean(v):
        if isinstance(v, float):
            return round(v, 6) if math.isfinite(v) else None
        return v

    return {k: clean(v) for k, v in summary.items()}
