"""The model store: trained teachers (and student baselines), reused across runs.

Layout: ``<root>/<dataset>/<model>/seed<k>/<recipe-hash>/`` holding ``model.pt`` (final weights),
``recipe.json`` (what the hash covers), ``summary.json``, ``metrics.csv``, ``checkpoints/last.pt``
while training. A model is trained once per recipe: a 3-epoch quickstart teacher is never reused for a
240-epoch run because the epochs are part of the recipe. An exclusive file lock per entry makes two
runs that need the same model at once take turns: the second waits and then reuses what the first
trained. An interrupted training resumes from its last checkpoint the next time it is needed.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable

from kdrun.engine import distributed as dist
from kdrun.engine.io import clean_temp_files, file_lock, recipe_hash, write_json

log = logging.getLogger("kdrun")

MODEL_FILE = "model.pt"


class ModelStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def entry(self, dataset: str, model: str, seed: int, recipe: dict) -> Path:
        safe_model = model.replace("/", "_")
        return self.root / dataset / safe_model / f"seed{seed}" / recipe_hash(recipe)

    def obtain(self, entry: Path, recipe: dict, what: str, train: Callable[[Path | None], dict],
               world: dist.World = dist.SINGLE) -> tuple[Path, bool]:
        """Return (path to model.pt, trained_now). ``train(entry_dir)`` must write entry/model.pt.

        Under torchrun every rank trains (they share each batch) but only rank 0 holds the lock and
        writes; the other ranks call ``train(None)``.
        """
        model_path = entry / MODEL_FILE
        if world.active:
            return self._obtain_distributed(entry, recipe, what, train, world)
        if model_path.is_file():
            return model_path, False
        with file_lock(entry.with_name(entry.name + ".lock"), self._waiting(what, entry)):
            if model_path.is_file():  # trained by the process we waited for
                return model_path, False
            entry.mkdir(parents=True, exist_ok=True)
            clean_temp_files(entry)  # of a training killed mid-write; we hold the lock
            write_json(entry / "recipe.json", recipe)
            train(entry)
            if not model_path.is_file():
                raise RuntimeError(f"training {what} did not write {model_path}")
            return model_path, True

    @staticmethod
    def _waiting(what: str, entry: Path) -> str:
        return f"waiting: another kdrun process is training {what} ({entry})"

    def _obtain_distributed(self, entry: Path, recipe: dict, what: str, train, world: dist.World):
        model_path = entry / MODEL_FILE
        lock = (file_lock(entry.with_name(entry.name + ".lock"), self._waiting(what, entry)) if world.is_main
                else contextlib.nullcontext())
        with lock:
            exists = dist.broadcast_flag(model_path.is_file(), world)
            if not exists:
                if world.is_main:
                    entry.mkdir(parents=True, exist_ok=True)
                    write_json(entry / "recipe.json", recipe)
                train(entry if world.is_main else None)
        dist.barrier(world)
        return model_path, not exists
