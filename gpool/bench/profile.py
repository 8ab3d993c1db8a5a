"""What one training step launches, counted by kind with torch's profiler
(`python -m gpool.bench --profile`).

Two counts per kind: operator calls, the ATen operators Python and autograd issue (one
vmapped convolution for all members of a stack is one call; each launches at least one
kernel on a GPU, whatever the device profiled), and kernels-to-be, the innermost operators
that do work (allocations and views left out; on a GPU about one kernel each, what a
captured CUDA graph replays; their number depends a little on the device's libraries).
Steps are profiled eagerly, as a CUDA graph captures them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from omegaconf import DictConfig
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

from gpool.build import start
from gpool.config import build, compose_config
from gpool.engine import Trainer
from gpool.images import ImageData

#: The kinds a step's operators are counted by, in the order they are printed.
KINDS = ("convolution forward", "convolution backward", "optimiser", "other")
#: The groups `python -m gpool.bench --profile` counts, (heads, seeds): one run; the
#: mission's sweep, 2 heads x 3 seeds; every head x 5 seeds, 35 runs.
GROUPS = (
    (("avg",), 1),
    (("avg", "max"), 3),
    (("avg", "max", "avgmax", "catavgmax", "gem", "lse", "attention"), 5),
)


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


#: Operators that only allocate or make views: no kernel of their own.
NO_KERNEL = frozenset(
    {
        "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::resize_",
        "aten::as_strided", "aten::as_strided_", "aten::view", "aten::_unsafe_view",
        "aten::reshape", "aten::_reshape_alias", "aten::detach", "aten::alias", "aten::expand",
        "aten::unsqueeze", "aten::squeeze", "aten::slice", "aten::select", "aten::t",
        "aten::transpose", "aten::permute", "aten::flatten", "aten::unflatten", "aten::split",
        "aten::lift_fresh", "aten::movedim",
    }
)  # fmt: skip


def aten(event: FunctionEvent | None) -> bool:
    return event is not None and event.name.startswith("aten::")


def works(event: FunctionEvent) -> bool:
    """An ATen operator that computes or copies (not an allocation or a view)."""
    return aten(event) and event.name not in NO_KERNEL


def innermost(event: FunctionEvent) -> bool:
    """A working operator none of whose descendants works: about one kernel."""
    below, inner = list(event.cpu_children), works(event)
    while below and inner:
        child = below.pop()
        inner = not works(child)
        below.extend(child.cpu_children)
    return inner


def counts(events: list[FunctionEvent]) -> dict[str, tuple[int, int]]:
    """(operator calls, kernels-to-be) per kind among a profile's events."""
    calls = Counter(kind(e) for e in events if aten(e) and not aten(e.cpu_parent))
    kernels = Counter(kind(e) for e in events if innermost(e))
    return {k: (calls[k], kernels[k]) for k in KINDS}


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


def profile_groups(overrides: list[str]) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """(what the group is, its counts) for each of GROUPS, every run composed with
    `overrides` (device, data, batch size...)."""
    rows = []
    for heads, seeds in GROUPS:
        configs = [
            compose_config(f"pool={pool}", f"seed={seed}", *overrides)
            for pool in heads
            for seed in range(seeds)
        ]
        trainer: Trainer = build(configs[0].trainer)
        data = build(configs[0].dataset).load(trainer.device, trainer.channels_last)
        label = f"{len(configs)} ({len(heads)} head{'s' if len(heads) > 1 else ''} x {seeds})"
        rows.append((label, profile_step(training_step(trainer, data, configs))))
    return rows
