"""Where a run's images come from (conf/dataset): a torchvision dataset class (with
FashionMNIST-style offline copies) or your own image folder, read once into tensors and
checked (files, md5s, shapes, labels) before anything trains. What they become on the
device is gpool.images' (ImageData).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.datasets import MNIST, ImageFolder

from gpool.images import DataError, ImageData, Split

log = logging.getLogger(__name__)


def check_idx(path: Path) -> None:
    """Raise DataError unless `path` is a complete IDX file of unsigned bytes.

    torchvision only asserts on a bad file (or reads a short one silently in non-strict
    mode); this names the file and says what is wrong with it.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
        if len(magic) < 4 or magic[:3] != b"\x00\x00\x08" or not 1 <= magic[3] <= 3:
            raise DataError(f"{path} is not an IDX file of unsigned bytes (magic {magic.hex()})")
        header = f.read(4 * magic[3])
    if len(header) < 4 * magic[3]:
        raise DataError(f"{path} is truncated inside its header ({size} bytes)")
    dims = struct.unpack(f">{magic[3]}I", header)
    expected = 4 + len(header) + int(np.prod(dims))
    if size != expected:
        raise DataError(
            f"{path} has {size} bytes but its header promises {expected} (shape {list(dims)}): "
            "the file is truncated or corrupt; delete it so that it is fetched again"
        )


def check_labels(name: str, images: Tensor, labels: Tensor, num_classes: int, split: str) -> None:
    """Raise DataError unless every image has one label in [0, num_classes): swapped or
    mismatched label files would otherwise train a whole epoch before anything fails."""
    if len(images) != len(labels):
        raise DataError(
            f"{name}: the {split} split has {len(images)} images but {len(labels)} labels; "
            "its label file belongs to another split or dataset"
        )
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(
            f"{name}: {split} labels run from {int(labels.min())} to {int(labels.max())}, "
            f"outside 0..{num_classes - 1} for dataset.num_classes={num_classes}"
        )


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def verify_files(folder: Path, checksums: Mapping[str, str | None]) -> None:
    """Raise DataError unless each file in `folder` has its expected md5 (None: not known).

    Verdicts are cached in `folder/.gpool-verified.json` by the file's inode, size,
    modification and status-change times: any write moves the change time (ctime), which,
    unlike the modification time, no `touch`, `cp -p` or `tar` can put back; so a data
    directory costs one read of each file until a file changes.
    """
    cache_file = folder / ".gpool-verified.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    for name, expected in checksums.items():
        if expected is None:
            continue
        info = (folder / name).stat()
        version = [info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns, expected]
        if cache.get(name) == version:
            continue
        actual = md5_of(folder / name)
        if actual != expected:
            raise DataError(
                f"{folder / name} has md5 {actual}, expected {expected}: the file is corrupt "
                "or another dataset's; delete it so that it is fetched again"
            )
        cache[name] = version
    with contextlib.suppress(OSError):  # a read-only data dir is verified every time
        cache_file.write_text(json.dumps(cache))


def remove_stale_parts(target: Path) -> None:
    """Delete half-written copies of `target` left by processes that died writing them."""
    for part in target.parent.glob(f"{target.name}.part*"):
        pid = part.name.rpartition(".part")[2]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            part.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            continue


