"""What a run keeps besides its metrics, logged as it ends: weights, an MLflow model,
curves, class maps, the confusion matrix and the per-image predictions; and the link to
its checkpoint in the job's folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from gpool.diagnostics import class_maps, confusion_matrix, per_class_accuracy, probe_indices
from gpool.engine import Trainer
from gpool.images import ImageData
from gpool.job import Job
from gpool.names import (
    CLASS_MAPS_FILE,
    CONFUSION_FILE,
    CONFUSION_REPORT,
    CURVES_FILE,
    PREDICTIONS_DIR,
    WEIGHTS_FILE,
)
from gpool.predictions import save as save_predictions
from gpool.state import Member
from gpool.tracking import Tracker


def log_diagnostics(
    run: Tracker, trainer: Trainer, model: nn.Module, member: Member, data: ImageData, job: Job
) -> None:
    """What every run keeps besides metrics: weights (a state_dict, and an MLflow model
    unless mlflow.log_model is off), figures (unless mlflow.log_figures is off) of its
    curves and of the class maps that enter the pool for one fixed validation image per
    class, and over the images its accuracies scored
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
    figures = []
    if job.cfg.mlflow.log_figures:
        from gpool.plots import plot_confusion, plot_curves  # matplotlib: where runs draw

        figures = [
            plot_curves(member.history, job_dir / CURVES_FILE, run.run_name),
            plot_maps(model, data, job),
            plot_confusion(matrix, data.classes, job_dir / CONFUSION_FILE),
        ]
    run.log_artifacts([job_dir / WEIGHTS_FILE, *figures])


def plot_maps(model: nn.Module, data: ImageData, job: Job) -> Path:
    """class_maps.png in the job's folder: the maps that enter the pool for one fixed
    validation image per class, with true and predicted classes."""
    from gpool.plots import plot_class_maps  # matplotlib, which lean runs never import

    images, maps, labels, predicted = class_maps(model, data, probe_indices(data.val.labels))
    path = job.output_dir / CLASS_MAPS_FILE
    return plot_class_maps(images, maps, labels.tolist(), predicted.tolist(), data.classes, path)


def link_checkpoint(output_dir: Path, checkpoint: Path) -> None:
    """A link to the run's checkpoint in the job's output folder, where users look for it;
    gpool itself never reads through it."""
    link = output_dir / "checkpoint.pt"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(checkpoint)
