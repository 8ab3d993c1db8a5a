"""A comparison as people read it: the Markdown tables (groups, pairs, what the intervals
cover, the level a sequential sweep decides at, the verdict) and the rows behind its
figures (the forest of groups against the leader, the matrix of pairs). Pure: text and
rows from gpool.compare.verdict's results; files and MLflow are gpool.compare.publish's."""

from __future__ import annotations

import math
from collections.abc import Sequence

from gpool import stats
from gpool.compare.across import AcrossTasks
from gpool.compare.classes import ClassDifference, carriers
from gpool.compare.samples import GroupSummary
from gpool.compare.verdict import PairResult, pair_of
from gpool.levels import POWER
from gpool.plots import LEADER
from gpool.sequential import Plan


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def markdown(
    summaries: Sequence[GroupSummary],
    pairs: Sequence[PairResult],
    line: str,
    split: str,
    plan: Plan | None = None,
) -> str:
    """The groups' table, the pairs' table, why any interval covers seeds alone, the rule
    of a sequential sweep, and the verdict."""
    out = tables(summaries, pairs, split)
    if plan is not None:
        out += ["", rule_note(plan, len(pairs))]
    return "\n".join(out + ["", f"Verdict: {line}", ""])


def tables(summaries: Sequence[GroupSummary], pairs: Sequence[PairResult], split: str) -> list[str]:
    """The groups' table, the pairs' table and why any interval covers seeds alone."""
    out = [
        f"| group | n | final {split} acc % (mean ± std) | 95 % CI | best val acc % (mean ± std) "
        "| epoch of best |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        out.append(
            f"| {s.group} | {s.n} | {fmt(s.mean)} ± {fmt(s.std)} | [{fmt(s.ci_low)}, "
            f"{fmt(s.ci_high)}] | {fmt(s.best_mean)} ± {fmt(s.best_std)} | "
            f"{s.best_epoch_mean:.1f} |"
        )
    if pairs:
        out += ["", *pair_table(pairs)]
    if alone := sorted({p.seeds_alone_because for p in pairs} - {""}):
        out += [
            "",
            "Intervals over seeds alone, not the test images (the runs logged no usable "
            "per-image predictions): " + "; ".join(alone[:3]) + ("; ..." if len(alone) > 3 else ""),
        ]
    return out


def rule_note(plan: Plan, pairs: int) -> str:
    """How a decide sweep's pairs were answered (gpool.sequential), in a sentence."""
    shared = f"{plan.alpha:g} over the {pairs} pairs, each" if pairs > 1 else f"{plan.alpha:g}"
    return (
        f"Answered by the decide sweeper's rule: {shared} spent over its looks at "
        f"{plan.first_round} to {plan.max_seeds} seeds a group "
        f"({plan.spending.replace('_', '-')}-type spending by seeds seen / max_seeds); each "
        "interval is that look's repeated confidence interval, which holds whatever look "
        f"the sweep stopped at; a pair whose chance of an answer by {plan.max_seeds} seeds "
        f"fell below {plan.futility:g} is undecidable."
    )


def pair_table(pairs: Sequence[PairResult]) -> list[str]:
    detect = pairs[0].seeds_needed is not None
    head = (
        f"| A | B | answer | A − B (points) | {pairs[0].ci_label} | covers | test | p (Holm) | "
        f"equivalence p (TOST, Holm) | P(A > B) | detectable at {POWER:.0%} power (points) | "
        "seeds to decide |" + (" seeds a group for the --detect difference |" * detect)
    )
    out = [head, "| --- " * (12 + detect) + "|"]
    for p in pairs:
        open_ = p.answer in (stats.UNDECIDED, stats.UNDECIDABLE)
        to_decide = fmt(p.seeds_to_decide, 0) if open_ else "-"
        improvement = (
            f"{fmt(p.p_improvement)} [{fmt(p.p_improvement_low)}, {fmt(p.p_improvement_high)}]"
        )
        out.append(
            f"| {p.a} | {p.b} | {p.answer} | {p.diff:+.2f} | "
            f"[{fmt(p.ci_low)}, {fmt(p.ci_high)}] | {p.covers} | {p.test} | "
            f"{fmt(p.p_holm, 4)} | {fmt(p.p_equivalence_holm, 4)} | {improvement} | "
            f"{fmt(p.detectable)} | {to_decide} |"
            + (f" {fmt(p.seeds_needed or math.nan, 0)} |" if detect else "")
        )
    return out


def forest_rows(summaries: Sequence[GroupSummary], pairs: Sequence[PairResult]) -> list[dict]:
    """Per group, best first: its final accuracy with its interval over seeds, its answer
    against the leader and their difference's interval (plots.plot_forest)."""
    ranked = sorted(summaries, key=lambda s: s.mean, reverse=True)
    leader = ranked[0].group
    rows = []
    for summary in ranked:
        row = {
            "group": summary.group,
            "mean": summary.mean,
            "low": summary.ci_low,
            "high": summary.ci_high,
            "answer": LEADER,
            "label": LEADER,
        }
        if summary.group != leader:
            pair = pair_of(pairs, summary.group, leader)
            row["answer"] = pair.side_answer()
            row["label"] = (
                f"{row['answer']}: {pair.diff:+.2f} [{pair.ci_low:+.2f}, {pair.ci_high:+.2f}]"
            )
        rows.append(row)
    return rows


