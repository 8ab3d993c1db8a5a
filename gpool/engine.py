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
from typing import Any

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


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that the same seed gives the same run on the CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present, so one config serves laptops and GPU nodes."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


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
    ) -> None:
        if precision not in ("32", "bf16"):
            raise ValueError(f"trainer.precision must be '32' or 'bf16', not {precision!r}")
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

    def fit(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: ImageData,
        seed: int,
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        on_epoch: Callable[[EpochResult], None] | None = None,
    ) -> list[EpochResult]:
        """Train for `epochs`, calling `on_epoch` after each with what it measured.

        `scheduler` is a partial of a torch lr scheduler; a per-step one ('step' interval)
        also receives steps_per_epoch.
        """
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(
                f"scheduler.interval must be 'step' or 'epoch', not {scheduler_interval!r}"
            )
        steps = self.steps_per_epoch(data)
        if scheduler is not None:
            extra = {"steps_per_epoch": steps} if scheduler_interval == "step" else {}
            scheduler = scheduler(optimizer, **extra)
        generator = torch.Generator().manual_seed(seed)
        # The compiled wrapper shares the model's parameters; callers keep the plain model
        # (its state_dict has no `_orig_mod.` prefix). Compile time lands in epoch 1.
        run_model = torch.compile(model) if self.compile else model
        history: list[EpochResult] = []
        for epoch in range(1, self.epochs + 1):
            lr = optimizer.param_groups[0]["lr"]
            start = time.perf_counter()
            loss_sum, correct, seen, samples = self._train_epoch(
                run_model,
                optimizer,
                data,
                generator,
                steps,
                epoch,
                scheduler if scheduler_interval == "step" else None,
            )
            if scheduler is not None and scheduler_interval == "epoch":
                scheduler.step()
            train_loss = loss_sum.item() / seen
            if not math.isfinite(train_loss):
                raise NonFiniteLossError(
                    f"training loss became {train_loss} in epoch {epoch}: lower optimizer.lr "
                    "or check the data"
                )
            train_acc = correct.item() / seen
            if self.train_eval_pass:
                train_loss, train_acc = self.evaluate(run_model, data, data.train, limit=steps)
            val_loss, val_acc = self.evaluate(
                run_model, data, data.val, limit=self.limit_val_batches
            )
            result = EpochResult(
                epoch=epoch,
                train_loss=train_loss,
                train_acc=train_acc,
                val_loss=val_loss,
                val_acc=val_acc,
                lr=lr,
                epoch_seconds=time.perf_counter() - start,
                step_losses=[(step, loss.item()) for step, loss in samples],
            )
            log.info(
                "epoch %d/%d training_loss: %.4f training_accuracy: %.4f "
                "validation_loss: %.4f validation_accuracy: %.4f (%.1f s)",
                epoch,
                self.epochs,
                train_loss,
                train_acc,
                val_loss,
                val_acc,
                result.epoch_seconds,
            )
            history.append(result)
            if on_epoch is not None:
                on_epoch(result)
        return history

    def _train_epoch(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: ImageData,
        generator: torch.Generator,
        steps: int,
        epoch: int,
        step_scheduler: Any | None,
    ) -> tuple[Tensor, Tensor, int, list[tuple[int, Tensor]]]:
        """One pass; returns device-side loss sum and correct count, the sample count and
        the sampled per-step losses (still tensors: read after the epoch)."""
        model.train()
        n = len(data.train)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        order = order[: steps * self.batch_size].to(self.device)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        samples: list[tuple[int, Tensor]] = []
        first_step = (epoch - 1) * steps
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{self.epochs}", leave=False, disable=None)
        for i in bar:
            x, y = data.batch(data.train, order[i * self.batch_size : (i + 1) * self.batch_size])
            with self.autocast():
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step_scheduler is not None:
                step_scheduler.step()
            loss = loss.detach()
            loss_sum += loss * y.shape[0]
            correct += (logits.argmax(1) == y).sum()
            if (first_step + i + 1) % self.log_every_n_steps == 0:
                samples.append((first_step + i + 1, loss))
        return loss_sum, correct, order.shape[0], samples

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
