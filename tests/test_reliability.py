"""Sweeps that survive: parallel jobs on a fresh store, kills and resumes, skips, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    LEAN,
    LONG,
    SHORT,
    history,
    job_runs,
    run_gpool,
    session_ends,
    start_gpool,
    sweep_runs,
)

from gpool.bench.server import free_port
from gpool.names import HASH_TAG
from gpool.store import experiment_id, open_store
from gpool.tracking import Tracker

pytestmark = pytest.mark.process


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, big_root: Path) -> dict:
    """Metrics of the run that the killed-and-resumed ones must reproduce exactly."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = run_gpool(tmp, big_root, *LONG)
    assert proc.returncode == 0, proc.stderr
    (run,) = job_runs(tmp)
    return {k: history(tmp, run.info.run_id, k) for k in ("val_acc", "val_loss", "train_loss")}


def start_and_kill(tmp: Path, data: Path, sig: signal.Signals) -> subprocess.Popen[str]:
    """Start a run, wait for its first checkpoint, send `sig` while it trains on."""
    until = [tmp / "single" / "checkpoint.pt"]
    proc = start_gpool(tmp, data, f"hydra.run.dir={tmp}/single", *LONG, until=until)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_resumes_into_the_same_run_with_identical_metrics(
    sig: signal.Signals, tmp_path: Path, big_root: Path, uninterrupted: dict
) -> None:
    proc = start_and_kill(tmp_path, big_root, sig)
    assert proc.returncode != 0
    (killed,) = job_runs(tmp_path)
    state = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)
    stopped_after = state["epoch"]
    assert state["meta"]["mlflow_run_id"] == killed.info.run_id
    assert 1 <= stopped_after < 8, "the run should have been stopped mid-way"
    if sig == signal.SIGTERM:
        assert killed.info.status == "KILLED"
        assert "stopped by SIGTERM" in proc.stderr.read()
    else:
        assert killed.info.status == "RUNNING"  # SIGKILL: nobody could mark it

    proc = run_gpool(tmp_path, big_root, *LONG)  # the same command again
    assert proc.returncode == 0, proc.stderr
    assert f"resuming after epoch {stopped_after}" in proc.stdout
    (resumed,) = job_runs(tmp_path)
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    for key, expected in uninterrupted.items():
        assert history(tmp_path, resumed.info.run_id, key) == expected, key


def test_rerun_skips_finished_jobs_and_resume_false_retrains(
    tmp_path: Path, idx_root: Path
) -> None:
    args = ("pool=avg,max", *SHORT)
    assert run_gpool(tmp_path, idx_root, *args, multirun=True).returncode == 0
    first = {r.info.run_id for r in job_runs(tmp_path)}
    proc = run_gpool(tmp_path, idx_root, *args, multirun=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("skipping pool=") == 2 and "epoch 1/2" not in proc.stdout
    assert {r.info.run_id for r in job_runs(tmp_path)} == first
    (sweep,) = sweep_runs(tmp_path)  # the rerun continued the same sweep
    assert sweep.info.status == "FINISHED"
    proc = run_gpool(tmp_path, idx_root, "pool=avg", *SHORT, "trainer.resume=false")
    assert proc.returncode == 0 and "epoch 2/2" in proc.stdout
    assert len(job_runs(tmp_path)) == 3


def test_runs_logging_a_new_dataset_at_once_all_get_it(tmp_path: Path) -> None:
    """Eight runs log the same not-yet-stored dataset at the same moment: MLflow's
    look-up-then-insert collides for all but one of them unless gpool tries again."""
    client = open_store(f"sqlite:///{tmp_path}/mlflow.db", create=True)
    experiment = experiment_id(client, "gpool")
    splits = {"training": ("d1", 512), "validation": ("d2", 256)}
    together = threading.Barrier(8)
    failures: list[Exception] = []

    def one(n: int) -> None:
        with Tracker(client, experiment, f"run {n}", {}, {HASH_TAG: str(n)}) as run:
            together.wait()
            try:
                run.log_datasets("fashion_mnist", splits)
            except Exception as error:  # noqa: BLE001 - reported by the assertion below
                failures.append(error)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    for run in job_runs(tmp_path):
        inputs = run.inputs.dataset_inputs
        assert sorted((i.tags[0].value, i.dataset.digest) for i in inputs) == [
            ("training", "d1"),
            ("validation", "d2"),
        ]


def test_parallel_sweep_on_a_fresh_store_loses_nothing(tmp_path: Path, idx_root: Path) -> None:
    assert not (tmp_path / "mlflow.db").exists()
    proc = run_gpool(
        tmp_path,
        idx_root,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=4",
        "pool=avg,max",
        "seed=range(4)",
        "trainer.epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.eval_batch_size=100",
        "trainer.limit_val_batches=1",
        *LEAN,
        multirun=True,
        fresh_store=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "database is locked" not in proc.stderr + proc.stdout
    runs = job_runs(tmp_path)
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}
    assert {(r.data.tags["pool"], r.data.tags["seed"]) for r in runs} == {
        (p, str(s)) for p in ("avg", "max") for s in range(4)
    }
    (parent,) = sweep_runs(tmp_path)
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    assert {r.data.params["trainer.threads"] for r in runs} == {str(max(1, os.cpu_count() // 4))}
    for run in runs:
        assert [s for s, _ in history(tmp_path, run.info.run_id, "val_acc")] == [1]


@pytest.mark.parametrize("whole_group", [True, False], ids=["ctrl-c-or-timeout", "kill-launcher"])
def test_stopped_parallel_sweep_leaves_no_workers_and_no_running_runs(
    tmp_path: Path, idx_root: Path, whole_group: bool
) -> None:
    """SIGTERM to the terminal's process group (what `timeout` sends), or to the launching
    process alone: the command ends with one message, its joblib workers with it, and no
    run of the sweep stays RUNNING."""
    proc = start_gpool(
        tmp_path,
        idx_root,
        f"hydra.sweep.dir={tmp_path}/multirun",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "pool=avg,max",
        "trainer.epochs=1000",
        *SHORT[1:],
        until=[tmp_path / "multirun" / str(n) / "checkpoint.pt" for n in (0, 1)],
        multirun=True,
    )
    if whole_group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)  # a worker left alive would hold the pipes open
    assert proc.returncode == 1 and "gpool.train: sweep stopped by SIGTERM" in stderr
    assert session_ends(proc.pid, seconds=15), "processes of the sweep outlived it"
    runs = job_runs(tmp_path)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"KILLED"}
    (parent,) = sweep_runs(tmp_path)
    assert parent.info.status == "KILLED"


def test_unreachable_tracking_server_is_one_clear_error(tmp_path: Path, idx_root: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    proc = run_gpool(tmp_path, idx_root, *SHORT, f"mlflow.tracking_uri={uri}")
    assert proc.returncode != 0
    assert f"MLflow tracking server {uri} is unreachable" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - start < 60  # no minutes of client retries


def test_unwritable_output_dir_fails_before_any_run(tmp_path: Path, idx_root: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the output folder should go")
    proc = run_gpool(tmp_path, idx_root, *SHORT, f"hydra.run.dir={blocked}/run", fresh_store=True)
    assert proc.returncode != 0
    assert str(blocked) in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() or job_runs(tmp_path) == []
