"""What a trained model does on the validation set: the confusion matrix and the class maps
that enter the global pool (the article's `visualize_layer`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gpool.images import ImageData


def confusion_matrix(predicted: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """[true class, predicted class] counts."""
    flat = labels.cpu() * num_classes + predicted.cpu()
    return torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)


def per_class_accuracy(matrix: Tensor) -> list[float]:
    """Recall of each class; 0 for a class with no validation images."""
    totals = matrix.sum(1).clamp(min=1)
    return (matrix.diagonal() / totals).tolist()


def probe_indices(labels: Tensor) -> Tensor:
    """The first validation image of each class: the same images in every run of a dataset,
    so feature maps can be compared across heads and seeds."""
    labels = labels.cpu()
    return torch.stack([(labels == c).nonzero()[0, 0] for c in labels.unique(sorted=True)])


@torch.inference_mode()
def class_maps(
    model: nn.Module, data: ImageData, index: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Images in [0, 1], the [N, num_classes, h, w] class maps (ConvNet.class_maps), the
    true labels and the predictions, for the validation images at `index`."""
    model.eval()
    index = index.to(data.val.images.device)
    x, labels = data.batch(data.val, index)
    maps = model.class_maps(x)
    predicted = model(x).argmax(1)
    images = data.val.images[index].float() / 255
    return images.cpu(), maps.float().cpu(), labels.cpu(), predicted.cpu()
