"""When a sequential sweep (hydra/sweeper=decide) looks at its runs, and at which level
each look decides: pure computations on its settings and the scores seen, apart from the
rounds themselves (gpool.decide)."""

from __future__ import annotations

from omegaconf import DictConfig

from gpool import stats
from gpool.errors import GpoolError
from gpool.levels import ALPHA


def schedule(config: DictConfig) -> list[int]:
    """A decide sweep's seeds per group after each round (hydra/sweeper=decide), checked."""
    sweeper = config.hydra.sweeper
    first, per_round, most = sweeper.first_round, sweeper.seeds_per_round, sweeper.max_seeds
    if not (isinstance(first, int) and first >= 3):
        raise GpoolError(f"hydra.sweeper.first_round must be a whole number >= 3, not {first!r}")
    if not (isinstance(per_round, int) and per_round >= 1):
        raise GpoolError(f"hydra.sweeper.seeds_per_round must be >= 1, not {per_round!r}")
    if not (isinstance(most, int) and most >= first):
        raise GpoolError(f"hydra.sweeper.max_seeds must be >= first_round ({first}), not {most!r}")
    return stats.rounds(first, per_round, most)


def sequential_alpha(config: DictConfig) -> float:
    """The level a sweep's pairs are decided at: ALPHA, split over the planned rounds of a
    decide sweep, which looks after each (its closing verdict uses the same)."""
    if "max_seeds" not in config.hydra.sweeper:
        return ALPHA
    return stats.look_alpha(ALPHA, len(schedule(config)))
