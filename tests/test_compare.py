"""`python -m gpool.compare` and the MLflow server/UI, on a real tiny sweep."""

from __future__ import annotations

import csv
import http.server
import json
import math
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from conftest import (
    SHORT,
    SHORT_WITH_MODEL,
    compare,
    job_runs,
    make_idx_root,
    run_gpool,
    store,
)
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from mlflow.utils.rest_utils import http_request
from scipy import stats
from statsmodels.stats.power import TTestPower

from gpool import stats as gstats
from gpool import store as gstore
from gpool.bench.server import mlflow_server
from gpool.compare.comparison import Comparison, compare_groups
from gpool.compare.publish import final_range, write_report
from gpool.compare.render import forest_rows, pairwise_cells
from gpool.compare.runs import Group, RunCurves, factors, select_runs
from gpool.compare.samples import Pair, mean_std_ci
from gpool.compare.verdict import pair_results
from gpool.plots import group_figure
from gpool.predictions import ImageScores, fetch_image_scores
from gpool.store import metric_histories
from gpool.ui import LOCAL_UI, share_comparison

if TYPE_CHECKING:
    from playwright.sync_api import Page

#: Every test here reads the one tiny sweep: they share it on one worker.
pytestmark = [pytest.mark.process, pytest.mark.xdist_group("compare-sweep")]
CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2 heads x 3 seeds sweep in a sqlite store; returns its folder."""
    tmp = tmp_path_factory.mktemp("sweep")
    sweep = ("pool=avg,max", "seed=0,1,2", *SHORT_WITH_MODEL)  # the browser shows the models
    proc = run_gpool(tmp, make_idx_root(tmp), *sweep, multirun=True)
    assert proc.returncode == 0, proc.stderr
    (tmp / "sweep.out").write_text(proc.stdout)
    return tmp


def group(name: str, finals: list[float], seeds: list[int], images=None) -> Group:
    """A group of runs with these final val accs and seeds (only what the statistics read),
    and, given per-image scores [runs x images] (labels all 0), those."""
    runs = [
        SimpleNamespace(
            info=SimpleNamespace(run_name=f"{name} seed {s}"),
            data=SimpleNamespace(params={"seed": str(s)}),
        )
        for s in seeds
    ]
    curves = [RunCurves(r, [v], [v]) for r, v in zip(runs, finals, strict=True)]
    for n, c in enumerate(curves):
        c.images["val"] = (
            "no predictions/val.npy"
            if images is None
            else ImageScores(images[n], np.zeros(images.shape[1], dtype=int))
        )
    return Group(name, curves)


def sample(name: str, finals: list[float], seeds: list[int]):
    """What the statistics read of a group of runs with these final val accs and seeds."""
    return group(name, finals, seeds).sample()


def test_statistics_match_their_definitions() -> None:
    values = np.array([0.80, 0.82, 0.84])
    mean, std, half = mean_std_ci(values)
    assert mean == pytest.approx(0.82) and std == pytest.approx(0.02)
    assert half == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-5)  # t(0.975, 2)
    a, b = [0.80, 0.81, 0.79, 0.80], [0.85, 0.86, 0.84, 0.87]
    welch = Pair.of(sample("a", a, [0, 1, 2, 3]), sample("b", b, [4, 5, 6, 7]))
    assert welch.test == "Welch"
    d = welch.points()
    assert d.p_difference() < 0.01 and d.diff < 0
    assert d.p_difference() == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    one_seed = Pair.of(sample("a", a[:1], [0]), sample("b", b, [4, 5, 6, 7]))
    assert math.isnan(one_seed.points().p_difference()) and math.isnan(one_seed.detectable())


def test_the_same_seeds_are_compared_pairwise_in_seed_order() -> None:
    a = group("a", [0.80, 0.90, 0.70], [0, 1, 2])
    b = group("b", [0.71, 0.79, 0.905], [2, 0, 1])  # seed 0: 0.79, 1: 0.905, 2: 0.71
    pair = Pair.of(a.sample(), b.sample())
    assert pair.test == "paired t"
    expected = stats.ttest_rel([0.80, 0.90, 0.70], [0.79, 0.905, 0.71])
    d = pair.points()
    assert (d.diff / d.se, d.p_difference()) == pytest.approx((expected.statistic, expected.pvalue))


def test_the_images_widen_the_interval_and_runs_without_them_are_compared_on_seeds() -> None:
    """Paired heads that disagree on many images: the interval over seeds and images is
    wider than over seeds alone; one run without predictions puts its pair on seeds alone,
    and the report says why."""
    rng = np.random.default_rng(3)
    draw = rng.random((4, 500))
    image_a = (draw < rng.uniform(0.6, 1.0, 500)).astype(float)
    image_b = (draw < rng.uniform(0.6, 1.0, 500)).astype(float)
    a = group("a", list(image_a.mean(1)), [0, 1, 2, 3], image_a)
    b = group("b", list(image_b.mean(1)), [0, 1, 2, 3], image_b)
    both = Pair.of(a.sample(), b.sample())
    assert both.covers == "seeds and 500 images" and both.image_var > 0
    seeds = Pair(both.a, both.b, both.paired).points()
    assert both.points().se > seeds.se and both.points().diff == pytest.approx(seeds.diff)
    a.runs[2].images["val"] = "no predictions/val.npy"
    _, pairs, _, report = compare_groups([a, b], None, 0.5)
    assert pairs[0].covers == "seeds alone"
    assert pairs[0].ci_high - pairs[0].ci_low == pytest.approx(2 * 3.182446 * seeds.se)
    assert "seeds alone, not the test images" in report
    assert "a seed 2: no predictions/val.npy" in report


def test_an_early_looks_level_is_written_to_its_last_digits() -> None:
    """A decide sweep's first look decides at a level such as 0.999999: its interval's label
    shows the digits that tell it from 100 % (which it once read), and 95 % stays 95 %."""
    a = group("a", [0.800, 0.812, 0.795], [0, 1, 2])
    b = group("b", [0.797, 0.802, 0.793], [0, 1, 2])
    result = pair_results([a.sample(), b.sample()])[0]
    assert result.ci_label == "95% CI"
    early = replace(result, ci_level=1 - 1e-6, repeated=True)
    assert early.ci_label == "99.9999% repeated CI"
    assert replace(result, ci_level=0.9875).ci_label == "98.8% CI"


def test_the_seeds_to_decide_allow_for_every_pair_in_the_table() -> None:
    """The verdict is Holm-adjusted over the table's pairs, so its seed count plans for
    them: the same undecided pair needs more seeds beside a third group than alone, as
    many as at alpha split over the three pairs."""
    seeds = list(range(5))
    a = group("a", [0.800, 0.812, 0.795, 0.806, 0.801], seeds)
    b = group("b", [0.797, 0.802, 0.793, 0.809, 0.792], seeds)
    c = group("c", [0.700, 0.710, 0.690, 0.705, 0.702], seeds)
    alone = pair_results([a.sample(), b.sample()])[0]
    beside = pair_results([a.sample(), b.sample(), c.sample()])[0]
    assert alone.answer == beside.answer == gstats.UNDECIDED
    pair = Pair.of(a.sample(), b.sample())
    plan = gstats.seeds_to_decide(pair.spread(), pair.points().diff, 0.5, True, 0.05 / 3, 0.8)
    assert beside.seeds_to_decide == plan > alone.seeds_to_decide >= 2


def test_the_forest_ranks_groups_and_colours_each_by_its_answer_against_the_leader(
    tmp_path: Path,
) -> None:
    """Three heads on the same seeds: c clearly best, b a hair below it (equivalent within
    a wide margin), a clearly worst. The forest lists them best first with their answers
    against c; the matrix holds both orientations of every pair; both figures are drawn."""
    seeds = list(range(6))
    noise = np.array([0.0, 0.002, -0.002, 0.001, -0.001, 0.0])
    a = group("a", list(0.80 + noise), seeds)
    b = group("b", list(0.8495 + noise[::-1]), seeds)
    c = group("c", list(0.85 + noise), seeds)
    summaries, pairs, _, _ = compare_groups([a, b, c], None, 1.0)
    comparison = Comparison("", "", "", summaries, [a, b, c], ["pool"], pairs, 1.0)
    rows = forest_rows(summaries, pairs)
    assert [r["group"] for r in rows] == ["c", "b", "a"]
    assert [r["answer"] for r in rows] == ["leader", "equivalent", "worse"]
    assert rows[2]["label"].startswith("worse: -5.00 [") and rows[0]["mean"] == pytest.approx(85)
    cells = pairwise_cells(pairs)
    assert len(cells) == 6 and cells[("a", "c")]["diff"] == pytest.approx(-5)
    assert (cells[("c", "a")]["answer"], cells[("a", "c")]["answer"]) == ("better", "worse")
    low, high = final_range(comparison)  # the UI view's zoomed chart: a fifth to spare
    assert low == pytest.approx((rows[2]["low"] - (rows[0]["high"] - rows[2]["low"]) / 5) / 100)
    assert low < 0.80 and 0.85 < high < 0.87
    paths = write_report(tmp_path, "report", comparison)
    assert [p.name for p in paths[2:]] == ["comparison.png", "forest.png", "pairwise.png"]
    assert all(p.stat().st_size > 10_000 for p in paths[2:])


def test_an_undecidable_pair_is_drawn_in_both_figures(tmp_path: Path) -> None:
    """A decide sweep stopped by its futility rule ends with an undecidable pair: the
    forest and the matrix draw it in a colour of its own (the sweep's close once failed
    there with KeyError: 'undecidable', leaving its run without the comparison)."""
    seeds = list(range(4))
    a = group("a", [0.800, 0.810, 0.790, 0.805], seeds)
    b = group("b", [0.802, 0.805, 0.797, 0.800], seeds)
    summaries, pairs, _, _ = compare_groups([a, b], None, 0.5)
    pairs = [replace(pairs[0], answer=gstats.UNDECIDABLE)]
    assert [r["answer"] for r in forest_rows(summaries, pairs)][1:] == ["undecidable"]
    comparison = Comparison("", "", "", summaries, [a, b], ["pool"], pairs, 0.5)
    paths = write_report(tmp_path, "report", comparison)
    assert [p.name for p in paths[2:]] == ["comparison.png", "forest.png", "pairwise.png"]


def test_a_comparison_too_long_for_a_run_description_keeps_its_verdict() -> None:
    short = Comparison("6 runs", "| table |\n\nVerdict: a leads b", "a leads b", [], [])
    assert short.note() == "Verdict: a leads b\n\n6 runs\n\n| table |\n\nVerdict: a leads b"
    long = Comparison("35 runs", "| row |\n" * 2000, "a leads b", [], [])
    assert len(long.note()) < 8000 and long.note().startswith("Verdict: a leads b\n")
    assert "comparison/comparison.md" in long.note()


def test_power_matches_cohens_figures() -> None:
    """Cohen's tables: 64 runs a group detect d = 0.5 at 80 % power (two-sided, 0.05) in
    a two-sample t-test; 34 pairs detect d = 0.5 in a paired one."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.88, 0.01, 64), rng.normal(0.87, 0.01, 64)
    two_sample = Pair.of(sample("a", list(a), list(range(64))), sample("b", list(b), [-1] * 64))
    assert two_sample.detectable() == pytest.approx(0.5 * two_sample.spread(), rel=0.01)
    assert two_sample.seeds_needed(0.5 * two_sample.spread()) == 64
    paired = Pair.of(sample("a", list(a), list(range(64))), sample("b", list(b), list(range(64))))
    assert paired.spread() == pytest.approx(np.std(a - b, ddof=1) * 100)
    assert paired.seeds_needed(0.5 * paired.spread()) == 34
    expected = TTestPower().solve_power(nobs=64, alpha=0.05, power=0.8) * paired.spread()
    assert paired.detectable() == pytest.approx(expected)


