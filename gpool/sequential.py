"""The decide sweeper's rule (hydra/sweeper=decide): when it looks at a pair's seeds, what a
look decides, and what is likely still to come. Pure computations on the sweep's settings
and the scores seen; the rounds themselves (launching, the store) are gpool.decide's.

A pair's difference at a look, d over n seeds a group, has the standard error of
gpool.stats.difference: se^2 = s^2 / n + v, the seeds' term and the test images' (v, which
more seeds do not shrink), and its degrees of freedom. A look at n seeds spends alpha by
the information fraction n / `max_seeds` (gpool.spending), also when it is not at a planned
seed count (an interrupted or widened sweep). The images make the looks more alike than
n / N says (the same test images every time: their information is 1 / se^2), which
boundaries for less alike looks only make stricter; setting the fractions from the image
share v / s^2 instead, estimated from the same few seeds as the statistic, spent more alpha
exactly when s^2 came out small, and the simulation found "better" in 6-7 % of sweeps with
no difference. The z boundaries become t ones at each look's degrees of freedom by matching
their tail probabilities; tests/test_sequential.py checks by simulation, small degrees of
freedom and the image term included, that the error rates hold.

- better: |d| / se >= the two-sided boundary (alpha over both tails);
- equivalent within ±margin: both one-sided tests of TOST pass their one-sided boundaries
  (alpha each, Schuirmann's two one-sided tests, sequentially: Jennison & Turnbull ch. 6);
- else undecided; and when its chance of being decided by N (conditional power at the
  difference and spread seen, by simulating the rest of the sweep: outlook) is below
  `futility`, "undecidable within N seeds". The futility stop is non-binding: the
  boundaries are computed as if the sweep never stopped for it, so the error rates hold.
With several pairs each is decided at alpha over the number of pairs (Bonferroni).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from omegaconf import DictConfig
from scipy.stats import norm
from scipy.stats import t as student_t

from gpool import stats
from gpool.errors import GpoolError
from gpool.levels import ALPHA, MARGIN
from gpool.spending import SPENDING, boundaries

#: Sweeps simulated forward from a look (outlook).
OUTLOOKS = 2000


@dataclass(frozen=True)
class Plan:
    """A decide sweep's settings (conf/hydra/sweeper/decide.yaml holds their defaults),
    checked."""

    first_round: int
    seeds_per_round: int
    max_seeds: int
    spending: str
    futility: float
    alpha: float = ALPHA
    margin: float = MARGIN

    def __post_init__(self) -> None:
        first, per_round, most = self.first_round, self.seeds_per_round, self.max_seeds
        key = "hydra.sweeper"
        if not (whole(first) and first >= 3):
            raise GpoolError(f"{key}.first_round must be a whole number >= 3, not {first!r}")
        if not (whole(per_round) and per_round >= 1):
            raise GpoolError(f"{key}.seeds_per_round must be >= 1, not {per_round!r}")
        if not (whole(most) and most >= first):
            raise GpoolError(f"{key}.max_seeds must be >= first_round ({first}), not {most!r}")
        if self.spending not in SPENDING:
            choices = ", ".join(SPENDING)
            raise GpoolError(f"{key}.spending must be one of {choices}, not {self.spending!r}")
        if isinstance(self.futility, bool) or not 0 <= self.futility < 1:
            raise GpoolError(f"{key}.futility must be in [0, 1), not {self.futility!r}")

    @classmethod
    def of(cls, settings: Mapping, margin: float = MARGIN) -> Plan:
        """From the sweeper's config node (hydra.sweeper) and compare.margin."""
        keys = ("first_round", "seeds_per_round", "max_seeds", "spending", "futility")
        return cls(**{k: settings[k] for k in keys}, margin=margin)

    def text(self) -> str:
        """The plan in words, as a decide sweep's run keeps it (names.PLAN_TAG)."""
        return (
            f"first_round={self.first_round} seeds_per_round={self.seeds_per_round} "
            f"max_seeds={self.max_seeds} spending={self.spending} futility={self.futility:g} "
            f"margin={self.margin:g}"
        )

    @classmethod
    def from_text(cls, text: str) -> Plan:
        """The plan `text` wrote (what a sweep's run says; GpoolError if it is no plan)."""
        try:
            values = dict(item.split("=", 1) for item in text.split())
            counts = ("first_round", "seeds_per_round", "max_seeds")
            settings = {key: int(values[key]) for key in counts}
            settings.update(spending=values["spending"], futility=float(values["futility"]))
            return cls(**settings, margin=float(values["margin"]))
        except (KeyError, ValueError) as err:
            raise GpoolError(f"{text!r} is no decide sweep's plan ({err})") from None

    def looks(self) -> list[int]:
        """Seeds per group at each planned look."""
        return stats.rounds(self.first_round, self.seeds_per_round, self.max_seeds)

    def taken(self, n: int) -> tuple[int, ...]:
        """The looks a sweep at n seeds a group has taken: the planned ones below n, and n."""
        return (*[m for m in self.looks() if m < n], n)


def whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@lru_cache(maxsize=1024)
def levels(plan: Plan, looks: tuple[int, ...], pairs: int) -> tuple[float, float]:
    """The nominal one-tail levels of the last of these looks: of the test of a difference
    (each tail) and of each one-sided test of equivalence, at alpha over `pairs` pairs."""
    alpha = plan.alpha / pairs
    t = [min(1.0, n / plan.max_seeds) for n in looks]
    planned = len(plan.looks())
    two = boundaries(t, alpha, 2, plan.spending, planned)[-1]
    one = boundaries(t, alpha, 1, plan.spending, planned)[-1]
    return float(norm.sf(two)), float(norm.sf(one))


