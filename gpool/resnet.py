"""`model=resnet18` (conf/model/resnet18.yaml): torchvision's ResNet-18 as the backbone of a
gpool.model.PooledNet, for small images. Its own module: torchvision takes a second to
import, which runs that never use it should not pay."""

from collections import OrderedDict

from torch import nn
from torchvision.models import resnet18


def resnet18_features(in_channels: int) -> nn.Sequential:
    """ResNet-18's stem and four residual stages, 512 channels out (4x4 maps on 28x28
    images). For small inputs: a 3x3 stride-1 stem conv from `in_channels` instead of the
    7x7 stride-2 one, and no stem max-pool (together they would shrink 28x28 to 7x7 before
    the first stage). Its average pool and fc are left out: gpool's head takes their place."""
    net = resnet18(weights=None)
    stem = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    stages = {name: getattr(net, name) for name in ("layer1", "layer2", "layer3", "layer4")}
    return nn.Sequential(OrderedDict(conv1=stem, bn1=net.bn1, relu=net.relu, **stages))
