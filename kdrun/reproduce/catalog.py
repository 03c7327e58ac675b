"""The benchmark's pairs and methods: names, table order, and what each becomes on kdrun's command line.

Pairs are the experiment files ``conf/experiment/cifar100/<pair>.yaml`` (teacher, student and the
``pair:`` block with the DKD beta); :data:`PAIR_ORDER` is the column order of the published tables
(RepDistiller README: table 1, same family, then table 2, different families).

Methods are the rows. ``teacher`` and ``vanilla`` are always in the report (vanilla is the student
trained from labels, ``scheme=baseline``); the others are kdrun loss choices of the same name.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdrun.config import CONF_DIR
from kdrun.errors import ConfigError

EXPERIMENT_GROUP = "cifar100"
EXPERIMENT_DIR = CONF_DIR / "experiment" / EXPERIMENT_GROUP

#: table order: same-family pairs (RepDistiller README table 1), then cross-family (table 2)
PAIR_ORDER = (
    "w402_w162", "w402_w401", "r56_r20", "r110_r20", "r110_r32", "r32x4_r8x4", "vgg13_vgg8",
    "vgg13_mv2", "r50_mv2", "r50_vgg8", "r32x4_sv1", "r32x4_sv2", "w402_sv1",
)


@dataclass(frozen=True)
class Method:
    name: str               # CLI, CSV and report name
    label: str              # row label of the tables
    loss: str | None = None  # kdrun loss choice; None: not a distillation run (teacher, vanilla)
    extras: tuple[str, ...] = ()  # the published recipe's own overrides (loss weights, the scheme)


#: row order of the report: the RepDistiller README's, then CRD+KD (CRD paper) and DKD (mdistiller)
METHODS = (
    Method("teacher", "Teacher"),
    Method("vanilla", "Vanilla student", extras=("scheme=baseline",)),
    Method("kd", "KD", "kd"),
    Method("fitnet", "FitNet", "fitnet"),
    Method("at", "AT", "at"),
    Method("sp", "SP", "sp"),
    Method("cc", "CC", "cc"),
    Method("vid", "VID", "vid"),
    Method("rkd", "RKD", "rkd"),
    Method("pkt", "PKT", "pkt"),
    Method("ab", "AB", "ab"),
    Method("ft", "FT", "ft"),
    Method("fsp", "FSP", "fsp"),
    Method("nst", "NST", "nst"),
    Method("crd", "CRD", "crd"),
    Method("crd+kd", "CRD+KD", "crd+kd", extras=("ce_weight=1", "loss.kd.weight=1")),  # RepDistiller -r 1 -a 1 -b 0.8
    Method("dkd", "DKD", "dkd"),
)
BY_NAME = {m.name: m for m in METHODS}
BY_LOSS = {m.loss: m for m in METHODS if m.loss}
#: the methods that are kdrun distillation runs (what `--methods all` runs besides vanilla)
DISTILL_METHODS = tuple(m.name for m in METHODS if m.loss)
ALWAYS = ("teacher", "vanilla")


def available_pairs() -> list[str]:
    """Every pair with an experiment file, in table order (files not in PAIR_ORDER last, sorted)."""
    found = {p.stem for p in EXPERIMENT_DIR.glob("*.yaml")}
    return [p for p in PAIR_ORDER if p in found] + sorted(found - set(PAIR_ORDER))


def experiment_name(pair: str) -> str:
    return f"{EXPERIMENT_GROUP}/{pair}"


def _split(value: str) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


def parse_pairs(value: str) -> list[str]:
    """`a,b` or `all` -> pair names in the order given (`all`: table order); unknown -> ConfigError."""
    valid = available_pairs()
    names = _split(value)
    if not names:
        raise ConfigError(f"--pairs is empty; valid: {', '.join(valid)}, all")
    if names == ["all"]:
        return valid
    out = []
    for name in names:
        if name not in valid:
            raise ConfigError(f"unknown pair '{name}'; valid: {', '.join(valid)}, all")
        if name not in out:
            out.append(name)
    return out


def parse_methods(value: str) -> list[str]:
    """`kd,dkd` or `all` -> the report's rows in table order: teacher, vanilla, then those asked for."""
    valid = [m.name for m in METHODS]
    names = _split(value)
    if not names:
        raise ConfigError(f"--methods is empty; valid: {', '.join(valid)}, all")
    chosen = set(ALWAYS)
    for name in names:
        if name == "all":
            chosen.update(DISTILL_METHODS)
        elif name in BY_NAME:
            chosen.add(name)
        else:
            raise ConfigError(f"unknown method '{name}'; valid: {', '.join(valid)}, all")
    return [m.name for m in METHODS if m.name in chosen]


def parse_seeds(value: str) -> list[int]:
    parts = _split(value)
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds '{value}' is not a comma-separated list of integers >= 0, e.g. 0,1,2")
    return list(dict.fromkeys(seeds))
