"""Tests of kdrun.data: determinism, augmentation against a slow reference, loaders, errors."""

from __future__ import annotations

import copy
import dataclasses
import functools
import pickle
import time
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdrun.config import compose
from kdrun.data import (
    DataSource,
    Npz,
    Synthetic,
    build_data,
    check_dataset_config,
    dataset_source,
)
from kdrun.data.arrays import channel_stats, stratified_subset
from kdrun.data.augment import batch_bounds, make_epoch_plan
from kdrun.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf" / "dataset"
SHARED_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10.npz"
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tests run many small tensor ops; on a 2-core machine OpenMP's spinning worker
    # threads can make such ops an order of magnitude slower than one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _composed(name: str) -> dict:
    return OmegaConf.to_container(compose([f"dataset={name}"]).dataset, resolve=True)


def dataset(name: str, **overrides) -> dict:
    """conf/dataset/<name>.yaml as composed (every default), with ``overrides`` (a dict value
    updates a mapping key, as ``dataset.augment.hflip=false`` does) as a plain dict."""
    cfg = copy.deepcopy(_composed(name))
    for key, value in overrides.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


def small_synthetic(**overrides):
    return dataset("synthetic", **{"n_train": 200, "n_test": 50, "image_size": 16, **overrides})


def synthetic_splits(**overrides):
    """The generated arrays of dataset=synthetic (with ``overrides``), not on a device."""
    return dataset_source(dataset("synthetic", **overrides)).load()


def write_npz(path: Path, *, n_train=40, n_test=12, shape=(10, 12, 3), classes=4, seed=0, **extra):
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "y_train": np.arange(n_train) % classes,
        "x_test": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "y_test": np.arange(n_test) % classes,
    }
    arrays.update(extra)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def all_batches(batches):
    xs, ys = zip(*batches, strict=True)
    return torch.cat(xs), torch.cat(ys)


# ----------------------------------------------------------------------------- config
def test_a_config_that_names_no_dataset_class_is_one_line():
    with pytest.raises(ConfigError, match=r"no _target_"):
        build_data({"name": "mnist"}, batch_size=8)
    with pytest.raises(ConfigError, match=r"dataset\._target_=kdrun\.data\.Mnist cannot be imported"):
        build_data({"_target_": "kdrun.data.Mnist", "name": "mnist"}, batch_size=8)
    with pytest.raises(ConfigError, match=r"gave a dict, not a kdrun\.data\.DataSource") as err:
        build_data({"_target_": "builtins.dict", "name": "mnist"}, batch_size=8)
    assert "\n" not in str(err.value)


def test_unknown_dataset_name_lists_the_yaml_files():
    with pytest.raises(ConfigError) as err:
        compose(["dataset=mnist"])
    message = str(err.value)
    assert "'mnist'" in message and all(f.stem in message for f in CONF.glob("*.yaml"))


def test_values_are_typed_by_the_dataset_class():
    with pytest.raises(ConfigError, match=r"^dataset\.n_train='abc' is invalid: expected an integer$"):
        build_data(small_synthetic(n_train="abc"), batch_size=8)
    with pytest.raises(ConfigError, match=r"^dataset\.image_size=1\.5 is invalid: expected an integer$"):
        build_data(small_synthetic(image_size=1.5), batch_size=8)
    with pytest.raises(ConfigError, match=r"^dataset\.test_subset='x' is invalid: expected null or an integer$"):
        build_data(small_synthetic(test_subset="x"), batch_size=8)
    with pytest.raises(ConfigError, match=r"^dataset\.augment\.hflip='maybe' is invalid: expected true or false$"):
        build_data(small_synthetic(augment={"hflip": "maybe"}), batch_size=8)
    with pytest.raises(ConfigError, match=r"^dataset\.download='maybe' is invalid: expected true or false$"):
        dataset_source(dataset("cifar10", download="maybe"))
    with pytest.raises(ConfigError, match=r"^dataset\.augment=3 is invalid: expected a mapping"):
        build_data(small_synthetic(augment=3), batch_size=8)
    with pytest.raises(ConfigError, match=r"dataset\.seed has no value"):
        build_data({k: v for k, v in small_synthetic().items() if k != "seed"}, batch_size=8)
    # Hydra's conversions: "16" is the integer 16, "off" is false
    source = dataset_source(small_synthetic(image_size="16", augment={"hflip": "off"}))
    assert source.image_size == 16 and source.augment.hflip is False


