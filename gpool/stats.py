"""The statistics behind gpool.compare's verdicts, as pure functions on arrays of scores
(no MLflow, no files): the difference of two groups with its interval, the test of "no
difference", the two one-sided tests (TOST) of "equivalent within ±margin", Holm's
adjustment over a family of pairs, the three-way decision, and the seeds a group would need.

Scores are per seed; two groups that ran the same seeds are compared paired (run s of A and
run s of B share initial weights and batch order), otherwise by Welch's unequal-variance t.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower
from statsmodels.tools.sm_exceptions import ConvergenceWarning

#: The three answers for a pair, and the qualified first one.
BETTER, BETTER_WITHIN, EQUIVALENT, UNDECIDED = (
    "better",
    "better, by less than the margin",
    "equivalent",
    "undecided",
)


@dataclass(frozen=True)
class Difference:
    """Mean of A minus mean of B, with the standard error and degrees of freedom of its t
    statistic; NaN throughout when a side has fewer than two scores."""

    diff: float
    se: float
    df: float
    paired: bool

    @property
    def testable(self) -> bool:
        return self.se > 0 and self.df > 0

    def interval(self, level: float) -> tuple[float, float]:
        """The two-sided `level` confidence interval of the difference."""
        if not self.testable:
            return math.nan, math.nan
        half = float(stats.t.ppf(0.5 + level / 2, self.df)) * self.se
        return self.diff - half, self.diff + half

    def p_difference(self) -> float:
        """Two-sided p-value of "A and B have the same mean"."""
        if not self.testable:
            return math.nan
        return float(2 * stats.t.sf(abs(self.diff) / self.se, self.df))

    def p_equivalence(self, margin: float) -> float:
        """TOST p-value of "the means differ by at least `margin`": the larger of the two
        one-sided p-values (below -margin, above +margin). Below alpha exactly when the
        1 - 2 alpha interval lies inside (-margin, +margin)."""
        if not self.testable:
            return math.nan
        above_lower = float(stats.t.sf((self.diff + margin) / self.se, self.df))
        below_upper = float(stats.t.cdf((self.diff - margin) / self.se, self.df))
        return max(above_lower, below_upper)


def difference(a: np.ndarray, b: np.ndarray, paired: bool) -> Difference:
    """A - B: of the per-seed differences when paired (a[i] and b[i] share seed i), else
    Welch's, with the Welch-Satterthwaite degrees of freedom."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    if min(len(a), len(b)) < 2:
        return Difference(diff, math.nan, math.nan, paired)
    if paired:
        d = a - b
        return Difference(diff, float(d.std(ddof=1) / math.sqrt(len(d))), len(d) - 1.0, True)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se2 = va + vb
    if se2 == 0:
        return Difference(diff, 0.0, math.nan, False)
    df = se2**2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return Difference(diff, float(math.sqrt(se2)), float(df), False)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values over the tested ones (NaN stays NaN)."""
    tested = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    adjusted = [math.nan] * len(p_values)
    if tested:
        _, corrected, _, _ = multipletests([p_values[i] for i in tested], method="holm")
        for i, p in zip(tested, corrected, strict=True):
            adjusted[i] = float(p)
    return adjusted


def decide(
    p_difference: float,
    p_equivalence: float,
    interval: tuple[float, float],
    margin: float,
    alpha: float,
) -> str:
    """The answer for one pair from its family-adjusted p-values: better (the difference's
    interval excludes 0; qualified when the whole interval lies inside ±margin), equivalent
    (TOST), or undecided."""
    if p_difference < alpha:
        low, high = interval
        return BETTER_WITHIN if -margin < low and high < margin else BETTER
    if p_equivalence < alpha:
        return EQUIVALENT
    return UNDECIDED


def detectable(spread: float, n_a: int, n_b: int, paired: bool, alpha: float, power: float):
    """The smallest difference (in the scores' unit) these seeds detect with `power` at
    `alpha`, given the spread (of the per-seed differences when paired, else pooled); NaN
    with fewer than two seeds a side or no spread."""
    if min(n_a, n_b) < 2 or not spread > 0:
        return math.nan
    if paired:
        effect = TTestPower().solve_power(nobs=n_a, alpha=alpha, power=power)
    else:
        effect = TTestIndPower().solve_power(nobs1=n_a, ratio=n_b / n_a, alpha=alpha, power=power)
    return float(effect) * spread


def solve_seeds(
    effect: float, paired: bool, alpha: float, power: float, alternative: str = "two-sided"
) -> float:
    """Seeds per group (pairs, when paired) for a t-test to find a standardised `effect`
    with `power` at `alpha`. statsmodels' root finder gives up on effects far larger than
    any sample needs (NaN): those need the fewest seeds a t-test can use, 2."""
    solver = TTestPower() if paired else TTestIndPower()
    with warnings.catch_warnings():  # its failure is handled here, not printed to the user
        warnings.simplefilter("ignore", ConvergenceWarning)
        n = solver.solve_power(
            effect_size=effect, alpha=alpha, power=power, alternative=alternative
        )
    n = float(np.asarray(n).item())
    if math.isnan(n):
        return 2.0 if effect > 1 else math.nan
    return float(max(2, math.ceil(n)))


def seeds_needed(spread: float, diff: float, paired: bool, alpha: float, power: float) -> float:
    """Seeds per group for the test of a difference to detect `diff` with `power` at
    `alpha`, given the spread (NaN when it is unknown)."""
    if not spread > 0 or not abs(diff) > 0:
        return math.nan
    return solve_seeds(abs(diff) / spread, paired, alpha, power)


def seeds_to_decide(
    spread: float, diff: float, margin: float, paired: bool, alpha: float, power: float
) -> float:
    """Seeds per group that would most likely decide the pair, either way, if the true
    difference were the one seen (with the spread seen): the fewer of what the test of a
    difference needs to detect |diff| and what TOST needs to show equivalence with a true
    difference |diff| < margin (its power is that of the one-sided test on the nearer
    bound). NaN when the spread is unknown; inf when neither can decide (|diff| = margin)."""
    if not spread > 0 or math.isnan(diff):
        return math.nan
    needs = [seeds_needed(spread, diff, paired, alpha, power)]
    if abs(diff) < margin:
        effect = (margin - abs(diff)) / spread
        needs.append(solve_seeds(effect, paired, alpha, power, alternative="larger"))
    needs = [n for n in needs if math.isfinite(n)]
    return min(needs) if needs else math.inf


def rounds(first: int, per_round: int, most: int) -> list[int]:
    """Seeds per group after each round of a sequential sweep: `first`, then `per_round`
    more each round, the last round cut at `most`."""
    return [*range(first, most, per_round), most] if first < most else [most]


def look_alpha(alpha: float, looks: int) -> float:
    """The level each look of a sequential sweep decides at: a Bonferroni split of `alpha`
    over the planned looks, so that the chance of any wrong answer (better where there is
    no difference, or equivalent where there is one past the margin) over all looks stays
    below `alpha`, however the looks depend on each other."""
    return alpha / looks


def decided(answers: Sequence[str]) -> bool:
    """Whether every pair has an answer: the stopping rule of a sequential sweep."""
    return all(answer != UNDECIDED for answer in answers)
