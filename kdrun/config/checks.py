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
    """`` (did you mean x?)`` for the closest option (difflib's candidates, the fewest edits first)."""
    close = difflib.get_close_matches(word, list(options), n=4, cutoff=0.6)
    if not close:
        return ""
    best = min(close, key=lambda option: (_edits(word.lower(), option.lower()), close.index(option)))
    return f" (did you mean {best}?)"


def _edits(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions that turn ``a`` into ``b``."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


# ---------------------------------------------------------------------------- the run config
def validate(cfg: DictConfig) -> None:
    """Check every value kdrun reads from the root, trainer, optim, sched, model, loss and dataset
    sections, and that every file the run reads (checkpoints, pretrained weights) is there."""
    _validate_missing(cfg)
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
    _validate_cuda(device)
    _validate_optim(cfg)
    _validate_sched(cfg)
    for role in ("teacher", "student"):
        if cfg.get(role) is not None:
            _validate_model(cfg, role)
    _validate_loss(cfg)
    _validate_loggers(cfg)
    _validate_finite(cfg, "scheme")
    if cfg.get("dataset") is not None:
        from kdrun.data import check_dataset_config

        check_dataset_config(cfg.dataset)


def _validate_missing(cfg: DictConfig) -> None:
    """A mandatory value left at ``???`` (student=timm without student.name): one line naming it."""
    from kdrun.config import MODEL_ROLES

    missing = sorted(OmegaConf.missing_keys(cfg))
    if not missing:
        return
    key = missing[0]
    role, _, rest = key.partition(".")
    if role in MODEL_ROLES and rest == "name":
        raise ConfigError(f"the {role}'s model config needs a name: set {key}=<model name>, e.g. {key}=resnet18")
    raise ConfigError(f"{key} has no value (???); set it with {key}=VALUE")


def _validate_cuda(device: str) -> None:
    if not device.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"trainer.device={device} but no CUDA device is available; use trainer.device=cpu or auto")
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        raise ConfigError(f"trainer.device={device} but only {count} CUDA device(s) are visible; "
                          f"use cuda:0..cuda:{count - 1} or auto")


def _is_cuda_index(device: str) -> bool:
    head, _, index = device.partition(":")
    return head == "cuda" and index.isdigit()


def _validate_optim(cfg: DictConfig) -> None:
    """The values every optimizer of conf/optim may have, then the optimizer itself built over one
    dummy parameter (its class refuses a key it does not take)."""
    number(cfg, "optim.lr", above=0)
    if "weight_decay" in cfg.optim:
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
    _validate_finite(cfg, "optim")
    import torch

    from kdrun.config import optimizer_factory

    optimizer_factory(cfg.optim)([torch.zeros(1, requires_grad=True)], float(cfg.optim.lr))


def _validate_sched(cfg: DictConfig) -> None:
    """The values every schedule of conf/sched may have, then the schedule itself built."""
    if "warmup_epochs" in cfg.sched:
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
    _validate_finite(cfg, "sched")
    from kdrun.config import schedule_factory

    schedule_factory(cfg.sched)(0.1, 0, 1)


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
    if "quantize" in node and _get(cfg, f"{role}.quantize") is not None:
        choice(cfg, f"{role}.quantize", ("int8",))
    _validate_model_name(cfg, role)
    if node.get("pretrained") is not None:
        _existing_file(cfg, f"{role}.pretrained", _get(cfg, f"{role}.pretrained"),
                       "give a local weights file (safetensors or a state dict) or null")
    if "checkpoint" in node and node.get("checkpoint") is not None:
        ckpt = _get(cfg, f"{role}.checkpoint")
        for path in (ckpt if isinstance(ckpt, (list, ListConfig)) else [ckpt]):
            _existing_file(cfg, f"{role}.checkpoint", path,
                           f"give a kdrun checkpoint (a run's checkpoints/best.pt) or null to train the {role}")


def _validate_model_name(cfg: DictConfig, role: str) -> None:
    """The model's ``_target_`` imports, and its builder's ``check_name`` (where it has one, e.g.
    timm's registry for kdrun.models.timm_model) accepts ``<role>.name``."""
    node = cfg[role]
    if node.get("_target_") is None:  # teacher=a+b: each member is checked by name
        return
    from hydra.utils import get_method

    target = _get(cfg, f"{role}._target_")
    try:
        builder = get_method(str(target))
    except Exception as exc:  # noqa: BLE001 - a mistyped _target_ in a model's YAML
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{role}._target_={target}: cannot import it ({first})") from None
    check = getattr(builder, "check_name", None)
    if check is not None and "name" in node:
        name = _get(cfg, f"{role}.name")
        try:
            check(name)
        except ConfigError as exc:
            raise ConfigError(f"{role}.name={name}: {exc}") from None


def _existing_file(cfg: DictConfig, key: str, value: Any, fix: str) -> None:
    """``value`` names a readable, non-empty file; else one line naming the key and the fix."""
    import os

    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}={value} must be a file path; {fix}")
    path = os.path.expanduser(value)
    if not os.path.exists(path):
        problem = "no such file"
    elif os.path.isdir(path):
        problem = "is a directory, not a file"
    elif not os.access(path, os.R_OK):
        problem = "cannot be read (permission denied)"
    elif os.path.getsize(path) == 0:
        problem = "is empty (0 bytes)"
    else:
        return
    raise ConfigError(f"{key}={value}: {problem}; {fix}")


