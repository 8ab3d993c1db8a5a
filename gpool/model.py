"""Networks with a pluggable global pooling head (conf/model, conf/pool): any backbone's
feature maps, then the head (PooledNet), and the article's convnet; what a network is made
of (its TRUNK and HEAD, the state it keeps besides its weights). Fused sweeps stack them
(gpool.stacking)."""

from collections.abc import Sequence

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from gpool.config import build
from gpool.errors import GpoolError

#: A network's parts in the order its forward applies them: the trunk, images to the maps the
#: pool sees, is the same for every head (one Stack for all members of a fused group); the
#: head, maps to scores, is what differs (one Stack per kind of head).
TRUNK = ("features", "classifier")

HEAD = ("pool", "head", "activation")


def kept_buffers(network: nn.Module) -> list[str]:
    """The state a network keeps besides its parameters (BatchNorm's running statistics):
    what a stack cannot hold per member, and what a padded batch would change."""
    parameters = {name for name, _ in network.named_parameters()}
    return [name for name in network.state_dict() if name not in parameters]


class PooledNet(nn.Module):
    """Any backbone with gpool's global pooling head: `features`, a module from images to
    feature maps [N, channels, H', W'] (the convolutions of ConvNet, a ResNet's stages, your
    own), then the head in one of two places (`pool_position`): `class_maps`, the article's
    layout, a 1x1 conv to one map per class and the pool turns each map into that class's
    score (no fully connected layer: the head alone decides how maps become scores); or
    `features`, the usual modern layout, the pool reduces the feature maps and a linear
    layer classifies them.
    """

    def __init__(
        self,
        features: nn.Module,
        channels: int,
        num_classes: int,
        pool: nn.Module,
        output_activation: str | None = None,
        pool_position: str = "class_maps",
    ) -> None:
        super().__init__()
        if output_activation not in (None, "sigmoid"):
            raise ValueError(
                f"output_activation must be null or 'sigmoid', not {output_activation!r}"
            )
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise GpoolError(f"model.channels must be >= 1, not {channels!r}")
        if pool_position not in ("class_maps", "features"):
            raise GpoolError(
                f"model.pool_position must be class_maps or features, not {pool_position!r}"
            )
        if pool_position == "class_maps" and not getattr(pool, "signed_inputs", True):
            raise GpoolError(
                f"{type(pool).__name__} clamps negative inputs, and class maps are logits: "
                "a class could never score below zero. Pool them with its signed form "
                "(pool.shift=true) or pool the features (model.pool_position=features)"
            )
        # Registered in this order (features, classifier, pool, head): parameter order is
        # what optimiser state and checkpoints index by.
        self.features = features
        self.channels = channels  # the maps `features` returns
        if pool_position == "class_maps":
            self.classifier: nn.Module = nn.Conv2d(channels, num_classes, 1)
            channels = num_classes
        else:
            self.classifier = nn.Identity()
        self.pool = pool
        self.pool_position = pool_position
        # A head that returns several values per map (catavgmax) needs a linear layer back
        # to one score per class; pooled features need one to become class scores at all.
        factor = getattr(pool, "width_factor", 1)
        linear = pool_position == "features" or factor > 1
        self.head = nn.Linear(factor * channels, num_classes) if linear else nn.Identity()
        self.output_activation = output_activation
        self.activation = nn.Sigmoid() if output_activation == "sigmoid" else nn.Identity()

    def class_maps(self, x: Tensor) -> Tensor:
        """[N, num_classes, H', W'] maps of each class's evidence: the maps that enter the
        pool (class_maps position), or the classifier's weights applied at every location
        of the features before the pool (features position: class activation maps)."""
        maps = self.through(TRUNK, x)
        if self.pool_position == "class_maps":
            return maps
        weight = self.head.weight.view(self.head.out_features, -1, maps.shape[1]).sum(1)
        return torch.einsum("ck,nkhw->nchw", weight, maps) + self.head.bias.view(1, -1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.through(HEAD, self.through(TRUNK, x))

    @torch.no_grad()
    def check_features(self, x: Tensor) -> None:
        """Refuse, in one line naming both shapes, a backbone whose output on images `x`
        is not the feature maps [N, channels, H', W'] the head is built for: found before
        a run is made, not as a torch traceback in its first step. In eval mode, so that
        a BatchNorm's running statistics stay as they were."""
        training = self.training
        self.eval()
        try:
            maps = self.features(x)
        except RuntimeError as err:
            raise GpoolError(
                f"model.features fails on images {list(x.shape)}: {str(err).splitlines()[0]}"
            ) from None
        finally:
            self.train(training)
        if maps.ndim != 4 or maps.shape[1] != self.channels or 0 in maps.shape:
            raise GpoolError(
                f"model.features returns {list(maps.shape)} for images {list(x.shape)}; "
                f"gpool's head needs feature maps [N, {self.channels}, H', W'] "
                f"(model.channels={self.channels})"
            )

    def through(self, parts: Sequence[str], x: Tensor) -> Tensor:
        """`x` through the named parts in turn (TRUNK, HEAD)."""
        for name in parts:
            x = getattr(self, name)(x)
        return x

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
                if module.bias is not None:  # ResNet's convs have none (BatchNorm follows)
                    nn.init.constant_(module.bias, 0.01)


class ConvNet(PooledNet):
    """The article's network: stages of two 3x3 conv + ReLU and a 2x2 max-pool; with widths
    (8, 16, 32) that is 1->8->8->16->16->32->32, then gpool's head (PooledNet)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        pool: nn.Module,
        widths: Sequence[int] = (8, 16, 32),
        output_activation: str | None = None,
        pool_position: str = "class_maps",
    ) -> None:
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
        features = nn.Sequential(*layers)
        super().__init__(features, channels, num_classes, pool, output_activation, pool_position)


def build_model(cfg: DictConfig) -> PooledNet:
    """The network a config describes: conf/model with the head from conf/pool."""
    return build(cfg.model, pool=build(cfg.pool))
