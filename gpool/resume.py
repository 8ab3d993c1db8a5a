"""How a rerun finds, skips or resumes a run: config hashes, liveness, the claim that makes
"already running" atomic, stop signals, and where the checkpoint a run resumes from lies
(what it holds: gpool.checkpoint).

Torch-free, so that gpool.compare, which shares the config hash and the choice of one run per
config, starts without importing torch.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import signal
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from gpool.config import CONFIG_KEYS, GROUPS, flatten
from gpool.errors import GpoolError
from gpool.names import HOST_TAG, LAUNCHER_PID_ENV, PID_TAG, SLURM_JOB_TAG
from gpool.store import previous_run, search_all

log = logging.getLogger(__name__)

#: Config keys (and prefixes) left out of config_hash and of gpool.compare's factors: where
#: and how a run executes (a CUDA graph replays the same step), not what it computes.
NOT_RESULT_KEYS = (
    "mlflow",
    "compare",
    "data_dir",
    "checkpoint_dir",
    "trainer.threads",
    "trainer.resume",
    "trainer.cuda_graph",
)


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the job at a safe point; the last checkpoint stands. A
    KeyboardInterrupt, so that the run is marked KILLED and the sweep stops."""


def affects_result(key: str) -> bool:
    """Whether a dotted config key can change what a run learns; where it is logged or
    cached, its thread count and whether it resumes cannot, nor a top-level key gpool
    never reads (config.CONFIG_KEYS)."""
    if key.split(".", 1)[0] not in (*CONFIG_KEYS, *GROUPS):  # an override may name a group
        return False
    return not any(key == p or key.startswith(f"{p}.") for p in NOT_RESULT_KEYS)


#: Keys added after runs were made, at the value that does what those runs did: left out of
#: the hash at that value, so that earlier runs keep theirs (a rerun still skips them).
NEUTRAL_VALUES = {"dataset.holdout": "0", "model.pool_position": "class_maps"}


def config_hash(config: Mapping[str, Any]) -> str:
    """A fingerprint of what determines a run's result: the resolved config's keys that
    affect it (see affects_result), but for keys at their NEUTRAL_VALUES."""
    kept = {
        k: v for k, v in flatten(config).items() if affects_result(k) and NEUTRAL_VALUES.get(k) != v
    }
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:20]


# --- stop signals -------------------------------------------------------------------------


