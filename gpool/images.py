"""Images as device-resident uint8 tensors: a split's images and labels, the train /
validation / test splits a run reads (with a holdout cut from the training images), and a
batch as an index slice normalised on the device. There are no per-sample transforms and no
DataLoader workers: for 28x28 images those cost more than the network itself. Where the
images come from is gpool.data's (conf/dataset)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gpool.errors import GpoolError
from gpool.names import TEST_CONTEXT, TRAIN_CONTEXT, VAL_CONTEXT


class DataError(GpoolError):
    """A dataset is missing, truncated or corrupt; the message says which file and the fix."""


@dataclass
class Split:
    """Images as uint8 [N, C, H, W] and int64 labels [N], both on the training device."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    def digest(self) -> str:
        """A short fingerprint of the images and labels: tells runs' data apart in MLflow."""
        md5 = hashlib.md5(self.labels.cpu().numpy().tobytes())
        md5.update(self.images.cpu().numpy().tobytes())
        return md5.hexdigest()[:12]


#: Seeds the choice of held-out images: the same for every run, whatever its `seed`, so
#: that runs of one sweep are validated on the same images.
HOLDOUT_SEED = 20261129


def holdout_split(split: Split, n: int, num_classes: int) -> tuple[Split, Split]:
    """(the images left to train on, `n` held-out images), stratified by class: each class
    keeps its share of the split (largest remainders settle the rounding)."""
    if not 0 < n < len(split):
        raise DataError(
            f"dataset.holdout={n}: hold out between 1 and {len(split) - 1} of the "
            f"{len(split)} training images, or 0 to validate on the test split"
        )
    share = torch.bincount(split.labels, minlength=num_classes).double() * n / len(split)
    take = share.floor().long()
    take[torch.argsort(share - take, descending=True, stable=True)[: n - int(take.sum())]] += 1
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    held = torch.cat([order[split.labels[order] == c][: take[c]] for c in range(num_classes)])
    kept = torch.ones(len(split), dtype=torch.bool)
    kept[held] = False
    held = held.sort().values
    rest = Split(split.images[kept], split.labels[kept])
    return rest, Split(split.images[held], split.labels[held])


@dataclass
class ImageData:
    """Train and validation splits plus the affine map that normalises a uint8 batch. With
    a holdout, validation is held out of the training images and `test` is the dataset's
    test split; without, validation is the test split (the article's protocol)."""

    train: Split
    val: Split
    classes: list[str]
    scale: Tensor  # [1, C, 1, 1]: 1 / (255 * std)
    shift: Tensor  # [1, C, 1, 1]: -mean / std
    channels_last: bool = True
    test: Split | None = None

    @classmethod
    def build(
        cls,
        train: Split,
        test: Split,
        classes: list[str],
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str,
        channels_last: bool = True,
        holdout: int = 0,
    ) -> ImageData:
        """Split off `holdout` training images for validation (0: validate on `test`), move
        the splits to `device` and fold mean/std into one multiply-add."""
        shape = (1, len(mean), 1, 1)
        std_t = torch.tensor(list(std)).view(shape)
        mean_t = torch.tensor(list(mean)).view(shape)
        val = test
        if holdout:
            train, val = holdout_split(train, holdout, len(classes))
        return cls(
            train=train.to(device),
            val=val.to(device),
            classes=classes,
            scale=(1.0 / (255.0 * std_t)).to(device),
            shift=(-mean_t / std_t).to(device),
            channels_last=channels_last,
            test=test.to(device) if holdout else None,
        )

    def splits(self) -> dict[str, tuple[str, int]]:
        """{MLflow dataset context: (digest, images)} of the splits a run reads."""
        named = {TRAIN_CONTEXT: self.train, VAL_CONTEXT: self.val}
        if self.test is not None:
            named[TEST_CONTEXT] = self.test
        return {context: (split.digest(), len(split)) for context, split in named.items()}

    def batch(self, split: Split, index: Tensor | slice) -> tuple[Tensor, Tensor]:
        """Normalised float images and labels for `index` of `split`."""
        x = torch.addcmul(self.shift, split.images[index], self.scale)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, split.labels[index]
