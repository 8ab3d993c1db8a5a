"""`python -m gpool.train [-m] overrides...`: one Hydra job = one training run = one MLflow run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from gpool.data import ImageData
from gpool.diagnostics import class_maps, confusion_matrix, per_class_accuracy, probe_indices
from gpool.engine import EpochResult, Trainer, seed_everything
from gpool.plots import plot_class_maps, plot_confusion, plot_curves
from gpool.tracking import Tracker, tags_for

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
    index = probe_indices(data.val.labels)
    images, maps, predicted = class_maps(model, data, index)
    labels = data.val.labels[index.to(data.val.labels.device)].tolist()
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
                images, maps, labels, predicted.tolist(), data.classes, job_dir / "class_maps.png"
            ),
            plot_confusion(matrix, data.classes, job_dir / "confusion_matrix.png"),
        ]
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Train one model and log it; returns the final validation accuracy (for sweepers)."""
    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    choices = dict(hydra_cfg.runtime.choices)
    run_name = cfg.mlflow.run_name or f"pool={choices['pool']} seed={cfg.seed}"

    seed_everything(cfg.seed)
    trainer: Trainer = instantiate(cfg.trainer)
    # Data and model come first: a missing dataset must not leave a half-made MLflow run.
    data = instantiate(cfg.dataset, root=cfg.data_dir).load(trainer.device, trainer.channels_last)
    model = trainer.prepare(instantiate(cfg.model, pool=instantiate(cfg.pool)))
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    log.info("%s on %s: %s", run_name, trainer.device, " ".join(hydra_cfg.overrides.task))

    with Tracker(
        tracking_uri=cfg.mlflow.tracking_uri,
        experiment_name=cfg.mlflow.experiment_name,
        run_name=run_name,
        params=OmegaConf.to_container(cfg, resolve=True),
        tags=tags_for(choices, cfg.seed, list(hydra_cfg.overrides.task)),
    ) as run:
        run.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        run.log_artifacts([job_dir / ".hydra"], "hydra")
        history = trainer.fit(
            model,
            optimizer,
            data,
            seed=cfg.seed,
            scheduler=instantiate(cfg.scheduler.lr_scheduler),
            scheduler_interval=cfg.scheduler.interval,
            on_epoch=run.log_epoch,
        )
        log_diagnostics(run, trainer, model, data, history, job_dir, run_name)
    return history[-1].val_acc


if __name__ == "__main__":
    main()
