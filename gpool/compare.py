"""`python -m gpool.compare`: is one head really better? Statistics across seeds from MLflow.

Reads a sweep's runs through MLflow's query API, groups them by the factors the sweep varied
(all but the seed), and reports per group the final and best validation accuracy with a 95 %
confidence interval; between groups a t-test (paired by seed when both groups ran the same
seeds, else Welch's), its p-value Holm-adjusted over all pairs, and the smallest difference
the seeds could detect at 80 % power (statsmodels); and a verdict, on the adjusted p-values,
that says "not significant" when it is not. The table (Markdown, CSV) and a mean ± std curve
figure are written to disk and logged on the sweep's parent run.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import re
import shlex
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from functools import cached_property, partial
from pathlib import Path

import numpy as np
from mlflow.entities import Metric, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH
from scipy.stats import t as student_t

from gpool import PROJECT_ROOT, stats
from gpool.config import GROUPS, compose_config
from gpool.errors import GpoolError
from gpool.names import (
    COMPARISON_CURVES_FILE,
    COMPARISON_DIR,
    EXPECTED_JOBS_TAG,
    FAILURE_TAG,
    FOREST_FILE,
    PAIRWISE_FILE,
    REPORT_FILE,
    ROLE_TAG,
    TABLE_FILE,
)
from gpool.plots import LEADER, plot_forest, plot_group_curves, plot_pairwise
from gpool.predictions import ImageScores, fetch_image_scores
from gpool.resume import affects_result
from gpool.stats import ALPHA, MARGIN, POWER
from gpool.store import (
    metric_histories,
    one_per_config,
    open_store,
    search_all,
    sweep_jobs,
    sweeps,
)
from gpool.ui import share_comparison, ui_pointer

#: Parallel requests while reading runs' predictions (a listing and a download a run).
FETCHERS = 16
#: The metrics read back as a run's curves, in RunCurves' order.
CURVES = ("val_acc", "train_acc", "test_acc")


@dataclass
class RunCurves:
    """One run's accuracy per epoch (test accuracy only for runs with a holdout), and per
    split its per-image scores or why it has none (gpool.predictions)."""

    run: Run
    val_acc: list[float]
    train_acc: list[float]
    test_acc: list[float] = field(default_factory=list)
    images: dict[str, ImageScores | str] = field(default_factory=dict)

    @property
    def final(self) -> float:
        return self.val_acc[-1]

    @property
    def final_test(self) -> float:
        return self.test_acc[-1] if self.test_acc else math.nan

    @property
    def best(self) -> float:
        return max(self.val_acc)

    @property
    def best_epoch(self) -> int:
        return int(np.argmax(self.val_acc)) + 1


@dataclass
class Group:
    """Runs that differ only in their seed; judged by their final val acc, or, once tuned
    on the validation split, by their final test acc."""

    name: str
    runs: list[RunCurves]
    score: str = "final"  # or "final_test"

    @property
    def split(self) -> str:
        return "test" if self.score == "final_test" else "val"

    def values(self, attr: str) -> np.ndarray:
        return np.array([getattr(r, attr) for r in self.runs])

    def scores(self) -> np.ndarray:
        return self.values(self.score)

    def seeds(self) -> list[str]:
        return [r.run.data.params.get("seed", "") for r in self.runs]

    def image_scores(self) -> ImageScores | str:
        """Its runs' per-image scores on its split ([runs x images]), or why not all have
        them on the same images."""
        scores = [r.images.get(self.split, "no predictions read") for r in self.runs]
        for run, s in zip(self.runs, scores, strict=True):
            if isinstance(s, str):
                return f"{run.run.info.run_name}: {s}"
        if any(not np.array_equal(s.labels, scores[0].labels) for s in scores):
            return f"the runs of {self.name} scored different images"
        return ImageScores(np.stack([s.correct for s in scores]), scores[0].labels)


def mean_std_ci(values: np.ndarray) -> tuple[float, float, float]:
    """Mean, sample std and the half-width of the t-based 95 % confidence interval."""
    n = len(values)
    if n < 2:
        return float(values.mean()), math.nan, math.nan
    std = float(values.std(ddof=1))
    return float(values.mean()), std, float(student_t.ppf(0.975, n - 1) * std / math.sqrt(n))


@dataclass
class Pair:
    """Two groups' scores (fractions), aligned by seed when the test is paired, with their
    per-image scores ([seeds x images], aligned alike) or why the pair has none."""

    a: np.ndarray
    b: np.ndarray
    paired: bool
    images: tuple[np.ndarray, np.ndarray] | str = "no predictions read"
    #: The runs' scores in each bootstrap draw of the images (image_draws), aligned alike.
    draws: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def of(cls, a: Group, b: Group, draws: dict[str, np.ndarray] | None = None) -> Pair:
        """Paired when both groups ran the same seeds, each once: run s of A and run s of B
        then share their initial weights and their batch order."""
        seeds_a, seeds_b = a.seeds(), b.seeds()
        same = sorted(seeds_a) == sorted(seeds_b) and len(set(seeds_a)) == len(seeds_a)
        paired = same and len(seeds_a) >= 2
        order_a = np.argsort(seeds_a) if paired else np.arange(len(seeds_a))
        order_b = np.argsort(seeds_b) if paired else np.arange(len(seeds_b))
        images = pair_images(a.image_scores(), b.image_scores())
        drawn = None
        if not isinstance(images, str):
            images = images[0][order_a], images[1][order_b]
            if draws and a.name in draws and b.name in draws:
                drawn = draws[a.name][:, order_a], draws[b.name][:, order_b]
        return cls(a.scores()[order_a], b.scores()[order_b], paired, images, drawn)

    @property
    def test(self) -> str:
        return "paired t" if self.paired else "Welch"

    @property
    def covers(self) -> str:
        """What the pair's interval covers."""
        if isinstance(self.images, str):
            return "seeds alone"
        return f"seeds and {self.images[0].shape[1]} images"

    @cached_property
    def image_var(self) -> float:
        """The test images' share of the difference's variance (points squared), computed
        once: the interval, the power and the seeds needed all read it."""
        if isinstance(self.images, str):
            return 0.0
        return stats.image_variance(*self.images, self.paired) * 100**2

    def points(self) -> stats.Difference:
        """A - B in points of accuracy, with its standard error over seeds and images."""
        return stats.difference(self.a * 100, self.b * 100, self.paired, self.image_var)

    def improvement(self, level: float) -> tuple[float, float, float]:
        """P(A > B) over the pair's runs, and its `level` bootstrap interval (over seeds
        and images when the pair has the images' draws)."""
        runs = self.draws if self.draws is not None else (self.a, self.b)
        low, high = stats.improvement_interval(*runs, self.paired, level)
        return float(stats.improvement(self.a, self.b)), low, high

    def spread(self) -> float:
        """The std (points) the power analysis scales by: of the per-seed differences when
        paired, else the pooled std of the two groups."""
        if min(len(self.a), len(self.b)) < 2:
            return math.nan
        if self.paired:
            return float(np.std(self.a - self.b, ddof=1)) * 100
        n_a, n_b = len(self.a), len(self.b)
        pooled = (n_a - 1) * np.var(self.a, ddof=1) + (n_b - 1) * np.var(self.b, ddof=1)
        return float(math.sqrt(pooled / (n_a + n_b - 2))) * 100

    def detectable(self, alpha: float = ALPHA) -> float:
        """The smallest difference (points) these seeds detect with POWER at `alpha`."""
        n_a, n_b, spread = len(self.a), len(self.b), self.spread()
        return stats.detectable(spread, n_a, n_b, self.paired, alpha, POWER, self.image_var)

    def seeds_needed(self, points: float, alpha: float = ALPHA) -> float:
        """Seeds per group to detect a difference of `points` with POWER at `alpha`."""
        spread, image_var = self.spread(), self.image_var
        return stats.seeds_needed(spread, points, self.paired, alpha, POWER, image_var)


