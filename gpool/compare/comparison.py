"""A comparison of a selection of runs: select (gpool.compare.runs), judge
(gpool.compare.verdict), write it up (gpool.compare.render); what `gpool.compare`, a
sweep's closing verdict and the decide sweeper's rounds all make."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from gpool.compare.render import markdown
from gpool.compare.runs import (
    Group,
    factors,
    fetch_all,
    group_by,
    missing_jobs,
    one_task,
    tune_groups,
)
from gpool.compare.samples import GroupSummary
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
    return summaries, pairs, line, markdown(summaries, pairs, line, groups[0].split, plan)


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
    one_task(runs)
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
    source = f"sweep {parent.info.run_name!r} ({parent.info.run_id})" if parent else "selection"
    header = f"{len(runs)} finished runs from {source}, grouped by {', '.join(names) or 'nothing'}"
    return Comparison(header, table, line, summaries, groups, names, pairs, margin, plan)
