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
    launch, compared after each by its rule (gpool.sequential.Plan), stopped when every
    pair is answered or undecidable (gpool.decide)."""

    name, least = "hydra/sweeper=decide", 2

    def __init__(
        self,
        first_round: int,
        seeds_per_round: int,
        max_seeds: int,
        spending: str,
        futility: float,
        params: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(params)
        self.settings = {
            "first_round": first_round,
            "seeds_per_round": seeds_per_round,
            "max_seeds": max_seeds,
            "spending": spending,
            "futility": futility,
        }

    @classmethod
    def check(cls, config: DictConfig) -> list[list[str]]:
        from gpool.sequential import plan_of

        plan_of(config)
        return super().check(config)

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        from gpool import decide
        from gpool.sequential import Plan

        assert self.config is not None
        plan = Plan.of(self.settings, float(self.config.compare.margin))
        return decide.rounds(self, plan, arguments)
