"""gpool.stats against scipy and statsmodels where they implement the same test, and by
simulation with known truth where the claim is about error rates: the three-way decision's
error rates and interval coverage stay within their Monte-Carlo bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.weightstats import ttost_ind, ttost_paired

from gpool import stats

ALPHA = 0.05
#: Simulated sweeps per claim; the bound allows 3 Monte-Carlo standard errors.
SWEEPS = 4000


def bound(rate: float) -> float:
    return rate + 3 * math.sqrt(rate * (1 - rate) / SWEEPS)


def simulate(true_diff: float, n: int, margin: float, seed: int, paired: bool = True):
    """`SWEEPS` two-group comparisons of `n` seeds with a known difference (points): each
    seed's score is a shared seed effect plus each head's own noise, as real paired runs
    share initial weights and batch order. Returns (answers, intervals)."""
    rng = np.random.default_rng(seed)
    answers, intervals = [], []
    for _ in range(SWEEPS):
        shared = rng.normal(88.0, 0.45, n)
        a = shared + true_diff + rng.normal(0, 0.3, n)
        b = (shared if paired else rng.normal(88.0, 0.45, n)) + rng.normal(0, 0.3, n)
        d = stats.difference(a, b, paired)
        interval = d.interval(1 - ALPHA)
        answers.append(
            stats.decide(d.p_difference(), d.p_equivalence(margin), interval, margin, ALPHA)
        )
        intervals.append(interval)
    return np.array(answers), np.array(intervals)


def test_the_difference_matches_scipys_t_tests() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(88, 0.5, 6), rng.normal(87.5, 0.8, 6)
    paired = stats.difference(a, b, paired=True)
    expected = scipy_stats.ttest_rel(a, b)
    assert paired.diff / paired.se == pytest.approx(expected.statistic)
    assert paired.p_difference() == pytest.approx(expected.pvalue)
    welch = stats.difference(a, b[:4], paired=False)
    expected = scipy_stats.ttest_ind(a, b[:4], equal_var=False)
    assert welch.diff / welch.se == pytest.approx(expected.statistic)
    assert welch.p_difference() == pytest.approx(expected.pvalue)
    low, high = welch.interval(0.95)
    assert (low + high) / 2 == pytest.approx(welch.diff)
    assert math.isnan(stats.difference(a[:1], b, paired=False).p_difference())


@pytest.mark.parametrize("shift", [0.0, 0.3, 0.9])
def test_equivalence_matches_statsmodels_tost(shift: float) -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(88, 0.5, 8)
    b = a - shift + rng.normal(0, 0.3, 8)
    p_paired, _, _ = ttost_paired(a, b, -0.5, 0.5)
    assert stats.difference(a, b, True).p_equivalence(0.5) == pytest.approx(p_paired)
    p_welch, _, _ = ttost_ind(a, b[:6], -0.5, 0.5, usevar="unequal")
    assert stats.difference(a, b[:6], False).p_equivalence(0.5) == pytest.approx(p_welch)


def test_holm_adjustment_matches_its_definition() -> None:
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, max(2 x 0.03, .), max(1 x 0.04, 0.06)
    adjusted = stats.holm([0.01, 0.04, 0.03, math.nan])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(adjusted[3])


def test_the_three_answers() -> None:
    assert stats.decide(0.01, 0.5, (0.6, 2.0), 0.5, ALPHA) == stats.BETTER
    assert stats.decide(0.01, 0.01, (0.1, 0.4), 0.5, ALPHA) == stats.BETTER_WITHIN
    assert stats.decide(0.3, 0.01, (-0.2, 0.3), 0.5, ALPHA) == stats.EQUIVALENT
    assert stats.decide(0.3, 0.3, (-1.0, 1.5), 0.5, ALPHA) == stats.UNDECIDED
    assert stats.decide(math.nan, math.nan, (math.nan, math.nan), 0.5, ALPHA) == stats.UNDECIDED


@pytest.mark.parametrize("paired", [True, False], ids=["paired", "welch"])
def test_no_true_difference_is_called_better_in_at_most_alpha_of_sweeps(paired: bool) -> None:
    answers, intervals = simulate(0.0, n=5, margin=0.5, seed=3, paired=paired)
    called_better = np.isin(answers, [stats.BETTER, stats.BETTER_WITHIN]).mean()
    assert called_better <= bound(ALPHA)
    covered = ((intervals[:, 0] < 0) & (intervals[:, 1] > 0)).mean()
    assert abs(covered - 0.95) <= 0.015  # the 95 % interval covers the truth


def test_a_difference_of_twice_the_margin_is_called_equivalent_in_at_most_alpha() -> None:
    answers, intervals = simulate(1.0, n=5, margin=0.5, seed=4)
    assert (answers == stats.EQUIVALENT).mean() <= bound(ALPHA)
    covered = ((intervals[:, 0] < 1.0) & (intervals[:, 1] > 1.0)).mean()
    assert abs(covered - 0.95) <= 0.015


def test_at_the_tost_limit_equivalence_is_called_in_at_most_alpha() -> None:
    """The hardest case for TOST: a true difference exactly at the margin."""
    answers, _ = simulate(0.5, n=20, margin=0.5, seed=5)
    assert (answers == stats.EQUIVALENT).mean() <= bound(ALPHA)


@pytest.mark.parametrize("true_diff", [0.1, 1.0])
def test_the_seeds_to_decide_most_likely_decide(true_diff: float) -> None:
    """At the seed count it names for the spread and difference seen, a pair is decided
    (either way) in most sweeps: about the power it is computed for."""
    spread = math.sqrt(2) * 0.3  # the per-seed differences' std in `simulate`
    n = int(stats.seeds_to_decide(spread, true_diff, 0.5, True, ALPHA, 0.8))
    assert 2 <= n <= 40
    answers, _ = simulate(true_diff, n=n, margin=0.5, seed=6)
    assert (answers != stats.UNDECIDED).mean() >= 0.8 - 3 * math.sqrt(0.16 / SWEEPS)
    assert stats.seeds_to_decide(spread, 0.5, 0.5, True, ALPHA, 0.8) < math.inf
    assert math.isnan(stats.seeds_to_decide(0.0, 0.2, 0.5, True, ALPHA, 0.8))
