"""Checks of a composed config, before anything is built or trained.

Every bad value is one :class:`~kdrun.errors.ConfigError` line naming the key, the value and the rule
(``trainer.batch_size=1.5 must be an integer >= 1``). Names (groups, models, terms) are checked
before composing (:func:`kdrun.config.check_overrides`); unknown keys by :func:`check_keys`.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from kdrun.errors import ConfigError, choices_text


# ---------------------------------------------------------------------------- typed values
def _get(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
    except Exception as exc:  # noqa: BLE001 - an interpolation that cannot be resolved
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{key}: cannot resolve its value ({first})") from None


def is_integer(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and math.isfinite(value) and value.is_integer())


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(cfg: DictConfig, key: str, minimum: int, *, optional: bool = False) -> int | None:
    value = _get(cfg, key)
    if value is None and optional:
        return None
    if not is_integer(value) or value < minimum:
        extra = " or null" if optional else ""
        raise ConfigError(f"{key}={value} must be an integer >= {minimum}{extra}")
    return int(value)


def number(cfg: DictConfig, key: str, *, minimum: float | None = None, above: float | None = None,
           below: float | None = None, optional: bool = False) -> float | None:
    """A finite number with optional bounds: ``minimum`` (>=), ``above`` (>), ``below`` (<)."""
    value = _get(cfg, key)
    if value is None and optional:
        return None
    rule = " and ".join(r for r in (
        f">= {minimum:g}" if minimum is not None else "", f"> {above:g}" if above is not None else "",
        f"< {below:g}" if below is not None else "") if r)
    ok = is_number(value) and math.isfinite(value)
    ok = ok and (minimum is None or value >= minimum) and (above is None or value > above)
    ok = ok and (below is None or value < below)
    if not ok:
        what = "a finite number" + (f" {rule}" if rule else "") + (" or null" if optional else "")
        raise ConfigError(f"{key}={value} must be {what}")
    return float(value)


def boolean(cfg: DictConfig, key: str) -> bool:
    value = _get(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value} must be true or false")
    return value


def choice(cfg: DictConfig, key: str, choices: Iterable[str]) -> str:
    value = _get(cfg, key)
    choices = list(choices)
    if str(value) not in choices or isinstance(value, bool):
        raise ConfigError(f"{key}={value} is not one of {choices_text(choices)}{did_you_mean(str(value), choices)}")
    return str(value)


def did_you_mean(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


# ---------------------------------------------------------------------------- the run config
def validate(cfg: DictConfig) -> None:
    """Check every value kdrun reads from the root, trainer, optim, sched and model sections."""
    integer(cfg, "seed", 0)
    boolean(cfg, "compare_baseline")
    ce = _get(cfg, "ce_weight")
    if ce != "auto":
        number(cfg, "ce_weight", minimum=0)
    integer(cfg, "trainer.epochs", 0)
    for key in ("batch_size", "eval_batch_size", "eval_every", "log_every"):
        integer(cfg, f"trainer.{key}", 1)
    for key in ("limit_train_batches", "limit_eval_batches", "threads"):
        integer(cfg, f"trainer.{key}", 1, optional=True)
    for key in ("channels_last", "resume", "save_checkpoints", "sync_bn", "compile"):
        boolean(cfg, f"trainer.{key}")
    choice(cfg, "trainer.amp", ("auto", "off", "bf16", "fp16"))
    choice(cfg, "trainer.progress", ("auto", "on", "off"))
    device = _get(cfg, "trainer.device")
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or _is_cuda_index(device)):
        raise ConfigError(f"trainer.device={device} is not one of auto, cpu, cuda, cuda:N")
    _validate_optim(cfg)
    _validate_sched(cfg)
    for role in ("teacher", "student"):
        if cfg.get(role) is not None:
            _validate_model(cfg, role)


def _is_cuda_index(device: str) -> bool:
    head, _, index = device.partition(":")
    return head == "cuda" and index.isdigit()


def _validate_optim(cfg: DictConfig) -> None:
    number(cfg, "optim.lr", above=0)
    number(cfg, "optim.weight_decay", minimum=0)
    if "momentum" in cfg.optim:
        number(cfg, "optim.momentum", minimum=0)
    if "nesterov" in cfg.optim:
        boolean(cfg, "optim.nesterov")
    if "betas" in cfg.optim:
        betas = _get(cfg, "optim.betas")
        if not isinstance(betas, (list, ListConfig)) or len(betas) != 2 or not all(
                is_number(b) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"optim.betas={betas} must be two numbers in [0, 1), e.g. [0.9,0.999]")


def _validate_sched(cfg: DictConfig) -> None:
    number(cfg, "sched.warmup_epochs", minimum=0)
    if "milestones" in cfg.sched:
        milestones = _get(cfg, "sched.milestones")
        if not isinstance(milestones, (list, ListConfig)) or not all(is_integer(m) and m >= 0 for m in milestones):
            raise ConfigError(f"sched.milestones={milestones} must be a list of epochs (integers >= 0), "
                              "e.g. [150,180,210]")
    if "gamma" in cfg.sched:
        number(cfg, "sched.gamma", above=0)
    if "min_lr" in cfg.sched:
        number(cfg, "sched.min_lr", minimum=0)


def _validate_model(cfg: DictConfig, role: str) -> None:
    node = cfg[role]
    if "epochs" in node:
        integer(cfg, f"{role}.epochs", 0, optional=True)
    if "lr" in node:
        number(cfg, f"{role}.lr", above=0, optional=True)
    if "cache" in node:
        boolean(cfg, f"{role}.cache")
    if "cache_topk" in node:
        integer(cfg, f"{role}.cache_topk", 1, optional=True)
    if "cache_dtype" in node:
        choice(cfg, f"{role}.cache_dtype", ("auto", "float32", "float16", "bfloat16"))


# ---------------------------------------------------------------------------- keys
def check_keys(cfg: DictConfig, keys: Iterable[str]) -> None:
    """Every ``a.b.c`` set on the command line must exist in ``cfg`` (composed without those keys).

    A key of an unselected knowledge term names the selection to make; a near miss gets a
    did-you-mean. Keys under ``hydra`` are Hydra's to check.
    """
    from kdrun.config import group_options

    for key in keys:
        parts = key.split(".")
        if parts[0] == "hydra" or len(parts) < 2:
            continue
        node: Any = cfg
        for depth, part in enumerate(parts):
            parent = ".".join(parts[:depth])
            if isinstance(node, DictConfig) and part in node:
                node = node[part]
                continue
            if isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            if parts[0] == "loss" and depth == 1:
                terms = [o for o in group_options("loss") if "+" not in o and o != "none"]
                selected = "+".join(cfg.loss.keys()) or "none"
                if part in terms:
                    raise ConfigError(f"{key}: the term {part} is not selected (loss={selected}); select it, "
                                      f"e.g. loss={selected}+{part}" if selected != "none" else
                                      f"{key}: the term {part} is not selected; select it with loss={part}")
                raise ConfigError(f"{key}: no knowledge term '{part}'{did_you_mean(part, terms)}; "
                                  f"valid: {choices_text(terms)}")
            siblings = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
            prefix = f"{parent}." if parent else ""
            close = difflib.get_close_matches(part, siblings, n=1, cutoff=0.6)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            valid = f"; valid keys of {parent}: {choices_text(siblings)}" if siblings and parent else ""
            raise ConfigError(f"unknown key {key}{hint}{valid}")
