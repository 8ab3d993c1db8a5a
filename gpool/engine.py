"""The training engine (conf/trainer): tensor-resident batches, no host sync inside an epoch.

Training loss and accuracy are accumulated on the device from the training pass itself and
read once per epoch, so a GPU never waits on the host mid-epoch; the article's extra full
pass over the training set is available as `train_eval_pass` for its exact protocol.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from gpool import GpoolError
from gpool.data import ImageData, Split

log = logging.getLogger(__name__)


class NonFiniteLossError(GpoolError):
    """The training loss became NaN or infinite; training further would only log garbage."""


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

    def metrics(self) -> dict[str, float]:
        """The per-epoch metrics under the names they are logged with."""
        return {
            "train_loss": self.train_loss,
            "train_acc": self.train_acc,
            "val_loss": self.val_loss,
            "val_acc": self.val_acc,
            "lr": self.lr,
            "epoch_seconds": self.epoch_seconds,
        }


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

    `model` is one network (one member) or a gpool.model.StackedModel of several members,
    which takes and returns the members' batches one after the other ([members x batch]);
    one optimizer and scheduler serve all members.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any | None
    scheduler_interval: str  # "step" or "epoch"
    members: list[Member]


@dataclass
class TrainPass:
    """One epoch's training pass, per member, still on the device: read after the epoch."""

    loss_sum: Tensor  # [members]
    correct: Tensor  # [members]
    seen: int  # images per member
    samples: list[tuple[int, Tensor]]  # (global step, [members] losses)

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


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that the same seed gives the same run on the CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present, so one config serves laptops and GPU nodes."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GpoolError(
            f"trainer.device={device}, but torch sees no CUDA GPU here; use trainer.device=auto "
            "(the GPU when there is one, else the CPU) or trainer.device=cpu"
        )
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise GpoolError(f"trainer.device={device} is no device torch knows ({err})") from None


def at_least(minimum: int, **values: int | None) -> None:
    """Refuse a count below `minimum` (None means "no limit" and passes)."""
    for key, value in values.items():
        if value is not None and value < minimum:
            raise GpoolError(f"trainer.{key} must be >= {minimum}, not {value}")


