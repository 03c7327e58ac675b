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

#: groups whose option may be a `+`-joined combination: loss terms (merged), teachers (a list)
COMBO_GROUPS = ("loss", "teacher")
#: plain keys that hold a list of model names: `ta=[a,b]` or `ta=a+b`
MODEL_LIST_KEYS = ("ta", "peers")


#: config dirs added with Hydra's ``hydra.searchpath=[file://DIR,...]`` (your own schemes, datasets,
#: models, optimizers... beside kdrun's conf/): their options count in every name check
_SEARCH_DIRS: list[Path] = []


def set_search_path(argv: Iterable[str]) -> list[Path]:
    """Take the ``hydra.searchpath`` of a command line (``file://`` entries and plain paths)."""
    dirs: list[Path] = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "hydra.searchpath":
            for entry in _split_sweep(value):
                if entry.startswith("file://") or "://" not in entry:
                    dirs.append(Path(entry.removeprefix("file://")).expanduser())
    _SEARCH_DIRS[:] = dirs
    return dirs


def config_dirs() -> list[Path]:
    """kdrun's conf/ and the dirs of ``hydra.searchpath``."""
    return [CONF_DIR, *_SEARCH_DIRS]


def search_path_overrides() -> list[str]:
    """The ``hydra.searchpath`` override that recreates :func:`set_search_path`'s dirs ([] when none)."""
    return [f"hydra.searchpath=[{','.join('file://' + str(d) for d in _SEARCH_DIRS)}]"] if _SEARCH_DIRS else []


def group_options(group: str) -> list[str]:
    """Every option of a config group: the YAML files of conf/<group>/ and of the search path's
    dirs (those in subfolders as `sub/name`, e.g. experiment=cifar100/r56_r20) and registered configs."""
    opts: set[str] = set()
    for base in config_dirs():
        root = base / group
        if root.is_dir():
            opts.update(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))
    repo = ConfigStore.instance().repo
    node = repo.get(group) if isinstance(repo, dict) else None
    if isinstance(node, dict):
        opts.update(name[: -len(".yaml")] for name in node if name.endswith(".yaml"))
    return sorted(opts)


def config_groups() -> list[str]:
    return sorted({p.name for base in config_dirs() if base.is_dir()
                   for p in base.iterdir() if p.is_dir() and p.name != "hydra"})


def _split_sweep(value: str) -> list[str]:
    """Values of a command-line choice: `a`, `a,b` (sweep), `[a,b]` (list form)."""
    value = value.strip()
    m = re.fullmatch(r"(?:choice|range)\((.*)\)", value)
    if m:
        value = m.group(1)
    value = value.strip("[]")
    return [v.strip().strip("'\"") for v in value.split(",") if v.strip()]


def register_combo(group: str, value: str) -> None:
    """Register `group/a+b`.

    loss: a config whose defaults list is [a, b] (Hydra's multi-select: one key per term).
    teacher: one node named `a+b` (the multi-teacher scheme reads each member's own config).
    """
    parts = value.split("+")
    cs = ConfigStore.instance()
    if group == "loss":
        cs.store(group=group, name=value, node={"defaults": parts})
    else:
        cs.store(group=group, name=value, node={"name": value, "lr": None, "checkpoint": None, "epochs": None})


def split_models(value) -> list[str]:
    """`a+b`, `[a, b]` (a list) or `a` as a list of model names; None as []."""
    if value is None:
        return []
    if isinstance(value, (list, tuple, ListConfig)):
        return [str(v) for v in value]
    return [v for v in str(value).split("+") if v]


def model_node(name: str) -> DictConfig:
    """The config of one model by name, as the teacher group has it (conf/teacher/<name>.yaml)."""
    path = CONF_DIR / "teacher" / f"{name}.yaml"
    if name == "timm" or not path.is_file():
        valid = [o for o in group_options("teacher") if o != "timm" and "+" not in o]
        raise ConfigError(f"unknown model '{name}'; valid: {choices_text(valid)}")
    return OmegaConf.load(path)


