"""`hydra/sweeper=decide` (conf/hydra/sweeper/decide.yaml): a sweep that adds seeds until
its answer is known.

The sweep's other factors (`pool=avg,max`, ...) run over seeds in rounds: `first_round`
seeds per group, then `seeds_per_round` more, up to `max_seeds`. After each round, every
pair of groups is compared as `gpool.compare` does (better / equivalent within ±margin /
undecided), at the sequential level of gpool.stats.look_alpha; the sweep stops once every
pair is decided, or at `max_seeds`. A round is one launch, so any launcher works (fused
trains a round as one stacked model); a rerun skips the runs that finished and continues
where the last round stopped.

The rounds are gpool.decide's and the rule gpool.sequential's, imported when the sweep
runs: Hydra imports this module for every command it starts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hydra.core.utils import JobReturn
from omegaconf import DictConfig

from gpool.sweepers import GroupSweeper


class DecideSweeper(GroupSweeper):
    """A Hydra sweeper: rounds of seeds over the other factors' combinations, each round one
    launch, compared after each, stopped when decided (gpool.decide). Its settings are
    read from the sweep's config (hydra.sweeper), where the sweep's closing verdict and
    its check read them too."""

    name, least = "hydra/sweeper=decide", 2

    def __init__(self, params: Mapping[str, str] | None = None, **settings: object) -> None:
        super().__init__(params)

    @classmethod
    def check(cls, config: DictConfig) -> list[list[str]]:
        from gpool.sequential import schedule

        schedule(config)
        return super().check(config)

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        from gpool import decide

        return decide.rounds(self, arguments)
