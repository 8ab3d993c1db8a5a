"""A comparison of a selection of runs: select (gpool.compare.runs), judge
(gpool.compare.verdict), write it up (gpool.compare.render); what `gpool.compare`, a
sweep's closing verdict and the decide sweeper's rounds all make."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from gpool import stats
from gpool.compare.across import AcrossTasks, Task, across_tasks, across_verdict, leading
from gpool.compare.classes import class_differences, class_names
from gpool.compare.render import across_markdown, class_section, markdown
from gpool.compare.runs import (
    Group,
    by_task,
    factors,
    fetch_all,
    group_by,
    missing_jobs,
    tune_groups,
    within_tasks,
)
from gpool.compare.samples import GroupSummary, Sample, leaders
from gpool.compare.verdict import PairResult, pair_results, verdict
from gpool.errors import GpoolError
from gpool.levels import ALPHA, MARGIN
from gpool.names import COMPARISON_DIR, REPORT_FILE
from gpool.sequential import Plan


@dataclass
class Comparison:
    """What `gpool.compare` reports on a selection of runs."""

    header: str  # which runs, grouped by what
    table: str  # Markdown: the tables, the verdict, what was not compared
    line: str  # the verdict
    summaries: list[GroupSummary]
    groups: list[Group]
    factors: list[str] = field(default_factory=list)  # what the groups differ in
    pairs: list[PairResult] = field(default_factory=list)  # every pair's answer
    margin: float = MARGIN  # the equivalence margin the answers used
    plan: Plan | None = None  # a decide sweep's rule, which answered the pairs
    #: Over several tasks: each pair's answer across them, the verdict's first (pairs then
    #: hold every task's pairs, their groups named with their task's label first).
    across: list[AcrossTasks] = field(default_factory=list)
    #: Over several tasks: each task's label and its own pairs.
    per_task: list[tuple[str, list[PairResult]]] = field(default_factory=list)

    def settled_tasks(self) -> set[str]:
        """The tasks whose every pair is answered or undecidable (gpool.decide stops
        adding seeds to them)."""
        return {
            label
            for label, pairs in self.per_task
            if stats.decided([pair.answer for pair in pairs])
        }

    @property
    def split(self) -> str:
        """The split every group is judged on: val, or test once tuned on val."""
        return self.groups[0].split

    def note(self) -> str:
        """The run description: the whole report, or, past MLflow's limit on a tag's value
        (many groups), the verdict and where the tables are."""
        note = f"Verdict: {self.line}\n\n{self.header}\n\n{self.table}"
        if len(note) <= MAX_TAG_VAL_LENGTH:
            return note
        return (
            f"Verdict: {self.line}\n\n{self.header}\n\nThe tables are too long for a run "
            f"description: see the artifact {COMPARISON_DIR}/{REPORT_FILE}."
        )


def compare_groups(
    groups: Sequence[Group], detect: float | None, margin: float, plan: Plan | None = None
) -> tuple[list[GroupSummary], list[PairResult], str, str]:
    """The groups' summaries, every pair's result (at ALPHA, or by a decide sweep's rule),
    the verdict and the Markdown table."""
    samples = [g.sample() for g in groups]
    summaries = [
        GroupSummary.of(s, g.values("best"), g.values("best_epoch"))
        for s, g in zip(samples, groups, strict=True)
    ]
    pairs = pair_results(samples, detect, margin, ALPHA, plan)
    line = verdict(samples, pairs, margin, plan)
    table = markdown(summaries, pairs, line, groups[0].split, plan)
    return summaries, pairs, line, table + per_class(groups, samples)


def per_class(groups: Sequence[Group], samples: Sequence[Sample]) -> str:
    """The class table of the two groups with the best mean score (the verdict's pair):
    where their difference comes from; nothing for one group."""
    if len(samples) < 2:
        return ""
    top, second = leaders(samples)
    names = class_names(groups[0].runs[0].run.data.params.get("dataset.classes"))
    diff = float(top.scores.mean() - second.scores.mean())
    return "\n" + class_section(top.name, second.name, diff, class_differences(top, second, names))


def compare_jobs(
    client: MlflowClient,
    parent: Run | None,
    jobs: Sequence[Run],
    detect: float | None = None,
    tune: Sequence[str] | None = None,
    margin: float = MARGIN,
    plan: Plan | None = None,
) -> Comparison:
    """Compare the FINISHED runs among `jobs` (of sweep `parent`, if any; by the rule of
    its `plan` if a decide sweep); the others, and a sweep's jobs without a run, are
    listed as not compared."""
    runs = [r for r in jobs if r.info.status == "FINISHED" and "val_acc" in r.data.metrics]
    missing = missing_jobs(parent, jobs)
    if not runs:
        raise GpoolError("no FINISHED runs to compare in that selection; " + "; ".join(missing))
    tasks = by_task(runs)
    if len(tasks) > 1:
        if tune:
            raise GpoolError(
                f"--tune over {len(tasks)} tasks ({', '.join(tasks)}): select one with --filter"
            )
        return compare_tasks(client, parent, tasks, missing, margin, plan)
    curves = fetch_all(client, runs)
    names = factors(runs)
    chosen: list[str] = []
    if tune:
        names, groups, chosen = tune_groups(curves, names, tune)
    else:
        groups = group_by(curves, names)
    summaries, pairs, line, table = compare_groups(groups, detect, margin, plan)
    if chosen:
        table = (
            f"Tuned {' '.join(tune or [])} on the validation split; chosen per group:\n"
            + "".join(f"- {c}\n" for c in chosen)
            + f"\nAt those values, on the test split:\n\n{table}"
        )
    if missing:
        table += "\nNot compared:\n" + "".join(f"- {m}\n" for m in missing)
    grouped = ", ".join(names) or "nothing"
    header = f"{len(runs)} finished runs from {source(parent)}, grouped by {grouped}"
    return Comparison(header, table, line, summaries, groups, names, pairs, margin, plan)


def source(parent: Run | None) -> str:
    return f"sweep {parent.info.run_name!r} ({parent.info.run_id})" if parent else "selection"


def compare_tasks(
    client: MlflowClient,
    parent: Run | None,
    tasks: dict[str, list[Run]],
    missing: Sequence[str],
    margin: float,
    plan: Plan | None,
) -> Comparison:
    """Runs on several tasks (gpool.compare.runs.by_task): per task its groups and pairs,
    all pairs one family, and each pair of groups answered across the tasks
    (gpool.compare.across)."""
    runs = [run for group in tasks.values() for run in group]
    curves = {c.run.info.run_id: c for c in fetch_all(client, runs)}
    names = within_tasks(list(tasks.values()), factors(runs))
    by_task = {
        label: group_by([curves[r.info.run_id] for r in group], names)
        for label, group in tasks.items()
    }
    samples = [Task(label, tuple(g.sample() for g in groups)) for label, groups in by_task.items()]
    per_task, across = across_tasks(samples, margin, ALPHA, plan)
    lead = leading(samples, across)
    across = sorted(across, key=lambda pair: pair is not lead)  # the verdict's pair first
    line = across_verdict(lead, margin, sum(map(len, per_task)))
    sections, groups, pairs = [], [], []
    for (label, task_groups), task, results in zip(by_task.items(), samples, per_task, strict=True):
        summaries = [
            GroupSummary.of(s, g.values("best"), g.values("best_epoch"))
            for s, g in zip(task.samples, task_groups, strict=True)
        ]
        sections.append((label, summaries, results, per_class(task_groups, task.samples)))
        groups += [Group(f"{label} {g.name}", g.runs) for g in task_groups]
        pairs += [replace(r, a=f"{label} {r.a}", b=f"{label} {r.b}") for r in results]
    table = across_markdown(sections, across, line, margin, plan)
    if missing:
        table += "\nNot compared:\n" + "".join(f"- {m}\n" for m in missing)
    summaries = [replace(s, group=f"{task[0]} {s.group}") for task in sections for s in task[1]]
    header = (
        f"{len(runs)} finished runs from {source(parent)} on {len(tasks)} tasks "
        f"({', '.join(tasks)}), grouped within each by {', '.join(names) or 'nothing'}"
    )
    seen = factors(runs)
    labelled = list(zip(tasks, per_task, strict=True))
    return Comparison(
        header, table, line, summaries, groups, seen, pairs, margin, plan, across, labelled
    )
