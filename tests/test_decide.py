"""hydra/sweeper=decide on real sweeps: rounds of seeds until every pair is settled, the
planner in its log and on its run, a rerun that trains nothing, and the settings it refuses
before any run exists. Its rule, by simulation with known truth: tests/test_sequential.py."""

from __future__ import annotations

import re

import pytest
from conftest import SHORT, compare, history, job_runs, run_gpool, sweep_runs

from gpool import stats
from gpool.decide import settled
from gpool.names import DECIDED_TAG, PLAN_TAG

#: A decide sweep of an lr that cannot learn against one that can, in short runs.
LRS = (
    "hydra/sweeper=decide",
    "optimizer.lr=1e-6,1e-2",
    *SHORT,
    "trainer.epochs=3",
    "trainer.limit_train_batches=8",
)


@pytest.mark.process
def test_a_decide_sweep_stops_when_decided_and_a_rerun_trains_nothing(tmp_path, idx_root) -> None:
    """An lr of 1e-6 against 1e-2: looks at 3, 4, 5... seeds a group, the planner's outlook
    after each in the log and on the sweep's run, until the rule answers "better" (long
    before max_seeds); the verdict is the rule's, its interval the look's repeated one."""
    args = LRS
    proc = run_gpool(tmp_path, idx_root, *args, multirun=True)
    assert proc.returncode == 0, proc.stderr
    found = re.search(r"decided after (\d+) seeds per group \(max_seeds 12\)", proc.stdout)
    assert found, proc.stdout
    n = int(found[1])
    assert 3 < n < 12 and len(job_runs(tmp_path)) == 2 * n
    looks = re.findall(r"look at (\d+) seeds per group", proc.stdout)
    assert looks == [str(m) for m in range(3, n + 1)]
    assert "the planner speaks after the first look, at 3 seeds a group" in proc.stdout
    assert "to decide optimizer.lr=0.01 vs optimizer.lr=1e-06, expect about" in proc.stdout
    (sweep,) = sweep_runs(tmp_path)
    assert sweep.data.tags[DECIDED_TAG] == f"decided after {n} seeds per group"
    assert sweep.data.tags[PLAN_TAG].startswith("first_round=3 seeds_per_round=1 max_seeds=12")
    pair = "optimizer.lr.0.01/vs/optimizer.lr.1e-06"
    steps = [step for step, _ in history(tmp_path, sweep.info.run_id, f"{pair}.p_decided")]
    assert sorted(steps) == list(range(3, n))  # the outlook of every look still undecided
    note = sweep.data.tags["mlflow.note.content"]
    assert note.startswith("Verdict: optimizer.lr=0.01 is better than optimizer.lr=1e-06")
    assert "% repeated CI [" in note and "Answered by the decide sweeper's rule" in note
    planned = compare(tmp_path, tmp_path / "cmp", "--plan")  # the sweep's own plan
    assert planned.returncode == 0, planned.stderr
    pair_line = f"- optimizer.lr=0.01 vs optimizer.lr=1e-06: better at {n} seeds a group"
    assert pair_line in planned.stdout
    # gpool.compare answers a decide sweep's runs by its rule, as the sweep did
    assert note.splitlines()[0] in planned.stdout and "% repeated CI [" in planned.stdout
    wider = compare(tmp_path, tmp_path / "cmp", "--plan", "20")
    assert f"outlook at {n} seeds a group (first_round=3 seeds_per_round=1 max_seeds=20" in (
        wider.stdout
    )
    again = run_gpool(tmp_path, idx_root, *args, multirun=True)
    assert again.returncode == 0 and again.stdout.count("skipping") == 2 * n, again.stdout
    assert f"decided after {n} seeds per group" in again.stdout
    assert len(job_runs(tmp_path)) == 2 * n


@pytest.mark.process
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("pool=avg,max", "seed=0,1"), "hydra/sweeper=decide chooses the seeds itself"),
        (("pool=avg",), "needs something to compare"),
        (
            ("pool=avg,max", "hydra.sweeper.first_round=2"),
            "first_round must be a whole number >= 3",
        ),
        (("pool=avg,max", "compare.margin=abc"), "compare.margin must be a number of points"),
        (("pool=avg,max", "hydra.sweeper.spending=linear"), "spending must be one of"),
        (("pool=avg,max", "hydra.sweeper.futility=1.5"), "futility must be in [0, 1)"),
    ],
)
def test_a_decide_sweep_it_cannot_run_is_one_line(
    tmp_path, idx_root, overrides: tuple[str, ...], message: str
) -> None:
    proc = run_gpool(tmp_path, idx_root, "hydra/sweeper=decide", *overrides, *SHORT, multirun=True)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert job_runs(tmp_path) == [] and sweep_runs(tmp_path) == []  # checked before any run


@pytest.mark.process
def test_a_decide_sweep_over_tasks_stops_each_task_when_it_is_settled(tmp_path, idx_root) -> None:
    """The lrs of the first test on two tasks: each task's pair answered by the rule over
    the family of both; occluded is settled at the first look and given no more seeds,
    while translated (four times the pixels, too few steps to learn) goes on alone to
    max_seeds; the verdict across the tasks names both."""
    args = (
        *LRS,
        "hydra.sweeper.max_seeds=4",
        "hydra.sweeper.futility=0",  # translated stays open to the end
        "dataset=occluded,translated",
        "++dataset.base.checksums=null",
    )
    proc = run_gpool(tmp_path, idx_root, *args, multirun=True)
    assert proc.returncode == 0, proc.stderr
    assert "settled, no more seeds: dataset=occluded" in proc.stdout
    runs = job_runs(tmp_path)
    seeds = {
        task: sorted({int(r.data.params["seed"]) for r in runs if r.data.tags["dataset"] == task})
        for task in ("occluded", "translated")
    }
    assert seeds == {"occluded": [0, 1, 2], "translated": [0, 1, 2, 3]}
    assert len(runs) == 2 * (3 + 4)
    (sweep,) = sweep_runs(tmp_path)
    verdict = sweep.data.tags["mlflow.note.content"].splitlines()[0]
    assert "optimizer.lr=0.01 better on dataset=occluded" in verdict
    assert "on dataset=translated" in verdict and "Holm over 2 pairs in 2 tasks" in verdict


def test_a_settled_sweep_says_how_many_of_its_pairs_it_decided() -> None:
    """One pair undecidable among decided ones (a task where the heads tie) is not the
    sweep's outcome: the line counts both."""
    better, worse, none = stats.BETTER, stats.WORSE, stats.UNDECIDABLE
    assert settled([better], 5) == "decided after 5 seeds per group"
    assert settled([none, none], 7) == "undecidable after 7 seeds per group"
    mixed = settled([none, worse, worse, better], 10)
    assert mixed == "settled (3 of 4 pairs decided, 1 undecidable) after 10 seeds per group"
