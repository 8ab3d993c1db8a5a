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
import sys
from collections.abc import Callable
from datetime import date

import torch
from hydra.utils import instantiate

from gpool.bench.loops import (
    Measurement,
    compiled_epochs,
    end_to_end,
    engine_epoch,
    reference_epoch,
    time_to_accuracy,
)
from gpool.bench.profile import KINDS, profile_groups
from gpool.bench.server import compare_over_server
from gpool.bench.sweeps import compare_launches
from gpool.config import build as build_object
from gpool.config import compose_config
from gpool.engine import Trainer


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
    parser = argparse.ArgumentParser(
        prog="python -m gpool.bench", description=__doc__.split("\n\n")[0]
    )
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
        "fused members (gpool.bench.profile), and exit",
    )
    parser.add_argument(
        "--compare",
        type=int,
        default=0,
        metavar="RUNS",
        help="only time gpool.compare of RUNS simulated runs over a local mlflow server and "
        "in sqlite (gpool.bench.server), and exit",
    )
    parser.add_argument(
        "--sweep",
        type=int,
        default=0,
        metavar="STEPS",
        help="only time a sweep of 2 heads x 2 seeds (the quick recipe, STEPS batches an "
        "epoch, --sweep-epochs epochs) one job after another and side by side on every "
        "core, in turns (gpool.bench.sweeps), and exit",
    )
    parser.add_argument("--sweep-epochs", type=int, default=1, help="epochs of each job of --sweep")
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
    if args.sweep:
        print_header(torch.device("cpu"), argv)
        return compare_launches(args.sweep, args.sweep_epochs, args.rounds, args.overrides)
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
    print("\none eager training step: operator calls / kernels-to-be (gpool.bench.profile)\n")
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
