"""Data loading from generated IDX files, the Debian offline copy, and the real FashionMNIST."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEBIAN_DIR, FILES, write_image_folder, write_split
from hydra.utils import instantiate
from PIL import Image
from torchvision.datasets import FashionMNIST

from gpool.config import build
from gpool.config import compose_config as make_cfg
from gpool.data import DataError, TorchvisionImages, check_idx
from gpool.plots import plot_class_maps, plot_confusion

CLASSES = [str(i) for i in range(10)]


def fashion(root: Path, offline_dir: Path | None = None, **kwargs) -> TorchvisionImages:
    offline, checksums = None, None
    if offline_dir is not None:
        names = [name for pair in FILES.values() for name in pair]
        checksums = {
            name: hashlib.md5(
                gzip.decompress((offline_dir / f"{name}.gz").read_bytes())
            ).hexdigest()
            for name in names
        }
        checksums.update(kwargs.pop("md5", {}))
        offline = {"dir": str(offline_dir), "install_hint": "apt-get install x"}
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
        checksums=checksums,
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


def test_a_holdout_is_stratified_fixed_and_never_trained_on(idx_root: Path) -> None:
    whole = fashion(idx_root).load("cpu")
    torch.manual_seed(1)  # the run's seed does not choose the held-out images
    data = fashion(idx_root, holdout=100).load("cpu")
    torch.manual_seed(2)
    again = fashion(idx_root, holdout=100).load("cpu")
    assert len(data.val) == 100 and len(data.train) == 412
    assert torch.equal(data.test.images, whole.val.images) and whole.test is None
    assert torch.equal(data.val.images, again.val.images)

    def rows(split):
        return sorted(map(bytes, split.images.flatten(1).numpy()))

    assert sorted(rows(data.train) + rows(data.val)) == rows(whole.train)  # a partition
    assert not set(rows(data.train)) & set(rows(data.val))
    counts = torch.bincount(whole.train.labels, minlength=10)
    held = torch.bincount(data.val.labels, minlength=10)
    assert ((held - counts * 100 / 512).abs() < 1).all()  # each class its share
    with pytest.raises(DataError, match="dataset.holdout=512: hold out between 1 and 511"):
        fashion(idx_root, holdout=512).load("cpu")


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
    names = [n for ns in FILES.values() for n in ns]
    assert sorted(p.name for p in raw.iterdir()) == sorted([*names, ".gpool-verified.json"])
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
    data = instantiate(make_cfg().dataset, root=str(tmp_path)).load("cpu")
    assert data.train.images.shape == (60000, 1, 28, 28)
    assert data.val.images.shape == (10000, 1, 28, 28)
    assert data.train.labels.unique().tolist() == list(range(10))
    assert torch.bincount(data.val.labels).tolist() == [1000] * 10


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


def test_swapped_label_files_are_refused_before_training(idx_root: Path) -> None:
    raw = idx_root / "FashionMNIST" / "raw"
    train, test = raw / "train-labels-idx1-ubyte", raw / "t10k-labels-idx1-ubyte"
    payloads = train.read_bytes(), test.read_bytes()
    train.write_bytes(payloads[1])
    test.write_bytes(payloads[0])
    with pytest.raises(DataError, match="the train split has 512 images but 256 labels"):
        fashion(idx_root).load("cpu")


def test_labels_outside_the_class_count_are_refused(idx_root: Path) -> None:
    labels = idx_root / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte"
    payload = bytearray(labels.read_bytes())
    payload[-1] = 12  # the last test image now claims class 12 of 10
    labels.write_bytes(bytes(payload))
    with pytest.raises(DataError, match=r"test labels run from 0 to 12, outside 0..9"):
        fashion(idx_root).load("cpu")


def test_files_already_under_data_dir_are_verified_once_per_version(
    tmp_path: Path, offline_dir: Path, no_download: None
) -> None:
    root = tmp_path / "cache"
    fashion(root, offline_dir).load("cpu")  # decompressed and verified
    raw = root / "FashionMNIST" / "raw"
    cache = json.loads((raw / ".gpool-verified.json").read_text())
    assert sorted(cache) == sorted(n for ns in FILES.values() for n in ns)
    images = raw / "train-images-idx3-ubyte"
    payload = bytearray(images.read_bytes())
    payload[-1] ^= 0xFF  # one pixel changed: same size, a structurally valid IDX file
    images.write_bytes(bytes(payload))
    with pytest.raises(DataError, match="train-images-idx3-ubyte has md5 .* corrupt"):
        fashion(root, offline_dir).load("cpu")


def test_a_killed_decompression_leaves_no_partial_file_behind(
    tmp_path: Path, offline_dir: Path, no_download: None
) -> None:
    raw = tmp_path / "cache" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    stale = raw / "train-images-idx3-ubyte.part999999999"  # no such process
    stale.write_bytes(b"x" * 1000)
    fashion(tmp_path / "cache", offline_dir).load("cpu")
    assert not stale.exists() and not list(raw.glob("*.part*"))


def test_a_content_change_with_the_old_mtime_put_back_is_verified_again(
    tmp_path: Path, offline_dir: Path, no_download: None
) -> None:
    """`cp -p` and `tar` restore a file's modification time: the cache must still notice."""
    root = tmp_path / "cache"
    fashion(root, offline_dir).load("cpu")
    labels = root / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte"
    before = labels.stat()
    payload = bytearray(labels.read_bytes())
    payload[-1] = (payload[-1] + 1) % 10  # one label changed, still a valid class
    labels.write_bytes(bytes(payload))
    os.utime(labels, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert labels.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(DataError, match="train-labels-idx1-ubyte has md5"):
        fashion(root, offline_dir).load("cpu")


def image_folder(root: Path, *overrides: str):
    cfg = make_cfg(
        "dataset=image_folder", f"dataset.root={root}", "dataset.num_classes=2", *overrides
    )
    return build(cfg.dataset)


def test_a_folder_link_that_repeats_images_is_refused(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"ash": 40, "birch": 120})
    (tmp_path / "train" / "ash" / "loop").symlink_to(tmp_path / "train" / "ash")
    with pytest.raises(DataError, match="a folder link inside the data repeats images"):
        image_folder(tmp_path).load("cpu")