def pair_images(a: ImageScores | str, b: ImageScores | str) -> tuple[np.ndarray, np.ndarray] | str:
    """Both groups' per-image scores, if both have them on the same images; else why not."""
    for scores in (a, b):
        if isinstance(scores, str):
            return scores
    if not np.array_equal(a.labels, b.labels):
        return "the groups scored different images"
    return a.correct, b.correct


def image_draws(groups: Sequence[Group]) -> dict[str, np.ndarray]:
    """Per group with per-image scores, its runs' scores in each bootstrap draw of the
    images ([draws x runs]), for P(A > B)'s two-way interval. Drawn once for the whole
    table (groups on as many images share the draws, in the order the groups come), not
    once per pair: 21 pairs of 40 runs on 10,000 images took 12 s that way."""
    rng = np.random.default_rng(0)
    by_images: dict[int, dict[str, np.ndarray]] = {}
    for group in groups:
        scores = group.image_scores()
        if not isinstance(scores, str):
            by_images.setdefault(scores.correct.shape[1], {})[group.name] = scores.correct
    draws = {}
    for named in by_images.values():
        draws.update(zip(named, stats.image_resampled(list(named.values()), rng), strict=True))
    return draws


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
        f"{n}={run.data.tags.get(n, 'unset') if n in GROUPS else run.data.params.get(n)}"
        for n in names
    )


