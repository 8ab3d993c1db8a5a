"""Data loading from generated IDX files, the Debian offline copy, and the real FashionMNIST."""

from __future__ import annotations

import gzip
import hashlib
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEBIAN_DIR, FILES, write_split
from hydra.utils import instantiate
from PIL import Image
from test_config import make_cfg
from torchvision.datasets import FashionMNIST

from gpool.data import DataError, TorchvisionImages, check_idx

CLASSES = [str(i) for i in range(10)]


def fashion(root: Path, offline_dir: Path | None = None, **kwargs) -> TorchvisionImages:
    offline = None
    if offline_dir is not None:
        names = [name for pair in FILES.values() for name in pair]
        md5 = {
            name: hashlib.md5(
                gzip.decompress((offline_dir / f"{name}.gz").read_bytes())
            ).hexdigest()
            for name in names
        }
        offline = {"dir": str(offline_dir), "md5": md5, "install_hint": "apt-get install x"}
        offline["md5"].update(kwargs.pop("md5", {}))
    return TorchvisionImages(
        source=partial(FashionMNIST),
        root=str(root),
        channels=1,
        image_size=28,
        num_classes=10,
        classes=CLASSES,
        mean=[0.5],
        std=[0.25],
        offline_copy=offline,
        **kwargs,
    )


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point torchvision's mirrors at a closed local port: the download fails at once."""
    monkeypatch.setattr(FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])


@pytest.fixture
def offline_dir(tmp_path: Path) -> Path:
    """A directory laid out like Debian's dataset-fashion-mnist package (gzip'd IDX files)."""
    directory = tmp_path / "debian"
    directory.mkdir()
    write_split(directory, "train", 300, seed=3, gz=True)
    write_split(directory, "test", 100, seed=4, gz=True)
    return directory


def test_loads_idx_files_in_torchvision_layout(idx_root: Path) -> None:
    data = fashion(idx_root).load("cpu")
    assert data.train.images.shape == (512, 1, 28, 28) and data.train.images.dtype == torch.uint8
    assert data.val.images.shape == (256, 1, 28, 28)
    assert data.train.labels.dtype == torch.int64
    assert int(data.train.labels.min()) >= 0 and int(data.train.labels.max()) <= 9
    x, y = data.batch(data.train, torch.tensor([0, 5, 7]))
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32
    expected = (data.train.images[[0, 5, 7]].float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(x, expected)
    torch.testing.assert_close(y, data.train.labels[[0, 5, 7]])


def test_without_normalisation_inputs_are_totensor_scaled(idx_root: Path) -> None:
    data = fashion(idx_root, normalize=False).load("cpu")
    x, _ = data.batch(data.val, slice(0, 4))
    torch.testing.assert_close(x, data.val.images[:4].float() / 255)


def test_truncated_file_is_named(idx_root: Path) -> None:
    path = idx_root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte has .* truncated or corrupt"):
        fashion(idx_root).load("cpu")


def test_wrong_magic_is_named(idx_root: Path) -> None:
    path = idx_root / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x1f\x8b" + path.read_bytes()[2:])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte is not an IDX file"):
        fashion(idx_root).load("cpu")


def test_check_idx_accepts_a_complete_file(idx_root: Path) -> None:
    check_idx(idx_root / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte")


def test_missing_everywhere_says_where_it_looked_and_how_to_fix(
    tmp_path: Path, no_download: None
) -> None:
    with pytest.raises(DataError) as err:
        fashion(tmp_path / "empty", offline_dir=None).load("cpu")
    message = str(err.value)
    assert str(tmp_path / "empty" / "FashionMNIST" / "raw") in message
    assert "go online" in message


def test_offline_copy_is_decompressed_once_and_verified(
    tmp_path: Path, offline_dir: Path, no_download: None
) -> None:
    root = tmp_path / "cache"
    data = fashion(root, offline_dir).load("cpu")
    assert len(data.train) == 300 and len(data.val) == 100
    raw = root / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(n for ns in FILES.values() for n in ns)
    (offline_dir / "train-images-idx3-ubyte.gz").unlink()  # later loads use the cache
    assert len(fashion(root, offline_dir=None).load("cpu").train) == 300


def test_offline_copy_with_wrong_md5_is_refused(
    tmp_path: Path, offline_dir: Path, no_download: None
) -> None:
    loader = fashion(tmp_path / "cache", offline_dir, md5={"t10k-images-idx3-ubyte": "0" * 32})
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz decompresses to md5 .*apt-get"):
        loader.load("cpu")
    assert not (tmp_path / "cache" / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").exists()


def test_corrupt_gzip_in_offline_copy_is_named(
    tmp_path: Path, offline_dir: Path, no_download: None
) -> None:
    loader = fashion(tmp_path / "cache", offline_dir)
    gz = offline_dir / "train-labels-idx1-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:20])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz is not a readable gzip"):
        loader.load("cpu")


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_from_the_debian_package(tmp_path: Path) -> None:
    from hydra.utils import instantiate
    from test_config import make_cfg  # the shipped config, md5s included

    data = instantiate(make_cfg().dataset, root=str(tmp_path)).load("cpu")
    assert data.train.images.shape == (60000, 1, 28, 28)
    assert data.val.images.shape == (10000, 1, 28, 28)
    assert data.train.labels.unique().tolist() == list(range(10))
    assert torch.bincount(data.val.labels).tolist() == [1000] * 10


def write_image_folder(root: Path, classes: dict[str, int], size: int = 20) -> None:
    """PNG files in ImageFolder layout: per class a distinct brightness, per split a few."""
    for split, count in (("train", 6), ("val", 3)):
        for c, (name, level) in enumerate(classes.items()):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.full((size, size, 3), level, dtype=np.uint8)
                pixels[c, i % size] = 255
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_image_folder_loads_resizes_and_names_classes(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"ash": 40, "birch": 120, "cedar": 200})
    cfg = make_cfg("dataset=image_folder", f"dataset.root={tmp_path}", "dataset.num_classes=3")
    data = instantiate(cfg.dataset).load("cpu")
    assert data.classes == ["ash", "birch", "cedar"]
    assert data.train.images.shape == (18, 3, 32, 32) and data.val.images.shape == (9, 3, 32, 32)
    assert data.train.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert int(data.val.images[3].float().median()) == 120  # birch, resized from 20x20
    grey = make_cfg(
        "dataset=image_folder",
        f"dataset.root={tmp_path}",
        "dataset.num_classes=3",
        "dataset.channels=1",
        "dataset.mean=[0.5]",
        "dataset.std=[0.25]",
    )
    assert instantiate(grey.dataset).load("cpu").train.images.shape == (18, 1, 32, 32)


def test_image_folder_errors_name_the_problem(tmp_path: Path) -> None:
    cfg = make_cfg("dataset=image_folder", f"dataset.root={tmp_path}", "dataset.num_classes=2")
    with pytest.raises(DataError, match="train does not exist: dataset=image_folder expects"):
        instantiate(cfg.dataset).load("cpu")
    write_image_folder(tmp_path, {"ash": 40, "birch": 120, "cedar": 200})
    with pytest.raises(DataError, match="has 3 class folders .* set dataset.num_classes=3"):
        instantiate(cfg.dataset).load("cpu")
    (tmp_path / "train" / "ash" / "0.png").write_bytes(b"not a png")
    cfg = make_cfg("dataset=image_folder", f"dataset.root={tmp_path}", "dataset.num_classes=3")
    with pytest.raises(DataError, match="0.png is not a readable image"):
        instantiate(cfg.dataset).load("cpu")
