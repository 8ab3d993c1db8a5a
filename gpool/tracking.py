"""MLflow logging (the `mlflow:` config block): one MLflow run per Hydra job.

Uses MlflowClient with an explicit tracking URI rather than the fluent API, so a job never
depends on process-global MLflow state left by the job before it in a multirun.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import logging
import os
import re
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModelOutput,
    LoggedModelStatus,
    Metric,
    Param,
    Run,
    RunStatus,
    SourceType,
)
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE
from mlflow.utils.rest_utils import http_request, verify_rest_response
from PIL import Image

from gpool import PROJECT_ROOT
from gpool.config import GROUPS, flatten
from gpool.errors import GpoolError
from gpool.resume import HASH_TAG, one_per_config, process_tags

if TYPE_CHECKING:  # hints only: gpool.compare reads a store without importing torch
    from torch import Tensor, nn

    from gpool.engine import EpochResult

log = logging.getLogger(__name__)
# MLflow's sqlite store logs each failed statement with its whole traceback before raising
# the MlflowException that gpool reports in one line (store_failed): keep it to that line.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

#: MLflow 3's UI opens experiments without this tag on its GenAI overview, hiding runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
#: Tag of a run: seconds spent in MLflow calls so far, over every session that trained it.
SECONDS_TAG = "gpool.mlflow_seconds"
#: Tag of a run whose steps could not be captured as a CUDA graph: why; they ran eagerly.
EAGER_TAG = "gpool.eager_because"
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
#: ... and the keys the sweep varies (space-separated), which their run names carry.
SWEPT_KEYS_ENV = "GPOOL_SWEPT_KEYS"
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
#: user:password@ in a URI (a tracking server's basic auth, a database password), also as
#: Hydra escapes it in a job's overrides (`http\://user\:password@host`).
#: Up to the last `@` before the host: a password may hold a raw `@`, which urllib and
#: requests accept (they split the userinfo off at the last one).
USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*\\?://)[^/\s]+@")
#: MLflow's HTTP client waits 120 s a request and retries 7 times (minutes on a server that
#: accepts connections but never answers); gpool bounds each call, unless the user chose:
#: 20 s a request, 5 retries (2+4+8+16+32 s of back-off: a server restarted within a
#: minute loses nothing).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "20", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5"}
for _name, _value in HTTP_DEFAULTS.items():
    os.environ.setdefault(_name, _value)


def store_failed(err: MlflowException) -> GpoolError:
    """One line for a store that broke under a running job (deleted, its disk full, its
    server gone past the retries), instead of MLflow's traceback."""
    return GpoolError(f"the MLflow store failed ({first_line(err)}); what was logged before stands")


def first_line(err: BaseException) -> str:
    """The line of an MLflow error that says what went wrong: the database's own error
    (`(sqlite3.OperationalError) ...`) where SQLAlchemy wraps it, else the first."""
    lines = str(getattr(err, "message", None) or err).strip().splitlines() or [""]
    named = [line for line in lines if re.match(r"\(\w[\w.]*(Error|Exception)\)", line)]
    return (named or lines)[0][:300]


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
    """Fail fast with one message when a tracking server does not answer MLflow's API (its
    `/health` answers even when its database is gone, so the check asks the API itself);
    MLflow's own client would retry for minutes first. Credentials go in a header."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme not in ("http", "https"):
        return
    url = parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl()
    api = "api/2.0/mlflow/experiments/search?max_results=1"
    request = urllib.request.Request(f"{url.rstrip('/')}/{api}")
    if parsed.username is not None:
        secret = f"{unquote(parsed.username)}:{unquote(parsed.password or '')}"
        request.add_header("Authorization", f"Basic {base64.b64encode(secret.encode()).decode()}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            if not isinstance(json.load(answer), dict):  # what an MLflow server answers
                raise ValueError("not an MLflow API answer")
    except (OSError, ValueError) as err:
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:200]
        raise GpoolError(
            f"MLflow tracking server {url} is unreachable or does not answer MLflow's API "
            f"({reason}); start it "
            "(`mlflow server --host 127.0.0.1 --port PORT ...`) or point "
            "mlflow.tracking_uri / MLFLOW_TRACKING_URI elsewhere"
        ) from None


def open_store(tracking_uri: str, create: bool) -> MlflowClient:
    """A client for the store, checked first so that every command fails in seconds with
    one message: a server must answer; a sqlite store must be writable where it lies
    (`create`, for training) or already exist (reading, e.g. gpool.compare); any store
    must answer one query (a plain folder, which MLflow 3 no longer serves, a database
    without its driver, an artifact URI do not)."""
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
    try:
        client = MlflowClient(tracking_uri)
        client.search_experiments(max_results=1)
    except (MlflowException, ImportError) as err:  # ImportError: a database driver missing
        raise GpoolError(
            f"cannot open the MLflow store {redact(tracking_uri)} "
            f"({type(err).__name__}: {first_line(err)})"
        ) from None
    return client


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, creating it (artifacts beside a sqlite DB) if it is new.

    Created once before any job (gpool.sweep.SweepTracking): several processes opening a
    fresh sqlite store at once each run the schema migration and corrupt it.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    db = sqlite_path(client.tracking_uri)
    # Beside the DB, not relative to whichever cwd the job has.
    location = (db.parent / "mlartifacts").as_uri() if db is not None else None
    return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)


def sweeps(client: MlflowClient, experiment: str) -> list[Run]:
    """The experiment's sweeps (their parent runs), newest first."""
    return client.search_runs(
        [experiment],
        f"tags.`{ROLE_TAG}` = 'sweep'",
        order_by=["attributes.start_time DESC"],
        max_results=1000,
    )


