"""Trained models a run starts from: a given checkpoint, or the model store (trained into it once per
recipe, then reused by every later run and sweep job); and a teacher's output cache."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from kdrun.config import loss_name, to_plain
from kdrun.data import dataset_source
from kdrun.engine import distributed as dist
from kdrun.engine.checkpoint import load_into, read_checkpoint, save_checkpoint
from kdrun.engine.device import amp_name
from kdrun.engine.io import write_json
from kdrun.engine.metrics import MetricsWriter
from kdrun.engine.store import MODEL_FILE, ModelStore
from kdrun.errors import CheckpointError, DivergedError
from kdrun.runtime.cache_policy import sweep_default
from kdrun.runtime.distiller import Distiller
from kdrun.runtime.models import ModelFactory
from kdrun.runtime.shipping import write_model_files

log = logging.getLogger("kdrun")


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (first 16 hex digits): the identity of a given checkpoint."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


class TeacherProvider:
    """Obtains trained models by role (teacher, ta1, gen0, student_baseline...) and remembers where
    each came from (``sources``), its stored accuracies (``stored``) and its identity (``keys``).
    ``dry`` (the preflight): an untrained model stands in for a stored one; given checkpoints load."""

    def __init__(self, cfg: DictConfig, models: ModelFactory, distiller: Distiller, world: dist.World = dist.SINGLE,
                 dry: bool = False, amp_dtype: torch.dtype | None = None) -> None:
        self.cfg, self.models, self.distiller, self.world, self.dry = cfg, models, distiller, world, dry
        self.amp_dtype = amp_dtype
        self.store = ModelStore(cfg.paths.store)
        self.sources: dict[str, str] = {}  # role -> checkpoint the model came from
        self.stored: dict[str, dict] = {}  # role -> store payload (accuracies) of store-trained models
        self.keys: dict[str, str] = {}  # role -> identity of its weights (recipe hash or file digest)
        self.models_by_role: dict[str, torch.nn.Module] = {}  # role -> the model obtained

    def recipe(self, node: DictConfig) -> dict:
        """Everything that determines a baseline-trained model (the store's key)."""
        cfg = self.cfg
        return {
            "kind": "baseline", "model": str(node.name), "source": str(node.get("_target_")),
            "pretrained": node.get("pretrained"), "dataset": dataset_source(cfg.dataset).identity(),
            "seed": int(cfg.seed), "epochs": self.models.epochs_for(node), "batch_size": int(cfg.trainer.batch_size),
            "lr": self.models.lr_for(node), "optim": {k: v for k, v in to_plain(cfg.optim).items() if k != "lr"},
            "sched": to_plain(cfg.sched), "limit_train_batches": cfg.trainer.limit_train_batches,
            **({"quantize": str(node.quantize)} if node.get("quantize") else {}),  # a QAT student baseline
        }

    def obtain(self, node: DictConfig, role: str, teacher=None, teacher_role: str | None = None,
               init_seed: int | None = None):
        """A trained model for ``role``: from ``node.checkpoint``, or the store (training it first).

        Without ``teacher`` the store trains it from labels; with one (a frozen model obtained
        earlier under ``teacher_role``) it distils it with cfg.loss, as teacher assistants and
        born-again generations are. The recipe hash covers the teacher's identity.
        """
        seed = int(self.cfg.seed) if init_seed is None else int(init_seed)
        model = self.models.build(node, seed)
        self.models_by_role[role] = model
        if node.get("checkpoint"):
            return self._from_checkpoint(model, node, role)
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

        def train(entry_dir: Path | None) -> dict:
            return self._train_into(entry_dir, node, role, what, recipe, seed, teacher, teacher_role)

        path, trained = self.store.obtain(entry, recipe, what, train, self.world)
        if not trained:
            log.info("%s: reusing %s", what, path)
        payload = read_checkpoint(path)
        load_into(model, payload, path, role=role)
        self.sources[role], self.stored[role], self.keys[role] = str(path), payload, entry.name
        return model

    def _from_checkpoint(self, model, node: DictConfig, role: str):
        ckpt = node.checkpoint
        try:
            load_into(model, read_checkpoint(ckpt), ckpt, role=role)
        except CheckpointError as exc:  # name the key the file came from
            key = "teacher.checkpoint" if role.startswith("teacher") else f"{role}.checkpoint"
            raise CheckpointError(f"{key}={ckpt}: {exc}") from None
        log.info("%s %s: loaded %s", role, node.name, ckpt)
        self.sources[role] = str(ckpt)
        self.keys[role] = file_digest(ckpt)
        return model

    def _train_into(self, entry_dir: Path | None, node, role, what, recipe, seed, teacher, teacher_role) -> dict:
        """Train a store entry's model into ``entry_dir``; None: a non-main rank of torchrun (writes nothing)."""
        from kdrun.schemes.stages import SupervisedStage

        epochs = recipe["epochs"]
        how = "scheme=baseline" if teacher is None else f"{loss_name(self.cfg.loss)} from the {teacher_role}"
        log.info("%s: training it (%s, %d epochs) -> %s", what, how, epochs, entry_dir)
        fresh = self.models.build(node, seed)
        writes = entry_dir is not None
        sinks = [MetricsWriter(entry_dir / "metrics.csv"), self.distiller.metrics] if writes else []
        ckpts = entry_dir / "checkpoints" if writes else None
        resume = not self.world.active  # ranks could not agree on where a resumed training stands
        try:
            if teacher is None:
                fit = self.distiller.trainer.fit(SupervisedStage(fresh, role), epochs=epochs, lr=recipe["lr"],
                                                 ckpt_dir=ckpts, metrics=sinks, resume=resume, label=what)
            else:
                fit = self.distiller.distill(fresh, teacher, node, name=role, epochs=epochs, ckpt_dir=ckpts,
                                             metrics=sinks, resume=resume, label=what)
        except DivergedError as exc:
            if writes:  # the entry holds no model.pt: never reused; its summary says why
                write_json(entry_dir / "summary.json", {"status": exc.status, "error": str(exc), "recipe": recipe})
            raise
        if not writes:
            return {}
        summary = {"status": "ok", "model": str(node.name), "role": role, **fit.as_summary("model"),
                   "top1": fit.top1_last, "recipe": recipe}
        write_json(entry_dir / "summary.json", summary)
        # the portable copy first: the entry counts as trained once model.pt exists
        write_model_files(entry_dir / "model.safetensors", node, fresh, self.models.info, top1=fit.top1_last,
                          top1_best=fit.top1_best, epochs=epochs)
        save_checkpoint(entry_dir / MODEL_FILE, fresh, top1=fit.top1_last, top1_best=fit.top1_best, epochs=epochs)
        return summary

    def cache(self, node: DictConfig, role: str, taps: set[str]):
        """The teacher-output cache of ``role`` when ``node.cache`` is set, or by default in a sweep
        whose jobs share the teacher and the data plan (:mod:`kdrun.runtime.cache_policy`); else None."""
        from kdrun.engine.cache import TeacherCache, cache_dtype

        if self.dry or not (node.get("cache") or sweep_default(self.cfg, node, role,
                                                                lambda: self._run_bytes(node, role, taps))):
            return None
        spec = str(node.get("cache_dtype") or "auto")
        dtype = cache_dtype(spec)
        topk = node.get("cache_topk")
        key = {
            "teacher": self.keys[role], "dataset": self.recipe(node)["dataset"], "seed": int(self.cfg.seed),
            "batch_size": int(self.cfg.trainer.batch_size), "taps": sorted(taps), "amp": amp_name(self.amp_dtype),
            # auto keeps the computed dtype: fp32 runs keep the key of the float32 files they always wrote
            "dtype": str(dtype if dtype is not None else torch.float32 if self.amp_dtype is None else "computed"),
            "topk": topk, "version": 1,
        }
        if self.world.active:  # each rank computes its own share of every batch
            key["shard"] = [self.world.rank, self.world.size]
        cache = TeacherCache(self.cfg.paths.cache, key, self.models.device, dtype, topk=topk,
                             num_classes=self.models.info.num_classes)
        log.info("teacher cache: %s", cache.size_note())
        return cache

    def _run_bytes(self, node: DictConfig, role: str, taps: set[str]) -> int:
        """What ``role``'s outputs ``taps`` for every epoch of this run take in the cache."""
        from kdrun.engine.cache import estimate_epoch_bytes

        model = self.models_by_role.get(role)
        shapes = self.models.shapes(model) if model is not None else {"logits": (self.models.info.num_classes,)}
        itemsize = 4 if self.amp_dtype is None else 2
        known = {t for t in taps if t in shapes}
        return int(self.cfg.trainer.epochs) * estimate_epoch_bytes(shapes, self.models.info.n_train, known, itemsize)
