"""Whether a run keeps its teacher's outputs (``teacher.cache``) when the command line does not say.

In a multirun (``kdrun -m``) whose jobs share the teacher and the data plan, e.g. a temperature x
alpha grid, the first job to reach an epoch stores the teacher's outputs for that epoch's augmented
views and every later job reads them instead of running the teacher. kdrun turns the cache on there
by itself when that is exact and affordable:

- exact: ``teacher.cache_dtype=auto`` (outputs kept in the dtype the teacher computed them in, read
  back as the same tensors: bit-identical training in fp32 and under AMP) and no ``cache_topk``;
- shared: the sweep varies a key that leaves the teacher's identity and the batches alone (student
  side keys: ``loss``, ``loss.*``, ``ce_weight``, ``student``...; optimiser, schedule and epochs too
  when the teacher is a given checkpoint), so jobs that differ only there read each other's outputs.
  Other swept keys (``seed``, ``teacher``, ``dataset``, the batch size) only split the jobs into
  groups that share within themselves (the cache's key tells them apart). A sweep over such keys
  alone gets no cache: no two of its jobs could share;
- affordable: the run's epochs of outputs take at most a quarter of the free space under
  ``paths.cache``.

``teacher.cache=true`` or ``false`` on the command line decides alone, in any run.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from kdrun.errors import ConfigError

log = logging.getLogger("kdrun")

#: swept keys (and their sub-keys) that change neither the teacher nor an epoch's batches
STUDENT_SIDE = (
    "loss", "ce_weight", "student", "compare_baseline", "optimize_metric", "sweep_name", "trainer.progress",
    "trainer.log_every", "trainer.eval_every", "trainer.save_checkpoints", "trainer.threads",
    "trainer.limit_eval_batches", "trainer.eval_batch_size",
)
#: keys of a store teacher's recipe: harmless when the teacher is a given checkpoint file
TEACHER_RECIPE = ("optim", "sched", "trainer.epochs")
#: the share of the free disk space the outputs of one run may take
DISK_SHARE = 0.25


def under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def sweep_context() -> tuple[list[str], list[str]] | None:
    """``(swept keys, this job's command-line keys)`` of the running Hydra multirun; None outside one.

    The swept keys come from the sweep dir's ``multirun.yaml`` (sweep overrides and sweeper params);
    without that file every key of the job's command line counts as swept.
    """
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except Exception:  # noqa: BLE001 - not under Hydra (tests, scripts)
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    job_keys = [str(o).split("=", 1)[0].lstrip("+~") for o in hc.overrides.task]
    swept = swept_keys(Path(str(hc.sweep.dir)) / "multirun.yaml")
    return (job_keys if swept is None else swept), job_keys


def swept_keys(path: Path) -> list[str] | None:
    """The keys a multirun varies, from its ``multirun.yaml``; None without a readable one."""
    from kdrun.config import parse_override

    try:
        cfg = OmegaConf.load(path)
        task = list(cfg.hydra.overrides.task or [])
        params = dict(cfg.hydra.sweeper.get("params") or {}) if "sweeper" in cfg.hydra else {}
    except Exception:  # noqa: BLE001 - missing or unreadable: the caller is conservative
        return None
    keys = [str(k) for k in params]
    for text in task:
        try:
            override = parse_override(str(text))
        except ConfigError:
            keys.append(str(text).split("=", 1)[0].lstrip("+~"))
            continue
        if override.is_sweep_override():
            keys.append(override.key_or_group)
    return keys


def sharing_key(cfg: DictConfig, node: DictConfig, swept: list[str]) -> str | None:
    """A swept key whose values leave ``node``'s outputs for every batch unchanged, so that jobs which
    differ only there share them; None when the sweep varies no such key."""
    given = node.get("checkpoint") is not None
    for key in swept:
        if key.startswith("hydra."):
            continue
        if under(key, STUDENT_SIDE) or (given and under(key, TEACHER_RECIPE)) or (
                key == "trainer.epochs" and node.get("epochs") is not None):
            return key
    return None


def free_bytes(path: Path) -> int:
    """Free bytes on the file system of ``path`` (or of its deepest existing parent)."""
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def sweep_default(cfg: DictConfig, node: DictConfig, role: str, size: Callable[[], int]) -> bool:
    """``teacher.cache`` for a run whose command line does not set it: on in a multirun whose jobs
    share the teacher and the data plan, when exact and when ``size()`` bytes (the run's outputs)
    fit on the disk."""
    context = sweep_context()
    if context is None:
        return False
    swept, job_keys = context
    if f"{role}.cache" in job_keys:  # said on the command line: that value holds
        return bool(node.get("cache"))
    if str(node.get("cache_dtype") or "auto") != "auto" or node.get("cache_topk") is not None:
        why = f"{role}.cache_dtype/cache_topk make it inexact"
    elif (shared := sharing_key(cfg, node, swept)) is None:
        why = f"no swept key leaves the {role} and the batches alone ({', '.join(swept) or 'none swept'})"
    elif (run_bytes := size()) > DISK_SHARE * free_bytes(Path(str(cfg.paths.cache))):
        why = f"its {run_bytes / 2**30:.1f} GiB would take over a quarter of the free disk under paths.cache"
    else:
        log.info("teacher cache: on by default in this sweep (jobs that differ in %s share the %s's outputs; "
                 "%.1f MiB per run; %s.cache=false turns it off)", shared, role, run_bytes / 2**20, role)
        return True
    log.info("teacher cache: off in this sweep (%s); %s.cache=true turns it on", why, role)
    return False
