"""MLflow logging (the `mlflow:` config block): one MLflow run per Hydra job.

Uses MlflowClient with an explicit tracking URI rather than the fluent API, so a job never
depends on process-global MLflow state left by the job before it in a multirun.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.experimental.callback import Callback
from mlflow.entities import Metric, Param, Run, RunStatus
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from gpool import PROJECT_ROOT, GpoolError
from gpool.engine import EpochResult, handle_stop_signals

log = logging.getLogger(__name__)

#: MLflow 3's UI opens experiments without this tag on its GenAI overview, hiding runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
#: Tag that marks a sweep's parent run (value "sweep").
ROLE_TAG = "gpool.role"
#: Tag holding config_hash(): how a rerun finds the run of the same config.
HASH_TAG = "gpool.config_hash"
#: Tag holding the path of the run's latest checkpoint.
CHECKPOINT_TAG = "gpool.checkpoint"
#: Config keys (and prefixes) left out of config_hash and of gpool.compare's factors.
NOT_RESULT_KEYS = ("mlflow", "data_dir", "trainer.threads", "trainer.resume")
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


def check_reachable(tracking_uri: str) -> None:
    """Fail fast with one message when a tracking server does not answer; MLflow's own
    client would retry for minutes first."""
    if urlparse(tracking_uri).scheme not in ("http", "https"):
        return
    try:
        urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=10)
    except OSError as err:
        raise GpoolError(
            f"MLflow tracking server {tracking_uri} is unreachable ({err}); start it "
            "(`mlflow server --host 127.0.0.1 --port PORT ...`) or point "
            "mlflow.tracking_uri / MLFLOW_TRACKING_URI elsewhere"
        ) from None


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Create (and for sqlite, migrate) the store and the experiment; return its id.

    Run once before any job: several processes opening a fresh sqlite store at once each
    run the schema migration and corrupt it.
    """
    check_reachable(tracking_uri)
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


def check_writable(folder: Path, key: str) -> None:
    """Fail with one message, before anything is logged, when outputs cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise GpoolError(
            f"cannot write the output folder {folder} ({err.strerror}); choose another with "
            f"{key}=..."
        ) from None


class SweepTracking(Callback):
    """Hydra callback, run in the launching process, before any job.

    Checks that the output folder is writable and prepares the MLflow store before any job
    starts (see ensure_experiment) and, for a multirun, opens one parent
    run that every job's run nests under. Jobs learn the parent's id from the environment
    variable PARENT_RUN_ENV, which processes started by other launchers inherit. The parent
    ends FINISHED when every child did, KILLED when the sweep was interrupted, FAILED
    otherwise (also when Hydra stops on a failed job before `on_multirun_end`, through an
    atexit hook).

    SIGTERM stops the launching process the way Ctrl-C does: launchers that run jobs in
    worker processes (joblib) then stop their workers, and the parent run is closed,
    instead of the process dying at once and leaving workers and a RUNNING parent behind.
    """

    def __init__(self) -> None:
        # (tracking URI, run id): plain strings, as launchers pickle callbacks to workers.
        self.parent: tuple[str, str] | None = None
        self.interrupted = False

    @staticmethod
    def prepare(config: DictConfig, output_dir: str, key: str) -> str:
        """Check the outputs and the store; stop the whole command on a problem.

        Hydra turns exceptions raised in callbacks into warnings and carries on, so a
        problem found here ends the process with its one-line message instead.
        """
        try:
            check_writable(Path(output_dir), key)
            return ensure_experiment(config.mlflow.tracking_uri, config.mlflow.experiment_name)
        except GpoolError as err:
            raise SystemExit(f"gpool: {err}") from None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.prepare(config, config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        experiment_id = self.prepare(config, config.hydra.sweep.dir, "hydra.sweep.dir")
        tracking_uri = config.mlflow.tracking_uri
        overrides = " ".join(config.hydra.overrides.task)
        client = MlflowClient(tracking_uri)
        tags = {ROLE_TAG: "sweep", "sweep_dir": str(config.hydra.sweep.dir), "overrides": overrides}
        if commit := git_commit():
            tags["mlflow.source.git.commit"] = commit
        run = client.create_run(experiment_id, run_name=f"sweep {overrides}".strip(), tags=tags)
        self.parent = (tracking_uri, run.info.run_id)
        os.environ[PARENT_RUN_ENV] = run.info.run_id
        atexit.register(self.close_parent)  # Hydra skips on_multirun_end when a job fails
        handle_stop_signals(self._interrupt)
        log.info("MLflow sweep run %s: %s", run.info.run_id, overrides)

    def _interrupt(self, signum: int, frame: Any) -> None:
        self.interrupted = True
        raise KeyboardInterrupt(f"sweep stopped by {signal.Signals(signum).name}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.close_parent(completed=True)

    def close_parent(self, completed: bool = False) -> None:
        """End the parent run: FINISHED when Hydra completed the sweep and every child run
        FINISHED (a rerun whose jobs were all skipped has none); KILLED when a signal stopped
        the sweep or one of its jobs; FAILED otherwise."""
        if self.parent is None:
            return
        tracking_uri, run_id = self.parent
        client = MlflowClient(tracking_uri)
        self.parent = None
        os.environ.pop(PARENT_RUN_ENV, None)
        children = child_runs(client, run_id)
        if not completed:  # stopped launchers kill their workers: give up their runs
            deadline = time.monotonic() + 10
            for child in children:
                if child.info.status == "RUNNING" and not alive_at(child, deadline):
                    mark_killed(tracking_uri, child.info.run_id)
            children = child_runs(client, run_id)
        statuses = {c.info.status for c in children}
        if completed and statuses <= {"FINISHED"}:
            status = "FINISHED"
        elif self.interrupted or "KILLED" in statuses:
            status = "KILLED"
        else:
            status = "FAILED"
        client.set_terminated(run_id, status)


def child_runs(client: MlflowClient, parent_run_id: str) -> list[Run]:
    """The job runs of a sweep, oldest first."""
    parent = client.get_run(parent_run_id)
    return client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=10000,
    )


def affects_result(key: str) -> bool:
    """Whether a dotted config key can change what a run learns; where it is logged or
    cached, its thread count and whether it resumes cannot."""
    return not any(key == p or key.startswith(f"{p}.") for p in NOT_RESULT_KEYS)


def config_hash(config: Mapping[str, Any]) -> str:
    """A fingerprint of what determines a run's result: the resolved config's keys that
    affect it (see affects_result)."""
    kept = {k: v for k, v in flatten(config).items() if affects_result(k)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:20]


def previous_run(tracking_uri: str, experiment_name: str, fingerprint: str) -> Run | None:
    """The newest run of the same config: a FINISHED one first, else the newest of any."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.`{HASH_TAG}` = '{fingerprint}'",
        order_by=["attributes.start_time DESC"],
    )
    finished = [r for r in runs if r.info.status == "FINISHED"]
    return (finished or runs or [None])[0]


