"""Loading whole datasets into numpy arrays, checking them, and taking stratified subsets.

Every in-memory dataset ends up as :class:`Splits`: uint8 images in NHWC order and int64
labels for the train and test split.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.resources
import socket
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdrun.errors import DataError

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
MINI_ASSET = "fashion_mnist_mini.npz"

# What to suggest when a real dataset cannot be had.
OFFLINE_ALTERNATIVES = (
    "dataset=npz dataset.path=/path/to/file.npz, dataset=fashion_mnist or dataset=synthetic"
)


@dataclass
class Splits:
    """A dataset held in memory: ``x_*`` uint8 ``(N, H, W, C)``, ``y_*`` int64 ``(N,)``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]


# --------------------------------------------------------------------------- checks
def _check_images(x: np.ndarray, key: str, source: str) -> np.ndarray:
    """Return ``x`` as (N, H, W, C) uint8, or raise a DataError that says what is wrong."""
    if x.dtype != np.uint8:
        raise DataError(
            f"{source}: {key} has dtype {x.dtype}, expected uint8 pixels 0..255 "
            f"(convert floats in [0, 1] with (x * 255).round().astype(np.uint8))"
        )
    if x.ndim == 3:  # (N, H, W) grayscale
        x = x[..., None]
    if x.ndim != 4 or min(x.shape) == 0:
        raise DataError(
            f"{source}: {key} has shape {x.shape}, expected (N, H, W, C) or (N, H, W) grayscale"
        )
    if x.shape[3] > 4 and x.shape[1] <= 4:
        raise DataError(
            f"{source}: {key} has shape {x.shape}, which looks channels-first; "
            f"store images as (N, H, W, C) (x.transpose(0, 2, 3, 1))"
        )
    return x


def _check_labels(y: np.ndarray, n_images: int, key: str, source: str) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{source}: {key} has shape {y.shape} and dtype {y.dtype}, "
            f"expected a 1-D integer array of class indices"
        )
    if len(y) != n_images:
        raise DataError(f"{source}: {key} has {len(y)} labels but there are {n_images} images")
    if len(y) and y.min() < 0:
        raise DataError(f"{source}: {key} has a negative label ({y.min()}); labels must be >= 0")
    return y.astype(np.int64)


def make_splits(arrays: dict[str, np.ndarray], source: str, class_names=None) -> Splits:
    """Check raw arrays (keys as in :data:`NPZ_KEYS`) and build :class:`Splits`."""
    x_train = _check_images(arrays["x_train"], "x_train", source)
    x_test = _check_images(arrays["x_test"], "x_test", source)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{source}: x_train images are {x_train.shape[1:]} (H, W, C) "
            f"but x_test images are {x_test.shape[1:]}; both splits need the same shape"
        )
    y_train = _check_labels(arrays["y_train"], len(x_train), "y_train", source)
    y_test = _check_labels(arrays["y_test"], len(x_test), "y_test", source)
    top = int(max(y_train.max(initial=0), y_test.max(initial=0)))
    if class_names is not None:
        class_names = tuple(str(name) for name in class_names)
        num_classes = len(class_names)
        if top >= num_classes:
            raise DataError(
                f"{source}: label {top} is out of range for the {num_classes} class_names"
            )
    else:
        num_classes = top + 1
    _check_classes(y_train, y_test, num_classes, source)
    if class_names is None:
        class_names = tuple(str(i) for i in range(num_classes))
    return Splits(x_train, y_train, x_test, y_test, num_classes, class_names)


