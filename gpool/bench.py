"""`python -m gpool.bench`: gpool's engine against the article's training loop, in turns.

Every side trains the same network (sigmoid outputs, xavier init, no shuffling) on the same
data with the same batch size, optimiser and learning rate, taking turns in one process so
that machine noise hits all. The article's loop comes twice: as published (a torchvision
dataset with `ToTensor` through a DataLoader, `loss.item()` every batch, an extra full pass
for training accuracy counted with Python's builtin `sum(predictions == labels).item()`,
then validation twice, once for the loss and once for the accuracy) and tidied (tensor
`.sum()`, one validation pass). Then gpool's Trainer (on a GPU with and without its CUDA
graph), and with `--fused N` N runs trained as one stacked model; `--compile MODE` adds
torch.compile's two first epochs. The last line printed is the ratio published reference /
gpool.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date

import torch
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from torchvision.transforms import ToTensor

from gpool.build import start
from gpool.config import build as build_object
from gpool.config import compose_config
from gpool.data import ImageData
from gpool.engine import Trainer, seed_everything
from gpool.model import PooledNet, build_model
from gpool.profiling import KINDS, profile_groups
from gpool.storebench import compare_over_server


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


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    return (
        f"{name}; {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; "
        f"torch {torch.__version__}; device {device}"
    )


def take_turns(rounds: int, sides: list[Callable[[], Measurement]]) -> dict[str, list[Measurement]]:
    results: dict[str, list[Measurement]] = {}
    for r in range(rounds):
        for side in sides:
            m = side()
            results.setdefault(m.name, []).append(m)
            print(f"round {r + 1}/{rounds} {m.name:22s} {m.seconds:7.2f} s", flush=True)
    return results


def report(results: dict[str, list[Measurement]], rounds: int) -> dict[str, float]:
    """The table of medians, with each side's ratio to gpool; returns the medians."""
    medians = {name: statistics.median(m.seconds for m in runs) for name, runs in results.items()}
    print(f"\n| loop | s/epoch (median of {rounds}) | images/s | peak memory MiB | vs gpool |")
    print("| --- | --- | --- | --- | --- |")
    for name, runs in results.items():
        rate = runs[0].images / medians[name]
        peak = max(m.peak_bytes for m in runs) / 2**20
        ratio = medians[name] / medians["gpool"]
        print(f"| {name} | {medians[name]:.2f} | {rate:,.0f} | {peak:.0f} | {ratio:.2f}x |")
    return medians


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of turns (medians reported)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training batches per epoch (default: the full epoch)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--pool", default="avg", choices=["avg", "max"])
    parser.add_argument(
        "--fused", type=int, default=0, help="also time N seeds fused into one model (0: skip)"
    )
    parser.add_argument(
        "--compile",
        default=None,
        metavar="MODE",
        help="also time two epochs with torch.compile(mode=MODE), e.g. reduce-overhead",
    )
    parser.add_argument(
        "--target-acc", type=float, default=0.87, help="val accuracy for the time-to-accuracy run"
    )
    parser.add_argument(
        "--tta-epochs",
        type=int,
        default=4,
        help="epochs of the quick recipe for time-to-accuracy (0: skip)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="only count one training step's operators and kernels by kind, for 1, 6 and 35 "
        "fused members (gpool.profiling), and exit",
    )
    parser.add_argument(
        "--compare",
        type=int,
        default=0,
        metavar="RUNS",
        help="only time gpool.compare of RUNS simulated runs over a local mlflow server and "
        "in sqlite (gpool.storebench), and exit",
    )
    parser.add_argument(
        "--no-end-to-end",
        action="store_true",
        help="skip timing a whole `python -m gpool.train` epoch",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides for every measured run, e.g. data_dir=/data dataset.checksums=null",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> float | None:
    args = arguments(argv)
    if args.profile:
        print_profile([f"trainer.device={args.device}", *args.overrides], argv)
        return None
    if args.compare:
        print_header(torch.device("cpu"), argv)
        return compare_over_server(args.compare, args.rounds)
    overrides = [
        "experiment=article",
        f"pool={args.pool}",
        "trainer.epochs=1",
        f"trainer.device={args.device}",
        "trainer.train_eval_pass=false",
    ]
    if args.steps is not None:
        overrides.append(f"trainer.limit_train_batches={args.steps}")
    cfg = compose_config(*overrides, *args.overrides)
    trainer: Trainer = instantiate(cfg.trainer)
    data = instantiate(cfg.dataset).load(trainer.device, trainer.channels_last)
    device = trainer.device
    print_header(device, argv)
    sides = [
        lambda: reference_epoch(cfg, device, args.steps, published=True),
        lambda: reference_epoch(cfg, device, args.steps, published=False),
        lambda: engine_epoch(cfg, data, trainer),
    ]
    if trainer.device.type == "cuda":  # what the CUDA graph adds: the same engine, eager
        eager: Trainer = instantiate(cfg.trainer, cuda_graph="false")
        sides.append(lambda: engine_epoch(cfg, data, eager, name="gpool eager"))
    if args.fused:
        sides.append(lambda: engine_epoch(cfg, data, trainer, args.fused))
    medians = report(take_turns(args.rounds, sides), args.rounds)
    extras(args, medians)
    if args.compile:
        first, second = compiled_epochs(cfg, data, args.compile)
        print(
            f"\ntorch.compile(mode={args.compile!r}), eager steps: epoch 1 {first:.2f} s "
            f"(compiling included), epoch 2 {second:.2f} s = "
            f"{second / medians['gpool']:.2f}x gpool's epoch"
        )
    ratio = medians["reference, published"] / medians["gpool"]
    print(f"\nspeed-up reference (as published)/gpool per epoch: {ratio:.2f}x")
    return ratio


def print_header(device: torch.device, argv: list[str] | None) -> None:
    """Machine, date and command: what makes a printed ratio a claim one can check."""
    print(f"machine: {machine(device)}")
    print(
        f"date: {date.today().isoformat()}; command: python -m gpool.bench "
        + " ".join(sys.argv[1:] if argv is None else argv)
    )


def print_profile(overrides: list[str], argv: list[str] | None) -> None:
    """The operator counts of one fused training step per group, as a Markdown table."""
    rows = profile_groups(overrides)
    device = build_object(compose_config(*overrides).trainer).device
    print_header(device, argv)
    print("\none eager training step: operator calls / kernels-to-be (gpool.profiling)\n")
    print("| members | " + " | ".join(KINDS) + " | all |")
    print("|---|" + "---|" * (len(KINDS) + 1))
    for label, counted in rows:
        cells = [f"{calls} / {kernels}" for calls, kernels in counted.values()]
        total = [sum(c[i] for c in counted.values()) for i in (0, 1)]
        print(f"| {label} | " + " | ".join(cells) + f" | {total[0]} / {total[1]} |")


def extras(args: argparse.Namespace, medians: dict[str, float]) -> None:
    """What the fused model, time to accuracy and a whole command add to the table."""
    if args.fused:
        fused, alone = medians[f"gpool fused x{args.fused}"], medians["gpool"]
        print(
            f"\nfused x{args.fused}: {fused / args.fused:.2f} s per run-epoch against "
            f"{alone:.2f} s for one run alone ({alone * args.fused / fused:.2f}x the throughput)"
        )
    if args.tta_epochs:
        epochs, seconds = time_to_accuracy(
            args.target_acc, args.tta_epochs, args.device, args.overrides
        )
        article = 60 * medians["reference, published"]
        if epochs is None:
            print(f"\ntime to val acc {args.target_acc}: not reached in {args.tta_epochs} epochs")
        else:
            print(
                f"\ntime to GAP val acc >= {args.target_acc} (experiment=quick): epoch {epochs}, "
                f"{seconds:.1f} s; the article's 60 epochs with its loop: ~{article:.0f} s "
                f"(60 x measured published reference epoch), {article / seconds:.0f}x sooner"
            )
    if not args.no_end_to_end:
        wall, tracking = end_to_end(args.steps, args.device, args.overrides)
        print(
            f"\nend to end: `python -m gpool.train trainer.epochs=1` took {wall:.1f} s wall; "
            f"MLflow calls {tracking:.2f} s ({100 * tracking / wall:.1f} %)"
        )


if __name__ == "__main__":
    main()
