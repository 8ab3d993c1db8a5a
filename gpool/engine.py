"""The training engine (conf/trainer): tensor-resident batches, no host sync inside an epoch.

Training loss and accuracy are accumulated on the device from the training pass itself and
read once per epoch, so a GPU never waits on the host mid-epoch; the article's extra full
pass over the training set is available as `train_eval_pass` for its exact protocol.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, asdict, dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, get_type_hints

import numpy as np
import torch
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from torch import Tensor, nn
from tqdm import tqdm

from gpool import GpoolError
from gpool.data import ImageData, Split

log = logging.getLogger(__name__)


class NonFiniteLossError(GpoolError):
    """The training loss became NaN or infinite; training further would only log garbage."""


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training between two steps; the last epoch's checkpoint
    stands. A KeyboardInterrupt, so that the run is marked KILLED and the sweep stops."""


def handle_stop_signals(handler: Callable[[int, Any], None]) -> dict[signal.Signals, Any]:
    """Route SIGINT and SIGTERM to `handler`; returns the handlers it replaced. Only the
    main thread may set handlers: elsewhere it does nothing and returns {}."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


class StopOnSignal:
    """While active, SIGINT and SIGTERM only record the signal; the training loop checks it
    between steps, so a run never stops half-way through an optimiser step or a checkpoint
    write. Outside the main thread (where handlers cannot be set) it does nothing."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _record(self, signum: int, frame: Any) -> None:
        self.signal = signal.Signals(signum)

    def __enter__(self) -> StopOnSignal:
        self._previous = handle_stop_signals(self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    generator: torch.Generator,
    history: list[EpochResult],
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Everything needed to continue bit for bit: weights, optimiser and scheduler state,
    the shuffling generator, the global RNGs and the epochs so far. Written to a temporary
    file and renamed, so a kill mid-write leaves the previous checkpoint intact."""
    state = {
        "epoch": len(history),
        "history": [asdict(r) for r in history],
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy_rng": np.random.get_state(),
        "python_rng": random.getstate(),
        "meta": dict(meta or {}),
    }
    partial = path.with_name(f"{path.name}.tmp")
    torch.save(state, partial)
    os.replace(partial, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint gpool wrote (it holds NumPy and Python RNG states, so it is not a
    weights-only file: load only gpool's own checkpoints)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def restore(
    state: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    generator: torch.Generator,
) -> list[EpochResult]:
    """Load a checkpoint's state into live objects; returns the epochs already done."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    np.random.set_state(state["numpy_rng"])
    random.setstate(state["python_rng"])
    return [
        EpochResult(**{**r, "step_losses": [tuple(s) for s in r["step_losses"]]})
        for r in state["history"]
    ]


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
        threads: int | None = None,
        resume: bool = True,
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

    def fit(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: ImageData,
        seed: int,
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        on_epoch: Callable[[EpochResult], None] | None = None,
        checkpoint: Path | None = None,
        resume: Mapping[str, Any] | None = None,
        checkpoint_meta: Mapping[str, Any] | None = None,
    ) -> list[EpochResult]:
        """Train for `epochs`, calling `on_epoch` after each with what it measured.

        `scheduler` is a partial of a torch lr scheduler; a per-step one ('step' interval)
        also receives steps_per_epoch. After `on_epoch`, the whole training state is written
        to `checkpoint` (with `checkpoint_meta`, e.g. the MLflow run id, under "meta");
        passing that state back as `resume` continues with the next epoch
        exactly as if the run had not stopped. SIGINT/SIGTERM stop the run at the next
        step boundary with RunInterrupted.
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
        if resume is not None:
            history = restore(resume, model, optimizer, scheduler, generator)
            log.info("resuming after epoch %d", len(history))
        with StopOnSignal() as stop:
            for epoch in range(len(history) + 1, self.epochs + 1):
                result = self._epoch(
                    run_model,
                    optimizer,
                    data,
                    generator,
                    steps,
                    epoch,
                    scheduler,
                    scheduler_interval,
                    stop,
                )
                history.append(result)
                if on_epoch is not None:
                    on_epoch(result)
                if checkpoint is not None:
                    save_checkpoint(
                        checkpoint,
                        model,
                        optimizer,
                        scheduler,
                        generator,
                        history,
                        meta=checkpoint_meta,
                    )
        return history

    def _epoch(
        self,
        run_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: ImageData,
        generator: torch.Generator,
        steps: int,
        epoch: int,
        scheduler: Any | None,
        scheduler_interval: str,
        stop: StopOnSignal,
    ) -> EpochResult:
        """Train one epoch, then measure it."""
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
            stop,
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
        val_loss, val_acc = self.evaluate(run_model, data, data.val, limit=self.limit_val_batches)
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
        return result

    def _train_epoch(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: ImageData,
        generator: torch.Generator,
        steps: int,
        epoch: int,
        step_scheduler: Any | None,
        stop: StopOnSignal,
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
            if stop.signal is not None:
                raise RunInterrupted(
                    f"stopped by {stop.signal.name} in epoch {epoch}; rerun the same command "
                    f"to resume after epoch {epoch - 1}"
                )
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


def _register_trainer_schema() -> None:
    """conf/trainer options extend this schema, generated from Trainer's signature, so that
    Hydra rejects a wrong type (`trainer.epochs=ten`) or an unknown key when composing,
    before anything runs or is logged."""
    hints = get_type_hints(Trainer.__init__)
    fields: list[tuple[str, Any, Any]] = []
    for name, parameter in inspect.signature(Trainer.__init__).parameters.items():
        if name == "self":
            continue
        default = MISSING if parameter.default is inspect.Parameter.empty else parameter.default
        fields.append((name, hints[name], field(default=default)))
    fields.append(("_target_", str, field(default="gpool.engine.Trainer")))
    ConfigStore.instance().store(
        group="trainer", name="schema", node=make_dataclass("TrainerSchema", fields)
    )


_register_trainer_schema()
