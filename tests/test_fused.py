"""hydra/launcher=fused: a sweep's seeds and heads trained as one stacked model, each job
still its own Hydra job and MLflow run, indistinguishable in the store from a basic sweep."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    DEBIAN_DIR,
    LEAN,
    LONG,
    all_runs,
    history,
    job_runs,
    run_gpool,
    start_gpool,
    store,
    sweep_runs,
)
from mlflow.entities import Run

from gpool import stats

pytestmark = pytest.mark.process

FUSED = "hydra/launcher=fused"
#: 8 steps an epoch on the generated data: 24 steps, "a few dozen". The limit is the whole
#: epoch, said for the launcher's rule as LONG says big_root's. LEAN: what these tests
#: compare is histories; the test of what a fused run logs keeps the model and figures.
STEPS = ("trainer.epochs=3", "trainer.limit_train_batches=8", "trainer.eval_batch_size=128", *LEAN)
HEADS_X_SEEDS = ("pool=avg,max", "seed=0,1")


def by_name(tmp: Path) -> dict[str, object]:
    return {r.info.run_name: r for r in job_runs(tmp)}


def test_a_fused_sweep_trains_what_separate_runs_train(tmp_path: Path, idx_root: Path) -> None:
    fused, basic = tmp_path / "fused", tmp_path / "basic"
    fused.mkdir(), basic.mkdir()
    assert run_gpool(fused, idx_root, FUSED, *HEADS_X_SEEDS, *STEPS, multirun=True).returncode == 0
    assert run_gpool(basic, idx_root, *HEADS_X_SEEDS, *STEPS, multirun=True).returncode == 0
    together, alone = by_name(fused), by_name(basic)
    assert sorted(together) == sorted(alone) and len(together) == 4
    for name, run in together.items():
        for key in ("train_loss", "val_loss"):
            got, expected = (
                history(fused, run.info.run_id, key),
                history(basic, alone[name].info.run_id, key),
            )
            assert [s for s, _ in got] == [1, 2, 3]
            assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-3), (
                name,
                key,
            )
        got = history(fused, run.info.run_id, "val_acc")
        expected = history(basic, alone[name].info.run_id, "val_acc")
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], abs=0.02), name


#: Fused and separate runs compared as paired samples: equivalent within this many points.
SAME_WITHIN = 2.0


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fused_and_separate_runs_are_statistically_the_same(tmp_path: Path) -> None:
    """100 steps on the real FashionMNIST, scored on 3000 test images: float32 sums in
    another order drift fused and separate runs apart (the data the generated sets lack:
    images no run gets all of);
    what holds is statistical: over 6 configs, fused minus separate final accuracy is
    equivalent to 0 within ±SAME_WITHIN points (paired TOST at 0.05) and shows no
    systematic shift (paired t, p > 0.01). The two sweeps run side by side. (Measured
    2026-12-07 over 8 configs: differences of -0.23 to +0.33 points, TOST p 2e-9.)"""
    sweep = ("pool=avg,max", "seed=0,1,2", "trainer.epochs=1", "trainer.limit_train_batches=100")
    sweep += ("trainer.limit_val_batches=3", *LEAN)  # 3000 test images
    real = ("dataset=fashion_mnist",)  # the real files, their md5s checked
    sweeps = {}
    for side, launcher in (("fused", (FUSED,)), ("basic", ())):
        folder = tmp_path / side
        folder.mkdir()
        sweeps[folder] = start_gpool(
            folder, tmp_path / "data", *launcher, *sweep, *real, multirun=True
        )
    with ThreadPoolExecutor(2) as both:  # each pipe read as it fills
        ended = list(both.map(lambda proc: proc.communicate(timeout=600), sweeps.values()))
    for proc, (_, err) in zip(sweeps.values(), ended, strict=True):
        assert proc.returncode == 0, err[-2000:]
    together, alone = (by_name(folder) for folder in sweeps)
    assert sorted(together) == sorted(alone) and len(together) == 6
    finals = [
        np.array([runs[n].data.metrics["val_acc"] * 100 for n in sorted(together)])
        for runs in (together, alone)
    ]
    assert not np.array_equal(*finals), finals  # they drifted: the claim is statistical
    same = stats.difference(*finals, paired=True)
    assert same.p_equivalence(SAME_WITHIN) < 0.05 and same.p_difference() > 0.01, finals


def model_metrics(run: Run) -> set[str]:
    return {key for key in run.data.metrics if not key.startswith("system/")}


#: `python -m gpool.train` with the default launcher's decision told that fusing pays (as
#: on a GPU), on this CPU.
AS_IF_ON_A_GPU = (
    "-c",
    "import runpy, gpool.fusing; gpool.fusing.fusing_blockers = lambda device: []; "
    "runpy.run_module('gpool.train', run_name='__main__', alter_sys=True)",
)


def test_a_fused_sweep_looks_like_a_basic_one_in_mlflow(tmp_path: Path, idx_root: Path) -> None:
    """Both from the default launcher (hydra/launcher=auto): fused where it decides that
    fusing pays, one after another on this CPU as it is."""
    fused, basic = tmp_path / "fused", tmp_path / "basic"
    fused.mkdir(), basic.mkdir()
    short = ("trainer.epochs=1", "trainer.limit_train_batches=2")
    sweep = (*HEADS_X_SEEDS, *short)
    proc = run_gpool(fused, idx_root, *sweep, multirun=True, entry=AS_IF_ON_A_GPU)
    assert proc.returncode == 0, proc.stderr
    assert "jobs that differ only in seed and pool train fused, on the GPU" in proc.stdout
    assert "training 4 jobs as one model" in proc.stdout
    proc = run_gpool(basic, idx_root, *sweep, multirun=True)
    assert proc.returncode == 0, proc.stderr
    assert "the sweep's jobs do not train fused: torch sees no CUDA GPU" in proc.stdout
    assert "one after another: 4 jobs of 2 steps are too short" in proc.stdout
    assert "as one model" not in proc.stdout
    (parent,) = sweep_runs(fused)
    assert parent.info.status == "FINISHED"
    folders = sorted(p.name for p in (fused / "multirun").iterdir() if p.is_dir())
    assert folders == ["0", "1", "2", "3", "comparison"]  # a folder per job, and the verdict
    together, alone = by_name(fused), by_name(basic)
    for name, run in together.items():
        other = alone[name]
        assert (
            run.info.status == "FINISHED"
            and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        )
        assert set(run.data.params) == set(other.data.params)
        # system/* metrics: a sample every 10 s, so only runs that lasted that long have any
        assert model_metrics(run) == model_metrics(other)
        assert set(run.data.tags) == set(other.data.tags) | {
            "gpool.fused_group",
            "gpool.fused_size",
        }
        assert run.data.tags["gpool.fused_size"] == "4"
        files = {a.path for a in store(fused).list_artifacts(run.info.run_id)}
        assert files == {a.path for a in store(basic).list_artifacts(other.info.run_id)}
        assert (Path(run.data.tags["gpool.checkpoint"])).is_file()
    assert len({r.data.tags["gpool.fused_group"] for r in together.values()}) == 1


def test_a_killed_fused_sweep_resumes_every_member_exactly(tmp_path: Path, big_root: Path) -> None:
    args = (FUSED, "pool=avg,max", "trainer.epochs=3", "trainer.log_every_n_steps=10")
    args += LEAN
    reference = tmp_path / "reference"
    reference.mkdir()
    assert run_gpool(reference, big_root, *args, multirun=True).returncode == 0
    killed = tmp_path / "killed"
    killed.mkdir()
    until = [killed / "multirun" / str(n) / "checkpoint.pt" for n in (0, 1)]
    sweep_dir = f"hydra.sweep.dir={killed}/multirun"
    proc = start_gpool(killed, big_root, sweep_dir, *args, until=until, multirun=True)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert {r.info.status for r in job_runs(killed)} == {"KILLED"}
    proc = run_gpool(killed, big_root, *args, multirun=True)
    assert proc.returncode == 0, proc.stderr
    assert "resuming after epoch" in proc.stdout
    done, expected = by_name(killed), by_name(reference)
    assert {r.info.status for r in done.values()} == {"FINISHED"} and len(done) == 2
    for name, run in done.items():
        for key in ("train_loss", "val_loss", "val_acc"):
            assert history(killed, run.info.run_id, key) == history(
                reference, expected[name].info.run_id, key
            ), (name, key)


def test_a_config_a_fused_sweep_will_resume_later_is_not_trained_beside_it(
    tmp_path: Path, big_root: Path
) -> None:
    """A single run stopped after an epoch; a fused sweep holding that config (it resumes
    it after the group that starts fresh); the single command again while that first
    group trains. The config is trained once: the single command waits for the sweep's
    claim, then for the run it finds RUNNING, then skips it as finished; every epoch is
    logged once. The single command's
    start-up (forked from the warm interpreter: well under a second) falls within the
    first group's seven remaining epochs."""
    single = start_gpool(
        tmp_path,
        big_root,
        "pool=max",
        *LONG,
        f"hydra.run.dir={tmp_path}/single",
        until=[tmp_path / "single" / "checkpoint.pt"],
    )
    single.send_signal(signal.SIGTERM)
    single.communicate(timeout=120)
    sweep = start_gpool(
        tmp_path,
        big_root,
        FUSED,
        "pool=avg,max",
        *LONG,
        f"hydra.sweep.dir={tmp_path}/multirun",
        until=[tmp_path / "multirun" / "0" / "checkpoint.pt"],
        multirun=True,
    )
    again = run_gpool(tmp_path, big_root, "pool=max", *LONG)
    sweep.communicate(timeout=300)
    assert sweep.returncode == 0
    assert again.returncode == 0 and "waiting for MLflow run" in again.stdout, again.stdout
    assert "skipping" in again.stdout, again.stdout
    run = by_name(tmp_path)["pool=max seed=0"]
    assert run.info.status == "FINISHED"
    assert [step for step, _ in history(tmp_path, run.info.run_id, "val_acc")] == list(range(1, 9))


