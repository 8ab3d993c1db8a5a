"""The verdict on plain arrays (gpool.compare.samples): each pair's difference with its
interval over seeds and test images, the tests of a difference and of equivalence,
Holm-adjusted over the pairs, P(A > B), the seeds that would decide, and the three-way
answer (gpool.stats), as a frozen PairResult per pair; then the sentence that leads a
report."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from gpool import sequential, stats
from gpool.compare.samples import Pair, Sample, image_draws, leaders
from gpool.levels import ALPHA, MARGIN, POWER
from gpool.sequential import Plan


@dataclass(frozen=True)
class PairResult:
    """One pair's numbers and answer, A - B in points of accuracy: what reports show and
    sweepers read. `flipped` gives the same pair from B's side."""

    a: str
    b: str
    diff: float
    ci_low: float
    ci_high: float
    ci_level: float  # the interval's level: 1 - alpha, or a sequential look's (repeated)
    covers: str  # what the interval covers: seeds alone, or seeds and N images
    seeds_alone_because: str  # why not the images too ("" when it covers them)
    test: str  # paired t or Welch
    t: float
    p: float
    p_equivalence: float
    p_improvement: float  # P(A > B), with its interval
    p_improvement_low: float
    p_improvement_high: float
    detectable: float  # the smallest difference these seeds detect with POWER
    seeds_to_decide: float  # seeds a group that would most likely decide it
    seeds_needed: float | None = None  # ... to detect gpool.compare --detect's difference
    p_holm: float = math.nan
    p_equivalence_holm: float = math.nan
    answer: str = stats.UNDECIDED
    #: Under a sequential rule, the chance of an answer by its max_seeds and the seeds a
    #: group the pair will likely have run then (gpool.sequential.outlook).
    p_decided: float = math.nan
    expected_seeds: float = math.nan
    repeated: bool = False  # the interval is a sequential look's repeated one

    @property
    def ci_label(self) -> str:
        """E.g. "95% CI", "99.9998% repeated CI": the level's digits up to the second
        significant one of what it leaves out, so an early look's level never reads 100 %."""
        missed = (1 - self.ci_level) * 100
        digits = max(0, 1 - math.floor(math.log10(missed))) if missed > 0 else 0
        level = f"{self.ci_level * 100:.{digits}f}"
        level = level.rstrip("0").rstrip(".") if "." in level else level
        return f"{level}% {'repeated ' * self.repeated}CI"

    def flipped(self) -> PairResult:
        """The same pair with B as A."""
        return replace(
            self,
            a=self.b,
            b=self.a,
            diff=-self.diff,
            ci_low=-self.ci_high,
            ci_high=-self.ci_low,
            p_improvement=1 - self.p_improvement,
            p_improvement_low=1 - self.p_improvement_high,
            p_improvement_high=1 - self.p_improvement_low,
        )

    def from_side(self, a: str) -> PairResult:
        """The pair with group `a` as A."""
        return self if self.a == a else self.flipped()

    def side_answer(self) -> str:
        """The answer from A's side: better or worse (either qualified by the margin),
        equivalent, undecided."""
        losing = {stats.BETTER: stats.WORSE, stats.BETTER_WITHIN: stats.WORSE_WITHIN}
        return losing.get(self.answer, self.answer) if self.diff < 0 else self.answer


def pair_results(
    samples: Sequence[Sample],
    detect: float | None = None,
    margin: float = MARGIN,
    alpha: float = ALPHA,
    plan: Plan | None = None,
) -> list[PairResult]:
    """Every pair of groups: the difference with its 1 - `alpha` interval (over seeds and
    test images when the runs logged their predictions), the test of a difference and
    TOST's of equivalence within ±`margin` points, both Holm-adjusted over the pairs, the
    answer (see stats.decide), P(A > B) with its interval and the detectable difference,
    at `alpha`; the seeds per group that would most likely decide an undecided pair at
    `alpha` split over the pairs (Bonferroni: Holm's strictest step, so the count still
    holds in a table of many pairs); given `detect` points, also the seeds a group would
    need to detect that. Under a decide sweep's `plan`, each pair is answered by its
    sequential rule instead (see sequential_result)."""
    return [result for result, _ in family_results([samples], detect, margin, alpha, plan)[0]]


