"""`python -m gpool.train [-m] overrides...`: one Hydra job = one training run = one MLflow run."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from gpool import PROJECT_ROOT
from gpool.checkpoint import load_checkpoint, member_parts, restore, save_checkpoint
from gpool.config import build as build_object
from gpool.config import check_values, override_key, register
from gpool.data import ImageData
from gpool.diagnostics import class_maps, confusion_matrix, per_class_accuracy, probe_indices
from gpool.engine import Trainer, seed_everything
from gpool.errors import GpoolError
from gpool.model import build_model
from gpool.names import (
    CHECKPOINT_TAG,
    CLASS_MAPS_FILE,
    CLASS_MAPS_KEY,
    CONFIG_FILE,
    CONFUSION_FILE,
    CONFUSION_REPORT,
    CURVES_FILE,
    DEVICE_TAG,
    EAGER_TAG,
    FUSED_GROUP_TAG,
    FUSED_SIZE_TAG,
    HASH_TAG,
    HYDRA_DIR,
    PREDICTIONS_DIR,
    SECONDS_TAG,
    SWEPT_KEYS_ENV,
    THREADS_TAG,
    WEIGHTS_FILE,
)
from gpool.plots import plot_class_maps, plot_confusion, plot_curves
from gpool.predictions import save as save_predictions
from gpool.resume import (
    StopOnSignal,
    checkpoint_path,
    claim,
    config_hash,
    resume_point,
    stop_with_launcher,
)
from gpool.stacking import StackedModel
from gpool.state import EpochResult, Member, TrainState
from gpool.store import experiment_id, open_store, redact, register_job, store_failed
from gpool.tracking import Tracker, tags_for

log = logging.getLogger("gpool.train")


@dataclass
class Job:
    """One Hydra job, i.e. one run: its config, its Hydra config (output folder, choices,
    overrides) and what follows from them."""

    cfg: DictConfig
    hydra: DictConfig

    @classmethod
    def current(cls, cfg: DictConfig) -> Job:
        return cls(cfg, HydraConfig.get())

    @cached_property
    def config(self) -> dict[str, Any]:
        return OmegaConf.to_container(self.cfg, resolve=True)

    @cached_property
    def fingerprint(self) -> str:
        return config_hash(self.config)

    @property
    def output_dir(self) -> Path:
        return Path(self.hydra.runtime.output_dir)

    def checkpoint(self, tracking_uri: str, experiment: str) -> Path:
        """Where this job's run keeps the checkpoint it resumes from (see checkpoint_path)."""
        root = Path(self.cfg.checkpoint_dir)
        return checkpoint_path(root, tracking_uri, experiment, self.fingerprint)

    @property
    def run_name(self) -> str:
        """mlflow.run_name, else the head, every other key the sweep varies, and the seed:
        `pool=gem pool.p=3 optimizer.lr=0.003 seed=0`."""
        if self.cfg.mlflow.run_name:
            return self.cfg.mlflow.run_name
        mine = {override_key(o): o for o in self.hydra.overrides.task}
        swept = os.environ.get(SWEPT_KEYS_ENV, "").split()
        varied = [mine[k] for k in swept if k not in ("pool", "seed") and k in mine]
        return " ".join(
            [f"pool={self.hydra.runtime.choices.pool}", *varied, f"seed={self.cfg.seed}"]
        )

    def tracker(
        self,
        client: MlflowClient,
        experiment: str,
        resume: Run | None,
        group: Mapping[str, str],
    ) -> Tracker:
        """This job's run, new or resumed; `group` tags say how it trains (device, threads,
        the fused group)."""
        overrides = list(self.hydra.overrides.task)
        tags = tags_for(dict(self.hydra.runtime.choices), self.cfg.seed, overrides)
        checkpoint = self.checkpoint(client.tracking_uri, experiment)
        tags.update({HASH_TAG: self.fingerprint, CHECKPOINT_TAG: str(checkpoint), **group})
        resume_id = resume.info.run_id if resume is not None else None
        earlier = float(resume.data.tags.get(SECONDS_TAG, 0)) if resume is not None else 0.0
        system_metrics = self.cfg.mlflow.system_metrics
        return Tracker(
            client, experiment, self.run_name, self.config, tags, resume_id, system_metrics, earlier
        )

    def skip(self, client: MlflowClient, finished: Run) -> float:
        """This config already FINISHED: count that run in this sweep, train nothing."""
        log.info(
            "skipping %s: this config already FINISHED as MLflow run %s "
            "(trainer.resume=false trains it again)",
            self.run_name,
            finished.info.run_id,
        )
        register_job(client, self.fingerprint, finished.info.run_id)
        return finished.data.metrics.get("val_acc", float("nan"))


