"""hydra/sweeper=search: an Optuna study per head on the held-out split, as a user runs it
(real trials trained, a real store queried back), and its bad input as one line."""

from __future__ import annotations

import pytest
from conftest import SHORT, job_runs, run_gpool, sweep_runs
from conftest import compare as run_compare

#: Two heads, two rounds of one trial each, two seeds a trial: 8 jobs.
SEARCH = (
    "hydra/sweeper=search",
    "hydra/launcher=fused",
    "pool=avg,max",
    "dataset.holdout=100",
    "hydra.sweeper.trials=2",
    "hydra.sweeper.trials_per_launch=1",
    "hydra.sweeper.seeds=2",
    "hydra.sweeper.startup_trials=1",
    '+hydra.sweeper.search={optimizer.lr: "tag(log, interval(1e-4, 1e-2))"}',
)


@pytest.mark.process
def test_a_search_tunes_each_head_and_a_rerun_trains_nothing(tmp_path, idx_root) -> None:
    proc = run_gpool(tmp_path, idx_root, *SEARCH, *SHORT, multirun=True)
    assert proc.returncode == 0, proc.stderr
    log = proc.stdout + proc.stderr
    # The studies' samplers share their seed, so every head starts from the same trials (a
    # paired design): each round the fused launcher trains both heads' seeds as one model.
    assert log.count("training 4 jobs as one model") == 2, log
    assert "pool=avg: best of 2 trials optimizer.lr=" in log, log
    jobs, (sweep,) = job_runs(tmp_path), sweep_runs(tmp_path)
    assert len(jobs) == 8
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {sweep.info.run_id}
    for head in ("pool=avg", "pool=max"):
        mine = [r for r in jobs if r.info.run_name.startswith(head + " ")]
        assert len(mine) == 4 and len({r.data.params["optimizer.lr"] for r in mine}) == 2
    note = sweep.data.tags["mlflow.note.content"]
    assert "Tuned optimizer.lr on the validation split" in note, note

    again = run_gpool(tmp_path, idx_root, *SEARCH, *SHORT, multirun=True)
    assert again.returncode == 0, again.stderr
    assert (again.stdout + again.stderr).count("skipping") == 8, again.stdout
    assert len(job_runs(tmp_path)) == 8

    compare = run_compare(tmp_path, tmp_path / "cmp", "--tune", "optimizer.lr")
    assert compare.returncode == 0, compare.stderr
    assert "chosen per group" in compare.stdout, compare.stdout


@pytest.mark.process
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (SEARCH[:3] + SEARCH[4:], "hold out part of the training set"),
        (
            (*SEARCH[:-1], '+hydra.sweeper.search={optimizer.lr: "1e-3"}'),
            "is no search space",
        ),
        ((*SEARCH, "hydra.sweeper.seeds=0"), "seeds and startup_trials >= 1"),
        (
            (*SEARCH[:-1], '+hydra.sweeper.search={seed: "interval(0, 5)"}'),
            "hydra/sweeper=search chooses the seeds itself",
        ),
        ((*SEARCH, "compare.margin=abc"), "compare.margin must be a number of points"),
    ],
)
def test_a_search_it_cannot_run_is_one_line(
    tmp_path, idx_root, overrides: tuple[str, ...], message: str
) -> None:
    proc = run_gpool(tmp_path, idx_root, *overrides, *SHORT, multirun=True)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert job_runs(tmp_path) == [] and sweep_runs(tmp_path) == []  # checked before any run


@pytest.mark.process
def test_a_search_whose_trials_fail_exits_non_zero_and_says_so(tmp_path, idx_root) -> None:
    """SGD at a learning rate of 1e5 and more turns every trial's loss to NaN: the search
    asks for all its trials, then ends non-zero with one line, its runs and its sweep's
    run FAILED."""
    space = '+hydra.sweeper.search={optimizer.lr: "interval(1e5, 1e6)"}'
    overrides = (*SEARCH[:-1], space, "optimizer=sgd")
    proc = run_gpool(tmp_path, idx_root, *overrides, *SHORT, multirun=True)
    assert proc.returncode != 0, proc.stdout
    assert "hydra/sweeper=search: 8 of 8 trial runs failed" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert {r.info.status for r in job_runs(tmp_path)} == {"FAILED"}
    assert [r.info.status for r in sweep_runs(tmp_path)] == ["FAILED"]