def test_16_bit_greyscale_pngs_are_scaled_not_clipped(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"ash": 40, "birch": 120})
    for split, n in (("train", 6), ("val", 3)):
        for i in range(n):
            wide = np.full((32, 32), 100 * 257, dtype=np.uint16)  # 100 of 255, in 16 bits
            Image.fromarray(wide).save(tmp_path / split / "ash" / f"{i}.png")
    data = image_folder(tmp_path, "dataset.channels=1", "dataset.mean=[0.5]", "dataset.std=[0.25]")
    assert data.load("cpu").train.images[0].unique().tolist() == [100]


def test_a_decompression_bomb_is_one_data_error(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"ash": 40, "birch": 120})
    side = int((Image.MAX_IMAGE_PIXELS * 2.2) ** 0.5)  # past PIL's limit: it refuses to decode
    Image.new("1", (side, side)).save(tmp_path / "train" / "ash" / "bomb.png")
    with pytest.raises(DataError, match="bomb.png is not a readable image"):
        image_folder(tmp_path).load("cpu")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("dataset.image_size=0",), "dataset.image_size must be a whole number >= 8"),
        (("dataset.image_size=1",), "dataset.image_size must be a whole number >= 8"),
        (("dataset.channels=2",), "dataset.channels must be 1 .* or 3"),
        (("dataset.mean=[0.5, 0.5]",), "dataset.mean has 2 values for dataset.channels=3"),
    ],
)
def test_image_settings_no_run_can_use_are_refused(
    tmp_path: Path, overrides: tuple[str, ...], message: str
) -> None:
    with pytest.raises(DataError, match=message):
        image_folder(tmp_path, *overrides)


def test_figures_of_a_many_class_dataset_stay_small(tmp_path: Path) -> None:
    """120 classes once drew 120 x 121 class-map panels: 4 minutes and 6.4 GB."""
    k = 120
    maps = torch.randn(k, k, 4, 4)
    images = torch.rand(k, 1, 32, 32)
    names = [f"c{i}" for i in range(k)]
    labels = list(range(k))
    path = plot_class_maps(images, maps, labels, labels, names, tmp_path / "maps.png")
    with Image.open(path) as drawn:
        assert drawn.width <= 1400 and drawn.height <= 1400  # 12 x 13 panels
    matrix = torch.randint(0, 50, (k, k))
    with Image.open(plot_confusion(matrix, names, tmp_path / "confusion.png")) as drawn:
        assert drawn.width <= 2000 and drawn.height <= 2000
    ten = plot_class_maps(
        images[:10], maps[:10, :10], labels[:10], labels[:10], names[:10], tmp_path / "ten.png"
    )
    with Image.open(ten) as drawn:  # ten classes: every map, as before
        assert drawn.width > 10 * 1.3 * 80 * 0.9
