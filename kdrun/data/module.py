"""The :class:`DataModule` interface and its in-memory implementation."""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from kdrun.data.augment import (
    BatchAugmenter,
    ImageStore,
    batch_bounds,
    make_epoch_plan,
    shard_plan,
    sharded_batches,
    share,
)
from kdrun.errors import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DataInfo:
    """What a model, a knowledge term and a report need to know about a dataset (after any subset).

    ``train_labels``: every training sample's label, int64 on the CPU, indexed by training-set
    position (``Step.index``), for terms that need the classes of other samples (CRD's
    other-class negatives); None where a data module does not give them. Left out of the repr
    and of comparisons.
    """

    name: str
    num_classes: int
    in_chans: int
    image_size: int | tuple[int, int]  # an int for square images, else (H, W)
    n_train: int
    n_test: int
    mean: tuple[float, ...]  # per channel, pixel / 255 units
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    train_labels: torch.Tensor | None = field(default=None, repr=False, compare=False)


class DataModule(abc.ABC):
    """Training and evaluation batches of one dataset on one device.

    ``train_batches(epoch)`` yields ``(x, y)``: ``x`` float32 ``(B, C, H, W)``, normalised,
    in ``channels_last`` memory format when requested, ``y`` int64. The order, crops and
    flips are a function of ``(seed, epoch)`` only, so iterating the same epoch twice gives
    bit-identical batches. ``eval_batches()`` walks the test split in order, unaugmented.
    """

    def __init__(
        self,
        info: DataInfo,
        *,
        batch_size: int,
        eval_batch_size: int,
        device: torch.device,
        seed: int,
        channels_last: bool,
        drop_last: bool,
        pad: int,
        hflip: bool,
    ):
        self.info = info
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.device = device
        self.seed = seed
        self.channels_last = channels_last
        self.drop_last = drop_last
        self.pad = pad
        self.hflip = hflip
        self._bounds = batch_bounds(info.n_train, batch_size, drop_last)
        if not self._bounds:
            raise ConfigError(
                f"batch_size={batch_size} gives no training batch for the {info.n_train} "
                f"training images of {info.name} (drop_last={drop_last}); lower the batch size"
            )
        self._shard: tuple[int, int] | None = None  # (rank, ranks) of data-parallel training
        self._share_factors: list[float] = []

    def shard(self, rank: int, size: int) -> None:
        """Make :meth:`train_batches` yield rank ``rank``'s share of every batch (of ``size`` ranks).

        Every rank draws the same epoch plan and augments only its own contiguous share of each
        batch (:func:`kdrun.data.augment.shard_plan`); the shares of all ranks together are the
        batch one process trains on. A final batch too short to give every rank two images is left
        out. ``size`` 1: the whole batches again.
        """
        if size <= 1:
            self._shard, self._share_factors = None, []
            return
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is not one of {size} ranks")
        self._shard, self._share_factors = (rank, size), []
        for start, stop in sharded_batches(self._bounds, size):
            lo, hi = share(stop - start, rank, size)
            self._share_factors.append((hi - lo) * size / (stop - start))
        if not self._share_factors:
            raise ConfigError(f"batch_size={self.batch_size} is too small to split over {size} processes; "
                              f"use at least {2 * size}")

    def share_factor(self, batch: int) -> float:
        """This rank's share of batch ``batch``'s images times the number of ranks: 1.0 for equal
        shares (and in one process). A rank's mean loss times it, averaged over the ranks, is the
        whole batch's mean loss."""
        return self._share_factors[batch] if self._shard is not None else 1.0

    @property
    def steps_per_epoch(self) -> int:
        """Number of batches :meth:`train_batches` yields per epoch."""
        return len(self._share_factors) if self._shard is not None else len(self._bounds)

    @property
    def eval_steps(self) -> int:
        """Number of batches :meth:`eval_batches` yields."""
        return -(-self.info.n_test // self.eval_batch_size)

    def _plan(self, epoch: int):
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        plan = make_epoch_plan(
            self.info.n_train,
            self.batch_size,
            seed=self.seed,
            epoch=int(epoch),
            pad=self.pad,
            hflip=self.hflip,
            drop_last=self.drop_last,
        )
        return plan if self._shard is None else shard_plan(plan, *self._shard)

    @abc.abstractmethod
    def train_batches(self, epoch: int, with_index: bool = False) -> Iterator[Batch]:
        """Augmented training batches of ``epoch`` (a fresh permutation each epoch).

        With ``with_index=True`` each item is ``(x, y, index)``: ``index`` (int64, on the device)
        holds the training-set positions of the batch's samples, for methods that keep
        per-sample state (CRD's memory bank, a teacher-output cache).
        """

    @abc.abstractmethod
    def eval_batches(self) -> Iterator[Batch]:
        """The test split in order, unaugmented, in batches of ``eval_batch_size``."""

    def __repr__(self) -> str:
        i = self.info
        size = i.image_size if isinstance(i.image_size, tuple) else (i.image_size, i.image_size)
        return (
            f"{type(self).__name__}({i.name}: {i.n_train} train / {i.n_test} test, "
            f"{i.num_classes} classes, {i.in_chans}x{size[0]}x{size[1]}, "
            f"batch {self.batch_size}, {self.steps_per_epoch} steps/epoch, device={self.device})"
        )


class InMemoryDataModule(DataModule):
    """A dataset held as uint8 tensors on the device and augmented there, a batch at a time.

    The training split is one :class:`~kdrun.data.augment.ImageStore` (a flat NHWC buffer);
    the test split is one ``(N, H, W, C)`` tensor. Per batch there is one gather, one
    slice flip and the fused normalisation (see :mod:`kdrun.data.augment`).
    """

    def __init__(
        self,
        info: DataInfo,
        x_train: np.ndarray,
        y_train: np.ndarray,
        x_test: np.ndarray,
        y_test: np.ndarray,
        **kwargs,
    ):
        super().__init__(info, **kwargs)
        device = self.device
        self._train = ImageStore(
            torch.from_numpy(np.ascontiguousarray(x_train)).to(device), self.pad
        )
        self._y_train = torch.from_numpy(np.asarray(y_train, dtype=np.int64)).to(device)
        self._test = torch.from_numpy(np.ascontiguousarray(x_test)).to(device)
        self._y_test = torch.from_numpy(np.asarray(y_test, dtype=np.int64)).to(device)
        height, width = x_train.shape[1:3]
        self._augment = BatchAugmenter(height, width, self.pad, info.mean, info.std, device)

    @property
    def train_images(self) -> torch.Tensor:
        """The training split as a uint8 ``(N, C, H, W)`` view (channels_last strides)."""
        return self._train.images

    @property
    def test_images(self) -> torch.Tensor:
        """The test split as a uint8 ``(N, C, H, W)`` view (channels_last strides)."""
        return self._test.permute(0, 3, 1, 2)

    def train_batches(self, epoch: int, with_index: bool = False) -> Iterator[Batch]:
        plan = self._plan(epoch)  # checks epoch now, not at the first next()
        return self._train_iter(plan, with_index)

    def _train_iter(self, plan, with_index: bool) -> Iterator[Batch]:
        device = self.device
        order = plan.order.to(device)
        placement = self._augment.place(
            self._train, order, plan.dy.to(device), plan.dx.to(device), plan.flip.to(device)
        )
        labels = self._y_train[order]
        for (start, stop), n_flip in zip(plan.bounds, plan.n_flip, strict=True):
            x = self._augment.batch(self._train, placement, start, stop, n_flip, self.channels_last)
            yield (x, labels[start:stop], order[start:stop]) if with_index else (x, labels[start:stop])

    def eval_batches(self) -> Iterator[Batch]:
        for start in range(0, self.info.n_test, self.eval_batch_size):
            stop = start + self.eval_batch_size
            x = self._augment.normalize(self._test[start:stop], None, self.channels_last)
            yield x, self._y_test[start:stop]