def fetch_images(client: MlflowClient, curves: RunCurves) -> RunCurves:
    """`curves` with, per split its run scored, that run's per-image scores."""
    finals = {"val": curves.final, "test": curves.final_test}
    splits = ("val", "test") if curves.test_acc else ("val",)
    curves.images = fetch_image_scores(client, curves.run, {s: finals[s] for s in splits})
    return curves


def fetch_all(client: MlflowClient, runs: Sequence[Run]) -> list[RunCurves]:
    """Every run's curves (each metric's histories in bulk, see metric_histories; a metric
    a run never logged, such as test_acc without a holdout, is not asked for) and its
    predictions, FETCHERS runs at a time (a listing and a download a run). At interpreter
    exit (a sweep closed by its atexit hook) no new threads start: then one by one."""
    histories = {
        key: metric_histories(client, [r.info.run_id for r in runs if key in r.data.metrics], key)
        for key in CURVES
    }

    def series(run: Run, key: str) -> list[float]:
        history = sorted(histories[key].get(run.info.run_id, []), key=lambda m: m.step)
        return [m.value for m in history]

    curves = [RunCurves(run, *(series(run, key) for key in CURVES)) for run in runs]
    try:
        with ThreadPoolExecutor(FETCHERS) as pool:
            return list(pool.map(partial(fetch_images, client), curves))
    except RuntimeError:
        return [fetch_images(client, c) for c in curves]


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
    status): one run per job of a sweep, or per config among the experiment's runs that
    match the filter."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise GpoolError(f"no MLflow experiment {experiment!r} in that store")
    try:
        if parent is None and filter_string is None:
            sweep = latest_sweep(client, exp.experiment_id, experiment)
        elif parent is not None:
            sweep = client.get_run(parent)
        else:
            runs = search_all(client, [exp.experiment_id], filter_string)
            return None, one_per_config(r for r in runs if ROLE_TAG not in r.data.tags)
    except MlflowException as err:  # an unknown run id, a malformed filter
        raise GpoolError(err.message) from None
    return sweep, sweep_jobs(client, sweep)


def missing_jobs(parent: Run | None, runs: Sequence[Run]) -> list[str]:
    """Why jobs of the selection are not compared: each run that did not finish with its
    status (and failure), and the jobs of a sweep that have no run at all."""
    lines = []
    for run in runs:
        if run.info.status != "FINISHED":
            failure = run.data.tags.get(FAILURE_TAG, "").splitlines()[:1]
            lines.append(f"{run.info.run_name}: {': '.join([run.info.status, *failure])}")
        elif "val_acc" not in run.data.metrics:
            lines.append(f"{run.info.run_name}: FINISHED without val_acc (no gpool training run)")
    expected = int(parent.data.tags.get(EXPECTED_JOBS_TAG, 0)) if parent else 0
    if expected > len(runs):
        lines.append(
            f"{expected - len(runs)} of the sweep's {expected} jobs have no run: they stopped "
            "before training began, or have not run yet"
        )
    return lines


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def final_key(split: str, statistic: str) -> str:
    """The summary rows' column of a group's final accuracy on `split`: its mean or std."""
    return f"final_{split}_acc_{statistic}"


def summary_rows(groups: Sequence[Group]) -> list[dict[str, str | float | int]]:
    rows = []
    for g in groups:
        final, final_std, ci = mean_std_ci(g.scores() * 100)
        best, best_std, _ = mean_std_ci(g.values("best") * 100)
        rows.append(
            {
                "group": g.name,
                "n": len(g.runs),
                final_key(g.split, "mean"): final,
                final_key(g.split, "std"): final_std,
                "ci95_low": final - ci,
                "ci95_high": final + ci,
                "best_val_acc_mean": best,
                "best_val_acc_std": best_std,
                "best_epoch_mean": float(g.values("best_epoch").mean()),
            }
        )
    return rows