def handle_stop_signals(handler: Callable[[int, Any], None]) -> dict[signal.Signals, Any]:
    """Route SIGINT and SIGTERM to `handler`; returns the handlers it replaced. Only the
    main thread may set handlers: elsewhere it does nothing and returns {}."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


class StopOnSignal:
    """While active, SIGINT and SIGTERM only record the signal; the job calls `check` at
    safe points (between steps, after loading data, between artifacts), so a run never
    stops half-way through an optimiser step, a checkpoint write or an MLflow call."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _record(self, signum: int, frame: Any) -> None:
        self.signal = signal.Signals(signum)

    def check(self, where: str) -> None:
        """Raise RunInterrupted if a stop signal arrived."""
        if self.signal is not None:
            raise RunInterrupted(
                f"stopped by {self.signal.name} {where}; rerun the same command to resume"
            )

    def __enter__(self) -> StopOnSignal:
        self._previous = handle_stop_signals(self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


#: Set while a job process started by a launcher runs none of its jobs.
BETWEEN_JOBS = threading.Event()


@contextmanager
def stop_with_launcher(grace_seconds: float = 20.0) -> Iterator[None]:
    """Around a job in a process started by a sweep's launching process: when that process
    dies (SIGKILL leaves no chance to stop its workers), SIGTERM this one, so its run ends
    KILLED at the next step, and exit as soon as the job is over (or after
    `grace_seconds`): nobody is left to hand the process another job."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher is None or launcher != str(os.getppid()):
        yield  # not started by the launcher itself (in-process job, a SLURM node...)
        return
    watch_launcher(int(launcher), grace_seconds)
    BETWEEN_JOBS.clear()
    try:
        yield
    finally:
        BETWEEN_JOBS.set()


@functools.cache
def watch_launcher(launcher: int, grace_seconds: float) -> None:
    """One watcher a process, whatever the number of jobs it runs (see stop_with_launcher);
    between jobs the SIGTERM's default action ends the process at once."""

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        BETWEEN_JOBS.wait(grace_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="gpool-launcher-watch", daemon=True).start()


# --- earlier runs of the same config ------------------------------------------------------


def slurm_job() -> str | None:
    """This process's SLURM job (array job_task), which a requeued job keeps."""
    if array := os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    return os.environ.get("SLURM_JOB_ID")


def process_tags() -> dict[str, str]:
    """Where this process runs: what is_alive later checks."""
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    if job := slurm_job():
        tags[SLURM_JOB_TAG] = job
    return tags


def on_this_host(run: Run) -> bool:
    """Whether the run's process was started on this machine (its pid means something here)."""
    return run.data.tags.get(HOST_TAG) == socket.gethostname()


def is_alive(run: Run) -> bool:
    """Whether a RUNNING run's process still lives; a SIGKILL'd one left RUNNING does not.

    A run started by this very SLURM job is a pre-empted earlier incarnation of it (dead);
    on this host the pid tells; a process on another host cannot be checked and counts as
    alive.
    """
    tags = run.data.tags
    if tags.get(SLURM_JOB_TAG) and tags[SLURM_JOB_TAG] == slurm_job():
        return False
    if not on_this_host(run):
        return True
    try:
        os.kill(int(tags.get(PID_TAG, "0")), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return int(tags[PID_TAG]) != os.getpid()


def alive_at(run: Run, deadline: float) -> bool:
    """Whether a RUNNING run's process still lives, waiting until `deadline` (monotonic
    seconds) for one on this host that was just told to stop; one elsewhere counts as alive
    at once (see is_alive)."""
    while is_alive(run):
        if not on_this_host(run) or time.monotonic() > deadline:
            return True
        time.sleep(0.1)
    return False


def mark_dead_runs_killed(client: MlflowClient) -> None:
    """End every RUNNING run of the store whose process is gone (SIGKILL, a lost node's
    requeued job) as KILLED: nothing stays RUNNING past the next gpool command on it."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    for run in search_all(client, experiments, "attributes.status = 'RUNNING'"):
        if not is_alive(run):
            log.info("MLflow run %s's process is gone: marking it KILLED", run.info.run_id)
            client.set_terminated(run.info.run_id, "KILLED")


def private_folder(folder: Path) -> Path:
    """`folder`, made if missing, once it is sure to be this user's alone: a real directory
    (no symlink), owned by this uid, that nobody else can write to. Another local user who
    made it first (in a shared /tmp, say) could otherwise plant links or hold locks in it."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise GpoolError(
            f"{folder} is not a folder of this user's alone (owner uid {info.st_uid}, mode "
            f"{stat.filemode(info.st_mode)}): another user may have made it; remove it, or "
            "make it yours with mode 700"
        )
    return folder


@contextmanager
def claim(*what: str) -> Iterator[None]:
    """Hold the right to decide about `what`, e.g. (store, experiment, config hash): look up
    its runs and start one.

    A file lock per `what` on this machine, so two identical commands started at once
    cannot both find no run and both train (the second waits, then finds the first one's
    run RUNNING), nor both create a fresh sqlite store. The lock file is opened without
    following a link and without truncating, in a folder of this user's alone.
    """
    key = hashlib.sha256("\n".join(what).encode()).hexdigest()
    folder = private_folder(Path(tempfile.gettempdir()) / f"gpool-claims-{os.getuid()}")
    path = folder / f"{key[:32]}.lock"
    try:
        lock = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as err:  # ELOOP: a link planted where the lock file goes
        raise GpoolError(
            f"cannot open the claim {path} ({err.strerror}); remove it (gpool makes it anew)"
        ) from None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another gpool command deciding about the same run")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    finally:
        os.close(lock)


def checkpoint_path(root: Path, tracking_uri: str, experiment: str, fingerprint: str) -> Path:
    """Where the run of this config in this store and experiment keeps its checkpoint: a
    place that follows from the job alone, in the user's own checkpoint folder, so that no
    tag or artifact in the store (which others may write) chooses the file a rerun resumes
    from."""
    key = hashlib.sha256(f"{tracking_uri}\n{experiment}\n{fingerprint}".encode()).hexdigest()
    return private_folder(root) / key[:24] / "checkpoint.pt"


#: Seconds between looks at a run another command trains (wait_for).
WAIT_SECONDS = 2.0


def wait_for(client: MlflowClient, run: Run, stop: Callable[[str], None] | None) -> None:
    """Until `run`, which another process on this machine trains, has ended (or that
    process is gone): what a second sweep over the same configs does, instead of training
    them twice or failing."""
    log.info(
        "waiting for MLflow run %s (pid %s), which trains this config now",
        run.info.run_id,
        run.data.tags.get(PID_TAG),
    )
    while run.info.status == "RUNNING" and is_alive(run):
        if stop is not None:
            stop(f"while waiting for MLflow run {run.info.run_id}")
        time.sleep(WAIT_SECONDS)
        run = client.get_run(run.info.run_id)


def resume_point(
    client: MlflowClient,
    experiment_id: str,
    fingerprint: str,
    checkpoint: Path,
    stop: Callable[[str], None] | None = None,
) -> tuple[Run | None, Path | None]:
    """What an earlier run of the same config left: (its run, its checkpoint path).

    A FINISHED run comes back without a path (skip it); a KILLED, FAILED or dead RUNNING
    one comes back with `checkpoint` (see checkpoint_path) if that file exists (resume it);
    anything else means a fresh run. A living RUNNING one on this machine (another sweep
    training the same config) is waited for, asking `stop` between looks, then judged
    again; one on another machine, whose life cannot be checked, is an error.
    """
    previous = previous_run(client, experiment_id, fingerprint)
    if previous is None or previous.info.status == "FINISHED":
        return previous, None
    tags = previous.data.tags
    if previous.info.status == "RUNNING":
        if is_alive(previous) and on_this_host(previous):
            wait_for(client, previous, stop)
            return resume_point(client, experiment_id, fingerprint, checkpoint, stop)
        if is_alive(previous):
            raise GpoolError(
                f"this config is already running as MLflow run {previous.info.run_id} (pid "
                f"{tags.get(PID_TAG)} on {tags.get(HOST_TAG)}); wait for it, or pass "
                "trainer.resume=false to train it again in a new run"
            )
        client.set_terminated(previous.info.run_id, "KILLED")  # never RUNNING forever
    if not checkpoint.is_file():
        return None, None
    return previous, checkpoint
