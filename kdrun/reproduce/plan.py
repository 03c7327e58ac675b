"""From pairs x methods x seeds and the budget flags to `kdrun -m` commands, and back from job dirs.

Every (pair, method, seed) is one kdrun job with a fixed list of command-line overrides:

    experiment=cifar100/<pair> loss=<method> seed=<s> <common> <method extras>
    experiment=cifar100/<pair> scheme=baseline seed=<s> <common> <vanilla extras>     (vanilla)

``common`` is the budget (``dataset=``, ``trainer.epochs=``, ``trainer.limit_train_batches=``,
``paths.store=``), the user's pass-through overrides and, when the epochs differ from the recipe's
240, the lr milestones scaled to the budget. ``method extras`` are what only that method's config
has: the scaled DKD warm-up for dkd (the pair's DKD beta comes with its experiment file), the scaled
``loss.<term>.init_epochs`` for ab/ft/fsp, and user overrides given as ``METHOD:KEY=VALUE``.

Jobs of one pair whose extras are equal run as one sweep (``loss=kd,fitnet,... seed=0,1,2``);
vanilla runs once per distinct student (pairs that share a student share its baseline runs).

A job dir counts for a (pair, method, seed) when the overrides Hydra recorded for it
(``.hydra/overrides.yaml``, hydra.* left out) are exactly the planned ones, so runs with another
budget or other flags in the same --out never mix into a table. A planned job that already has an
ok job dir is not run again (unless --force).
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdrun.errors import ConfigError
from kdrun.reproduce.catalog import BY_LOSS, BY_NAME, experiment_name

SWEEPS_DIR = "sweeps"
VANILLA_DIR = "vanilla"


# ---------------------------------------------------------------------------- overrides
def override_key(text: str) -> str:
    return text.split("=", 1)[0].lstrip("+~")


def is_hydra(text: str) -> bool:
    key = override_key(text)
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def merge(base: list[str], extra: list[str]) -> list[str]:
    """``base`` with every entry whose key ``extra`` sets replaced by ``extra``'s (appended)."""
    keys = {override_key(e) for e in extra}
    return [b for b in base if override_key(b) not in keys] + list(extra)


def check_override(text: str, flag: str = "--override") -> None:
    """One KEY=VALUE with a single value (a sweep would add jobs the tables cannot place)."""
    if "=" not in text or not override_key(text):
        raise ConfigError(f"{flag} '{text}' is not KEY=VALUE, e.g. trainer.threads=1 or dkd:loss.dkd.beta=8")
    if is_hydra(text):
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_override(text)
    except Exception as exc:  # noqa: BLE001 - Hydra's parse errors are several lines
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{flag} '{text}': {first}") from None
    if parsed.is_sweep_override():
        raise ConfigError(f"{flag} '{text}' is a sweep; give one value (the seeds are --seeds, the methods --methods)")


def split_method_override(text: str) -> tuple[str | None, str]:
    """`dkd:loss.dkd.beta=8` -> ('dkd', 'loss.dkd.beta=8'); `trainer.threads=1` -> (None, ...)."""
    head = text.split("=", 1)[0]
    if ":" not in head:
        return None, text
    method, rest = text.split(":", 1)
    if method not in BY_NAME or method == "teacher":
        valid = [m for m in BY_NAME if m != "teacher"]
        raise ConfigError(f"--override '{text}': unknown method '{method}'; valid: {', '.join(valid)}")
    return method, rest


# ---------------------------------------------------------------------------- options
@dataclass
class Options:
    pairs: list[str]
    methods: list[str]  # report rows, teacher and vanilla included
    seeds: list[int]
    out: Path
    epochs: int | None = None
    limit_train_batches: int | None = None
    dataset: str | None = None
    store: str | None = None
    launcher: str | None = None
    overrides: list[str] = field(default_factory=list)  # for every job (hydra.* only on the commands)
    method_overrides: dict[str, list[str]] = field(default_factory=dict)
    force: bool = False

    @property
    def distill_methods(self) -> list[str]:
        return [m for m in self.methods if BY_NAME[m].loss]

    def budget(self) -> list[str]:
        out = []
        if self.dataset is not None:
            out.append(f"dataset={self.dataset}")
        if self.epochs is not None:
            out.append(f"trainer.epochs={self.epochs}")
        if self.limit_train_batches is not None:
            out.append(f"trainer.limit_train_batches={self.limit_train_batches}")
        if self.store is not None:
            out.append(f"paths.store={self.store}")
        return out


