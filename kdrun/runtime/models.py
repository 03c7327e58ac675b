"""Building a run's models: from their config, seeded, on the run's device and memory format."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from kdrun.config import instantiate_model
from kdrun.engine import distributed as dist
from kdrun.errors import CheckpointError
from kdrun.models import count_macs, count_params, tap_shapes
from kdrun.models.quantize import prepare_qat


class ModelFactory:
    """Fresh models for a run (``build``), placed like the run's (``place``), and what is measured of
    them (tap shapes, params, MACs). ``dry``: the preflight, which never compiles."""

    def __init__(self, cfg: DictConfig, info, device: torch.device, world: dist.World = dist.SINGLE,
                 dry: bool = False) -> None:
        self.cfg, self.info, self.device, self.world, self.dry = cfg, info, device, world, dry
        self.quantized = None  # the last model built for QAT (student.quantize): the run's student

    def build(self, node: DictConfig, seed: int | None = None) -> torch.nn.Module:
        """A freshly initialised model of ``node`` (seeded with ``seed``, default cfg.seed); prepared
        for quantization-aware training where the node's ``quantize`` is set (the student role's key)."""
        info = self.info
        torch.manual_seed(int(self.cfg.seed) if seed is None else int(seed))
        try:
            model = instantiate_model(node, num_classes=info.num_classes, in_chans=info.in_chans,
                                      image_size=info.image_size)
        except CheckpointError as exc:  # a pretrained file that cannot be read or does not fit
            raise CheckpointError(f"{node._key() or 'model'}.pretrained={node.get('pretrained')}: {exc}") from None
        if node.get("quantize"):
            model = self.quantized = prepare_qat(model, str(node.quantize), info.in_chans, info.image_size,
                                                 key=f"{node._key() or 'student'}.quantize")
        if self.world.active and bool(self.cfg.trainer.get("sync_bn", False)):
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = self.place(model)
        if bool(self.cfg.trainer.get("compile", False)) and not self.dry:
            # compile the forwards as instance attributes: the module stays a plain nn.Module, so
            # its checkpoints, taps and state-dict keys are unchanged
            model.forward_taps = torch.compile(model.forward_taps, dynamic=False)
            model.forward = torch.compile(model.forward, dynamic=False)
        return model

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` on the run's device, channels_last where the run uses it (adapters too)."""
        module = module.to(self.device)
        if bool(self.cfg.trainer.channels_last):
            module = module.to(memory_format=torch.channels_last)
        return module

    def shapes(self, model) -> dict:
        """Every tap's shape (preact taps too where the model has them), from a dry run."""
        info = self.info
        return tap_shapes(model, info.in_chans, info.image_size, preact=bool(getattr(model, "supports_preact", False)))

    def stats(self, model, prefix: str) -> dict:
        info = self.info
        return {f"{prefix}_params": count_params(model), f"{prefix}_macs": count_macs(model, info.in_chans, info.image_size)}

    def lr_for(self, node: DictConfig) -> float:
        """A role's learning rate: its own ``lr``, else ``optim.lr``."""
        return float(node.lr) if node.get("lr") is not None else float(self.cfg.optim.lr)

    def epochs_for(self, node: DictConfig) -> int:
        """A role's schedule length when kdrun trains it: its own ``epochs``, else ``trainer.epochs``."""
        return int(node.epochs) if node.get("epochs") is not None else int(self.cfg.trainer.epochs)