class Trainer:
    """Fits a model on an ImageData; one instance per run, built from conf/trainer."""

    def __init__(
        self,
        epochs: int,
        batch_size: int = 64,
        eval_batch_size: int = 1000,
        device: str = "auto",
        shuffle: bool = True,
        limit_train_batches: int | None = None,
        limit_val_batches: int | None = None,
        log_every_n_steps: int = 50,
        init: str = "default",
        train_eval_pass: bool = False,
        channels_last: bool = True,
        precision: str = "32",
        compile: bool = False,
        threads: int | None = None,
        resume: bool = True,
    ) -> None:
        if precision not in ("32", "bf16"):
            raise GpoolError(f"trainer.precision must be '32' or 'bf16', not {precision!r}")
        if init not in ("default", "xavier"):
            raise GpoolError(f"trainer.init must be 'default' or 'xavier', not {init!r}")
        at_least(1, epochs=epochs, batch_size=batch_size, eval_batch_size=eval_batch_size)
        at_least(1, log_every_n_steps=log_every_n_steps, threads=threads)
        at_least(1, limit_train_batches=limit_train_batches, limit_val_batches=limit_val_batches)
        self.epochs = epochs
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.device = resolve_device(device)
        self.shuffle = shuffle
        self.limit_train_batches = limit_train_batches
        self.limit_val_batches = limit_val_batches
        self.log_every_n_steps = log_every_n_steps
        self.init = init
        self.train_eval_pass = train_eval_pass
        self.channels_last = channels_last
        self.precision = precision
        self.compile = compile
        self.resume = resume
        if threads:
            torch.set_num_threads(threads)

    def autocast(self) -> torch.autocast:
        """bf16 autocast for the forward pass when precision is 'bf16'; a no-op otherwise."""
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"
        )

    def steps_per_epoch(self, data: ImageData) -> int:
        steps = math.ceil(len(data.train) / self.batch_size)
        return min(steps, self.limit_train_batches or steps)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Apply the init scheme and move the model to the device (before the optimiser sees
        its parameters, which fused optimisers need)."""
        model.initialise(self.init)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return model.to(self.device, memory_format=memory_format)

    def start(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: ImageData,
        seeds: Sequence[tuple[str, int]],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
    ) -> TrainState:
        """The state before epoch 1, for members named and seeded by `seeds`, (name, seed)
        pairs (one for a plain model). `scheduler` is a partial of a torch lr scheduler; a
        per-step one ('step' interval) also receives steps_per_epoch."""
        if scheduler_interval not in ("step", "epoch"):
            raise GpoolError(
                f"scheduler.interval must be 'step' or 'epoch', not {scheduler_interval!r}"
            )
        if scheduler is not None:
            steps = self.steps_per_epoch(data)
            extra = {"steps_per_epoch": steps} if scheduler_interval == "step" else {}
            scheduler = scheduler(optimizer, **extra)
        members = [Member(name, torch.Generator().manual_seed(seed)) for name, seed in seeds]
        return TrainState(model, optimizer, scheduler, scheduler_interval, members)

    def fit(
        self,
        state: TrainState,
        data: ImageData,
        on_epoch: Callable[[int, EpochResult], None] | None = None,
        on_failure: Callable[[int, GpoolError], None] | None = None,
        stop: Stop | None = None,
    ) -> None:
        """Train from the epoch after the members' histories to `epochs`, calling
        `on_epoch(member, result)` after each (where the caller logs and checkpoints);
        `stop` is asked between steps. A member whose loss turns NaN or infinite stops
        being reported: `on_failure(member, error)`, or the error is raised if no
        on_failure is given. Its NaNs stay in its own slices of the stacked weights."""
        # The compiled wrapper shares the model's parameters; callers keep the plain model
        # (its state_dict has no `_orig_mod.` prefix). Compile time lands in epoch 1.
        model = torch.compile(state.model) if self.compile else state.model
        for epoch in range(len(state.members[0].history) + 1, self.epochs + 1):
            lr = state.optimizer.param_groups[0]["lr"]
            start = time.perf_counter()
            trained = self._train_pass(model, state, data, epoch, stop)
            if state.scheduler is not None and state.scheduler_interval == "epoch":
                state.scheduler.step()
            members, passed = len(state.members), trained.read()
            train = passed  # from the training pass itself, unless the article's extra pass
            if self.train_eval_pass:
                train = self.evaluate(model, data, data.train, self.steps_per_epoch(data), members)
            val = self.evaluate(model, data, data.val, self.limit_val_batches, members)
            seconds = time.perf_counter() - start
            step_losses = trained.step_losses()
            for n, member in enumerate(state.members):
                if member.failure is not None:
                    continue
                result = EpochResult(epoch, *train[n], *val[n], lr, seconds, step_losses[n])
                member.history.append(result)
                if not math.isfinite(passed[n][0]):
                    member.failure = NonFiniteLossError(
                        f"training loss became {passed[n][0]} in epoch {epoch}: lower "
                        "optimizer.lr or check the data"
                    )
                    if on_failure is None:
                        raise member.failure
                    on_failure(n, member.failure)
                    continue
                log.info(
                    "%sepoch %d/%d training_loss: %.4f training_accuracy: %.4f "
                    "validation_loss: %.4f validation_accuracy: %.4f (%.1f s)",
                    *(f"{member.name} " if member.name else "", epoch, self.epochs),
                    *(*train[n], *val[n], seconds),
                )
                if on_epoch is not None:
                    on_epoch(n, result)
            if all(member.failure is not None for member in state.members):
                return

    def _train_pass(
        self, model: nn.Module, state: TrainState, data: ImageData, epoch: int, stop: Stop | None
    ) -> TrainPass:
        """One epoch of steps, each member in its generator's order; a per-step scheduler
        steps too. The loss is the sum of the members' mean losses, so each member's
        gradient is the one its own run would get."""
        model.train()
        steps = self.steps_per_epoch(data)
        members, n, size = len(state.members), len(data.train), self.batch_size
        orders = [
            torch.randperm(n, generator=m.generator) if self.shuffle else torch.arange(n)
            for m in state.members
        ]
        order = torch.stack(orders)[:, : steps * size].to(self.device)
        step_scheduler = state.scheduler if state.scheduler_interval == "step" else None
        trained = TrainPass(
            loss_sum=torch.zeros(members, device=self.device),
            correct=torch.zeros(members, dtype=torch.int64, device=self.device),
            seen=order.shape[1],
            samples=[],
        )
        first_step = (epoch - 1) * steps
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{self.epochs}", leave=False, disable=None)
        for i in bar:
            if stop is not None:
                stop.check(f"in epoch {epoch} (the checkpoint after epoch {epoch - 1} stands)")
            x, y = data.batch(data.train, order[:, i * size : (i + 1) * size].flatten())
            with self.autocast():
                logits = model(x)
                losses = F.cross_entropy(logits, y, reduction="none").view(members, -1).mean(1)
            state.optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            state.optimizer.step()
            if step_scheduler is not None:
                step_scheduler.step()
            losses = losses.detach()
            trained.loss_sum += losses * (y.shape[0] // members)
            trained.correct += (logits.argmax(1) == y).view(members, -1).sum(1)
            if (first_step + i + 1) % self.log_every_n_steps == 0:
                trained.samples.append((first_step + i + 1, losses))
        return trained

    def _eval_batches(
        self, model: nn.Module, data: ImageData, split: Split, n: int, members: int = 1
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(logits, labels) over the first `n` images of `split`, in large batches; with
        several members, every member sees every batch ([members x batch])."""
        model.eval()
        for start in range(0, n, self.eval_batch_size):
            index = torch.arange(start, min(start + self.eval_batch_size, n), device=self.device)
            x, y = data.batch(split, index.repeat(members))
            with self.autocast():
                yield model(x).float(), y

    @torch.inference_mode()
    def evaluate(
        self,
        model: nn.Module,
        data: ImageData,
        split: Split,
        limit: int | None = None,
        members: int = 1,
    ) -> list[tuple[float, float]]:
        """Each member's mean loss and accuracy over `split` (its first `limit` eval batches
        if set)."""
        n = min(len(split), (limit or len(split)) * self.eval_batch_size)
        loss_sum = torch.zeros(members, device=self.device)
        correct = torch.zeros(members, dtype=torch.int64, device=self.device)
        for logits, y in self._eval_batches(model, data, split, n, members):
            loss_sum += F.cross_entropy(logits, y, reduction="none").view(members, -1).sum(1)
            correct += (logits.argmax(1) == y).view(members, -1).sum(1)
        return [(s / n, c / n) for s, c in zip(loss_sum.tolist(), correct.tolist(), strict=True)]

    @torch.inference_mode()
    def predict(self, model: nn.Module, data: ImageData, split: Split) -> Tensor:
        """The predicted class of every image of `split`, on the CPU."""
        batches = self._eval_batches(model, data, split, len(split))
        return torch.cat([logits.argmax(1) for logits, _ in batches]).cpu()
