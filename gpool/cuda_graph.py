"""Whole training steps as one CUDA graph replay (trainer.cuda_graph).

A step of the small convnet is ~80 tiny kernels; launched one by one from Python, the host
is the bottleneck on a GPU. Captured once, a step is one `replay()`. What capture demands
and how it is met here (PyTorch docs, notes/cuda "Whole-network capture"):

- fixed addresses and shapes: each epoch's order is copied into a static [steps, batch]
  index buffer and a step counter on the device picks the batch inside the graph; the last,
  short batch is padded to the full size with per-image weights (padding weighs 0; the
  network has no BatchNorm, so this is exact);
- Adam/AdamW with `capturable=True` and the learning rate as a device tensor that a
  scheduler fills in place; while no pass runs the optimiser holds plain values again, so
  checkpoints are what an eager run writes;
- warm-up steps on a side stream (they really update the weights: weights and optimiser
  state are put back afterwards), then capture, after any checkpoint was restored.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gpool import GpoolError

if TYPE_CHECKING:
    from gpool.engine import TrainPass, TrainState

#: Steps run on a side stream before capture (allocator and library state settle).
WARMUP_STEPS = 3
#: Optimisers whose step is capturable and whose fresh state is all zeros (what the
#: warm-up puts back).
CAPTURABLE = (torch.optim.Adam, torch.optim.AdamW)

#: A step: (image index [members x batch], weights [1, batch], accumulators) -> losses.
Step = Callable[[Tensor, Tensor, "TrainPass"], Tensor]


def blockers(device: torch.device, compile_mode: str | None, state: TrainState) -> list[str]:
    """Why this run's step cannot be captured (empty: it can)."""
    reasons = []
    if device.type != "cuda":
        reasons.append(f"the device is {device.type}, not CUDA")
    if compile_mode is not None:
        reasons.append("trainer.compile is set (torch.compile makes graphs its own way)")
    if not isinstance(state.optimizer, CAPTURABLE):
        reasons.append(f"optimizer {type(state.optimizer).__name__} is not Adam or AdamW")
    if getattr(state.scheduler, "cycle_momentum", False):
        reasons.append(
            f"{type(state.scheduler).__name__} cycles the momentum every step, which a graph "
            "would freeze (scheduler.lr_scheduler.cycle_momentum=false allows capture)"
        )
    return reasons


def frozen_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's settings that a captured step bakes in: all but lr."""
    return [
        {k: v for k, v in group.items() if k not in ("params", "lr", "capturable")}
        for group in optimizer.param_groups
    ]


class GraphedSteps:
    """The training steps of one TrainState, captured once and replayed every step."""

    def __init__(
        self, step: Step, state: TrainState, trained: TrainPass, steps: int, batch: int
    ) -> None:
        members = len(state.members)
        device = trained.loss_sum.device
        self.optimizer = state.optimizer
        self.trained = trained
        self.batch = batch
        self.batches = torch.zeros(steps, members * batch, dtype=torch.int64, device=device)
        counts = [min(batch, trained.seen - s * batch) for s in range(steps)]
        real = torch.arange(batch).expand(steps, batch) < torch.tensor(counts).unsqueeze(1)
        self.weights = (real / torch.tensor(counts).unsqueeze(1)).unsqueeze(1).to(device)
        self.counter = torch.zeros(1, dtype=torch.int64, device=device)
        groups = self.optimizer.param_groups
        self.lrs = [torch.tensor(float(g["lr"]), device=device) for g in groups]
        self.capturable = self.optimizer.defaults.get("capturable", False)
        for slots in self.optimizer.state.values():  # restored from a checkpoint: on the CPU
            if "step" in slots:
                slots["step"] = slots["step"].to(device)
        self.frozen = frozen_hyperparameters(self.optimizer)
        self._install()
        self.graph, self.losses = self._capture(step)
        self._uninstall()

    def _body(self, step: Step) -> Tensor:
        """One step, reading its batch at the device-side counter: what is captured."""
        index = self.batches.index_select(0, self.counter).view(-1)
        weight = self.weights.index_select(0, self.counter).view(1, -1)
        losses = step(index, weight, self.trained)
        self.counter += 1
        return losses

    def _capture(self, step: Step) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        saved = [p.detach().clone() for p in params]
        slots = {p: {k: v.clone() for k, v in s.items()} for p, s in self.optimizer.state.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), warnings.catch_warnings():
            # Adam warns that capturable=True steps run uncaptured: these, on purpose.
            warnings.filterwarnings("ignore", ".*capturable=True.*")
            for _ in range(WARMUP_STEPS):
                self.optimizer.zero_grad(set_to_none=True)
                self._body(step)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():  # undo the warm-up: weights and optimiser state as they were
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)
            for p, state in self.optimizer.state.items():
                for k, v in state.items():
                    if p in slots:
                        v.copy_(slots[p][k])
                    else:
                        v.zero_()
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            losses = self._body(step)
        self.trained.loss_sum.zero_()
        self.trained.correct.zero_()
        return graph, losses

    def _install(self) -> None:
        """Put the device lr tensors (filled with the current values) into the groups."""
        if frozen_hyperparameters(self.optimizer) != self.frozen:
            raise GpoolError(
                "the scheduler changed optimizer settings other than the lr, which the CUDA "
                "graph baked in: pass trainer.cuda_graph=false"
            )
        for group, lr in zip(self.optimizer.param_groups, self.lrs, strict=True):
            lr.fill_(float(group["lr"]))
            group["lr"], group["capturable"] = lr, True

    def _uninstall(self) -> None:
        """Plain values back in the groups, as an eager run holds them (one host sync)."""
        values = torch.stack(self.lrs).tolist()
        for group, value in zip(self.optimizer.param_groups, values, strict=True):
            group["lr"], group["capturable"] = value, self.capturable

    def begin(self, order: Tensor) -> TrainPass:
        """Load an epoch's order ([members, images]) into the static buffers; the pass
        returned reads the static accumulators."""
        self._install()
        members, seen = order.shape
        steps = self.batches.shape[0]
        padded = torch.zeros(members, steps * self.batch, dtype=order.dtype, device=order.device)
        padded[:, :seen] = order
        self.batches.copy_(padded.view(members, steps, self.batch).transpose(0, 1).flatten(1))
        self.counter.zero_()
        self.trained.loss_sum.zero_()
        self.trained.correct.zero_()
        return replace(self.trained, samples=[])

    def step(self) -> Tensor:
        """Replay the next step; returns the members' losses (overwritten by the next)."""
        self._follow_scheduler()
        self.graph.replay()
        return self.losses

    def _follow_scheduler(self) -> None:
        """A per-step scheduler fills the lr tensors in place, or (some torch versions, some
        schedulers) puts a new value in the group: copy that into the captured tensor."""
        for group, lr in zip(self.optimizer.param_groups, self.lrs, strict=True):
            if group["lr"] is not lr:
                lr.fill_(float(group["lr"]))
                group["lr"] = lr

    def end(self) -> None:
        self._uninstall()
