"""hydra/sweeper=decide: rounds of seeds until every pair is decided, on a real sweep; and
its sequential rule by simulation with known truth (no training): error rates within
their Monte-Carlo bounds, and the seeds it spends against a fixed design."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import SHORT, job_runs, run_gpool, sweep_runs

from gpool import stats
from gpool.names import DECIDED_TAG

ALPHA = 0.05
SWEEPS = 4000
MARGIN = 0.5
#: The rounds experiment=decide plans: 3, 6, 9, 12, 15 seeds per group.
PLAN = stats.rounds(3, 3, 15)
#: The test images' share of a difference's standard error (points): one draw per sweep,
#: as every round scores the same test set; about the seed term's at 20 seeds, a harder
#: case than FashionMNIST's quick sweep (0.07 points there, against 0.46 over 3 seeds).
IMAGE_SE = 0.1


def sequential(true_diff: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """SWEEPS simulated decide sweeps of two heads: per seed a shared seed effect (0.45
    points) plus each head's own noise (0.3), the spread gpool's quick sweep shows, and the
    test set's own draw of the difference (IMAGE_SE, the same in every round). Each round
    looks at the seeds so far at look_alpha, its interval covering seeds and images, and
    stops once decided. Returns every sweep's answer and the seeds per group it used."""
    rng = np.random.default_rng(seed)
    alpha = stats.look_alpha(ALPHA, len(PLAN))
    answers, used = [], []
    for _ in range(SWEEPS):
        shared = rng.normal(88.0, 0.45, PLAN[-1])
        a = shared + true_diff + rng.normal(0, IMAGE_SE) + rng.normal(0, 0.3, PLAN[-1])
        b = shared + rng.normal(0, 0.3, PLAN[-1])
        for n in PLAN:
            d = stats.difference(a[:n], b[:n], True, IMAGE_SE**2)
            interval = d.interval(1 - alpha)
            answer = stats.decide(
                d.p_difference(), d.p_equivalence(MARGIN), interval, MARGIN, alpha
            )
            if stats.decided([answer]):
                break
        answers.append(answer)
        used.append(n)
    return np.array(answers), np.array(used)


def bound(rate: float) -> float:
    return rate + 3 * math.sqrt(rate * (1 - rate) / SWEEPS)


def test_no_true_difference_is_called_better_in_at_most_alpha_of_sequential_sweeps() -> None:
    answers, used = sequential(0.0, seed=1)
    assert np.isin(answers, [stats.BETTER, stats.BETTER_WITHIN]).mean() <= bound(ALPHA)
    assert used.mean() < PLAN[-1]  # equivalence is usually shown before the last round


def test_twice_the_margin_is_called_equivalent_in_at_most_alpha_of_sequential_sweeps() -> None:
    answers, used = sequential(2 * MARGIN, seed=2)
    assert (answers == stats.EQUIVALENT).mean() <= bound(ALPHA)
    assert (answers == stats.BETTER).mean() > 0.9 and used.mean() < PLAN[-1] / 2


def test_at_the_margin_the_sequential_rule_calls_equivalence_in_at_most_alpha() -> None:
    answers, _ = sequential(MARGIN, seed=3)
    assert (answers == stats.EQUIVALENT).mean() <= bound(ALPHA)


def test_a_clear_difference_costs_fewer_seeds_than_a_fixed_design_of_the_same_power() -> None:
    """At twice the margin most sweeps stop after two rounds, where a fixed design that
    decides as often needs its seeds every time. (Close to the margin, looking five times
    at a fifth of alpha costs seeds instead: the README's table states both.)"""
    answers, used = sequential(2 * MARGIN, seed=4)
    power = min(0.99, float(np.mean(answers != stats.UNDECIDED)))
    spread = math.sqrt(2) * 0.3
    fixed = stats.seeds_to_decide(spread, 2 * MARGIN, MARGIN, True, ALPHA, power, IMAGE_SE**2)
    assert used.mean() < fixed, (used.mean(), fixed, power)


@pytest.mark.process
def test_a_decide_sweep_stops_when_decided_and_a_rerun_trains_nothing(tmp_path, idx_root) -> None:
    """An lr of 1e-6 against 1e-2: decided ("better") after the first round of 3 seeds."""
    args = (
        "hydra/sweeper=decide",
        "optimizer.lr=1e-6,1e-2",
        *SHORT,
        "trainer.epochs=3",
        "trainer.limit_train_batches=8",
    )
    proc = run_gpool(tmp_path, idx_root, *args, multirun=True)
    assert proc.returncode == 0, proc.stderr
    assert "decided after 3 seeds per group" in proc.stdout, proc.stdout
    assert len(job_runs(tmp_path)) == 6
    (sweep,) = sweep_runs(tmp_path)
    assert sweep.data.tags[DECIDED_TAG] == "after 3 seeds per group"
    note = sweep.data.tags["mlflow.note.content"]
    assert note.startswith("Verdict: optimizer.lr=0.01 is better than optimizer.lr=1e-06")
    again = run_gpool(tmp_path, idx_root, *args, multirun=True)
    assert again.returncode == 0 and again.stdout.count("skipping") == 6, again.stdout
    assert len(job_runs(tmp_path)) == 6


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
    ],
)
def test_a_decide_sweep_it_cannot_run_is_one_line(
    tmp_path, idx_root, overrides: tuple[str, ...], message: str
) -> None:
    proc = run_gpool(tmp_path, idx_root, "hydra/sweeper=decide", *overrides, *SHORT, multirun=True)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert job_runs(tmp_path) == [] and sweep_runs(tmp_path) == []  # checked before any run
