"""A procedurally generated image classification task for fast tests and smoke runs.

Each class has a smooth random prototype: per channel, a sum of a few plane waves with
low spatial frequency (at most ``MAX_FREQ`` cycles across the image). An image of class
``y`` is

    contrast * shifted(prototype[y]) + distraction * shifted(prototype[other]) + noise

with a random shift of up to ``SHIFT`` pixels for both prototypes, ``contrast`` in
[0.5, 1], a random other class mixed in with weight in [0, 1], and uniform noise of unit
variance; it is then mapped to uint8 around grey 128. The distractor and the noise keep
the task from being trivial: a linear classifier on the pixels reaches roughly 70 % test
accuracy on the 2,000 training images of conf/dataset/synthetic.yaml, and a small CNN
climbs well above chance within a couple of epochs without saturating.

Generation depends only on the arguments (numpy ``default_rng(seed)``) and takes well
under a second for the YAML's sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdrun.data.arrays import Splits
from kdrun.data.base import ArraySource, at_least
from kdrun.errors import ConfigError

SHIFT = 4  # max per-sample shift of the prototypes, pixels
TERMS = 4  # plane waves per prototype channel
MAX_FREQ = 2.0  # cycles per image width
PIXEL_SCALE = 40.0  # uint8 units per unit of signal


def make_synthetic(*, num_classes: int, n_train: int, n_test: int, image_size: int, channels: int,
                   seed: int) -> Splits:
    """Generate the train and test split (labels balanced within each split, shuffled)."""
    rng = np.random.default_rng(seed)
    size = image_size
    canvas = size + 2 * SHIFT
    coords = np.arange(canvas, dtype=np.float32) / size

    # Prototypes: (classes, H+2S, W+2S, channels), zero mean and unit std each.
    waves = (num_classes, 1, 1, channels, TERMS)
    fx = rng.uniform(-MAX_FREQ, MAX_FREQ, waves).astype(np.float32)
    fy = rng.uniform(-MAX_FREQ, MAX_FREQ, waves).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, waves).astype(np.float32)
    angle = (
        2
        * np.pi
        * (fx * coords[None, None, :, None, None] + fy * coords[None, :, None, None, None])
    )
    protos = np.cos(angle + phase).sum(axis=-1)
    protos -= protos.mean(axis=(1, 2, 3), keepdims=True)
    protos /= protos.std(axis=(1, 2, 3), keepdims=True)
    # windows[k, i, j] is prototype k shifted by (i, j): shape (K, 2S+1, 2S+1, C, H, W).
    windows = np.lib.stride_tricks.sliding_window_view(protos, (size, size), axis=(1, 2))

    n = n_train + n_test
    # Balanced labels in each split, in random order.
    labels = np.concatenate(
        [rng.permutation(np.arange(count) % num_classes) for count in (n_train, n_test)]
    )
    if num_classes > 1:
        other = (labels + rng.integers(1, num_classes, n)) % num_classes
    else:
        other = labels
    oy, ox, oy2, ox2 = rng.integers(0, 2 * SHIFT + 1, (4, n))
    contrast = rng.uniform(0.5, 1.0, (n, 1, 1, 1)).astype(np.float32)
    distraction = rng.uniform(0.0, 1.0, (n, 1, 1, 1)).astype(np.float32)

    image = contrast * windows[labels, oy, ox]  # (n, C, H, W)
    image += distraction * windows[other, oy2, ox2]
    noise = rng.random((n, channels, size, size), dtype=np.float32)
    image += (noise - 0.5) * np.float32(np.sqrt(12.0))  # uniform, unit variance
    image *= PIXEL_SCALE
    image += 128.0
    np.clip(image, 0, 255, out=image)
    pixels = np.ascontiguousarray(image.astype(np.uint8).transpose(0, 2, 3, 1))  # NHWC

    return Splits(
        x_train=pixels[:n_train],
        y_train=labels[:n_train].astype(np.int64),
        x_test=pixels[n_train:],
        y_test=labels[n_train:].astype(np.int64),
        num_classes=num_classes,
        class_names=tuple(f"class_{k}" for k in range(num_classes)),
    )


@dataclass
class Synthetic(ArraySource):
    """The generated task above (``conf/dataset/synthetic.yaml``); ``seed`` fixes the images (the
    training seed is separate)."""

    num_classes: int
    n_train: int
    n_test: int
    image_size: int
    channels: int
    seed: int

    def __post_init__(self) -> None:
        classes, n_train = at_least(self, "num_classes", self.num_classes, 2), at_least(self, "n_train", self.n_train, 2)
        if n_train < classes:
            raise ConfigError(f"dataset.n_train={n_train} must be >= dataset.num_classes={classes}: every class "
                              "needs training images")
        at_least(self, "n_test", self.n_test, 1)
        at_least(self, "image_size", self.image_size, 4)
        at_least(self, "channels", self.channels, 1)
        at_least(self, "seed", self.seed, 0)
        super().__post_init__()

    def shape(self) -> tuple[int, int]:
        return self.image_size, self.channels

    def load(self) -> Splits:
        return make_synthetic(num_classes=self.num_classes, n_train=self.n_train, n_test=self.n_test,
                              image_size=self.image_size, channels=self.channels, seed=self.seed)