def pairwise_rows(
    groups: Sequence[Group],
    detect: float | None = None,
    margin: float = MARGIN,
    alpha: float = ALPHA,
) -> list[dict]:
    """Every pair of groups: the difference with its 1 - `alpha` interval (over seeds and
    test images when the runs logged their predictions), the test of a difference and
    TOST's of equivalence within ±`margin` points, both Holm-adjusted over the pairs, the
    answer (see stats.decide), P(A > B) with its interval and the detectable difference,
    at `alpha`; the seeds per group that would most likely decide an undecided pair at
    `alpha` split over the pairs (Bonferroni: Holm's strictest step, so the count still
    holds in a table of many pairs); given `detect` points, also the seeds a group would
    need to detect that."""
    rows, draws = [], image_draws(groups)
    plan_alpha = alpha / max(1, math.comb(len(groups), 2))
    for a, b in itertools.combinations(groups, 2):
        pair = Pair.of(a, b, draws)
        d = pair.points()
        low, high = d.interval(1 - alpha)
        improvement, improvement_low, improvement_high = pair.improvement(1 - alpha)
        row = {
            "a": a.name,
            "b": b.name,
            "diff_points": d.diff,
            "ci_low": low,
            "ci_high": high,
            "covers": pair.covers,
            "seeds_alone_because": pair.images if isinstance(pair.images, str) else "",
            "test": pair.test,
            "t": d.diff / d.se if d.testable else math.nan,
            "p": d.p_difference(),
            "p_equivalence": d.p_equivalence(margin),
            "p_improvement": improvement,
            "p_improvement_low": improvement_low,
            "p_improvement_high": improvement_high,
            "detectable_points": pair.detectable(alpha),
            "seeds_to_decide": stats.seeds_to_decide(
                pair.spread(), d.diff, margin, pair.paired, plan_alpha, POWER, pair.image_var
            ),
        }
        if detect is not None:
            row["seeds_needed"] = pair.seeds_needed(detect, alpha)
        rows.append(row)
    holm_diff = stats.holm([r["p"] for r in rows])
    holm_equiv = stats.holm([r["p_equivalence"] for r in rows])
    for row, p_diff, p_equiv in zip(rows, holm_diff, holm_equiv, strict=True):
        row["p_holm"], row["p_equivalence_holm"] = p_diff, p_equiv
        interval = (row["ci_low"], row["ci_high"])
        row["answer"] = stats.decide(p_diff, p_equiv, interval, margin, alpha)
    return rows


def answer_words(row: dict, margin: float) -> str:
    """A pair's answer in words, as the verdict leads with it."""
    if row["answer"] in (stats.BETTER, stats.BETTER_WITHIN):
        winner, loser = (row["a"], row["b"]) if row["diff_points"] > 0 else (row["b"], row["a"])
        within = ", by less than the margin" if row["answer"] == stats.BETTER_WITHIN else ""
        return f"{winner} is better than {loser} by {abs(row['diff_points']):.2f} points{within}"
    if row["answer"] == stats.EQUIVALENT:
        return f"{row['a']} and {row['b']} are equivalent within ±{margin:g} points"
    return f"{row['a']} vs {row['b']}: undecided"


def leader_first(row: dict, leader: str) -> dict:
    """The pair's row with `leader` as A."""
    if row["a"] == leader:
        return row
    flipped = {**row, "a": row["b"], "b": row["a"], "diff_points": -row["diff_points"]}
    flipped["ci_low"], flipped["ci_high"] = -row["ci_high"], -row["ci_low"]
    flipped["p_improvement"] = 1 - row["p_improvement"]
    flipped["p_improvement_low"] = 1 - row["p_improvement_high"]
    flipped["p_improvement_high"] = 1 - row["p_improvement_low"]
    return flipped


def pair_row(pairs: Sequence[dict], a: str, b: str) -> dict:
    """The row of the pair of groups `a` and `b` among `pairs`, with `a` as A."""
    return leader_first(next(p for p in pairs if {p["a"], p["b"]} == {a, b}), a)


