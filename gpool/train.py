"""`python -m gpool.train [-m] overrides...`: one Hydra job = one training run = one MLflow run."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from mlflow.entities import Run
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim import Optimizer

from gpool import PROJECT_ROOT, GpoolError
from gpool.data import ImageData
from gpool.diagnostics import class_maps, confusion_matrix, per_class_accuracy, probe_indices
from gpool.engine import EpochResult, Trainer, load_checkpoint, seed_everything
from gpool.plots import plot_class_maps, plot_confusion, plot_curves
from gpool.tracking import (
    CHECKPOINT_TAG,
    HASH_TAG,
    Tracker,
    config_hash,
    is_alive,
    mark_killed,
    previous_run,
    tags_for,
)

log = logging.getLogger("gpool.train")


def log_diagnostics(
    run: Tracker,
    trainer: Trainer,
    model: nn.Module,
    data: ImageData,
    history: list[EpochResult],
    job_dir: Path,
    title: str,
) -> None:
    """What every run keeps besides metrics: weights, curves, the class maps that enter the
    pool for one fixed validation image per class, and the validation confusion matrix."""
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
            plot_curves(history, job_dir / "curves.png", title),
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


def build(cfg: DictConfig, trainer: Trainer) -> tuple[ImageData, nn.Module, Optimizer]:
    """The data, model and optimiser that `cfg` describes, seeded, on the trainer's device."""
    seed_everything(cfg.seed)
    data = instantiate(cfg.dataset).load(trainer.device, trainer.channels_last)
    model = trainer.prepare(instantiate(cfg.model, pool=instantiate(cfg.pool)))
    return data, model, instantiate(cfg.optimizer)(model.parameters())


def schedule(cfg: DictConfig) -> dict[str, Any]:
    """Trainer.fit's scheduler arguments from conf/scheduler."""
    return {
        "scheduler": instantiate(cfg.scheduler.lr_scheduler),
        "scheduler_interval": cfg.scheduler.interval,
    }


def resume_point(cfg: DictConfig, fingerprint: str) -> tuple[Run | None, dict[str, Any] | None]:
    """What an earlier run of the same config left: (its run, its checkpoint state).

    A FINISHED run comes back without state (skip it); a KILLED, FAILED or dead RUNNING one
    with a checkpoint comes back with it (resume it); anything else means a fresh run.
    """
    previous = previous_run(cfg.mlflow.tracking_uri, cfg.mlflow.experiment_name, fingerprint)
    if previous is None or previous.info.status == "FINISHED":
        return previous, None
    tags = previous.data.tags
    if previous.info.status == "RUNNING":
        if is_alive(previous):
            raise GpoolError(
                f"this config is already running as MLflow run {previous.info.run_id} (pid "
                f"{tags.get('gpool.pid')} on {tags.get('gpool.host')}); wait for it, or pass "
                "trainer.resume=false to train it again in a new run"
            )
        mark_killed(cfg.mlflow.tracking_uri, previous.info.run_id)  # never RUNNING forever
    checkpoint = Path(tags.get(CHECKPOINT_TAG, ""))
    if not checkpoint.is_file():
        return None, None
    return previous, load_checkpoint(checkpoint)


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="config")
def main(cfg: DictConfig) -> float:
    """Train one model and log it; returns the final validation accuracy (for sweepers)."""
    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    choices = dict(hydra_cfg.runtime.choices)
    run_name = cfg.mlflow.run_name or f"pool={choices['pool']} seed={cfg.seed}"
    config = OmegaConf.to_container(cfg, resolve=True)
    fingerprint = config_hash(config)

    trainer: Trainer = instantiate(cfg.trainer)
    previous, state = resume_point(cfg, fingerprint) if trainer.resume else (None, None)
    if previous is not None and state is None:
        log.info(
            "skipping %s: this config already FINISHED as MLflow run %s "
            "(trainer.resume=false trains it again)",
            run_name,
            previous.info.run_id,
        )
        return previous.data.metrics["val_acc"]

    # Data and model come first: a missing dataset must not leave a half-made MLflow run.
    data, model, optimizer = build(cfg, trainer)
    log.info("%s on %s: %s", run_name, trainer.device, " ".join(hydra_cfg.overrides.task))

    checkpoint = job_dir / "checkpoint.pt"
    tags = tags_for(choices, cfg.seed, list(hydra_cfg.overrides.task))
    tags.update({HASH_TAG: fingerprint, CHECKPOINT_TAG: str(checkpoint)})
    with Tracker(
        tracking_uri=cfg.mlflow.tracking_uri,
        experiment_name=cfg.mlflow.experiment_name,
        run_name=run_name,
        params=config,
        tags=tags,
        resume_run_id=previous.info.run_id if previous is not None else None,
    ) as run:
        run.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        run.log_artifacts([job_dir / ".hydra"], "hydra")
        history = trainer.fit(
            model,
            optimizer,
            data,
            seed=cfg.seed,
            **schedule(cfg),
            on_epoch=run.log_epoch,
            checkpoint=checkpoint,
            resume=state,
            checkpoint_meta={"mlflow_run_id": run.run_id, "config_hash": fingerprint},
        )
        log_diagnostics(run, trainer, model, data, history, job_dir, run_name)
    return history[-1].val_acc


if __name__ == "__main__":
    # Run the function of the importable module gpool.train, not of this __main__ copy:
    # launchers that ship jobs to other processes (joblib, submitit) pickle the task
    # function by reference, which only works for a function they can import.
    from gpool.train import main as task

    try:
        task()
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: the run is already marked KILLED
        sys.exit(f"gpool.train: {stop or 'interrupted'}")
