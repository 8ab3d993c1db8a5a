"""`python -m gpool.compare` and the MLflow server/UI, on a real tiny sweep."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import SHORT, gpool_env, make_idx_root, mlflow_server, run_gpool, store
from scipy import stats

from gpool.compare import factors, mean_std_ci, welch

CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2 heads x 3 seeds sweep in a sqlite store; returns its folder."""
    tmp = tmp_path_factory.mktemp("sweep")
    proc = run_gpool(tmp, make_idx_root(tmp), "pool=avg,max", "seed=0,1,2", *SHORT, multirun=True)
    assert proc.returncode == 0, proc.stderr
    return tmp


def compare(sweep: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "gpool.compare",
            "--tracking-uri",
            f"sqlite:///{sweep}/mlflow.db",
            "--out",
            str(out),
            *args,
        ],
        env=gpool_env(sweep / "data"),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_statistics_match_their_definitions() -> None:
    values = np.array([0.80, 0.82, 0.84])
    mean, std, half = mean_std_ci(values)
    assert mean == pytest.approx(0.82) and std == pytest.approx(0.02)
    assert half == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-5)  # t(0.975, 2)
    a, b = np.array([0.80, 0.81, 0.79, 0.80]), np.array([0.85, 0.86, 0.84, 0.87])
    t, p = welch(a, b)
    assert p < 0.01 and t < 0
    assert p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert all(math.isnan(x) for x in welch(a[:1], b))  # one seed: no test


def test_compare_groups_by_head_and_logs_on_the_parent(sweep: Path, tmp_path: Path) -> None:
    proc = compare(sweep, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "6 finished runs from sweep" in out and "grouped by pool" in out
    assert "| pool=avg | 3 |" in out and "| pool=max | 3 |" in out
    assert "| pool=avg | pool=max |" in out  # the Welch row
    verdict = next(line for line in out.splitlines() if line.startswith("Verdict: "))
    assert "leads" in verdict and "significant at 0.05" in verdict
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
    assert logged == {f"comparison/comparison.{ext}" for ext in ("md", "csv", "png")}
    children = client.search_runs(["1"], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert factors(children) == ["pool"]


def test_compare_by_filter_parent_and_experiment(sweep: Path, tmp_path: Path) -> None:
    proc = compare(sweep, tmp_path / "a", "--filter", "tags.pool = 'max'")
    assert proc.returncode == 0, proc.stderr
    assert "3 finished runs from selection" in proc.stdout
    assert "only one group" in proc.stdout
    (parent,) = store(sweep).search_runs(["1"], "tags.`gpool.role` = 'sweep'")
    proc = compare(sweep, tmp_path / "b", "--parent", parent.info.run_id)
    assert proc.returncode == 0 and "| pool=avg | 3 |" in proc.stdout
    proc = compare(sweep, tmp_path / "c", "--experiment", "gpool")
    assert proc.returncode == 0 and "6 finished runs from selection" in proc.stdout
    proc = compare(sweep, tmp_path / "d", "--experiment", "nope")
    assert proc.returncode == 1 and "no MLflow experiment 'nope'" in proc.stderr


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


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)")
def test_ui_nests_the_runs_under_the_sweep(server: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh profile
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
            page = browser.new_page()
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
        finally:
            browser.close()
    assert (tmp_path / "experiment.png").stat().st_size > 10_000


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