def pairwise_cells(pairs: Sequence[PairResult]) -> dict[tuple[str, str], dict]:
    """Each ordered pair of groups: A minus B in points and A's answer against B."""
    cells = {}
    for pair in pairs:
        for side in (pair, pair.flipped()):
            cells[(side.a, side.b)] = {"diff": side.diff, "answer": side.side_answer()}
    return cells


def outlook_line(pair: PairResult, n: int) -> str:
    """The planner's sentence for a pair after a look at n seeds a group."""
    if pair.answer not in (stats.UNDECIDED, stats.UNDECIDABLE):
        return f"{pair.a} vs {pair.b}: {pair.answer} at {n} seeds a group"
    if math.isnan(pair.p_decided):
        return f"{pair.a} vs {pair.b}: {pair.answer}; no outlook (needs paired seeds that vary)"
    more = max(0.0, pair.expected_seeds - n)
    head = f"{pair.a} vs {pair.b}: {pair.answer}"
    if pair.answer == stats.UNDECIDABLE:
        needed = pair.seeds_to_decide
        likely = "no seed count" if math.isinf(needed) else f"about {needed:.0f} seeds a group"
        return f"{head}: P(decided by max_seeds) = {pair.p_decided:.2f}; {likely} would decide it"
    return (
        f"to decide {pair.a} vs {pair.b}, expect about {more:.0f} more seeds a head "
        f"(P(decided by max_seeds) = {pair.p_decided:.2f})"
    )


def across_markdown(
    tasks: Sequence[tuple[str, Sequence[GroupSummary], Sequence[PairResult], str]],
    across: Sequence[AcrossTasks],
    line: str,
    margin: float,
    plan: Plan | None = None,
) -> str:
    """Per task its groups' and pairs' tables and what follows them (its class table),
    then each pair's answer over the tasks, the rule of a sequential sweep, and the
    verdict."""
    out = []
    for label, summaries, pairs, after in tasks:
        out += [f"On {label}:", "", *tables(summaries, pairs, summaries[0].split), after]
    if across:
        out += [
            f"| A | B | over the tasks | mean A − B (points) | {across[0].ci_level:.0%} CI "
            "| mean P(A > B) | per task |",
            "| --- " * 7 + "|",
        ]
        for pair in across:
            where = "; ".join(
                f"{answer}: {', '.join(labels)}" for answer, labels in pair.where().items()
            )
            out.append(
                f"| {pair.a} | {pair.b} | {pair.answer} | {pair.diff:+.2f} | "
                f"[{fmt(pair.ci_low)}, {fmt(pair.ci_high)}] | {fmt(pair.p_improvement)} | {where} |"
            )
        out.append("")
    if plan is not None:
        out += [rule_note(plan, sum(len(task[2]) for task in tasks)), ""]
    return "\n".join(out + [f"Verdict: {line}", ""])


def across_rows(pair: AcrossTasks) -> list[dict]:
    """The figure's rows for one pair over the tasks (plots.plot_across): each task's
    difference with its interval and answer from A's side, then the mean over tasks."""
    rows = [
        {
            "task": label,
            "diff": result.diff,
            "low": result.ci_low,
            "high": result.ci_high,
            "answer": result.side_answer(),
            "label": f"{result.side_answer()} ({result.ci_label})",
        }
        for label, result in pair.per_task
    ]
    mean = {"task": "mean over tasks", "diff": pair.diff, "low": pair.ci_low}
    rows.append(
        mean
        | {
            "high": pair.ci_high,
            "answer": LEADER,
            "label": f"{pair.answer} ({pair.ci_level:.0%} CI)",
        }
    )
    return rows


def class_section(a: str, b: str, diff: float, differences: Sequence[ClassDifference] | str) -> str:
    """Where A - B comes from: per class its difference, interval and Holm p, and the
    classes that carry it; or, without per-image predictions, why not."""
    if isinstance(differences, str):
        return f"Per class: not available ({differences})."
    out = [
        f"Where {a} − {b} comes from, per class (points; 95 % CI over seeds and the class's "
        "images):",
        "",
        "| class | images | A − B | 95 % CI | p (Holm over the classes) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for d in differences:
        out.append(
            f"| {d.name} | {d.images} | {d.diff:+.2f} | [{fmt(d.ci_low)}, {fmt(d.ci_high)}] | "
            f"{fmt(d.p_holm, 4)} |"
        )
    return "\n".join([*out, "", f"{a} − {b}: {carriers(differences, diff)}.", ""])
