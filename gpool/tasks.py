"""Tasks derived offline from another dataset's images, where the heads should differ
(conf/dataset/translated.yaml, cluttered.yaml, occluded.yaml): GMP asks "is the feature
anywhere?", GAP "how much of the map is it?", and FashionMNIST's centred items ask neither.
Each task is built deterministically from the base dataset's checked files (a fixed seed a
split), cached under data_dir after the first build and checked when read back; its
splits' digests tell its runs apart in MLflow, and the networks adapt to its image size
(global pooling makes them size-agnostic)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpool.images import DataError, ImageData, Split

log = logging.getLogger(__name__)

#: Images a block when computing the training split's mean and std (bounded memory).
STATS_BLOCK = 5000


def translate(images: np.ndarray, rng: np.random.Generator, canvas: int) -> np.ndarray:
    """Each item at a uniformly random place on a black canvas x canvas image."""
    n, channels, h, w = images.shape
    out = np.zeros((n, channels, canvas, canvas), np.uint8)
    ys, xs = rng.integers(0, canvas - h + 1, n), rng.integers(0, canvas - w + 1, n)
    for i in range(n):
        out[i, :, ys[i] : ys[i] + h, xs[i] : xs[i] + w] = images[i]
    return out


def clutter(
    images: np.ndarray, rng: np.random.Generator, canvas: int, patches: int, patch: int
) -> np.ndarray:
    """translate, then `patches` patch x patch crops of other items of the split pasted at
    random places (the brighter pixel wins): a piece of some class anywhere on the canvas
    is no longer evidence of the item's class."""
    out = translate(images, rng, canvas)
    n, _, h, w = images.shape
    for _ in range(patches):
        source = rng.integers(0, n, n)
        sy, sx = rng.integers(0, h - patch + 1, n), rng.integers(0, w - patch + 1, n)
        dy, dx = rng.integers(0, canvas - patch + 1, n), rng.integers(0, canvas - patch + 1, n)
        for i in range(n):
            region = out[i, :, dy[i] : dy[i] + patch, dx[i] : dx[i] + patch]
            crop = images[source[i], :, sy[i] : sy[i] + patch, sx[i] : sx[i] + patch]
            np.maximum(region, crop, out=region)
    return out


def occlude(images: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Each item with a black size x size square at a random place over it: part of the
    evidence gone, which an average loses in proportion and a maximum all or nothing."""
    out = images.copy()
    n, _, h, w = images.shape
    ys, xs = rng.integers(0, h - size + 1, n), rng.integers(0, w - size + 1, n)
    for i in range(n):
        out[i, :, ys[i] : ys[i] + size, xs[i] : xs[i] + size] = 0
    return out


def describe(task: Callable[..., np.ndarray]) -> str:
    """The task's function and settings, as its cache key counts them."""
    func = getattr(task, "func", task)
    keywords = sorted(getattr(task, "keywords", {}).items())
    return f"{func.__module__}.{func.__qualname__}{keywords}"


def payload_md5(images: np.ndarray, labels: np.ndarray) -> str:
    md5 = hashlib.md5(images.tobytes())
    md5.update(labels.tobytes())
    return md5.hexdigest()


class DerivedImages:
    """A dataset whose images are `task` applied to `base`'s (a conf/dataset object with
    `splits()`), labels unchanged; `dataset.holdout` and normalisation as for any dataset
    (the mean and std of the derived training images)."""

    def __init__(
        self,
        base: Any,
        task: Callable[..., np.ndarray],
        name: str,
        seed: int,
        root: str,
        channels: int,
        image_size: int,
        num_classes: int,
        classes: Sequence[str],
        normalize: bool = True,
        holdout: int = 0,
    ) -> None:
        self.base, self.task, self.name, self.seed = base, task, name, seed
        self.root = Path(root).expanduser() / "derived" / name
        self.shape = (channels, image_size, image_size)
        self.classes = list(classes)
        if len(self.classes) != num_classes:
            raise ValueError(f"{len(self.classes)} class names for num_classes={num_classes}")
        self.normalize, self.holdout = normalize, holdout

    def splits(self) -> tuple[Split, Split]:
        """The derived training and test splits on the CPU."""
        train, test = self.base.splits()
        return self.derived(train, "train", 0), self.derived(test, "test", 1)

    def load(self, device: torch.device | str, channels_last: bool = True) -> ImageData:
        """Both derived splits onto `device`."""
        train, test = self.splits()
        mean, std = channel_stats(train.images.numpy()) if self.normalize else (None, None)
        channels = self.shape[0]
        return ImageData.build(
            train,
            test,
            self.classes,
            mean or [0.0] * channels,
            std or [1.0] * channels,
            device,
            channels_last,
            self.holdout,
        )

    def derived(self, split: Split, name: str, index: int) -> Split:
        """`split` with the task applied: from the cache if it holds this very build
        (same base images, task, settings and seed) intact, else built and cached."""
        key = hashlib.sha256(
            f"{split.digest()}|{describe(self.task)}|{self.seed}|{name}".encode()
        ).hexdigest()[:16]
        path = self.root / f"{name}-{key}.npz"
        labels = split.labels.numpy()
        images = read_cache(path, labels)
        if images is None:
            log.info("building the %s task's %s images into %s", self.name, name, path)
            rng = np.random.default_rng([self.seed, index])
            images = np.ascontiguousarray(self.task(split.images.numpy(), rng))
            if images.shape[1:] != self.shape or images.dtype != np.uint8:
                raise DataError(
                    f"the {self.name} task makes {images.dtype} images of shape "
                    f"{list(images.shape[1:])}; the config says uint8 {list(self.shape)}"
                )
            write_cache(path, images, labels)
        return Split(torch.from_numpy(images), split.labels)


def read_cache(path: Path, labels: np.ndarray) -> np.ndarray | None:
    """The cached images at `path` if the file and its record agree (the md5 of images and
    labels, the labels those of the base split), else None: a truncated, altered or stale
    cache is built again."""
    record = path.with_suffix(".json")
    try:
        expected = json.loads(record.read_text())["md5"]
        with np.load(path, allow_pickle=False) as cached:
            images, cached_labels = cached["images"], cached["labels"]
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        return None
    if not np.array_equal(cached_labels, labels) or payload_md5(images, labels) != expected:
        log.warning("the cached task images %s do not match their record: built again", path)
        return None
    return images


def write_cache(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Images and labels, then their md5 record, each written whole and renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.part{os.getpid()}.npz")
    try:
        np.savez(partial, images=images, labels=labels)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    record = path.with_suffix(".json")
    temporary = record.with_name(f"{record.name}.part{os.getpid()}")
    temporary.write_text(json.dumps({"md5": payload_md5(images, labels)}))
    temporary.replace(record)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images [N, C, H, W], in [0, 1] units, in blocks."""
    total = np.zeros(images.shape[1])
    squares = np.zeros(images.shape[1])
    for start in range(0, len(images), STATS_BLOCK):
        block = images[start : start + STATS_BLOCK].astype(np.float64) / 255.0
        total += block.sum(axis=(0, 2, 3))
        squares += (block**2).sum(axis=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 1e-12))
    return [float(m) for m in mean], [float(s) for s in std]
