"""scripts/build_cifar_npz.py on fake torchvision-format CIFAR folders generated here (offline: the real
files are never needed; their MD5 check is switched off, as in tests/test_data.py)."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest

from kdrun.data.arrays import load_npz

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_cifar_npz.py"
#: torchvision's layout: folder, training files, test files, meta file, the meta key and the label key
LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{k}" for k in range(1, 6)], ["test_batch"], "batches.meta",
                "label_names", "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_label_names", "fine_labels", 100),
}


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("build_cifar_npz", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision's checks of the files, less their MD5 sums: a file is good when it is there."""
    import torchvision

    def there(path, md5=None):
        return Path(path).is_file()

    for module in (torchvision.datasets.cifar, torchvision.datasets.utils):
        monkeypatch.setattr(module, "check_integrity", there)


def fake_cifar(root: Path, name: str) -> dict:
    """CIFAR's pickled batches (rows of 3072 bytes: the red plane, then green, then blue) with every
    class in the training files; returns the images (N, 3, 32, 32) and labels written."""
    folder, train_files, test_files, meta, names_key, labels_key, classes = LAYOUT[name]
    (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {"train": ([], []), "test": ([], [])}
    for split, files in (("train", train_files), ("test", test_files)):
        per_file = (classes if split == "train" else 7) // len(files) + 1
        for k, file in enumerate(files):
            data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
            labels = [(k * per_file + j) % classes for j in range(per_file)]
            (root / folder / file).write_bytes(pickle.dumps({"data": data, labels_key: labels}))
            written[split][0].append(data.reshape(-1, 3, 32, 32))
            written[split][1].extend(labels)
    (root / folder / meta).write_bytes(pickle.dumps({names_key: [f"class{c}" for c in range(classes)]}))
    return {split: (np.concatenate(images), np.array(labels)) for split, (images, labels) in written.items()}


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_the_npz_holds_torchvisions_images_in_kdruns_layout(tmp_path, script, no_md5, capsys, name):
    written = fake_cifar(tmp_path / "data", name)
    out = tmp_path / "out" / f"{name}.npz"
    assert script.main([name, "--root", str(tmp_path / "data"), "--out", str(out)]) == 0
    with np.load(out, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["class_names", "x_test", "x_train", "y_test", "y_train"]
        for split in ("train", "test"):
            images, labels = written[split]
            assert npz[f"x_{split}"].dtype == np.uint8 and npz[f"x_{split}"].shape == (len(images), 32, 32, 3)
            assert np.array_equal(npz[f"x_{split}"], images.transpose(0, 2, 3, 1))  # planes -> HWC
            assert np.array_equal(npz[f"y_{split}"], labels)
        assert npz["class_names"][-1] == f"class{LAYOUT[name][6] - 1}"
    splits = load_npz(out)
    assert splits.num_classes == LAYOUT[name][6] and len(splits.x_test) == len(written["test"][1])
    assert f"dataset.path={out}" in capsys.readouterr().out
    assert not list(out.parent.glob("*.partial"))


def test_missing_files_offline_are_one_line(tmp_path, script, capsys, monkeypatch):
    import torchvision

    assert script.main(["cifar100", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("build_cifar_npz: error: cifar100: no readable files at ")
    assert str(tmp_path / "cifar-100-python") in err and "cifar-100-python.tar.gz" in err and "--download" in err

    def offline(self):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.CIFAR100, "download", offline)
    assert script.main(["cifar100", "--root", str(tmp_path), "--download"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "fetching https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz failed" in err
    assert "Temporary failure in name resolution" in err and not (tmp_path / "cifar100.npz").exists()


def test_a_copied_archive_is_extracted_without_a_network(tmp_path, script, no_md5, monkeypatch):
    import tarfile
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    written = fake_cifar(tmp_path / "made", "cifar100")
    with tarfile.open(tmp_path / "cifar-100-python.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "made" / "cifar-100-python", arcname="cifar-100-python")
    assert script.main(["cifar100", "--root", str(tmp_path)]) == 0
    assert np.array_equal(load_npz(tmp_path / "cifar100.npz").y_train, written["train"][1])
