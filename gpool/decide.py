"""The rounds of the decide sweeper (hydra/sweeper=decide, hydra_plugins/gpool_decide):
launch the seeds a round adds, compare the sweep's runs by its rule (gpool.sequential),
say what each pair will likely cost from here (the planner), and stop when every pair is
answered or undecidable, or at max_seeds. Each round's numbers go to the log and, as
metrics with the round's seed count as step, to the sweep's MLflow run."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence

from hydra.core.utils import JobReturn
from mlflow.entities import Metric, Run
from mlflow.tracking import MlflowClient

from gpool import stats
from gpool.compare.comparison import Comparison, compare_jobs
from gpool.compare.publish import metric_key
from gpool.compare.render import outlook_line
from gpool.errors import GpoolError
from gpool.names import DECIDED_TAG, PARENT_RUN_ENV, PLAN_TAG
from gpool.sequential import Plan
from gpool.store import store_uri, sweep_jobs
from gpool.sweepers import GroupSweeper

log = logging.getLogger(__name__)


def rounds(sweeper: GroupSweeper, plan: Plan, arguments: list[str]) -> list[Sequence[JobReturn]]:
    """The sweep: a look after each round of seeds (plan.looks), until every pair is
    settled or max_seeds. A rerun takes the same looks, training only the seeds no earlier
    run finished, and comes to the same answers (the rule and the planner's simulation are
    deterministic)."""
    assert sweeper.config is not None and sweeper.launcher is not None
    groups = sweeper.groups(arguments)
    client, parent = sweep_run(sweeper.config)
    client.set_tag(parent.info.run_id, PLAN_TAG, plan.text())
    log.info("decide sweep: %s", plan.text())
    plan_ahead(client, parent, plan)
    returns: list[Sequence[JobReturn]] = []
    done, launched, going = 0, 0, groups
    for n in plan.looks():
        batch = [[*group, f"seed={s}"] for group in going for s in range(done, n)]
        results = sweeper.launcher.launch(batch, initial_job_idx=launched)
        for result in results:
            _ = result.return_value  # a failed job fails the sweep, as Hydra's own do
        returns.append(results)
        done, launched = n, launched + len(batch)
        comparison = compare(client, parent, plan, n)
        report(client, parent.info.run_id, n, comparison)
        if stats.decided(found := answers(comparison)):
            outcome = settled(found, n)
            record(client, parent.info.run_id, outcome)
            log.info("%s (max_seeds %d)", outcome, plan.max_seeds)
            return returns
        going = still_open(groups, comparison)
    record(client, parent.info.run_id, f"not decided at max_seeds={plan.max_seeds}")
    log.info("not decided at max_seeds=%d: raise hydra.sweeper.max_seeds", plan.max_seeds)
    return returns


def still_open(groups: list[list[str]], comparison: Comparison) -> list[list[str]]:
    """The groups the next round runs: all of them, or over several tasks those of the
    tasks with a pair still open (a group is its task's when it holds the task's override,
    e.g. dataset=translated); a task settled at its look keeps its answer at later looks,
    as its runs do not change."""
    settled = comparison.settled_tasks()
    going = [g for g in groups if not any(label in g for label in settled)]
    if len(going) < len(groups):
        log.info("settled, no more seeds: %s", ", ".join(sorted(settled)))
    return going


def plan_ahead(client: MlflowClient, parent: Run, plan: Plan) -> None:
    """Before the first launch, the planner from the runs this sweep already has (a
    rerun's), or word that it speaks after the first look."""
    try:
        comparison = compare(client, parent, plan)
    except GpoolError:  # no finished runs yet
        log.info("the planner speaks after the first look, at %d seeds a group", plan.first_round)
        return
    seeds = min(len(group.runs) for group in comparison.groups)
    for pair in comparison.pairs:
        log.info("before this run, from %d seeds a group: %s", seeds, outlook_line(pair, seeds))


def answers(comparison: Comparison) -> list[str]:
    return [pair.answer for pair in comparison.pairs]


def settled(found: Sequence[str], seeds: int) -> str:
    """How a settled sweep ended: every pair decided, every pair undecidable, or (over
    several pairs or tasks) how many of each, so that one undecidable pair does not read
    as the whole sweep's outcome."""
    undecidable = list(found).count(stats.UNDECIDABLE)
    if undecidable in (0, len(found)):
        outcome = "undecidable" if undecidable else "decided"
    else:
        decided = len(found) - undecidable
        outcome = f"settled ({decided} of {len(found)} pairs decided, {undecidable} undecidable)"
    return f"{outcome} after {seeds} seeds per group"


def compare(client: MlflowClient, parent: Run, plan: Plan, seeds: int | None = None) -> Comparison:
    """The sweep's runs of its first `seeds` seeds (all, if None), each pair answered by
    the plan's rule: a rerun's look at n seeds sees what the first run's saw."""
    parent = client.get_run(parent.info.run_id)  # the jobs recorded on it since
    first = {str(seed) for seed in range(seeds or 0)}
    jobs = [
        job
        for job in sweep_jobs(client, parent)
        if seeds is None or job.data.params.get("seed") in first
    ]
    return compare_jobs(client, parent, jobs, margin=plan.margin, plan=plan)


def report(client: MlflowClient, run_id: str, n: int, comparison: Comparison) -> None:
    """A round in the log (each pair's answer, interval and outlook) and on the sweep's
    run: per pair its difference, repeated interval, P(decided by max_seeds) and the seeds
    a group it will likely run, at step n."""
    log.info("look at %d seeds per group: %s", n, comparison.line)
    now = int(time.time() * 1000)
    metrics = []
    for pair in comparison.pairs:
        log.info("  %s", outlook_line(pair, n))
        values = {
            "diff": pair.diff,
            "ci_low": pair.ci_low,
            "ci_high": pair.ci_high,
            "p_decided": pair.p_decided,
            "expected_seeds": pair.expected_seeds,
        }
        name = f"{pair.a} vs {pair.b}"
        metrics += [
            Metric(metric_key(name, key), value, now, n)
            for key, value in values.items()
            if not math.isnan(value)
        ]
    client.log_batch(run_id, metrics=metrics)


def sweep_run(config) -> tuple[MlflowClient, Run]:
    """The sweep's parent run (SweepTracking made it) and a client of its store."""
    client = MlflowClient(store_uri(config.mlflow.tracking_uri))
    return client, client.get_run(os.environ[PARENT_RUN_ENV])


def record(client: MlflowClient, run_id: str, outcome: str) -> None:
    client.set_tag(run_id, DECIDED_TAG, outcome)
