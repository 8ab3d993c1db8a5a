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

from hydra.core.utils import JobReturn
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from gpool import stats
from gpool.compare import compare_jobs
from gpool.names import DECIDED_TAG, PARENT_RUN_ENV
from gpool.store import store_uri, sweep_jobs
from gpool.sweep import GroupSweeper, schedule, sequential_alpha

log = logging.getLogger(__name__)


class DecideSweeper(GroupSweeper):
    """A Hydra sweeper: rounds of seeds over the other factors' combinations, each round one
    launch, compared after each, stopped when decided."""

    name, least = "hydra/sweeper=decide", 2

    def __init__(
        self,
        first_round: int,
        seeds_per_round: int,
        max_seeds: int,
        params: dict[str, str] | None = None,
    ) -> None:
        # The schedule is read from the config (gpool.sweep.schedule), where the sweep's
        # closing verdict reads it too.
        super().__init__(params)

    @classmethod
    def check(cls, config: DictConfig) -> list[list[str]]:
        schedule(config)
        return super().check(config)

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        assert self.config is not None and self.launcher is not None
        plan = schedule(self.config)
        groups = self.groups(arguments)
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