def test_unknown_key_and_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match=r"dataset\.crop_padding"):
        build_data(small_synthetic(crop_padding=2), batch_size=8)
    with pytest.raises(ConfigError, match=r"dataset\.augment\.flip"):
        build_data(small_synthetic(augment={"flip": True}), batch_size=8)
    with pytest.raises(ConfigError, match=r"crop_padding=-1"):
        build_data(small_synthetic(augment={"crop_padding": -1}), batch_size=8)
    with pytest.raises(ConfigError, match=r"train_subset=500 exceeds"):
        build_data(small_synthetic(train_subset=500), batch_size=8)
    with pytest.raises(ConfigError, match=r"dataset\.mean=\[0\.5, 0\.5\]"):
        build_data(small_synthetic(mean=[0.5, 0.5]), batch_size=8)
    with pytest.raises(ConfigError, match=r"dataset\.std=0"):
        build_data(small_synthetic(std=0), batch_size=8)
    with pytest.raises(ConfigError, match=r"batch_size=0"):
        build_data(small_synthetic(), batch_size=0)
    with pytest.raises(ConfigError, match=r"batch_size=300"):
        build_data(small_synthetic(), batch_size=300, drop_last=True)


def test_every_dataset_yaml_names_its_class_and_holds_every_default(monkeypatch):
    monkeypatch.delenv("KDRUN_DATA", raising=False)
    files = sorted(CONF.glob("*.yaml"))
    assert len(files) >= 7
    for file in files:
        lines = [line for line in file.read_text().splitlines() if line and not line.startswith("#")]
        assert lines[0].startswith("_target_: kdrun.data.") and lines[1] == f"name: {file.stem}", file
        values = dataset(file.stem)
        cls = hydra.utils.get_class(values.pop("_target_"))
        assert issubclass(cls, DataSource) and dataclasses.is_dataclass(cls), file
        fields = dataclasses.fields(cls)
        # the YAML gives every field of the class a value; the class gives none (defaults live once)
        assert sorted(values) == sorted(f.name for f in fields), file
        assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING for f in fields)
        if values.get("path", "") is None or values.get("root", "") is None:  # npz, imagefolder: a path to give
            with pytest.raises(DataError, match=r"needs a path: set dataset\.(path|root)="):
                dataset_source(dataset(file.stem))
        else:
            assert type(dataset_source(dataset(file.stem))) is cls, file


def test_the_dataset_check_reads_no_images(tmp_path, monkeypatch):
    # the pre-Hydra check builds the source and looks for files; loading is build_data's
    def no_loading(self):
        raise AssertionError("check_dataset_config loaded the data")

    for cls in (Npz, Synthetic):
        monkeypatch.setattr(cls, "load", no_loading)
    with pytest.raises(AssertionError, match="loaded"):  # the patch holds
        build_data(small_synthetic(), batch_size=8)
    check_dataset_config(small_synthetic())
    check_dataset_config(dataset("npz", path=str(write_npz(tmp_path / "d.npz"))))
    with pytest.raises(DataError, match=r"nope\.npz: no such file"):
        check_dataset_config(dataset("npz", path=str(tmp_path / "nope.npz")))
    with pytest.raises(ConfigError, match=r"dataset\.n_train=5 must be >= dataset\.num_classes=10"):
        check_dataset_config(small_synthetic(n_train=5))


def test_builds_from_yaml_dictconfig():
    cfg = OmegaConf.load(CONF / "synthetic.yaml")
    cfg.n_train, cfg.n_test = 100, 20
    data = build_data(cfg, batch_size=32)
    assert data.info.n_train == 100 and data.steps_per_epoch == 4
    assert "synthetic" in repr(data) and len(repr(data)) < 200


