"""The training engine (conf/trainer): tensor-resident batches, no host sync inside an epoch.

Training loss and accuracy are accumulated on the device from the training pass itself and
read once per epoch, so a GPU never waits on the host mid-epoch; the article's extra full
pass over the training set is available as `train_eval_pass` for its exact protocol. On a
GPU each step is one CUDA graph replay where the run's options allow (gpool.cuda_graph).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from gpool.cuda_graph import GraphedSteps, Step, blockers, restored_on_error
from gpool.errors import GpoolError
from gpool.images import ImageData, Split
from gpool.state import EpochResult, Member, Steps, Stop, TrainPass, TrainState
from gpool.trainer_settings import TrainerSettings

log = logging.getLogger(__name__)


class NonFiniteLossError(GpoolError):
    """The training loss became NaN or infinite; training further would only log garbage."""


class EagerSteps:
    """Steps launched kernel by kernel, the last batch of an epoch as short as it is."""

    def __init__(
        self, step: Step, optimizer: torch.optim.Optimizer, trained: TrainPass, batch: int
    ) -> None:
        self.run_step, self.optimizer, self.template, self.batch = step, optimizer, trained, batch

    def begin(self, order: Tensor) -> TrainPass:
        self.order, self.done = order, 0
        members, device = self.template.loss_sum.shape[0], self.template.loss_sum.device
        self.trained = TrainPass.zeros(members, self.template.seen, device)
        return self.trained

    def step(self) -> Tensor:
        index = self.order[:, self.done * self.batch : (self.done + 1) * self.batch].flatten()
        self.done += 1
        self.optimizer.zero_grad(set_to_none=True)
        return self.run_step(index, None, self.trained)

    def end(self) -> None:
        """Nothing to put back."""


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


@dataclass
class Trainer(TrainerSettings):
    """Fits a model on an ImageData; one instance per run, built from conf/trainer
    (TrainerSettings: its keys and their checks). Once built, `device` is the torch device
    it names, and torch runs `threads` threads when set."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.device = resolve_device(self.device)
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.cuda_graph == "true" and self.device.type != "cuda":
            raise GpoolError(
                f"trainer.cuda_graph=true needs a CUDA device, not {self.device.type}; "
                "use trainer.cuda_graph=auto (captured on a GPU, eager elsewhere)"
            )

    def autocast(self) -> torch.autocast:
        """bf16 autocast for the forward pass when precision is 'bf16'; a no-op otherwise.
        Without the cast cache, which CUDA graph capture does not allow (each weight is
        used once per pass anyway)."""
        return torch.autocast(
            self.device.type,
            dtype=torch.bfloat16,
            enabled=self.precision == "bf16",
            cache_enabled=False,
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
        state = TrainState(model, optimizer, scheduler, scheduler_interval, members)
        state.cuda_graph = self.capture_steps(state)
        return state

    def capture_steps(self, state: TrainState) -> bool:
        """Whether the steps are captured as a CUDA graph (trainer.cuda_graph): with
        `auto` whenever the run's options allow, saying why not on a GPU when they do not."""
        if self.cuda_graph == "false":
            return False
        reasons = "; ".join(blockers(self.device, self.compile, state))
        if reasons and self.cuda_graph == "true":
            raise GpoolError(f"trainer.cuda_graph=true, but {reasons}")
        if reasons and self.device.type == "cuda":
            log.info("steps run eagerly, not as a CUDA graph: %s", reasons)
        return not reasons

    def fit(
        self,
        state: TrainState,
        data: ImageData,
        on_epoch: Callable[[int, EpochResult], None] | None = None,
        on_failure: Callable[[int, GpoolError], None] | None = None,
        stop: Stop | None = None,
        on_eager: Callable[[str], None] | None = None,
    ) -> None:
        """Train from the epoch after the members' histories to `epochs`, calling
        `on_epoch(member, result)` after each (where the caller logs and checkpoints);
        `stop` is asked between steps. A member whose loss turns NaN or infinite stops
        being reported: `on_failure(member, error)`, or the error is raised if no
        on_failure is given; so does a member whose `on_epoch` raises a GpoolError. Its
        NaNs stay in its own slices of the stacked weights. `on_eager(why)` hears of steps
        that could not be captured and run eagerly instead (see steps)."""
        # The compiled wrapper shares the model's parameters; callers keep the plain model
        # (its state_dict has no `_orig_mod.` prefix). Compile time lands in epoch 1.
        model = torch.compile(state.model, mode=self.compile) if self.compile else state.model
        first = len(state.members[0].history) + 1
        if first > self.epochs:
            return
        steps = self.steps(model, state, data, on_eager)  # captured here: after any restore
        for epoch in range(first, self.epochs + 1):
            lr = state.optimizer.param_groups[0]["lr"]
            start = time.perf_counter()
            trained = self._train_pass(model, steps, state, data, epoch, stop)
            if state.scheduler is not None and state.scheduler_interval == "epoch":
                state.scheduler.step()
            members, passed = len(state.members), trained.read()
            train = passed  # from the training pass itself, unless the article's extra pass
            if self.train_eval_pass:
                train = self.evaluate(model, data, data.train, self.steps_per_epoch(data), members)
            val = self.evaluate(model, data, data.val, self.limit_val_batches, members)
            test = [(None, None)] * members
            if data.test is not None:
                test = self.evaluate(model, data, data.test, self.limit_val_batches, members)
            seconds = time.perf_counter() - start
            step_losses = trained.step_losses()
            for n, member in enumerate(state.members):
                if member.failure is not None:
                    continue
                result = EpochResult(
                    epoch, *train[n], *val[n], lr, seconds, step_losses[n], *test[n]
                )
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
                    try:
                        on_epoch(n, result)
                    except GpoolError as error:  # its checkpoint could not be written...
                        if on_failure is None:
                            raise
                        member.failure = error  # ... it fails alone, with its own message
                        on_failure(n, error)
            if all(member.failure is not None for member in state.members):
                return

    def steps(
        self,
        model: nn.Module,
        state: TrainState,
        data: ImageData,
        on_eager: Callable[[str], None] | None = None,
    ) -> Steps:
        """How this fit runs its steps: captured once and replayed, or eagerly. Where
        capture fails (a CUDA error in its warm-up or the capture itself) and was not
        demanded (trainer.cuda_graph=true), the weights and optimiser state are put back
        as they were and the steps run eagerly, as an eager run's would: one warning,
        and `on_eager(why)`. Nothing has trained yet then; a failure later fails the run."""
        members, steps = len(state.members), self.steps_per_epoch(data)
        step = partial(self._step, model, state.optimizer, data, members)
        trained = TrainPass.zeros(
            members, min(len(data.train), steps * self.batch_size), self.device
        )
        if state.cuda_graph:
            model.train()
            log.info("capturing the training step as a CUDA graph")
            try:
                with restored_on_error(state):
                    return GraphedSteps(step, state, trained, steps, self.batch_size)
            except Exception as err:
                if self.cuda_graph == "true":
                    raise
                state.cuda_graph = False
                why = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
                log.warning("the training step could not be captured (%s): it runs eagerly", why)
                if on_eager is not None:
                    on_eager(why)
        return EagerSteps(step, state.optimizer, trained, self.batch_size)

    def _step(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: ImageData,
        members: int,
        index: Tensor,
        weight: Tensor | None,
        trained: TrainPass,
    ) -> Tensor:
        """Forward, backward and optimiser step on the images `index` ([members x batch]),
        accumulating loss and hits into `trained`; returns the members' losses. The loss is
        the sum of the members' mean losses, so each member's gradient is the one its own
        run would get. `weight` ([1, batch]; a padded fixed-size batch) replaces the mean
        by a weighted sum in which padding weighs 0."""
        x, y = data.batch(data.train, index)
        with self.autocast():
            logits = model(x)
            per_image = F.cross_entropy(logits, y, reduction="none").view(members, -1)
        hits = (logits.argmax(1) == y).view(members, -1)
        losses = per_image.mean(1) if weight is None else (per_image * weight).sum(1)
        losses.sum().backward()
        optimizer.step()
        losses = losses.detach()
        if weight is None:
            trained.loss_sum += losses * hits.shape[1]
            trained.correct += hits.sum(1)
        else:
            real = weight > 0
            trained.loss_sum += (per_image.detach() * real).sum(1)
            trained.correct += (hits & real).sum(1)
        return losses

    def _train_pass(
        self,
        model: nn.Module,
        steps: Steps,
        state: TrainState,
        data: ImageData,
        epoch: int,
        stop: Stop | None,
    ) -> TrainPass:
        """One epoch of steps, each member in its generator's order; a per-step scheduler
        steps too."""
        model.train()
        n, per_epoch = len(data.train), self.steps_per_epoch(data)
        orders = [
            torch.randperm(n, generator=m.generator) if self.shuffle else torch.arange(n)
            for m in state.members
        ]
        order = torch.stack(orders)[:, : per_epoch * self.batch_size].to(self.device)
        step_scheduler = state.scheduler if state.scheduler_interval == "step" else None
        first_step = (epoch - 1) * per_epoch
        bar = tqdm(range(per_epoch), desc=f"epoch {epoch}/{self.epochs}", leave=False, disable=None)
        trained = steps.begin(order)
        stands = (
            f"the checkpoint after epoch {epoch - 1} stands" if epoch > 1 else "no checkpoint yet"
        )
        try:
            for i in bar:
                if stop is not None:
                    stop.check(f"in epoch {epoch} ({stands})")
                losses = steps.step()
                if step_scheduler is not None:
                    step_scheduler.step()
                if (first_step + i + 1) % self.log_every_n_steps == 0:
                    trained.samples.append((first_step + i + 1, losses.clone()))
        finally:
            steps.end()
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
        n = self.scored(split, limit)
        loss_sum = torch.zeros(members, device=self.device)
        correct = torch.zeros(members, dtype=torch.int64, device=self.device)
        for logits, y in self._eval_batches(model, data, split, n, members):
            loss_sum += F.cross_entropy(logits, y, reduction="none").view(members, -1).sum(1)
            correct += (logits.argmax(1) == y).view(members, -1).sum(1)
        return [(s / n, c / n) for s, c in zip(loss_sum.tolist(), correct.tolist(), strict=True)]

    def scored(self, split: Split, limit: int | None) -> int:
        """How many images of `split` an evaluation scores: its first `limit` eval batches."""
        return min(len(split), (limit or len(split)) * self.eval_batch_size)

    @torch.inference_mode()
    def predict(self, model: nn.Module, data: ImageData, split: Split, n: int) -> Tensor:
        """The predicted class of the first `n` images of `split`, on the CPU."""
        batches = self._eval_batches(model, data, split, n)
        return torch.cat([logits.argmax(1) for logits, _ in batches]).cpu()
