"""metrics.csv: one row per (stage, epoch), rewritten atomically after every epoch."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from kdrun.engine.io import write_text

LEAD = ["stage", "epoch", "lr", "train_loss"]
TAIL = ["train_top1", "test_loss", "test_top1", "test_top5", "epoch_seconds", "images_per_second"]


class MetricsWriter:
    """Collects rows (dicts) and keeps ``path`` an up-to-date CSV of all of them.

    Columns: stage, epoch, lr, train_loss, one ``loss_<term>`` column per loss term, then train_top1,
    test_loss, test_top1, test_top5, epoch_seconds, images_per_second (plus any extra key, e.g. model).
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.rows: list[dict] = []
        if self.path is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                self.rows = [dict(r) for r in csv.DictReader(f)]

    def columns(self) -> list[str]:
        seen: list[str] = []
        for row in self.rows:
            seen.extend(k for k in row if k not in seen)
        extra = [k for k in seen if k not in LEAD and k not in TAIL]
        terms = [k for k in extra if k.startswith("loss_")]
        others = [k for k in extra if not k.startswith("loss_")]
        lead = [k for k in LEAD if k in seen]
        if "model" in others:
            others.remove("model")
            lead.insert(1, "model")
        return lead + terms + [k for k in TAIL if k in seen] + others

    def truncate(self, stage: str, after_epoch: int) -> None:
        """Drop rows of ``stage`` later than ``after_epoch`` (resuming from a checkpoint)."""
        self.rows = [r for r in self.rows if r.get("stage") != stage or int(r["epoch"]) <= after_epoch]
        self._flush()

    def append(self, row: dict) -> None:
        self.rows.append(row)
        self._flush()

    def _flush(self) -> None:
        if self.path is None:
            return
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns(), extrasaction="ignore")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: _fmt(v) for k, v in r.items()})
        write_text(self.path, buf.getvalue())


def _fmt(v):
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return v
