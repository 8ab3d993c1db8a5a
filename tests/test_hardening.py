"""What hostile and clumsy users broke, each reproduced for real: crafted checkpoints and
credentials, interrupted and raced commands, stores that cannot work, and mistakes that must
end in one line with nothing left RUNNING."""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import warm
from conftest import (
    GENERATED,
    LONG,
    SHORT,
    SHORT_WITH_MODEL,
    all_runs,
    gpool_env,
    history,
    job_runs,
    make_idx_root,
    run_gpool,
    run_python,
    session_ends,
    start_gpool,
    store,
    sweep_runs,
    write_image_folder,
)
from conftest import compare as compare_store
from mlflow.artifacts import download_artifacts
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from gpool.bench.server import mlflow_server
from gpool.errors import GpoolError
from gpool.names import CHECKPOINT_TAG, DECIDED_TAG, PLAN_TAG
from gpool.resume import claim
from gpool.store import redact, sweep_jobs

pytestmark = pytest.mark.process

IS_ROOT = os.geteuid() == 0


def compare(tmp: Path, *args: str, uri: str | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m gpool.compare` on tmp's store (or `uri`), as a user runs it."""
    return compare_store(tmp, tmp / "compare", *args, tracking_uri=uri)


def one_clear_line(proc: subprocess.CompletedProcess[str], message: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


@contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A small RAM file system mounted at `folder` (root only): a disk that fills up, or
    that can be made read-only."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


class RunsCode:
    """Unpickling this runs code: what a crafted checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def finished_run_made_resumable(tmp: Path, data: Path):
    """A FINISHED short run, then marked KILLED, as if stopped after its last epoch: the
    next identical command resumes it from its own checkpoint."""
    assert run_gpool(tmp, data, *SHORT).returncode == 0
    (run,) = [r for r in job_runs(tmp) if r.data.tags["pool"] == "avg"]
    store(tmp).set_terminated(run.info.run_id, "KILLED")
    return run


def test_nothing_in_the_store_chooses_the_checkpoint_a_rerun_resumes_from(
    tmp_path: Path, idx_root: Path
) -> None:
    """The attack: someone who can only reach the store forges a weights-only checkpoint
    from a run of their own, writes the victim's run id and config hash into it, uploads it
    as an artifact and points the victim's checkpoint tag at it (or at a pickle that runs
    code). The victim's rerun resumes from its own checkpoint all the same."""
    victim = finished_run_made_resumable(tmp_path, idx_root)
    own = Path(victim.data.tags[CHECKPOINT_TAG])
    assert own.is_relative_to(tmp_path / "checkpoints")
    assert (tmp_path / "single" / "checkpoint.pt").resolve() == own
    attacker = tmp_path / "attacker"
    attacker.mkdir()
    assert run_gpool(attacker, idx_root, *SHORT, "trainer.epochs=3", "pool=max").returncode == 0
    (theirs,) = job_runs(attacker)
    forged = torch.load(theirs.data.tags[CHECKPOINT_TAG], weights_only=True)
    forged["meta"] = torch.load(own, weights_only=True)["meta"]
    torch.save(forged, tmp_path / "forged.pt")
    store(tmp_path).log_artifact(victim.info.run_id, str(tmp_path / "forged.pt"))
    uploaded = store(tmp_path).get_run(victim.info.run_id).info.artifact_uri
    store(tmp_path).set_tag(victim.info.run_id, CHECKPOINT_TAG, f"{uploaded}/forged.pt"[7:])
    proc = run_gpool(tmp_path, idx_root, *SHORT)
    assert proc.returncode == 0, proc.stderr
    assert "resuming after epoch 2" in proc.stdout and "epoch 3" not in proc.stdout
    assert store(tmp_path).get_run(victim.info.run_id).info.status == "FINISHED"

    store(tmp_path).set_terminated(victim.info.run_id, "KILLED")
    marker = tmp_path / "pwned"
    torch.save({"meta": RunsCode(marker), "model": {}}, tmp_path / "crafted.pt")
    store(tmp_path).set_tag(victim.info.run_id, CHECKPOINT_TAG, str(tmp_path / "crafted.pt"))
    proc = run_gpool(tmp_path, idx_root, *SHORT)
    assert proc.returncode == 0 and "resuming after epoch 2" in proc.stdout, proc.stderr
    assert not marker.exists()

    # Its own checkpoint truncated: one line that says how to go on, and that way works.
    store(tmp_path).set_terminated(victim.info.run_id, "KILLED")
    own.write_bytes(own.read_bytes()[:500])
    proc = run_gpool(tmp_path, idx_root, *SHORT)
    one_clear_line(proc, f"checkpoint {own} cannot be read")
    assert "trainer.resume=false" in proc.stderr
    assert run_gpool(tmp_path, idx_root, *SHORT, "trainer.resume=false").returncode == 0
    assert not [r for r in all_runs(tmp_path) if r.info.status == "RUNNING"]


def test_a_resumed_run_continues_from_its_own_checkpoint_and_drops_an_old_failure(
    tmp_path: Path, idx_root: Path
) -> None:
    run = finished_run_made_resumable(tmp_path, idx_root)
    store(tmp_path).set_terminated(run.info.run_id, "FAILED")
    store(tmp_path).set_tag(run.info.run_id, "failure", "OSError: artifact upload failed")
    proc = run_gpool(tmp_path, idx_root, *SHORT, f"hydra.run.dir={tmp_path}/again")
    assert proc.returncode == 0, proc.stderr
    assert "resuming after epoch 2" in proc.stdout
    resumed = store(tmp_path).get_run(run.info.run_id)
    assert resumed.info.status == "FINISHED" and "failure" not in resumed.data.tags
    own = Path(run.data.tags[CHECKPOINT_TAG])
    assert resumed.data.tags[CHECKPOINT_TAG] == str(own)
    assert (tmp_path / "again" / "checkpoint.pt").resolve() == own
    state = torch.load(own, weights_only=True)
    assert state["meta"]["mlflow_run_id"] == run.info.run_id and state["epoch"] == 2


def test_an_epoch_checkpointed_but_not_logged_is_logged_once_on_resume(
    tmp_path: Path, idx_root: Path
) -> None:
    """Stopped (SIGKILL, a full disk) between writing an epoch's checkpoint and logging its
    metrics: that store state, made for real by removing the last epoch's rows. The rerun
    logs it from the checkpoint, once; it trains nothing again."""
    run = finished_run_made_resumable(tmp_path, idx_root)
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        db.execute("DELETE FROM metrics WHERE run_uuid = ? AND step = 2", (run.info.run_id,))
    assert [s for s, _ in history(tmp_path, run.info.run_id, "val_acc")] == [1]
    proc = run_gpool(tmp_path, idx_root, *SHORT)
    assert proc.returncode == 0 and "resuming after epoch 2" in proc.stdout, proc.stderr
    steps = [s for s, _ in history(tmp_path, run.info.run_id, "val_acc")]
    assert steps == [1, 2]
    own = torch.load(run.data.tags[CHECKPOINT_TAG], weights_only=True)
    logged = dict(history(tmp_path, run.info.run_id, "val_acc"))
    assert logged[2] == own["history"][1]["val_acc"]


def test_the_claims_folder_must_be_the_users_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another local user who makes /tmp/gpool-claims-<uid> first, or plants a link to one
    of the victim's files in it, gets one clear refusal: no file truncated, no hang."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = tmp_path / f"gpool-claims-{os.getuid()}"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)  # past the umask: open to everyone
    with pytest.raises(GpoolError, match="not a folder of this user's alone"), claim("x"):
        pass
    folder.chmod(0o700)
    victim = tmp_path / "thesis.tex"
    victim.write_text("years of work")
    key = hashlib.sha256(b"x").hexdigest()[:32]
    (folder / f"{key}.lock").symlink_to(victim)
    with pytest.raises(GpoolError, match="cannot open the claim"), claim("x"):
        pass
    assert victim.read_text() == "years of work"
    (folder / f"{key}.lock").unlink()
    with claim("x"):  # and a folder of one's own works
        assert (folder / f"{key}.lock").is_file()
    if IS_ROOT:  # made by another uid: refused even with a private mode
        os.chown(folder, 65534, 65534)
        with pytest.raises(GpoolError, match="owner uid 65534"), claim("x"):
            pass


def test_credentials_in_the_tracking_uri_are_used_but_never_logged(
    tmp_path: Path, idx_root: Path
) -> None:
    with mlflow_server(f"sqlite:///{tmp_path}/server.db", tmp_path / "served") as url:
        secret = url.replace("http://", "http://alice:s3cr3t@")
        proc = run_gpool(
            tmp_path,
            idx_root,
            "pool=avg,max",
            *SHORT,
            f"mlflow.tracking_uri={secret}",
            multirun=True,
        )
        assert proc.returncode == 0, proc.stderr
        ours = [line for line in proc.stdout.splitlines() if "][gpool." in line]
        assert ours and not [line for line in ours if "s3cr3t" in line]
        client = MlflowClient(url)
        runs = client.search_runs([client.get_experiment_by_name("gpool").experiment_id])
        assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
        for run in runs:
            logged = [run.info.run_name, *run.data.params.values(), *run.data.tags.values()]
            assert not [v for v in logged if "s3cr3t" in v or "alice" in v], run.info.run_name
        child = next(r for r in runs if "mlflow.parentRunId" in r.data.tags)
        assert child.data.params["mlflow.tracking_uri"] == url
        for name in ("config.yaml", "hydra/overrides.yaml", "hydra/hydra.yaml"):
            text = Path(
                download_artifacts(
                    run_id=child.info.run_id,
                    artifact_path=name,
                    tracking_uri=url,
                    dst_path=str(tmp_path / "download"),
                )
            ).read_text()
            assert "s3cr3t" not in text and "alice" not in text and "127.0.0.1" in text, name


def test_an_interrupted_sweep_rerun_is_one_sweep_compared_whole(
    tmp_path: Path, big_root: Path
) -> None:
    """Stopped while its second job trains, then rerun: the first job is skipped, the
    second resumed, and both belong to the one sweep that compare reports on. One job at a
    time, so that the first has finished when the second saves its checkpoint."""
    proc = start_gpool(
        tmp_path,
        big_root,
        f"hydra.sweep.dir={tmp_path}/multirun",
        "hydra.launcher.jobs=1",
        "pool=avg,max",
        *LONG,
        until=[tmp_path / "multirun" / "1" / "checkpoint.pt"],
        multirun=True,
    )
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert sorted(r.info.status for r in job_runs(tmp_path)) == ["FINISHED", "KILLED"]
    (stopped,) = sweep_runs(tmp_path)  # not over: no verdict on it, no comparison files
    assert stopped.info.status == "KILLED" and MLFLOW_RUN_NOTE not in stopped.data.tags
    assert not (tmp_path / "multirun" / "comparison").exists()
    proc = start_gpool(
        tmp_path,
        big_root,
        f"hydra.sweep.dir={tmp_path}/rerun",
        "pool=avg,max",
        *LONG,
        output="resuming after epoch",
        multirun=True,
    )
    # Someone who can write the store points the sweep at a folder of their choosing.
    store(tmp_path).set_tag(stopped.info.run_id, "sweep_dir", str(tmp_path / "elsewhere"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert len(job_runs(tmp_path)) == 2  # the finished job was skipped, the other resumed
    assert not (tmp_path / "elsewhere").exists()
    assert (tmp_path / "rerun" / "comparison" / "comparison.md").is_file()
    (sweep,) = sweep_runs(tmp_path)
    assert sweep.info.status == "FINISHED" and sweep.data.tags["sweep_dir"].endswith("elsewhere")
    result = compare(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 finished runs from sweep" in result.stdout
    assert "| pool=avg | 1 |" in result.stdout and "| pool=max | 1 |" in result.stdout


def test_a_wider_sweep_counts_the_jobs_an_earlier_sweep_finished(
    tmp_path: Path, idx_root: Path
) -> None:
    assert run_gpool(tmp_path, idx_root, "pool=avg,max", *SHORT, multirun=True).returncode == 0
    proc = run_gpool(tmp_path, idx_root, "pool=avg,max", "seed=0,1", *SHORT, multirun=True)
    assert proc.returncode == 0 and proc.stdout.count("skipping pool=") == 2
    assert len(job_runs(tmp_path)) == 4 and len(sweep_runs(tmp_path)) == 2
    result = compare(tmp_path)  # the latest sweep: all four of its jobs, two per head
    assert "4 finished runs from sweep" in result.stdout, result.stderr
    assert "| pool=avg | 2 |" in result.stdout and "| pool=max | 2 |" in result.stdout


def test_a_config_trained_twice_counts_once_in_an_experiments_comparison(
    tmp_path: Path, idx_root: Path
) -> None:
    """A retrain (trainer.resume=false) is a second run of the same config, not a second
    seed: `--experiment` and `--filter` keep its newest finished run, as a sweep does."""
    assert run_gpool(tmp_path, idx_root, "pool=avg,max", *SHORT, multirun=True).returncode == 0
    retrain = run_gpool(tmp_path, idx_root, "pool=avg", "trainer.resume=false", *SHORT)
    assert retrain.returncode == 0, retrain.stderr
    assert len(job_runs(tmp_path)) == 3
    for selection in (["--experiment", "gpool"], ["--filter", "tags.seed = '0'"]):
        result = compare(tmp_path, *selection)
        assert "2 finished runs from selection" in result.stdout, result.stderr
        assert "| pool=avg | 1 |" in result.stdout and "| pool=max | 1 |" in result.stdout


def test_compare_names_the_jobs_it_leaves_out_and_why(tmp_path: Path, idx_root: Path) -> None:
    proc = run_gpool(tmp_path, idx_root, "optimizer.lr=1e12,3e-4", *SHORT, multirun=True)
    assert proc.returncode != 0
    result = compare(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 finished runs from sweep" in result.stdout
    assert "Not compared:" in result.stdout
    failed = "pool=avg optimizer.lr=1000000000000.0 seed=0: FAILED: NonFiniteLossError: training"
    assert failed in result.stdout, result.stdout


@pytest.mark.parametrize("launcher", ["basic", "side-by-side"])
def test_sigkill_of_the_launcher_leaves_no_worker_and_nothing_running(
    tmp_path: Path, idx_root: Path, launcher: str
) -> None:
    """gpool's default launcher running jobs one after another (Hydra's basic launcher,
    hydra.launcher.jobs=1) and side by side on this CPU (its joblib workers, jobs=2)."""
    parallel = launcher == "side-by-side"
    jobs = (0, 1) if parallel else (0,)
    proc = start_gpool(
        tmp_path,
        idx_root,
        f"hydra.sweep.dir={tmp_path}/multirun",
        f"hydra.launcher.jobs={len(jobs)}",
        "pool=avg,max",
        "trainer.epochs=1000",
        *SHORT[1:],
        until=[tmp_path / "multirun" / str(n) / "checkpoint.pt" for n in jobs],
        multirun=True,
    )
    proc.kill()  # the launching process alone: nobody can tidy up for it
    proc.wait(timeout=10)
    # Inside the workers' 20 s of grace: each exits once its run is ended, not at the cap.
    assert session_ends(proc.pid, seconds=15), "workers outlived their launcher"
    proc.communicate(timeout=10)  # nothing holds its output open any more
    if parallel:  # the workers noticed and ended their own runs
        assert {r.info.status for r in job_runs(tmp_path)} == {"KILLED"}
    # The next command on the same store tidies, in whichever experiment it runs.
    assert run_gpool(tmp_path, idx_root, *SHORT, "mlflow.experiment_name=other").returncode == 0
    assert not [r for r in all_runs(tmp_path) if r.info.status == "RUNNING"]
    assert sweep_runs(tmp_path)[0].info.status == "KILLED"


@pytest.mark.parametrize(
    ("moment", "message"),
    [
        ("loading the data", "stopped by SIGTERM while the data was loaded"),
        ("logging the final artifacts", "stopped by SIGTERM while the final artifacts were logged"),
    ],
)
def test_sigterm_while_loading_or_logging_ends_in_one_line_and_no_running_run(
    tmp_path: Path, moment: str, message: str
) -> None:
    images = tmp_path / "images"
    write_image_folder(images, {"ash": 40, "birch": 200}, size=8, count=1200)
    own = ("dataset=image_folder", f"dataset.root={images}", "dataset.num_classes=2")
    args = (*own, *SHORT_WITH_MODEL, "trainer.log_every_n_steps=2")
    args += (f"hydra.run.dir={tmp_path}/single",)
    proc = start_gpool(tmp_path, tmp_path, *args, output=moment)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and message in output, output
    assert "Traceback" not in output
    runs = job_runs(tmp_path)
    if moment == "loading the data":
        assert runs == []  # nothing was logged yet
        return
    assert [r.info.status for r in runs] == ["KILLED"]
    proc = run_gpool(tmp_path, tmp_path, *args)  # the rerun only logs what was left
    assert proc.returncode == 0 and "resuming after epoch 2" in proc.stdout, proc.stderr
    assert "epoch 1/2" not in proc.stdout
    (run,) = job_runs(tmp_path)
    assert run.info.status == "FINISHED"
    names = {a.path for a in store(tmp_path).list_artifacts(run.info.run_id)}
    assert {"model.pt", "curves.png", "confusion_matrix.json"} <= names
    # What the stopped session logged is not logged twice: one model, one MLflow time
    # (that of both sessions).
    client = store(tmp_path)
    models = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    assert len(models) == 1
    (seconds,) = client.get_metric_history(run.info.run_id, "mlflow_seconds")
    assert seconds.value == pytest.approx(float(run.data.tags["gpool.mlflow_seconds"]), abs=1e-3)


@pytest.mark.skipif(not IS_ROOT, reason="mounts a small tmpfs")
def test_a_full_disk_under_a_fused_group_fails_each_member_with_its_own_line(
    tmp_path: Path, idx_root: Path
) -> None:
    with tmpfs(tmp_path / "small", "120k") as small:
        args = ("hydra/launcher=fused", "pool=avg,max", *SHORT, f"checkpoint_dir={small}/ck")
        proc = run_gpool(tmp_path, idx_root, *args, multirun=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    runs = job_runs(tmp_path)
    assert [r.info.status for r in runs] == ["FAILED", "FAILED"]
    for run in runs:  # each names its own checkpoint, not member 0's
        assert (
            f"cannot write the checkpoint {run.data.tags[CHECKPOINT_TAG]}"
            in (run.data.tags["failure"])
        )
    assert sweep_runs(tmp_path)[0].info.status == "FAILED"


def test_the_store_deleted_mid_sweep_is_one_line_a_job_and_nothing_hangs(
    tmp_path: Path, idx_root: Path
) -> None:
    proc = start_gpool(
        tmp_path,
        idx_root,
        f"hydra.sweep.dir={tmp_path}/multirun",
        "pool=avg,max,gem",
        *SHORT,
        output="epoch 1/2",
        multirun=True,
    )
    (tmp_path / "mlflow.db").unlink()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    assert "the MLflow store failed ((sqlite3.OperationalError)" in out, out


def test_a_decide_and_a_plain_sweep_at_once_on_one_store_train_each_config_once(
    tmp_path: Path, idx_root: Path
) -> None:
    """Two users' sweeps over the same configs, started together on one store: each config
    trains once (a job that finds the other sweep training its config waits for that run,
    then skips it), both sweeps end, and each one's verdict covers all of its jobs."""
    sweeps = [
        start_gpool(
            tmp_path,
            idx_root,
            *extra,
            f"hydra.sweep.dir={tmp_path}/{name}",
            "hydra.launcher.jobs=1",
            *SHORT,
            multirun=True,
        )
        for name, extra in (
            ("decide", ("hydra/sweeper=decide", "hydra.sweeper.max_seeds=3", "pool=avg,max")),
            ("plain", ("pool=avg,max", "seed=0,1,2")),
        )
    ]
    outputs = [proc.communicate(timeout=300) for proc in sweeps]
    assert [proc.returncode for proc in sweeps] == [0, 0], outputs
    runs = job_runs(tmp_path)
    names = sorted(r.info.run_name for r in runs)
    assert len(names) == len(set(names)) >= 6, names  # no config trained twice
    assert {r.info.status for r in runs} == {"FINISHED"}
    client = store(tmp_path)
    for sweep in sweep_runs(tmp_path):
        assert sweep.info.status == "FINISHED"
        assert sweep.data.tags[MLFLOW_RUN_NOTE].startswith("Verdict: "), sweep.data.tags
        if PLAN_TAG in sweep.data.tags:  # the decide sweep: as many seeds as its rule took
            took = re.search(r"after (\d+) seeds|max_seeds=(\d+)", sweep.data.tags[DECIDED_TAG])
            seeds = int(took[1] or took[2])
        else:
            seeds = 3
        jobs = sweep_jobs(client, sweep)
        assert len(jobs) == 2 * seeds and {r.info.status for r in jobs} == {"FINISHED"}


def test_two_identical_commands_at_once_train_one_run(tmp_path: Path, idx_root: Path) -> None:
    args = [sys.executable, "-m", "gpool.train", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"]
    args += [GENERATED, *SHORT, f"checkpoint_dir={tmp_path}/checkpoints"]
    procs = [
        warm.Forked(
            [*args, f"hydra.run.dir={tmp_path}/run{i}"],
            cwd=tmp_path,
            env=gpool_env(idx_root),
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    runs = client.search_runs([client.get_experiment_by_name("gpool").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"], outputs
    assert sum("epoch 2/2" in out for out in outputs) == 1
    assert any("already running" in out or "skipping" in out for out in outputs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("trainer.epochs=-1",), "trainer.epochs must be >= 1, not -1"),
        (("trainer.batch_size=0",), "trainer.batch_size must be >= 1, not 0"),
        (("optimizer.lr=-1",), "optimizer.lr must be a number > 0, not -1"),
        (("optimizer.lr=abc",), "optimizer.lr must be a number > 0, not 'abc'"),
        (("+optimizer.betas=[0.9,2.0]",), "optimizer: Invalid beta parameter"),
        (("seed=1.5",), "seed must be a whole number >= 0, not 1.5"),
        (("dataset=image_folder",), "dataset.num_classes=..., dataset.root=..."),
        (("mlflow.tracking_uri=sqlite:////proc/gpool/mlflow.db",), "cannot be written"),
        pytest.param(
            ("trainer.device=cuda",),
            "torch sees no CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here"),
        ),
        pytest.param(
            ("trainer.cuda_graph=true",),
            "trainer.cuda_graph=true needs a CUDA device, not cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here"),
        ),
        (("trainer.cuda_graph=maybe",), "trainer.cuda_graph must be auto, true or false"),
        (("mlflow.system_metrics=often",), "mlflow.system_metrics must be true or false"),
        (("trainer.compile=fast",), "trainer.compile must be false, true or one of"),
        (("pool=gem", "pool.shift=false"), "clamps negative inputs, and class maps are logits"),
    ],
    ids=lambda v: v[0] if isinstance(v, tuple) else None,
)
def test_a_mistake_is_one_line_and_leaves_no_run(
    tmp_path: Path, idx_root: Path, overrides: tuple[str, ...], message: str
) -> None:
    proc = run_gpool(tmp_path, idx_root, *SHORT, *overrides, fresh_store=True)
    one_clear_line(proc, message)
    # Values the config check refuses create no store at all; others leave it without runs.
    assert not (tmp_path / "mlflow.db").exists() or job_runs(tmp_path) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (  # a backbone that ends in vectors, not maps
            ("model.features._target_=torch.nn.Flatten", "~model.features.in_channels"),
            "model.features returns [2, 784] for images [2, 1, 28, 28]; gpool's head needs "
            "feature maps [N, 512, H', W'] (model.channels=512)",
        ),
        (
            ("model.channels=100",),
            "model.features returns [2, 512, 4, 4] for images [2, 1, 28, 28]; gpool's head "
            "needs feature maps [N, 100, H', W'] (model.channels=100)",
        ),
        (("model.channels=0",), "model.channels must be >= 1, not 0"),
    ],
    ids=["vectors", "channels", "zero"],
)
def test_a_backbone_of_the_wrong_shape_is_one_line_before_its_run(
    tmp_path: Path, idx_root: Path, overrides: tuple[str, ...], message: str
) -> None:
    """Your own backbone (model.features) is tried on one batch before any run is made."""
    proc = run_gpool(tmp_path, idx_root, *SHORT, "model=resnet18", *overrides)
    one_clear_line(proc, message)
    assert job_runs(tmp_path) == []


#: `python -m gpool.train` with the CUDA-graph decision made as on a GPU (nothing blocks
#: capture) and the CUDA call at `fails` raising as a driver would; with `warm_up`, the
#: stream calls before it pass through, so the warm-up steps really train first.
FAILING_CAPTURE = """
import contextlib, torch, gpool.engine
gpool.engine.blockers = lambda *args: []
def fails(*args, **kwargs):
    raise RuntimeError("injected: CUDA error: operation not permitted when stream is capturing")
if {warm_up}:
    torch.cuda.Stream = lambda *args, **kwargs: type("Side", (), {{"wait_stream": print}})()
    torch.cuda.current_stream = torch.cuda.Stream
    torch.cuda.stream = lambda side: contextlib.nullcontext()
    torch.cuda.CUDAGraph = fails
else:
    torch.cuda.Stream = fails
from gpool.train import main
main()
"""


@pytest.mark.parametrize("warm_up", [False, True], ids=["first-cuda-call", "after-warm-up"])
def test_steps_that_cannot_be_captured_train_eagerly_as_an_eager_run(
    tmp_path: Path, idx_root: Path, warm_up: bool
) -> None:
    """The capture's failure leaves weights and optimiser state as they were: the run
    trains exactly what an eager run trains, says why in one warning and a tag."""
    graphed, eager = tmp_path / "graphed", tmp_path / "eager"
    graphed.mkdir(), eager.mkdir()
    entry = ("-c", FAILING_CAPTURE.format(warm_up=warm_up))
    proc = run_gpool(graphed, idx_root, *SHORT, "scheduler=onecycle", entry=entry)
    assert proc.returncode == 0, proc.stderr
    assert "the training step could not be captured (RuntimeError: injected" in proc.stdout
    assert run_gpool(eager, idx_root, *SHORT, "scheduler=onecycle").returncode == 0
    (run,), (plain,) = job_runs(graphed), job_runs(eager)
    assert run.data.tags["gpool.eager_because"].startswith("RuntimeError: injected: CUDA error")
    for key in ("train_loss", "val_loss", "lr"):
        assert history(graphed, run.info.run_id, key) == history(eager, plain.info.run_id, key)


def test_a_sweeps_mistake_is_one_line_before_any_run_exists(tmp_path: Path, idx_root: Path) -> None:
    """Values the sweep's own run reads (the comparison's margin) are checked before that
    run is made: nothing is left RUNNING, nothing is made at all."""
    proc = run_gpool(
        tmp_path, idx_root, *SHORT, "pool=avg,max", "compare.margin=abc", multirun=True
    )
    one_clear_line(proc, "compare.margin must be a number of points in (0, 100), not 'abc'")
    assert all_runs(tmp_path) == []


@pytest.mark.skipif(not IS_ROOT, reason="mounts a small tmpfs")
def test_a_full_disk_while_checkpointing_fails_the_run_and_leaves_no_partial_file(
    tmp_path: Path, idx_root: Path
) -> None:
    with tmpfs(tmp_path / "small", "120k") as small:
        proc = run_gpool(tmp_path, idx_root, *SHORT, f"checkpoint_dir={small}/checkpoints")
        one_clear_line(proc, f"cannot write the checkpoint {small}/checkpoints/")
        assert not list(small.rglob("*.tmp"))
    (run,) = job_runs(tmp_path)
    assert run.info.status == "FAILED" and "CheckpointError" in run.data.tags["failure"]
    # The epoch whose checkpoint could not be written was not logged either: no epoch is
    # logged twice when the run is trained again.
    assert history(tmp_path, run.info.run_id, "val_acc") == []


@pytest.mark.skipif(not IS_ROOT, reason="mounts a tmpfs read-only")
def test_stores_that_cannot_work_fail_fast_with_one_line(tmp_path: Path, idx_root: Path) -> None:
    with tmpfs(tmp_path / "ro", "20m") as folder:
        (folder / "mlflow.db").touch()  # an existing store on a disk that turned read-only
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        start = time.monotonic()
        proc = run_gpool(
            tmp_path, idx_root, *SHORT, f"mlflow.tracking_uri=sqlite:///{folder}/mlflow.db"
        )
        one_clear_line(proc, "Read-only file system")
        assert time.monotonic() - start < 60
    start = time.monotonic()
    one_clear_line(compare(tmp_path, uri="http://127.0.0.1:1"), "is unreachable")
    assert time.monotonic() - start < 60  # not minutes of retries
    typo = tmp_path / "mlfow.db"
    one_clear_line(compare(tmp_path, uri=f"sqlite:///{typo}"), f"no MLflow store at {typo}")
    assert not typo.exists()


@pytest.mark.parametrize(
    ("module", "mentions", "fresh"),
    [
        ("gpool.train", "pool: ", False),
        ("gpool.compare", "80% power", False),
        ("gpool.bench", "--steps", True),
    ],
)
def test_every_command_answers_help(
    tmp_path: Path, module: str, mentions: str, fresh: bool
) -> None:
    """`--help` is the first thing a user types; a stray % in a help string once crashed it.
    gpool.bench's in a fresh interpreter (its imports include gpool.train's), the others
    forked from the warm one (tests/warm.py)."""
    args = [sys.executable, "-m", module, "--help"]
    proc = run_python(args, tmp_path, dict(os.environ), timeout=120, fresh=fresh)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert mentions in proc.stdout


def test_compare_mistakes_are_one_line(tmp_path: Path, idx_root: Path) -> None:
    assert run_gpool(tmp_path, idx_root, "pool=avg,max", *SHORT, multirun=True).returncode == 0
    one_clear_line(compare(tmp_path, "--parent", "0123456789abcdef"), "0123456789abcdef")
    one_clear_line(compare(tmp_path, "--filter", "tags.pool = = 'avg'"), "nvalid")
    both = compare(tmp_path, "--parent", "0123456789abcdef", "--filter", "tags.pool = 'avg'")
    one_clear_line(both, "argument --filter: not allowed with argument --parent")
    # What else lives in an experiment: a notebook's FINISHED run without val_acc, and a
    # run whose group tag someone removed. Both compared or named, no KeyError.
    client = store(tmp_path)
    experiment = client.get_experiment_by_name("gpool").experiment_id
    notebook = client.create_run(experiment, run_name="notebook").info.run_id
    client.set_terminated(notebook, "FINISHED")
    client.delete_tag(job_runs(tmp_path)[0].info.run_id, "dataset")
    proc = compare(tmp_path, "--experiment", "gpool")
    assert proc.returncode == 0, proc.stderr
    assert "notebook: FINISHED without val_acc" in proc.stdout


@pytest.mark.parametrize(
    "uri",
    [
        "a-plain-folder",  # a file store, which MLflow 3 refuses
        "file:///etc",
        "postgresql://gpool:secret@127.0.0.1:1/gpool",  # no driver installed
        "databricks",  # no credentials, no SDK
        "mlflow-artifacts:/x",  # an artifact URI, no tracking store
    ],
)
def test_a_store_gpool_cannot_open_is_one_line(tmp_path: Path, uri: str) -> None:
    uri = str(tmp_path / uri) if uri == "a-plain-folder" else uri
    proc = compare(tmp_path, uri=uri)
    one_clear_line(proc, "cannot open the MLflow store")
    assert "secret" not in proc.stderr


def test_runs_scored_on_other_images_are_refused_and_other_models_compared(
    tmp_path: Path, idx_root: Path
) -> None:
    """An experiment holding runs validated on other images (here a holdout of the training
    images against the test split) is no comparison of heads: one line, naming both sets
    and the filter that picks one. Other models or recipes on the same images are
    factors, compared."""
    assert run_gpool(tmp_path, idx_root, "pool=avg,max", *SHORT, multirun=True).returncode == 0
    widths = run_gpool(tmp_path, idx_root, "model.widths=[4,8,16]", *SHORT)
    assert widths.returncode == 0, widths.stderr
    proc = compare(tmp_path, "--experiment", "gpool")
    assert proc.returncode == 0, proc.stderr
    assert "grouped by pool, model.widths" in proc.stdout
    held = run_gpool(
        tmp_path, idx_root, "pool=avg,max", "dataset.holdout=100", *SHORT, multirun=True
    )
    assert held.returncode == 0, held.stderr
    one_clear_line(compare(tmp_path, "--experiment", "gpool"), "2 different sets of images")
    picked = compare(
        tmp_path, "--experiment", "gpool", "--filter", "params.`dataset.holdout` = '0'"
    )
    assert picked.returncode == 0, picked.stderr


@pytest.mark.skipif(not IS_ROOT, reason="mounts a tmpfs read-only")
def test_compare_on_a_read_only_store_prints_the_report_then_one_line(
    tmp_path: Path, idx_root: Path
) -> None:
    with tmpfs(tmp_path / "ro", "50m") as folder:
        uri = f"mlflow.tracking_uri=sqlite:///{folder}/mlflow.db"
        proc = run_gpool(tmp_path, idx_root, "pool=avg,max", *SHORT, uri, multirun=True)
        assert proc.returncode == 0, proc.stderr
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        proc = compare(tmp_path, uri=f"sqlite:///{folder}/mlflow.db")
        one_clear_line(proc, "could not be put on the sweep's run")
        assert (
            "Verdict: pool=" in proc.stdout and (tmp_path / "compare" / "comparison.md").is_file()
        )


def test_a_relative_sqlite_uri_keeps_database_and_artifacts_together(tmp_path: Path) -> None:
    data = make_idx_root(tmp_path)
    proc = run_gpool(tmp_path, data, *SHORT, "mlflow.tracking_uri=sqlite:///rel/store.db")
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(f"sqlite:///{tmp_path}/rel/store.db")
    experiment = client.get_experiment_by_name("gpool")
    assert experiment.artifact_location == (tmp_path / "rel" / "mlartifacts").as_uri()
    (run,) = client.search_runs([experiment.experiment_id])
    assert (tmp_path / "rel" / "mlartifacts" / run.info.run_id / "artifacts" / "model.pt").is_file()
    assert run.info.status == "FINISHED"


def test_a_password_holding_at_signs_is_redacted_whole() -> None:
    """urllib and requests split the userinfo off at the last @: so must redaction."""
    assert redact("uri http://alice:top@s3cretPW@host:5000/x y") == "uri http://host:5000/x y"
    assert redact(r"mlflow.tracking_uri=http\://alice\:top@s3cretPW@host") == (
        r"mlflow.tracking_uri=http\://host"
    )
    assert redact("sqlite:////tmp/a@b/mlflow.db and mail bob@example.org") == (
        "sqlite:////tmp/a@b/mlflow.db and mail bob@example.org"
    )


class HealthyLooking(http.server.BaseHTTPRequestHandler):
    """A server whose /health answers but whose API never does (MLflow's own /health does
    not touch the database), or that is some other web server (a 404 page)."""

    hang = True

    def do_GET(self) -> None:
        if self.path == "/health":
            body, status = b"OK", 200
        elif self.hang:
            time.sleep(90)
            return
        else:
            body, status = b"<html><body>404 Not Found</body></html>", 404
        self.send_response(status)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("hang", [True, False], ids=["api-hangs", "not-mlflow"])
def test_a_server_that_does_not_answer_mlflows_api_is_one_line_in_seconds(
    tmp_path: Path, idx_root: Path, hang: bool
) -> None:
    handler = type("Handler", (HealthyLooking,), {"hang": hang})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        start = time.monotonic()
        with ThreadPoolExecutor(2) as both:  # each waits out its own timeout: at once
            compared = both.submit(compare, tmp_path, uri=uri)
            at_server = f"mlflow.tracking_uri={uri}"
            trained = both.submit(run_gpool, tmp_path, idx_root, *SHORT, at_server)
            for command in (compared, trained):
                one_clear_line(command.result(), "does not answer MLflow's API")
        assert time.monotonic() - start < 90  # was: still waiting after minutes
    finally:
        server.shutdown()
