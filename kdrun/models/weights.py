"""Loading local weight files into a model (never downloads anything).

Accepted files: ``.safetensors``, or anything ``torch.load(weights_only=True)`` reads
that is a state dict or a dict wrapping one under ``state_dict``, ``model_state_dict``
or ``model``.  Keys may carry a ``module.`` (DataParallel) or ``model.`` (a saved
:class:`~kdrun.models.timm_model.TimmTapModel`) prefix.  Classifier weights whose shape
does not fit (a different class count) are skipped and stay freshly initialised.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdrun.errors import CheckpointError, ConfigError
from kdrun.models.timm_model import TimmTapModel

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_PREFIXES = ("module.", "model.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a local safetensors or torch file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"pretrained weights file '{path}' does not exist; give a local .safetensors/.pt/.pth file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any read failure means an unusable file
        raise CheckpointError(f"cannot read weights file '{path}': {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"weights file '{path}' does not hold a state dict (name -> tensor)")
    return obj


def _strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Remove ``module.``/``model.`` prefixes while that makes more keys match."""
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                stripped = {k[len(prefix):]: v for k, v in state.items()}
                if len(expected & stripped.keys()) > len(expected & state.keys()):
                    state, changed = stripped, True
    return state


def load_pretrained(model: nn.Module, path: str | Path) -> list[str]:
    """Load a local weights file into ``model`` (a TapModel); return the skipped keys.

    A :class:`TimmTapModel` is loaded through its inner timm model, so plain timm
    state dicts fit.  Any missing, unexpected or mis-shaped key other than the
    classifier's raises :class:`~kdrun.errors.CheckpointError`.
    """
    target = model.model if isinstance(model, TimmTapModel) else model
    expected = target.state_dict()
    state = _strip_prefixes(read_state_dict(path), set(expected))

    classifier = getattr(model, "classifier", None)
    classifier_keys: set[str] = set()
    for name, module in target.named_modules():
        if module is classifier:
            classifier_keys = {k for k in expected if k.startswith(f"{name}.")}
    skipped = sorted(
        k for k in classifier_keys if k in state and state[k].shape != expected[k].shape
    )
    for key in skipped:
        del state[key]

    # classifier weights are optional: absent or skipped ones keep their fresh init
    missing = sorted(set(expected) - set(state) - classifier_keys)
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if wrong_shape:
        k = wrong_shape[0]
        problems.append(f"{len(wrong_shape)} mis-shaped tensors (e.g. {k}: file {tuple(state[k].shape)}, "
                        f"model {tuple(expected[k].shape)})")
    if problems:
        arch = getattr(model, "arch", type(model).__name__)
        raise CheckpointError(f"weights file '{path}' does not fit model '{arch}': " + "; ".join(problems))
    target.load_state_dict(state, strict=False)
    return skipped
