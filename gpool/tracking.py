"""MLflow logging (the `mlflow:` config block): one MLflow run per Hydra job.

Uses MlflowClient with an explicit tracking URI rather than the fluent API, so a job never
depends on process-global MLflow state left by the job before it in a multirun.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    Metric,
    Param,
    Run,
    RunStatus,
    SourceType,
)
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE
from omegaconf import DictConfig, OmegaConf

from gpool import PROJECT_ROOT, GpoolError
from gpool.config import GROUPS, flatten
from gpool.engine import EpochResult
from gpool.resume import (
    HASH_TAG,
    LAUNCHER_PID_ENV,
    affects_result,
    alive_at,
    claim,
    config_hash,
    handle_stop_signals,
    is_alive,
    mark_dead_runs_killed,
    process_tags,
)

log = logging.getLogger(__name__)

#: MLflow 3's UI opens experiments without this tag on its GenAI overview, hiding runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
#: Tag that marks a sweep's parent run (value "sweep").
ROLE_TAG = "gpool.role"
#: Tag of a sweep's parent run: what identifies "the same sweep" when it is run again.
SWEEP_KEY_TAG = "gpool.sweep_key"
#: Tag of a sweep's parent run: how many jobs the sweep has (basic sweeper only).
EXPECTED_JOBS_TAG = "gpool.jobs"
#: Tags of a sweep's parent run, one per job: gpool.job.<config hash> = the job's run id,
#: also for a job that finished in an earlier sweep and was skipped.
JOB_TAG_PREFIX = "gpool.job."
#: How a multirun's jobs, in this process or in launcher-started ones, find their parent run.
PARENT_RUN_ENV = "GPOOL_PARENT_RUN_ID"
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
#: user:password@ in a URI (a tracking server's basic auth, a database password), also as
#: Hydra escapes it in a job's overrides (`http\://user\:password@host`).
USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*\\?://)[^/\s@]+@")


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def redact(text: str) -> str:
    """`text` with the credentials of every URI in it removed: nothing gpool logs to MLflow
    (params, tags, run names, config files) carries a password."""
    return USERINFO.sub(r"\g<scheme>", text)


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a sqlite URI (`sqlite:///relative` or `sqlite:////absolute`,
    SQLAlchemy's rule), else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///").split("?")[0]).absolute()


def store_uri(tracking_uri: str) -> str:
    """The tracking URI with a relative sqlite path made absolute, so that the database and
    its artifacts land in one place whatever the cwd of each job."""
    db = sqlite_path(tracking_uri)
    return f"sqlite:///{db}" if db is not None else tracking_uri


def check_reachable(tracking_uri: str) -> None:
    """Fail fast with one message when a tracking server does not answer; MLflow's own
    client would retry for minutes first. Credentials in the URI go in a header."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme not in ("http", "https"):
        return
    url = parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl()
    request = urllib.request.Request(f"{url.rstrip('/')}/health")
    if parsed.username is not None:
        secret = f"{unquote(parsed.username)}:{unquote(parsed.password or '')}"
        request.add_header("Authorization", f"Basic {base64.b64encode(secret.encode()).decode()}")
    try:
        urllib.request.urlopen(request, timeout=10)
    except OSError as err:
        raise GpoolError(
            f"MLflow tracking server {url} is unreachable ({err}); start it "
            "(`mlflow server --host 127.0.0.1 --port PORT ...`) or point "
            "mlflow.tracking_uri / MLFLOW_TRACKING_URI elsewhere"
        ) from None


def open_store(tracking_uri: str, create: bool) -> MlflowClient:
    """A client for the store, checked first so that every command fails in seconds with
    one message: a server must answer; a sqlite store must be writable where it lies
    (`create`, for training) or already exist (reading, e.g. gpool.compare)."""
    tracking_uri = store_uri(tracking_uri)
    check_reachable(tracking_uri)
    db = sqlite_path(tracking_uri)
    if db is not None and not create and not db.is_file():
        raise GpoolError(f"no MLflow store at {db}: check the path of {redact(tracking_uri)}")
    if db is not None and create:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=db.parent):
                pass
            if db.exists():
                db.open("ab").close()
        except OSError as err:
            raise GpoolError(
                f"the MLflow store {db} cannot be written ({err.strerror or err}); point "
                "mlflow.tracking_uri / MLFLOW_TRACKING_URI at a writable place"
            ) from None
    return MlflowClient(tracking_uri)


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, creating it (artifacts beside a sqlite DB) if it is new.

    Created once before any job (SweepTracking): several processes opening a fresh sqlite
    store at once each run the schema migration and corrupt it.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    db = sqlite_path(client.tracking_uri)
    # Beside the DB, not relative to whichever cwd the job has.
    location = (db.parent / "mlartifacts").as_uri() if db is not None else None
    return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)


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