@dataclass(frozen=True)
class Look:
    """What one look says of a pair: its answer, and the repeated confidence interval
    (over seeds and images) whose level the look's boundary sets."""

    answer: str
    low: float
    high: float
    level: float  # the interval's level: 1 - twice the difference test's nominal tail


def decide(d: stats.Difference, seeds: int, plan: Plan, pairs: int = 1) -> Look:
    """The answer a look at `seeds` seeds a group gives a pair with difference `d` (points:
    its se over seeds and images and its degrees of freedom), with the repeated confidence
    interval of its level."""
    if not d.testable:
        return Look(stats.UNDECIDED, math.nan, math.nan, math.nan)
    row = (np.array([d.diff]), np.array([d.se]), np.array([d.df]))
    (code,) = answers(*row, seeds, plan, pairs)
    tail, _ = levels(plan, plan.taken(seeds), pairs)
    reach = float(student_t.isf(tail, d.df)) * d.se
    low, high = d.diff - reach, d.diff + reach
    if code == 1:
        within = -plan.margin < low and high < plan.margin
        answer = stats.BETTER_WITHIN if within else stats.BETTER
    else:
        answer = stats.EQUIVALENT if code == 2 else stats.UNDECIDED
    return Look(answer, low, high, 1 - 2 * tail)


def answers(
    means: np.ndarray, se: np.ndarray, df: np.ndarray, m: int, plan: Plan, pairs: int
) -> np.ndarray:
    """The rule on arrays of looks at m seeds a group (differences, their standard errors
    and degrees of freedom): 1 better, 2 equivalent, 0 neither."""
    tails, ones = levels(plan, plan.taken(m), pairs)
    distance = np.abs(means)
    better = in_tail(distance / se, df, tails)
    equivalent = in_tail((plan.margin - distance) / se, df, ones)
    return np.where(better, 1, np.where(equivalent, 2, 0)).astype(np.int8)


def in_tail(statistic: np.ndarray, df: np.ndarray, tail: float) -> np.ndarray:
    """Whether each t statistic (of df degrees of freedom) lies in the upper `tail`, as
    `statistic >= t.isf(tail, df)` says, at a fraction of its cost (the outlook asks it of
    2,000 simulated sweeps a look): t's tail is heavier than the normal's at any df, so only
    statistics beyond the normal's quantile can be in it, and for those t's own tail
    probability decides (a quantile of t at a fractional df is a search; its tail is not)."""
    statistic, df = np.broadcast_arrays(statistic, df)
    hit = statistic >= norm.isf(tail)
    hit[hit] = student_t.sf(statistic[hit], df[hit]) <= tail
    return hit


@dataclass(frozen=True)
class Outlook:
    """What simulating the rest of a sweep from its look says (per pair, or per simulated
    sweep): the chance of each answer by max_seeds, and the seeds a group it will likely
    have run when it stops."""

    better: np.ndarray
    equivalent: np.ndarray
    seeds: np.ndarray

    @property
    def decided(self) -> np.ndarray:
        return self.better + self.equivalent


def outlook(
    n: int,
    means: np.ndarray,
    variances: np.ndarray,
    image_var: float | np.ndarray,
    plan: Plan,
    rng: np.random.Generator,
    pairs: int = 1,
    sims: int = OUTLOOKS,
) -> Outlook:
    """Conditional power and expected cost: `sims` continuations of sweeps that looked at n
    seeds a group and saw per-seed differences of these means and variances (points,
    arrays over sweeps), the true difference taken as the one seen, the test images'
    variance as estimated; each continues look by look (plan) by the same rule until
    decided or max_seeds."""
    means, variances = np.atleast_1d(means)[:, None], np.atleast_1d(variances)[:, None]
    image_var = np.broadcast_to(np.asarray(image_var, dtype=float), means.shape[:1])[:, None]
    shape = (len(means), sims)
    total = np.broadcast_to(means * n, shape).copy()
    squares = np.broadcast_to(variances * (n - 1) + n * means**2, shape).copy()
    code = np.zeros(shape, dtype=np.int8)  # 0 running, 1 better, 2 equivalent
    stopped = np.full(shape, plan.max_seeds, dtype=float)
    count = n
    for m in [m for m in plan.looks() if m > n]:
        added = m - count
        drawn = means + np.sqrt(variances / added) * rng.standard_normal(shape)
        within = variances * rng.chisquare(added - 1, shape) if added > 1 else 0.0
        total += added * drawn
        squares += within + added * drawn**2
        count = m
        answer = look_codes(
            total / m, (squares - total**2 / m) / (m - 1), image_var, m, plan, pairs
        )
        newly = (code == 0) & (answer > 0)
        code[newly], stopped[newly] = answer[newly], m
    return Outlook(
        (code == 1).mean(1),
        (code == 2).mean(1),
        np.where(code > 0, stopped, plan.max_seeds).mean(1),
    )


def look_codes(
    mean: np.ndarray, variance: np.ndarray, image_var: np.ndarray, m: int, plan: Plan, pairs: int
) -> np.ndarray:
    """`answers` for looks at m seeds a group given as per-seed means and variances of the
    paired differences (points) and the images' variance."""
    seed_term = np.maximum(variance / m, 1e-12)
    se2 = seed_term + image_var
    return answers(mean, np.sqrt(se2), (m - 1) * se2 / seed_term, m, plan, pairs)


def plan_of(config: DictConfig) -> Plan | None:
    """A decide sweep's plan, from its config (hydra.sweeper, compare.margin); None for a
    sweep of another sweeper."""
    sweeper = config.hydra.sweeper
    if "max_seeds" not in sweeper:
        return None
    return Plan.of(sweeper, float(config.compare.margin))