def _check_classes(y_train: np.ndarray, y_test: np.ndarray, num_classes: int, source: str) -> None:
    """The labels are the classes 0..K-1, each with training images, and every test label occurs in
    y_train: a model has one output per class, so a gap (or a stray label of 10**6) would add
    classes nothing teaches, and a test-only label would be a class no model could learn."""
    remap = "remap both splits with np.unique(np.concatenate([y_train, y_test]), return_inverse=True)"
    seen = np.unique(y_train)
    unseen = np.setdiff1d(np.unique(y_test), seen)
    if len(unseen):
        raise DataError(
            f"{source}: label {int(unseen[0])} occurs in y_test but not in y_train "
            f"({len(unseen)} such label(s)); every test label needs training images: "
            f"drop those test samples, or give them training images"
        )
    if len(seen) < num_classes:
        gap = int(np.setdiff1d(np.arange(len(seen) + 1), seen)[0])
        raise DataError(
            f"{source}: labels must be the classes 0..K-1, each in y_train, but y_train holds "
            f"{len(seen)} distinct labels for {num_classes} classes (0..{num_classes - 1}; class {gap} "
            f"has no training image); {remap}"
        )


# --------------------------------------------------------------------------- npz
def load_npz(path: Path, *, key: str = "dataset.path") -> Splits:
    """Arrays ``x_train, y_train, x_test, y_test`` (+ optional ``class_names``) from a .npz."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}={path}: no such file (expected a .npz with {', '.join(NPZ_KEYS)})")
    source = str(path)
    with open(path, "rb") as handle:
        if handle.read(2) != b"PK":  # every zip archive, and so every .npz, starts so
            raise DataError(
                f"{source} is not a .npz file (not a zip archive); save it with np.savez"
            )
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in NPZ_KEYS if k not in archive.files]
            if missing:
                raise DataError(
                    f"{source} lacks array {missing[0]!r} "
                    f"(has: {', '.join(archive.files) or 'none'}); "
                    f"expected {', '.join(NPZ_KEYS)} and optionally class_names"
                )
            arrays = {k: archive[k] for k in NPZ_KEYS}
            names = archive["class_names"] if "class_names" in archive.files else None
    except DataError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError(
                f"{source} holds object (pickled) arrays, which are not loaded; "
                f"save plain numeric/string arrays with np.savez"
            ) from None
        raise DataError(f"{source} is not a readable .npz file ({exc})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(
            f"{source} is not a readable .npz file ({type(exc).__name__}: {exc})"
        ) from None
    if names is not None and names.ndim != 1:
        raise DataError(f"{source}: class_names has shape {names.shape}, expected 1-D")
    return make_splits(arrays, source, names)


def mini_asset_path():
    """The Traversable of the shipped Fashion-MNIST subset inside the package."""
    return importlib.resources.files("kdrun.data").joinpath("assets", MINI_ASSET)


def load_fashion_mnist_mini() -> Splits:
    """The small Fashion-MNIST subset shipped with kdrun (see assets/FASHION_MNIST_LICENSE.txt)."""
    asset = mini_asset_path()
    if not asset.is_file():
        raise DataError(
            f"the shipped dataset {asset} is missing; reinstall kdrun or rebuild it with "
            f"scripts/build_fashion_mnist_mini.py"
        )
    with importlib.resources.as_file(asset) as path:
        return load_npz(path, key="kdrun/data/assets")


# --------------------------------------------------------------------------- IDX (Fashion-MNIST)
def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (optionally gzip-compressed) into an array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path} ({type(exc).__name__}: {exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise DataError(
            f"{path} holds IDX type 0x{data[2]:02x}; only unsigned bytes (0x08) are supported"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) - header != int(np.prod(shape)):
        raise DataError(
            f"{path} is truncated: header says shape {shape}, found {len(data) - header} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()  # writable


def find_fashion_mnist_files(root: Path) -> dict[str, Path]:
    """The four IDX files under ``root`` (``.gz`` or uncompressed), or a DataError."""
    found = {}
    for key, stem in FASHION_MNIST_FILES.items():
        for candidate in (root / f"{stem}.gz", root / stem):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            raise DataError(
                f"Fashion-MNIST not found: {root / (stem + '.gz')} is missing; install it with "
                f"`apt-get install dataset-fashion-mnist`, set dataset.root=DIR, "
                f"or use dataset=fashion_mnist_mini"
            )
    return found


def load_fashion_mnist(root: Path) -> Splits:
    files = find_fashion_mnist_files(Path(root))
    arrays = {key: read_idx(path) for key, path in files.items()}
    return make_splits(arrays, f"Fashion-MNIST under {root}", FASHION_MNIST_CLASSES)


# --------------------------------------------------------------------------- CIFAR via torchvision
@contextlib.contextmanager
def socket_timeout(seconds: float):
    """Bound each network wait so that an offline download fails instead of hanging."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (None when ``path`` exists)."""
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def _undo_download(root: Path, created: Path | None, before: set) -> None:
    """A failed download leaves nothing behind: the folders it created, or the files it added."""
    import shutil

    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    for entry in set(root.iterdir()) - before if root.is_dir() else ():
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def load_cifar(torchvision_class: str, root: Path, download: bool, *, name: str) -> Splits:
    """CIFAR-10/100 in torchvision's on-disk format under ``root``: ``torchvision_class`` is
    ``CIFAR10`` or ``CIFAR100``; ``name`` (the dataset's) is what error messages call it."""
    import torchvision

    cls = getattr(torchvision.datasets, torchvision_class)
    root = Path(root)
    where = root.absolute() / cls.base_folder
    try:
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        if not download:
            raise DataError(
                f"{name} not found at {where}; set dataset.download=true to fetch it, "
                f"or use {OFFLINE_ALTERNATIVES}"
            ) from None
        created = _first_missing(root)
        before = set(root.iterdir()) if created is None and root.is_dir() else set()
        try:
            with socket_timeout(30):
                train = cls(str(root), train=True, download=True)
            test = cls(str(root), train=False, download=False)
        except Exception as exc:  # noqa: BLE001 - any failure means: not available offline
            _undo_download(root, created, before)
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            raise DataError(
                f"{name} not found at {where} and the download failed ({reason}); "
                f"offline, use {OFFLINE_ALTERNATIVES}"
            ) from None
    arrays = {
        "x_train": np.asarray(train.data),
        "y_train": np.asarray(train.targets),
        "x_test": np.asarray(test.data),
        "y_test": np.asarray(test.targets),
    }
    return make_splits(arrays, str(where), train.classes)


