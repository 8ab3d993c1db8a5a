"""Training jobs that differ only in their seeds and heads together, each logged as its own
run (a single run is a group of one): skip, resume or start each, train, checkpoint and
log every epoch, then what each run keeps."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Mapping
from contextlib import ExitStack

import torch
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from gpool.artifacts import link_checkpoint, log_diagnostics, plot_maps
from gpool.build import FusingFailed, member_network, start
from gpool.checkpoint import restore, save_checkpoint
from gpool.config import build as build_object
from gpool.engine import Trainer
from gpool.errors import GpoolError
from gpool.images import ImageData
from gpool.job import Job, Resumed, plan
from gpool.names import (
    CLASS_MAPS_KEY,
    CONFIG_FILE,
    DEVICE_TAG,
    EAGER_TAG,
    FUSED_GROUP_TAG,
    FUSED_SIZE_TAG,
    HASH_TAG,
    HYDRA_DIR,
    THREADS_TAG,
)
from gpool.resume import (
    StopOnSignal,
    claim,
)
from gpool.state import EpochResult, TrainState
from gpool.store import experiment_id, open_store
from gpool.tracking import Tracker

log = logging.getLogger(__name__)


def train_group(jobs: list[Job], trainer: Trainer) -> list[float | GpoolError]:
    """Train jobs that differ only in their seeds and heads together, each logged as its
    own run (a single run is a group of one): skip those that FINISHED, resume the others
    from their checkpoints; members resuming from the same epoch train as one model.
    Returns each job's final val_acc, or the error that failed it."""
    cfg = jobs[0].cfg
    client, experiment = open_experiment(cfg)
    results: dict[int, float | GpoolError] = {}
    with StopOnSignal() as stop, ExitStack() as held:
        claims = {fingerprint: ExitStack() for fingerprint in sorted({j.fingerprint for j in jobs})}
        for fingerprint, stack in claims.items():
            held.enter_context(stack).enter_context(
                claim(client.tracking_uri, experiment, fingerprint)
            )
        skipped, todo = plan(jobs, client, experiment, trainer, stop.check)
        results.update(skipped)
        if not todo:
            return [results[i] for i in range(len(jobs))]
        # Data first: a missing dataset must not leave a half-made run.
        log.info("loading the data from %s", cfg.dataset.get("root"))
        data = build_object(cfg.dataset).load(trainer.device, trainer.channels_last)
        stop.check("while the data was loaded")
        todo.sort(key=lambda item: (item[1].epoch, json.dumps(item[1].job.config["pool"])))
        for _, part in itertools.groupby(todo, key=lambda item: item[1].epoch):
            indices, members = zip(*part, strict=True)
            outcome = train_members(list(members), trainer, data, client, experiment, stop, claims)
            results.update(zip(indices, outcome, strict=True))
    return [results[i] for i in range(len(jobs))]