def register_job(client: MlflowClient, fingerprint: str, run_id: str) -> None:
    """Record on the sweep's parent run (if this job has one) that `run_id` is this job's."""
    if parent := os.environ.get(PARENT_RUN_ENV):
        client.set_tag(parent, f"{JOB_TAG_PREFIX}{fingerprint}", run_id)


#: MLflow's GetMetricHistoryBulkInterval: the most runs a request may name, and the most
#: steps of a run's history it returns unsampled (a server's limits).
BULK_RUNS, BULK_STEPS = 100, 2500
BULK_ENDPOINT = "/api/2.0/mlflow/metrics/get-history-bulk-interval"


def metric_histories(
    client: MlflowClient, run_ids: Sequence[str], key: str
) -> dict[str, list[Metric]]:
    """Each run's history of metric `key` (its Metric objects, by step). Over a tracking
    server one request per BULK_RUNS runs instead of one a run (280 runs: 3 requests, not
    280); a history the server may have sampled (BULK_STEPS long) is read again whole."""
    if urlparse(client.tracking_uri).scheme not in ("http", "https"):
        return {run_id: client.get_metric_history(run_id, key) for run_id in run_ids}
    try:
        histories = bulk_histories(client.tracking_uri, run_ids, key)
    except (MlflowException, KeyError, TypeError, ValueError):  # no such call, or no answer
        return {run_id: client.get_metric_history(run_id, key) for run_id in run_ids}
    for run_id, history in histories.items():
        if len(history) >= BULK_STEPS:
            histories[run_id] = client.get_metric_history(run_id, key)
    return histories


def bulk_histories(tracking_uri: str, run_ids: Sequence[str], key: str) -> dict[str, list[Metric]]:
    """metric_histories over a server, by GetMetricHistoryBulkInterval; MLflow's own HTTP
    client, credentials, timeouts and retries, as MlflowClient's calls have."""
    histories: dict[str, list[Metric]] = {run_id: [] for run_id in run_ids}
    creds = get_default_host_creds(tracking_uri)
    for start in range(0, len(run_ids), BULK_RUNS):
        params = {"run_ids": list(run_ids[start : start + BULK_RUNS]), "metric_key": key}
        answer = http_request(
            creds, BULK_ENDPOINT, "GET", params={**params, "max_results": BULK_STEPS}
        )
        for metric in verify_rest_response(answer, BULK_ENDPOINT).json().get("metrics", []):
            if metric.get("run_id") not in histories:  # not asked for: not this comparison's
                continue
            histories[metric["run_id"]].append(
                Metric(
                    key,
                    float(metric["value"]),
                    int(metric["timestamp"]),
                    int(metric.get("step", 0)),
                )
            )
    return histories


