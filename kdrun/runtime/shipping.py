"""Models that leave the lab: weights as safetensors with a JSON model card beside them.

A run writes its final student (the best epoch's weights) as ``<run dir>/student.safetensors`` and
``student.json``; the store writes each trained teacher as ``model.safetensors`` and ``model.json``
beside its ``model.pt``. The card says how to rebuild and feed the model: its arch, its model config
(the ``_target_`` node of conf/model that built it), classes, channels, image size, the input
normalisation, its accuracy and the kdrun version.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from kdrun.config import instantiate_model, to_plain
from kdrun.engine.checkpoint import load_into, model_meta, read_checkpoint, save_safetensors
from kdrun.engine.io import write_json
from kdrun.errors import CheckpointError

log = logging.getLogger("kdrun")

#: the model config's keys that are the run's roles, not the model's (left out of the card)
ROLE_KEYS = ("checkpoint", "epochs", "lr", "cache", "cache_topk", "cache_dtype")


def model_card(node: DictConfig, model: torch.nn.Module, info, **accuracy) -> dict:
    """What a user needs to rebuild ``model`` (built from ``node`` on data ``info``) and feed it."""
    from kdrun import __version__

    config = {k: v for k, v in (to_plain(node) or {}).items() if k not in ROLE_KEYS}
    size = info.image_size if isinstance(info.image_size, int) else list(info.image_size)
    return {
        **model_meta(model), "model": config, "image_size": size,
        "input": {"layout": "NCHW", "scale": "pixel / 255", "mean": list(info.mean), "std": list(info.std),
                  "normalize": "(pixel / 255 - mean) / std per channel"},
        "dataset": info.name, "class_names": list(info.class_names), **accuracy, "kdrun_version": __version__,
    }


def write_model_files(path: Path, node: DictConfig, model: torch.nn.Module, info, **accuracy) -> None:
    """``path`` (.safetensors) and its card ``path.with_suffix('.json')`` for ``model``'s weights."""
    card = model_card(node, model, info, **accuracy)
    save_safetensors(path, model.state_dict(), card)
    write_json(path.with_suffix(".json"), card)


def ship_student(run_dir: Path, node: DictConfig, info, summary: dict) -> Path | None:
    """The run's best student (checkpoints/best.pt) as student.safetensors + student.json; None (and
    a log line) when there is no best.pt or it holds no model of ``node`` (mutual's peer group)."""
    best = run_dir / "checkpoints" / "best.pt"
    if not best.is_file():
        return None
    if node.get("quantize"):
        log.info("student.safetensors: not written (student.quantize=%s: the student ships as student_int8.pt, "
                 "TorchScript; safetensors holds no quantized tensors)", node.quantize)
        return None
    payload = read_checkpoint(best)
    with torch.random.fork_rng(devices=[]):
        model = instantiate_model(node, num_classes=info.num_classes, in_chans=info.in_chans,
                                  image_size=info.image_size)
    try:
        load_into(model, payload, best, role="student")
    except CheckpointError:
        log.info("student.safetensors: not written (%s holds a %s, not a %s)", best, payload.get("arch"), node.name)
        return None
    accuracy = {k: summary[k] for k in ("student_top1_best", "student_top5_best") if summary.get(k) is not None}
    path = run_dir / "student.safetensors"
    write_model_files(path, node, model, info, top1=accuracy.get("student_top1_best"),
                      top5=accuracy.get("student_top5_best"), epoch=payload.get("epoch"))
    log.info("student: %s (+ %s)", path, path.with_suffix(".json").name)
    return path


# ---------------------------------------------------------------------------- reading them back
def find_run_dir(path: Path) -> Path | None:
    """The run dir ``path`` is or lies in (the first of it and its parents holding config.yaml)."""
    path = Path(path).resolve()
    for candidate in (path, *path.parents):
        if (candidate / "config.yaml").is_file():
            return candidate
    return None


def read_summary(run_dir: Path | None) -> dict:
    import json

    if run_dir is None or not (run_dir / "summary.json").is_file():
        return {}
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def student_weights(run_dir: Path) -> Path:
    """A run's student weights: checkpoints/best.pt (the best epoch), else student.safetensors. A run
    with ``student.quantize`` is refused in one line (its student is the TorchScript student_int8.pt)."""
    from omegaconf import OmegaConf

    quantize = OmegaConf.select(OmegaConf.load(run_dir / "config.yaml"), "student.quantize", default=None) \
        if (run_dir / "config.yaml").is_file() else None
    if quantize:
        raise CheckpointError(f"{run_dir} trained its student with student.quantize={quantize}: the int8 student is "
                              f"{run_dir / 'student_int8.pt'} (TorchScript: torch.jit.load), scored in summary.json "
                              "(student_int8_top1); kdrun-eval and kdrun-export take float students")
    for path in (run_dir / "checkpoints" / "best.pt", run_dir / "student.safetensors"):
        if path.is_file():
            return path
    raise CheckpointError(f"{run_dir} holds no student weights (checkpoints/best.pt or student.safetensors); "
                          "give a run dir of a run that trained, or a checkpoint file")


def teacher_weights(run_dir: Path | None, summary: dict) -> Path | None:
    """The weights a run's teacher came from (summary.json's teacher_source), when still on disk."""
    source = summary.get("teacher_source")
    if not source:
        return None
    path = Path(source)
    if not path.is_absolute() and run_dir is not None and not path.is_file():
        path = Path.cwd() / path
    return path if path.is_file() else None


def model_config(payload: dict, path: Path, node: DictConfig | None = None) -> DictConfig:
    """The model config that builds the weights of ``payload`` (read from ``path``): ``node`` (the
    run's), else the model card (safetensors metadata, or the .json beside the file), else the model
    group's config named like the arch (zoo models)."""
    import json

    from omegaconf import OmegaConf

    from kdrun.config import MODEL_GROUP, group_options, model_node

    if node is not None and node.get("_target_"):
        return node
    card = payload.get("card") or {}
    for sidecar in (path.with_suffix(".json"), path.parent / "model.json"):
        if not card and sidecar.is_file():
            card = json.loads(sidecar.read_text())
    if card.get("model"):
        return OmegaConf.create(card["model"])
    arch = str(payload.get("arch"))
    if arch in group_options(MODEL_GROUP):
        return model_node(arch)
    raise CheckpointError(f"{path} holds a {arch} but names no model config (no model card beside it); "
                          "give the run dir it came from")


def load_model(path: Path, node: DictConfig | None, image_size, role: str = "model") -> torch.nn.Module:
    """The model of a weights file (.pt or .safetensors), built from its config (:func:`model_config`)
    and loaded (arch and class count checked), in eval mode on the CPU."""
    from kdrun.engine.checkpoint import read_weights

    payload = read_weights(path)
    node = model_config(payload, Path(path), node)
    model = instantiate_model(node, num_classes=int(payload["num_classes"]), in_chans=int(payload["in_chans"]),
                              image_size=image_size)
    load_into(model, payload, path, role=role)
    return model.eval()
