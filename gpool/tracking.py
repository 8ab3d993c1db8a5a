"""What one job writes to MLflow (the `mlflow:` config block): its run, opened, logged and
ended by `Tracker`, and its trained network as a logged model. Opening and reading a store
is gpool.store's.

Uses MlflowClient with an explicit tracking URI rather than the fluent API, so a job never
depends on process-global MLflow state left by the job before it in a multirun.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModelOutput,
    LoggedModelStatus,
    Metric,
    Param,
    RunStatus,
    SourceType,
)
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE
from PIL import Image

from gpool import PROJECT_ROOT
from gpool.config import GROUPS, flatten
from gpool.names import (
    FAILURE_TAG,
    HASH_TAG,
    MODEL_NAME,
    OVERRIDES_TAG,
    PARENT_RUN_ENV,
    SECONDS_TAG,
)
from gpool.resume import process_tags
from gpool.store import first_line, redact, register_job

if TYPE_CHECKING:  # hints only: gpool.compare reads a store without importing torch
    from torch import Tensor, nn

    from gpool.state import EpochResult

log = logging.getLogger(__name__)

MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
                    self._call(self.client.delete_tag, self.run_id, FAILURE_TAG)
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
            self._call(self.client.set_tag, self.run_id, FAILURE_TAG, redact(failure)[:5000])
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
        """The run's data as MLflow dataset inputs (dataset_inputs)."""
        inputs = dataset_inputs(name, splits)
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
                self.client.create_logged_model, self.experiment_id, MODEL_NAME, self.run_id
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


def dataset_inputs(name: str, splits: Mapping[str, tuple[str, int]]) -> list[DatasetInput]:
    """A run's data as MLflow dataset inputs, one per split: {context: (digest, images)},
    so that the UI's Dataset column names it, runs on other data can be told apart, and a
    comparison knows how many images each split's predictions must hold."""
    return [
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


def tags_for(choices: Mapping[str, str | None], seed: int, overrides: list[str]) -> dict[str, Any]:
    """Tags the MLflow UI groups by: each config group's choice, the seed, the overrides;
    and the entry point, which the runs table shows as the Source."""
    tags: dict[str, Any] = {group: choice for group, choice in choices.items() if group in GROUPS}
    tags["seed"] = seed
    tags[OVERRIDES_TAG] = " ".join(overrides)
    tags[MLFLOW_SOURCE_NAME] = "gpool.train"
    tags[MLFLOW_SOURCE_TYPE] = SourceType.to_string(SourceType.LOCAL)
    return tags