# ----------------------------------------------------------------------------- batches
def test_same_epoch_is_bit_identical_and_epochs_differ():
    data = build_data(small_synthetic(), batch_size=32, seed=3)
    first = list(data.train_batches(1))
    again = list(data.train_batches(1))
    assert len(first) == data.steps_per_epoch
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other_epoch = list(data.train_batches(2))
    assert not torch.equal(first[0][1], other_epoch[0][1])
    other_seed = next(build_data(small_synthetic(), batch_size=32, seed=4).train_batches(1))
    assert not torch.equal(first[0][1], other_seed[1])


def test_epoch_is_a_permutation_of_the_training_set():
    data = build_data(small_synthetic(), batch_size=32)
    _, labels = all_batches(data.train_batches(0))
    expected = synthetic_splits(n_train=200, n_test=50, image_size=16).y_train
    assert len(labels) == 200
    assert torch.equal(
        torch.bincount(labels, minlength=10),
        torch.bincount(torch.from_numpy(expected), minlength=10),
    )
    plan = make_epoch_plan(200, 32, seed=0, epoch=0, pad=4, hflip=True, drop_last=False)
    assert sorted(plan.order.tolist()) == list(range(200))


def test_batch_shapes_dtypes_and_layout():
    data = build_data(small_synthetic(), batch_size=32, eval_batch_size=20)
    x, y = next(data.train_batches(0))
    assert x.shape == (32, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    xe, ye = all_batches(data.eval_batches())
    assert xe.shape == (50, 3, 16, 16) and data.eval_steps == 3
    flat = build_data(small_synthetic(), batch_size=32, channels_last=False)
    x2, _ = next(flat.train_batches(0))
    assert x2.is_contiguous() and torch.equal(x, x2)


def test_trailing_batch_of_one_is_dropped():
    assert batch_bounds(65, 64, drop_last=False) == [(0, 64)]
    assert batch_bounds(66, 64, drop_last=False) == [(0, 64), (64, 66)]
    assert batch_bounds(66, 64, drop_last=True) == [(0, 64)]
    assert batch_bounds(3, 1, drop_last=False) == [(0, 1), (1, 2), (2, 3)]
    data = build_data(small_synthetic(train_subset=65), batch_size=32)
    sizes = [len(y) for _, y in data.train_batches(0)]
    assert sizes == [32, 32] and data.steps_per_epoch == 2
    data = build_data(small_synthetic(train_subset=70), batch_size=32, drop_last=True)
    assert [len(y) for _, y in data.train_batches(0)] == [32, 32]
    data = build_data(small_synthetic(train_subset=70), batch_size=32)
    assert [len(y) for _, y in data.train_batches(0)] == [32, 32, 6]


# ----------------------------------------------------------------------------- augmentation
def reference_batch(images_nhwc, plan, batch, pad, mean, std):
    """Slow, obviously correct augmentation: one image at a time, explicit zero padding."""
    start, stop = plan.bounds[batch]
    mean_t = torch.tensor(mean).view(-1, 1, 1)
    std_t = torch.tensor(std).view(-1, 1, 1)
    out = []
    for i in range(start, stop):
        image = torch.from_numpy(images_nhwc[int(plan.order[i])]).permute(2, 0, 1).float()
        h, w = image.shape[1:]
        padded = F.pad(image, (pad, pad, pad, pad))  # zeros
        top, left = pad + int(plan.dy[i]), pad + int(plan.dx[i])
        crop = padded[:, top : top + h, left : left + w]
        if plan.flip[i]:
            crop = crop.flip(-1)
        out.append((crop / 255.0 - mean_t) / std_t)
    return torch.stack(out)


@pytest.mark.parametrize(
    "shape,pad,hflip",
    [((10, 12, 3), 4, True), ((10, 12, 3), 0, True), ((8, 8, 1), 2, True), ((9, 7, 3), 3, False)],
)
def test_crop_and_flip_match_slow_reference(tmp_path, shape, pad, hflip):
    path = write_npz(tmp_path / "d.npz", n_train=37, shape=shape)
    channels = shape[2]
    mean, std = [0.3, 0.5, 0.6][:channels], [0.2, 0.25, 0.3][:channels]
    cfg = dataset("npz", path=str(path), augment={"crop_padding": pad, "hflip": hflip}, mean=mean, std=std)
    data = build_data(cfg, batch_size=16, seed=7)
    images = np.load(path)["x_train"]
    for epoch in (0, 5):
        plan = make_epoch_plan(37, 16, seed=7, epoch=epoch, pad=pad, hflip=hflip, drop_last=False)
        assert bool(plan.flip.any()) == hflip
        if pad:
            assert int(plan.dy.abs().max()) == pad or int(plan.dx.abs().max()) == pad
        for b, (x, y) in enumerate(data.train_batches(epoch)):
            expected = reference_batch(images, plan, b, pad, mean, std)
            torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)
            start, stop = plan.bounds[b]
            assert torch.equal(y, torch.from_numpy(np.arange(37) % 4)[plan.order[start:stop]])


