"""The sweep's parent MLflow run (a Hydra callback): prepared before any job, continued when
the same sweep runs again, and closed with the comparison of its jobs as its description,
metrics and artifacts, so that the MLflow UI states the verdict itself."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.utils import get_class
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from gpool.config import CONFIG_KEYS, check_values, override_key, unread_keys
from gpool.errors import GpoolError
from gpool.levels import MARGIN
from gpool.names import (
    COMPARISON_DIR,
    EXPECTED_JOBS_TAG,
    LAUNCHER_PID_ENV,
    OVERRIDES_TAG,
    PARENT_RUN_ENV,
    ROLE_TAG,
    SWEEP_DIR_TAG,
    SWEEP_KEY_TAG,
    SWEEP_ROLE,
    SWEPT_KEYS_ENV,
)
from gpool.resume import (
    affects_result,
    alive_at,
    claim,
    config_hash,
    handle_stop_signals,
    is_alive,
    mark_dead_runs_killed,
    process_tags,
)
from gpool.store import (
    experiment_id,
    first_line,
    open_store,
    redact,
    store_uri,
    sweep_jobs,
    sweeps,
)
from gpool.sweepers import searched_keys, swept_keys
from gpool.tracking import git_commit

if TYPE_CHECKING:  # imported where a sweep starts: it needs scipy
    from gpool.sequential import Plan

log = logging.getLogger(__name__)


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


def sweep_key(config: DictConfig) -> str:
    """What makes two multiruns the same sweep: the experiment, the config files they start
    from and the overrides that can change a result (the last of each key, in any order);
    not where or how their jobs run (hydra.*, threads, the store)."""
    effective = {override_key(o): o for o in config.hydra.overrides.task}
    kept = sorted(
        same_in_any_order(o)
        for k, o in effective.items()
        if not k.startswith("hydra") and affects_result(k)
    )
    base = OmegaConf.to_container(job_keys(config))
    return " ".join([config.mlflow.experiment_name, config_hash(base), *kept])


def job_keys(config: DictConfig) -> DictConfig:
    """The config without Hydra's own node: the keys a job reads (in a callback, that node's
    runtime values are still unset)."""
    return OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])


def same_in_any_order(override: str) -> str:
    """A choice sweep with its values sorted (`seed=1,0` -> `seed=0,1`): the same jobs,
    so the same sweep; any other override as it is."""
    try:
        (parsed,) = OverridesParser.create().parse_overrides([override])
    except Exception:  # Hydra rejects it itself before any job runs
        return override
    if not parsed.is_choice_sweep():
        return override
    values = ",".join(sorted(parsed.sweep_string_iterator()))
    return f"{override.split('=', 1)[0]}={values}"


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


def check_sweep(config: DictConfig) -> None:
    """Refuse, before the sweep's run or any job's exists, what would stop the sweep on
    its way: the values every job shares (config.check_values, the comparison's margin
    among them) and the settings of its sweeper and launcher, through their `check`
    (gpool's own plugins have one)."""
    check_values(job_keys(config))
    for plugin in (config.hydra.sweeper, config.hydra.launcher):
        check = getattr(get_class(plugin._target_), "check", None)
        if check is not None:
            check(config)


def warn_unread(config: DictConfig) -> None:
    """One warning for each top-level key that changes nothing (config.unread_keys)."""
    for key in unread_keys(job_keys(config)):
        log.warning(
            "gpool reads no top-level key %s and nothing interpolates it: it changes no "
            "result and is no part of the config hash (gpool reads: %s)",
            key,
            ", ".join(CONFIG_KEYS),
        )


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
        # Where the comparison's files go: this process's own config, never a tag.
        self.sweep_dir: Path | None = None
        self.margin = MARGIN  # the comparison's equivalence margin, from the config
        self.tune: list[str] | None = None  # keys a search tuned: the verdict picks their best
        self.plan: Plan | None = None  # a decide sweep's rule, which its verdict follows
        self.figures = True  # mlflow.log_figures: the comparison's figures too
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
        mark_dead_runs_killed(client)
        return client, experiment

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_values(job_keys(config))
        except GpoolError:  # the job refuses it in Hydra's words, and no store is created
            return
        warn_unread(config)
        self.prepare(config, config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            from gpool.sequential import plan_of  # scipy: only where a sweep starts

            check_sweep(config)
            self.plan = plan_of(config)
        except GpoolError as err:  # a callback's exception would only be a warning
            raise SystemExit(f"gpool: {err}") from None
        warn_unread(config)
        client, experiment = self.prepare(config, config.hydra.sweep.dir, "hydra.sweep.dir")
        overrides = redact(" ".join(config.hydra.overrides.task))
        key = sweep_key(config)
        tags = {
            ROLE_TAG: SWEEP_ROLE,
            SWEEP_KEY_TAG: redact(key),
            SWEEP_DIR_TAG: str(config.hydra.sweep.dir),
            OVERRIDES_TAG: overrides,
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
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.margin = float(config.compare.margin)
        self.figures = bool(config.mlflow.log_figures)
        os.environ[PARENT_RUN_ENV] = run_id
        os.environ[SWEPT_KEYS_ENV] = " ".join(swept_keys(config))
        self.tune = searched_keys(config) or None
        os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
        atexit.register(self.close_parent)  # Hydra skips on_multirun_end when a job fails
        handle_stop_signals(self._interrupt)

    def _interrupt(self, signum: int, frame: Any) -> None:
        self.interrupted = True
        raise KeyboardInterrupt(f"sweep stopped by {signal.Signals(signum).name}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.close_parent(completed=True)

    def state_the_verdict(self, client: MlflowClient, run_id: str) -> None:
        """Compare the sweep's finished jobs onto its parent run (as `gpool.compare` would,
        with this sweep's margin, plan, tuned keys and mlflow.log_figures; the files go to
        its comparison folder) and print it; a sweep without any finished job has nothing
        to state."""
        from gpool.compare.publish import publish_comparison  # matplotlib: where a sweep ends

        assert self.sweep_dir is not None
        out = self.sweep_dir / COMPARISON_DIR
        try:
            comparison, pointer = publish_comparison(
                client, run_id, out, self.margin, self.tune, self.plan, self.figures
            )
        except (GpoolError, MlflowException) as err:
            log.info("no comparison on the sweep's run: %s", err)
            return
        log.info("%s\n\n%s\n%s", comparison.header, comparison.table, pointer)

    def close_parent(self, completed: bool = False) -> None:
        """End the parent run: FINISHED when Hydra completed the sweep and every job's run
        FINISHED; KILLED when a signal stopped the sweep or one of its jobs; FAILED
        otherwise. A store that broke under the sweep gets one line, not a traceback."""
        if self.parent is None:
            return
        tracking_uri, run_id = self.parent
        self.parent = None
        os.environ.pop(PARENT_RUN_ENV, None)
        os.environ.pop(SWEPT_KEYS_ENV, None)
        try:
            self.end_parent(MlflowClient(tracking_uri), run_id, completed)
        except MlflowException as err:
            log.error("the sweep's MLflow run %s could not be closed (%s)", run_id, first_line(err))

    def end_parent(self, client: MlflowClient, run_id: str, completed: bool) -> None:
        """close_parent's work: the jobs' runs given up, the verdict, the status."""
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
        try:
            if completed or status != "KILLED":  # a stopped sweep is not over: no verdict
                self.state_the_verdict(client, run_id)
        finally:  # whatever the comparison met, the sweep's run does not stay RUNNING
            client.set_terminated(run_id, status)


def earlier_sweep(client: MlflowClient, experiment: str, key: str) -> Run | None:
    """The newest parent run of the same sweep, unless it is still running somewhere."""
    for sweep in sweeps(client, experiment):
        if sweep.data.tags.get(SWEEP_KEY_TAG) == key:
            return None if sweep.info.status == "RUNNING" and is_alive(sweep) else sweep
    return None
