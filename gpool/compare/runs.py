"""The runs a comparison reads, from a store: the latest sweep's jobs, a sweep's by its run,
or an experiment's runs that match a filter (one run per config); each run's curves and
per-image predictions fetched in bulk; runs grouped by the factors they vary (all but the
seed), or tuned on the validation split (--tune). What the statistics read of a group is
its Sample (gpool.compare.verdict)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gpool.compare.samples import Sample
from gpool.config import GROUPS
from gpool.errors import GpoolError
from gpool.names import EXPECTED_JOBS_TAG, FAILURE_TAG, ROLE_TAG, VAL_CONTEXT
from gpool.predictions import ImageScores, fetch_image_scores
from gpool.resume import affects_result
from gpool.store import (
    metric_histories,
    one_per_config,
    search_all,
    store_failing,
    sweep_jobs,
    sweeps,
)

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

    def sample(self) -> Sample:
        """What the statistics read of this group."""
        seeds = tuple(self.seeds())
        return Sample(self.name, self.scores(), seeds, self.image_scores(), self.split)


def task(run: Run) -> str:
    """What a run's accuracy was scored on: the digest of the validation images it logged
    (gpool.data's MLflow dataset inputs), or, for a run logged before them, its dataset.
    Accuracies on different images are no comparison of heads."""
    digests = sorted(
        {
            dataset_input.dataset.digest
            for dataset_input in (run.inputs.dataset_inputs if run.inputs else [])
            if any(t.value == VAL_CONTEXT for t in dataset_input.tags)
        }
    )
    if digests:
        return f"validation images {'/'.join(digests)}"
    return f"dataset={run.data.tags.get('dataset', 'unset')}"


def by_task(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """The runs by what they were scored on (see task), each task named by its dataset
    choice (dataset=translated). Runs scored on different images of one dataset choice (a
    holdout against the test split, another data folder) are no two tasks, and no
    comparison either: refused in one line with a --filter that picks one set."""
    by_images: dict[str, list[Run]] = {}
    for run in runs:
        by_images.setdefault(task(run), []).append(run)
    if len(by_images) == 1:
        return {f"dataset={runs[0].data.tags.get('dataset', 'unset')}": list(runs)}
    chosen = [{r.data.tags.get("dataset", "unset") for r in group} for group in by_images.values()]
    if all(len(c) == 1 for c in chosen) and len(set().union(*chosen)) == len(chosen):
        return {
            f"dataset={c.pop()}": group for c, group in zip(chosen, by_images.values(), strict=True)
        }
    listed = "; ".join(
        f"{t} ({len(group)} runs, e.g. {group[0].info.run_name})" for t, group in by_images.items()
    )
    raise GpoolError(
        f"these runs were scored on {len(by_images)} different sets of images ({listed}) of "
        "one dataset choice, whose accuracies compare no heads: select one set with --filter "
        "on what tells them apart, e.g. \"params.`dataset.holdout` = '0'\""
    )


def factors(runs: Sequence[Run]) -> list[str]:
    """What the runs differ in besides the seed: config group choices (tags) first, then
    any other param that affects results, leaving out params that merely follow a varied
    group."""

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


def varies(values: Sequence[str | None]) -> bool:
    return len(set(values)) > 1


def within_tasks(tasks: Sequence[Sequence[Run]], names: Sequence[str]) -> list[str]:
    """The factors among `names` that vary within a task: what tells groups apart there
    (the others only tell the tasks apart)."""
    return [n for n in names if any(varies([factor(r, n) for r in runs]) for runs in tasks)]


def factor(run: Run, name: str) -> str | None:
    """A run's value of a factor: its choice of a config group, or a param."""
    return run.data.tags.get(name, "unset") if name in GROUPS else run.data.params.get(name)


def group_name(run: Run, names: Sequence[str]) -> str:
    if not names:
        return "all runs"
    return " ".join(f"{n}={factor(run, n)}" for n in names)


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
        if store_failing(err):
            raise  # the store itself failed: gpool.compare says so in its own line
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