def test_flip_and_crop_statistics_of_a_plan():
    plan = make_epoch_plan(10_000, 100, seed=1, epoch=0, pad=4, hflip=True, drop_last=False)
    assert 0.47 < plan.flip.float().mean().item() < 0.53
    assert set(plan.dx.tolist()) == set(range(-4, 5)) == set(plan.dy.tolist())
    for (start, stop), n_flip in zip(plan.bounds, plan.n_flip, strict=True):
        flips = plan.flip[start:stop]
        assert flips[:n_flip].all() and not flips[n_flip:].any()  # mirrored ones first


def test_eval_batches_are_unaugmented_and_normalised(tmp_path):
    path = write_npz(tmp_path / "d.npz", n_test=30)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.4, 0.3]
    data = build_data(
        dataset("npz", path=str(path), mean=mean, std=std),
        batch_size=8,
        eval_batch_size=7,
    )
    x, y = all_batches(data.eval_batches())
    raw = torch.from_numpy(np.load(path)["x_test"]).permute(0, 3, 1, 2).float()
    expected = (raw / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)
    assert y.tolist() == (np.arange(30) % 4).tolist()


def test_computed_mean_std_normalise_the_training_set():
    data = build_data(small_synthetic(augment={"crop_padding": 0, "hflip": False}), batch_size=50)
    pixels = synthetic_splits(n_train=200, n_test=50, image_size=16).x_train
    expected_mean = pixels.reshape(-1, 3).mean(0) / 255
    expected_std = pixels.reshape(-1, 3).std(0) / 255
    np.testing.assert_allclose(data.info.mean, expected_mean, rtol=1e-9)
    np.testing.assert_allclose(data.info.std, expected_std, rtol=1e-9)
    x, _ = all_batches(data.train_batches(0))
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    mean, std = channel_stats(np.full((4, 2, 2, 1), 7, dtype=np.uint8))
    assert mean == pytest.approx((7 / 255,)) and std == (1.0,)  # constant channel: std 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is missing")