def family_results(
    tasks: Sequence[Sequence[Sample]],
    detect: float | None = None,
    margin: float = MARGIN,
    alpha: float = ALPHA,
    plan: Plan | None = None,
) -> list[list[tuple[PairResult, Pair]]]:
    """pair_results for several tasks at once, as one family: per task, every pair of its
    groups with the Pair behind it; Holm's adjustment, the seeds to decide and a decide
    sweep's split of alpha run over the pairs of every task, so that the chance of any
    wrong answer anywhere stays within `alpha`."""
    measured: list[list[tuple[PairResult, Pair]]] = []
    count = sum(math.comb(len(samples), 2) for samples in tasks)
    plan_alpha = alpha / max(1, count)
    for samples in tasks:
        draws = image_draws(samples)
        pairs = [
            (a.name, b.name, Pair.of(a, b, draws)) for a, b in itertools.combinations(samples, 2)
        ]
        measured.append(
            [(measure(pair, a, b, margin, alpha, plan_alpha, detect), pair) for a, b, pair in pairs]
        )
    flat = [result for task in measured for result, _ in task]
    holm_diff = iter(stats.holm([r.p for r in flat]))
    holm_equiv = iter(stats.holm([r.p_equivalence for r in flat]))
    answered = []
    for task in measured:
        results = []
        for result, pair in task:
            adjusted = replace(result, p_holm=next(holm_diff), p_equivalence_holm=next(holm_equiv))
            results.append((answer(adjusted, pair, margin, alpha, plan, count), pair))
        answered.append(results)
    return answered


def answer(
    result: PairResult, pair: Pair, margin: float, alpha: float, plan: Plan | None, count: int
) -> PairResult:
    """A Holm-adjusted pair answered at `alpha`, or by a decide sweep's rule over `count`
    pairs."""
    if plan is not None:
        return sequential_result(result, pair, plan, count)
    interval = (result.ci_low, result.ci_high)
    return replace(
        result,
        answer=stats.decide(result.p_holm, result.p_equivalence_holm, interval, margin, alpha),
    )


def measure(
    pair: Pair,
    a: str,
    b: str,
    margin: float,
    alpha: float,
    plan_alpha: float,
    detect: float | None,
) -> PairResult:
    """A pair's numbers before the family's adjustment: the difference and its 1 - alpha
    interval, both tests' p-values, P(A > B), the detectable difference and the seeds that
    would decide it (at `plan_alpha`), or detect `detect` points."""
    d = pair.points()
    low, high = d.interval(1 - alpha)
    improvement, improvement_low, improvement_high = pair.improvement(1 - alpha)
    return PairResult(
        a=a,
        b=b,
        diff=d.diff,
        ci_low=low,
        ci_high=high,
        ci_level=1 - alpha,
        covers=pair.covers,
        seeds_alone_because=pair.images if isinstance(pair.images, str) else "",
        test=pair.test,
        t=d.diff / d.se if d.testable else math.nan,
        p=d.p_difference(),
        p_equivalence=d.p_equivalence(margin),
        p_improvement=improvement,
        p_improvement_low=improvement_low,
        p_improvement_high=improvement_high,
        detectable=pair.detectable(alpha),
        seeds_to_decide=stats.seeds_to_decide(
            pair.spread(), d.diff, margin, pair.paired, plan_alpha, POWER, pair.image_var
        ),
        seeds_needed=None if detect is None else pair.seeds_needed(detect, alpha),
    )


