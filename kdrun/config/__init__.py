"""Config plumbing: where conf/ lives, `a+b` combos, name checks, resolvers, instantiate().

Nothing else in kdrun calls ``hydra.utils.instantiate``: :func:`instantiate` is the one call site.
"""

from __future__ import annotations

import contextlib
import functools
import re
from pathlib import Path
from typing import Any, Iterable

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from kdrun.errors import ConfigError, choices_text


def _conf_dir() -> Path:
    """kdrun's config dir: ``kdrun/conf`` in an installed wheel (the repository's top-level conf/,
    shipped as the package ``kdrun.conf``), else conf/ beside the package (a source checkout or an
    editable install)."""
    package = Path(__file__).resolve().parents[1]
    shipped = package / "conf"
    return shipped if (shipped / "train.yaml").is_file() else package.parent / "conf"


CONF_DIR = _conf_dir()

#: groups whose option may be a `+`-joined combination: loss terms (merged), teachers (a list)
COMBO_GROUPS = ("loss", "teacher")


#: config dirs added with Hydra's ``hydra.searchpath=[file://DIR,...]`` (your own schemes, datasets,
#: models, optimizers... beside kdrun's conf/): their options count in every name check
_SEARCH_DIRS: list[Path] = []


def set_search_path(argv: Iterable[str]) -> list[Path]:
    """Take the ``hydra.searchpath`` of a command line (``file://`` entries and plain paths)."""
    dirs: list[Path] = []
    for arg in argv:
        key, sep, _ = arg.partition("=")
        if sep and key.lstrip("+") == "hydra.searchpath":
            for entry in _search_entries(arg):
                if entry.startswith("file://") or "://" not in entry:
                    dirs.append(Path(entry.removeprefix("file://")).expanduser())
    _SEARCH_DIRS[:] = dirs
    register_model_roles()
    return dirs


def _search_entries(arg: str) -> list[str]:
    """The entries of a ``hydra.searchpath=[a,b]`` override (one plain entry too); [] when Hydra cannot
    read it (the command-line checks report that)."""
    try:
        value = parse_override(arg).value()
    except ConfigError:
        return []
    items = value if isinstance(value, list) else [value] if isinstance(value, str) else []
    return [str(v) for v in items if v is not None]


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
    """The groups a command line picks from: the folders of the config dirs and the groups of Hydra's
    ConfigStore (teacher, student), less conf/model, whose options are picked through those roles."""
    stored = {k for k, v in ConfigStore.instance().repo.items() if isinstance(v, dict)}
    return sorted(({p.name for base in config_dirs() if base.is_dir() for p in base.iterdir() if p.is_dir()}
                   | stored) - {"hydra", MODEL_GROUP})


# ---------------------------------------------------------------------------- overrides, as Hydra reads them
@functools.lru_cache(maxsize=1)
def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def parse_override(text: str):
    """Hydra's parse of one command-line override (an ``Override``); a syntax error is one ConfigError."""
    try:
        return _parser().parse_override(text)
    except Exception as exc:  # noqa: BLE001 - Hydra's parse errors span several lines
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot read the override '{text}': {first}; write KEY=VALUE, quoting values "
                          "with spaces or brackets, e.g. 'trainer.epochs=10' or 'ta=[resnet56,resnet32]'") from None


def glob_options(group: str, glob: Any) -> list[str]:
    """The options of ``group`` that a Hydra ``glob()`` matches, sub-folder options (``cifar100/r56_r20``)
    and the search path's included, `a+b` combinations not."""
    return glob.filter([o for o in group_options(group) if "+" not in o])


def sweep_values(ov: Any) -> list[str] | None:
    """The value of each job of a parsed sweep override, as override text: `a,b`, choice(), range(),
    sort(), shuffle(), and glob() over the group's options (:func:`glob_options`); None for a sweep
    that cannot be listed (interval(), a sweeper's own syntax)."""
    from hydra.core.override_parser.types import Glob

    try:
        if isinstance(ov.value(), Glob):
            return glob_options(ov.key_or_group, ov.value())
        return list(ov.sweep_string_iterator())
    except Exception:  # noqa: BLE001 - only a sweeper plugin can list it
        return None


