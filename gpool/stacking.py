"""Several runs' networks trained as one model (fused sweeps, hydra/launcher=fused): one
stacked trunk for every member, one stack per kind of head (what a network is made of, its
TRUNK and HEAD, is gpool.model's)."""

import copy
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from gpool.model import HEAD, TRUNK, kept_buffers


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
        if kept := kept_buffers(modules[0]):
            raise ValueError(f"networks with buffers ({kept[0]}...) cannot be stacked here")
        stacked, _ = stack_module_state(list(modules))
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