def sequential_result(result: PairResult, pair: Pair, plan: Plan, pairs: int) -> PairResult:
    """A pair's result under a decide sweep's rule (gpool.sequential): its answer at the
    look at its seeds, the repeated confidence interval of that look, and, where it is
    still undecided, its outlook, "undecidable" when unlikely to be decided by max_seeds
    (a paired pair of at least two seeds; others stay undecided)."""
    seeds = min(len(pair.a), len(pair.b))
    look = sequential.decide(pair.points(), seeds, plan, pairs)
    result = replace(
        result,
        answer=look.answer,
        ci_low=look.low,
        ci_high=look.high,
        ci_level=look.level,
        repeated=True,
    )
    if look.answer != stats.UNDECIDED or not pair.paired or seeds >= plan.max_seeds:
        return result
    d = (pair.a - pair.b) * 100
    rng = np.random.default_rng(0)
    seen = sequential.outlook(seeds, d.mean(), d.var(ddof=1), pair.image_var, plan, rng, pairs)
    futile = plan.futility > 0 and seen.decided[0] < plan.futility
    return replace(
        result,
        answer=stats.UNDECIDABLE if futile else result.answer,
        p_decided=float(seen.decided[0]),
        expected_seeds=float(seen.seeds[0]),
    )


def pair_of(pairs: Sequence[PairResult], a: str, b: str) -> PairResult:
    """The pair of groups `a` and `b` among `pairs`, with `a` as A."""
    return next(p for p in pairs if {p.a, p.b} == {a, b}).from_side(a)


def answer_words(pair: PairResult, margin: float, plan: Plan | None = None) -> str:
    """A pair's answer in words, as the verdict leads with it."""
    if pair.answer == stats.UNDECIDABLE and plan is not None:
        return f"{pair.a} vs {pair.b}: undecidable within {plan.max_seeds} seeds a group"
    if pair.answer in (stats.BETTER, stats.BETTER_WITHIN):
        winner, loser = (pair.a, pair.b) if pair.diff > 0 else (pair.b, pair.a)
        within = ", by less than the margin" if pair.answer == stats.BETTER_WITHIN else ""
        return f"{winner} is better than {loser} by {abs(pair.diff):.2f} points{within}"
    if pair.answer == stats.EQUIVALENT:
        return f"{pair.a} and {pair.b} are equivalent within ±{margin:g} points"
    return f"{pair.a} vs {pair.b}: undecided"


def verdict(
    samples: Sequence[Sample],
    pairs: Sequence[PairResult],
    margin: float = MARGIN,
    plan: Plan | None = None,
) -> str:
    """The answer for the leader against the runner-up, in words first, then the numbers
    behind it; for an undecided pair, how many seeds per group would most likely decide
    (and under a decide sweep's plan, what it likely comes to by its max_seeds)."""
    if len(samples) < 2:
        return f"only one group ({samples[0].name}): nothing to compare"
    top, second = leaders(samples)
    pair = pair_of(pairs, top.name, second.name)
    words = answer_words(pair, margin, plan)
    if math.isnan(pair.p):
        return (
            f"{words} ({top.name} leads by {pair.diff:.2f} points of final {top.split} acc; no "
            "test possible: needs >= 2 seeds per group, and paired differences that vary)"
        )
    family = f", Holm over {len(pairs)} pairs" if len(pairs) > 1 else ""
    numbers = (
        f"{top.name} − {second.name} = {pair.diff:+.2f} points of final {top.split} acc, "
        f"{pair.ci_label} [{pair.ci_low:+.2f}, {pair.ci_high:+.2f}] over {pair.covers}; "
        f"{pair.test} p={pair.p_holm:.3g}, equivalence within ±{margin:g} (TOST) "
        f"p={pair.p_equivalence_holm:.3g}{family}; P({top.name} > {second.name}) = "
        f"{pair.p_improvement:.2f} [{pair.p_improvement_low:.2f}, {pair.p_improvement_high:.2f}]"
    )
    more = pair.seeds_to_decide
    if not math.isnan(pair.p_decided):
        numbers += (
            f"; by max_seeds P(decided) = {pair.p_decided:.2f}, expect about "
            f"{pair.expected_seeds:.0f} seeds a group"
        )
    if pair.answer not in (stats.UNDECIDED, stats.UNDECIDABLE) or math.isnan(more):
        return f"{words} ({numbers})"
    if math.isinf(more):
        return (
            f"{words} ({numbers}); no seed count decides it: the difference sits at the "
            "margin, or within the test images' own noise"
        )
    return f"{words} ({numbers}); about {more:.0f} seeds per group would most likely decide it"