# --------------------------------------------------------------------------- subsets and statistics
def stratified_subset(labels: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    """Indices (ascending) of ``n`` samples, as evenly spread over the classes as possible.

    Each class gets ``n // K`` samples (the first ``n % K`` classes with samples one more);
    a class with too few samples gives all it has and the rest is shared out among the
    others the same way. Within a class the earliest samples are taken, so the subset is
    deterministic and a larger ``n`` contains a smaller one's picks per class.
    """
    labels = np.asarray(labels)
    available = np.bincount(labels, minlength=num_classes)
    if n >= len(labels):
        return np.arange(len(labels))
    quota = np.zeros_like(available)
    open_classes = [c for c in range(len(available)) if available[c] > 0]
    left = n
    while left > 0 and open_classes:
        share, extra = divmod(left, len(open_classes))
        for i, c in enumerate(open_classes):
            take = min(share + (1 if i < extra else 0), available[c] - quota[c])
            quota[c] += take
            left -= take
        open_classes = [c for c in open_classes if quota[c] < available[c]]
    picks = [np.flatnonzero(labels == c)[: quota[c]] for c in range(len(available)) if quota[c]]
    return np.sort(np.concatenate(picks))


def channel_stats(
    images_nhwc: np.ndarray, chunk: int = 8192
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images, in units of pixel / 255.

    Exact: it counts pixel values per channel (a 256-bin histogram) in chunks, so memory
    stays small and no float rounding accumulates. A constant channel gets std 1.
    """
    channels = images_nhwc.shape[-1]
    counts = np.zeros((channels, 256), dtype=np.int64)
    for start in range(0, len(images_nhwc), chunk):
        part = images_nhwc[start : start + chunk].reshape(-1, channels)
        for c in range(channels):
            counts[c] += np.bincount(part[:, c], minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    total = counts.sum(axis=1)
    mean = counts @ values / total
    var = counts @ (values**2) / total - mean**2
    std = np.sqrt(np.maximum(var, 0.0))
    std[std < 1e-6] = 1.0  # a constant channel: centre it, do not blow it up
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
