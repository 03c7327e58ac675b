#!/usr/bin/env python3
"""Build kdrun/data/assets/fashion_mnist_mini.npz from the Fashion-MNIST IDX files.

The subset is the first 600 training images and the first 100 test images of each class,
in file order (6,000 + 1,000 images). The source index of every picked image is stored
next to it, so the subset can be checked against the original files.

Get the IDX files first (Debian/Ubuntu):

    apt-get update && apt-get install -y dataset-fashion-mnist
    python scripts/build_fashion_mnist_mini.py            # writes the asset
    python scripts/build_fashion_mnist_mini.py --check    # rebuilds in memory and compares
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kdrun.data.arrays import (  # noqa: E402
    FASHION_MNIST_CLASSES,
    find_fashion_mnist_files,
    read_idx,
    stratified_subset,
)

PER_CLASS = {"train": 600, "test": 100}
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUT = REPO / "kdrun" / "data" / "assets" / "fashion_mnist_mini.npz"
SOURCE = (
    "Fashion-MNIST (Zalando SE, MIT licence), IDX files of the Debian package "
    "dataset-fashion-mnist 0.0~git20200523.55506a9-1; first 600 train and first 100 test "
    "images of each class in file order"
)


def build(root: Path) -> dict[str, np.ndarray]:
    files = find_fashion_mnist_files(root)
    arrays: dict[str, np.ndarray] = {}
    for split, prefix in (("train", "train"), ("test", "test")):
        images = read_idx(files[f"x_{split}"])
        labels = read_idx(files[f"y_{split}"])
        classes = len(FASHION_MNIST_CLASSES)
        index = stratified_subset(labels, PER_CLASS[split] * classes, classes)
        counts = np.bincount(labels[index], minlength=classes)
        assert (counts == PER_CLASS[split]).all(), counts
        arrays[f"x_{prefix}"] = np.ascontiguousarray(images[index])  # (N, 28, 28) uint8
        arrays[f"y_{prefix}"] = labels[index].astype(np.uint8)
        arrays[f"{prefix}_source_index"] = index.astype(np.uint16)  # row in the IDX file
    arrays["class_names"] = np.array(FASHION_MNIST_CLASSES)
    arrays["source"] = np.array(SOURCE)
    return arrays


def encode(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="folder with the IDX files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="npz file to write")
    parser.add_argument(
        "--check", action="store_true", help="compare with --out instead of writing"
    )
    args = parser.parse_args(argv)

    arrays = build(args.root)
    if args.check:
        with np.load(args.out, allow_pickle=False) as existing:
            same = set(existing.files) == set(arrays) and all(
                np.array_equal(existing[k], arrays[k]) for k in arrays
            )
        print(f"{args.out}: {'matches' if same else 'DIFFERS FROM'} a fresh build")
        return 0 if same else 1

    data = encode(arrays)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    print(f"wrote {args.out}: {len(data):,} bytes, sha256 {digest}")
    for key, value in arrays.items():
        print(f"  {key:20s} {str(value.shape):16s} {value.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
