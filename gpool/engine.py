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
from collections.abc import Callable, Iterator
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
class TrainState:
    """Everything that changes while a run trains: what a checkpoint saves and restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any | None
    scheduler_interval: str  # "step" or "epoch"
    generator: torch.Generator  # the epochs' shuffling order
    history: list[EpochResult] = field(default_factory=list)


@dataclass
class TrainPass:
    """One epoch's training pass, still on the device: read once, after the epoch."""

    loss_sum: Tensor
    correct: Tensor
    seen: int
    samples: list[tuple[int, Tensor]]

    def read(self, epoch: int) -> tuple[float, float]:
        """Mean loss and accuracy; a NaN or infinite loss ends the run here."""
        loss = self.loss_sum.item() / self.seen
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss became {loss} in epoch {epoch}: lower optimizer.lr "
                "or check the data"
            )
        return loss, self.correct.item() / self.seen


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
        seed: int,
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
    ) -> TrainState:
        """The state before epoch 1. `scheduler` is a partial of a torch lr scheduler; a
        per-step one ('step' interval) also receives steps_per_epoch."""
        if scheduler_interval not in ("step", "epoch"):
            raise GpoolError(
                f"scheduler.interval must be 'step' or 'epoch', not {scheduler_interval!r}"
            )
        if scheduler is not None:
            steps = self.steps_per_epoch(data)
            extra = {"steps_per_epoch": steps} if scheduler_interval == "step" else {}
            scheduler = scheduler(optimizer, **extra)
        generator = torch.Generator().manual_seed(seed)
        return TrainState(model, optimizer, scheduler, scheduler_interval, generator)

    def fit(
        self,
        state: TrainState,
        data: ImageData,
        on_epoch: Callable[[EpochResult], None] | None = None,
        stop: Stop | None = None,
    ) -> list[EpochResult]:
        """Train from the epoch after `state.history` to `epochs`, calling `on_epoch` after
        each (where the caller logs and checkpoints); `stop` is asked between steps."""
        # The compiled wrapper shares the model's parameters; callers keep the plain model
        # (its state_dict has no `_orig_mod.` prefix). Compile time lands in epoch 1.
        model = torch.compile(state.model) if self.compile else state.model
        for epoch in range(len(state.history) + 1, self.epochs + 1):
            lr = state.optimizer.param_groups[0]["lr"]
            start = time.perf_counter()
            trained = self._train_pass(model, state, data, epoch, stop)
            if state.scheduler is not None and state.scheduler_interval == "epoch":
                state.scheduler.step()
            train_loss, train_acc = trained.read(epoch)
            if self.train_eval_pass:
                steps = self.steps_per_epoch(data)
                train_loss, train_acc = self.evaluate(model, data, data.train, limit=steps)
            val_loss, val_acc = self.evaluate(model, data, data.val, self.limit_val_batches)
            seconds = time.perf_counter() - start
            samples = [(step, loss.item()) for step, loss in trained.samples]
            result = EpochResult(
                epoch, train_loss, train_acc, val_loss, val_acc, lr, seconds, samples
            )
            state.history.append(result)
            log.info(
                "epoch %d/%d training_loss: %.4f training_accuracy: %.4f validation_loss: "
                "%.4f validation_accuracy: %.4f (%.1f s)",
                *(epoch, self.epochs, train_loss, train_acc, val_loss, val_acc, seconds),
            )
            if on_epoch is not None:
                on_epoch(result)
        return state.history

    def _train_pass(
        self, model: nn.Module, state: TrainState, data: ImageData, epoch: int, stop: Stop | None
    ) -> TrainPass:
        """One epoch of steps in the generator's order; a per-step scheduler steps too."""
        model.train()
        steps = self.steps_per_epoch(data)
        n = len(data.train)
        order = torch.randperm(n, generator=state.generator) if self.shuffle else torch.arange(n)
        order = order[: steps * self.batch_size].to(self.device)
        step_scheduler = state.scheduler if state.scheduler_interval == "step" else None
        trained = TrainPass(
            loss_sum=torch.zeros((), device=self.device),
            correct=torch.zeros((), dtype=torch.int64, device=self.device),
            seen=order.shape[0],
            samples=[],
        )
        first_step = (epoch - 1) * steps
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{self.epochs}", leave=False, disable=None)
        for i in bar:
            if stop is not None:
                stop.check(f"in epoch {epoch} (the checkpoint after epoch {epoch - 1} stands)")
            x, y = data.batch(data.train, order[i * self.batch_size : (i + 1) * self.batch_size])
            with self.autocast():
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            state.optimizer.step()
            if step_scheduler is not None:
                step_scheduler.step()
            loss = loss.detach()
            trained.loss_sum += loss * y.shape[0]
            trained.correct += (logits.argmax(1) == y).sum()
            if (first_step + i + 1) % self.log_every_n_steps == 0:
                trained.samples.append((first_step + i + 1, loss))
        return trained

    def _eval_batches(
        self, model: nn.Module, data: ImageData, split: Split, n: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(logits, labels) over the first `n` images of `split`, in large batches."""
        model.eval()
        for start in range(0, n, self.eval_batch_size):
            x, y = data.batch(split, slice(start, min(start + self.eval_batch_size, n)))
            with self.autocast():
                yield model(x).float(), y

    @torch.inference_mode()
    def evaluate(
        self, model: nn.Module, data: ImageData, split: Split, limit: int | None = None
    ) -> tuple[float, float]:
        """Mean loss and accuracy over `split` (its first `limit` eval batches if set)."""
        n = min(len(split), (limit or len(split)) * self.eval_batch_size)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for logits, y in self._eval_batches(model, data, split, n):
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
        return loss_sum.item() / n, correct.item() / n

    @torch.inference_mode()
    def predict(self, model: nn.Module, data: ImageData, split: Split) -> Tensor:
        """The predicted class of every image of `split`, on the CPU."""
        batches = self._eval_batches(model, data, split, len(split))
        return torch.cat([logits.argmax(1) for logits, _ in batches]).cpu()