def chosen_names(ov: Any) -> list[str] | None:
    """The option names a parsed group override picks: its value, each element of a list (`[a,b]`),
    each value of a sweep (:func:`sweep_values`' sweeps; lists in it flattened); `null` for None.
    None when the sweep cannot be listed."""
    from hydra.core.override_parser.types import Glob

    value = ov.value()
    if isinstance(value, Glob):
        items: list[Any] = glob_options(ov.key_or_group, value)
    elif ov.is_sweep_override():
        try:
            items = list(ov.sweep_iterator())
        except Exception:  # noqa: BLE001 - interval() and the like
            return None
    else:
        items = [value]
    names = []
    for item in items:
        names.extend("null" if v is None else str(v) for v in (item if isinstance(item, list) else [item]))
    return names


def register_combo(group: str, value: str) -> None:
    """Register `group/a+b`.

    loss: a config whose defaults list is [a, b] (Hydra's multi-select: one key per term).
    teacher: one node named `a+b` (the multi-teacher scheme composes each member's model config,
    :func:`model_node`); the root config's teacher keys (checkpoint, epochs, ...) join it.
    """
    parts = value.split("+")
    cs = ConfigStore.instance()
    if group == "loss":
        cs.store(group=group, name=value, node={"defaults": parts})
    else:
        cs.store(group=group, name=value, node={"name": value})


def split_models(value) -> list[str]:
    """`a+b`, `[a, b]` (a list) or `a` as a list of model names; None as []."""
    if value is None:
        return []
    if isinstance(value, (list, tuple, ListConfig)):
        return [str(v) for v in value]
    return [v for v in str(value).split("+") if v]


#: the group of model configs (conf/model/<name>.yaml) and the groups that pick one for their role
MODEL_GROUP = "model"
MODEL_ROLES = ("teacher", "student")
_ROLE_OPTIONS: set[str] = set()  # the model options registered in MODEL_ROLES


def register_model_roles() -> None:
    """Make every model config an option of the teacher and student groups.

    ``teacher=resnet56`` selects ``teacher/resnet56``: a ConfigStore entry whose defaults list is
    ``[/model@_here_: resnet56]``, i.e. conf/model/resnet56.yaml composed at ``teacher``, so each
    model's YAML exists once (in conf/ or a ``hydra.searchpath`` dir). The role keys (checkpoint,
    epochs, lr, cache...) come from the root config. Options of dirs no longer searched are dropped.
    """
    names = set(group_options(MODEL_GROUP))
    for role in MODEL_ROLES:
        for name in _ROLE_OPTIONS - names:
            _unstore(f"{role}/{name}")
        for name in names:
            group, _, leaf = f"{role}/{name}".rpartition("/")
            ConfigStore.instance().store(group=group, name=leaf, node={"defaults": [{f"/{MODEL_GROUP}@_here_": name}]})
    _ROLE_OPTIONS.clear()
    _ROLE_OPTIONS.update(names)


def _unstore(path: str) -> None:
    """Remove the ConfigStore entry ``group/name`` (if there)."""
    *groups, leaf = path.split("/")
    node = ConfigStore.instance().repo
    for part in groups:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(f"{leaf}.yaml", None)


register_model_roles()


def model_node(name: str) -> DictConfig:
    """The config of one model by name (assistants, peers, the teachers of ``teacher=a+b``): Hydra's
    composition of conf/model/<name>, so its defaults list, interpolations and the search path's
    dirs apply, as for ``teacher=<name>``. Role keys are not in it: the scheme sets those it uses."""
    from hydra import compose as hydra_compose

    valid = group_options(MODEL_GROUP)
    if name not in valid:
        raise ConfigError(f"unknown model '{name}'; valid: {choices_text(valid)}")
    with _kdrun_hydra():
        node = hydra_compose(config_name=None, overrides=[f"+{MODEL_GROUP}={name}", *search_path_overrides()])
    node = node[MODEL_GROUP]
    missing = sorted(key.partition(".")[2] for key in OmegaConf.missing_keys(node))
    if missing:
        raise ConfigError(f"model '{name}' leaves {missing[0]} unset (???); assistants, peers and the teachers "
                          "of teacher=a+b take a model config that needs no further keys")
    return OmegaConf.create(OmegaConf.to_container(node, resolve=True))


