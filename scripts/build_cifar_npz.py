#!/usr/bin/env python
"""Build a CIFAR-10 or CIFAR-100 .npz for kdrun's ``dataset=npz`` from torchvision's files.

    python scripts/build_cifar_npz.py cifar100 [--root DIR] [--out FILE.npz] [--download]

Reads ``<root>/cifar-100-python`` (``cifar-10-batches-py`` for cifar10) with torchvision.datasets. Where
that folder is missing but torchvision's archive (``cifar-100-python.tar.gz``) lies in root, the archive is
checked against its MD5 sum and extracted: no network. ``--download`` fetches the archive when it is not
there (needs a network). Writes ``x_train`` (N, 32, 32, 3 uint8), ``y_train`` (int64), ``x_test``,
``y_test`` and ``class_names`` to --out (default ``<root>/<name>.npz``), then reads it back with kdrun's
loader. A problem is one line ``build_cifar_npz: error: ...`` and exit status 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from kdrun.data.arrays import socket_timeout
from kdrun.errors import DataError, OneLineParser

PROG = "build_cifar_npz"
#: dataset name -> torchvision.datasets class
CLASSES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="Build a CIFAR-10/100 .npz (x_train, y_train, x_test, y_test, "
                                             "class_names) from torchvision's files for kdrun's dataset=npz.")
    p.add_argument("name", choices=sorted(CLASSES), help="which dataset")
    p.add_argument("--root", default=os.environ.get("KDRUN_DATA", "data"),
                   help="folder holding torchvision's files or archive (default $KDRUN_DATA, else ./data)")
    p.add_argument("--out", default=None, help="the .npz to write (default <root>/<name>.npz)")
    p.add_argument("--download", action="store_true", help="fetch torchvision's archive when missing (online)")
    return p


def load(name: str, root: Path, download: bool) -> dict[str, np.ndarray]:
    """The arrays of both splits, read by torchvision (extracting or fetching the archive as allowed)."""
    import torchvision

    cls = getattr(torchvision.datasets, CLASSES[name])
    folder, archive = root / cls.base_folder, root / cls.filename
    had_archive = archive.exists()
    fetch = download or (had_archive and not folder.is_dir())
    try:
        with socket_timeout(30):
            train = cls(str(root), train=True, download=fetch)
        test = cls(str(root), train=False, download=False)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        raise DataError(f"{name}: no readable files at {folder.absolute()}; run with --download (online), or copy "
                        f"{cls.filename} ({cls.url}) into {root.absolute()} and run again") from None
    except Exception as exc:  # noqa: BLE001 - a failed download: offline, blocked, interrupted
        if not had_archive:
            archive.unlink(missing_ok=True)  # no half-written archive left behind
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise DataError(f"{name}: fetching {cls.url} failed ({reason}); offline, copy {cls.filename} into "
                        f"{root.absolute()} (checked and extracted without a network) or bring the .npz") from None
    return {"x_train": np.asarray(train.data, dtype=np.uint8), "y_train": np.asarray(train.targets, dtype=np.int64),
            "x_test": np.asarray(test.data, dtype=np.uint8), "y_test": np.asarray(test.targets, dtype=np.int64),
            "class_names": np.asarray([str(c) for c in train.classes])}


def write(arrays: dict[str, np.ndarray], out: Path) -> None:
    """``np.savez`` to a temporary file beside ``out``, then renamed: a stopped build leaves no half file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with open(partial, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(partial, out)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    root = Path(args.root).expanduser()
    out = Path(args.out).expanduser() if args.out else root / f"{args.name}.npz"
    try:
        write(load(args.name, root, args.download), out)
        from kdrun.data.arrays import load_npz

        splits = load_npz(out)  # what kdrun's dataset=npz will read
    except (DataError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"wrote {out}: {len(splits.x_train)} train / {len(splits.x_test)} test images of "
          f"{'x'.join(map(str, splits.x_train.shape[1:]))}, {splits.num_classes} classes; use it with "
          f"kdrun dataset=npz dataset.path={out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
