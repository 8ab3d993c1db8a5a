"""The rounds of the decide sweeper (hydra/sweeper=decide, hydra_plugins/gpool_decide):
launch the seeds a round adds, compare the sweep's runs, stop when decided; when and at
which level it looks is gpool.sequential's."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from hydra.core.utils import JobReturn
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from gpool import stats
from gpool.compare.comparison import compare_jobs
from gpool.names import DECIDED_TAG, PARENT_RUN_ENV
from gpool.sequential import schedule, sequential_alpha
from gpool.store import store_uri, sweep_jobs
from gpool.sweepers import GroupSweeper

log = logging.getLogger(__name__)


def rounds(sweeper: GroupSweeper, arguments: list[str]) -> list[Sequence[JobReturn]]:
    """The sweep: each round launches the seeds the schedule adds for every group, then
    compares the sweep's runs; it stops once every pair is decided, or at max_seeds."""
    assert sweeper.config is not None and sweeper.launcher is not None
    plan = schedule(sweeper.config)
    groups = sweeper.groups(arguments)
    alpha = sequential_alpha(sweeper.config)
    returns: list[Sequence[JobReturn]] = []
    done = 0
    for n in plan:
        batch = [[*group, f"seed={s}"] for group in groups for s in range(done, n)]
        results = sweeper.launcher.launch(batch, initial_job_idx=len(groups) * done)
        for result in results:
            _ = result.return_value  # a failed job fails the sweep, as Hydra's own do
        returns.append(results)
        done = n
        answers, line = compare(sweeper.config, alpha)
        log.info("round of %d seeds per group: %s", n, line)
        if stats.decided(answers):
            record(sweeper.config, f"after {n} seeds per group")
            log.info("decided after %d seeds per group (max_seeds %d)", n, plan[-1])
            return returns
    record(sweeper.config, f"not decided at max_seeds={plan[-1]}")
    log.info("not decided at max_seeds=%d: raise hydra.sweeper.max_seeds", plan[-1])
    return returns


def compare(config: DictConfig, alpha: float) -> tuple[list[str], str]:
    """Every pair's answer and the verdict, on the sweep's runs so far."""
    client, parent = sweep_run(config)
    jobs = sweep_jobs(client, parent)
    comparison = compare_jobs(client, parent, jobs, margin=config.compare.margin, alpha=alpha)
    return [pair.answer for pair in comparison.pairs], comparison.line


def sweep_run(config: DictConfig) -> tuple[MlflowClient, Run]:
    """The sweep's parent run (SweepTracking made it) and a client of its store."""
    client = MlflowClient(store_uri(config.mlflow.tracking_uri))
    return client, client.get_run(os.environ[PARENT_RUN_ENV])


def record(config: DictConfig, outcome: str) -> None:
    client, parent = sweep_run(config)
    client.set_tag(parent.info.run_id, DECIDED_TAG, outcome)