@contextlib.contextmanager
def _kdrun_hydra():
    """Hydra initialised on kdrun's conf/ for a compose, also inside a running Hydra app (the CLI's),
    whose state is put back afterwards."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    saved = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            yield
    finally:
        GlobalHydra.instance().hydra = saved


def instantiate_model(node: DictConfig, **data: Any) -> Any:
    """Build a model from its config node (``_target_`` and the model's own keys, beside which the
    role keys sit): the keys and ``data`` (num_classes, in_chans, image_size) the target accepts."""
    import inspect

    from hydra.utils import get_method

    target = node.get("_target_")
    try:
        params = inspect.signature(get_method(str(target))).parameters
    except Exception as exc:  # noqa: BLE001 - a mistyped _target_ in a model's YAML
        raise ConfigError(f"{node._key() or 'model'}._target_={target}: cannot import it "
                          f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    own = {k: node[k] for k in node if k != "_target_" and (takes_all or k in params)}
    given = {k: v for k, v in data.items() if takes_all or k in params}
    return instantiate(OmegaConf.create({"_target_": target, **own}), **given)


def normalize_argv(argv: Iterable[str]) -> list[str]:
    """Rewrite the group choices Hydra cannot select as typed (:func:`_normalized`); the rest as is."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and not arg.startswith("-") and ("glob(" in value or (key.lstrip("+~") == "teacher" and "[" in value)):
            arg = _normalized(arg)
        out.append(arg)
    return out


def _normalized(arg: str) -> str:
    """A group's glob() as the list of the options it matches (Hydra's own glob sees neither sub-folder
    options such as experiment=cifar100/r56_r20 nor kdrun's model roles): `experiment=glob(cifar100/*)`
    -> `experiment=cifar100/r110_r20,...`; a list choice of the teacher group as its `+` form:
    teacher=[a,b] -> a+b, and in a sweep [a,b],[c,d] -> a+b,c+d. Unreadable text is left to the checks."""
    from hydra.core.override_parser.types import Glob

    try:
        ov = parse_override(arg)
    except ConfigError:
        return arg
    key, value = arg.partition("=")[0], ov.value()
    if isinstance(value, Glob):
        matches = glob_options(ov.key_or_group, value) if ov.key_or_group in config_groups() else []
        return f"{key}={','.join(matches)}" if matches else arg
    if ov.key_or_group != "teacher" or ov.is_delete():
        return arg
    try:
        items = list(ov.sweep_iterator()) if ov.is_sweep_override() else [value]
    except Exception:  # noqa: BLE001 - not a list of model names: the checks say so
        return arg
    if not any(isinstance(item, list) for item in items):
        return arg
    return f"{key}={','.join('+'.join(map(str, i)) if isinstance(i, list) else str(i) for i in items)}"


def check_overrides(overrides: Iterable[str]) -> None:
    """Check group choices on the command line before Hydra composes; register `a+b` combos.

    Every value a choice can take counts, as Hydra's parser reads it: lists, and each value of a sweep
    (`a,b`, choice(), range(), sort(), shuffle(), glob()). Raises ConfigError with one line naming the
    bad value and the valid choices.
    """
    from hydra.core.override_parser.types import Glob

    groups = set(config_groups())
    list_keys = model_list_keys()
    for text in overrides:
        key = text.partition("=")[0].lstrip("+~")
        if "=" not in text or text.startswith("hydra") or "${" in text or key not in groups.union(list_keys):
            continue
        ov = parse_override(text)
        names = None if ov.is_delete() else chosen_names(ov)
        if names is None:
            continue
        if key in list_keys:
            _check_model_list(key, text, names)
            continue
        if not names and isinstance(ov.value(), Glob):
            raise ConfigError(f"{text} matches no {key} option; valid: {choices_text(group_options(key))}")
        for name in names:
            _check_choice(key, name)


def _check_model_list(key: str, text: str, names: list[str]) -> None:
    """The models of a model-list key (ta, peers): `a+b`, `[a,b]` or a sweep of those."""
    from kdrun.config.checks import did_you_mean

    valid = [o for o in group_options(MODEL_GROUP) if "+" not in o]  # the model configs
    for part in (p for name in names if name not in ("null", "") for p in name.split("+") if p):
        if part not in valid:
            raise ConfigError(f"unknown model '{part}' in {text}{did_you_mean(part, valid)}; "
                              f"valid: {choices_text(valid)}")


def _check_choice(key: str, value: str) -> None:
    """One option of the group ``key``: a name of it, or for COMBO_GROUPS a `+` combination of
    names (registered as a config, :func:`register_combo`)."""
    from kdrun.config.checks import did_you_mean

    valid = group_options(key)
    if value in ("null", "none") and key == "experiment":
        return
    if "+" in value and key not in COMBO_GROUPS:
        raise ConfigError(f"{key}={value}: only {', '.join(COMBO_GROUPS)} options combine with '+'; "
                          f"valid {key} choices: {choices_text(valid)}")
    parts = value.split("+") if key in COMBO_GROUPS else [value]
    for part in parts:
        if part not in valid:
            what = "loss term" if key == "loss" and len(parts) > 1 else key
            where = f" in '{value}'" if len(parts) > 1 else ""
            raise ConfigError(f"unknown {what} '{part}'{where}{did_you_mean(part, valid)}; "
                              f"valid: {choices_text(valid)}")
    if len(parts) > 1:
        if len(set(parts)) != len(parts):
            twice = next(part for part in parts if parts.count(part) > 1)
            what = "term" if key == "loss" else "teacher"
            raise ConfigError(f"{key}={value} names the {what} {twice} twice; name each {what} once")
        if "none" in parts:
            raise ConfigError(f"{key}={value}: 'none' cannot be combined with other terms")
        register_combo(key, value)


def component_class(node: Any) -> type:
    """The class a `_target_` node names, without building it (what a scheme or term declares)."""
    from hydra.utils import get_class

    target = node.get("_target_") if hasattr(node, "get") else None
    try:
        return get_class(str(target))
    except Exception as exc:  # noqa: BLE001 - a mistyped _target_ in a user's YAML
        raise ConfigError(f"cannot import _target_ {target}: {str(exc).splitlines()[0]}") from None


def _run_name(*, _root_: DictConfig) -> str:
    """The scheme's name for a run dir (:meth:`kdrun.schemes.base.Scheme.run_name`)."""
    return component_class(_root_.scheme).run_name(_root_)


def model_list_keys() -> tuple[str, ...]:
    """Root keys that hold model lists (``ta``, ``peers``): those every scheme config declares."""
    keys: set[str] = set()
    for option in group_options("scheme"):
        node = _load_option("scheme", option)
        node = node.get("scheme", node) if node is not None else None
        if node is not None and node.get("_target_"):
            with contextlib.suppress(ConfigError):
                keys.update(component_class(node).model_list_keys)
    return tuple(sorted(keys))


def _load_option(group: str, option: str) -> DictConfig | None:
    for base in config_dirs():
        path = base / group / f"{option}.yaml"
        if path.is_file():
            return OmegaConf.load(path)
    return None


def loss_name(loss: Any) -> str:
    """The `+` name of the selected knowledge terms, in selection order ('none' when empty)."""
    keys = list(loss.keys()) if loss is not None else []
    return "+".join(keys) if keys else "none"


#: the longest swept-values part of a sweep job's folder name (file names end at 255 bytes)
MAX_JOB_DIRNAME = 150


def _job_dirname(dirname: Any, *, _root_: DictConfig) -> str:
    """The name of a sweep job's folder after its number (``hydra.sweep.subdir`` in train.yaml): the
    job's ``${hydra.job.override_dirname}``, which kdrun restricts to the swept keys, e.g.
    ``loss.kd.alpha=0.9,loss.kd.temperature=4`` (:func:`kdrun.config.command_line.job_dirname_override`),
    as a safe file name: `/` becomes `-` (experiment=cifar100/r56_r20 -> experiment=cifar100-r56_r20),
    any other character but letters, digits and ``._,=+@%[]-`` becomes `_`. Where nothing is swept
    (``kdrun -m`` of single values), the run's name, :func:`_run_name`. A search sweeper's trials
    (Optuna) are named by the values drawn: those are not on the command line."""
    name = re.sub(r"[^\w.,=+@%\[\]-]", "_", str(dirname or "").replace("/", "-"))[:MAX_JOB_DIRNAME]
    return name or _run_name(_root_=_root_)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("kdrun_run_name"):
        OmegaConf.register_new_resolver("kdrun_run_name", _run_name)
    if not OmegaConf.has_resolver("kdrun_job_dirname"):
        OmegaConf.register_new_resolver("kdrun_job_dirname", _job_dirname)


def compose(overrides: Iterable[str] = (), config_name: str = "train") -> DictConfig:
    """Compose the real configs (as the CLI does) without running: for tests and scripts."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides)
    register_resolvers()
    if any(o.split("=", 1)[0].lstrip("+") == "hydra.searchpath" for o in overrides):
        set_search_path(overrides)
    elif _SEARCH_DIRS:
        overrides = [*overrides, *search_path_overrides()]
    overrides = normalize_argv(overrides)
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


def build_knowledge(loss_cfg, ce_weight="auto"):
    """Instantiate every term of ``cfg.loss`` (one `_target_` node per term) into a KnowledgeSet
    whose label cross-entropy weight is ``ce_weight`` (the root config's ``ce_weight``)."""
    from kdrun.knowledge import KnowledgeSet

    terms = {}
    for name, node in (loss_cfg or {}).items():
        if node is None or "_target_" not in node:
            raise ConfigError(f"loss.{name} has no _target_; is conf/loss/{name}.yaml missing "
                              f"'# @package loss.{name}'?")
        terms[name] = instantiate(node)
    return KnowledgeSet(terms, ce_weight)


def optimizer_factory(optim: Any):
    """``make(params, lr)`` -> the optimizer of the ``optim`` config (a partial ``_target_``) at a
    stage's learning rate."""

    def make(params, lr: float):
        partial = instantiate(optim, lr=float(lr), _convert_="all")
        try:
            return partial(params)
        except (TypeError, ValueError) as exc:  # a key the optimizer does not take, or a value it refuses
            raise ConfigError(f"optim._target_={optim.get('_target_')} refuses its settings ({_first_line(exc)}); "
                              "every key of optim except _target_/_partial_ must be an argument of that class"
                              ) from None

    return make


def schedule_factory(sched: Any):
    """``make(base_lr, epochs, steps_per_epoch)`` -> the lr schedule of the ``sched`` config."""

    def make(base_lr: float, epochs: int, steps_per_epoch: int):
        partial = instantiate(sched, _convert_="all")
        try:
            return partial(base_lr, epochs, steps_per_epoch)
        except TypeError as exc:  # a key the schedule does not take
            raise ConfigError(f"sched._target_={sched.get('_target_')} refuses its settings ({_first_line(exc)}); "
                              "every key of sched except _target_/_partial_ must be an argument of that class"
                              ) from None

    return make


def trainer_factories(cfg: Any) -> dict:
    """The optimizer and schedule factories a Trainer takes, from the run config."""
    return {"optimizer": optimizer_factory(cfg.optim), "schedule": schedule_factory(cfg.sched)}


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def to_plain(node: Any) -> Any:
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def parse_overrides(texts: Iterable[str]) -> list[tuple[str, Any]]:
    """(key, typed value) of command-line overrides as Hydra's grammar reads them; hydra.* and
    deletions left out; text Hydra cannot parse is kept as ``key`` and the raw value."""
    items = []
    for text in texts:
        try:
            ov = _parser().parse_override(text)
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
