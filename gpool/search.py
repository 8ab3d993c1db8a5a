"""The Optuna search behind hydra/sweeper=search (hydra_plugins/gpool_search): the search
space from Hydra's sweep grammar, one study per group, rounds of trials launched and told,
each group's best trial reported. Imported where the sweep runs, not by Hydra's plugin
scan: Optuna takes half a second to import.

Built on Optuna's current API (ask and tell) rather than Hydra's `hydra-optuna-sweeper`:
its 1.3.0 pins optuna < 3 (2.10.1, 2022), whose database storage fails against
SQLAlchemy 2, and it has one study for all groups, where each head needs its own.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig

from gpool.config import override_key
from gpool.errors import GpoolError
from gpool.sweepers import GroupSweeper, swept_keys

log = logging.getLogger(__name__)

#: How messages name the sweeper.
NAME = "hydra/sweeper=search"


def distribution(key: str, expression: str) -> optuna.distributions.BaseDistribution:
    """An Optuna distribution from Hydra's sweep grammar: `interval(a, b)`, `tag(log,
    interval(a, b))` or `choice(x, y, ...)`."""
    (override,) = OverridesParser.create().parse_overrides([f"{key}={expression}"])
    value = override.value()
    if isinstance(value, IntervalSweep):
        return optuna.distributions.FloatDistribution(
            value.start, value.end, log="log" in value.tags
        )
    if isinstance(value, ChoiceSweep):
        return optuna.distributions.CategoricalDistribution(value.list)
    raise GpoolError(
        f"hydra.sweeper.search.{key}: {expression!r} is no search space; use interval(a, b), "
        "tag(log, interval(a, b)) or choice(x, y, ...)"
    )


def space(search: Mapping[str, str]) -> dict[str, optuna.distributions.BaseDistribution]:
    """The search space of hydra.sweeper.search: key -> distribution; the seed is the
    sweeper's own (each trial trains `seeds` of them), never searched."""
    if not search:
        raise GpoolError(f"{NAME} needs search keys: hydra.sweeper.search={...}")
    if "seed" in search:
        raise GpoolError(
            f"{NAME} chooses the seeds itself (0, 1, ... for each trial): drop "
            "seed from hydra.sweeper.search and set hydra.sweeper.seeds"
        )
    return {key: distribution(key, str(text)) for key, text in search.items()}


def trial_value(returns: Sequence[JobReturn]) -> float | None:
    """A trial's value: its seeds' mean final val acc; None when a seed failed or diverged."""
    values = [r.return_value for r in returns if r.status == JobStatus.COMPLETED]
    if len(values) < len(returns) or not all(math.isfinite(v) for v in values):
        return None
    return sum(values) / len(values)


def failure(job: JobReturn) -> str:
    """A failed job's overrides and its error's first line."""
    error = job._return_value
    return f"{' '.join(job.overrides or [])}: {str(error).splitlines()[0] if error else '?'}"


def check(config: DictConfig) -> None:
    """Refuse settings the search cannot run with, in one line (see GroupSweeper.check)."""
    settings = config.hydra.sweeper
    counts = (settings.trials, settings.trials_per_launch, settings.seeds)
    if min(*counts, settings.startup_trials) < 1:
        raise GpoolError(f"{NAME} needs trials, trials_per_launch, seeds and startup_trials >= 1")
    space(settings.get("search") or {})
    if not config.dataset.get("holdout"):
        raise GpoolError(
            f"{NAME} picks values by validation accuracy: hold out part of the training set "
            "(dataset.holdout=5000), or it would tune on the test split"
        )


def search(sweeper: GroupSweeper, arguments: list[str]) -> list[Sequence[JobReturn]]:
    """The sweep: per group of the other factors a study, asked `trials_per_launch` trials a
    round, each trained with `seeds` seeds in one launch and told its value; then each
    group's best in the log. Ends non-zero (GpoolError) once every trial ran, if any of
    their runs failed."""
    assert sweeper.config is not None and sweeper.launcher is not None
    settings = sweeper.config.hydra.sweeper
    trials, per_launch, seeds = settings.trials, settings.trials_per_launch, settings.seeds
    searched = space(settings.search)
    groups = sweeper.groups(arguments)
    studies = [study(settings.sampler_seed, settings.startup_trials) for _ in groups]
    returns: list[Sequence[JobReturn]] = []
    for first in range(0, trials, per_launch):
        count = min(per_launch, trials - first)
        asked = [(g, one.ask(searched)) for g, one in enumerate(studies) for _ in range(count)]
        batch = [
            [*groups[g], *overrides(trial), f"seed={seed}"]
            for g, trial in asked
            for seed in range(seeds)
        ]
        results = sweeper.launcher.launch(batch, initial_job_idx=sum(map(len, returns)))
        returns.append(results)
        for n, (g, trial) in enumerate(asked):
            value = trial_value(results[n * seeds : (n + 1) * seeds])
            if value is None:
                studies[g].tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                studies[g].tell(trial, value)
    factors = swept_keys(sweeper.config)
    for group, one in zip(groups, studies, strict=True):
        report([o for o in group if override_key(o) in factors], one)
    if failed := [r for results in returns for r in results if r.status != JobStatus.COMPLETED]:
        raise GpoolError(
            f"{NAME}: {len(failed)} of {sum(map(len, returns))} trial runs failed "
            f"(first: {failure(failed[0])}); each group's best trial is on the sweep's run"
        )
    return returns


def study(sampler_seed: int, startup_trials: int) -> optuna.Study:
    """A study that asks the same trials again given the same told values (a rerun)."""
    sampler = optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=startup_trials)
    return optuna.create_study(direction="maximize", sampler=sampler)


def overrides(trial: optuna.trial.Trial) -> list[str]:
    """A trial's values as overrides, floats written exactly (`repr`): the config hash of a
    rerun's trial matches the first run's."""
    return [f"{key}={value!r}" for key, value in trial.params.items()]


def report(group: list[str], one: optuna.Study) -> None:
    """The group's best trial in the log (the sweep's verdict follows from the store)."""
    done = [t for t in one.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        log.info("%s: no trial finished", " ".join(group))
        return
    best = one.best_trial
    values = " ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items()
    )
    log.info(
        "%s: best of %d trials %s, mean final val acc %.4f (%d failed)",
        " ".join(group) or "all runs",
        len(done),
        values,
        best.value,
        len(one.trials) - len(done),
    )
