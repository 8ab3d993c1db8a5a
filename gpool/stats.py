"""The statistics behind gpool.compare's verdicts, as pure functions on arrays of scores
(no MLflow, no files): the difference of two groups with its interval, the test of "no
difference", the two one-sided tests (TOST) of "equivalent within ±margin", Holm's
adjustment over a family of pairs, the three-way decision, the seeds a group would need,
and the probability of improvement P(A > B) with its bootstrap interval.

Scores are per seed; two groups that ran the same seeds are compared paired (run s of A and
run s of B share initial weights and batch order), otherwise by Welch's unequal-variance t.
Every run is scored on the same test images, a sample too: given each run's per-image
scores ([seeds x images]), the interval covers both sources, seeds and images (a crossed
design: the variance sum of two-way random-effects ANOVA, and a two-way bootstrap).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

#: The most seeds a group is ever said to need: past it no seed count decides.
MOST_SEEDS = 10_000
#: Bootstrap resamples behind the interval of P(A > B).
RESAMPLES = 2000
#: The most bootstrap weights (float32) held at once: 64 MB.
BLOCK_FLOATS = 2**24

#: The three answers for a pair, and the qualified first one.
BETTER, BETTER_WITHIN, EQUIVALENT, UNDECIDED = (
    "better",
    "better, by less than the margin",
    "equivalent",
    "undecided",
)
#: A sequential sweep's pair that stopped taking seeds: unlikely to be decided by its
#: max_seeds (gpool.sequential, the futility stop).
UNDECIDABLE = "undecidable"
#: The first two from the other group's side: its answer against a better group.
WORSE, WORSE_WITHIN = "worse", "worse, by less than the margin"


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


def difference(a: np.ndarray, b: np.ndarray, paired: bool, image_var: float = 0.0) -> Difference:
    """A - B: of the per-seed differences when paired (a[i] and b[i] share seed i), else
    Welch's; plus `image_var`, the test images' share of the variance (image_variance),
    which more seeds do not shrink. The degrees of freedom are the seed term's, scaled by
    how much the images add to the variance (df x total / seed term): Satterthwaite's
    square of that ratio, with the ratio estimated from 3 seeds, covers 91.5 % where 95 %
    is due, this 93.7 % to 96 % from 3 to 20 seeds (tests/test_stats.py simulates it)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    if min(len(a), len(b)) < 2:
        return Difference(diff, math.nan, math.nan, paired)
    if paired:
        d = a - b
        seed_var, seed_df = d.var(ddof=1) / len(d), len(d) - 1.0
    else:
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        seed_var = va + vb
        seed_df = seed_var**2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if seed_var else 0
    se2 = seed_var + image_var
    if se2 == 0:
        return Difference(diff, 0.0, math.nan, paired)
    df = seed_df * se2 / seed_var if seed_var > 0 else math.inf
    return Difference(diff, float(math.sqrt(se2)), float(df), paired)


def residual_mean_square(scores: np.ndarray) -> float:
    """The seed x image interaction of a [seeds x images] array: its mean square once the
    seeds' and the images' means are taken out."""
    residual = scores - scores.mean(1, keepdims=True) - scores.mean(0) + scores.mean()
    seeds, images = scores.shape
    return float((residual**2).sum() / ((seeds - 1) * (images - 1)))


def image_variance(a: np.ndarray, b: np.ndarray, paired: bool) -> float:
    """The test images' share of the variance of mean(A) - mean(B), given per-image scores
    [seeds x images] of both groups on the same images (rows aligned by seed when
    paired). The seed term (per-run means) already holds the seed x image interaction; the
    images add what the per-image mean difference varies beyond it (two-way random-effects
    ANOVA), over the number of images; 0 when that is not measurable, NaN with fewer than
    two seeds a side."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if min(len(a), len(b)) < 2:
        return math.nan
    if paired:
        d = a - b
        beyond = d.mean(0).var(ddof=1) - residual_mean_square(d) / len(d)
    else:
        interaction = residual_mean_square(a) / len(a) + residual_mean_square(b) / len(b)
        beyond = (a.mean(0) - b.mean(0)).var(ddof=1) - interaction
    return max(0.0, float(beyond)) / a.shape[1]


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values over the tested ones (NaN stays NaN): the i-th smallest of m
    times (m - i), made non-decreasing, at most 1. Written out rather than statsmodels'
    multipletests, which runs a full garbage collection on every call (0.1 s in a
    comparison, more in a sweep's big process)."""
    tested = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    adjusted = [math.nan] * len(p_values)
    order = sorted(tested, key=lambda i: p_values[i])
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[i]))
        adjusted[i] = running
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


