"""An MLflow store as gpool reads it: opened and checked so that every command fails in
seconds with one line, experiments made, and queries: every run a search matches (paged,
never cut at a page), a sweep's parent runs and jobs, one run per config, metric histories
in bulk. Torch-free: gpool.compare reads a store without importing torch. What one run
writes is gpool.tracking's."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import tempfile
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

from mlflow.entities import Metric, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request, verify_rest_response

from gpool.errors import GpoolError
from gpool.names import HASH_TAG, JOB_TAG_PREFIX, PARENT_RUN_ENV, ROLE_TAG, SWEEP_ROLE

log = logging.getLogger(__name__)

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


#: MLflow's error codes for a request the store refused (an unknown run id, a malformed
#: filter), as against a store that failed to answer (INTERNAL_ERROR, TEMPORARILY_UNAVAILABLE).
USER_ERRORS = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST"})


def store_failing(err: BaseException) -> bool:
    """Whether `err` says the store failed to answer (a server gone, timing out or erring),
    not that it refused a request or lacks a file: what no comparison may go on past, as
    it would over part of its runs or images."""
    import requests  # MLflow's own HTTP client

    if isinstance(err, MlflowException):
        return err.error_code not in USER_ERRORS
    return isinstance(err, requests.ConnectionError | requests.Timeout)


def quiet_and_bounded() -> None:
    """Before the first MLflow call of a process: HTTP_DEFAULTS where the user set none
    (inherited by the jobs a launcher starts), and MLflow's sqlite store kept from logging
    each failed statement with its whole traceback before raising the MlflowException
    that gpool reports in one line (store_failed)."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


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
    quiet_and_bounded()
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


#: MLflow 3's UI opens experiments without this tag on its GenAI overview, hiding runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


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


#: Runs a search asks for at a time; search_all asks until the store has no more.
PAGE = 10_000


def search_all(
    client: MlflowClient,
    experiments: Sequence[str],
    filter_string: str = "",
    order_by: Sequence[str] | None = None,
) -> list[Run]:
    """Every run the search matches, page after page: a comparison of an experiment of more
    than one page's runs compares all of them, never part."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            list(experiments),
            filter_string,
            max_results=PAGE,
            order_by=list(order_by or []),
            page_token=token,
        )
        runs += page
        token = page.token
        if not token:
            return runs


def sweeps(client: MlflowClient, experiment: str) -> list[Run]:
    """The experiment's sweeps (their parent runs), newest first."""
    role = f"tags.`{ROLE_TAG}` = '{SWEEP_ROLE}'"
    return search_all(client, [experiment], role, ["attributes.start_time DESC"])


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
    children = f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    runs = {r.info.run_id: r for r in search_all(client, [parent.info.experiment_id], children)}
    for name, run_id in parent.data.tags.items():
        if name.startswith(JOB_TAG_PREFIX) and run_id not in runs:
            try:
                runs[run_id] = client.get_run(run_id)
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise  # a failing store must not shrink the sweep silently
                continue  # deleted since: that job has no run now
    return one_per_config(runs.values())


def one_per_config(runs: Iterable[Run]) -> list[Run]:
    """One run per config, oldest first. Where a config has several runs (a retrain with
    trainer.resume=false, or a run stopped before its first checkpoint and started afresh),
    its newest FINISHED one, else its newest: a seed is never counted twice, and a run that
    a later one replaced is not reported as missing."""
    by_config: dict[str, Run] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        config = run.data.tags.get(HASH_TAG, run.info.run_id)
        kept = by_config.get(config)
        if kept is None or run.info.status == "FINISHED" or kept.info.status != "FINISHED":
            by_config[config] = run
    return sorted(by_config.values(), key=lambda r: r.info.start_time)


def previous_run(client: MlflowClient, experiment_id: str, fingerprint: str) -> Run | None:
    """The run of this config that counts (one_per_config), or None."""
    runs = search_all(client, [experiment_id], f"tags.`{HASH_TAG}` = '{fingerprint}'")
    return next(iter(one_per_config(runs)), None)
