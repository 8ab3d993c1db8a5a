"""The verdict across tasks (gpool.compare.across) by simulation with known truth: no
training, each task's seeds drawn around a known difference between the heads. Error
rates are held to their level plus three Monte-Carlo standard errors."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from gpool import stats
from gpool.compare.across import (
    DEPENDS,
    EQUIVALENT_EVERYWHERE,
    EVERY_TASK,
    Task,
    across_answer,
    across_tasks,
    leading,
)
from gpool.compare.samples import Sample
from gpool.compare.verdict import pair_results
from gpool.levels import ALPHA
from gpool.plots import across_span, plot_across
from gpool.predictions import ImageScores

SIMULATIONS = 200
SEEDS = 10
MARGIN = 0.5


def simulated(label: str, diff: float, rng: np.random.Generator, spread: float = 0.3) -> Task:
    """A task's two heads over SEEDS paired seeds: a shared seed effect, avg `diff` points
    above max, each run with its own noise of `spread` points."""
    seed_effect = rng.normal(0.88, 0.004, SEEDS)
    avg = seed_effect + (diff + rng.normal(0, spread, SEEDS)) / 100
    max_ = seed_effect + rng.normal(0, spread, SEEDS) / 100
    seeds = tuple(str(s) for s in range(SEEDS))
    reason = "no predictions read"
    return Task(
        label, (Sample("pool=avg", avg, seeds, reason), Sample("pool=max", max_, seeds, reason))
    )


def answers(diffs: dict[str, float], seed: int) -> tuple[Counter, float]:
    """How often each answer across tasks comes out, and how often the interval of the
    mean over tasks covers the true mean difference."""
    rng = np.random.default_rng(seed)
    counts: Counter = Counter()
    covered = 0
    truth = np.mean(list(diffs.values()))
    for _ in range(SIMULATIONS):
        _, across = across_tasks([simulated(t, d, rng) for t, d in diffs.items()], MARGIN)
        pair = across[0]
        counts[(pair.answer, pair.a)] += 1
        true = truth if pair.a == "pool=avg" else -truth
        covered += pair.ci_low <= true <= pair.ci_high
    return counts, covered / SIMULATIONS


def bound(rate: float) -> float:
    """`rate` plus three Monte-Carlo standard errors at SIMULATIONS draws."""
    return rate + 3 * math.sqrt(rate * (1 - rate) / SIMULATIONS)


def test_a_difference_on_one_task_only_depends_on_the_task() -> None:
    counts, covered = answers({"dataset=translated": 2.0, "dataset=fashion_mnist": 0.0}, 1)
    wrong = sum(
        n for (answer, _), n in counts.items() if answer in (EVERY_TASK, EQUIVALENT_EVERYWHERE)
    )
    assert wrong / SIMULATIONS <= bound(ALPHA)  # a claim about fashion_mnist's zero
    assert counts[(DEPENDS, "pool=avg")] / SIMULATIONS >= 0.7  # 0.79 expected at these seeds
    assert 0.9 <= covered <= 0.99  # the stratified bootstrap's 95 % interval of the mean


def test_no_difference_anywhere_is_equivalent_at_the_right_rate() -> None:
    counts, covered = answers({"dataset=translated": 0.0, "dataset=cluttered": 0.0}, 2)
    claimed = sum(n for (answer, _), n in counts.items() if answer in (EVERY_TASK, DEPENDS))
    assert claimed / SIMULATIONS <= bound(ALPHA)  # the family's error rate
    equivalent = sum(n for (answer, _), n in counts.items() if answer == EQUIVALENT_EVERYWHERE)
    assert equivalent / SIMULATIONS >= 0.8
    assert 0.9 <= covered <= 0.99


def test_the_same_difference_everywhere_is_better_on_every_task() -> None:
    counts, _ = answers({"dataset=translated": 1.5, "dataset=cluttered": 1.5}, 3)
    assert counts[(EVERY_TASK, "pool=avg")] / SIMULATIONS >= 0.9
    assert sum(n for (_, a), n in counts.items() if a == "pool=max") == 0


def test_the_answer_over_tasks_from_each_tasks_answer() -> None:
    assert across_answer([stats.BETTER, stats.BETTER_WITHIN]) == EVERY_TASK
    assert across_answer([stats.EQUIVALENT, stats.EQUIVALENT]) == EQUIVALENT_EVERYWHERE
    assert across_answer([stats.BETTER, stats.WORSE]) == DEPENDS
    assert across_answer([stats.BETTER, stats.EQUIVALENT, stats.UNDECIDED]) == DEPENDS
    assert across_answer([stats.BETTER, stats.UNDECIDED]) == stats.UNDECIDED
    assert across_answer([stats.EQUIVALENT, stats.UNDECIDABLE]) == stats.UNDECIDED


def test_holm_runs_over_every_tasks_pairs_and_words_name_the_tasks() -> None:
    rng = np.random.default_rng(4)
    tasks = [simulated("dataset=translated", 3.0, rng), simulated("dataset=occluded", 0.0, rng)]
    per_task, across = across_tasks(tasks, MARGIN)
    alone = pair_results(tasks[0].samples, margin=MARGIN)[0]
    assert alone.p_holm == alone.p  # a family of one
    first, second = per_task[0][0], per_task[1][0]
    assert first.p == alone.p and first.p < second.p
    assert first.p_holm == pytest.approx(2 * first.p)  # the smaller of two p-values
    assert second.p_holm == pytest.approx(min(1.0, max(2 * first.p, second.p)))
    pair = leading(tasks, across)
    assert pair is not None and pair.answer == DEPENDS and pair.a == "pool=avg"
    words = pair.words(MARGIN)
    assert "pool=avg better on dataset=translated" in words
    assert "equivalent on dataset=occluded" in words


def test_the_images_enter_the_interval_of_the_mean() -> None:
    """With per-image scores the interval of the mean over tasks widens by the images'
    noise: the same seeds' accuracies, once as bare numbers, once as 0/1 per image."""
    rng = np.random.default_rng(5)
    tasks_bare, tasks_images = [], []
    for label in ("dataset=translated", "dataset=cluttered"):
        correct = [(rng.random((SEEDS, 2000)) < p).astype(np.int8) for p in (0.9, 0.89)]
        labels = np.zeros(2000, dtype=np.int64)
        seeds = tuple(str(s) for s in range(SEEDS))
        heads = [("pool=avg", correct[0]), ("pool=max", correct[1])]
        tasks_bare.append(Task(label, tuple(Sample(n, c.mean(1), seeds, "none") for n, c in heads)))
        tasks_images.append(
            Task(
                label, tuple(Sample(n, c.mean(1), seeds, ImageScores(c, labels)) for n, c in heads)
            )
        )
    bare = across_tasks(tasks_bare, MARGIN)[1][0]
    images = across_tasks(tasks_images, MARGIN)[1][0]
    assert bare.diff == pytest.approx(images.diff)
    assert images.ci_high - images.ci_low > bare.ci_high - bare.ci_low


def test_the_figure_keeps_settled_tasks_readable_beside_an_early_looks_interval(
    tmp_path,
) -> None:
    """The tasks sweep's own rows: fashion_mnist settled undecidable at its second look with
    a repeated interval of ±86 points; the axis spans the other intervals and every
    difference (that row runs off it), and the figure draws with it."""
    rows = [
        {"diff": 0.13, "low": -86.03, "high": 86.29},
        {"diff": 1.59, "low": 0.21, "high": 2.98},
        {"diff": 3.65, "low": 1.11, "high": 6.18},
        {"diff": -1.55, "low": -3.06, "high": -0.03},
        {"diff": 0.89, "low": 0.54, "high": 1.22},
    ]
    low, high = across_span(rows, 0.5)
    assert -4 < low < -3.06 and 6.18 < high < 7.5
    labelled = [
        row | {"task": str(i), "answer": stats.BETTER, "label": "x"} for i, row in enumerate(rows)
    ]
    assert plot_across(labelled, 0.5, "A − B", tmp_path / "across.png").stat().st_size > 0
