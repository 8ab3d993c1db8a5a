"""`hydra/sweeper=search` (conf/hydra/sweeper/search.yaml): an Optuna search per group,
e.g. each head's learning rate and weight decay, judged on the held-out validation split.

Every combination of the other factors (`params`, the command line's `pool=avg,max`) is a
group with a study of its own (TPE, asked and told: Optuna's ask-and-tell interface). Each
round asks every study for `trials_per_launch` trials and launches them all at once, each
trial trained with `seeds` seeds; a trial's value is its seeds' mean final val acc. Any
launcher works; the fused launcher trains a trial's seeds as one model. The studies'
samplers share one seed, so every group starts from the same random trials (a paired
design), and on the fused launcher those trials of all heads train as one model. A trial
is an ordinary gpool job: nested under the sweep's MLflow run, skipped on a rerun once
FINISHED; a skipped job returns its logged value, so a rerun's seeded samplers ask the same
trials and only what is missing trains. The sweep's own verdict is `gpool.compare --tune`
over the searched keys: each group at its best trial on the validation split, judged on the
test split.

Built on Optuna's current API rather than Hydra's `hydra-optuna-sweeper`: its 1.3.0 pins
optuna < 3 (2.10.1, 2022), whose database storage fails against SQLAlchemy 2, and it has
one study for all groups, where each head needs its own.
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
from gpool.sweep import GroupSweeper, swept_keys

log = logging.getLogger(__name__)


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
        raise GpoolError("hydra/sweeper=search needs search keys: hydra.sweeper.search={...}")
    if "seed" in search:
        raise GpoolError(
            f"{SearchSweeper.name} chooses the seeds itself (0, 1, ... for each trial): drop "
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


class SearchSweeper(GroupSweeper):
    """A Hydra sweeper: one Optuna study per group of the other factors, rounds of trials,
    each round one launch."""

    name = "hydra/sweeper=search"

    def __init__(
        self,
        search: Mapping[str, str],
        trials: int,
        trials_per_launch: int,
        seeds: int,
        startup_trials: int,
        sampler_seed: int = 0,
        params: Mapping[str, str] | None = None,
    ) -> None:
        self.space = space(search)
        self.trials, self.per_launch, self.seeds = trials, trials_per_launch, seeds
        self.startup, self.sampler_seed = startup_trials, sampler_seed
        super().__init__(params)

    @classmethod
    def check(cls, config: DictConfig) -> list[list[str]]:
        settings = config.hydra.sweeper
        counts = (settings.trials, settings.trials_per_launch, settings.seeds)
        if min(*counts, settings.startup_trials) < 1:
            raise GpoolError(
                "hydra/sweeper=search needs trials, trials_per_launch, seeds and "
                "startup_trials >= 1"
            )
        space(settings.get("search") or {})
        if not config.dataset.get("holdout"):
            raise GpoolError(
                "hydra/sweeper=search picks values by validation accuracy: hold out part of "
                "the training set (dataset.holdout=5000), or it would tune on the test split"
            )
        return super().check(config)

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        assert self.config is not None and self.launcher is not None
        groups = self.groups(arguments)
        studies = [self.study() for _ in groups]
        returns: list[Sequence[JobReturn]] = []
        for first in range(0, self.trials, self.per_launch):
            count = min(self.per_launch, self.trials - first)
            asked = [
                (g, study.ask(self.space)) for g, study in enumerate(studies) for _ in range(count)
            ]
            batch = [
                [*groups[g], *self.overrides(trial), f"seed={seed}"]
                for g, trial in asked
                for seed in range(self.seeds)
            ]
            results = self.launcher.launch(batch, initial_job_idx=sum(map(len, returns)))
            returns.append(results)
            for n, (g, trial) in enumerate(asked):
                value = trial_value(results[n * self.seeds : (n + 1) * self.seeds])
                if value is None:
                    studies[g].tell(trial, state=optuna.trial.TrialState.FAIL)
                else:
                    studies[g].tell(trial, value)
        factors = swept_keys(self.config)
        for group, study in zip(groups, studies, strict=True):
            self.report([o for o in group if override_key(o) in factors], study)
        if failed := [r for results in returns for r in results if r.status != JobStatus.COMPLETED]:
            raise GpoolError(
                f"{self.name}: {len(failed)} of {sum(map(len, returns))} trial runs failed "
                f"(first: {failure(failed[0])}); each group's best trial is on the sweep's run"
            )
        return returns

    def study(self) -> optuna.Study:
        """A study that asks the same trials again given the same told values (a rerun)."""
        sampler = optuna.samplers.TPESampler(seed=self.sampler_seed, n_startup_trials=self.startup)
        return optuna.create_study(direction="maximize", sampler=sampler)

    @staticmethod
    def overrides(trial: optuna.trial.Trial) -> list[str]:
        """A trial's values as overrides, floats written exactly (`repr`): the config hash
        of a rerun's trial matches the first run's."""
        return [f"{key}={value!r}" for key, value in trial.params.items()]

    @staticmethod
    def report(group: list[str], study: optuna.Study) -> None:
        """The group's best trial in the log (the sweep's verdict follows from the store)."""
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not done:
            log.info("%s: no trial finished", " ".join(group))
            return
        best = study.best_trial
        values = " ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items()
        )
        log.info(
            "%s: best of %d trials %s, mean final val acc %.4f (%d failed)",
            " ".join(group) or "all runs",
            len(done),
            values,
            best.value,
            len(study.trials) - len(done),
        )
