"""MLflow logging (the `mlflow:` config block): one MLflow run per Hydra job.

Uses MlflowClient with an explicit tracking URI rather than the fluent API, so a job never
depends on process-global MLflow state left by the job before it in a multirun.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.experimental.callback import Callback
from mlflow.entities import Metric, Param, Run, RunStatus
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from gpool import PROJECT_ROOT
from gpool.engine import EpochResult

log = logging.getLogger(__name__)

#: MLflow 3's UI opens experiments without this tag on its GenAI overview, hiding runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
#: Tag that marks a sweep's parent run (value "sweep").
ROLE_TAG = "gpool.role"
#: How a multirun's jobs, in this process or in launcher-started ones, find their parent run.
PARENT_RUN_ENV = "GPOOL_PARENT_RUN_ID"
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_LENGTH = 6000


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"dotted.key": "value"}, the shape MLflow params need."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a sqlite:/// URI, else None."""
    parsed = urlparse(tracking_uri)
    return Path(parsed.path) if parsed.scheme == "sqlite" else None


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Create (and for sqlite, migrate) the store and the experiment; return its id.

    Run once before any job: several processes opening a fresh sqlite store at once each
    run the schema migration and corrupt it.
    """
    db = sqlite_path(tracking_uri)
    artifact_location = None
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        # Beside the DB, not relative to whichever cwd the job has.
        artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_KIND)


class SweepTracking(Callback):
    """Hydra callback, run in the launching process.

    Prepares the MLflow store before any job starts and, for a multirun, opens one parent
    run that every job's run nests under. Jobs learn the parent's id from the environment
    variable PARENT_RUN_ENV, which processes started by other launchers inherit. The parent
    ends FINISHED when every child did, FAILED otherwise (also when Hydra stops on a failed
    job before `on_multirun_end`, through an atexit hook).
    """

    def __init__(self) -> None:
        self.parent: tuple[MlflowClient, str] | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        ensure_experiment(config.mlflow.tracking_uri, config.mlflow.experiment_name)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        tracking_uri = config.mlflow.tracking_uri
        experiment_id = ensure_experiment(tracking_uri, config.mlflow.experiment_name)
        overrides = " ".join(config.hydra.overrides.task)
        client = MlflowClient(tracking_uri)
        tags = {ROLE_TAG: "sweep", "sweep_dir": str(config.hydra.sweep.dir), "overrides": overrides}
        if commit := git_commit():
            tags["mlflow.source.git.commit"] = commit
        run = client.create_run(experiment_id, run_name=f"sweep {overrides}".strip(), tags=tags)
        self.parent = (client, run.info.run_id)
        os.environ[PARENT_RUN_ENV] = run.info.run_id
        atexit.register(self.close_parent)
        log.info("MLflow sweep run %s: %s", run.info.run_id, overrides)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.close_parent()

    def close_parent(self) -> None:
        """End the parent run: FINISHED if it has children and all of them FINISHED."""
        if self.parent is None:
            return
        client, run_id = self.parent
        self.parent = None
        os.environ.pop(PARENT_RUN_ENV, None)
        children = child_runs(client, run_id)
        ok = children and all(c.info.status == "FINISHED" for c in children)
        client.set_terminated(run_id, "FINISHED" if ok else "FAILED")


def child_runs(client: MlflowClient, parent_run_id: str) -> list[Run]:
    """The job runs of a sweep, oldest first."""
    parent = client.get_run(parent_run_id)
    return client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=10000,
    )


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


class Tracker:
    """Context manager around one MLflow run: FINISHED on success, FAILED on an exception,
    KILLED on Ctrl-C; the exception always propagates."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        run_name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
    ) -> None:
        self.seconds = 0.0  # spent in MLflow calls; logged as `mlflow_seconds` at the end
        start = time.perf_counter()
        self.client = MlflowClient(tracking_uri)
        self.experiment_id = ensure_experiment(tracking_uri, experiment_name)
        self.seconds += time.perf_counter() - start
        self.run_name = run_name
        self.params = flatten(params)
        self.tags = {k: str(v) for k, v in tags.items() if v is not None}
        if commit := git_commit():
            self.tags["mlflow.source.git.commit"] = commit
        if parent := os.environ.get(PARENT_RUN_ENV):
            self.tags["mlflow.parentRunId"] = parent
        self.run_id = ""

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call an MlflowClient method, adding its time to `seconds`."""
        start = time.perf_counter()
        try:
            return getattr(self.client, method)(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def __enter__(self) -> Tracker:
        run = self._call("create_run", self.experiment_id, run_name=self.run_name, tags=self.tags)
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in self.params.items()]
        for batch in chunks(params, MAX_PARAMS_PER_BATCH):
            self._call("log_batch", self.run_id, params=batch)
        log.info("MLflow run %s (%s) in %s", self.run_id, self.run_name, self.client.tracking_uri)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any):
        if exc_type is None:
            status = RunStatus.FINISHED
        elif issubclass(exc_type, KeyboardInterrupt):
            status = RunStatus.KILLED
        else:
            status = RunStatus.FAILED
            self._call("set_tag", self.run_id, "failure", f"{exc_type.__name__}: {exc}"[:5000])
        self._call("log_metric", self.run_id, "mlflow_seconds", self.seconds)
        self.client.set_terminated(self.run_id, RunStatus.to_string(status))
        return False

    def log_epoch(self, result: EpochResult) -> None:
        """All of an epoch's metrics in one call: per-metric calls are slow on sqlite."""
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, result.epoch) for k, v in result.metrics().items()]
        metrics += [Metric("train_step_loss", v, now, step) for step, v in result.step_losses]
        for batch in chunks(metrics, MAX_METRICS_PER_BATCH):
            self._call("log_batch", self.run_id, metrics=batch)

    def log_artifacts(self, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            if path.is_dir():
                self._call("log_artifacts", self.run_id, str(path), artifact_path or path.name)
            else:
                self._call("log_artifact", self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self._call("log_text", self.run_id, text, name)


def tags_for(choices: Mapping[str, str | None], seed: int, overrides: list[str]) -> dict[str, Any]:
    """Tags the MLflow UI groups by: each config group's choice, the seed, the overrides."""
    tags: dict[str, Any] = {
        group: choice
        for group, choice in choices.items()
        if group in ("pool", "dataset", "optimizer", "scheduler", "model", "experiment")
    }
    tags["seed"] = seed
    tags["overrides"] = " ".join(overrides)
    return tags