def test_a_sweep_of_a_batchnorm_model_trains_its_jobs_one_by_one(
    tmp_path: Path, idx_root: Path
) -> None:
    """model=resnet18 keeps BatchNorm statistics, which a stack cannot hold per member."""
    short = ("trainer.epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1")
    short += LEAN  # exporting and drawing a ResNet-18 is not what this is about
    sweep = (FUSED, "model=resnet18", "pool=avg,max", "trainer.eval_batch_size=50", *short)
    proc = run_gpool(tmp_path, idx_root, *sweep, multirun=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "keeps buffers besides its weights (features.bn1.running_mean..." in proc.stdout
    assert "its 2 jobs train one by one" in proc.stdout
    assert {r.info.status for r in job_runs(tmp_path)} == {"FINISHED"}
    assert len(job_runs(tmp_path)) == 2


def test_a_nan_member_fails_alone_and_a_finished_one_is_skipped(
    tmp_path: Path, idx_root: Path
) -> None:
    short = ("trainer.epochs=2", "trainer.limit_train_batches=3", *LEAN)
    assert run_gpool(tmp_path, idx_root, "pool=gem", "pool.p=2.0", *short).returncode == 0
    p = "pool.p=2.0,3.0,nan"  # the last member's head computes NaN: so does its loss
    proc = run_gpool(tmp_path, idx_root, FUSED, "pool=gem", p, *short, multirun=True)
    assert proc.returncode != 0  # a job failed, and Hydra says so
    assert "skipping pool=gem pool.p=2.0 seed=0" in proc.stdout
    assert "training 3 jobs as one model" in proc.stdout
    runs = {r.data.params["pool.p"]: r for r in job_runs(tmp_path)}
    assert runs["nan"].info.status == "FAILED"
    assert "NonFiniteLossError" in runs["nan"].data.tags["failure"]
    assert runs["2.0"].info.status == "FINISHED" and runs["3.0"].info.status == "FINISHED"
    assert len(job_runs(tmp_path)) == 3  # the finished member was not trained again


def test_a_sweep_handed_over_in_batches_is_refused(tmp_path: Path, idx_root: Path) -> None:
    proc = run_gpool(
        tmp_path, idx_root, FUSED, "hydra.sweeper.max_batch_size=2", *HEADS_X_SEEDS, multirun=True
    )
    assert proc.returncode != 0 and "leave it null with hydra/launcher=fused" in proc.stderr
    assert "Traceback" not in proc.stderr and all_runs(tmp_path) == []  # not the sweep's either


def test_run_names_carry_every_key_the_sweep_varies(tmp_path: Path, idx_root: Path) -> None:
    """Fused members that differed only in pool.p once shared one run name."""
    sweep = (FUSED, "pool=gem", "pool.p=1,3", "optimizer.lr=1e-3,3e-3", *STEPS[1:])
    proc = run_gpool(tmp_path, idx_root, *sweep, "trainer.epochs=1", multirun=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(by_name(tmp_path)) == [
        f"pool=gem pool.p={p} optimizer.lr={lr} seed=0" for p in (1, 3) for lr in ("0.001", "0.003")
    ]


#: `python -c` code that runs gpool.train with the stacked model's forward failing, as a
#: grouped convolution a GPU's library cannot run would: on the probe gpool tries a new
#: stack on (no gradient), or only once training began (with gradients).
FAILING_STACK = """
import sys, torch, gpool.stacking
def forward(self, x):
    if {when}:
        raise RuntimeError("injected: no kernel for this grouped convolution")
    return original(self, x)
original = gpool.stacking.StackedModel.forward
gpool.stacking.StackedModel.forward = forward
from gpool.train import main
main()
"""


def test_a_group_that_cannot_be_stacked_trains_one_by_one(tmp_path: Path, idx_root: Path):
    """Where the stack fails before its first step, each job trains alone, exactly as a
    basic sweep's run, and the log says why; where it fails once training began, the
    runs fail as they would have."""
    fused, basic, late = tmp_path / "fused", tmp_path / "basic", tmp_path / "late"
    for folder in (fused, basic, late):
        folder.mkdir()
    entry = ("-c", FAILING_STACK.format(when="not torch.is_grad_enabled()"))
    proc = run_gpool(fused, idx_root, FUSED, *HEADS_X_SEEDS, *STEPS, multirun=True, entry=entry)
    assert proc.returncode == 0, proc.stderr
    log = proc.stdout + proc.stderr
    assert "4 jobs could not train as one model (RuntimeError: injected" in log, log
    assert "training 4 jobs as one model" in log  # what the launcher tried first
    assert run_gpool(basic, idx_root, *HEADS_X_SEEDS, *STEPS, multirun=True).returncode == 0
    alone = by_name(basic)
    for name, run in by_name(fused).items():
        assert run.info.status == "FINISHED" and "gpool.fused_group" not in run.data.tags
        got = history(fused, run.info.run_id, "val_loss")
        assert got == history(basic, alone[name].info.run_id, "val_loss"), name

    entry = ("-c", FAILING_STACK.format(when="torch.is_grad_enabled()"))
    proc = run_gpool(late, idx_root, FUSED, *HEADS_X_SEEDS, *STEPS, multirun=True, entry=entry)
    assert proc.returncode != 0 and "could not train as one model" not in proc.stdout
    runs = job_runs(late)
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FAILED"}
    assert all("injected" in r.data.tags["failure"] for r in runs)
