"""Per-image predictions, as runs log them and gpool.compare reads them back: what lets a
comparison's interval cover the test images as well as the seeds.

Per split it scored, a run logs `predictions/<split>.npy` (the predicted classes) and
`predictions/<split>_labels.npy` (the true ones), int16, in the order it scored them. Read
back, they must be what they claim: small, plain integer arrays (no pickles), as long as each
other, and scoring what the run logged as its final accuracy; anything else is no predictions,
with the reason, and that run's group is compared on its seeds alone.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch import Tensor

ARTIFACT_DIR = "predictions"
#: The most bytes read of one predictions file: two million images, far from filling a disk.
MOST_BYTES = 4 * 2**20


def file_names(split: str) -> tuple[str, str]:
    """The predicted and the true classes' file names for `split`."""
    return f"{split}.npy", f"{split}_labels.npy"


def save(folder: Path, split: str, predicted: Tensor, labels: Tensor) -> list[Path]:
    """Write a split's predicted and true classes into `folder`; returns both paths."""
    paths = [folder / name for name in file_names(split)]
    for path, classes in zip(paths, (predicted, labels), strict=True):
        np.save(path, classes.numpy().astype(np.int16))
    return paths


@dataclass(frozen=True)
class ImageScores:
    """Which images a run classified right (1) or wrong (0), and their true classes."""

    correct: np.ndarray
    labels: np.ndarray


def load_classes(path: Path) -> np.ndarray:
    classes = np.load(path, allow_pickle=False)
    if classes.ndim != 1 or not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(f"{path.name} holds {classes.dtype} of shape {classes.shape}")
    return classes


def fetch_image_scores(
    client: MlflowClient, run: Run, split: str, score: float
) -> ImageScores | str:
    """The run's per-image scores on `split`, or why it has none usable: the files missing
    (a run logged before gpool logged them), too large, malformed, or not scoring `score`
    (its final accuracy, a fraction; one image of slack for stacked members' arithmetic)."""
    names = file_names(split)
    try:
        sizes = {
            Path(a.path).name: a.file_size
            for a in client.list_artifacts(run.info.run_id, ARTIFACT_DIR)
        }
        if missing := [n for n in names if n not in sizes]:
            return f"no {ARTIFACT_DIR}/{missing[0]}"
        if too_large := [n for n in names if (sizes[n] or 0) > MOST_BYTES]:
            return f"{ARTIFACT_DIR}/{too_large[0]} is larger than {MOST_BYTES} bytes"
        with tempfile.TemporaryDirectory(prefix="gpool-predictions-") as folder:
            predicted, labels = (
                load_classes(
                    Path(client.download_artifacts(run.info.run_id, f"{ARTIFACT_DIR}/{n}", folder))
                )
                for n in names
            )
    except (MlflowException, OSError, ValueError) as err:
        return f"{ARTIFACT_DIR} unreadable ({str(err).splitlines()[0][:200]})"
    if len(predicted) != len(labels) or not len(labels):
        return f"{len(predicted)} predictions for {len(labels)} labels"
    correct = (predicted == labels).astype(np.float64)
    if abs(correct.mean() - score) > max(1e-3, 1 / len(labels)) + 1e-9:
        return f"{ARTIFACT_DIR} score {correct.mean():.4f}, the run logged {score:.4f}"
    return ImageScores(correct, labels)
