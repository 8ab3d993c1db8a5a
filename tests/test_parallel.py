"""hydra/launcher=auto on a CPU (gpool.parallel): how many jobs run side by side and with
how many threads, decided from the usable cores and the work of a launch (both mocked at
the decision), and real parallel jobs on this machine's two cores."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SHORT, job_runs, run_gpool

from gpool import parallel
from gpool.config import compose_config
from gpool.names import OVERRIDES_TAG, PID_TAG, THREADS_TAG

QUICK = parallel.job_steps(compose_config("experiment=quick"))


def test_a_job_holds_its_epochs_times_its_steps_an_epoch() -> None:
    assert QUICK == 4 * parallel.FULL_EPOCH_STEPS  # make sweep's: four full epochs
    assert parallel.job_steps(compose_config(*SHORT)) == 2 * 3


@pytest.mark.parametrize(
    ("jobs", "steps", "cores", "side", "threads"),
    [
        (6, QUICK, 2, 2, 1),  # make sweep on these machines: both cores, a thread each
        (4, 300, 2, 1, None),  # too short to pay two workers' start-up
        (2, 60 * parallel.FULL_EPOCH_STEPS, 2, 2, 1),  # a decide round of the article
        (6, QUICK, 8, 6, 1),  # fewer jobs than cores: every job its own core
        (6, QUICK, 32, 6, 5),  # ... and the cores left over as threads
        (40, QUICK, 32, 32, 1),  # more jobs than cores: one a core, in turns
        (6, QUICK, 1, 1, None),  # one core: nothing to run beside
    ],
)
def test_the_rule_keeps_every_core_busy_once_jobs_pay_their_start_up(
    jobs: int, steps: int, cores: int, side: int, threads: int | None
) -> None:
    choice = parallel.choose(jobs, steps, cores)
    assert (choice.jobs, choice.threads) == (side, threads), choice.why


def test_an_explicit_count_wins() -> None:
    choice = parallel.choose(4, 300, 2, wanted=2)
    assert (choice.jobs, choice.threads, choice.why) == (2, 1, "hydra.launcher.jobs=2")


def test_usable_cores_follow_the_affinity_mask_and_a_cgroup_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: set(range(8)))
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(parallel, "CGROUP_CPU", quota)
    assert parallel.usable_cores() == 8  # no cgroup file: the mask
    quota.write_text("max 100000\n")
    assert parallel.usable_cores() == 8
    quota.write_text("250000 100000\n")  # a container of 2.5 CPUs
    assert parallel.usable_cores() == 2


@pytest.mark.process
def test_jobs_side_by_side_train_in_their_own_processes_with_a_thread_each(
    tmp_path: Path, idx_root: Path
) -> None:
    """The default launcher told to run two jobs at a time (the decision above is what
    tells it on its own): two worker processes, one torch thread each, recorded on their
    runs."""
    args = ("pool=avg,max", "hydra.launcher.jobs=2", *SHORT)
    proc = run_gpool(tmp_path, idx_root, *args, multirun=True)
    assert proc.returncode == 0, proc.stderr
    assert "2 jobs side by side: hydra.launcher.jobs=2" in proc.stdout + proc.stderr
    runs = job_runs(tmp_path)
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert {r.data.tags[THREADS_TAG] for r in runs} == {"1"}
    assert all("trainer.threads=1" in r.data.tags[OVERRIDES_TAG] for r in runs)
    assert len({r.data.tags[PID_TAG] for r in runs}) == 2