def override_key(override: str) -> str:
    """`+trainer.epochs=3` -> `trainer.epochs`; `hydra/launcher=joblib` -> `hydra/launcher`."""
    return override.split("=", 1)[0].lstrip("+~")


def sweep_key(config: DictConfig) -> str:
    """What makes two multiruns the same sweep: the experiment, the config files they start
    from and the overrides that can change a result (the last of each key, in any order);
    not where or how their jobs run (hydra.*, threads, the store)."""
    effective = {override_key(o): o for o in config.hydra.overrides.task}
    kept = sorted(
        o for k, o in effective.items() if not k.startswith("hydra") and affects_result(k)
    )
    base = {k: v for k, v in OmegaConf.to_container(config).items() if k != "hydra"}
    return " ".join([config.mlflow.experiment_name, config_hash(base), *kept])


def expected_jobs(config: DictConfig) -> int | None:
    """The number of jobs the basic sweeper will launch (None for other sweepers, or when
    the overrides need the config to expand, like glob choices)."""
    sweeper = config.hydra.sweeper
    if not sweeper.get("_target_", "").endswith("BasicSweeper"):
        return None
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    try:
        overrides = OverridesParser.create().parse_overrides(
            [*params, *config.hydra.overrides.task]
        )
        return sum(len(batch) for batch in BasicSweeper.split_arguments(overrides, None))
    except Exception:  # any expansion that needs more than the parser: not counted
        return None