def _validate_loggers(cfg: DictConfig) -> None:
    """Each selected tracker (conf/logger) imports, its package is installed (else one line naming the
    kdrun extra) and its class accepts its settings (``Tracker.check``)."""
    loggers = cfg.get("logger")
    if not isinstance(loggers, DictConfig):
        return
    from kdrun.config import component_class

    for name in loggers.keys():
        node = loggers[name]
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"logger.{name} has no _target_; is conf/logger/{name}.yaml missing "
                              f"'# @package logger.{name}'?")
        component_class(node).check(str(name), node)


# ---------------------------------------------------------------------------- loss terms
def _validate_loss(cfg: DictConfig) -> None:
    """Each value of a selected knowledge term has its default's type (a number where the default
    is a number, true/false where it is a boolean, a name where it is a name, a list where it is a
    list), and no number is nan or inf. The terms check their ranges when they are built."""
    loss = cfg.get("loss")
    if not isinstance(loss, DictConfig):
        return
    from kdrun.config import config_dirs

    for term in loss.keys():
        node = loss[term]
        path = next((d / "loss" / f"{term}.yaml" for d in config_dirs() if (d / "loss" / f"{term}.yaml").is_file()), None)
        defaults = OmegaConf.load(path) if path is not None else OmegaConf.create({})
        if not isinstance(node, DictConfig):
            continue
        annotations = _annotations(node.get("_target_"))
        for key in node.keys():
            if str(key).startswith("_"):
                continue
            full = f"loss.{term}.{key}"
            value = _get(cfg, full)
            default = defaults.get(key) if isinstance(defaults, DictConfig) else None
            _check_like(full, value, default, annotations.get(str(key), ""))
    _validate_finite(cfg, "loss")


def _annotations(target: Any) -> dict[str, str]:
    """The type annotations (as text) of a term's constructor arguments; {} when unknown."""
    import inspect

    try:
        from hydra.utils import get_class

        params = inspect.signature(get_class(str(target)).__init__).parameters
    except Exception:  # noqa: BLE001 - building the term reports a bad _target_
        return {}
    return {name: str(p.annotation) for name, p in params.items() if p.annotation is not inspect.Parameter.empty}


def _kind(default: Any, annotation: str) -> str | None:
    """What a term value must be: its default's type, else (a null default) its annotation's."""
    if isinstance(default, bool):
        return "bool"
    if is_number(default):
        return "number"
    if isinstance(default, str):
        return "name"
    if isinstance(default, ListConfig):
        return "list"
    words = set(annotation.replace("|", " ").replace("Optional[", " ").replace("]", " ").split()) - {"None"}
    if words and words <= {"float", "int"}:
        return "number"
    if words == {"bool"}:
        return "bool"
    if words == {"str"}:
        return "name"
    return None


def _check_like(key: str, value: Any, default: Any, annotation: str = "") -> None:
    kind = _kind(default, annotation)
    if value is None or kind is None:
        return
    example = f" (default {_show(default)})" if default is not None else ""
    if kind == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{key}={_show(value)} must be true or false")
    if kind == "number" and not (is_number(value) and math.isfinite(value)):
        raise ConfigError(f"{key}={_show(value)} must be a finite number{example}")
    if kind == "name" and not isinstance(value, str):
        raise ConfigError(f"{key}={_show(value)} must be a name{example}")
    if kind == "list" and not isinstance(value, (list, ListConfig)):
        raise ConfigError(f"{key}={_show(value)} must be a list{example}")


def _validate_finite(cfg: DictConfig, section: str) -> None:
    """No nan or inf anywhere under ``section`` (a nan temperature trains to a nan loss)."""
    node = cfg.get(section)
    if not isinstance(node, (DictConfig, ListConfig)):
        return
    try:
        plain = OmegaConf.to_container(node, resolve=True)
    except Exception:  # noqa: BLE001 - the typed checks name an unresolvable key
        return
    for key, value in _leaves(plain, section):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} must be a finite number")


def _leaves(node: Any, prefix: str):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{prefix}.{i}")
    else:
        yield prefix, node


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


# ---------------------------------------------------------------------------- keys
def check_keys(cfg: DictConfig, keys: Iterable[str]) -> None:
    """Every ``a.b.c`` set on the command line must exist in ``cfg`` (composed without those keys).

    A key of an unselected knowledge term names the selection to make; a near miss gets a
    did-you-mean. Keys under ``hydra`` are Hydra's to check.
    """
    from kdrun.config import config_groups, group_options

    for key in keys:
        parts = key.split(".")
        if parts[0] == "hydra":
            continue
        if len(parts) == 1:
            if key not in cfg.keys():
                roots = sorted({str(k) for k in cfg.keys()} | set(config_groups()))
                raise ConfigError(f"unknown key {key}{did_you_mean(key, roots)}; valid: {choices_text(roots)}; "
                                  f"a new key of your own (a tag for the sweep table) needs a '+': +{key}=VALUE")
            continue
        node: Any = cfg
        for depth, part in enumerate(parts):
            parent = ".".join(parts[:depth])
            if isinstance(node, DictConfig) and part in node.keys():  # keys(): `???` values count
                node = node._get_node(part)
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