def test_compare_groups_by_head_and_logs_on_the_parent(sweep: Path, tmp_path: Path) -> None:
    proc = compare(sweep, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "6 finished runs from sweep" in out and "grouped by pool" in out
    assert "| pool=avg | 3 |" in out and "| pool=max | 3 |" in out
    # both heads ran seeds 0, 1, 2: a paired test; one pair, so Holm changes nothing; every
    # run logged its 100 validation images' predictions: the interval covers them too
    row = next(line for line in out.splitlines() if line.startswith("| pool=avg | pool=max |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5:7] == ["seeds and 100 images", "paired t"]
    assert cells[2] in ("better", "equivalent", "undecided")
    assert re.fullmatch(r"[01]\.\d\d \[[01]\.\d\d, [01]\.\d\d\]", cells[9])  # P(A > B)
    verdict = next(line for line in out.splitlines() if line.startswith("Verdict: "))
    answer = {"better": " is better than ", "equivalent": " are equivalent within ±0.5 points"}
    assert verdict.startswith("Verdict: pool=") and answer.get(cells[2], ": undecided") in verdict
    assert "seeds alone" not in out
    if "no test possible" not in verdict:  # tiny runs can tie on every seed
        assert "over seeds and 100 images" in verdict
    first = (tmp_path / "out" / "comparison.md").read_text().splitlines()[0]
    made_by = f"python -m gpool.compare --tracking-uri sqlite:///{sweep}/mlflow.db --out"
    assert first.startswith("6 finished runs from sweep")
    assert first.endswith(f"by `{made_by} {tmp_path / 'out'}`")
    rows = (tmp_path / "out" / "comparison.csv").read_text().splitlines()
    assert rows[0].startswith("group,n,final_val_acc_mean") and len(rows) == 3
    assert (tmp_path / "out" / "comparison.png").stat().st_size > 10_000
    client = store(sweep)
    (parent,) = client.search_runs(["1"], "tags.`gpool.role` = 'sweep'")
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    figures = ("comparison.png", "forest.png", "pairwise.png")
    assert logged == {
        f"comparison/{name}" for name in ("comparison.md", "comparison.csv", *figures)
    }
    children = client.search_runs(["1"], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert factors(children) == ["pool"]


def test_the_sweeps_run_states_the_verdict_when_the_sweep_ends(sweep: Path) -> None:
    """Without `gpool.compare`: the parent run's description, metrics and artifacts."""
    client = store(sweep)
    (parent,) = client.search_runs(["1"], "tags.`gpool.role` = 'sweep'")
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("Verdict: pool=") and "\n\n6 finished runs from sweep" in note
    assert "| pool=avg | 3 |" in note and "| pool=max | 3 |" in note
    folder = Path(parent.data.tags["sweep_dir"]) / "comparison"
    rows = {r["group"]: r for r in csv.DictReader((folder / "comparison.csv").open())}
    for pool in ("avg", "max"):
        row = rows[f"pool={pool}"]
        for statistic, column in (("mean", "final_val_acc_mean"), ("ci_low", "ci95_low")):
            metric = parent.data.metrics[f"pool.{pool}.val_acc_{statistic}"]
            assert metric == pytest.approx(float(row[column]))
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert {f"comparison/comparison.{ext}" for ext in ("md", "csv", "png")} <= logged
    assert "as the sweep ended" in (folder / "comparison.md").read_text().splitlines()[0]


def test_the_planner_speaks_of_any_sweep(sweep: Path, tmp_path: Path) -> None:
    """`--plan` on a sweep of the basic sweeper: the decide sweeper's defaults (it kept no
    plan), each pair answered or given its outlook at the sweep's 3 seeds a group."""
    proc = compare(sweep, tmp_path / "out", "--plan")
    assert proc.returncode == 0, proc.stderr
    head = "The decide sweeper's outlook at 3 seeds a group (first_round=3 seeds_per_round=1"
    assert head in proc.stdout
    (line,) = [row for row in proc.stdout.splitlines() if row.startswith("- ")]
    assert "pool=avg vs pool=max" in line
    assert "expect about" in line or "undecidable" in line or "at 3 seeds a group" in line


def test_compare_by_filter_parent_and_experiment(sweep: Path, tmp_path: Path) -> None:
    proc = compare(sweep, tmp_path / "a", "--filter", "tags.pool = 'max'")
    assert proc.returncode == 0, proc.stderr
    assert "3 finished runs from selection" in proc.stdout
    assert "only one group" in proc.stdout
    (parent,) = store(sweep).search_runs(["1"], "tags.`gpool.role` = 'sweep'")
    proc = compare(sweep, tmp_path / "b", "--parent", parent.info.run_id, "--detect", "1")
    assert proc.returncode == 0 and "| pool=avg | 3 |" in proc.stdout
    assert "seeds a group for the --detect difference |" in proc.stdout
    proc = compare(sweep, tmp_path / "c", "--experiment", "gpool")
    assert proc.returncode == 0 and "6 finished runs from selection" in proc.stdout
    proc = compare(sweep, tmp_path / "d", "--experiment", "nope")
    assert proc.returncode == 1 and "no MLflow experiment 'nope'" in proc.stderr


def runs_by_name(sweep: Path) -> list[Run]:
    """The sweep's job runs, by name."""
    runs = store(sweep).search_runs(["1"])
    return sorted(
        (r for r in runs if "gpool.role" not in r.data.tags), key=lambda r: r.info.run_name
    )


@contextmanager
def predictions_replaced(run: Run, replace: Callable[[Path], object]) -> Iterator[None]:
    """Inside the block, the run's predictions/val.npy as `replace(path)` wrote it."""
    path = Path(urlparse(run.info.artifact_uri).path) / "predictions" / "val.npy"
    logged = path.read_bytes()
    replace(path)
    try:
        yield
    finally:
        path.write_bytes(logged)


def assert_on_seeds_alone(proc: subprocess.CompletedProcess[str]) -> None:
    """The comparison ran, its pair of heads on seeds alone."""
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| pool=avg | pool"))
    assert "| seeds alone | paired t |" in row


def test_runs_without_usable_predictions_are_compared_on_seeds_alone(sweep: Path, tmp_path):
    """A run whose predictions file holds predicted classes only (as runs logged before
    2026-12-02 do) puts its pair on seeds alone, and the report names the run and the
    reason; a pickle, or predictions that do not score what the run logged, are no
    predictions either."""
    client, runs = store(sweep), runs_by_name(sweep)
    with predictions_replaced(runs[0], lambda path: np.save(path, np.load(path)[0])):
        proc = compare(sweep, tmp_path / "out")  # the old format: no true classes
    assert_on_seeds_alone(proc)
    assert f"{runs[0].info.run_name}: predictions/val.npy: predicted classes only" in proc.stdout
    score = runs[1].data.metrics["val_acc"]
    assert isinstance(fetch_image_scores(client, runs[1], {"val": score})["val"], ImageScores)
    assert "the run logged" in fetch_image_scores(client, runs[1], {"val": score - 0.2})["val"]
    pickled = np.array([{"a": 1}], dtype=object)
    with predictions_replaced(runs[1], lambda path: np.save(path, pickled, allow_pickle=True)):
        assert "pickle" in fetch_image_scores(client, runs[1], {"val": score})["val"]


def forged(forgery: str, accuracy: float, path: Path) -> None:
    """Replace a run's predictions file with what someone who can write to the run might
    put there (see test_a_forged_predictions_file_costs_its_run_the_images_only)."""
    if forgery == "zip archive":  # np.load would hand back an NpzFile
        with path.open("wb") as f:
            np.savez(f, a=np.zeros((2, 3), dtype=np.int16))
    elif forgery == "huge header":  # a header claiming 2 x 10**12 images, four bytes of data
        header = {"descr": "<i2", "fortran_order": False, "shape": (2, 10**12)}
        with path.open("wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            f.write(b"\0" * 4)
    else:  # 400,000 or one image(s) that reproduce the run's logged accuracy
        images = 400_000 if forgery == "many images" else 1
        right = round(accuracy * images)
        classes = np.zeros((2, images), dtype=np.int8)
        classes[0, right:] = 1
        np.save(path, classes)


@pytest.mark.parametrize("forgery", ["many images", "one image", "zip archive", "huge header"])
def test_a_forged_predictions_file_costs_its_run_the_images_only(
    sweep: Path, tmp_path: Path, forgery: str
) -> None:
    """A predictions file must hold the images the run scored (its logged validation
    dataset's, cut at trainer.limit_val_batches: 100 here), checked from the header before
    any data is read: a forged one, however well it reproduces the run's accuracy, only
    puts the run's pair on seeds alone, with the run and the reason in one line, and no
    comparison of the sweep breaks or grows."""
    run = runs_by_name(sweep)[0]
    with predictions_replaced(run, partial(forged, forgery, run.data.metrics["val_acc"])):
        proc = compare(sweep, tmp_path / "out")
    assert_on_seeds_alone(proc)
    (why,) = [line for line in proc.stdout.splitlines() if "seeds alone, not the test" in line]
    assert f"{run.info.run_name}: predictions/val.npy" in why
    expected = {
        "many images": "holds 400000 images, the run scored 100",
        "one image": "holds 1 images, the run scored 100",
        "zip archive": "not a .npy file of one array",
        "huge header": "holds 1000000000000 images, the run scored 100",
    }
    assert expected[forgery] in why


def test_tune_picks_each_heads_lr_on_validation_and_judges_it_on_test(
    sweep: Path, tmp_path: Path, idx_root: Path
) -> None:
    # experiment=tuned's own sweep, smaller: 2 heads x 2 lrs x 2 seeds on the generated data
    tuned = ("experiment=tuned", "dataset.holdout=128", "optimizer.lr=1e-3,1e-2", "seed=0,1")
    proc = run_gpool(tmp_path, idx_root, *tuned, *SHORT, multirun=True)
    assert proc.returncode == 0, proc.stderr
    runs = job_runs(tmp_path)
    assert len(runs) == 8 and all("test_acc" in r.data.metrics for r in runs)
    proc = compare(tmp_path, tmp_path / "out", "--tune", "optimizer.lr")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Tuned optimizer.lr on the validation split; chosen per group:" in out
    rows = list(csv.DictReader((tmp_path / "out" / "comparison.csv").open()))
    for pool in ("avg", "max"):
        mine = [r for r in runs if r.data.tags["pool"] == pool]
        lrs = {r.data.params["optimizer.lr"] for r in mine}

        def mean(metric: str, lr: str, runs=mine) -> float:
            values = [r.data.metrics[metric] for r in runs if r.data.params["optimizer.lr"] == lr]
            return float(np.mean(values))

        best = max(lrs, key=lambda lr: mean("val_acc", lr))
        assert f"- pool={pool}: optimizer.lr={best} (" in out
        (row,) = [r for r in rows if r["group"] == f"pool={pool}"]
        assert float(row["final_test_acc_mean"]) == pytest.approx(mean("test_acc", best) * 100)
    assert "final test acc" in next(line for line in out.splitlines() if line.startswith("Verdict"))
    # Tuning on the test split is refused; so is a key the runs do not vary.
    proc = compare(sweep, tmp_path / "leak", "--tune", "optimizer.lr")
    assert proc.returncode == 1 and "leaks the test set into the answer" in proc.stderr
    proc = compare(tmp_path, tmp_path / "no", "--tune", "trainer.epochs")
    assert proc.returncode == 1 and "--tune trainer.epochs: not varied by these runs" in proc.stderr


def test_compare_without_a_sweep_says_what_to_run(tmp_path: Path, idx_root: Path) -> None:
    assert run_gpool(tmp_path, idx_root, *SHORT).returncode == 0  # a single run, no sweep
    proc = compare(tmp_path, tmp_path / "out")
    assert proc.returncode == 1
    assert "no sweep with finished runs in experiment 'gpool'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def server(sweep: Path) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 over the sweep's store."""
    with mlflow_server(f"sqlite:///{sweep}/mlflow.db", sweep / "served-artifacts") as url:
        yield url


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def test_server_serves_parent_and_children(server: str) -> None:
    runs = post(
        f"{server}/api/2.0/mlflow/runs/search", {"experiment_ids": ["1"], "max_results": 100}
    )["runs"]
    assert len(runs) == 7
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    (parent,) = [r for r, t in zip(runs, tags, strict=True) if t.get("gpool.role") == "sweep"]
    children = [t for t in tags if t.get("mlflow.parentRunId") == parent["info"]["run_id"]]
    assert sorted(t["mlflow.runName"] for t in children) == [
        f"pool={p} seed={s}" for p in ("avg", "max") for s in range(3)
    ]
    child = next(r for r, t in zip(runs, tags, strict=True) if "mlflow.parentRunId" in t)
    params = {p["key"]: p["value"] for p in child["data"]["params"]}
    metrics = {m["key"] for m in child["data"]["metrics"]}
    assert params["optimizer.lr"] == "0.0003"
    assert {"val_acc", "train_acc", "val_loss", "train_loss"} <= metrics
    history = urllib.request.urlopen(
        f"{server}/api/2.0/mlflow/metrics/get-history?run_id={child['info']['run_id']}"
        "&metric_key=val_acc",
        timeout=30,
    )
    assert [m["step"] for m in json.load(history)["metrics"]] == [1, 2]


def test_histories_over_a_server_come_in_bulk_and_match_the_store(
    sweep: Path, server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over a server, a metric's histories come 4 runs a request here (100 by default):
    2 requests for the 6 jobs, and what they hold is what the store holds, step by step."""
    local = store(sweep)
    ids = [r.info.run_id for r in job_runs(sweep)]
    requests = []

    def counted(*args, **kwargs):
        requests.append(args)
        return http_request(*args, **kwargs)

    monkeypatch.setattr(gstore, "BULK_RUNS", 4)
    monkeypatch.setattr(gstore, "http_request", counted)
    histories = metric_histories(MlflowClient(server), ids, "val_acc")
    assert len(requests) == 2
    for run_id in ids:
        logged = local.get_metric_history(run_id, "val_acc")
        served = histories[run_id]
        assert sorted((m.step, m.value) for m in served) == sorted(
            (m.step, m.value) for m in logged
        )
        assert len(served) == 2


def test_a_selection_larger_than_a_page_is_read_whole(sweep: Path, monkeypatch) -> None:
    """MLflow answers a search a page at a time (gpool asks for 10,000 runs a page): an
    experiment of more runs than a page is compared whole. Here pages of 4 runs."""
    client = store(sweep)
    parent = next(r for r in client.search_runs(["1"]) if "gpool.role" in r.data.tags)
    monkeypatch.setattr(gstore, "PAGE", 4)
    assert len(gstore.search_all(client, ["1"])) == 7  # 6 jobs and their sweep
    assert len(gstore.sweep_jobs(client, parent)) == 6
    _, runs = select_runs(client, "gpool", None, "")
    assert sorted(r.info.run_name for r in runs) == [
        f"pool={pool} seed={seed}" for pool in ("avg", "max") for seed in range(3)
    ]


def test_compare_over_a_server_imports_no_torch_and_agrees_with_the_store(
    sweep: Path, server: str, tmp_path: Path
) -> None:
    """Reading a store needs no torch (a fifth of a comparison's time went on importing it):
    `python -X importtime` lists every module the command imported, and the comparison over
    the server is the one the store itself gives."""
    flags = ("-X", "importtime")
    served = compare(
        sweep, tmp_path / "served", "--experiment", "gpool", tracking_uri=server, python_flags=flags
    )
    assert served.returncode == 0, served.stderr[-2000:]
    lines = [line for line in served.stderr.splitlines() if line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines}
    assert {"gpool.stats", "gpool.store", "mlflow"} <= imported
    assert not {module for module in imported if module.split(".")[0] == "torch"}
    assert compare(sweep, tmp_path / "local", "--experiment", "gpool").returncode == 0
    table = "comparison.csv"
    assert (tmp_path / "served" / table).read_text() == (tmp_path / "local" / table).read_text()


class DiesMidway(http.server.BaseHTTPRequestHandler):
    """A tracking server that answers MLflow's API (forwarded to a real one) for its first
    `answers` requests, then drops every connection unanswered: one that dies in the middle
    of a comparison."""

    target = ""
    answers = 0
    asked: list[str] = []

    def forward(self) -> None:
        DiesMidway.asked.append(self.path)
        if DiesMidway.answers <= 0:
            self.close_connection = True
            return
        DiesMidway.answers -= 1
        length = int(self.headers.get("Content-Length") or 0)
        request = urllib.request.Request(
            DiesMidway.target + self.path,
            data=self.rfile.read(length) if length else None,
            method=self.command,
            headers={"Content-Type": self.headers.get("Content-Type", "application/json")},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as err:
            status, body = err.code, err.read()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = forward

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("answers", [3, 4, 5], ids=["runs", "curves", "last curve"])
def test_a_server_that_dies_mid_comparison_is_one_line_and_nothing_written(
    sweep: Path, server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answers: int
) -> None:
    """The server answers the store's probe and the first reads, then is gone: one line,
    a non-zero exit, no report files, never a comparison of part of the sweep (MLflow's
    retries off, so that the test takes seconds)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    DiesMidway.target, DiesMidway.answers = server, answers
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), DiesMidway)
    proxy.daemon_threads = True
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{proxy.server_address[1]}"
        proc = compare(sweep, tmp_path / "out", "--experiment", "gpool", tracking_uri=uri)
    finally:
        proxy.shutdown()
    assert proc.returncode == 1, "\n".join(DiesMidway.asked)
    assert "gpool.compare: the MLflow store failed while the runs were read" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


@contextmanager
def browser(profile: Path) -> Iterator[Page]:
    """A page of Debian's chromium, headless, with a fresh profile and nothing online."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            viewport={"width": 1400, "height": 900},
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            yield context.new_page()
        finally:
            context.close()


NEEDS_CHROMIUM = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (make test installs it)"
)


@NEEDS_CHROMIUM
def test_ui_nests_the_runs_under_the_sweep(server: str, tmp_path: Path) -> None:
    with browser(tmp_path / "profile") as page:
        page.goto(f"{server}/#/experiments/1/runs")
        # The experiment opens in the model-training view, with the sweep's parent run.
        page.get_by_text("Training runs").first.wait_for(timeout=60_000)
        row = page.locator("[role=row]").filter(has_text="pool=avg,max seed=0,1,2").first
        row.wait_for(timeout=30_000)
        assert page.get_by_text("pool=avg seed=0", exact=True).count() == 0  # nested
        row.locator("button[data-component-id*='runnamecellrenderer']").first.click()
        for name in [f"pool={p} seed={s}" for p in ("avg", "max") for s in range(3)]:
            page.get_by_text(name, exact=True).wait_for(timeout=10_000)
        page.screenshot(path=str(tmp_path / "experiment.png"))
    assert (tmp_path / "experiment.png").stat().st_size > 10_000


@NEEDS_CHROMIUM
def test_the_printed_url_opens_the_comparison(sweep: Path, server: str, tmp_path: Path) -> None:
    """The URL the sweep printed opens its runs grouped by head with accuracy charts; the
    sweep's run page states the verdict; a run's page shows its model and dataset."""
    printed = re.search(r"MLflow UI: (\S+)", (sweep / "sweep.out").read_text())
    assert printed, "the sweep printed no URL"
    url = printed[1]
    assert url.startswith(f"{LOCAL_UI}/#/experiments/1/runs?viewStateShareKey=")
    assert "workflowType=machine_learning" in url
    client = store(sweep)
    (parent,) = client.search_runs(["1"], "tags.`gpool.role` = 'sweep'")
    child = client.search_runs(["1"], "attributes.run_name = 'pool=avg seed=0'")[0]
    with browser(tmp_path / "profile") as page:
        page.goto(url.replace(LOCAL_UI, server))
        for pool in ("avg", "max"):
            page.get_by_text(f"Group: {pool}", exact=True).wait_for(timeout=60_000)
        for name in [f"pool={p} seed={s}" for p in ("avg", "max") for s in range(3)]:
            page.get_by_text(name, exact=True).wait_for(timeout=10_000)
        cards = page.locator("[data-testid=experiment-view-compare-runs-card]")
        for card in (cards.nth(0), cards.nth(1)):  # val_acc zoomed, then on the whole
            card.get_by_text("val_acc", exact=True).wait_for(timeout=30_000)
            card.locator(".js-plotly-plot .scatterlayer .trace").first.wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "comparison.png"))
        # The zoomed chart's y axis spans the groups' final intervals (the view's range),
        # not what the UI fits to every epoch.
        low, high = final_range_of(client, parent)
        zoomed, whole = (
            [float(t) for t in c.locator(".ytick text").all_text_contents()]
            for c in (cards.nth(0), cards.nth(1))
        )
        assert zoomed and all(low - 1e-9 <= t <= high + 1e-9 for t in zoomed), (zoomed, low)
        assert zoomed != whole and high - low < 0.5

        page.goto(
            f"{server}/#/experiments/1/runs/{parent.info.run_id}?workflowType=machine_learning"
        )
        page.get_by_text("Verdict: pool=").first.wait_for(timeout=60_000)
        page.goto(
            f"{server}/#/experiments/1/runs/{child.info.run_id}?workflowType=machine_learning"
        )
        page.get_by_text("Logged models (1)").wait_for(timeout=60_000)
        page.get_by_text(re.compile(r"^fashion_mnist \(\w+\)$")).first.wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "run.png"))
    assert (tmp_path / "comparison.png").stat().st_size > 10_000


def shared_view(client: MlflowClient, experiment_id: str, key: str) -> dict:
    """The UI state of the experiment's shared view `key`, as gpool wrote it."""
    tags = client.get_experiment(experiment_id).tags
    return json.loads(json.loads(tags[f"mlflow.sharedViewState.{key}"])["state"])


def final_range_of(client: MlflowClient, parent: Run) -> tuple[float, float]:
    """The zoomed chart's range in the sweep's shared view."""
    state = shared_view(client, parent.info.experiment_id, parent.info.run_id)
    zoomed = state["compareRunCharts"][0]["range"]
    return zoomed["yMin"], zoomed["yMax"]


def test_settings_that_do_not_change_results_are_no_factor(sweep: Path) -> None:
    from gpool.resume import affects_result, config_hash

    assert not affects_result("trainer.threads") and not affects_result("mlflow.run_name")
    assert not affects_result("data_dir") and affects_result("trainer.epochs")
    base = {
        "seed": 0,
        "data_dir": "/a",
        "trainer": {"epochs": 2, "threads": 1, "resume": True},
        "mlflow": {"tracking_uri": "sqlite:///x.db"},
    }
    moved = {
        "seed": 0,
        "data_dir": "/b",
        "trainer": {"epochs": 2, "threads": 8, "resume": False},
        "mlflow": {"tracking_uri": "http://127.0.0.1:5000"},
    }
    assert config_hash(base) == config_hash(moved)
    assert config_hash(base) != config_hash({**base, "trainer": {"epochs": 3, "threads": 1}})
    runs = [r for r in store(sweep).search_runs(["1"]) if "gpool.role" not in r.data.tags]
    assert factors(runs) == ["pool"]  # seeds and run names differ too, but are no factor


def test_the_shared_view_groups_by_every_factor_but_the_seed(sweep: Path) -> None:
    client = store(sweep)
    (parent,) = client.search_runs(["1"], "tags.`gpool.role` = 'sweep'")
    url = share_comparison(client, parent, ["pool", "optimizer.lr"], (0.87, 0.9))
    key = parse_qs(url.split("?", 1)[1])["viewStateShareKey"][0]
    state = shared_view(client, "1", key)
    assert state["groupBy"]["groupByKeys"] == [
        {"mode": "tag", "groupByData": "pool"},
        {"mode": "param", "groupByData": "optimizer.lr"},
    ]
    assert state["searchFilter"] == f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    charts = [(c["metricKey"], c.get("range")) for c in state["compareRunCharts"]]
    zoomed = {"xMin": None, "xMax": None, "yMin": 0.87, "yMax": 0.9}
    assert charts == [("val_acc", zoomed), ("val_acc", None), ("train_acc", None)]


def test_many_groups_get_their_own_colours_and_one_legend_under_the_panels() -> None:
    """14 groups (7 heads x 2 positions): tab10's colours would repeat, and a legend inside
    each panel would cover the curves."""
    groups = {
        f"pool=h{i}": {"validation": [[0.8, 0.85], [0.81, 0.86]], "training": [[0.7, 0.9]] * 2}
        for i in range(14)
    }
    fig = group_figure(groups)
    for ax in fig.axes:
        colours = {tuple(line.get_color()) for line in ax.get_lines()}
        assert len(ax.get_lines()) == 14 and len(colours) == 14
        assert ax.get_legend() is None
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [f"pool=h{i} (n=2)" for i in range(14)]


def test_maps_and_shifts_come_from_the_runs_saved_networks(sweep: Path, tmp_path: Path) -> None:
    """--maps and --shift rebuild each run's network from its logged config and weights:
    unshifted, every group scores what its runs logged (the same images, the same
    predictions); moved, each shift gets its pairs' answers; both figures are written."""
    proc = compare(sweep, tmp_path, "--maps", "--shift", "3")
    assert proc.returncode == 0, proc.stderr
    means = re.findall(r"^\| pool=(?:avg|max) \| 3 \| (\d+\.\d\d) ±", proc.stdout, re.M)
    unshifted = re.search(r"^\| 0 px \| (\d+\.\d\d) \| (\d+\.\d\d) \|", proc.stdout, re.M)
    assert unshifted and list(unshifted.groups()) == means, proc.stdout
    assert re.search(
        r"^\| 3 px \| \d+\.\d\d \| \d+\.\d\d \| pool=avg − pool=max ", proc.stdout, re.M
    )
    for name in ("class_maps_pair.png", "shift.png"):
        assert (tmp_path / name).stat().st_size > 1000
