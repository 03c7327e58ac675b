"""Shared fixtures: tiny real-config runs on generated data, on CPU."""

from __future__ import annotations

import pytest
import torch

from kdrun.config import compose

# CPU tests share 2 cores between many small ops: one thread avoids spin-wait overhead.
torch.set_num_threads(1)


def tiny(tmp_path, *extra: str) -> list[str]:
    """Overrides for a run of a few seconds: small generated data, small models, one short epoch."""
    return [
        "dataset=synthetic",
        "dataset.n_train=192",
        "dataset.n_test=64",
        "dataset.image_size=16",
        "teacher=resnet8",
        "student=resnet8",
        "trainer.epochs=1",
        "trainer.batch_size=32",
        "trainer.limit_train_batches=2",
        "trainer.progress=off",
        "trainer.device=cpu",
        "trainer.amp=off",  # fp32 whatever the CPU: results are then the same on every machine
        f"paths.output_root={tmp_path / 'outputs'}",
        *extra,
    ]


@pytest.fixture
def compose_tiny(tmp_path):
    """``compose_tiny(*overrides) -> (cfg, overrides)`` for a tiny run under tmp_path."""

    def make(*extra: str):
        overrides = tiny(tmp_path, *extra)
        return compose(overrides), overrides

    return make