def sweep_jobs(client: MlflowClient, parent: Run) -> list[Run]:
    """One run per job of a sweep (one_per_config): its child runs and the runs its jobs
    recorded (finished in an earlier sweep)."""
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
    return one_per_config(runs.values())


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def save_network(model: nn.Module, example: Tensor, path: Path) -> None:
    """`model` as an MLflow model at `path`: a CPU copy in the pt2 (torch.export) format,
    which loads without unpickling code, with its signature and `example` as input example.
    Its pip requirements are given: MLflow's inference of them takes ~10 s."""
    # Imported here: mlflow.pytorch takes ~1.4 s to import, and only a run's end needs it.
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    # Contiguous: torch.export's archive mis-groups channels_last weights (and warns).
    network = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()
    x = example.detach().cpu()
    with torch.no_grad():
        signature = infer_signature(x.numpy(), network(x).numpy())
    requirements = [f"torch=={torch.__version__.split('+')[0]}"]
    mlflow.pytorch.save_model(
        network, path, pip_requirements=requirements, signature=signature, input_example=x.numpy()
    )


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
        system_metrics: bool = False,
        earlier_seconds: float = 0.0,
    ) -> None:
        self.seconds = 0.0  # spent in MLflow calls; logged as `mlflow_seconds` at the end
        self.earlier_seconds = earlier_seconds  # ... by the sessions this run resumes
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
        self.system_metrics = system_metrics
        self.monitor: SystemMetricsMonitor | None = None

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
        if self.system_metrics:  # MLflow's own sampler: a thread, every 10 s, `system/*`
            uri = self.client.tracking_uri
            self.monitor = SystemMetricsMonitor(
                self.run_id, resume_logging=self.resumed, tracking_uri=uri
            )
            self.monitor.start()
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
        try:
            self._close(status, None if exc_type is None else f"{exc_type.__name__}: {exc}")
        except (MlflowException, OSError) as err:  # the store itself broke: say so, once
            log.error("MLflow run %s could not be closed (%s)", self.run_id, first_line(err))
        return False

    def _close(self, status: int, failure: str | None) -> None:
        """Record how the run ended. Its MLflow time so far is a tag, overwritten as a
        resumed run goes on; the metric mlflow_seconds is logged once, when it FINISHES."""
        if failure is not None and status == RunStatus.FAILED:
            self._call(self.client.set_tag, self.run_id, "failure", redact(failure)[:5000])
        if self.monitor is not None:  # its last samples go in while the run is still open
            self.monitor.finish()
        total = self.earlier_seconds + self.seconds
        self.client.set_tag(self.run_id, SECONDS_TAG, f"{total:.3f}")
        if status == RunStatus.FINISHED:
            self.client.log_metric(self.run_id, "mlflow_seconds", total)
        self.client.set_terminated(self.run_id, RunStatus.to_string(status))

    def set_tag(self, key: str, value: str) -> None:
        self._call(self.client.set_tag, self.run_id, key, redact(value))

    def log_epoch(self, result: EpochResult) -> None:
        """All of an epoch's metrics in one call: per-metric calls are slow on sqlite."""
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, result.epoch) for k, v in result.metrics().items()]
        metrics += [Metric("train_step_loss", v, now, step) for step, v in result.step_losses]
        for batch in chunks(metrics, MAX_METRICS_PER_BATCH):
            self._call(self.client.log_batch, self.run_id, metrics=batch)

    def log_missing_epochs(self, history: Iterable[EpochResult]) -> None:
        """Log the epochs of `history` that the run has no val_acc for: a run stopped
        after its checkpoint was written but before the epoch was logged."""
        history_of = self.client.get_metric_history
        logged = {m.step for m in self._call(history_of, self.run_id, "val_acc")}
        for result in history:
            if result.epoch not in logged:
                self.log_epoch(result)

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
        try:
            self._call(self.client.log_inputs, self.run_id, datasets=inputs)
        except MlflowException as error:
            # MLflow's store looks a dataset up, then inserts it: runs of a parallel sweep that
            # log the same new dataset at once collide on its unique key, and the losers'
            # transactions roll back. Once the winner committed, a second try finds it.
            log.info("logging the dataset inputs again after: %s", str(error).splitlines()[0])
            self._call(self.client.log_inputs, self.run_id, datasets=inputs)

    def log_model(self, model: nn.Module, example: Tensor, step: int) -> None:
        """The trained network as an MLflow logged model named `model` (the runs table's
        Model column; `mlflow.pytorch.load_model("runs:/<run id>/model")` gives it back),
        saved by save_network."""
        if self.has_model():  # logged before this run was stopped and resumed
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model"
            self._call(save_network, model, example, path)
            logged = self._call(
                self.client.create_logged_model, self.experiment_id, "model", self.run_id
            )
            self._call(self.client.log_model_artifacts, logged.model_id, str(path))
            self._call(self.client.finalize_logged_model, logged.model_id, LoggedModelStatus.READY)
        self._call(self.client.log_outputs, self.run_id, [LoggedModelOutput(logged.model_id, step)])

    def has_model(self) -> bool:
        """Whether the run already logged its finished model."""
        found = self._call(
            self.client.search_logged_models,
            [self.experiment_id],
            filter_string=f"source_run_id = '{self.run_id}'",
        )
        return any(m.status == LoggedModelStatus.READY for m in found)

    def log_image(self, path: Path, key: str, step: int) -> None:
        """A PNG as an MLflow image at `step`: the run page's image slider."""
        with Image.open(path) as image:
            self._call(self.client.log_image, self.run_id, image.copy(), key=key, step=step)

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