def normalize_argv(argv: Iterable[str]) -> list[str]:
    """Rewrite list choices of combo groups to the `+` form Hydra can select: teacher=[a,b] -> a+b."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == "teacher" and value.strip().startswith("["):
            arg = f"{key}={'+'.join(_split_sweep(value))}"
        out.append(arg)
    return out


def check_overrides(overrides: Iterable[str]) -> None:
    """Check group choices on the command line before Hydra composes; register `a+b` combos.

    Raises ConfigError with one line naming the bad value and the valid choices.
    """
    from kdrun.config.checks import did_you_mean

    groups = set(config_groups())
    for ov in overrides:
        if "=" not in ov or ov.startswith("hydra"):
            continue
        key, value = ov.split("=", 1)
        key = key.lstrip("+~")
        if key in MODEL_LIST_KEYS and "${" not in value and value.strip() not in ("null", ""):
            valid = [o for o in group_options("teacher") if o != "timm" and "+" not in o]
            for part in _split_sweep(value.replace("+", ",")):
                if part not in valid:
                    raise ConfigError(f"unknown model '{part}' in {key}={value}{did_you_mean(part, valid)}; "
                                      f"valid: {choices_text(valid)}")
            continue
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
                    what = "loss term" if key == "loss" and len(parts) > 1 else key
                    where = f" in '{v}'" if len(parts) > 1 else ""
                    raise ConfigError(f"unknown {what} '{part}'{where}{did_you_mean(part, valid)}; "
                                      f"valid: {choices_text(valid)}")
            if len(parts) > 1:
                if len(set(parts)) != len(parts):
                    twice = next(part for part in parts if parts.count(part) > 1)
                    what = "term" if key == "loss" else "teacher"
                    raise ConfigError(f"{key}={v} names the {what} {twice} twice; name each {what} once")
                if "none" in parts:
                    raise ConfigError(f"{key}={v}: 'none' cannot be combined with other terms")
                register_combo(key, v)


def _run_name(*, _root_: DictConfig) -> str:
    """`<scheme>_<who teaches whom>_<loss>_<dataset>`, e.g. offline_resnet56-resnet20_kd+fitnet_cifar100."""
    scheme = str(_root_.scheme.name)
    student = str(_root_.student.name)
    loss = loss_name(_root_.loss)
    data = str(_root_.dataset.name)
    if scheme == "baseline":
        return f"{scheme}_{student}_{data}"
    if scheme == "ta_chain":
        models = "-".join([str(_root_.teacher.name), *split_models(_root_.get("ta")), student])
    elif scheme == "mutual":
        models = "+".join(split_models(_root_.get("peers"))) or "peers"
    elif scheme in ("born_again", "byot"):
        models = student
    else:
        models = f"{_root_.teacher.name}-{student}"
    return f"{scheme}_{models}_{loss}_{data}"


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

    overrides = normalize_argv(overrides)
    register_resolvers()
    if any(o.split("=", 1)[0].lstrip("+") == "hydra.searchpath" for o in overrides):
        set_search_path(overrides)
    elif _SEARCH_DIRS:
        overrides = [*overrides, *search_path_overrides()]
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
        reason = " ".join(str(exc).split())[:300]  # Hydra's first line only names the target
        raise ConfigError(f"cannot build {target}: {reason}") from exc


def to_plain(node: Any) -> Any:
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def recipe_hash(recipe: dict) -> str:
    """A short stable hash of a JSON-able recipe (sorted keys)."""
    blob = json.dumps(recipe, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def parse_overrides(texts: Iterable[str]) -> list[tuple[str, Any]]:
    """(key, typed value) of command-line overrides as Hydra's grammar reads them; hydra.* and
    deletions left out; text Hydra cannot parse is kept as ``key`` and the raw value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    items = []
    for text in texts:
        try:
            ov = parser.parse_override(text)
        except Exception:  # noqa: BLE001 - keep what was typed
            key, _, value = text.partition("=")
            items.append((key.lstrip("+~"), value))
            continue
        if ov.is_delete() or ov.key_or_group.startswith("hydra"):
            continue
        value = ov.value()
        if not isinstance(value, (str, int, float, bool, type(None), list, dict)):
            value = str(value)
        items.append((ov.key_or_group, value))
    return items
