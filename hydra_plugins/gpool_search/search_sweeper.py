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

The search itself is gpool.search's, imported when the sweep runs: Hydra imports this
module for every command it starts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hydra.core.utils import JobReturn
from omegaconf import DictConfig

from gpool.sweepers import GroupSweeper


class SearchSweeper(GroupSweeper):
    """A Hydra sweeper: one Optuna study per group of the other factors, rounds of trials,
    each round one launch (gpool.search). Its settings are read from the sweep's config
    (hydra.sweeper), where its check reads them too."""

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
        super().__init__(params)

    @classmethod
    def check(cls, config: DictConfig) -> list[list[str]]:
        from gpool import search

        search.check(config)
        return super().check(config)

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        from gpool import search

        return search.search(self, arguments)
