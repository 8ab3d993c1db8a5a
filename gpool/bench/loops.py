"""The loops `python -m gpool.bench` times against each other: the article's training loop
(as published and tidied), gpool's engine (one run, or N fused), torch.compile's first
epochs, the time to an accuracy, and a whole `python -m gpool.train` epoch."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from torchvision.transforms import ToTensor

from gpool.build import start
from gpool.config import build as build_object
from gpool.config import compose_config
from gpool.engine import Trainer, seed_everything
from gpool.images import ImageData
from gpool.model import PooledNet, build_model


@dataclass
class Measurement:
    name: str
    seconds: float
    images: int
    peak_bytes: int


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: torch.device) -> Iterator[list[int]]:
    """Yields a list that holds, afterwards, the peak memory the block added: CUDA
    allocations on a GPU, resident set size (sampled every 5 ms) on the CPU."""
    result = [0]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result[0] = torch.cuda.max_memory_allocated() - before
        return
    before = resident_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], resident_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        result[0] = max(peak[0], resident_bytes()) - before


def fresh_model(cfg: DictConfig, seed: int) -> PooledNet:
    seed_everything(seed)
    return build_model(cfg)


def accuracy_pass(
    model: torch.nn.Module,
    loader: DataLoader,
    limit: int | None,
    published: bool,
    device: torch.device,
) -> int:
    """Correct predictions over a loader, counted as the article did (builtin `sum` over the
    elements) or with one tensor `.sum()`."""
    correct = 0
    with torch.no_grad():
        for i, (x, y) in enumerate(loader):
            if limit is not None and i >= limit:
                break
            predicted = torch.argmax(model(x.to(device)), dim=1)
            hits = predicted == y.to(device)
            correct += sum(hits).item() if published else hits.sum().item()
    return correct


def loss_pass(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> float:
    """The article's separate validation pass for the loss."""
    criterion, total = torch.nn.CrossEntropyLoss(), 0.0
    with torch.no_grad():
        for x, y in loader:
            total += criterion(model(x.to(device)), y.to(device)).item()
    return total


def reference_epoch(
    cfg: DictConfig, device: torch.device, steps: int | None, published: bool
) -> Measurement:
    """The article's loop: per-sample ToTensor through a DataLoader, as published or tidied."""
    source = instantiate(cfg.dataset.source)
    loaders = [
        DataLoader(source(root=cfg.dataset.root, train=train, transform=ToTensor()), 64)
        for train in (True, False)
    ]
    model = fresh_model(cfg, cfg.seed)
    model.initialise(cfg.trainer.init)
    model.to(device)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    criterion = torch.nn.CrossEntropyLoss()
    images = 0
    with peak_memory(device) as peak:
        start = time.perf_counter()
        model.train()
        for i, (x, y) in enumerate(loaders[0]):
            if steps is not None and i >= steps:
                break
            optimizer.zero_grad()
            loss = criterion(model(x.to(device)), y.to(device))
            loss.backward()
            optimizer.step()
            loss.item()
            images += x.shape[0]
        accuracy_pass(model, loaders[0], steps, published, device)
        if published:
            loss_pass(model, loaders[1], device)
        accuracy_pass(model, loaders[1], None, published, device)
        seconds = time.perf_counter() - start
    return Measurement(
        "reference, published" if published else "reference, tidied", seconds, images, peak[0]
    )


def engine_epoch(
    cfg: DictConfig, data: ImageData, trainer: Trainer, runs: int = 1, name: str = "gpool"
) -> Measurement:
    """One epoch of gpool's engine: one run, or `runs` seeds fused into one stacked model.
    A CUDA graph is captured before the epoch's clock starts (once per run, < 1 s)."""
    state = start(trainer, data, [cfg_with_seed(cfg, seed) for seed in range(runs)])
    with peak_memory(trainer.device) as peak:
        trainer.fit(state, data)
    result = state.members[0].history[0]
    images = min(len(data.train), trainer.steps_per_epoch(data) * trainer.batch_size) * runs
    return Measurement(
        name if runs == 1 else f"{name} fused x{runs}", result.epoch_seconds, images, peak[0]
    )


def compiled_epochs(cfg: DictConfig, data: ImageData, mode: str) -> list[float]:
    """Two epochs' seconds with torch.compile(mode=...) instead of gpool's own CUDA graph:
    the first includes compiling."""
    trainer: Trainer = instantiate(cfg.trainer, epochs=2, compile=mode, cuda_graph="false")
    state = start(trainer, data, [cfg])
    trainer.fit(state, data)
    return [r.epoch_seconds for r in state.members[0].history]


def cfg_with_seed(cfg: DictConfig, seed: int) -> DictConfig:
    copy = cfg.copy()
    copy.seed = seed
    return copy


def time_to_accuracy(
    target: float, epochs: int, device: str, overrides: list[str]
) -> tuple[int | None, float]:
    """Epochs and training seconds until GAP's val acc reaches `target` with the quick recipe
    (Adam + one-cycle); (None, seconds) if it never does within `epochs`."""
    cfg = compose_config(
        "experiment=quick", f"trainer.epochs={epochs}", f"trainer.device={device}", *overrides
    )
    trainer: Trainer = instantiate(cfg.trainer)
    data = build_object(cfg.dataset).load(trainer.device, trainer.channels_last)
    state = start(trainer, data, [cfg])
    elapsed = 0.0
    reached: list[int] = []

    def watch(member: int, result) -> None:
        nonlocal elapsed
        if not reached:
            elapsed += result.epoch_seconds
            if result.val_acc >= target:
                reached.append(result.epoch)

    trainer.fit(state, data, on_epoch=watch)
    return (reached[0] if reached else None), elapsed


def end_to_end(steps: int | None, device: str, overrides: list[str]) -> tuple[float, float]:
    """Wall seconds of one `python -m gpool.train` epoch and the seconds its MLflow calls took."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            sys.executable,
            "-m",
            "gpool.train",
            "trainer.epochs=1",
            f"trainer.device={device}",
            f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
            f"hydra.run.dir={tmp}/run",
            *overrides,
        ]
        if steps is not None:
            args.append(f"trainer.limit_train_batches={steps}")
        start = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - start
        client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
        (run,) = client.search_runs([client.get_experiment_by_name("gpool").experiment_id])
        return wall, run.data.metrics["mlflow_seconds"]