def power_solver(paired: bool) -> Any:
    """statsmodels' power of the paired (one-sample) or the two-sample t-test. Imported
    here: statsmodels takes ~0.9 s to import, and every gpool process imports this module
    (Hydra's plugin scan) while only comparisons need it."""
    from statsmodels.stats.power import TTestIndPower, TTestPower

    return TTestPower() if paired else TTestIndPower()


def detectable(
    spread: float,
    n_a: int,
    n_b: int,
    paired: bool,
    alpha: float,
    power: float,
    image_var: float = 0.0,
) -> float:
    """The smallest difference (in the scores' unit) these seeds detect with `power` at
    `alpha`, given the spread (of the per-seed differences when paired, else pooled) and
    the images' variance; NaN with fewer than two seeds a side or no spread."""
    if min(n_a, n_b) < 2 or not spread > 0:
        return math.nan
    solver = power_solver(paired)
    if paired:
        effect, per_seed = solver.solve_power(nobs=n_a, alpha=alpha, power=power), 1 / n_a
    else:
        effect = solver.solve_power(nobs1=n_a, ratio=n_b / n_a, alpha=alpha, power=power)
        per_seed = 1 / n_a + 1 / n_b
    return float(effect) * math.sqrt(spread**2 + image_var / per_seed)


def seeds_for(
    diff: float,
    spread: float,
    paired: bool,
    alpha: float,
    power: float,
    image_var: float = 0.0,
    alternative: str = "two-sided",
) -> float:
    """Seeds per group (pairs, when paired) at which a t-test finds `diff` with `power` at
    `alpha`, given the spread per seed and the images' variance. More seeds shrink only
    the seed term, so this is a search over seed counts up to MOST_SEEDS (power grows with
    them: bisection); inf past it (the images' noise alone, or a tiny difference, keeps
    the pair open)."""

    solver = power_solver(paired)

    def reaches(n: int) -> bool:
        """Whether n seeds give `power`; statsmodels' NaN comes where it is all but 1."""
        effect = abs(diff) / math.sqrt(spread**2 + n * image_var / (1 if paired else 2))
        if paired:
            got = solver.power(effect, n, alpha, alternative=alternative)
        else:
            got = solver.power(effect, n, alpha, 1.0, alternative=alternative)
        return not got < power

    if not reaches(MOST_SEEDS):
        return math.inf
    low, high = 1, MOST_SEEDS  # reaches(high); a t-test needs at least 2 seeds
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if reaches(middle) else (middle, high)
    return float(max(2, high))


def seeds_needed(
    spread: float, diff: float, paired: bool, alpha: float, power: float, image_var: float = 0.0
) -> float:
    """Seeds per group for the test of a difference to detect `diff` with `power` at
    `alpha`, given the spread (NaN when it is unknown)."""
    if not spread > 0 or not abs(diff) > 0:
        return math.nan
    return seeds_for(diff, spread, paired, alpha, power, image_var)


def seeds_to_decide(
    spread: float,
    diff: float,
    margin: float,
    paired: bool,
    alpha: float,
    power: float,
    image_var: float = 0.0,
) -> float:
    """Seeds per group that would most likely decide the pair, either way, if the true
    difference were the one seen (with the spread and image variance seen): the fewer of
    what the test of a difference needs to detect |diff| and what TOST needs to show
    equivalence with a true difference |diff| < margin (its power is that of the one-sided
    test on the nearer bound). NaN when the spread is unknown; inf when neither can
    decide (|diff| at the margin, or the images' noise alone too large)."""
    if not spread > 0 or math.isnan(diff):
        return math.nan
    needs = [seeds_needed(spread, diff, paired, alpha, power, image_var)]
    if abs(diff) < margin:
        gap = margin - abs(diff)
        needs.append(seeds_for(gap, spread, paired, alpha, power, image_var, "larger"))
    needs = [n for n in needs if math.isfinite(n)]
    return min(needs) if needs else math.inf