class TorchvisionImages:
    """A torchvision dataset class loaded into tensors, with FashionMNIST-style offline copies.

    Sources, in order: files already in torchvision's layout under `root`; an
    `offline_copy` of the original .gz files (Debian's dataset packages), decompressed into
    `root` once; torchvision's own download. Whatever put the files there, the run trains
    only on files whose md5 matches `checksums` (checked once per file version, see
    verify_files) and whose images and labels agree in number and range.
    """

    def __init__(
        self,
        source: Callable[..., Any],
        root: str,
        channels: int,
        image_size: int,
        num_classes: int,
        classes: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        normalize: bool = True,
        offline_copy: Mapping[str, Any] | None = None,
        checksums: Mapping[str, str] | None = None,
        holdout: int = 0,
    ) -> None:
        self.source = source
        self.holdout = holdout
        self.root = Path(root).expanduser()
        self.channels = channels
        self.image_size = image_size
        self.classes = list(classes)
        if len(self.classes) != num_classes:
            raise ValueError(f"{len(self.classes)} class names for num_classes={num_classes}")
        self.mean = list(mean) if normalize else [0.0] * channels
        self.std = list(std) if normalize else [1.0] * channels
        check_shape(channels, image_size, self.mean, self.std)
        self.offline_copy = offline_copy
        self.checksums = dict(checksums or {})

    @property
    def source_class(self) -> type:
        return getattr(self.source, "func", self.source)

    def splits(self) -> tuple[Split, Split]:
        """The training and test splits on the CPU, their files checked first."""
        self._prepare_files()
        return self._read(True), self._read(False)

    def load(self, device: torch.device | str, channels_last: bool = True) -> ImageData:
        """Read both splits onto `device`."""
        train, test = self.splits()
        return ImageData.build(
            train, test, self.classes, self.mean, self.std, device, channels_last, self.holdout
        )

    def _read(self, train: bool) -> Split:
        try:
            dataset = self.source(root=str(self.root), train=train, download=False)
        except RuntimeError as err:  # torchvision: "Dataset not found" / "corrupted"
            raise DataError(f"{self.source_class.__name__} under {self.root}: {err}") from err
        images = torch.as_tensor(np.asarray(dataset.data))
        if images.ndim == 3:  # MNIST family: [N, H, W]
            images = images.unsqueeze(1)
        elif images.shape[-1] == self.channels:  # CIFAR: [N, H, W, C]
            images = images.permute(0, 3, 1, 2)
        if tuple(images.shape[1:]) != (self.channels, self.image_size, self.image_size):
            raise DataError(
                f"{self.source_class.__name__} images have shape {list(images.shape[1:])}, the "
                f"config says {[self.channels, self.image_size, self.image_size]}"
            )
        labels = torch.as_tensor(np.asarray(dataset.targets), dtype=torch.int64)
        check_labels(
            f"{self.source_class.__name__} under {self.root}",
            images,
            labels,
            len(self.classes),
            "train" if train else "test",
        )
        return Split(images.contiguous(), labels)

    def _prepare_files(self) -> None:
        """Make sure the raw files are under `root`, from the first source that has them."""
        cls = self.source_class
        if not issubclass(cls, MNIST):
            self._download_if_missing()
            return
        raw = self.root / cls.__name__ / "raw"
        names = [Path(name).name.removesuffix(".gz") for name, _ in cls.resources]
        copy_dir = Path(self.offline_copy["dir"]) if self.offline_copy else None
        if all((raw / name).is_file() for name in names):
            pass
        elif copy_dir and all((copy_dir / f"{name}.gz").is_file() for name in names):
            for name in names:
                self._decompress(copy_dir / f"{name}.gz", raw / name)
        else:
            self._download_if_missing(tried=[raw, *([copy_dir] if copy_dir else [])])
        for name in names:
            check_idx(raw / name)
        verify_files(raw, {name: self.checksums.get(name) for name in names})

    def _decompress(self, source: Path, target: Path) -> None:
        if target.is_file():
            return
        log.info("decompressing %s into %s", source, target.parent)
        try:
            payload = gzip.decompress(source.read_bytes())
        except (OSError, EOFError) as err:
            raise DataError(f"{source} is not a readable gzip file ({err})") from err
        expected = self.checksums.get(target.name)
        actual = hashlib.md5(payload).hexdigest()
        if expected is not None and actual != expected:
            raise DataError(
                f"{source} decompresses to md5 {actual}, expected {expected}: the file is "
                f"corrupt; reinstall it ({self.offline_copy['install_hint']})"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_parts(target)
        partial = target.with_name(f"{target.name}.part{os.getpid()}")
        try:
            partial.write_bytes(payload)
            partial.replace(target)  # atomic: concurrent jobs never see half a file
        finally:
            partial.unlink(missing_ok=True)

    def _download_if_missing(self, tried: Sequence[Path] = ()) -> None:
        name = self.source_class.__name__
        try:
            for train in (True, False):
                self.source(root=str(self.root), train=train, download=True)
        except Exception as err:  # URLError, RuntimeError, socket errors: all mean "not here"
            fixes = ["go online so that torchvision can download it"]
            if self.offline_copy and self.offline_copy.get("install_hint"):
                fixes.append(f"`{self.offline_copy['install_hint']}`")
            places = ", ".join(str(p) for p in tried) or str(self.root)
            raise DataError(
                f"{name} is not available offline (looked in {places}) and the download failed "
                f"({type(err).__name__}: {str(err).strip().splitlines()[-1]}). Fix: "
                + " or ".join(fixes)
                + "; set GPOOL_DATA or data_dir to use another cache."
            ) from err


class ImageFolderImages:
    """Your own images in torchvision's ImageFolder layout, read once into tensors:
    `root/train/<class>/*` and `root/val/<class>/*` (class names are the folder names,
    sorted). Images are converted to `channels` (1: greyscale, 3: RGB) and resized to
    `image_size` squared when they differ."""

    def __init__(
        self,
        root: str,
        channels: int,
        image_size: int,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        normalize: bool = True,
        classes: Sequence[str] | None = None,
        holdout: int = 0,
    ) -> None:
        self.holdout = holdout
        self.root = Path(root).expanduser()
        self.channels = channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.mean = list(mean) if normalize else [0.0] * channels
        self.std = list(std) if normalize else [1.0] * channels
        check_shape(channels, image_size, self.mean, self.std)
        self.classes = list(classes) if classes else None

    def load(self, device: torch.device | str, channels_last: bool = True) -> ImageData:
        (train, classes), (val, val_classes) = (self._read(s) for s in ("train", "val"))
        if val_classes != classes:
            raise DataError(
                f"{self.root}/train and {self.root}/val hold different classes: "
                f"{classes} vs {val_classes}"
            )
        if len(classes) != self.num_classes:
            raise DataError(
                f"{self.root}/train has {len(classes)} class folders {classes}; set "
                f"dataset.num_classes={len(classes)}"
            )
        if self.classes and self.classes != classes:
            raise DataError(f"dataset.classes {self.classes} differ from the folders {classes}")
        return ImageData.build(
            train, val, classes, self.mean, self.std, device, channels_last, self.holdout
        )

    def _read(self, split: str) -> tuple[Split, list[str]]:
        folder = self.root / split
        if not folder.is_dir():
            raise DataError(
                f"{folder} does not exist: dataset=image_folder expects "
                f"dataset.root/{{train,val}}/<class>/<image> (set dataset.root=...)"
            )
        try:
            dataset = ImageFolder(str(folder))
        except (FileNotFoundError, OSError) as err:
            raise DataError(f"{folder}: {err}") from err
        check_no_repeats(folder, [path for path, _ in dataset.samples])
        images = [self._image(Path(path)) for path, _ in dataset.samples]
        stacked = torch.stack(images)
        stacked = stacked.unsqueeze(1) if stacked.ndim == 3 else stacked.permute(0, 3, 1, 2)
        labels = torch.tensor(dataset.targets, dtype=torch.int64)
        return Split(stacked.contiguous(), labels), list(dataset.classes)

    def _image(self, path: Path) -> Tensor:
        """One image as uint8 [H, W] or [H, W, C] at `channels` and `image_size`; 16-bit
        greyscale scaled to 8 bits (PIL's own conversion clips it at 255: all white)."""
        size = (self.image_size, self.image_size)
        try:
            with Image.open(path) as image:
                if image.mode.startswith("I"):  # 16-bit greyscale PNGs open as I;16 or I
                    wide = np.asarray(image, dtype=np.float64) * (255 / 65535)
                    image = Image.fromarray(wide.round().clip(0, 255).astype(np.uint8))
                image = image.convert({1: "L", 3: "RGB"}[self.channels])
                if image.size != size:
                    image = image.resize(size, Image.BILINEAR)
                return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
        except (OSError, Image.DecompressionBombError) as err:
            raise DataError(f"{path} is not a readable image ({err})") from err


def check_no_repeats(folder: Path, paths: Sequence[str]) -> None:
    """Raise DataError when one image file is reached by two paths: a folder link inside a
    class folder (a loop counts the class's images dozens of times) or a link to another
    class's folder."""
    seen: dict[str, str] = {}
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            raise DataError(
                f"{folder}: {real} is reached both as {seen[real]} and as {path}: a folder "
                "link inside the data repeats images (a loop counts them many times); "
                "remove the link"
            )
        seen[real] = path


def check_shape(channels: int, image_size: int, mean: Sequence[float], std: Sequence[float]):
    """Refuse image settings no run can use, naming the key: greyscale or RGB only, images
    the convnet can halve three times, one mean and std per channel."""
    if channels not in (1, 3):
        raise DataError(f"dataset.channels must be 1 (greyscale) or 3 (RGB), not {channels}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise DataError(
            f"dataset.image_size must be a whole number >= 8 (the network halves images "
            f"three times), not {image_size!r}"
        )
    for key, values in (("mean", mean), ("std", std)):
        if len(values) != channels:
            raise DataError(
                f"dataset.{key} has {len(values)} values for dataset.channels={channels}: "
                "give one per channel"
            )
    if not all(v > 0 for v in std):
        raise DataError(f"dataset.std must be > 0 for every channel, not {list(std)}")