# ---------------------------------------------------------------------------- pairs, as composed
@dataclass
class PairInfo:
    name: str
    teacher: str      # as this invocation runs it (pass-through overrides included)
    student: str
    family: str
    dkd_beta: float
    recipe_teacher: str  # as the experiment file names them
    recipe_student: str


@dataclass
class Recipe:
    """What the scaling needs: the full recipe's lengths and this invocation's epochs."""

    full_epochs: int
    epochs: int
    milestones: list[int] | None  # multistep milestones of the composed config; None: another schedule
    #: term -> {key: (the full recipe's value, the smallest scaled value)} of its epoch_keys
    term_epochs: dict[str, dict[str, tuple[float, int]]]

    @property
    def scaled(self) -> bool:
        return self.epochs != self.full_epochs

    def scale(self, value: float, minimum: int) -> int:
        return max(minimum, int(value * self.epochs / self.full_epochs + 0.5))


def _compose(overrides: list[str]):
    from kdrun.config import compose

    return compose([o for o in overrides if not is_hydra(o)])


def describe_pairs(pairs: list[str], common: list[str]) -> dict[str, PairInfo]:
    """Compose every pair with the common overrides: the models it runs, its DKD beta."""
    infos = {}
    for pair in pairs:
        exp = f"experiment={experiment_name(pair)}"
        base = _compose([exp])
        cfg = _compose([exp, *common])
        node = base.get("pair") or {}
        infos[pair] = PairInfo(
            name=pair, teacher=str(cfg.teacher.name), student=str(cfg.student.name),
            family=str(node.get("family", "")), dkd_beta=float(_compose([exp, "loss=dkd"]).loss.dkd.beta),
            recipe_teacher=str(base.teacher.name), recipe_student=str(base.student.name),
        )
    return infos


def describe_recipe(pair: str, common: list[str]) -> Recipe:
    """The full recipe's epochs, milestones, init and warm-up lengths; the epochs of this invocation."""
    exp = f"experiment={experiment_name(pair)}"
    from kdrun.config import component_class

    terms = sorted({t for m in BY_LOSS for t in m.split("+")})
    full = _compose([exp, f"loss={'+'.join(terms)}"])
    cfg = _compose([exp, *common])
    milestones = cfg.sched.get("milestones")  # a schedule with milestones has them scaled with the epochs
    milestones = [int(m) for m in milestones] if milestones is not None else None
    term_epochs = {t: {k: (float(full.loss[t][k]), low) for k, low in component_class(full.loss[t]).epoch_keys.items()}
                   for t in terms}
    return Recipe(full_epochs=int(full.trainer.epochs), epochs=int(cfg.trainer.epochs), milestones=milestones,
                  term_epochs=term_epochs)


# ---------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Cell:
    """One (pair, method, seed) of the tables; vanilla cells of pairs sharing a student share runs."""

    pair: str
    method: str
    seed: int


@dataclass
class Planned:
    cell: Cell
    overrides: list[str]  # the job's overrides (hydra.* left out), experiment= first
    key: tuple            # how a job dir is matched to it


@dataclass
class Sweep:
    """One `kdrun -m` invocation."""

    label: str
    args: list[str]        # after `kdrun -m`, without hydra.sweep.dir
    parent: Path           # its sweep dir is a fresh numbered dir under this
    cells: list[Cell]
    sweep_dir: Path | None = None

    def command(self) -> list[str]:
        return ["kdrun", "-m", *self.args, f"hydra.sweep.dir={self.sweep_dir or self.parent / '<n>'}"]

    def command_text(self) -> str:
        return " ".join(shlex.quote(a) for a in self.command())


@dataclass
class Plan:
    options: Options
    pairs: dict[str, PairInfo]
    recipe: Recipe
    common: list[str]            # every job's shared overrides (no hydra.*)
    hydra_args: list[str]        # launcher and other hydra.* overrides, on every command
    jobs: dict[Cell, Planned]
    vanilla_rep: dict[str, str]  # student -> the pair whose experiment its vanilla jobs use

    @property
    def sweeps_root(self) -> Path:
        return self.options.out / SWEEPS_DIR


def _vanilla_key(student: str, overrides: list[str] | frozenset[str]) -> tuple:
    return ("vanilla", student, frozenset(o for o in overrides if override_key(o) != "experiment"))


def method_extras(method: str, info: PairInfo, recipe: Recipe, options: Options) -> list[str]:
    m = BY_NAME[method]
    extras: list[str] = list(m.extras)
    if m.loss and recipe.scaled:  # warm-ups and init stages shrink with the schedule (the terms' epoch_keys)
        for term in m.loss.split("+"):
            for key, (value, low) in recipe.term_epochs.get(term, {}).items():
                extras.append(f"loss.{term}.{key}={recipe.scale(value, low)}")
    return merge(extras, options.method_overrides.get(method, []))