@dataclass
class Resumed:
    """A job to train, and the earlier run and checkpoint it continues, if any."""

    job: Job
    run: Run | None = None
    checkpoint: dict[str, Any] | None = None

    @property
    def epoch(self) -> int:
        return self.checkpoint["epoch"] if self.checkpoint is not None else 0


def log_diagnostics(
    run: Tracker, trainer: Trainer, model: nn.Module, member: Member, data: ImageData, job: Job
) -> None:
    """What every run keeps besides metrics: weights (a state_dict, and an MLflow model
    unless mlflow.log_model is off), curves, the class maps that enter the pool for one
    fixed validation image per class, and over the images its accuracies scored
    (trainer.limit_val_batches), the validation confusion matrix and the predicted and
    true class of each validation (and test) image: what an interval over the images as
    well as the seeds needs (gpool.predictions)."""
    job_dir = job.output_dir
    torch.save(model.state_dict(), job_dir / WEIGHTS_FILE)
    splits = {"val": data.val} if data.test is None else {"val": data.val, "test": data.test}
    # The images each accuracy scored (trainer.limit_val_batches), and only those: a
    # ResNet-18 spent 55 s predicting the 10,000 test images of a run that scored 5,000.
    scored = {
        name: trainer.scored(split, trainer.limit_val_batches) for name, split in splits.items()
    }
    labels = {name: split.labels[: scored[name]].cpu() for name, split in splits.items()}
    predicted = {
        name: trainer.predict(model, data, split, scored[name]) for name, split in splits.items()
    }
    matrix = confusion_matrix(predicted["val"], labels["val"], len(data.classes))
    files = [save_predictions(job_dir, name, predicted[name], labels[name]) for name in splits]
    report = {
        "classes": data.classes,
        "matrix": matrix.tolist(),
        "per_class_accuracy": dict(zip(data.classes, per_class_accuracy(matrix), strict=True)),
    }
    run.log_text(json.dumps(report, indent=1), CONFUSION_REPORT)
    example, _ = data.batch(data.val, torch.arange(min(4, len(data.val)), device=trainer.device))
    if job.cfg.mlflow.log_model:
        run.log_model(model, example.contiguous(), len(member.history))
    run.log_artifacts(files, PREDICTIONS_DIR)
    run.log_artifacts(
        [
            job_dir / WEIGHTS_FILE,
            plot_curves(member.history, job_dir / CURVES_FILE, run.run_name),
            plot_maps(model, data, job),
            plot_confusion(matrix, data.classes, job_dir / CONFUSION_FILE),
        ]
    )


def plot_maps(model: nn.Module, data: ImageData, job: Job) -> Path:
    """class_maps.png in the job's folder: the maps that enter the pool for one fixed
    validation image per class, with true and predicted classes."""
    images, maps, labels, predicted = class_maps(model, data, probe_indices(data.val.labels))
    path = job.output_dir / CLASS_MAPS_FILE
    return plot_class_maps(images, maps, labels.tolist(), predicted.tolist(), data.classes, path)


def member_network(state: TrainState, n: int, cfg: DictConfig, trainer: Trainer) -> nn.Module:
    """Member n's network as its own run would hold it (a copy, when stacked)."""
    if not isinstance(state.model, StackedModel):
        return state.model
    with torch.random.fork_rng(devices=[]):  # drawing initial weights leaves the RNG as it was
        model = trainer.prepare(build_model(cfg))
    model.load_state_dict(member_parts(state, n)["model"])
    return model


def network(cfg: DictConfig, trainer: Trainer) -> nn.Module:
    """The network of one run, seeded and initialised as its own run would be."""
    seed_everything(cfg.seed)
    return trainer.prepare(build_model(cfg))


class FusingFailed(GpoolError):
    """Several runs' networks could not be stacked into one model: they train one by one."""


