"""Teacher-output cache: a frozen teacher's outputs for the exact augmented views it sees.

The data module makes each epoch's order, crops and flips a function of (seed, epoch) alone, so the
teacher sees the same batches in every run of a sweep that shares the data recipe. The cache keeps
the teacher's outputs (the logits, plus the feature taps the terms need) per epoch on disk and the
second and later runs skip the teacher forward.

Layout: ``<root>/<key-hash>/key.json`` (what the hash covers: the teacher's weights, the dataset,
the augmentation seed, batch size, taps, precision) and ``epoch<e>.pt`` with every batch's outputs
of epoch ``e``, concatenated. Files are written atomically when an epoch completes; a later run that
needs more batches of an epoch than a file holds recomputes that epoch and rewrites it.

Storage (``cache_dtype``): ``auto`` keeps every output in the dtype the teacher computed it in
(fp32 in fp32 runs; under autocast what autocast gave, bf16 or fp16), and a read gives it back in
that dtype and memory format: cached outputs are then the very tensors a teacher forward gives, so a
run that reads them trains bit-for-bit as one that computes them, in every precision. An explicit
``float16``/``bfloat16``/``float32`` stores that dtype and converts back to the computed one when
read (exact only where the values fit the stored dtype: bf16 values in fp16's normal range, about
6e-5 to 65504 in magnitude, do; smaller ones lose bits). With ``topk=k`` only the top-k logits of
each sample are kept with their log-sum-exp; the rest of the probability mass is spread evenly over
the other classes when the logits are rebuilt, so softmax at T=1 gives the teacher's exact top-k
probabilities (not exact: a run that reads them is not the run that computes them).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from kdrun.engine.io import atomic_write, recipe_hash, write_json

log = logging.getLogger("kdrun")


def compress_topk(logits: torch.Tensor, k: int) -> dict:
    values, indices = logits.float().topk(k, dim=1)
    return {"values": values.half(), "indices": indices.to(torch.int32), "lse": torch.logsumexp(logits.float(), 1)}


def expand_topk(packed: dict, num_classes: int) -> torch.Tensor:
    """Logits whose softmax keeps the top-k probabilities and spreads the rest evenly."""
    values, indices, lse = packed["values"].float(), packed["indices"].long(), packed["lse"]
    k = values.shape[1]
    kept = torch.exp(values - lse[:, None]).sum(1).clamp(max=1.0)
    rest = ((1.0 - kept).clamp(min=1e-12) / max(num_classes - k, 1)).log() + lse
    out = rest[:, None].expand(-1, num_classes).clone()
    return out.scatter_(1, indices, values)


class TeacherCache:
    """``dtype``: the storage dtype, or None to keep each output's own (exact). ``hits``: batches read
    from the cache, ``misses``: batches the teacher computed (and stored) in this run."""

    def __init__(self, root: str | Path, key: dict, device: torch.device, dtype: torch.dtype | None,
                 topk: int | None = None, num_classes: int | None = None) -> None:
        self.dir = Path(root) / recipe_hash(key)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "key.json").is_file():
            write_json(self.dir / "key.json", key)
        self.device, self.dtype, self.topk, self.num_classes = device, dtype, topk, num_classes
        self._epoch: int | None = None
        self._loaded: dict | None = None  # {"offsets": [...], "taps": {name: tensor}} of the epoch
        self._pending: list[dict] | None = None
        self.hits = self.misses = 0

    def path(self, epoch: int) -> Path:
        return self.dir / f"epoch{epoch:04d}.pt"

    def _start_epoch(self, epoch: int) -> None:
        self._epoch, self._loaded, self._pending = epoch, None, []
        path = self.path(epoch)
        if path.is_file():
            try:
                payload = torch.load(path, map_location=self.device, weights_only=True)
                self._loaded = payload
            except Exception as exc:  # a damaged cache file is recomputed, never fatal
                log.info("teacher cache: ignoring unreadable %s (%s)", path, str(exc).splitlines()[0][:80])

    def lookup(self, epoch: int, batch: int) -> dict | None:
        if epoch != self._epoch:
            self._start_epoch(epoch)
        loaded = self._loaded
        if loaded is None or batch + 1 >= len(loaded["offsets"]):
            if loaded is not None and self._pending is not None:
                # the file ends before this batch: keep what it had, compute the rest, rewrite it
                self._pending = [self._slice(loaded, b) for b in range(batch)]
            self._loaded = None
            self.misses += 1
            return None
        self.hits += 1
        return self._slice(loaded, batch)

    def _slice(self, loaded: dict, batch: int) -> dict:
        """Batch ``batch``'s outputs in the dtype and memory format the teacher computed them in
        (fp32 for files that do not say)."""
        lo, hi = loaded["offsets"][batch], loaded["offsets"][batch + 1]
        dtypes, channels_last = loaded.get("dtypes", {}), set(loaded.get("channels_last", ()))
        out = {}
        for name, value in loaded["taps"].items():
            if name == "logits" and isinstance(value, dict):
                out[name] = expand_topk({k: v[lo:hi] for k, v in value.items()}, self.num_classes)
                continue
            out[name] = value[lo:hi].to(getattr(torch, dtypes.get(name, "float32")))
            if name in channels_last:
                out[name] = out[name].contiguous(memory_format=torch.channels_last)
        return out

    def store(self, epoch: int, batch: int, taps: dict) -> None:
        if epoch != self._epoch:
            self._start_epoch(epoch)
        if self._pending is None or batch != len(self._pending):
            self._pending = None  # batches out of order: this epoch is not cached
            return
        self._pending.append({k: v.detach() for k, v in taps.items()})

    def end_epoch(self, epoch: int) -> None:
        """Write the epoch's outputs when every batch of it was computed in this run."""
        pending = self._pending
        self._pending = None
        if epoch != self._epoch or not pending:
            return
        offsets = [0]
        for item in pending:
            offsets.append(offsets[-1] + next(iter(item.values())).shape[0])
        taps, dtypes, channels_last = {}, {}, []
        for name, first in pending[0].items():
            value = torch.cat([item[name] for item in pending])
            dtypes[name] = str(first.dtype).removeprefix("torch.")
            if first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous():
                channels_last.append(name)
            if name == "logits" and self.topk:
                taps[name] = {k: v.cpu() for k, v in compress_topk(value, self.topk).items()}
            else:
                taps[name] = (value if self.dtype is None else value.to(self.dtype)).cpu()
        payload = {"offsets": offsets, "taps": taps, "dtypes": dtypes, "channels_last": channels_last}
        atomic_write(self.path(epoch), lambda f: torch.save(payload, f), mode="wb")

    def size_note(self) -> str:
        files = list(self.dir.glob("epoch*.pt"))
        total = sum(f.stat().st_size for f in files)
        return f"{len(files)} epochs, {total / 2**20:.1f} MiB in {self.dir}"


def cache_dtype(spec: str) -> torch.dtype | None:
    """``teacher.cache_dtype``: None for ``auto`` (each output in the dtype it was computed in: exact)."""
    return None if spec == "auto" else {"float32": torch.float32, "float16": torch.float16,
                                        "bfloat16": torch.bfloat16}[spec]


def estimate_epoch_bytes(shapes: dict, n_train: int, taps: set[str], itemsize: int) -> int:
    return n_train * sum(math.prod(shapes[t]) for t in taps) * itemsize
