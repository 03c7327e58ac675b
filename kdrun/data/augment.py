"""Batch augmentation with tensor ops: random crop with zero padding, horizontal flip, normalise.

This runs once per training step, so it is built for speed on CPU as well as on a GPU:

* Images live in an :class:`ImageStore`: one flat uint8 buffer in NHWC order with zero
  pixels before and after it. Seen through ``Tensor.unfold`` the buffer is a (free) view
  whose row ``k`` is the ``W`` pixels starting at pixel ``k``. A padded-and-cropped output
  row is then one such row: it starts ``dx`` pixels left or right of the source row, and a
  row that falls in the vertical padding points at the zero pixels after the data. A whole
  batch is therefore a single ``index_select`` of ``B*H`` contiguous rows.
* The pixels a horizontal shift pulls in from the neighbouring image row must read as
  zero padding. Rather than zeroing them with another pass, the normalisation multiplies
  by a per-sample column scale that is 0 in those columns (so they come out as
  ``(0 - mean) / std``, exactly what zero padding before normalising gives). There are
  only ``2 * (2*pad + 1)`` such scale rows (shift x mirrored), kept in a small table.
* Within each batch the samples to be mirrored are put first (the order inside a batch
  does not matter for training), so the flip is one slice ``flip`` instead of a masked
  select over the whole batch.
* Normalisation ``(x / 255 - mean) / std`` is one multiply and one subtract on the
  ``(B, H, W*C)`` view with per-column constants, and the NHWC result is returned as an
  NCHW tensor in ``channels_last`` memory format without a copy.

All randomness for an epoch comes from one CPU ``torch.Generator`` seeded from
``(seed, epoch)`` (see :func:`make_epoch_plan`); the small per-sample tensors are then moved
to the device, so CPU and CUDA see the same crops and flips.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator whose state depends only on ``(seed, epoch, stream)``.

    The three numbers are mixed with numpy's ``SeedSequence`` so that nearby seeds and
    epochs give unrelated streams (``seed=1, epoch=0`` is not ``seed=0, epoch=1``).
    """
    words = np.random.SeedSequence([seed, epoch, stream]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator(device="cpu")
    generator.manual_seed((int(words[0]) << 31) ^ int(words[1]))
    return generator


def batch_bounds(n: int, batch_size: int, drop_last: bool) -> list[tuple[int, int]]:
    """``(start, stop)`` of each training batch over ``n`` samples.

    The final incomplete batch is kept unless ``drop_last``, except that a final batch of a
    single sample is always dropped: BatchNorm cannot compute batch statistics from it.
    """
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if bounds:
        last = bounds[-1][1] - bounds[-1][0]
        if last < batch_size and (drop_last or (last == 1 and batch_size > 1)):
            bounds.pop()
    return bounds


@dataclass(frozen=True)
class EpochPlan:
    """Everything random about one training epoch, decided up front on the CPU.

    ``order[i]`` is the sample at position ``i`` of the epoch, ``dy[i]``/``dx[i]`` its crop
    offset in ``[-pad, pad]`` (the output pixel ``(r, c)`` is the source pixel
    ``(r + dy, c + dx)``, zero outside the image) and ``flip[i]`` whether it is mirrored
    after cropping. Inside each batch the mirrored samples come first; ``n_flip[b]`` says
    how many there are in batch ``b``.
    """

    order: torch.Tensor  # int64 (n_used,)
    dy: torch.Tensor  # int64 (n_used,)
    dx: torch.Tensor  # int64 (n_used,)
    flip: torch.Tensor  # bool (n_used,)
    bounds: list[tuple[int, int]]
    n_flip: list[int]


def make_epoch_plan(
    n: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    pad: int,
    hflip: bool,
    drop_last: bool,
) -> EpochPlan:
    """The permutation, crop offsets and flips of one epoch: a function of its arguments only."""
    generator = epoch_generator(seed, epoch)
    bounds = batch_bounds(n, batch_size, drop_last)
    n_used = bounds[-1][1] if bounds else 0
    order = torch.randperm(n, generator=generator)[:n_used]
    if pad > 0:
        offsets = torch.randint(-pad, pad + 1, (2, n_used), generator=generator)
        dy, dx = offsets[0], offsets[1]
    else:
        dy = dx = torch.zeros(n_used, dtype=torch.int64)
    if hflip:
        flip = torch.rand(n_used, generator=generator) < 0.5
        # Put the mirrored samples first inside each batch (a stable sort on
        # (batch index, not mirrored)), so that mirroring is a single slice operation.
        batch_of = torch.repeat_interleave(
            torch.arange(len(bounds)),
            torch.tensor([stop - start for start, stop in bounds], dtype=torch.long),
        )
        key = batch_of * 2 + (~flip).long()
        regroup = torch.sort(key, stable=True).indices
        order, dy, dx, flip = order[regroup], dy[regroup], dx[regroup], flip[regroup]
        n_flip = torch.bincount(batch_of[flip], minlength=len(bounds)).tolist()
    else:
        flip = torch.zeros(n_used, dtype=torch.bool)
        n_flip = [0] * len(bounds)
    return EpochPlan(order=order, dy=dy, dx=dx, flip=flip, bounds=bounds, n_flip=n_flip)


#: a batch is split over data-parallel ranks only when every share holds at least this many images
#: (BatchNorm needs two samples to compute batch statistics)
MIN_SHARE = 2


def share(batch: int, rank: int, size: int) -> tuple[int, int]:
    """``(lo, hi)``: rank ``rank``'s contiguous share of a batch of ``batch`` images split over
    ``size`` ranks (shares differ by at most one image; their union is the batch)."""
    return rank * batch // size, (rank + 1) * batch // size


def sharded_batches(bounds: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The batches of ``bounds`` that are split over ``size`` ranks: those whose smallest share holds
    at least :data:`MIN_SHARE` images (only a short final batch can fall below; it is left out on
    every rank, so all ranks take the same number of steps)."""
    return [(start, stop) for start, stop in bounds if (stop - start) // size >= MIN_SHARE]


def shard_plan(plan: EpochPlan, rank: int, size: int) -> EpochPlan:
    """Rank ``rank``'s part of every batch of ``plan`` (of ``size`` ranks), as a plan of its own.

    Batch ``b`` of the result holds the positions :func:`share` gives this rank in batch ``b`` of
    ``plan`` (see :func:`sharded_batches`), with their crops and flips: augmenting it gives exactly
    those images of the one-process batch, and the ranks' batches together are that batch. The
    mirrored samples stay first in each batch (the local ``n_flip`` is the mirrored part of the share).
    """
    positions, bounds, n_flip = [], [], []
    flips = dict(zip(plan.bounds, plan.n_flip))
    for start, stop in sharded_batches(plan.bounds, size):
        lo, hi = share(stop - start, rank, size)
        positions.append(torch.arange(start + lo, start + hi))
        first = bounds[-1][1] if bounds else 0
        bounds.append((first, first + hi - lo))
        n_flip.append(min(max(flips[(start, stop)] - lo, 0), hi - lo))
    idx = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.int64)
    return EpochPlan(order=plan.order[idx], dy=plan.dy[idx], dx=plan.dx[idx], flip=plan.flip[idx],
                     bounds=bounds, n_flip=n_flip)


class ImageStore:
    """``N`` images of ``H x W x C`` uint8 pixels in one flat buffer, ready for crop gathers.

    Layout (in pixels): ``pad`` zero pixels, the ``N*H*W`` image pixels in NHWC order, then
    ``W + pad`` zero pixels. ``rows`` is an overlapping view with one ``W``-pixel row per
    starting pixel, so any horizontally shifted image row is one row of it, and
    ``zero_row`` is a row of zeros (the vertical padding).
    """

    def __init__(self, images_nhwc: torch.Tensor, pad: int):
        if images_nhwc.dtype != torch.uint8 or images_nhwc.dim() != 4:
            raise ValueError("ImageStore needs a uint8 tensor of shape (N, H, W, C)")
        n, h, w, c = images_nhwc.shape
        self.n, self.h, self.w, self.c, self.pad = n, h, w, c, pad
        self.zero_row = pad + n * h * w  # first pixel of the trailing zeros
        buffer = torch.zeros(
            (pad + n * h * w + w + pad) * c, dtype=torch.uint8, device=images_nhwc.device
        )
        buffer[pad * c : self.zero_row * c] = images_nhwc.reshape(-1)
        self.buffer = buffer
        self.rows = buffer.unfold(0, w * c, c)  # (pixels, W*C) view, row k = pixels k..k+W-1

    @property
    def images(self) -> torch.Tensor:
        """The images as an ``(N, C, H, W)`` uint8 view (channels_last strides)."""
        flat = self.buffer[self.pad * self.c : self.zero_row * self.c]
        return flat.view(self.n, self.h, self.w, self.c).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class Placement:
    """Per-position crop parameters of an epoch (or a batch) on the device, as table codes."""

    base: torch.Tensor  # first pixel of output row 0 in the store, ignoring vertical padding
    row_code: torch.Tensor  # dy + pad: selects which output rows are vertical padding
    col_code: torch.Tensor  # (dx + pad) * 2 + flip: selects the column scale row


class BatchAugmenter:
    """Random crop (zero padding), horizontal flip and normalisation of NHWC uint8 batches.

    Only ``2*pad + 1`` vertical and ``2 * (2*pad + 1)`` horizontal (shift, flip) cases
    exist, so which rows are padding and which columns must be zeroed come from small
    tables built once; a batch then costs one gather, one slice flip, a table lookup and
    the fused normalisation ``x * scale - shift``.
    """

    def __init__(self, height: int, width: int, pad: int, mean, std, device):
        mean_t = torch.tensor(mean, dtype=torch.float64)
        std_t = torch.tensor(std, dtype=torch.float64)
        self.h, self.w, self.c, self.pad = height, width, len(mean_t), pad
        # One value per (column, channel) of an NHWC row, so the ops run on long
        # contiguous rows instead of broadcasting over a trailing dimension of 3.
        scale = (1.0 / (255.0 * std_t)).float()
        self.scale = scale.repeat(width).to(device)
        self.shift = (mean_t / std_t).float().repeat(width).to(device)

        shifts = torch.arange(-pad, pad + 1)
        rows, cols = torch.arange(height), torch.arange(width)
        src_row = rows[None, :] + shifts[:, None]  # (2p+1, H)
        self.row_inside = ((src_row >= 0) & (src_row < height)).to(device)
        self.row_offset = (rows * width).to(device)
        # Output column j of a mirrored crop shows crop column W-1-j; crop column k shows
        # source column k + dx, which is zero padding outside [0, W). Those columns may
        # hold pixels of the neighbouring row after the gather: a scale of 0 zeroes them.
        crop_col = torch.stack([cols, width - 1 - cols])  # (2, W): not mirrored, mirrored
        src_col = crop_col[None] + shifts[:, None, None]  # (2p+1, 2, W)
        inside = ((src_col >= 0) & (src_col < width)).reshape(-1, width)  # code (dx+p)*2+flip
        self.col_scale = (inside[:, :, None] * scale).reshape(-1, width * self.c).to(device)

    def place(
        self,
        store: ImageStore,
        index: torch.Tensor,
        dy: torch.Tensor,
        dx: torch.Tensor,
        flip: torch.Tensor,
    ) -> Placement:
        """Codes for crops of images ``index`` of ``store`` (all tensors on the device)."""
        base = store.pad + index * (store.h * store.w) + dy * store.w + dx
        return Placement(
            base=base, row_code=dy + self.pad, col_code=(dx + self.pad) * 2 + flip.long()
        )

    def crop_flip(
        self, store: ImageStore, placement: Placement, start: int, stop: int, n_flip: int
    ) -> torch.Tensor:
        """Positions ``start:stop`` cropped and (the first ``n_flip``) mirrored: (B, H, W, C) uint8.

        Columns that are horizontal padding still hold neighbouring pixels here; the
        column scale used by :meth:`normalize` zeroes them.
        """
        starts = placement.base[start:stop, None] + self.row_offset  # (B, H)
        if self.pad:
            inside = self.row_inside.index_select(0, placement.row_code[start:stop])
            starts = torch.where(inside, starts, store.zero_row)
        pixels = store.rows.index_select(0, starts.view(-1)).view(
            stop - start, self.h, self.w, self.c
        )
        if n_flip:
            pixels[:n_flip] = pixels[:n_flip].flip(2)
        return pixels

    def column_scale(self, placement: Placement, start: int, stop: int) -> torch.Tensor | None:
        if not self.pad:
            return None
        return self.col_scale.index_select(0, placement.col_code[start:stop])

    def batch(
        self,
        store: ImageStore,
        placement: Placement,
        start: int,
        stop: int,
        n_flip: int,
        channels_last: bool,
    ) -> torch.Tensor:
        """Augmented, normalised float32 batch ``(B, C, H, W)`` for positions ``start:stop``."""
        pixels = self.crop_flip(store, placement, start, stop, n_flip)
        return self.normalize(pixels, self.column_scale(placement, start, stop), channels_last)

    def normalize(
        self, pixels: torch.Tensor, scale: torch.Tensor | None = None, channels_last: bool = True
    ) -> torch.Tensor:
        """``(x / 255 - mean) / std`` of ``(B, H, W, C)`` uint8 pixels: float32 ``(B, C, H, W)``.

        ``scale`` is a per-sample ``(B, W*C)`` replacement of the per-column scale.
        """
        b, h, w, c = pixels.shape
        out = pixels.reshape(b, h, w * c).float()
        out.mul_(self.scale if scale is None else scale[:, None, :]).sub_(self.shift)
        out = out.view(b, h, w, c).permute(0, 3, 1, 2)  # channels_last strides, no copy
        return out if channels_last else out.contiguous()