class SweepTracking(Callback):
    """Hydra callback, run in the launching process, before any job.

    Checks that the output folder is writable and prepares the MLflow store before any job
    starts (see experiment_id), ends runs whose process is gone as KILLED and, for a
    multirun, opens the sweep's parent run that every job's run nests under. Running the
    same sweep again continues its parent run, and every job, skipped ones included,
    records its run on the parent, so the sweep always holds all its jobs. Jobs learn the
    parent's id from the environment variable PARENT_RUN_ENV, which processes started by
    other launchers inherit. The parent ends FINISHED when every job did, KILLED when the
    sweep was interrupted, FAILED otherwise (also when Hydra stops on a failed job before
    `on_multirun_end`, through an atexit hook).

    SIGTERM stops the launching process the way Ctrl-C does: launchers that run jobs in
    worker processes (joblib) then stop their workers, and the parent run is closed,
    instead of the process dying at once and leaving workers and a RUNNING parent behind.
    """

    def __init__(self) -> None:
        # (tracking URI, run id): plain strings, as launchers pickle callbacks to workers.
        self.parent: tuple[str, str] | None = None
        self.interrupted = False

    @staticmethod
    def prepare(config: DictConfig, output_dir: str, key: str) -> tuple[MlflowClient, str]:
        """Check the outputs and the store, tidy dead runs; stop the whole command on a
        problem. Hydra turns exceptions raised in callbacks into warnings and carries on,
        so a problem found here ends the process with its one-line message instead."""
        try:
            check_writable(Path(output_dir), key)
            with claim(store_uri(config.mlflow.tracking_uri), "store"):  # one creator
                client = open_store(config.mlflow.tracking_uri, create=True)
                experiment = experiment_id(client, config.mlflow.experiment_name)
        except (GpoolError, MlflowException) as err:
            raise SystemExit(f"gpool: {err}") from None
        mark_dead_runs_killed(client, experiment)
        return client, experiment

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.prepare(config, config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        client, experiment = self.prepare(config, config.hydra.sweep.dir, "hydra.sweep.dir")
        overrides = redact(" ".join(config.hydra.overrides.task))
        key = sweep_key(config)
        tags = {
            ROLE_TAG: "sweep",
            SWEEP_KEY_TAG: redact(key),
            "sweep_dir": str(config.hydra.sweep.dir),
            "overrides": overrides,
            **process_tags(),
        }
        if jobs := expected_jobs(config):
            tags[EXPECTED_JOBS_TAG] = str(jobs)
        if commit := git_commit():
            tags["mlflow.source.git.commit"] = commit
        if earlier := earlier_sweep(client, experiment, redact(key)):
            run_id = earlier.info.run_id
            client.update_run(run_id, status="RUNNING")
            for name, value in tags.items():
                client.set_tag(run_id, name, value)
            log.info("MLflow sweep run %s continued: %s", run_id, overrides)
        else:
            name = f"sweep {overrides}".strip()
            run_id = client.create_run(experiment, run_name=name, tags=tags).info.run_id
            log.info("MLflow sweep run %s: %s", run_id, overrides)
        self.parent = (client.tracking_uri, run_id)
        os.environ[PARENT_RUN_ENV] = run_id
        os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
        atexit.register(self.close_parent)  # Hydra skips on_multirun_end when a job fails
        handle_stop_signals(self._interrupt)

    def _interrupt(self, signum: int, frame: Any) -> None:
        self.interrupted = True
        raise KeyboardInterrupt(f"sweep stopped by {signal.Signals(signum).name}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.close_parent(completed=True)

    def close_parent(self, completed: bool = False) -> None:
        """End the parent run: FINISHED when Hydra completed the sweep and every job's run
        FINISHED; KILLED when a signal stopped the sweep or one of its jobs; FAILED
        otherwise."""
        if self.parent is None:
            return
        tracking_uri, run_id = self.parent
        client = MlflowClient(tracking_uri)
        self.parent = None
        os.environ.pop(PARENT_RUN_ENV, None)
        jobs = sweep_jobs(client, client.get_run(run_id))
        if not completed:  # stopped launchers kill their workers: give up their runs
            deadline = time.monotonic() + 10
            for job in jobs:
                if job.info.status == "RUNNING" and not alive_at(job, deadline):
                    client.set_terminated(job.info.run_id, "KILLED")
            jobs = sweep_jobs(client, client.get_run(run_id))
        statuses = {job.info.status for job in jobs}
        if completed and statuses <= {"FINISHED"}:
            status = "FINISHED"
        elif self.interrupted or "KILLED" in statuses:
            status = "KILLED"
        else:
            status = "FAILED"
        client.set_terminated(run_id, status)


def sweeps(client: MlflowClient, experiment: str) -> list[Run]:
    """The experiment's sweeps (their parent runs), newest first."""
    return client.search_runs(
        [experiment],
        f"tags.`{ROLE_TAG}` = 'sweep'",
        order_by=["attributes.start_time DESC"],
        max_results=1000,
    )


def earlier_sweep(client: MlflowClient, experiment: str, key: str) -> Run | None:
    """The newest parent run of the same sweep, unless it is still running somewhere."""
    for sweep in sweeps(client, experiment):
        if sweep.data.tags.get(SWEEP_KEY_TAG) == key:
            return None if sweep.info.status == "RUNNING" and is_alive(sweep) else sweep
    return None


def register_job(client: MlflowClient, fingerprint: str, run_id: str) -> None:
    """Record on the sweep's parent run (if this job has one) that `run_id` is this job's."""
    if parent := os.environ.get(PARENT_RUN_ENV):
        client.set_tag(parent, f"{JOB_TAG_PREFIX}{fingerprint}", run_id)


def sweep_jobs(client: MlflowClient, parent: Run) -> list[Run]:
    """One run per job of a sweep, oldest first: its child runs and the runs its jobs
    recorded (finished in an earlier sweep). Where a config has several runs (a retrain
    with trainer.resume=false), its newest FINISHED one, else its newest."""
    runs = {
        r.info.run_id: r
        for r in client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
            max_results=10000,
        )
    }
    for name, run_id in parent.data.tags.items():
        if name.startswith(JOB_TAG_PREFIX) and run_id not in runs:
            try:
                runs[run_id] = client.get_run(run_id)
            except MlflowException:  # deleted since: that job has no run now
                continue
    by_config: dict[str, Run] = {}
    for run in sorted(runs.values(), key=lambda r: r.info.start_time):
        config = run.data.tags.get(HASH_TAG, run.info.run_id)
        kept = by_config.get(config)
        if kept is None or run.info.status == "FINISHED" or kept.info.status != "FINISHED":
            by_config[config] = run
    return sorted(by_config.values(), key=lambda r: r.info.start_time)


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
    KILLED on Ctrl-C; the exception always propagates. Params, tags and the run name go
    through `redact`."""

    def __init__(
        self,
        client: MlflowClient,
        experiment: str,
        run_name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        resume_run_id: str | None = None,
    ) -> None:
        self.seconds = 0.0  # spent in MLflow calls; logged as `mlflow_seconds` at the end
        self.client = client
        self.experiment_id = experiment
        self.run_name = redact(run_name)
        self.params = {k: redact(v) for k, v in flatten(params).items()}
        self.tags = {k: redact(str(v)) for k, v in tags.items() if v is not None}
        if commit := git_commit():
            self.tags["mlflow.source.git.commit"] = commit
        if parent := os.environ.get(PARENT_RUN_ENV):
            self.tags["mlflow.parentRunId"] = parent
        self.tags.update(process_tags())
        self.resumed = resume_run_id is not None
        self.run_id = resume_run_id or ""
        self.closed = False

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call an MLflow function, adding its time to `seconds`."""
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def __enter__(self) -> Tracker:
        where = redact(self.client.tracking_uri)
        if self.resumed:  # same run, same params; it is RUNNING again, here
            self._call(self.client.update_run, self.run_id, status="RUNNING")
            for key, value in self.tags.items():
                self._call(self.client.set_tag, self.run_id, key, value)
            log.info("MLflow run %s (%s) resumed in %s", self.run_id, self.run_name, where)
        else:
            create = self.client.create_run
            run = self._call(create, self.experiment_id, run_name=self.run_name, tags=self.tags)
            self.run_id = run.info.run_id
            params = [Param(k, v) for k, v in self.params.items()]
            for batch in chunks(params, MAX_PARAMS_PER_BATCH):
                self._call(self.client.log_batch, self.run_id, params=batch)
            log.info("MLflow run %s (%s) in %s", self.run_id, self.run_name, where)
        self._call(register_job, self.client, self.tags[HASH_TAG], self.run_id)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any):
        if self.closed:  # ended early (one member of a fused group failed)
            return False
        self.closed = True
        if exc_type is None:
            status = RunStatus.FINISHED
            if self.resumed:  # an earlier failure no longer describes this run
                with contextlib.suppress(MlflowException):  # there was none
                    self._call(self.client.delete_tag, self.run_id, "failure")
        elif issubclass(exc_type, KeyboardInterrupt):
            status = RunStatus.KILLED
        else:
            status = RunStatus.FAILED
            failure = redact(f"{exc_type.__name__}: {exc}")[:5000]
            self._call(self.client.set_tag, self.run_id, "failure", failure)
        self._call(self.client.log_metric, self.run_id, "mlflow_seconds", self.seconds)
        self.client.set_terminated(self.run_id, RunStatus.to_string(status))
        return False

    def log_epoch(self, result: EpochResult) -> None:
        """All of an epoch's metrics in one call: per-metric calls are slow on sqlite."""
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, result.epoch) for k, v in result.metrics().items()]
        metrics += [Metric("train_step_loss", v, now, step) for step, v in result.step_losses]
        for batch in chunks(metrics, MAX_METRICS_PER_BATCH):
            self._call(self.client.log_batch, self.run_id, metrics=batch)

    def log_artifacts(self, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            self._call(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_datasets(self, name: str, splits: Mapping[str, tuple[str, int]]) -> None:
        """The run's data as MLflow dataset inputs, one per split: {context: (digest, images)},
        so that the UI's Dataset column names it and runs on other data can be told apart."""
        inputs = [
            DatasetInput(
                Dataset(
                    name,
                    digest,
                    "local",
                    json.dumps({"split": context}),
                    None,
                    json.dumps({"num_images": images}),
                ),
                [InputTag(MLFLOW_DATASET_CONTEXT, context)],
            )
            for context, (digest, images) in splits.items()
        ]
        self._call(self.client.log_inputs, self.run_id, datasets=inputs)

    def log_text(self, text: str, name: str) -> None:
        """A text artifact, with any credentials in it removed."""
        self._call(self.client.log_text, self.run_id, redact(text), name)


def tags_for(choices: Mapping[str, str | None], seed: int, overrides: list[str]) -> dict[str, Any]:
    """Tags the MLflow UI groups by: each config group's choice, the seed, the overrides;
    and the entry point, which the runs table shows as the Source."""
    tags: dict[str, Any] = {group: choice for group, choice in choices.items() if group in GROUPS}
    tags["seed"] = seed
    tags["overrides"] = " ".join(overrides)
    tags[MLFLOW_SOURCE_NAME] = "gpool.train"
    tags[MLFLOW_SOURCE_TYPE] = SourceType.to_string(SourceType.LOCAL)
    return tags
