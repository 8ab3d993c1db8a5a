"""How many of a launch's jobs run side by side on a CPU, and with how many torch threads each
(hydra/launcher=auto where it does not fuse): the rule of docs/performance.md. A batch-64
step of gpool's small networks does not scale past a few threads, so separate processes use
the cores better than one process with all of them; but each parallel worker first imports
torch, MLflow and Hydra, which short jobs never pay back. So: every core busy (one job per
core, extra cores shared among the jobs as threads) once the launch's training is long
enough to pay a worker's start-up; one job after another, with every core, otherwise."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

#: Training steps (batches) a launch must hold, over all its jobs, for parallel workers to
#: pay their start-up: measured with `python -m gpool.bench --sweep` (docs/performance.md).
PAYS_FROM_STEPS = 2000
#: Steps in an epoch whose length the config does not say (no limit_train_batches): what
#: FashionMNIST's 60,000 images make at batch 64; any full epoch of a real dataset is long.
FULL_EPOCH_STEPS = 938
#: Where a cgroup (v2) states the CPU time this process may use: "quota period", or "max".
CGROUP_CPU = Path("/sys/fs/cgroup/cpu.max")


@dataclass(frozen=True)
class Choice:
    """Jobs side by side, torch threads for each (None: torch's own choice, all cores),
    and why."""

    jobs: int
    threads: int | None
    why: str


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask, cut by a cgroup CPU quota
    (a container's --cpus), not just the machine's count."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = CGROUP_CPU.read_text().split()
        if quota != "max":
            cores = min(cores or 1, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores or 1)


def job_steps(config: DictConfig) -> int:
    """The training steps one job of this config takes: epochs x steps an epoch."""
    trainer = config.trainer
    per_epoch = trainer.get("limit_train_batches") or FULL_EPOCH_STEPS
    return int(trainer.epochs) * int(per_epoch)


def choose(jobs: int, steps: int, cores: int, wanted: int | None = None) -> Choice:
    """The rule, for a launch of `jobs` jobs of `steps` training steps each on `cores`
    cores; `wanted` (hydra.launcher.jobs) overrides how many run side by side."""
    if wanted is not None:
        side = max(1, min(wanted, jobs))
        return Choice(side, threads(cores, side), f"hydra.launcher.jobs={wanted}")
    if cores < 2 or jobs < 2:
        return Choice(1, None, f"{jobs} job(s) on {cores} core(s): nothing to run side by side")
    if jobs * steps < PAYS_FROM_STEPS:
        return Choice(
            1,
            None,
            f"{jobs} jobs of {steps} steps are too short to pay the start-up of parallel "
            f"workers (from {PAYS_FROM_STEPS} steps a launch)",
        )
    side = min(jobs, cores)
    return Choice(
        side,
        threads(cores, side),
        f"{jobs} jobs of {steps} steps on {cores} usable cores: {side} side by side, "
        f"{threads(cores, side)} torch thread(s) each",
    )


def threads_unset(config: DictConfig) -> bool:
    """Whether the sweep leaves trainer.threads to gpool (its resolver), so that the
    launcher may give each job the threads it chose (an override, which no config hash
    counts)."""
    unresolved = OmegaConf.to_container(config.trainer, resolve=False)
    return str(unresolved.get("threads")) == "${gpool.threads:}"


def threads(cores: int, side: int) -> int:
    """Torch threads for each of `side` jobs sharing `cores`."""
    return max(1, cores // side)