#: keys the runner sets itself: --override may not
RUNNER_KEYS = {"experiment": "--pairs", "loss": "--methods", "scheme": "--methods", "seed": "--seeds",
               "hydra.sweep.dir": "--out"}


def build(options: Options) -> Plan:
    for text in [*options.overrides, *(t for ts in options.method_overrides.values() for t in ts)]:
        flag = RUNNER_KEYS.get(override_key(text))
        if flag:
            raise ConfigError(f"--override '{text}': {override_key(text)} is set by the runner; use {flag}")
    for text in options.overrides:
        check_override(text)
    for method, texts in options.method_overrides.items():
        for text in texts:
            check_override(text, f"--override {method}:")
            if is_hydra(text):
                raise ConfigError(f"--override {method}:{text}: hydra settings apply to every sweep; "
                                  f"give them without '{method}:'")
    hydra_args = [o for o in options.overrides if is_hydra(o)]
    if options.launcher:
        hydra_args = merge([f"hydra/launcher={options.launcher}"], hydra_args)
    user = [o for o in options.overrides if not is_hydra(o)]
    common = merge(options.budget(), user)

    recipe = describe_recipe(options.pairs[0], common)
    if recipe.epochs < 1:
        raise ConfigError(f"trainer.epochs={recipe.epochs}: the reproduction needs at least 1 epoch")
    user_keys = {override_key(o) for o in user}
    if recipe.scaled and recipe.milestones is not None and "sched.milestones" not in user_keys:
        scaled = [recipe.scale(m, 1) for m in recipe.milestones]
        common = common + [f"sched.milestones=[{','.join(map(str, scaled))}]"]
    pairs = describe_pairs(options.pairs, common)

    jobs: dict[Cell, Planned] = {}
    vanilla_rep: dict[str, str] = {}
    for pair in options.pairs:
        info = pairs[pair]
        vanilla_rep.setdefault(info.student, pair)
        for method in options.methods:
            if method == "teacher":
                continue
            for seed in options.seeds:
                cell = Cell(pair, method, seed)
                if method == "vanilla":
                    exp = experiment_name(vanilla_rep[info.student])
                    ovs = [f"experiment={exp}", *BY_NAME["vanilla"].extras, f"seed={seed}", *common,
                           *merge([], options.method_overrides.get("vanilla", []))]
                    jobs[cell] = Planned(cell, ovs, _vanilla_key(info.student, ovs))
                else:
                    ovs = [f"experiment={experiment_name(pair)}", f"loss={BY_NAME[method].loss}", f"seed={seed}",
                           *common, *method_extras(method, info, recipe, options)]
                    jobs[cell] = Planned(cell, ovs, ("distill", frozenset(ovs)))
    return Plan(options, pairs, recipe, common, hydra_args, jobs, vanilla_rep)


# ---------------------------------------------------------------------------- job dirs
@dataclass
class JobDir:
    path: Path
    overrides: list[str]
    summary: dict[str, Any] | None
    mtime: float

    @property
    def status(self) -> str:
        if self.summary is None:
            return "incomplete"
        return str(self.summary.get("status") or "failed")

    @property
    def error(self) -> str:
        if self.summary is None:
            return "no summary.json: still running, or stopped before it finished"
        return str(self.summary.get("error") or "")

    def value(self, key: str) -> str | None:
        for o in self.overrides:
            if override_key(o) == key:
                return o.split("=", 1)[1]
        return None


def read_job_dirs(root: Path) -> list[JobDir]:
    """Every kdrun job dir under ``root`` (its recorded overrides, hydra.* left out, and summary)."""
    import yaml

    from kdrun.report.sweep import find_job_dirs

    if not root.is_dir():
        return []
    found = []
    for d in find_job_dirs(root):
        path = d / ".hydra" / "overrides.yaml"
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(data, list):
            continue
        summary = None
        mtime = path.stat().st_mtime
        try:
            summary = json.loads((d / "summary.json").read_text())
            mtime = os.stat(d / "summary.json").st_mtime
        except (OSError, ValueError):
            summary = None
        if summary is not None and not isinstance(summary, dict):
            summary = None
        found.append(JobDir(d, [str(o) for o in data if not is_hydra(str(o))], summary, mtime))
    return found