def stacked(networks: list[nn.Module], probe: Tensor, device: torch.device) -> StackedModel:
    """The networks as one StackedModel on `device`, tried on the images `probe` (each
    member on them) in eval mode: a stack that cannot be built or run is FusingFailed,
    found before any run is made."""
    try:
        model = StackedModel(networks).to(device)
        model.eval()
        with torch.no_grad():
            model(probe.repeat(len(networks), *[1] * (probe.ndim - 1)))
        model.train()
    except (RuntimeError, ValueError, TypeError) as err:
        why = str(err).strip().splitlines()[0][:300]
        raise FusingFailed(f"{type(err).__name__}: {why}") from err
    return model


def start(
    trainer: Trainer, data: ImageData, configs: list[DictConfig], names: list[str] | None = None
) -> TrainState:
    """The training state of runs with these configs before epoch 1: one network, or a
    StackedModel of several, each initialised exactly as its own run would be; one
    optimiser over all. `names` label the members in the log."""
    networks = [network(cfg, trainer) for cfg in configs]
    probe, _ = data.batch(data.train, torch.arange(min(2, len(data.train)), device=trainer.device))
    networks[0].check_features(probe)  # every member shares its trunk (StackedModel)
    model = networks[0] if len(networks) == 1 else stacked(networks, probe, trainer.device)
    cfg = configs[0]
    try:
        optimizer = instantiate(cfg.optimizer)(model.parameters())
    except (TypeError, ValueError) as err:  # torch's checks of lr, betas, momentum...
        raise GpoolError(f"optimizer: {err}") from None
    seeds = [(name, c.seed) for name, c in zip(names or [""] * len(configs), configs, strict=True)]
    scheduler = instantiate(cfg.scheduler.lr_scheduler)
    return trainer.start(model, optimizer, data, seeds, scheduler, cfg.scheduler.interval)


def plan(
    jobs: list[Job], client: MlflowClient, experiment: str, trainer: Trainer
) -> tuple[dict[int, float], list[tuple[int, Resumed]]]:
    """For each job: skip it (its FINISHED run's val_acc), or train it, fresh or from its
    checkpoint. Call with every job's claim held."""
    skipped: dict[int, float] = {}
    todo: list[tuple[int, Resumed]] = []
    for i, job in enumerate(jobs):
        checkpoint = job.checkpoint(client.tracking_uri, experiment)
        run, path = (
            resume_point(client, experiment, job.fingerprint, checkpoint)
            if trainer.resume
            else (None, None)
        )
        if run is not None and path is None:
            skipped[i] = job.skip(client, run)
        elif run is not None:
            todo.append(
                (i, Resumed(job, run, load_checkpoint(path, run.info.run_id, job.fingerprint)))
            )
        else:
            todo.append((i, Resumed(job)))
    return skipped, todo


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
        skipped, todo = plan(jobs, client, experiment, trainer)
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
        every = jobs[n].cfg.mlflow.class_maps_every_n_epochs
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


def link_checkpoint(output_dir: Path, checkpoint: Path) -> None:
    """A link to the run's checkpoint in the job's output folder, where users look for it;
    gpool itself never reads through it."""
    link = output_dir / "checkpoint.pt"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(checkpoint)


def open_experiment(cfg: DictConfig) -> tuple[MlflowClient, str]:
    client = open_store(cfg.mlflow.tracking_uri, create=True)
    return client, experiment_id(client, cfg.mlflow.experiment_name)


register()  # before hydra.main composes: gpool's resolvers, the trainer schema


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="config")
def main(cfg: DictConfig) -> float:
    """Train one model and log it; returns the final validation accuracy (for sweepers)."""
    check_values(cfg)
    trainer: Trainer = build_object(cfg.trainer)
    job = Job.current(cfg)
    log.info(
        "%s on %s: %s", job.run_name, trainer.device, redact(" ".join(job.hydra.overrides.task))
    )
    try:
        with stop_with_launcher():
            (result,) = train_group([job], trainer)
    except MlflowException as err:
        raise store_failed(err) from None
    if isinstance(result, GpoolError):
        raise result
    return result


if __name__ == "__main__":
    # Run the function of the importable module gpool.train, not of this __main__ copy:
    # launchers that ship jobs to other processes (joblib, submitit) pickle the task
    # function by reference, which only works for a function they can import.
    from gpool.train import main as task

    try:
        task()
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: the run is already marked KILLED
        sys.exit(f"gpool.train: {stop or 'interrupted'}")
