"""Whole training steps as one CUDA graph replay (trainer.cuda_graph).

A step of the small convnet is ~80 tiny kernels; launched one by one from Python, the host
is the bottleneck on a GPU. Captured once, a step is one `replay()`. What capture demands
and how it is met here (PyTorch docs, notes/cuda "Whole-network capture"):

- fixed addresses and shapes: each epoch's order is copied into a static [steps, batch]
  index buffer and a step counter on the device picks the batch inside the graph; the last,
  short batch is padded to the full size with per-image weights (padding weighs 0; the
  network has no BatchNorm, so this is exact);
- Adam/AdamW with `capturable=True` and the values a scheduler changes every step (the lr;
  beta1 where one-cycle cycles the momentum) as device tensors filled in place (LiveValues);
  while no pass runs the optimiser holds plain values again, so checkpoints are what an
  eager run writes;
- warm-up steps on a side stream (they really update the weights: weights and optimiser
  state are put back afterwards), then capture, after any checkpoint was restored.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from gpool.errors import GpoolError
from gpool.model import kept_buffers
from gpool.state import TrainPass, TrainState

#: Steps run on a side stream before capture (allocator and library state settle).
WARMUP_STEPS = 3
#: Optimisers whose step is capturable and whose fresh state is all zeros (what the
#: warm-up puts back).
CAPTURABLE = (torch.optim.Adam, torch.optim.AdamW)

#: A step: (image index [members x batch], weights [1, batch], accumulators) -> losses.
Step = Callable[[Tensor, Tensor, TrainPass], Tensor]


def blockers(device: torch.device, compile_mode: str | None, state: TrainState) -> list[str]:
    """Why this run's step cannot be captured (empty: it can)."""
    reasons = []
    if device.type != "cuda":
        reasons.append(f"the device is {device.type}, not CUDA")
    if compile_mode is not None:
        reasons.append("trainer.compile is set (torch.compile makes graphs its own way)")
    if not isinstance(state.optimizer, CAPTURABLE):
        reasons.append(f"optimizer {type(state.optimizer).__name__} is not Adam or AdamW")
    if kept := kept_buffers(state.model):
        reasons.append(
            f"the model keeps buffers ({kept[0]}...: BatchNorm), whose statistics the padded "
            "last batch of an epoch would change"
        )
    return reasons


@contextmanager
def restored_on_error(state: TrainState) -> Iterator[None]:
    """Weights and optimiser state (its values, lr, flags) put back as they were when the
    block raises: what a failed capture's warm-up steps and installed device values
    changed, so that the eager steps after it train what an eager run trains."""
    params = [p for group in state.optimizer.param_groups for p in group["params"]]
    weights = [p.detach().clone() for p in params]
    optimiser = copy.deepcopy(state.optimizer.state_dict())
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for p, saved in zip(params, weights, strict=True):
                p.copy_(saved)
        state.optimizer.load_state_dict(optimiser)
        raise


def cycles_momentum(scheduler: Any | None) -> bool:
    """Whether the scheduler writes Adam's beta1 every step (one-cycle's cycle_momentum)."""
    return bool(getattr(scheduler, "cycle_momentum", False))


class LiveValues:
    """The settings a scheduler changes between steps, per param group: the lr, and beta1
    when the momentum cycles. While a pass runs they are device tensors that the captured
    step reads and that are filled in place; between passes plain values, as an eager run
    holds them (what checkpoints and schedulers see). Everything else a group holds is baked
    into the graph, and a scheduler that changes it is refused.

    Adam reads a tensor beta1 without a host sync only per parameter (foreach=False): its
    multi-tensor step turns it into a Python number. Where Adam has no capturable mode (the
    CPU) the step reads the same tensors eagerly."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, momentum: bool):
        self.optimizer, self.momentum = optimizer, momentum
        groups = optimizer.param_groups
        self.lrs = [torch.tensor(float(g["lr"]), device=device) for g in groups]
        self.beta1s = (
            [torch.tensor(float(g["betas"][0]), device=device) for g in groups] if momentum else []
        )
        self.eager = {k: [g[k] for g in groups] for k in ("capturable", "foreach")}
        self.capturable = device.type == "cuda"
        self.frozen = self.baked()

    def baked(self) -> list[dict[str, Any]]:
        """Each group's settings that a captured step bakes in."""
        live = ("params", "lr", "capturable", "foreach") + (("betas",) if self.momentum else ())
        groups = self.optimizer.param_groups
        kept = [{k: v for k, v in g.items() if k not in live} for g in groups]
        if self.momentum:  # beta2 stays a number: Adam's per-parameter step syncs on a tensor
            kept = [{**k, "beta2": float(g["betas"][1])} for k, g in zip(kept, groups, strict=True)]
        return kept

    def install(self) -> None:
        """The tensors, filled with the groups' current values, into the groups."""
        if self.baked() != self.frozen:
            raise GpoolError(
                "the scheduler changed optimizer settings other than the lr and beta1, which "
                "the CUDA graph baked in: pass trainer.cuda_graph=false"
            )
        for n, group in enumerate(self.optimizer.param_groups):
            self.lrs[n].fill_(float(group["lr"]))
            group["lr"], group["capturable"] = self.lrs[n], self.capturable
            if self.momentum:
                self.beta1s[n].fill_(float(group["betas"][0]))
                group["betas"] = (self.beta1s[n], float(group["betas"][1]))
                group["foreach"] = False

    def follow(self) -> None:
        """Copy what a per-step scheduler put in the groups into the tensors: it fills a
        tensor lr in place, or (some torch versions, some schedulers) sets a number; it
        always sets beta1 as a number."""
        for n, group in enumerate(self.optimizer.param_groups):
            if group["lr"] is not self.lrs[n]:
                self.lrs[n].fill_(float(group["lr"]))
                group["lr"] = self.lrs[n]
            if self.momentum and group["betas"][0] is not self.beta1s[n]:
                self.beta1s[n].fill_(float(group["betas"][0]))
                group["betas"] = (self.beta1s[n], group["betas"][1])

    def uninstall(self) -> None:
        """Plain values back in the groups (one host sync), the scheduler's last included."""
        self.follow()
        lrs = torch.stack(self.lrs).tolist()
        beta1s = torch.stack(self.beta1s).tolist() if self.momentum else []
        for n, group in enumerate(self.optimizer.param_groups):
            group["lr"] = lrs[n]
            for key, values in self.eager.items():
                group[key] = values[n]
            if self.momentum:
                group["betas"] = (beta1s[n], group["betas"][1])


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
        self.live = LiveValues(self.optimizer, device, cycles_momentum(state.scheduler))
        for slots in self.optimizer.state.values():  # restored from a checkpoint: on the CPU
            if "step" in slots:
                slots["step"] = slots["step"].to(device)
        self.live.install()
        self.graph, self.losses = self._capture(step)
        self.live.uninstall()

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

    def begin(self, order: Tensor) -> TrainPass:
        """Load an epoch's order ([members, images]) into the static buffers; the pass
        returned reads the static accumulators."""
        self.live.install()
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
        self.live.follow()
        self.graph.replay()
        return self.losses

    def end(self) -> None:
        self.live.uninstall()
