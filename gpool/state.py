"""What changes while runs train, as plain types: the state a checkpoint saves and
restores, an epoch's measurements, a pass's accumulators and the protocols the loop runs
its steps and stop checks through. Apart from the engine, so that the engine and the
CUDA-graph steps (gpool.cuda_graph) import these and not each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from gpool.errors import GpoolError


class Stop(Protocol):
    """What the loop asks between steps: raise if the job was told to stop
    (gpool.resume.StopOnSignal)."""

    def check(self, where: str) -> None: ...


@dataclass
class EpochResult:
    """What one epoch measured; `step_losses` holds (global step, loss) samples."""

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float
    epoch_seconds: float
    step_losses: list[tuple[int, float]] = field(default_factory=list)
    test_loss: float | None = None  # with a holdout only: the test split, never selected on
    test_acc: float | None = None

    def metrics(self) -> dict[str, float]:
        """The per-epoch metrics under the names they are logged with."""
        metrics = {
            "train_loss": self.train_loss,
            "train_acc": self.train_acc,
            "val_loss": self.val_loss,
            "val_acc": self.val_acc,
            "lr": self.lr,
            "epoch_seconds": self.epoch_seconds,
        }
        if self.test_acc is not None:
            metrics.update(test_loss=self.test_loss, test_acc=self.test_acc)
        return metrics


@dataclass
class Member:
    """One run being trained: its name in the log, its shuffling order, what it measured,
    and why it stopped early (a NaN loss), if it did."""

    name: str
    generator: torch.Generator
    history: list[EpochResult] = field(default_factory=list)
    failure: GpoolError | None = None


@dataclass
class TrainState:
    """Everything that changes while runs train: what a checkpoint saves and restores.

    `model` is one network (one member) or a gpool.stacking.StackedModel of several members,
    which takes and returns the members' batches one after the other ([members x batch]);
    one optimizer and scheduler serve all members.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any | None
    scheduler_interval: str  # "step" or "epoch"
    members: list[Member]
    cuda_graph: bool = False  # steps captured and replayed (decided by Trainer.start)


@dataclass
class TrainPass:
    """One epoch's training pass, per member, still on the device: read after the epoch."""

    loss_sum: Tensor  # [members]
    correct: Tensor  # [members]
    seen: int  # images per member
    samples: list[tuple[int, Tensor]]  # (global step, [members] losses)

    @classmethod
    def zeros(cls, members: int, seen: int, device: torch.device) -> TrainPass:
        return cls(
            loss_sum=torch.zeros(members, device=device),
            correct=torch.zeros(members, dtype=torch.int64, device=device),
            seen=seen,
            samples=[],
        )

    def read(self) -> list[tuple[float, float]]:
        """Each member's mean loss and accuracy (one host sync for all)."""
        pairs = zip(self.loss_sum.tolist(), self.correct.tolist(), strict=True)
        return [(loss / self.seen, correct / self.seen) for loss, correct in pairs]

    def step_losses(self) -> list[list[tuple[int, float]]]:
        """Each member's sampled (global step, loss) pairs (one host sync for all)."""
        if not self.samples:
            return [[] for _ in range(self.loss_sum.shape[0])]
        steps = [step for step, _ in self.samples]
        rows = torch.stack([losses for _, losses in self.samples], 1).tolist()
        return [list(zip(steps, row, strict=True)) for row in rows]


class Steps(Protocol):
    """Runs an epoch's training steps: EagerSteps, or gpool.cuda_graph.GraphedSteps."""

    def begin(self, order: Tensor) -> TrainPass: ...

    def step(self) -> Tensor: ...

    def end(self) -> None: ...