def train_members(
    members: list[Resumed],
    trainer: Trainer,
    data: ImageData,
    client: MlflowClient,
    experiment: str,
    stop: StopOnSignal,
    claims: Mapping[str, ExitStack],
) -> list[float | GpoolError]:
    """Train members that resume from the same epoch as one model; release their claims
    once their runs exist (those of members that train later stay held until theirs do).
    Each run ends FINISHED, FAILED (its own NaN) or KILLED (a stop)."""
    jobs = [m.job for m in members]
    # How the runs were trained: bit for bit reproducible only on the same device, thread
    # count and fused group; across them only statistically the same (README, Guarantees).
    names = None
    group = {DEVICE_TAG: str(trainer.device), THREADS_TAG: str(torch.get_num_threads())}
    if len(jobs) > 1:
        names = [job.run_name for job in jobs]
        key = hashlib.sha256(" ".join(sorted(j.fingerprint for j in jobs)).encode()).hexdigest()
        group.update({FUSED_GROUP_TAG: key[:16], FUSED_SIZE_TAG: str(len(jobs))})
    try:
        state = start(trainer, data, [job.cfg for job in jobs], names)
    except FusingFailed as err:  # before any run exists: each trains on its own
        log.warning("%d jobs could not train as one model (%s): one by one", len(jobs), err)
        return [
            outcome
            for member in members
            for outcome in train_members([member], trainer, data, client, experiment, stop, claims)
        ]
    if members[0].checkpoint is not None:
        restore([m.checkpoint for m in members], state)
        log.info("resuming after epoch %d", members[0].epoch)
    with ExitStack() as open_runs:
        trackers = [m.job.tracker(client, experiment, m.run, group) for m in members]
        runs = [open_runs.enter_context(tracker) for tracker in trackers]
        for job in jobs:  # their runs are RUNNING now: a second command sees them
            claims[job.fingerprint].close()
        failed: dict[int, GpoolError] = {}

        def fail(n: int, error: GpoolError) -> None:
            failed[n] = error
            runs[n].__exit__(type(error), error, None)

        train_runs(runs, jobs, trainer, data, state, stop, fail)
    return [failed.get(n) or m.history[-1].val_acc for n, m in enumerate(state.members)]


def train_runs(
    runs: list[Tracker],
    jobs: list[Job],
    trainer: Trainer,
    data: ImageData,
    state: TrainState,
    stop: StopOnSignal,
    fail: Callable[[int, GpoolError], None],
) -> None:
    """Train the runs to their last epoch, checkpointing then logging each after every
    epoch, then log what each learned. A resumed run first logs the epochs its checkpoint
    holds but MLflow does not (stopped between the two): each epoch is logged once."""
    metas = [{"mlflow_run_id": r.run_id, "config_hash": r.tags[HASH_TAG]} for r in runs]
    paths = [
        job.checkpoint(run.client.tracking_uri, run.experiment_id)
        for run, job in zip(runs, jobs, strict=True)
    ]
    splits = data.splits()
    for n, (run, job) in enumerate(zip(runs, jobs, strict=True)):
        link_checkpoint(job.output_dir, paths[n])
        if state.members[n].history:
            run.log_missing_epochs(state.members[n].history)
        run.log_datasets(job.hydra.runtime.choices.dataset, splits)
        run.log_text(OmegaConf.to_yaml(job.cfg, resolve=True), CONFIG_FILE)
        for path in sorted((job.output_dir / ".hydra").glob("*.yaml")):
            run.log_text(path.read_text(), f"{HYDRA_DIR}/{path.name}")

    def after_epoch(n: int, result: EpochResult) -> None:
        save_checkpoint(paths[n], state, n, metas[n])
        runs[n].log_epoch(result)
        tracked = jobs[n].cfg.mlflow
        every = tracked.class_maps_every_n_epochs if tracked.log_figures else 0
        if every and result.epoch % every == 0:  # the UI's image slider shows them forming
            model = member_network(state, n, jobs[n].cfg, trainer)
            runs[n].log_image(plot_maps(model, data, jobs[n]), CLASS_MAPS_KEY, result.epoch)

    def eager(why: str) -> None:  # the steps could not be captured (see Trainer.steps)
        for run in runs:
            run.set_tag(EAGER_TAG, why)

    trainer.fit(state, data, on_epoch=after_epoch, on_failure=fail, stop=stop, on_eager=eager)
    for n, member in enumerate(state.members):
        if member.failure is not None:
            continue
        stop.check("before the final artifacts were logged")
        log.info("logging the final artifacts of %s", runs[n].run_name)
        model = member_network(state, n, jobs[n].cfg, trainer)
        log_diagnostics(runs[n], trainer, model, member, data, jobs[n])
        stop.check("while the final artifacts were logged")


def open_experiment(cfg: DictConfig) -> tuple[MlflowClient, str]:
    client = open_store(cfg.mlflow.tracking_uri, create=True)
    return client, experiment_id(client, cfg.mlflow.experiment_name)
