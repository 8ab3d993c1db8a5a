"""`python -m gpool.compare`: is one head really better? Statistics across seeds from MLflow.

Reads a sweep's runs through MLflow's query API, groups them by the factors the sweep varied
(all but the seed), and reports per group the final and best validation accuracy with a 95 %
confidence interval, Welch's t-test between groups, and a verdict that says "not
significant" when it is not. The table (Markdown, CSV) and a mean ± std curve figure are
written to disk and logged on the sweep's parent run.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from scipy import stats

from gpool import PROJECT_ROOT, GpoolError
from gpool.config import GROUPS, compose_config
from gpool.plots import plot_group_curves
from gpool.resume import affects_result
from gpool.tracking import EXPECTED_JOBS_TAG, ROLE_TAG, open_store, sweep_jobs, sweeps

ALPHA = 0.05


@dataclass
class RunCurves:
    """One run's accuracy per epoch."""

    run: Run
    val_acc: list[float]
    train_acc: list[float]

    @property
    def final(self) -> float:
        return self.val_acc[-1]

    @property
    def best(self) -> float:
        return max(self.val_acc)

    @property
    def best_epoch(self) -> int:
        return int(np.argmax(self.val_acc)) + 1


@dataclass
class Group:
    name: str
    runs: list[RunCurves]

    def values(self, attr: str) -> np.ndarray:
        return np.array([getattr(r, attr) for r in self.runs])


def mean_std_ci(values: np.ndarray) -> tuple[float, float, float]:
    """Mean, sample std and the half-width of the t-based 95 % confidence interval."""
    n = len(values)
    if n < 2:
        return float(values.mean()), math.nan, math.nan
    std = float(values.std(ddof=1))
    return float(values.mean()), std, float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n))