def job_key(job: JobDir, student_of_pair: dict[str, str]) -> tuple | None:
    """The key a planned job would have if this dir were its run (None: not a dir of this runner)."""
    if set(BY_NAME["vanilla"].extras) <= set(job.overrides):
        student = (job.summary or {}).get("student")
        if student is None:
            exp = job.value("experiment") or ""
            student = student_of_pair.get(exp.rsplit("/", 1)[-1])
        return _vanilla_key(str(student), job.overrides) if student else None
    loss = job.value("loss")
    if loss in BY_LOSS:
        return ("distill", frozenset(job.overrides))
    return None


def match(plan: Plan, jobs: list[JobDir]) -> dict[Cell, list[JobDir]]:
    """Planned cell -> its job dirs, newest first."""
    students = {p: i.student for p, i in plan.pairs.items()}
    by_key: dict[tuple, list[JobDir]] = {}
    for job in jobs:
        key = job_key(job, students)
        if key is not None:
            by_key.setdefault(key, []).append(job)
    out = {}
    for cell, planned in plan.jobs.items():
        found = sorted(by_key.get(planned.key, []), key=lambda j: j.mtime, reverse=True)
        out[cell] = found
    return out


def done(runs: list[JobDir]) -> bool:
    return any(j.status == "ok" for j in runs)


def sweeps(plan: Plan, matched: dict[Cell, list[JobDir]]) -> list[Sweep]:
    """The `kdrun -m` invocations that run every planned job without an ok job dir (all with --force)."""
    opts = plan.options
    todo = [c for c in plan.jobs if opts.force or not done(matched.get(c, []))]
    out: list[Sweep] = []

    def grouped(cells: list[Cell], signature) -> dict[tuple, list[Cell]]:
        groups: dict[tuple, list[Cell]] = {}
        for c in cells:
            groups.setdefault(signature(c), []).append(c)
        return groups

    for pair in opts.pairs:
        cells = [c for c in todo if c.pair == pair and c.method != "vanilla"]
        info = plan.pairs[pair]
        # methods whose extras are equal share a sweep, split further by the seeds each still needs
        by_extras = grouped(cells, lambda c, i=info: tuple(method_extras(c.method, i, plan.recipe, opts)))
        for extras, group in by_extras.items():
            seeds_of: dict[str, list[int]] = {}
            for c in group:
                seeds_of.setdefault(c.method, []).append(c.seed)
            by_seeds: dict[tuple, list[str]] = {}
            for method, seeds in seeds_of.items():
                by_seeds.setdefault(tuple(seeds), []).append(method)
            for seeds, methods in by_seeds.items():
                losses = ",".join(BY_NAME[m].loss for m in methods)
                args = [f"experiment={experiment_name(pair)}", f"loss={losses}", f"seed={','.join(map(str, seeds))}",
                        *plan.common, *extras, *plan.hydra_args]
                label = f"{pair}: {', '.join(methods)}"
                out.append(Sweep(label, args, plan.sweeps_root / pair,
                                 [Cell(pair, m, s) for m in methods for s in seeds]))

    # vanilla: one job per (student, seed), under the experiment of the first pair with that student
    vanilla = [c for c in todo if c.method == "vanilla"]
    needed: dict[tuple[str, int], list[Cell]] = {}
    for c in vanilla:
        rep = plan.vanilla_rep[plan.pairs[c.pair].student]
        needed.setdefault((rep, c.seed), []).append(c)
    seeds_of_rep: dict[str, list[int]] = {}
    for rep, seed in needed:
        seeds_of_rep.setdefault(rep, []).append(seed)
    by_seeds: dict[tuple, list[str]] = {}
    for rep, seeds in seeds_of_rep.items():
        by_seeds.setdefault(tuple(sorted(seeds)), []).append(rep)
    extras = merge([], opts.method_overrides.get("vanilla", []))
    for seeds, reps in by_seeds.items():
        args = [*BY_NAME["vanilla"].extras, f"experiment={','.join(experiment_name(r) for r in reps)}",
                f"seed={','.join(map(str, seeds))}", *plan.common, *extras, *plan.hydra_args]
        students = ", ".join(plan.pairs[r].student for r in reps)
        cells = [c for (rep, seed), cs in needed.items() if rep in reps and seed in seeds for c in cs]
        out.append(Sweep(f"vanilla: {students}", args, plan.sweeps_root / VANILLA_DIR, cells))
    return out


def fresh_dir(parent: Path) -> Path:
    """The first of parent/0, parent/1, ... that does not exist yet."""
    n = 0
    while (parent / str(n)).exists():
        n += 1
    return parent / str(n)
