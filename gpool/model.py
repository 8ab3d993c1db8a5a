"""The article's convnet with a pluggable global pooling head (conf/model, conf/pool)."""

import copy
from collections import OrderedDict
from collections.abc import Sequence

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from gpool import GpoolError
from gpool.config import build

#: A network's parts in the order its forward applies them: the trunk, images to the maps the
#: pool sees, is the same for every head (one Stack for all members of a fused group); the
#: head, maps to scores, is what differs (one Stack per kind of head).
TRUNK = ("features", "classifier")
HEAD = ("pool", "head", "activation")


class ConvNet(nn.Module):
    """Stages of two 3x3 conv + ReLU and a 2x2 max-pool, then the global pool head.

    With widths (8, 16, 32) this is the article's 1->8->8->16->16->32->32 network. Where the
    pool goes (`pool_position`): `class_maps`, the article's layout, a 1x1 conv to one map
    per class and the pool turns each map into that class's score (no fully connected
    layer: the head alone decides how maps become scores); or `features`, the usual modern
    layout, the pool reduces the last feature maps and a linear layer classifies them.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        pool: nn.Module,
        widths: Sequence[int] = (8, 16, 32),
        output_activation: str | None = None,
        pool_position: str = "class_maps",
    ) -> None:
        super().__init__()
        if output_activation not in (None, "sigmoid"):
            raise ValueError(
                f"output_activation must be null or 'sigmoid', not {output_activation!r}"
            )
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
        # Registered in this order (features, classifier, pool, head): parameter order is
        # what optimiser state and checkpoints index by.
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
                nn.init.constant_(module.bias, 0.01)


def build_model(cfg: DictConfig) -> ConvNet:
    """The network a config describes: conf/model with the head from conf/pool."""
    return build(cfg.model, pool=build(cfg.pool))


def part(network: nn.Module, names: Sequence[str]) -> nn.Sequential:
    """The network's parts `names` (TRUNK or HEAD) as one module applied in that order, its
    parameters under the network's own names (features.0.weight, pool.p...)."""
    return nn.Sequential(OrderedDict((name, getattr(network, name)) for name in names))


class Stack(nn.Module):
    """Modules of one architecture as one: their parameters stacked [size, ...] and one
    vmapped functional call, which turns every convolution into a grouped one (one kernel
    launch for all of them instead of one each)."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        stacked, buffers = stack_module_state(list(modules))
        if buffers:
            raise ValueError("networks with buffers (e.g. BatchNorm) cannot be stacked here")
        self.names = list(stacked)
        self.weights = nn.ParameterList(nn.Parameter(stacked[k].detach()) for k in self.names)
        self.size = len(modules)
        # Not a submodule: its parameters live in `weights`; it only supplies the code.
        self.base = (copy.deepcopy(modules[0]).to("meta"),)

    def forward(self, x: Tensor) -> Tensor:
        """[size x batch, ...] inputs, member after member -> outputs alike."""

        def one(weights: tuple[Tensor, ...], xi: Tensor) -> Tensor:
            return functional_call(self.base[0], dict(zip(self.names, weights, strict=True)), xi)

        batches = x.view(self.size, -1, *x.shape[1:])
        return vmap(one)(tuple(self.weights), batches).flatten(0, 1)


def architecture(module: nn.Module) -> str:
    """What modules must share to be stacked: layers and parameter shapes."""
    shapes = [(k, tuple(v.shape)) for k, v in module.named_parameters()]
    return f"{module!r} {shapes}"


class StackedModel(nn.Module):
    """Several runs' networks trained as one model (a fused sweep). Their trunks form one
    Stack: one grouped convolution per layer for every member, whatever its head. Members
    with the same kind of head share a head Stack (heads with parameters keep them per
    member), applied to those members' maps. Takes and returns the members' batches one
    after the other ([members x batch, ...])."""

    def __init__(self, networks: Sequence[nn.Module]) -> None:
        super().__init__()
        trunks = [part(network, TRUNK) for network in networks]
        if len({architecture(trunk) for trunk in trunks}) > 1:
            raise ValueError("networks stacked together must share their trunk (TRUNK)")
        self.trunk = Stack(trunks)
        kinds: dict[str, list[int]] = {}
        for n, network in enumerate(networks):
            kinds.setdefault(architecture(part(network, HEAD)), []).append(n)
        self.owners = list(kinds.values())  # the members of each head Stack
        self.heads = nn.ModuleList(
            Stack([part(networks[n], HEAD) for n in owners]) for owners in self.owners
        )
        self.members = len(networks)
        order = [n for owners in self.owners for n in owners]
        self.in_order = order == list(range(self.members))  # then slices, not gathers
        # Device-side indices (moved with the model): a CUDA graph captures no host copy.
        self.register_buffer("order", torch.tensor(order), persistent=False)
        self.register_buffer("unorder", torch.argsort(self.order), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        maps = self.trunk(x)
        maps = maps.view(self.members, -1, *maps.shape[1:])
        if not self.in_order:
            maps = maps.index_select(0, self.order)
        parts = maps.split([len(owners) for owners in self.owners])
        scores = torch.cat([h(p.flatten(0, 1)) for h, p in zip(self.heads, parts, strict=True)])
        if self.in_order:
            return scores
        scores = scores.view(self.members, -1, *scores.shape[1:])
        return scores.index_select(0, self.unorder).flatten(0, 1)

    def placed(self, n: int) -> list[tuple[str, nn.Parameter, int]]:
        """Member n's parameters in its own network's order (what its optimiser state is
        indexed by), each as (name, the stacked parameter, n's index in it)."""
        k = next(k for k, owners in enumerate(self.owners) if n in owners)
        stacks = ((self.trunk, n), (self.heads[k], self.owners[k].index(n)))
        return [
            (name, weight, j)
            for stack, j in stacks
            for name, weight in zip(stack.names, stack.weights, strict=True)
        ]

    def state_of(self, n: int) -> dict[str, Tensor]:
        """The state_dict of member n's network, as its own run would save it."""
        return {name: w[j].detach().clone() for name, w, j in self.placed(n)}
