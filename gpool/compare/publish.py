"""A comparison written down: its report, CSV and figures in a folder, and on a sweep's
parent run in MLflow (the description the run page shows, one metric per group and
statistic, the files as artifacts, and the UI view of its runs, gpool.ui)."""

from __future__ import annotations

import csv
import math
import re
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from mlflow.entities import Metric, Run
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from gpool import PROJECT_ROOT
from gpool.compare.comparison import Comparison, compare_jobs
from gpool.compare.render import across_rows, forest_rows, pairwise_cells
from gpool.levels import MARGIN
from gpool.names import (
    ACROSS_FILE,
    COMPARISON_CURVES_FILE,
    COMPARISON_DIR,
    FOREST_FILE,
    PAIRWISE_FILE,
    REPORT_FILE,
    TABLE_FILE,
)
from gpool.plots import plot_across, plot_forest, plot_group_curves, plot_pairwise
from gpool.sequential import Plan
from gpool.store import sweep_jobs
from gpool.ui import share_comparison, ui_pointer


def write_report(
    out: Path, report: str, comparison: Comparison, figures: bool = True
) -> list[Path]:
    """comparison.md, .csv and .png (curves) in `out`, and for two groups or more
    forest.png (the ranking and its answers) and pairwise.png (or across_tasks.png);
    returns their paths. Without `figures`, the first two alone (mlflow.log_figures)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_FILE).write_text(report)
    rows = [s.row() for s in comparison.summaries]
    with (out / TABLE_FILE).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths = [out / REPORT_FILE, out / TABLE_FILE]
    if not figures:
        return paths
    curves = {
        g.name: {
            "validation": [r.val_acc for r in g.runs],
            "training": [r.train_acc for r in g.runs],
        }
        for g in comparison.groups
    }
    paths.append(plot_group_curves(curves, out / COMPARISON_CURVES_FILE))
    if comparison.across:
        pair = comparison.across[0]
        title = f"{pair.a} − {pair.b} per task and over the tasks"
        paths.append(plot_across(across_rows(pair), comparison.margin, title, out / ACROSS_FILE))
    elif comparison.pairs:
        rows = forest_rows(comparison.summaries, comparison.pairs)
        interval = f"its {comparison.pairs[0].ci_label}"
        forest = out / FOREST_FILE
        paths.append(
            plot_forest(rows, comparison.margin, f"{comparison.split} acc", interval, forest)
        )
        names = [r["group"] for r in rows]
        paths.append(plot_pairwise(names, pairwise_cells(comparison.pairs), out / PAIRWISE_FILE))
    return paths


def report_files(out: Path, comparison: Comparison, made: str, figures: bool = True) -> list[Path]:
    """comparison.md (headed by how it was made), .csv and (given `figures`) .png in `out`."""
    report = f"{comparison.header}; {made}\n\n{comparison.table}"
    return write_report(out, report, comparison, figures)


def metric_key(group: str, statistic: str) -> str:
    """`pool=avg`, `val_acc_mean` -> `pool.avg.val_acc_mean` (MLflow's metric-key rules)."""
    return re.sub(r"[^\w.\-/]", "_", f"{group.replace('=', '.').replace(' ', '/')}.{statistic}")


def default_out(parent: Run | None) -> Path:
    return PROJECT_ROOT / "runs" / "compare" / (parent.info.run_id if parent else "selection")


def publish(client: MlflowClient, parent: Run, comparison: Comparison, paths: list[Path]) -> str:
    """Put a comparison on the sweep's parent run: the table and verdict as its description
    (shown on its page), one metric per group and statistic, and the report's files
    (`paths`: table, CSV, figure) as artifacts; share the UI view of its runs and return
    what to print about it (see gpool.ui)."""
    run_id = parent.info.run_id
    for path in paths:
        client.log_artifact(run_id, str(path), COMPARISON_DIR)
    client.set_tag(run_id, MLFLOW_RUN_NOTE, comparison.note())
    now = int(time.time() * 1000)
    metrics = []
    for s in comparison.summaries:
        statistics = {
            f"{s.split}_acc_mean": s.mean,
            f"{s.split}_acc_std": s.std,
            f"{s.split}_acc_ci_low": s.ci_low,
            f"{s.split}_acc_ci_high": s.ci_high,
        }
        metrics += [
            Metric(metric_key(s.group, k), v, now, 0)
            for k, v in statistics.items()
            if not math.isnan(v)
        ]
    client.log_batch(run_id, metrics=metrics)
    url = share_comparison(client, parent, comparison.factors, final_range(comparison))
    return ui_pointer(client.tracking_uri, url)


def final_range(comparison: Comparison) -> tuple[float, float]:
    """The accuracies (fractions, as runs log them) that hold every group's final interval
    (its mean, where one seed gives none), with a fifth of the span (at least half a
    point) to spare on each side."""
    ends = [
        v for s in comparison.summaries for v in (s.ci_low, s.ci_high, s.mean) if not math.isnan(v)
    ]
    low, high = min(ends), max(ends)
    pad = max(0.5, (high - low) / 5)
    return max(0.0, (low - pad) / 100), min(1.0, (high + pad) / 100)


def publish_comparison(
    client: MlflowClient,
    run_id: str,
    out: Path,
    margin: float = MARGIN,
    tune: Sequence[str] | None = None,
    plan: Plan | None = None,
    figures: bool = True,
) -> tuple[Comparison, str]:
    """At the end of a sweep: compare its jobs (each group at its best `tune` values, for a
    search; by its rule, for a decide sweep), write the report (with its figures, given
    `figures`) to `out` and put it on the sweep's parent run; returns the comparison and
    where the UI shows it."""
    parent = client.get_run(run_id)
    jobs = sweep_jobs(client, parent)
    comparison = compare_jobs(client, parent, jobs, tune=tune, margin=margin, plan=plan)
    made = f"made {date.today().isoformat()} as the sweep ended"
    files = report_files(out, comparison, made, figures)
    return comparison, publish(client, parent, comparison, files)
