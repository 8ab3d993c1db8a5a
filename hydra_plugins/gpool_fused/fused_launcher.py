"""`hydra/launcher=fused` (conf/hydra/launcher/fused.yaml): a sweep's jobs that differ only
in their seeds and heads train in one process as one stacked model
(gpool.stacking.StackedModel), each still its own Hydra job with its own output folder,
checkpoint and MLflow run. `hydra/launcher=auto`, gpool's default, fuses only where that
pays (a CUDA GPU) and otherwise runs the jobs one after another, as Hydra's basic launcher.

Jobs are grouped by their overrides other than the `fuse` keys. A group trains as one
model when its optimiser updates elementwise with one step count (Adam, AdamW, SGD), so
that one optimiser over the stacked parameters equals one per run, and its network keeps
no state besides its weights (no BatchNorm); otherwise its jobs run one after another, and
the log says why (gpool.fusing, imported when the sweep launches).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
from omegaconf import DictConfig, open_dict

from gpool.config import check_values, override_key
from gpool.errors import GpoolError

if TYPE_CHECKING:  # imported where jobs run (gpool.fusing): Hydra's plugin scan imports this
    # module for every command, which should not pay for torch, MLflow and torchvision
    from gpool.job import Job

log = logging.getLogger(__name__)


def fusable(key: str) -> bool:
    """Keys that may differ inside a group: the seed and the head. Anything else (an lr, an
    optimiser, the data) would couple members or change their shapes."""
    return key in ("seed", "pool") or key.startswith("pool.")


def check_fuse(fuse: Sequence[str]) -> None:
    """Refuse `fuse` keys that cannot differ inside a group (see fusable)."""
    if refused := [key for key in fuse if not fusable(key)]:
        raise GpoolError(
            f"hydra.launcher.fuse: {', '.join(refused)} cannot differ inside a fused group "
            "(only seed, pool and pool.* can); jobs that differ in them run in separate groups"
        )


class FusedLauncher(Launcher):
    """A Hydra launcher: compose every job, group them, train each group, and return one
    JobReturn per job, as Hydra's own launchers do."""

    def __init__(self, fuse: Sequence[str] = ("seed", "pool")) -> None:
        check_fuse(fuse)
        self.fuse = list(fuse)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    @staticmethod
    def check(config: DictConfig) -> None:
        """Refuse settings it cannot launch with, before the sweep's run exists."""
        check_fuse(config.hydra.launcher.fuse)
        if config.hydra.sweeper.get("max_batch_size"):
            raise GpoolError(
                "hydra.sweeper.max_batch_size hands the launcher the sweep in batches, which "
                "would split fused groups; leave it null with hydra/launcher=fused"
            )

    def fused(self, key: str) -> bool:
        """Whether an override of `key` may differ inside a group."""
        return any(key == f or key.startswith(f"{f}.") for f in self.fuse)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.check(config)
        self.config = config
        self.hydra_context = hydra_context

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from gpool.fusing import train_fused

        setup_globals()
        assert self.config is not None
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        prepared = [
            self.prepare(initial_job_idx + i, list(overrides))
            for i, overrides in enumerate(job_overrides)
        ]
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        ready = [i for i, r in enumerate(prepared) if r.status == JobStatus.COMPLETED]

        def rest(i: int) -> list[str]:  # what must be equal inside a group
            return sorted(o for o in job_overrides[i] if not self.fused(override_key(o)))

        for _, group in itertools.groupby(sorted(ready, key=rest), key=rest):
            indices = list(group)
            outcomes = train_fused([prepared[i].return_value for i in indices])
            for i, outcome in zip(indices, outcomes, strict=True):
                failed = isinstance(outcome, Exception)
                prepared[i].status = JobStatus.FAILED if failed else JobStatus.COMPLETED
                prepared[i].return_value = outcome
        return prepared

    def prepare(self, idx: int, overrides: list[str]) -> JobReturn:
        """Compose job `idx` and make its output folder (Hydra's `.hydra/` files in it);
        its JobReturn carries the Job, or why it cannot run."""
        assert self.config is not None and self.hydra_context is not None
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx

        def compose(cfg: DictConfig) -> Job:
            from gpool.job import Job

            check_values(cfg)
            return Job(cfg, HydraConfig.get())

        return run_job(
            hydra_context=self.hydra_context,
            task_function=compose,
            config=sweep_config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )


class AutoLauncher(Launcher):
    """`hydra/launcher=auto`, the default: the fused launcher where fusing pays (a CUDA GPU);
    on a CPU, each launch's jobs side by side in worker processes (Hydra's joblib launcher)
    or one after another (Hydra's basic launcher), by the rule of gpool.parallel; the log
    says which and why. Either way every job is its own Hydra job and MLflow run with the
    same config hash, so a rerun skips finished jobs whichever way they were trained. An
    explicit hydra/launcher=... replaces it."""

    def __init__(self, fuse: Sequence[str] = ("seed", "pool"), jobs: int | None = None) -> None:
        self.fused = FusedLauncher(fuse)
        self.jobs = jobs
        self.fusing = True
        self.launchers: dict[int, Launcher] = {}
        self.context: dict[str, Any] = {}

    @staticmethod
    def check(config: DictConfig) -> None:
        """Refuse settings it could never launch with, before the sweep's run exists."""
        check_fuse(config.hydra.launcher.fuse)
        jobs = config.hydra.launcher.get("jobs")
        if jobs is not None and not (isinstance(jobs, int) and jobs >= 1):
            raise GpoolError(f"hydra.launcher.jobs must be a whole number >= 1, not {jobs!r}")

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from gpool.fusing import reasons_against_fusing

        self.context = {
            "hydra_context": hydra_context,
            "task_function": task_function,
            "config": config,
        }
        if reasons := reasons_against_fusing(config):
            log.info("the sweep's jobs do not train fused: %s", "; ".join(reasons))
            self.fusing = False
            return
        log.info(
            "jobs that differ only in %s train fused, on the GPU (hydra/launcher=basic "
            "runs them one after another)",
            " and ".join(self.fused.fuse),
        )
        self.fused.setup(**self.context)

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        if self.fusing:
            return self.fused.launch(job_overrides, initial_job_idx)
        from gpool import parallel

        config = self.context["config"]
        steps = parallel.job_steps(config)
        choice = parallel.choose(len(job_overrides), steps, parallel.usable_cores(), self.jobs)
        side = "one after another" if choice.jobs == 1 else f"{choice.jobs} jobs side by side"
        log.info("%s: %s", side, choice.why)
        if choice.threads is not None and parallel.threads_unset(config):
            job_overrides = [[*o, f"trainer.threads={choice.threads}"] for o in job_overrides]
        return self.on_cpu(choice.jobs).launch(job_overrides, initial_job_idx)

    def on_cpu(self, jobs: int) -> Launcher:
        """Hydra's joblib launcher with `jobs` workers (loky's, reused from launch to
        launch), or its basic launcher for one."""
        if jobs not in self.launchers:
            launcher = BasicLauncher() if jobs == 1 else JoblibLauncher(n_jobs=jobs)
            launcher.setup(**self.context)
            self.launchers[jobs] = launcher
        return self.launchers[jobs]