def improvement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """P(A > B): the chance that a run of A scores above a run of B, ties counting half,
    over every pair of their runs (the probability of improvement of Agarwal et al.,
    NeurIPS 2021); along the last axis, so that resamples stack in front."""
    a, b = np.asarray(a)[..., :, None], np.asarray(b)[..., None, :]
    return (a > b).mean((-2, -1)) + 0.5 * (a == b).mean((-2, -1))


def image_resampled(scores: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Each run's mean score in RESAMPLES bootstrap draws of the images: per [runs x
    images] array of `scores` (all on the same images), [draws x runs]. The same draws
    serve every array, as every run saw the same images; with seed_resampled after it, the
    two-way bootstrap of a crossed design (Owen 2007), mildly conservative. Draws are made
    as counts per image, row after row, and used in blocks of at most BLOCK_FLOATS, so that
    memory stays bounded whatever the number of images; the counts and 0/1 scores sum
    exactly in float32 (below 2**24 images), so blocks give what one product would."""
    images = scores[0].shape[1]
    rows = max(1, BLOCK_FLOATS // images)
    transposed = [s.T.astype(np.float32) for s in scores]
    out = [np.empty((RESAMPLES, s.shape[0]), dtype=np.float32) for s in scores]
    for start in range(0, RESAMPLES, rows):
        weights = np.empty((min(rows, RESAMPLES - start), images), dtype=np.float32)
        for row in weights:
            row[:] = np.bincount(rng.integers(images, size=images), minlength=images)
        for drawn, t in zip(out, transposed, strict=True):
            drawn[start : start + len(weights)] = weights @ t / images
    return out


def seed_resampled(
    runs_a: np.ndarray, runs_b: np.ndarray, paired: bool, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The seeds resampled within each draw (the same ones for both groups when paired):
    [RESAMPLES x seeds] each, from per-run scores, one row per draw ([RESAMPLES x seeds],
    the images resampled by image_resampled) or one for all (seeds alone)."""
    runs_a = np.broadcast_to(runs_a, (RESAMPLES, np.shape(runs_a)[-1]))
    runs_b = np.broadcast_to(runs_b, (RESAMPLES, np.shape(runs_b)[-1]))
    pick_a = rng.integers(runs_a.shape[1], size=runs_a.shape)
    pick_b = pick_a if paired else rng.integers(runs_b.shape[1], size=runs_b.shape)
    return np.take_along_axis(runs_a, pick_a, 1), np.take_along_axis(runs_b, pick_b, 1)


def improvement_interval(
    runs_a: np.ndarray, runs_b: np.ndarray, paired: bool, level: float, seed: int = 0
) -> tuple[float, float]:
    """The percentile bootstrap interval of P(A > B), from per-run scores with or without
    the images' draws (see seed_resampled); the same for a given `seed`."""
    rng = np.random.default_rng(seed)
    resampled = improvement(*seed_resampled(runs_a, runs_b, paired, rng))
    low, high = np.quantile(resampled, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def stratified_interval(
    strata: Sequence[tuple[np.ndarray, np.ndarray, bool]], level: float, seed: int = 0
) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean over strata (tasks) of each stratum's
    mean difference A - B, each stratum resampled on its own (its seeds, and its images
    where given as draws; see seed_resampled): strata are independent experiments, so a
    draw never mixes one task's runs into another's. A stratum is (runs_a, runs_b, paired)
    with per-run scores, or their images' draws [RESAMPLES x seeds]."""
    rng = np.random.default_rng(seed)
    means = [
        np.subtract(*(drawn.mean(-1) for drawn in seed_resampled(a, b, paired, rng)))
        for a, b, paired in strata
    ]
    low, high = np.quantile(np.mean(means, axis=0), [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def rounds(first: int, per_round: int, most: int) -> list[int]:
    """Seeds per group after each round of a sequential sweep: `first`, then `per_round`
    more each round, the last round cut at `most`."""
    return [*range(first, most, per_round), most] if first < most else [most]


def decided(answers: Sequence[str]) -> bool:
    """Whether every pair is settled, answered or undecidable: when a sequential sweep
    stops."""
    return all(answer != UNDECIDED for answer in answers)
