"""The article's convnet with a pluggable global pooling head (conf/model, conf/pool)."""

from collections.abc import Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn


class ConvNet(nn.Module):
    """Stages of two 3x3 conv + ReLU and a 2x2 max-pool, a 1x1 conv to one map per class,
    then `pool` reduces each map to a score.

    With widths (8, 16, 32) this is the article's 1->8->8->16->16->32->32 network; there are
    no fully connected layers, so the head alone decides how maps become class scores.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        pool: nn.Module,
        widths: Sequence[int] = (8, 16, 32),
        output_activation: str | None = None,
    ) -> None:
        super().__init__()
        if output_activation not in (None, "sigmoid"):
            raise ValueError(
                f"output_activation must be null or 'sigmoid', not {output_activation!r}"
            )
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.pool = pool
        # A head that returns more than one value per class (catavgmax) gets a learned
        # linear map back to one score per class; the others feed scores straight out.
        factor = getattr(pool, "width_factor", 1)
        self.head = nn.Linear(factor * num_classes, num_classes) if factor > 1 else nn.Identity()
        self.output_activation = output_activation

    def class_maps(self, x: Tensor) -> Tensor:
        """The [N, num_classes, H', W'] maps that enter the pool head."""
        return self.classifier(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        scores = self.head(self.pool(self.class_maps(x)))
        return torch.sigmoid(scores) if self.output_activation == "sigmoid" else scores

    def initialise(self, scheme: str) -> None:
        """Re-initialise conv weights: 'default' keeps PyTorch's, 'xavier' is the article's
        xavier_uniform weights with bias 0.01."""
        if scheme == "default":
            return
        if scheme != "xavier":
            raise ValueError(f"trainer.init must be 'default' or 'xavier', not {scheme!r}")
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.constant_(module.bias, 0.01)


def build_model(cfg: DictConfig) -> ConvNet:
    """The network a config describes: conf/model with the head from conf/pool."""
    return instantiate(cfg.model, pool=instantiate(cfg.pool))
