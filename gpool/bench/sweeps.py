"""`python -m gpool.bench --sweep STEPS`: one small sweep, its jobs one after another and side
by side on this machine's cores (hydra/launcher=auto with hydra.launcher.jobs=1 and =cores),
in turns, each a whole `python -m gpool.train -m` in its own store: what the CPU rule of
gpool.parallel stands on, and what it chooses for that sweep."""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time

from gpool import parallel


def sweep_seconds(side_by_side: int, steps: int, epochs: int, overrides: list[str]) -> float:
    """Wall seconds of the quick recipe's 2 heads x 2 seeds at `steps` training batches an
    epoch, `side_by_side` jobs at a time, from a fresh store."""
    with tempfile.TemporaryDirectory(prefix="gpool-bench-sweep-") as tmp:
        args = [
            sys.executable,
            "-m",
            "gpool.train",
            "-m",
            "experiment=quick",
            "pool=avg,max",
            "seed=0,1",
            f"trainer.epochs={epochs}",
            f"trainer.limit_train_batches={steps}",
            f"hydra.launcher.jobs={side_by_side}",
            f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
            f"checkpoint_dir={tmp}/checkpoints",
            f"hydra.sweep.dir={tmp}/sweep",
            *overrides,
        ]
        start = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True, text=True)
        return time.perf_counter() - start


def compare_launches(steps: int, epochs: int, rounds: int, overrides: list[str]) -> float:
    """Both ways in turns, `rounds` times; prints the table and the rule's choice, returns
    the ratio of medians (one after another / side by side)."""
    cores = parallel.usable_cores()
    ways = {"one after another": 1, f"{cores} side by side": cores}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(rounds):
        for name, side in ways.items():
            seconds[name].append(sweep_seconds(side, steps, epochs, overrides))
            print(f"round {r + 1}/{rounds} {name:20s} {seconds[name][-1]:7.1f} s", flush=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"\n| 4 jobs of {epochs} x {steps} steps | wall s (median of {rounds}) |")
    print("| --- | --- |")
    for name, median in medians.items():
        print(f"| {name} | {median:.1f} |")
    choice = parallel.choose(4, epochs * steps, cores)
    print(f"\nhydra/launcher=auto would run {choice.jobs} at a time: {choice.why}")
    sequential, side = medians["one after another"], medians[f"{cores} side by side"]
    print(f"speed-up side by side / one after another: {sequential / side:.2f}x")
    return sequential / side