def verdict(
    groups: Sequence[Group], pairs: Sequence[dict], margin: float = MARGIN, alpha: float = ALPHA
) -> str:
    """The answer for the leader against the runner-up, in words first, then the numbers
    behind it; for an undecided pair, how many seeds per group would most likely decide."""
    if len(groups) < 2:
        return f"only one group ({groups[0].name}): nothing to compare"
    ranked = sorted(groups, key=lambda g: g.scores().mean(), reverse=True)
    top, second = ranked[0], ranked[1]
    row = pair_row(pairs, top.name, second.name)
    words = answer_words(row, margin)
    if math.isnan(row["p"]):
        return (
            f"{words} ({top.name} leads by {row['diff_points']:.2f} points of final "
            f"{top.split} acc; no test possible: needs >= 2 seeds per group, and paired "
            "differences that vary)"
        )
    family = f", Holm over {len(pairs)} pairs" if len(pairs) > 1 else ""
    numbers = (
        f"{top.name} − {second.name} = {row['diff_points']:+.2f} points of final {top.split} "
        f"acc, {ci_label(alpha)} [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}] over "
        f"{row['covers']}; {row['test']} p={row['p_holm']:.3g}, equivalence within "
        f"±{margin:g} (TOST) p={row['p_equivalence_holm']:.3g}{family}; P({top.name} > "
        f"{second.name}) = {row['p_improvement']:.2f} [{row['p_improvement_low']:.2f}, "
        f"{row['p_improvement_high']:.2f}]"
    )
    more = row["seeds_to_decide"]
    if row["answer"] != stats.UNDECIDED or math.isnan(more):
        return f"{words} ({numbers})"
    if math.isinf(more):
        return (
            f"{words} ({numbers}); no seed count decides it: the difference sits at the "
            "margin, or within the test images' own noise"
        )
    return f"{words} ({numbers}); about {more:.0f} seeds per group would most likely decide it"


def ci_label(alpha: float) -> str:
    return f"{(1 - alpha) * 100:.4g}% CI"


