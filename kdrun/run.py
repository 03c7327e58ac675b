"""``run(cfg) -> summary``: one kdrun run, from a composed config to the files in its run dir.

compose config -> build data -> build the scheme's models -> train its stages -> write outputs.
Tests call :func:`run` directly; the CLI calls it from the Hydra entrypoint.
"""

from __future__ import annotations

import contextlib
import hashlib
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
    instantiate_model,
    loss_name,
    parse_overrides,
    to_plain,
)
from kdrun.config.checks import validate
from kdrun.data import build_data
from kdrun.engine import distributed as dist
from kdrun.engine.checkpoint import load_into, read_checkpoint, save_checkpoint
from kdrun.engine.device import amp_name, resolve_amp, resolve_device
from kdrun.engine.io import clean_temp_files, write_json, write_text
from kdrun.engine.metrics import MetricsWriter
from kdrun.engine.progress import progress_enabled
from kdrun.engine.store import MODEL_FILE, ModelStore
from kdrun.engine.trainer import FitResult, Trainer
from kdrun.errors import CheckpointError, ConfigError, DivergedError, KdrunError
from kdrun.knowledge import KnowledgeSet
from kdrun.models import count_macs, count_params, tap_shapes

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


# ---------------------------------------------------------------------------- run context
class RunContext:
    """What a scheme can use: config, data, device, trainer, store, and model helpers."""

    def __init__(self, cfg: DictConfig, run_dir: Path, data, device, amp_dtype, knowledge: KnowledgeSet,
                 world: dist.World = dist.SINGLE, dry: bool = False):
        """``dry``: the preflight: models are built (checkpoints loaded and checked) but never trained
        nor stored, every stage takes one step on two images, nothing is written."""
        self.cfg = cfg
        self.world = world
        self.run_dir = run_dir
        self.data = data
        self.device = device
        self.amp_dtype = amp_dtype
        self.dry = dry
        self.knowledge = knowledge  # built at start-up (its checks ran there); schemes build fresh copies
        self.trainer = Trainer(cfg, data, device, amp_dtype, progress=progress_enabled(cfg.trainer.progress),
                               world=world, dry=dry)
        self.metrics = MetricsWriter(None if dry else run_dir / "metrics.csv")
        if not bool(cfg.trainer.resume):
            self.metrics.rows = []
        self.store = ModelStore(cfg.paths.store)
        self.sources: dict[str, str] = {}  # role -> checkpoint the model came from
        self.stored: dict[str, dict] = {}  # role -> store payload (accuracies) of store-trained models
        self.keys: dict[str, str] = {}  # role -> identity of its weights (recipe hash or file digest)

    # -- models
    def build_model(self, node: DictConfig, seed: int | None = None):
        """A freshly initialised model (seeded with ``seed``, default cfg.seed) on the run's device."""
        info = self.data.info
        torch.manual_seed(int(self.cfg.seed) if seed is None else int(seed))
        try:
            model = instantiate_model(node, num_classes=info.num_classes, in_chans=info.in_chans,
                                      image_size=info.image_size)
        except CheckpointError as exc:  # a pretrained file that cannot be read or does not fit
            raise CheckpointError(f"{node._key() or 'model'}.pretrained={node.get('pretrained')}: {exc}") from None
        if self.world.active and bool(self.cfg.trainer.get("sync_bn", False)):
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = self.place(model)
        if bool(self.cfg.trainer.get("compile", False)) and not self.dry:
            # compile the forwards as instance attributes: the module stays a plain nn.Module, so
            # its checkpoints, taps and state-dict keys are unchanged
            model.forward_taps = torch.compile(model.forward_taps, dynamic=False)
            model.forward = torch.compile(model.forward, dynamic=False)
        return model

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        module = module.to(self.device)
        if bool(self.cfg.trainer.channels_last):
            module = module.to(memory_format=torch.channels_last)
        return module

    def lr_for(self, node: DictConfig) -> float:
        return float(node.lr) if node.get("lr") is not None else float(self.cfg.optim.lr)

    def epochs_for(self, node: DictConfig) -> int:
        return int(node.epochs) if node.get("epochs") is not None else int(self.cfg.trainer.epochs)

    def model_stats(self, model, prefix: str) -> dict:
        info = self.data.info
        return {
            f"{prefix}_params": count_params(model),
            f"{prefix}_macs": count_macs(model, info.in_chans, info.image_size),
        }

    def evaluate_summary(self, model, prefix: str) -> dict:
        ev = self.trainer.evaluate(model)
        log.info("%s %s: test top-1 %.2f%%", prefix, getattr(model, "arch", ""), ev["test_top1"])
        return {f"{prefix}_top1": ev["test_top1"], f"{prefix}_top5": ev["test_top5"]}

    # -- training
    def fit(self, stage, node: DictConfig, *, label: str | None = None) -> FitResult:
        """Train a stage of this run (its checkpoints in run_dir/checkpoints, rows in metrics.csv)."""
        return self.trainer.fit(
            stage,
            epochs=int(self.cfg.trainer.epochs),
            lr=self.lr_for(node),
            ckpt_dir=None if self.dry else self.run_dir / "checkpoints",
            metrics=[self.metrics],
            resume=bool(self.cfg.trainer.resume),
            label=label,
        )

    def shapes(self, model) -> dict:
        """Every tap's shape (preact taps too where the model has them), from a dry run."""
        info = self.data.info
        return tap_shapes(model, info.in_chans, info.image_size, preact=bool(getattr(model, "supports_preact", False)))

    def new_knowledge(self, student, teacher) -> KnowledgeSet:
        """A fresh knowledge set from cfg.loss (own adapters) set up for this student/teacher edge."""
        knowledge = build_knowledge(self.cfg.loss, self.cfg.get("ce_weight", "auto"))
        self.setup_knowledge(knowledge, student, teacher)
        return knowledge

    def setup_knowledge(self, knowledge: KnowledgeSet, student, teacher) -> None:
        """Build the terms' adapters from the probed shapes and move them to the device."""
        knowledge.setup(self.shapes(student), self.shapes(teacher), self.data.info)
        self.place(knowledge)

    def teacher_cache(self, node: DictConfig, role: str, taps: set[str]):
        """The teacher-output cache of ``role`` when ``node.cache`` is set (else None)."""
        from kdrun.engine.cache import TeacherCache, cache_dtype

        if not node.get("cache") or self.dry:
            return None
        dtype = cache_dtype(str(node.get("cache_dtype") or "auto"), self.amp_dtype)
        topk = node.get("cache_topk")
        key = {
            "teacher": self.keys[role], "dataset": self.recipe(node)["dataset"], "seed": int(self.cfg.seed),
            "batch_size": int(self.cfg.trainer.batch_size), "taps": sorted(taps), "amp": amp_name(self.amp_dtype),
            "dtype": str(dtype), "topk": topk, "version": 1,
        }
        cache = TeacherCache(self.cfg.paths.cache, key, self.device, dtype, topk=topk,
                             num_classes=self.data.info.num_classes)
        log.info("teacher cache: %s", cache.size_note())
        return cache

    def distill(self, student, teacher, node: DictConfig, *, name: str = "student", epochs: int | None = None,
                ckpt_dir: Path | None = None, metrics=None, resume: bool | None = None,
                label: str | None = None, cache=None) -> FitResult:
        """Train ``student`` from the frozen ``teacher`` with cfg.loss: init stages, then the main stage.

        Defaults: this run's checkpoints, metrics, epochs and resume flag. Init stages are skipped
        when resuming a stage that has already started (its checkpoint holds the initialised weights).
        """
        from kdrun.schemes.stages import DistillStage, InitStage

        ckpt_dir = self.run_dir / "checkpoints" if ckpt_dir is None and not self.dry else ckpt_dir
        metrics = [self.metrics] if metrics is None else metrics
        resume = bool(self.cfg.trainer.resume) if resume is None else resume
        resume = resume and ckpt_dir is not None
        epochs = int(self.cfg.trainer.epochs) if epochs is None else epochs
        knowledge = self.new_knowledge(student, teacher)
        if not (resume and (ckpt_dir / "last.pt").is_file()):  # a resumed main stage was initialised
            for term in knowledge.terms.values():
                if term.init_epochs > 0:
                    log.info("init stage of %s: %d epochs", term.name, term.init_epochs)
                    self.trainer.fit(
                        InitStage(student, teacher, term, owner=name), epochs=int(term.init_epochs),
                        lr=float(term.init_lr) if term.init_lr is not None else self.lr_for(node),
                        ckpt_dir=None, metrics=metrics, label=f"{label or name}: init {term.name}",
                    )
        cache = cache(knowledge.teacher_taps() | {"logits"}) if callable(cache) else cache
        fit = self.trainer.fit(
            DistillStage(student, teacher, knowledge, name, cache=cache), epochs=epochs, lr=self.lr_for(node),
            ckpt_dir=ckpt_dir, metrics=metrics, resume=resume, label=label or name,
        )
        if cache is not None:
            log.info("teacher cache: %d batches read, %d computed (%s)", cache.hits, cache.misses, cache.size_note())
        return fit

    def recipe(self, node: DictConfig) -> dict:
        """Everything that determines a baseline-trained model (the store's key)."""
        cfg = self.cfg
        dataset = to_plain(cfg.dataset)
        dataset.pop("download", None)
        for key in ("root", "path"):
            if dataset.get(key):
                dataset[key] = str(Path(str(dataset[key])).expanduser().resolve())
        return {
            "kind": "baseline",
            "model": str(node.name),
            "source": str(node.get("_target_")),
            "pretrained": node.get("pretrained"),
            "dataset": dataset,
            "seed": int(cfg.seed),
            "epochs": self.epochs_for(node),
            "batch_size": int(cfg.trainer.batch_size),
            "lr": self.lr_for(node),
            "optim": {k: v for k, v in to_plain(cfg.optim).items() if k != "lr"},
            "sched": to_plain(cfg.sched),
            "limit_train_batches": cfg.trainer.limit_train_batches,
        }

    def obtain_model(self, node: DictConfig, role: str, teacher=None, teacher_role: str | None = None,
                     init_seed: int | None = None):
        """A trained model for ``role``: from ``node.checkpoint``, or the store (training it first).

        Without ``teacher`` the store trains it from labels (scheme=baseline); with one (a frozen
        model obtained earlier under ``teacher_role``) it distils it with cfg.loss, as teacher
        assistants and born-again generations are. The recipe hash covers the teacher's identity.
        """
        from kdrun.schemes.stages import SupervisedStage

        seed = int(self.cfg.seed) if init_seed is None else int(init_seed)
        model = self.build_model(node, seed)
        ckpt = node.get("checkpoint")
        if ckpt:
            try:
                payload = read_checkpoint(ckpt)
                load_into(model, payload, ckpt, role=role)
            except CheckpointError as exc:  # name the key the file came from
                key = "teacher.checkpoint" if role.startswith("teacher") else f"{role}.checkpoint"
                raise CheckpointError(f"{key}={ckpt}: {exc}") from None
            log.info("%s %s: loaded %s", role, node.name, ckpt)
            self.sources[role] = str(ckpt)
            self.keys[role] = file_digest(ckpt)
            return model

        if self.dry:  # preflight: an untrained model stands in for the stored one
            self.keys[role] = f"preflight-{role}"
            return model
        recipe = self.recipe(node)
        if init_seed is not None:
            recipe["init_seed"] = seed
        if teacher is not None:
            recipe.update(kind="distill", teacher=self.keys[teacher_role], loss=to_plain(self.cfg.loss),
                          epochs=int(self.cfg.trainer.epochs))
        entry = self.store.entry(str(self.cfg.dataset.name), str(node.name), int(self.cfg.seed), recipe)
        what = f"{role} {node.name}"
        epochs = recipe["epochs"]

        def train(entry_dir: Path | None) -> dict:
            """Train into ``entry_dir``; None: a non-main rank of torchrun, which writes nothing."""
            how = "scheme=baseline" if teacher is None else f"{loss_name(self.cfg.loss)} from the {teacher_role}"
            log.info("%s: training it (%s, %d epochs) -> %s", what, how, epochs, entry_dir)
            fresh = self.build_model(node, seed)
            writes = entry_dir is not None
            sinks = [MetricsWriter(entry_dir / "metrics.csv"), self.metrics] if writes else []
            ckpts = entry_dir / "checkpoints" if writes else None
            resume = not self.world.active  # ranks could not agree on where a resumed training stands
            try:
                if teacher is None:
                    fit = self.trainer.fit(
                        SupervisedStage(fresh, role), epochs=epochs, lr=recipe["lr"],
                        ckpt_dir=ckpts, metrics=sinks, resume=resume, label=what,
                    )
                else:
                    fit = self.distill(fresh, teacher, node, name=role, epochs=epochs,
                                       ckpt_dir=ckpts, metrics=sinks, resume=resume, label=what)
            except DivergedError as exc:
                if writes:  # the entry holds no model.pt: never reused; its summary says why
                    write_json(entry_dir / "summary.json", {"status": exc.status, "error": str(exc), "recipe": recipe})
                raise
            if not writes:
                return {}
            summary = {"status": "ok", "model": str(node.name), "role": role, **fit.as_summary("model"),
                       "top1": fit.top1_last, "recipe": recipe}
            write_json(entry_dir / "summary.json", summary)
            save_checkpoint(entry_dir / MODEL_FILE, fresh, top1=fit.top1_last, top1_best=fit.top1_best,
                            epochs=epochs)
            return summary

        path, trained = self.store.obtain(entry, recipe, what, train, self.world)
        if not trained:
            log.info("%s: reusing %s", what, path)
        payload = read_checkpoint(path)
        load_into(model, payload, path, role=role)
        self.sources[role] = str(path)
        self.stored[role] = payload
        self.keys[role] = entry.name
        return model


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (first 16 hex digits): the identity of a given checkpoint."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


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
    if not world.is_main:  # under torchrun only rank 0 writes; the others work in a scratch dir
        run_dir = Path(tempfile.mkdtemp(prefix=f"kdrun-rank{world.rank}-"))
        logging.getLogger("kdrun").setLevel(logging.WARNING)
    run_dir = Path(run_dir) if run_dir is not None else (_run_dir_from_hydra() or _default_run_dir(cfg))
    fresh = not (run_dir / "config.yaml").exists()
    if not fresh and cfg.trainer.get("resume") is True:
        check_resume(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_temp_files(run_dir)
    overrides = list(overrides) if overrides is not None else _overrides_from_hydra()
    t0 = time.perf_counter()
    summary = initial_summary(cfg, overrides)
    handler = _attach_log_file(run_dir)
    started = rejected = False
    try:
        validate_run_config(cfg)
        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
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
        started = True
        ctx = RunContext(cfg, run_dir, data, device, amp_dtype, knowledge, world)
        summary.update(scheme.run(ctx))
        if cfg.get("compare_baseline"):
            summary.update(_compare_baseline(ctx, summary))
        for role, src in ctx.sources.items():
            summary[f"{role}_source"] = src
        summary["status"] = "ok"
    except BaseException as exc:
        summary["status"] = getattr(exc, "status", "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
        summary["error"] = error_text(exc)
        if not isinstance(exc, (KdrunError, KeyboardInterrupt)):
            handler.handle(logging.makeLogRecord(  # the traceback goes to kdrun.log only
                {"name": "kdrun", "levelno": logging.ERROR, "levelname": "ERROR",
                 "msg": "run failed", "exc_info": (type(exc), exc, exc.__traceback__)}))
        rejected = (not keep_rejected and fresh and not started and world.is_main
                    and isinstance(exc, KdrunError) and exc.exit_code == 2)
        raise
    finally:
        summary["wall_seconds"] = round(time.perf_counter() - t0, 3)
        summary["run_dir"] = str(run_dir)
        summary["host"] = platform.node()
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
        if rejected or not world.is_main:
            remove_run_dir(run_dir)
        dist.shutdown(world)
        if stop is not None:
            raise stop
    return summary


def error_text(exc: BaseException) -> str:
    """The one-line error of a run: a KdrunError's message, 'interrupted', or ``Type: first line``."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, KdrunError):
        return str(exc)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"


def preflight(scheme, cfg, run_dir, data, device, amp_dtype, knowledge, world) -> float:
    """Run the scheme once in dry mode (:class:`RunContext` ``dry=True``): every model is built (and
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
        scheme.run(RunContext(cfg, run_dir, data, device, amp_dtype, knowledge, world, dry=True))
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
               "sweep_name", "optimize_metric")
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


def _compare_baseline(ctx: RunContext, summary: dict) -> dict:
    """Train (or reuse) the student from labels alone with the same recipe and seed."""
    node = ctx.cfg.student
    model = ctx.obtain_model(node, role="student_baseline")
    ev = ctx.trainer.evaluate(model)
    stored = ctx.stored.get("student_baseline", {})
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
