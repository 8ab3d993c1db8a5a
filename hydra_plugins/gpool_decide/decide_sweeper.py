"""`hydra/sweeper=decide` (conf/hydra/sweeper/decide.yaml): a sweep that adds seeds until
its answer is known.

The sweep's other factors (`pool=avg,max`, ...) run over seeds in rounds: `first_round`
seeds per group, then `seeds_per_round` more, up to `max_seeds`. After each round, every
pair of groups is compared as `gpool.compare` does (better / equivalent within ±margin /
undecided), at the sequential level of gpool.stats.look_alpha; the sweep stops once every
pair is decided, or at `max_seeds`. A round is one launch, so any launcher works (fused
trains a round as one stacked model); a rerun skips the runs that finished and continues
where the last round stopped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from gpool import GpoolError, stats
from gpool.compare import compare_jobs
from gpool.sweep import DECIDED_TAG, schedule, sequential_alpha
from gpool.tracking import PARENT_RUN_ENV, store_uri, sweep_jobs

log = logging.getLogger(__name__)


class DecideSweeper(Sweeper):
    """A Hydra sweeper: rounds of seeds over the other factors' combinations, each round one
    launch, compared after each, stopped when decided."""

    def __init__(
        self,
        first_round: int,
        seeds_per_round: int,
        max_seeds: int,
        params: dict[str, str] | None = None,
    ) -> None:
        # The schedule is read from the config (gpool.sweep.schedule), where the sweep's
        # closing verdict reads it too; `params` are factors as in Hydra's basic sweeper.
        self.params = dict(params or {})
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        assert self.config is not None and self.launcher is not None
        plan = schedule(self.config)
        groups = self.groups([*(f"{k}={v}" for k, v in self.params.items()), *arguments])
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        alpha = sequential_alpha(self.config)
        returns: list[Sequence[JobReturn]] = []
        done = 0
        for n in plan:
            batch = [[*group, f"seed={s}"] for group in groups for s in range(done, n)]
            results = self.launcher.launch(batch, initial_job_idx=len(groups) * done)
            for result in results:
                _ = result.return_value  # a failed job fails the sweep, as Hydra's own do
            returns.append(results)
            done = n
            answers, line = self.compare(alpha)
            log.info("round of %d seeds per group: %s", n, line)
            if stats.decided(answers):
                self.record(f"after {n} seeds per group")
                log.info("decided after %d seeds per group (max_seeds %d)", n, plan[-1])
                return returns
        self.record(f"not decided at max_seeds={plan[-1]}")
        log.info("not decided at max_seeds=%d: raise hydra.sweeper.max_seeds", plan[-1])
        return returns

    @staticmethod
    def groups(arguments: list[str]) -> list[list[str]]:
        """Every combination of the other factors' values; the sweeper owns the seed."""
        overrides = OverridesParser.create().parse_overrides(arguments)
        if any(o.get_key_element() == "seed" for o in overrides):
            raise GpoolError(
                "hydra/sweeper=decide chooses the seeds itself (0, 1, ... in rounds): drop "
                "seed=... and set hydra.sweeper.max_seeds"
            )
        (combinations,) = BasicSweeper.split_arguments(overrides, None)
        if len(combinations) < 2:
            raise GpoolError(
                "hydra/sweeper=decide needs something to compare: sweep a factor over two "
                "or more values, e.g. pool=avg,max"
            )
        return combinations

    def compare(self, alpha: float) -> tuple[list[str], str]:
        """Every pair's answer and the verdict, on the sweep's runs so far."""
        assert self.config is not None
        client, parent = self.parent()
        comparison = compare_jobs(
            client,
            parent,
            sweep_jobs(client, parent),
            margin=self.config.compare.margin,
            alpha=alpha,
        )
        return [row["answer"] for row in comparison.pairs], comparison.line

    def parent(self) -> tuple[MlflowClient, Run]:
        assert self.config is not None
        client = MlflowClient(store_uri(self.config.mlflow.tracking_uri))
        return client, client.get_run(os.environ[PARENT_RUN_ENV])

    def record(self, outcome: str) -> None:
        client, parent = self.parent()
        client.set_tag(parent.info.run_id, DECIDED_TAG, outcome)
