"""The verdict across tasks: two groups (heads) compared on several tasks at once (each a
set of images, e.g. dataset=translated), each task's pair answered within one family
(gpool.compare.verdict.family_results: Holm over every task's pairs), then one answer over
the tasks: better on every task, equivalent on every task, depends on the task (naming
where), or undecided; with the mean over tasks of the difference, its stratified bootstrap
interval over each task's seeds and images, and P(A > B) averaged over the tasks. Pure:
plain arrays in, a frozen AcrossTasks per pair out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gpool import stats
from gpool.compare.samples import Pair, Sample
from gpool.compare.verdict import PairResult, family_results
from gpool.levels import ALPHA, MARGIN
from gpool.sequential import Plan

#: The answers across tasks besides stats.UNDECIDED.
EVERY_TASK, EQUIVALENT_EVERYWHERE, DEPENDS = (
    "better on every task",
    "equivalent on every task",
    "depends on the task",
)

#: A task's decided answers from A's side: A better (by any amount), B better, equivalent.
SIDES = {
    stats.BETTER: "a",
    stats.BETTER_WITHIN: "a",
    stats.WORSE: "b",
    stats.WORSE_WITHIN: "b",
    stats.EQUIVALENT: "=",
}


@dataclass(frozen=True)
class Task:
    """One task's groups as the statistics see them; `label` names the task (e.g.
    dataset=translated), the samples' names the groups within it (e.g. pool=avg)."""

    label: str
    samples: tuple[Sample, ...]


@dataclass(frozen=True)
class AcrossTasks:
    """Groups A and B over the tasks, A the one ahead on the mean over tasks: each task's
    result from A's side, the answer over tasks, the mean difference (points) with its
    interval, and P(A > B) averaged over the tasks."""

    a: str
    b: str
    answer: str
    per_task: tuple[tuple[str, PairResult], ...]
    diff: float
    ci_low: float
    ci_high: float
    ci_level: float
    p_improvement: float

    def where(self) -> dict[str, list[str]]:
        """The tasks by their answer from A's side ("A better", "B better", ...)."""
        named = {"a": f"{self.a} better", "b": f"{self.b} better", "=": stats.EQUIVALENT}
        by: dict[str, list[str]] = {}
        for label, pair in self.per_task:
            side = pair.side_answer()
            by.setdefault(named.get(SIDES.get(side, ""), side), []).append(label)
        return by

    def words(self, margin: float) -> str:
        """The answer in words, as the verdict leads with it."""
        tasks = len(self.per_task)
        if self.answer == EVERY_TASK:
            return f"{self.a} is better than {self.b} on every task ({tasks} tasks)"
        if self.answer == EQUIVALENT_EVERYWHERE:
            return (
                f"{self.a} and {self.b} are equivalent within ±{margin:g} points on every "
                f"task ({tasks} tasks)"
            )
        where = "; ".join(
            f"{answer} on {', '.join(labels)}" for answer, labels in self.where().items()
        )
        if self.answer == DEPENDS:
            return f"{self.a} vs {self.b} depends on the task: {where}"
        return f"{self.a} vs {self.b}: undecided across tasks ({where})"


def across_answer(sides: Sequence[str]) -> str:
    """The answer over tasks from each task's answer on A's side: the same decided answer
    everywhere, "depends on the task" once two tasks are decided differently (whatever the
    undecided ones would add), else undecided."""
    decided = {SIDES[side] for side in sides if side in SIDES}
    if len(decided) > 1:
        return DEPENDS
    if len(decided) == 1 and all(side in SIDES for side in sides):
        return EQUIVALENT_EVERYWHERE if decided == {"="} else EVERY_TASK
    return stats.UNDECIDED


def across_tasks(
    tasks: Sequence[Task],
    margin: float = MARGIN,
    alpha: float = ALPHA,
    plan: Plan | None = None,
) -> tuple[list[list[PairResult]], list[AcrossTasks]]:
    """Every task's pairs (one family, see family_results), and for each pair of groups
    that every task holds, the answer across the tasks."""
    family = family_results([task.samples for task in tasks], None, margin, alpha, plan)
    per_task = [[result for result, _ in task] for task in family]
    everywhere = set.intersection(*({s.name for s in task.samples} for task in tasks))
    names = [s.name for s in tasks[0].samples if s.name in everywhere]
    across = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pairs = [pair_in(task, a, b) for task in family]
            across.append(combine([task.label for task in tasks], pairs, alpha))
    return per_task, across


def pair_in(task: Sequence[tuple[PairResult, Pair]], a: str, b: str) -> tuple[PairResult, Pair]:
    """Groups `a` and `b` in one task's family results, with `a` as A."""
    result, pair = next((r, p) for r, p in task if {r.a, r.b} == {a, b})
    return (result, pair) if result.a == a else (result.flipped(), pair.flipped())


def combine(
    labels: Sequence[str], pairs: Sequence[tuple[PairResult, Pair]], alpha: float
) -> AcrossTasks:
    """One pair over the tasks: the mean of the tasks' differences with its stratified
    bootstrap interval at 1 - alpha, P(A > B) averaged, the answer; from the side of the
    group ahead on the mean."""
    if np.mean([result.diff for result, _ in pairs]) < 0:
        pairs = [(result.flipped(), pair.flipped()) for result, pair in pairs]
    strata = [(*(pair.draws or (pair.a, pair.b)), pair.paired) for _, pair in pairs]
    low, high = stats.stratified_interval(strata, 1 - alpha)
    results = [result for result, _ in pairs]
    return AcrossTasks(
        a=results[0].a,
        b=results[0].b,
        answer=across_answer([r.side_answer() for r in results]),
        per_task=tuple(zip(labels, results, strict=True)),
        diff=float(np.mean([r.diff for r in results])),
        ci_low=low * 100,
        ci_high=high * 100,
        ci_level=1 - alpha,
        p_improvement=float(np.mean([r.p_improvement for r in results])),
    )


def leading(tasks: Sequence[Task], across: Sequence[AcrossTasks]) -> AcrossTasks | None:
    """The pair the verdict leads with: the group with the best mean score over the tasks
    against the runner-up (None when no two groups are on every task)."""
    if not across:
        return None
    names = {name for pair in across for name in (pair.a, pair.b)}
    scores: dict[str, list[float]] = {name: [] for name in names}
    for task in tasks:
        for sample in task.samples:
            if sample.name in scores:
                scores[sample.name].append(float(sample.scores.mean()))
    top, second = sorted(names, key=lambda n: np.mean(scores[n]), reverse=True)[:2]
    return next(pair for pair in across if {pair.a, pair.b} == {top, second})


def across_verdict(pair: AcrossTasks | None, margin: float, pairs: int) -> str:
    """The answer over the tasks for the leader against the runner-up, in words first, then
    the mean over tasks behind it (`pairs`: the family's size, every task's pairs)."""
    if pair is None:
        return "no two groups ran on every task: nothing to compare across tasks"
    tasks = len(pair.per_task)
    covers = {result.covers for _, result in pair.per_task}
    over = "seeds and images" if covers and all("images" in c for c in covers) else "seeds"
    return (
        f"{pair.words(margin)} (mean over {tasks} tasks of {pair.a} − {pair.b} = "
        f"{pair.diff:+.2f} points, {pair.ci_level:.0%} CI [{pair.ci_low:+.2f}, "
        f"{pair.ci_high:+.2f}], a bootstrap of each task's {over}; P({pair.a} > {pair.b}) "
        f"averaged over the tasks = {pair.p_improvement:.2f}; each task's answer at the "
        f"family's level, Holm over {pairs} pairs in {tasks} tasks)"
    )