def slurm_job() -> str | None:
    """This process's SLURM job (array job_task), which a requeued job keeps."""
    if array := os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    return os.environ.get("SLURM_JOB_ID")


def on_this_host(run: Run) -> bool:
    """Whether the run's process was started on this machine (its pid means something here)."""
    return run.data.tags.get("gpool.host") == socket.gethostname()


def is_alive(run: Run) -> bool:
    """Whether a RUNNING run's process still lives; a SIGKILL'd one left RUNNING does not.

    A run started by this very SLURM job is a pre-empted earlier incarnation of it (dead);
    on this host the pid tells; a process on another host cannot be checked and counts as
    alive.
    """
    tags = run.data.tags
    if tags.get("gpool.slurm_job") and tags["gpool.slurm_job"] == slurm_job():
        return False
    if not on_this_host(run):
        return True
    try:
        os.kill(int(tags.get("gpool.pid", "0")), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return int(tags["gpool.pid"]) != os.getpid()


def alive_at(run: Run, deadline: float) -> bool:
    """Whether a RUNNING run's process still lives, waiting until `deadline` (monotonic
    seconds) for one on this host that was just told to stop; one elsewhere counts as alive
    at once (see is_alive)."""
    while is_alive(run):
        if not on_this_host(run) or time.monotonic() > deadline:
            return True
        time.sleep(0.1)
    return False


def mark_killed(tracking_uri: str, run_id: str) -> None:
    MlflowClient(tracking_uri).set_terminated(run_id, "KILLED")


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
        resume_run_id: str | None = None,
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
        self.tags.update({"gpool.host": socket.gethostname(), "gpool.pid": str(os.getpid())})
        if job := slurm_job():
            self.tags["gpool.slurm_job"] = job
        self.run_id = resume_run_id or ""

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call an MlflowClient method, adding its time to `seconds`."""
        start = time.perf_counter()
        try:
            return getattr(self.client, method)(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def __enter__(self) -> Tracker:
        if self.run_id:  # resuming: same run, same params; it is RUNNING again, here
            self._call("update_run", self.run_id, status="RUNNING")
            for key, value in self.tags.items():
                self._call("set_tag", self.run_id, key, value)
            log.info("MLflow run %s (%s) resumed", self.run_id, self.run_name)
            return self
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
