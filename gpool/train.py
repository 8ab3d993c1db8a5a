"""`python -m gpool.train [-m] overrides...`: one Hydra job = one training run = one MLflow run."""

from __future__ import annotations

import json
import logging
import sys
from contextlib import ExitStack
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from gpool import PROJECT_ROOT, GpoolError
from gpool.config import build as build_object
from gpool.config import check_values
from gpool.data import ImageData
from gpool.diagnostics import class_maps, confusion_matrix, per_class_accuracy, probe_indices
from gpool.engine import Trainer, TrainState, seed_everything
from gpool.model import build_model
from gpool.plots import plot_class_maps, plot_confusion, plot_curves
from gpool.resume import (
    CHECKPOINT_TAG,
    HASH_TAG,
    StopOnSignal,
    claim,
    config_hash,
    load_checkpoint,
    restore,
    resume_point,
    save_checkpoint,
    stop_with_launcher,
)
from gpool.tracking import Tracker, experiment_id, open_store, redact, register_job, tags_for

log = logging.getLogger("gpool.train")


def log_diagnostics(run: Tracker, trainer: Trainer, state: TrainState, data: ImageData) -> None:
    """What every run keeps besides metrics: weights, curves, the class maps that enter the
    pool for one fixed validation image per class, and the validation confusion matrix."""
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    model = state.model
    torch.save(model.state_dict(), job_dir / "model.pt")
    images, maps, labels, predicted = class_maps(model, data, probe_indices(data.val.labels))
    matrix = confusion_matrix(
        trainer.predict(model, data, data.val), data.val.labels, len(data.classes)
    )
    report = {
        "classes": data.classes,
        "matrix": matrix.tolist(),
        "per_class_accuracy": dict(zip(data.classes, per_class_accuracy(matrix), strict=True)),
    }
    run.log_text(json.dumps(report, indent=1), "confusion_matrix.json")
    run.log_artifacts(
        [
            job_dir / "model.pt",
            plot_curves(state.history, job_dir / "curves.png", run.run_name),
            plot_class_maps(
                images,
                maps,
                labels.tolist(),
                predicted.tolist(),
                data.classes,
                job_dir / "class_maps.png",
            ),
            plot_confusion(matrix, data.classes, job_dir / "confusion_matrix.png"),
        ]
    )


def build(cfg: DictConfig, trainer: Trainer) -> tuple[ImageData, TrainState]:
    """The data and the training state before epoch 1 that `cfg` describes, seeded, on the
    trainer's device."""
    seed_everything(cfg.seed)
    log.info("loading the data from %s", cfg.dataset.get("root"))
    data = build_object(cfg.dataset).load(trainer.device, trainer.channels_last)
    model = trainer.prepare(build_model(cfg))
    optimizer = instantiate(cfg.optimizer)
    try:
        optimizer = optimizer(model.parameters())
    except (TypeError, ValueError) as err:  # torch's checks of lr, betas, momentum...
        raise GpoolError(f"optimizer: {err}") from None
    scheduler = instantiate(cfg.scheduler.lr_scheduler)
    return data, trainer.start(model, optimizer, data, cfg.seed, scheduler, cfg.scheduler.interval)


def train(
    run: Tracker,
    cfg: DictConfig,
    trainer: Trainer,
    data: ImageData,
    state: TrainState,
    stop: StopOnSignal,
) -> None:
    """Train the run to its last epoch, logging and checkpointing after each, then log what
    it learned. The checkpoint goes to this job's own folder."""
    checkpoint = Path(HydraConfig.get().runtime.output_dir) / "checkpoint.pt"
    meta = {"mlflow_run_id": run.run_id, "config_hash": run.tags[HASH_TAG]}
    if state.history:  # resumed: this job's folder holds the state it continues from
        save_checkpoint(checkpoint, state, meta)
    run.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    for path in sorted((checkpoint.parent / ".hydra").glob("*.yaml")):
        run.log_text(path.read_text(), f"hydra/{path.name}")

    def after_epoch(result) -> None:
        run.log_epoch(result)
        save_checkpoint(checkpoint, state, meta)

    trainer.fit(state, data, on_epoch=after_epoch, stop=stop)
    stop.check("before the final artifacts were logged")
    log.info("logging the final artifacts of %s", run.run_name)
    log_diagnostics(run, trainer, state, data)
    stop.check("while the final artifacts were logged")


def skip(client: MlflowClient, finished: Run, fingerprint: str, run_name: str) -> float:
    """A job whose config already FINISHED: count that run in this sweep, train nothing."""
    log.info(
        "skipping %s: this config already FINISHED as MLflow run %s "
        "(trainer.resume=false trains it again)",
        run_name,
        finished.info.run_id,
    )
    register_job(client, fingerprint, finished.info.run_id)
    return finished.data.metrics.get("val_acc", float("nan"))


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="config")
def main(cfg: DictConfig) -> float:
    """Train one model and log it; returns the final validation accuracy (for sweepers)."""
    check_values(cfg)
    hydra_cfg = HydraConfig.get()
    choices = dict(hydra_cfg.runtime.choices)
    run_name = cfg.mlflow.run_name or f"pool={choices['pool']} seed={cfg.seed}"
    config = OmegaConf.to_container(cfg, resolve=True)
    fingerprint = config_hash(config)
    trainer: Trainer = build_object(cfg.trainer)
    client = open_store(cfg.mlflow.tracking_uri, create=True)
    experiment = experiment_id(client, cfg.mlflow.experiment_name)
    stop_with_launcher()
    with StopOnSignal() as stop, ExitStack() as stack:
        with claim(client.tracking_uri, experiment, fingerprint):  # one decider per config
            previous, checkpoint = (
                resume_point(client, experiment, fingerprint) if trainer.resume else (None, None)
            )
            if previous is not None and checkpoint is None:
                return skip(client, previous, fingerprint, run_name)
            # Data and model come first: a missing dataset must not leave a half-made run.
            data, state = build(cfg, trainer)
            if checkpoint is not None:
                restore(load_checkpoint(checkpoint, previous.info.run_id, fingerprint), state)
                log.info("resuming after epoch %d", len(state.history))
            stop.check("while the data was loaded")
            overrides = list(hydra_cfg.overrides.task)
            log.info("%s on %s: %s", run_name, trainer.device, redact(" ".join(overrides)))
            tags = tags_for(choices, cfg.seed, overrides)
            job_dir = Path(hydra_cfg.runtime.output_dir)
            tags.update({HASH_TAG: fingerprint, CHECKPOINT_TAG: str(job_dir / "checkpoint.pt")})
            resume_id = previous.info.run_id if checkpoint is not None else None
            tracker = Tracker(client, experiment, run_name, config, tags, resume_id)
            run = stack.enter_context(tracker)
        train(run, cfg, trainer, data, state, stop)
    return state.history[-1].val_acc


if __name__ == "__main__":
    # Run the function of the importable module gpool.train, not of this __main__ copy:
    # launchers that ship jobs to other processes (joblib, submitit) pickle the task
    # function by reference, which only works for a function they can import.
    from gpool.train import main as task

    try:
        task()
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: the run is already marked KILLED
        sys.exit(f"gpool.train: {stop or 'interrupted'}")
