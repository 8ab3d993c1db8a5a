"""What one training step launches, counted by kind with torch's profiler
(`python -m gpool.bench --profile`).

Two counts per kind: operator calls, the ATen operators Python and autograd issue (one
vmapped convolution for all members of a stack is one call), and kernels-to-be, the leaf
operators those calls come down to (on a GPU each is a kernel or a few: what a captured
CUDA graph replays). Steps are profiled eagerly on whatever device the trainer uses, so the
counts on a CPU are the ones a GPU will launch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from omegaconf import DictConfig
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

from gpool.data import ImageData
from gpool.engine import Trainer
from gpool.train import start

#: The kinds a step's operators are counted by, in the order they are printed.
KINDS = ("convolution forward", "convolution backward", "optimiser", "other")


def kind(event: FunctionEvent) -> str:
    """The kind of an operator: that of the nearest enclosing convolution or optimiser step."""
    while event is not None:
        if event.name.startswith("Optimizer.step#"):
            return "optimiser"
        if event.name == "aten::convolution_backward":
            return "convolution backward"
        if event.name in ("aten::conv2d", "aten::convolution"):
            return "convolution forward"
        event = event.cpu_parent
    return "other"


def aten(event: FunctionEvent | None) -> bool:
    return event is not None and event.name.startswith("aten::")


def counts(events: list[FunctionEvent]) -> dict[str, tuple[int, int]]:
    """(operator calls, kernels-to-be) per kind among a profile's events."""
    calls = Counter(kind(e) for e in events if aten(e) and not aten(e.cpu_parent))
    leaves = Counter(kind(e) for e in events if aten(e) and not any(map(aten, e.cpu_children)))
    return {k: (calls[k], leaves[k]) for k in KINDS}


def profile_step(step: Callable[[], object]) -> dict[str, tuple[int, int]]:
    """The counts of one call of `step`, after one unprofiled call (lazy state settles:
    the optimiser's slots, the allocator)."""
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return counts(list(prof.events()))


def training_step(trainer: Trainer, data: ImageData, configs: list[DictConfig]) -> Callable:
    """One eager training step of these runs trained as one group (a fused sweep's)."""
    state = start(trainer, data, configs, [f"member {n}" for n in range(len(configs))])
    state.cuda_graph = False
    steps = trainer.steps(state.model, state, data)
    n, members = len(data.train), len(configs)
    steps.begin(torch.stack([torch.randperm(n) for _ in range(members)]).to(trainer.device))
    return steps.step