def welch(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Welch's t statistic and two-sided p-value; NaN when either side has < 2 runs."""
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan
    result = stats.ttest_ind(a, b, equal_var=False)
    return float(result.statistic), float(result.pvalue)


def factors(runs: Sequence[Run]) -> list[str]:
    """What the runs differ in besides the seed: config group choices (tags) first, then
    any other param that affects results, leaving out params that merely follow a varied
    group."""

    def varies(values: list[str | None]) -> bool:
        return len(set(values)) > 1

    groups = [g for g in GROUPS if varies([r.data.tags.get(g) for r in runs])]
    keys = sorted(k for k in set().union(*(r.data.params for r in runs)) if affects_result(k))
    params = [
        k
        for k in keys
        if k != "seed"
        and varies([r.data.params.get(k) for r in runs])
        and not any(k.startswith(f"{g}.") for g in groups)
    ]
    return groups + params


def group_name(run: Run, names: Sequence[str]) -> str:
    if not names:
        return "all runs"
    return " ".join(
        f"{n}={run.data.tags[n] if n in GROUPS else run.data.params.get(n)}" for n in names
    )


def fetch_curves(client: MlflowClient, run: Run) -> RunCurves:
    def series(key: str) -> list[float]:
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        return [m.value for m in history]

    return RunCurves(run, series("val_acc"), series("train_acc"))


def latest_sweep(client: MlflowClient, experiment_id: str, experiment: str) -> Run:
    """The newest sweep with finished jobs: a sweep stopped before any job finished has
    nothing to compare."""
    for sweep in sweeps(client, experiment_id):
        if any(r.info.status == "FINISHED" for r in sweep_jobs(client, sweep)):
            return sweep
    raise GpoolError(
        f"no sweep with finished runs in experiment {experiment!r}: run `python -m "
        "gpool.train -m pool=avg,max seed=0,1,2` first, or pass --filter"
    )


def select_runs(
    client: MlflowClient, experiment: str, parent: str | None, filter_string: str | None
) -> tuple[Run | None, list[Run]]:
    """(the sweep's parent run or None, every job run of the selection, whatever its
    status): one run per job of a sweep, or the experiment's runs that match the filter."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise GpoolError(f"no MLflow experiment {experiment!r} in that store")
    try:
        if parent is None and filter_string is None:
            sweep = latest_sweep(client, exp.experiment_id, experiment)
        elif parent is not None:
            sweep = client.get_run(parent)
        else:
            runs = client.search_runs([exp.experiment_id], filter_string, max_results=10000)
            return None, [r for r in runs if ROLE_TAG not in r.data.tags]
    except MlflowException as err:  # an unknown run id, a malformed filter
        raise GpoolError(err.message) from None
    return sweep, sweep_jobs(client, sweep)


def missing_jobs(parent: Run | None, runs: Sequence[Run]) -> list[str]:
    """Why jobs of the selection are not compared: each run that did not finish with its
    status (and failure), and the jobs of a sweep that have no run at all."""
    lines = []
    for run in runs:
        if run.info.status != "FINISHED":
            failure = run.data.tags.get("failure", "").splitlines()[:1]
            lines.append(f"{run.info.run_name}: {': '.join([run.info.status, *failure])}")
    expected = int(parent.data.tags.get(EXPECTED_JOBS_TAG, 0)) if parent else 0
    if expected > len(runs):
        lines.append(
            f"{expected - len(runs)} of the sweep's {expected} jobs have no run: they stopped "
            "before training began, or have not run yet"
        )
    return lines


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def summary_rows(groups: Sequence[Group]) -> list[dict[str, str | float | int]]:
    rows = []
    for g in groups:
        final, final_std, ci = mean_std_ci(g.values("final") * 100)
        best, best_std, _ = mean_std_ci(g.values("best") * 100)
        rows.append(
            {
                "group": g.name,
                "n": len(g.runs),
                "final_val_acc_mean": final,
                "final_val_acc_std": final_std,
                "ci95_low": final - ci,
                "ci95_high": final + ci,
                "best_val_acc_mean": best,
                "best_val_acc_std": best_std,
                "best_epoch_mean": float(g.values("best_epoch").mean()),
            }
        )
    return rows


def pairwise_rows(groups: Sequence[Group]) -> list[dict[str, str | float]]:
    rows = []
    for a, b in itertools.combinations(groups, 2):
        t, p = welch(a.values("final"), b.values("final"))
        diff = (a.values("final").mean() - b.values("final").mean()) * 100
        rows.append({"a": a.name, "b": b.name, "diff_points": diff, "t": t, "p": p})
    return rows


def verdict(groups: Sequence[Group], pairs: Sequence[dict]) -> str:
    if len(groups) < 2:
        return f"only one group ({groups[0].name}): nothing to compare"
    ranked = sorted(groups, key=lambda g: g.values("final").mean(), reverse=True)
    top, second = ranked[0], ranked[1]
    pair = next(p for p in pairs if {p["a"], p["b"]} == {top.name, second.name})
    diff = abs(pair["diff_points"])
    head = f"{top.name} leads {second.name} by {diff:.2f} points of final val acc"
    if math.isnan(pair["p"]):
        return f"{head}; no test possible (needs >= 2 seeds per group): not significant"
    if pair["p"] < ALPHA:
        return f"{head} (Welch p={pair['p']:.3g}): significant at {ALPHA}"
    return f"{head} (Welch p={pair['p']:.3g}): not significant at {ALPHA}"


def markdown(summary: Sequence[dict], pairs: Sequence[dict], line: str) -> str:
    out = [
        "| group | n | final val acc % (mean ± std) | 95 % CI | best val acc % (mean ± std) "
        "| epoch of best |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary:
        out.append(
            f"| {r['group']} | {r['n']} | {fmt(r['final_val_acc_mean'])} ± "
            f"{fmt(r['final_val_acc_std'])} | [{fmt(r['ci95_low'])}, {fmt(r['ci95_high'])}] | "
            f"{fmt(r['best_val_acc_mean'])} ± {fmt(r['best_val_acc_std'])} | "
            f"{r['best_epoch_mean']:.1f} |"
        )
    if pairs:
        out += ["", "| A | B | A − B (points) | Welch t | p |", "| --- | --- | --- | --- | --- |"]
        out += [
            f"| {p['a']} | {p['b']} | {p['diff_points']:+.2f} | {fmt(p['t'])} | {fmt(p['p'], 4)} |"
            for p in pairs
        ]
    return "\n".join(out + ["", f"Verdict: {line}", ""])


def mlflow_defaults() -> tuple[str, str]:
    """The tracking URI and experiment `gpool.train` would use, from the same config."""
    cfg = compose_config()
    return cfg.mlflow.tracking_uri, cfg.mlflow.experiment_name


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parent", help="parent run id of a sweep (default: the latest sweep)")
    parser.add_argument(
        "--filter",
        dest="filter_string",
        help="MLflow filter string over the experiment's runs, e.g. "
        "\"tags.dataset = 'fashion_mnist'\"",
    )
    parser.add_argument(
        "--experiment",
        help="compare every finished run of this experiment (default: the latest sweep in "
        "the config's experiment); with --filter or --parent, where to look",
    )
    parser.add_argument("--tracking-uri", help="default: the config's mlflow.tracking_uri")
    parser.add_argument(
        "--out", type=Path, help="folder for the table and figure (default: runs/compare/<id>)"
    )
    return parser.parse_args(argv)


def group_runs(client: MlflowClient, runs: Sequence[Run]) -> tuple[list[str], list[Group]]:
    """(the factors, one Group per combination of them) with each run's curves."""
    names = factors(runs)
    by_group: dict[str, list[RunCurves]] = {}
    for run in runs:
        by_group.setdefault(group_name(run, names), []).append(fetch_curves(client, run))
    return names, [Group(name, members) for name, members in sorted(by_group.items())]


def write_report(out: Path, report: str, summary: Sequence[dict], groups: Sequence[Group]):
    """comparison.md, .csv and .png in `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(report)
    with (out / "comparison.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    curves = {
        g.name: {
            "validation": [r.val_acc for r in g.runs],
            "training": [r.train_acc for r in g.runs],
        }
        for g in groups
    }
    figure = plot_group_curves(curves, out / "comparison.png")
    return [out / "comparison.md", out / "comparison.csv", figure]


def main(argv: list[str] | None = None) -> str:
    args = arguments(argv)
    default_uri, default_experiment = mlflow_defaults()
    client = open_store(args.tracking_uri or default_uri, create=False)
    filter_string = args.filter_string
    if args.experiment and args.parent is None and filter_string is None:
        filter_string = ""  # the whole experiment
    parent, jobs = select_runs(
        client, args.experiment or default_experiment, args.parent, filter_string
    )
    runs = [r for r in jobs if r.info.status == "FINISHED"]
    missing = missing_jobs(parent, jobs)
    if not runs:
        raise GpoolError("no FINISHED runs to compare in that selection; " + "; ".join(missing))
    names, groups = group_runs(client, runs)
    summary, pairs = summary_rows(groups), pairwise_rows(groups)
    line = verdict(groups, pairs)
    table = markdown(summary, pairs, line)
    if missing:
        table += "\nNot compared:\n" + "".join(f"- {m}\n" for m in missing)

    source = f"sweep {parent.info.run_name!r} ({parent.info.run_id})" if parent else "selection"
    header = f"{len(runs)} finished runs from {source}, grouped by {', '.join(names) or 'nothing'}"
    command = shlex.join(
        ["python", "-m", "gpool.compare", *(sys.argv[1:] if argv is None else argv)]
    )
    out = args.out or PROJECT_ROOT / "runs" / "compare" / (
        parent.info.run_id if parent else "selection"
    )
    # The file carries the command that made it, so a committed table can be regenerated.
    made = f"{header}; made {date.today().isoformat()} by `{command}`"
    for path in write_report(out, f"{made}\n\n{table}", summary, groups):
        if parent is not None:
            client.log_artifact(parent.info.run_id, str(path), "comparison")
    print(f"{header}\n\n{table}\nwritten to {out}")
    return line


if __name__ == "__main__":
    try:
        main()
    except GpoolError as err:
        sys.exit(f"gpool.compare: {err}")