def test_cuda_without_a_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match=r"device=cuda"):
        build_data(small_synthetic(), batch_size=8, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_equal_cpu_batches():
    cpu = build_data(small_synthetic(), batch_size=32, seed=1)
    gpu = build_data(small_synthetic(), batch_size=32, seed=1, device="cuda")
    for (xc, yc), (xg, yg) in zip(cpu.train_batches(3), gpu.train_batches(3), strict=True):
        assert xg.device.type == "cuda"
        torch.testing.assert_close(xg.cpu(), xc, atol=1e-6, rtol=0)
        assert torch.equal(yg.cpu(), yc)


# ----------------------------------------------------------------------------- subsets
def test_stratified_subset_is_balanced_and_takes_the_earliest():
    labels = np.array([0, 1, 2, 0, 1, 0, 1, 0, 0, 2, 0])
    index = stratified_subset(labels, 6, 3)
    assert index.tolist() == [0, 1, 2, 3, 4, 9]  # two per class, earliest of each
    index = stratified_subset(labels, 9, 3)  # class 2 has only 2: its share goes to 0 and 1
    assert np.bincount(labels[index]).tolist() == [4, 3, 2]
    assert (np.diff(index) > 0).all()
    assert stratified_subset(labels, 11, 3).tolist() == list(range(11))


def test_train_and_test_subset_counts():
    data = build_data(small_synthetic(train_subset=50, test_subset=20), batch_size=10)
    assert data.info.n_train == 50 and data.info.n_test == 20
    _, y = all_batches(data.train_batches(0))
    assert torch.bincount(y, minlength=10).tolist() == [5] * 10
    _, y = all_batches(data.eval_batches())
    assert torch.bincount(y, minlength=10).tolist() == [2] * 10


# ----------------------------------------------------------------------------- npz
def test_npz_loads_color_and_grayscale(tmp_path):
    path = write_npz(
        tmp_path / "c.npz", shape=(10, 12, 3), classes=5, class_names=np.array(["a", "b", "c", "d", "e"])
    )
    data = build_data(dataset("npz", path=str(path)), batch_size=8)
    info = data.info
    assert (info.num_classes, info.in_chans, info.image_size) == (5, 3, (10, 12))
    assert info.class_names == ("a", "b", "c", "d", "e") and (info.n_train, info.n_test) == (40, 12)
    path = write_npz(tmp_path / "g.npz", shape=(8, 8), classes=3)
    data = build_data(
        dataset("npz", path=str(path), augment={"crop_padding": 1}), batch_size=8
    )
    assert (data.info.num_classes, data.info.in_chans, data.info.image_size) == (3, 1, 8)
    assert next(data.train_batches(0))[0].shape == (8, 1, 8, 8)


def test_npz_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match=r"dataset\.path="):
        build_data(dataset("npz"), batch_size=8)
    with pytest.raises(DataError, match=r"dataset\.path=.*nope\.npz: no such file"):
        build_data(dataset("npz", path=str(tmp_path / "nope.npz")), batch_size=8)
    bad = write_npz(
        tmp_path / "f.npz",
        x_train=np.zeros((4, 8, 8, 3), np.float32),
        y_train=np.zeros(4, np.int64),
    )
    with pytest.raises(DataError, match=r"x_train has dtype float32, expected uint8"):
        build_data(dataset("npz", path=str(bad)), batch_size=2)
    bad = write_npz(tmp_path / "m.npz", y_test=None)
    with pytest.raises(DataError, match=r"lacks array 'y_test'"):
        build_data(dataset("npz", path=str(bad)), batch_size=2)
    bad = write_npz(tmp_path / "n.npz", y_train=np.zeros(39, np.int64))
    with pytest.raises(DataError, match=r"y_train has 39 labels but there are 40 images"):
        build_data(dataset("npz", path=str(bad)), batch_size=2)
    bad = write_npz(tmp_path / "p.npz", class_names=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match=r"pickled"):
        build_data(dataset("npz", path=str(bad)), batch_size=2)
    bad = write_npz(tmp_path / "t.npz", x_train=np.zeros((40, 3, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"channels-first"):
        build_data(dataset("npz", path=str(bad)), batch_size=2)
    (tmp_path / "z.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"z\.npz is not a \.npz file"):
        build_data(dataset("npz", path=str(tmp_path / "z.npz")), batch_size=2)


@pytest.mark.skipif(not SHARED_CIFAR10.is_file(), reason=f"{SHARED_CIFAR10} is not present")
def test_real_cifar10_npz_loads():
    data = build_data(dataset("npz", path=str(SHARED_CIFAR10)), batch_size=128)
    info = data.info
    assert (info.n_train, info.n_test, info.num_classes, info.in_chans, info.image_size) == (
        50000,
        10000,
        10,
        3,
        32,
    )
    assert info.class_names[:3] == ("airplane", "automobile", "bird")
    np.testing.assert_allclose(
        info.mean, (0.4913, 0.4821, 0.4465), atol=2e-4
    )  # shared/data/README.md
    x, y = next(data.train_batches(0))
    assert x.shape == (128, 3, 32, 32) and data.steps_per_epoch == 391


# ----------------------------------------------------------------------------- Fashion-MNIST
def test_fashion_mnist_mini_is_shipped_and_loads():
    data = build_data(dataset("fashion_mnist_mini"), batch_size=64)
    info = data.info
    assert (info.n_train, info.n_test, info.num_classes, info.in_chans, info.image_size) == (
        6000,
        1000,
        10,
        1,
        28,
    )
    assert info.class_names[0] == "T-shirt/top" and info.mean == (0.2860,)
    _, y = all_batches(data.eval_batches())
    assert torch.bincount(y).tolist() == [100] * 10
    from kdrun.data.arrays import mini_asset_path

    assert mini_asset_path().is_file()
    with np.load(mini_asset_path(), allow_pickle=False) as npz:
        assert np.bincount(npz["y_train"]).tolist() == [600] * 10
        assert (np.diff(npz["train_source_index"].astype(int)) > 0).all()
    license_text = mini_asset_path().parent.joinpath("FASHION_MNIST_LICENSE.txt").read_text()
    assert "MIT" in license_text and "Zalando SE" in license_text


@pytest.mark.skipif(
    not FASHION_ROOT.is_dir(), reason="apt-get install dataset-fashion-mnist to run this"
)
def test_fashion_mnist_full_matches_mini():
    data = build_data(
        dataset("fashion_mnist", train_subset=6000, test_subset=1000), batch_size=64
    )
    mini = build_data(dataset("fashion_mnist_mini"), batch_size=64)
    assert torch.equal(data.train_images, mini.train_images)
    assert torch.equal(data.test_images, mini.test_images)


def test_fashion_mnist_missing_names_path_and_install(tmp_path):
    with pytest.raises(DataError) as err:
        build_data(dataset("fashion_mnist", root=str(tmp_path)), batch_size=8)
    message = str(err.value)
    assert str(tmp_path) in message and "apt-get install dataset-fashion-mnist" in message
    assert "fashion_mnist_mini" in message


# ----------------------------------------------------------------------------- CIFAR files
def test_cifar_missing_without_download_names_path(tmp_path):
    with pytest.raises(DataError) as err:
        build_data(dataset("cifar10", root=str(tmp_path), download=False), batch_size=8)
    message = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and "dataset.download=true" in message


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_failed_download_is_one_line_with_alternatives(tmp_path, monkeypatch, name):
    import torchvision

    def offline(self):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    monkeypatch.setattr(cls, "download", offline)
    with pytest.raises(DataError) as err:
        build_data(dataset(name, root=str(tmp_path), download=True), batch_size=8)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path) in message and "download failed" in message
    assert "dataset=npz dataset.path=" in message and "dataset=fashion_mnist" in message
    assert "dataset=synthetic" in message


def test_cifar10_reads_torchvision_files(tmp_path, monkeypatch):
    import torchvision

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ]
    for i, file in enumerate(names):
        batch = {
            "data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
            "labels": [(4 * i + j) % 10 for j in range(4)],  # every class in the training batches
        }
        (folder / file).write_bytes(pickle.dumps(batch))
    meta = {"label_names": [f"c{k}" for k in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    data = build_data(dataset("cifar10", root=str(tmp_path)), batch_size=4)
    info = data.info
    assert (info.n_train, info.n_test, info.num_classes, info.image_size) == (20, 4, 10, 32)
    assert info.mean == (0.4914, 0.4822, 0.4465) and info.class_names[0] == "c0"
    first = pickle.loads((folder / "data_batch_1").read_bytes())["data"][0].reshape(3, 32, 32)
    assert torch.equal(data.train_images[0], torch.from_numpy(first))


# ----------------------------------------------------------------------------- image folders
def make_image_tree(root: Path, classes=("cat", "dog", "emu"), n_train=5, n_val=2):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", n_train), ("val", n_val)):
        for k, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
                pixels[..., k] = 255  # a class cue
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_imagefolder_tiny_tree(tmp_path):
    root = make_image_tree(tmp_path / "imgs")
    cfg = dataset("imagefolder", root=str(root), image_size=8, num_workers=0, augment={"crop_padding": 2})
    data = build_data(cfg, batch_size=4, eval_batch_size=4, seed=2)
    info = data.info
    assert (info.num_classes, info.n_train, info.n_test, info.image_size) == (3, 15, 6, 8)
    assert info.class_names == ("cat", "dog", "emu") and len(info.mean) == 3
    batches = list(data.train_batches(0))
    assert [len(y) for _, y in batches] == [
        4,
        4,
        4,
        3,
    ] and data.steps_per_epoch == 4  # tail of 3 kept
    x, y = batches[0]
    assert x.shape == (4, 3, 8, 8) and x.is_contiguous(memory_format=torch.channels_last)
    again = list(data.train_batches(0))
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(batches, again, strict=True)
    )
    _, ye = all_batches(data.eval_batches())
    assert ye.tolist() == [0, 0, 1, 1, 2, 2]
    # Worker processes only decode: batches are the same with them.
    workers = build_data(
        {**cfg, "num_workers": 1, "mean": list(info.mean), "std": list(info.std)},  # a plain dict does too
        batch_size=4,
        seed=2,
    )
    for a, b in zip(batches, workers.train_batches(0), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match=r"dataset\.root="):
        build_data(dataset("imagefolder"), batch_size=4)
    with pytest.raises(DataError, match=r"has no train/ folder"):
        build_data(dataset("imagefolder", root=str(tmp_path)), batch_size=4)


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_and_fast():
    start = time.perf_counter()
    a = synthetic_splits()
    elapsed = time.perf_counter() - start
    b = synthetic_splits()
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
    assert a.x_train.shape == (2000, 32, 32, 3) and a.x_test.shape == (500, 32, 32, 3)
    assert not np.array_equal(a.x_train, synthetic_splits(seed=1).x_train)
    assert elapsed < 2.0  # about 0.2 s on a 2-core CI machine; the budget is 1 s


def test_synthetic_is_learnable_but_not_trivial():
    data = build_data(dataset("synthetic"), batch_size=64, seed=0)
    torch.manual_seed(0)
    model = torch.nn.Linear(3 * 32 * 32, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for epoch in range(4):  # about 120 steps
        for x, y in data.train_batches(epoch):
            loss = F.cross_entropy(model(x.flatten(1)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        correct = sum(
            int((model(x.flatten(1)).argmax(1) == y).sum()) for x, y in data.eval_batches()
        )
    accuracy = correct / data.info.n_test
    assert 0.2 < accuracy < 0.99, accuracy  # > 2x chance, and not solved outright


def test_train_batches_with_index_give_each_sample_position():
    data = build_data(small_synthetic(), batch_size=32, seed=1)
    seen = []
    for x, y, index in data.train_batches(2, with_index=True):
        assert torch.equal(y, data._y_train[index])
        seen.append(index)
    plain = [y for _, y in data.train_batches(2)]
    assert torch.equal(torch.cat(plain), data._y_train[torch.cat(seen)])
    assert len(set(torch.cat(seen).tolist())) == torch.cat(seen).numel()  # each sample at most once


def test_info_gives_each_training_position_its_label_on_the_cpu(tmp_path):
    data = build_data(small_synthetic(train_subset=60), batch_size=16, seed=3)
    labels = data.info.train_labels
    assert labels.dtype == torch.int64 and labels.device.type == "cpu" and labels.shape == (60,)
    assert torch.bincount(labels, minlength=10).tolist() == [6] * 10  # the stratified subset's labels
    for _, y, index in data.train_batches(1, with_index=True):
        assert torch.equal(y.cpu(), labels[index.cpu()])
    assert "train_labels" not in repr(data.info) and "tensor" not in repr(data.info)  # cheap to print
    assert data.info == build_data(small_synthetic(train_subset=60), batch_size=16, seed=3).info
    # the image-folder module gives them too (after its own subset)
    root = make_image_tree(tmp_path / "imgs", n_train=4, n_val=1)
    folder = build_data(dataset("imagefolder", root=str(root), image_size=8, num_workers=0, train_subset=9,
                                mean=[0.5] * 3, std=[0.25] * 3), batch_size=4, seed=2)
    labels = folder.info.train_labels
    assert labels.dtype == torch.int64 and labels.shape == (9,)
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for _, y, index in folder.train_batches(0, with_index=True):
        assert torch.equal(y.cpu(), labels[index.cpu()])
