"""Checkpoints: written atomically, read weights-only (no arbitrary pickle), checked against the model.

A kdrun checkpoint is a dict ``{"format": "kdrun", "version": 1, "arch": ..., "num_classes": ...,
"in_chans": ..., "state_dict": ..., **extra}``; ``extra`` may hold optimizer state, epoch, accuracy.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from kdrun.engine.io import atomic_write
from kdrun.errors import CheckpointError

FORMAT = "kdrun"
VERSION = 1


def model_meta(model: nn.Module) -> dict:
    return {
        "arch": getattr(model, "arch", type(model).__name__),
        "num_classes": int(getattr(model, "num_classes", -1)),
        "in_chans": int(getattr(model, "in_chans", -1)),
    }


def save_checkpoint(path: str | Path, model: nn.Module, **extra: Any) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "version": VERSION, **model_meta(model), "state_dict": state, **extra}
    atomic_write(path, lambda f: torch.save(payload, f), mode="wb")


def read_checkpoint(path: str | Path) -> dict:
    """Load a kdrun checkpoint weights-only; a missing, truncated or foreign file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: truncated, corrupt, or not a weights-only torch file ({first[:160]})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "state_dict" not in payload:
        raise CheckpointError(
            f"{path} is not a kdrun checkpoint (expected the file kdrun writes: checkpoints/best.pt, "
            "checkpoints/last.pt or a teacher store's model.pt)"
        )
    return payload


def load_into(model: nn.Module, payload: dict, path: str | Path, role: str = "model") -> None:
    """Load ``payload`` into ``model`` after checking architecture and class count."""
    want = model_meta(model)
    if payload.get("arch") != want["arch"]:
        raise CheckpointError(
            f"{path} holds a {payload.get('arch')}, but {role} is {want['arch']}; "
            f"set {role}={payload.get('arch')} or give a {want['arch']} checkpoint"
        )
    for key in ("num_classes", "in_chans"):
        if payload.get(key) != want[key]:
            raise CheckpointError(
                f"{path} was trained with {key}={payload.get(key)}, but this dataset needs {key}={want[key]}"
            )
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit {want['arch']}: {str(exc).splitlines()[0][:200]}") from None


# ---------------------------------------------------------------------------- safetensors
#: the safetensors metadata key that holds a kdrun model card (the JSON sidecar's content)
CARD_KEY = "kdrun"


def plain_state(state_dict: dict) -> dict:
    """Tensors safetensors can store: on the CPU, contiguous, each its own storage (tied weights copied)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}


def save_safetensors(path: str | Path, state_dict: dict, card: dict) -> None:
    """``state_dict`` as a safetensors file (written atomically), the model card (arch, model config,
    classes, input shape, normalisation, accuracy) in its metadata under ``kdrun``."""
    import json

    from safetensors.torch import save

    blob = save(plain_state(state_dict), metadata={CARD_KEY: json.dumps(card, default=str), "format": "pt"})
    atomic_write(path, lambda f: f.write(blob), mode="wb")


def read_weights(path: str | Path) -> dict:
    """A checkpoint-like payload (``arch``, ``num_classes``, ``in_chans``, ``state_dict``, ``card``) of a
    kdrun checkpoint (.pt) or a kdrun safetensors file (the card from its metadata or the JSON
    sidecar beside it); a missing, truncated or foreign file is a CheckpointError."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return read_checkpoint(path)
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"weights not found: {path}")
    try:
        state = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: truncated, corrupt, or not a safetensors file "
                              f"({str(exc).splitlines()[0][:160]})") from None
    card = json.loads(meta[CARD_KEY]) if CARD_KEY in meta else {}
    if not card and path.with_suffix(".json").is_file():
        card = json.loads(path.with_suffix(".json").read_text())
    if "arch" not in card:
        raise CheckpointError(f"{path} has no kdrun model card (its metadata and {path.with_suffix('.json').name} "
                              "name no arch); give a file kdrun wrote (student.safetensors, model.safetensors)")
    return {"format": FORMAT, "arch": card["arch"], "num_classes": card.get("num_classes"),
            "in_chans": card.get("in_chans"), "state_dict": state, "card": card}