def markdown(
    summary: Sequence[dict], pairs: Sequence[dict], line: str, split: str, alpha: float = ALPHA
) -> str:
    out = [
        f"| group | n | final {split} acc % (mean ± std) | 95 % CI | best val acc % (mean ± std) "
        "| epoch of best |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary:
        out.append(
            f"| {r['group']} | {r['n']} | {fmt(r[final_key(split, 'mean')])} ± "
            f"{fmt(r[final_key(split, 'std')])} | [{fmt(r['ci95_low'])}, {fmt(r['ci95_high'])}] | "
            f"{fmt(r['best_val_acc_mean'])} ± {fmt(r['best_val_acc_std'])} | "
            f"{r['best_epoch_mean']:.1f} |"
        )
    if pairs:
        out += ["", *pair_table(pairs, alpha)]
    if alone := sorted({p["seeds_alone_because"] for p in pairs} - {""}):
        out += [
            "",
            "Intervals over seeds alone, not the test images (the runs logged no usable "
            "per-image predictions): " + "; ".join(alone[:3]) + ("; ..." if len(alone) > 3 else ""),
        ]
    if alpha < ALPHA:
        out += [
            "",
            f"Each pair is decided at α = {alpha:.3g}: a sequential sweep's share of {ALPHA} "
            "over its planned rounds (Bonferroni), so that looking after every round keeps "
            f"the chance of any wrong answer below {ALPHA}.",
        ]
    return "\n".join(out + ["", f"Verdict: {line}", ""])


def pair_table(pairs: Sequence[dict], alpha: float = ALPHA) -> list[str]:
    detect = "seeds_needed" in pairs[0]
    head = (
        f"| A | B | answer | A − B (points) | {ci_label(alpha)} | covers | test | p (Holm) | "
        f"equivalence p (TOST, Holm) | P(A > B) | detectable at {POWER:.0%} power (points) | "
        "seeds to decide |" + (" seeds a group for the --detect difference |" * detect)
    )
    out = [head, "| --- " * (12 + detect) + "|"]
    for p in pairs:
        to_decide = fmt(p["seeds_to_decide"], 0) if p["answer"] == stats.UNDECIDED else "-"
        improvement = (
            f"{fmt(p['p_improvement'])} [{fmt(p['p_improvement_low'])}, "
            f"{fmt(p['p_improvement_high'])}]"
        )
        out.append(
            f"| {p['a']} | {p['b']} | {p['answer']} | {p['diff_points']:+.2f} | "
            f"[{fmt(p['ci_low'])}, {fmt(p['ci_high'])}] | {p['covers']} | {p['test']} | "
            f"{fmt(p['p_holm'], 4)} | {fmt(p['p_equivalence_holm'], 4)} | {improvement} | "
            f"{fmt(p['detectable_points'])} | {to_decide} |"
            + (f" {fmt(p['seeds_needed'], 0)} |" if detect else "")
        )
    return out


def mlflow_target(tracking_uri: str | None, experiment: str | None) -> tuple[str, str]:
    """The tracking URI and experiment given, or else those `gpool.train` would use, from
    the same config (composed only then: it takes about a second)."""
    if tracking_uri is None or experiment is None:
        cfg = compose_config()
        tracking_uri = tracking_uri or cfg.mlflow.tracking_uri
        experiment = experiment or cfg.mlflow.experiment_name
    return tracking_uri, experiment


def positive_points(text: str) -> float:
    """An argument in points of accuracy: a number > 0 and below 100."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 100:
        raise argparse.ArgumentTypeError(f"{text!r} is no number of points in (0, 100)")
    return value


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
    parser.add_argument(
        "--tune",
        nargs="+",
        metavar="KEY",
        help="per group, pick the value of these swept keys (e.g. optimizer.lr) with the best "
        "mean val acc, then compare test accuracy at those values (needs dataset.holdout > 0)",
    )
    parser.add_argument(
        "--margin",
        type=positive_points,
        default=MARGIN,
        metavar="POINTS",
        help="two groups count as equivalent when their difference lies within ±POINTS points "
        f"of accuracy (default {MARGIN:g}; TOST at the family-wise level)",
    )
    parser.add_argument(
        "--detect",
        type=positive_points,
        metavar="POINTS",
        help="also state, per pair, the seeds per group needed to detect a difference of "
        f"POINTS points of accuracy at {POWER * 100:.0f}%% power",
    )
    return parser.parse_args(argv)


def group_by(curves: Sequence[RunCurves], names: Sequence[str]) -> list[Group]:
    """One Group per combination of the factors `names`."""
    by_group: dict[str, list[RunCurves]] = {}
    for c in curves:
        by_group.setdefault(group_name(c.run, names), []).append(c)
    return [Group(name, members) for name, members in sorted(by_group.items())]


def tune_groups(
    curves: Sequence[RunCurves], names: Sequence[str], keys: Sequence[str]
) -> tuple[list[str], list[Group], list[str]]:
    """Per group of the factors other than `keys`: the value of `keys` whose runs have the
    best mean final val acc over seeds, those runs then judged on the test split. Returns
    (the remaining factors, the tuned groups, a line per group on what was chosen)."""
    no_holdout = [c.run.info.run_name for c in curves if not c.test_acc]
    if no_holdout:
        raise GpoolError(
            "--tune picks values by validation accuracy, and these runs validated on the test "
            f"split ({', '.join(no_holdout[:3])}...): tuning on it leaks the test set into the "
            "answer. Train with a held-out validation split: dataset.holdout=5000"
        )
    if unknown := [k for k in keys if k not in names]:
        raise GpoolError(
            f"--tune {' '.join(unknown)}: not varied by these runs (they vary: "
            f"{', '.join(names) or 'nothing but the seed'})"
        )
    others = [n for n in names if n not in keys]
    groups, chosen = [], []
    for candidates in group_by(curves, others):
        values = group_by(candidates.runs, keys)
        best = max(values, key=lambda v: v.scores().mean())
        groups.append(Group(candidates.name, best.runs, score="final_test"))
        tried = ", ".join(f"{v.name}: {v.scores().mean() * 100:.2f}" for v in values)
        chosen.append(f"{candidates.name}: {best.name} (mean final val acc % {tried})")
    return others, groups, chosen


def versus(row: dict) -> str:
    """A pair's answer from its A group's side: better or worse (either qualified by the
    margin), equivalent, undecided."""
    losing = {stats.BETTER: stats.WORSE, stats.BETTER_WITHIN: stats.WORSE_WITHIN}
    return losing.get(row["answer"], row["answer"]) if row["diff_points"] < 0 else row["answer"]


def forest_rows(comparison: Comparison) -> list[dict]:
    """Per group, best first: its final accuracy with its interval over seeds, its answer
    against the leader and their difference's interval (plots.plot_forest)."""
    key = final_key(comparison.groups[0].split, "mean")
    ranked = sorted(comparison.summary, key=lambda r: r[key], reverse=True)
    leader = ranked[0]["group"]
    rows = []
    for summary in ranked:
        row = {
            "group": summary["group"],
            "mean": summary[key],
            "low": summary["ci95_low"],
            "high": summary["ci95_high"],
            "answer": LEADER,
            "label": LEADER,
        }
        if summary["group"] != leader:
            pair = pair_row(comparison.pairs, row["group"], leader)
            row["answer"] = versus(pair)
            row["label"] = (
                f"{row['answer']}: {pair['diff_points']:+.2f} "
                f"[{pair['ci_low']:+.2f}, {pair['ci_high']:+.2f}]"
            )
        rows.append(row)
    return rows


def pairwise_cells(pairs: Sequence[dict]) -> dict[tuple[str, str], dict]:
    """Each ordered pair of groups: A minus B in points and A's answer against B."""
    cells = {}
    for pair in pairs:
        for a, b in ((pair["a"], pair["b"]), (pair["b"], pair["a"])):
            row = leader_first(pair, a)
            cells[(a, b)] = {"diff": row["diff_points"], "answer": versus(row)}
    return cells


def write_report(out: Path, report: str, comparison: Comparison) -> list[Path]:
    """comparison.md, .csv and .png (curves) in `out`, and for two groups or more
    forest.png (the ranking and its answers) and pairwise.png; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_FILE).write_text(report)
    with (out / TABLE_FILE).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(comparison.summary[0]))
        writer.writeheader()
        writer.writerows(comparison.summary)
    curves = {
        g.name: {
            "validation": [r.val_acc for r in g.runs],
            "training": [r.train_acc for r in g.runs],
        }
        for g in comparison.groups
    }
    paths = [out / REPORT_FILE, out / TABLE_FILE]
    paths.append(plot_group_curves(curves, out / COMPARISON_CURVES_FILE))
    if comparison.pairs:
        rows, split = forest_rows(comparison), comparison.groups[0].split
        interval = f"its {ci_label(comparison.alpha)}"
        paths.append(
            plot_forest(rows, comparison.margin, f"{split} acc", interval, out / FOREST_FILE)
        )
        names = [r["group"] for r in rows]
        paths.append(plot_pairwise(names, pairwise_cells(comparison.pairs), out / PAIRWISE_FILE))
    return paths


@dataclass
class Comparison:
    """What `gpool.compare` reports on a selection of runs."""

    header: str  # which runs, grouped by what
    table: str  # Markdown: the tables, the verdict, what was not compared
    line: str  # the verdict
    summary: list[dict]
    groups: list[Group]
    factors: list[str] = field(default_factory=list)  # what the groups differ in
    pairs: list[dict] = field(default_factory=list)  # pairwise_rows: every pair's answer
    margin: float = MARGIN  # the equivalence margin the answers used
    alpha: float = ALPHA  # ... and their level

    def note(self) -> str:
        """The run description: the whole report, or, past MLflow's limit on a tag's value
        (many groups), the verdict and where the tables are."""
        note = f"Verdict: {self.line}\n\n{self.header}\n\n{self.table}"
        if len(note) <= MAX_TAG_VAL_LENGTH:
            return note
        return (
            f"Verdict: {self.line}\n\n{self.header}\n\nThe tables are too long for a run "
            "description: see the artifact comparison/comparison.md."
        )


def compare_jobs(
    client: MlflowClient,
    parent: Run | None,
    jobs: Sequence[Run],
    detect: float | None = None,
    tune: Sequence[str] | None = None,
    margin: float = MARGIN,
    alpha: float = ALPHA,
) -> Comparison:
    """Compare the FINISHED runs among `jobs` (of sweep `parent`, if any); the others, and a
    sweep's jobs without a run, are listed as not compared."""
    runs = [r for r in jobs if r.info.status == "FINISHED" and "val_acc" in r.data.metrics]
    missing = missing_jobs(parent, jobs)
    if not runs:
        raise GpoolError("no FINISHED runs to compare in that selection; " + "; ".join(missing))
    curves = fetch_all(client, runs)
    names = factors(runs)
    chosen: list[str] = []
    if tune:
        names, groups, chosen = tune_groups(curves, names, tune)
    else:
        groups = group_by(curves, names)
    summary, pairs = summary_rows(groups), pairwise_rows(groups, detect, margin, alpha)
    line = verdict(groups, pairs, margin, alpha)
    table = markdown(summary, pairs, line, groups[0].split, alpha)
    if chosen:
        table = (
            f"Tuned {' '.join(tune)} on the validation split; chosen per group:\n"
            + "".join(f"- {c}\n" for c in chosen)
            + f"\nAt those values, on the test split:\n\n{table}"
        )
    if missing:
        table += "\nNot compared:\n" + "".join(f"- {m}\n" for m in missing)
    source = f"sweep {parent.info.run_name!r} ({parent.info.run_id})" if parent else "selection"
    header = f"{len(runs)} finished runs from {source}, grouped by {', '.join(names) or 'nothing'}"
    return Comparison(header, table, line, summary, groups, names, pairs, margin, alpha)


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
    for row, group in zip(comparison.summary, comparison.groups, strict=True):
        split = group.split
        statistics = {
            f"{split}_acc_mean": row[final_key(split, "mean")],
            f"{split}_acc_std": row[final_key(split, "std")],
            f"{split}_acc_ci_low": row["ci95_low"],
            f"{split}_acc_ci_high": row["ci95_high"],
        }
        metrics += [
            Metric(metric_key(group.name, k), v, now, 0)
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
    key = final_key(comparison.groups[0].split, "mean")
    ends = [
        v
        for row in comparison.summary
        for v in (row["ci95_low"], row["ci95_high"], row[key])
        if not math.isnan(v)
    ]
    low, high = min(ends), max(ends)
    pad = max(0.5, (high - low) / 5)
    return max(0.0, (low - pad) / 100), min(1.0, (high + pad) / 100)


def report_files(out: Path, comparison: Comparison, made: str) -> list[Path]:
    """comparison.md (headed by how it was made), .csv and .png in `out`."""
    report = f"{comparison.header}; {made}\n\n{comparison.table}"
    return write_report(out, report, comparison)


def publish_comparison(
    client: MlflowClient,
    run_id: str,
    out: Path,
    margin: float = MARGIN,
    alpha: float = ALPHA,
    tune: Sequence[str] | None = None,
) -> tuple[Comparison, str]:
    """At the end of a sweep: compare its jobs (each group at its best `tune` values, for a
    search), write the report to `out` and put it on the sweep's parent run; returns the
    comparison and where the UI shows it."""
    parent = client.get_run(run_id)
    jobs = sweep_jobs(client, parent)
    comparison = compare_jobs(client, parent, jobs, tune=tune, margin=margin, alpha=alpha)
    made = f"made {date.today().isoformat()} as the sweep ended"
    return comparison, publish(client, parent, comparison, report_files(out, comparison, made))


def main(argv: list[str] | None = None) -> str:
    args = arguments(argv)
    tracking_uri, experiment = mlflow_target(args.tracking_uri, args.experiment)
    client = open_store(tracking_uri, create=False)
    filter_string = args.filter_string
    if args.experiment and args.parent is None and filter_string is None:
        filter_string = ""  # the whole experiment
    parent, jobs = select_runs(client, experiment, args.parent, filter_string)
    comparison = compare_jobs(client, parent, jobs, args.detect, args.tune, args.margin)
    command = shlex.join(
        ["python", "-m", "gpool.compare", *(sys.argv[1:] if argv is None else argv)]
    )
    # The file carries the command that made it, so a committed table can be regenerated.
    made = f"made {date.today().isoformat()} by `{command}`"
    out = args.out or default_out(parent)
    try:
        paths = report_files(out, comparison, made)
    except OSError as err:
        raise GpoolError(f"cannot write the report to {out} ({err.strerror}); pass --out") from None
    print(f"{comparison.header}\n\n{comparison.table}\nwritten to {out}", flush=True)
    if parent is not None:
        try:
            print(publish(client, parent, comparison, paths))
        except (MlflowException, OSError) as err:  # a read-only store, a refusing server
            first = (getattr(err, "message", None) or str(err)).splitlines()[0][:300]
            raise GpoolError(
                f"the comparison is written to {out} but could not be put on the sweep's run "
                f"({first})"
            ) from None
    return comparison.line


if __name__ == "__main__":
    try:
        main()
    except GpoolError as err:
        sys.exit(f"gpool.compare: {err}")
