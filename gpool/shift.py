"""What a trained network does to test images it was not trained on: the same images moved
by k pixels (gpool.compare --shift), and the class maps two heads' networks put into their
pools for the same images (gpool.compare --maps). Torch alone; reading runs back is
gpool.reload's, statistics and figures gpool.compare's."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from gpool.images import ImageData, Split

#: The four directions each image is moved in (rows, columns), its score their mean.
DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))
#: Images a forward pass takes.
BATCH = 1000


def moved(images: Tensor, rows: int, cols: int) -> Tensor:
    """uint8 images [N, C, H, W] moved down `rows` and right `cols` pixels (negative: up,
    left), black (0) where nothing comes in, what leaves the canvas lost."""
    out = torch.zeros_like(images)
    h, w = images.shape[-2:]
    src_r, dst_r = slice(max(0, -rows), h - max(0, rows)), slice(max(0, rows), h - max(0, -rows))
    src_c, dst_c = slice(max(0, -cols), w - max(0, cols)), slice(max(0, cols), w - max(0, -cols))
    out[..., dst_r, dst_c] = images[..., src_r, src_c]
    return out


@torch.inference_mode()
def predictions(model: nn.Module, data: ImageData, split: Split) -> Tensor:
    """The model's predicted class of each image of `split`."""
    out = []
    for start in range(0, len(split), BATCH):
        x, _ = data.batch(split, slice(start, start + BATCH))
        out.append(model(x).argmax(1))
    return torch.cat(out)


def shift_scores(
    model: nn.Module, data: ImageData, shifts: Sequence[int], images: int
) -> np.ndarray:
    """[shifts x images]: per shift k, the share of the four directions (DIRECTIONS, k
    pixels each) in which the model still classifies each of the first `images`
    validation images (those its run scored) right."""
    model.eval()
    val = Split(data.val.images[:images], data.val.labels[:images])
    scores = np.zeros((len(shifts), len(val)))
    for i, k in enumerate(shifts):
        for rows, cols in DIRECTIONS if k else ((0, 0),):
            split = Split(moved(val.images, rows * k, cols * k), val.labels)
            right = predictions(model, data, split) == val.labels
            scores[i] += right.cpu().numpy() / (len(DIRECTIONS) if k else 1)
    return scores


@torch.inference_mode()
def true_class_maps(model: nn.Module, data: ImageData, index: Tensor) -> tuple[Tensor, Tensor]:
    """For the validation images at `index`: the class map of each image's true class
    ([N, h, w], what the pool turns into that class's score) and the predicted classes."""
    model.eval()
    x, labels = data.batch(data.val, index)
    maps = model.class_maps(x)
    return maps[torch.arange(len(index)), labels].float().cpu(), model(x).argmax(1).cpu()
