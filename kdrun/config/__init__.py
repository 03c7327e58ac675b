"""Config plumbing: where conf/ lives, `a+b` combos, name checks, resolvers, instantiate().

Nothing else in kdrun calls ``hydra.utils.instantiate``: :func:`instantiate` is the one call site.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from kdrun.errors import ConfigError, choices_text

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

#: groups whose option may be a `+`-joined combination (multi-select)
COMBO_GROUPS = ("loss",)
#: groups whose options name models
MODEL_GROUPS = ("teacher", "student")


def group_options(group: str) -> list[str]:
    """Every option of a config group: the YAML files of conf/<group>/ and registered combos."""
    opts = {p.stem for p in (CONF_DIR / group).glob("*.yaml")}
    repo = ConfigStore.instance().repo
    node = repo.get(group) if isinstance(repo, dict) else None
    if isinstance(node, dict):
        opts.update(name[: -len(".yaml")] for name in node if name.endswith(".yaml"))
    return sorted(opts)


def config_groups() -> list[str]:
    return sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")


def _split_sweep(value: str) -> list[str]:
    """Values of a command-line choice: `a`, `a,b` (sweep), `[a,b]` (list form)."""
    value = value.strip()
    m = re.fullmatch(r"(?:choice|range)\((.*)\)", value)
    if m:
        value = m.group(1)
    value = value.strip("[]")
    return [v.strip().strip("'\"") for v in value.split(",") if v.strip()]


def register_combo(group: str, value: str) -> None:
    """Register `group/a+b` as a config whose defaults list is [a, b] (Hydra's multi-select)."""
    parts = value.split("+")
    cs = ConfigStore.instance()
    cs.store(group=group, name=value, node={"defaults": parts})


def check_overrides(overrides: Iterable[str]) -> None:
    """Check group choices on the command line before Hydra composes; register `a+b` combos.

    Raises ConfigError with one line naming the bad value and the valid choices.
    """
    groups = set(config_groups())
    for ov in overrides:
        if "=" not in ov or ov.startswith("hydra"):
            continue
        key, value = ov.split("=", 1)
        key = key.lstrip("+~")
        if key not in groups or "${" in value:
            continue
        valid = group_options(key)
        for v in _split_sweep(value):
            if v in ("null", "none") and key in ("experiment",):
                continue
            if "+" in v and key not in COMBO_GROUPS:
                raise ConfigError(
                    f"{key}={v}: only {', '.join(COMBO_GROUPS)} options combine with '+'; "
                    f"valid {key} choices: {choices_text(valid)}"
                )
            parts = v.split("+") if key in COMBO_GROUPS else [v]
            for part in parts:
                if part not in valid:
                    what = f"{key} term" if len(parts) > 1 else key
                    where = f" in '{v}'" if len(parts) > 1 else ""
                    raise ConfigError(f"unknown {what} '{part}'{where}; valid: {choices_text(valid)}")
            if len(parts) > 1:
                if len(set(parts)) != len(parts):
                    raise ConfigError(f"{key}={v} names a term twice")
                if "none" in parts:
                    raise ConfigError(f"{key}={v}: 'none' cannot be combined with other terms")
                register_combo(key, v)


def _run_name(*, _root_: DictConfig) -> str:
    """`<scheme>_<teacher>-<student>_<loss>_<dataset>` (teacher and loss left out where unused)."""
    scheme = str(_root_.scheme.name)
    student = str(_root_.student.name)
    loss = loss_name(_root_.loss)
    data = str(_root_.dataset.name)
    if scheme == "baseline":
        return f"{scheme}_{student}_{data}"
    return f"{scheme}_{_root_.teacher.name}-{student}_{loss}_{data}"


def loss_name(loss: Any) -> str:
    """The `+` name of the selected knowledge terms, in selection order ('none' when empty)."""
    keys = list(loss.keys()) if loss is not None else []
    return "+".join(keys) if keys else "none"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("kdrun_run_name"):
        OmegaConf.register_new_resolver("kdrun_run_name", _run_name)


def compose(overrides: Iterable[str] = (), config_name: str = "train") -> DictConfig:
    """Compose the real configs (as the CLI does) without running: for tests and scripts."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides)
    register_resolvers()
    check_overrides(overrides)
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def instantiate(node: Any, **kwargs: Any) -> Any:
    """Build an object from a config node with `_target_` (the only instantiate call site)."""
    from hydra.utils import instantiate as hydra_instantiate

    from kdrun.errors import KdrunError

    try:
        return hydra_instantiate(node, **kwargs)
    except Exception as exc:  # Hydra wraps errors raised by the target; surface ours as they are
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, KdrunError):
                raise cause from None
            cause = cause.__cause__ or cause.__context__
        target = node.get("_target_", "?") if hasattr(node, "get") else "?"
        raise ConfigError(f"cannot build {target}: {exc}".splitlines()[0]) from exc


def to_plain(node: Any) -> Any:
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def recipe_hash(recipe: dict) -> str:
    """A short stable hash of a JSON-able recipe (sorted keys)."""
    blob = json.dumps(recipe, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
