"""Per-image predictions, as runs log them and gpool.compare reads them back: what lets a
comparison's interval cover the test images as well as the seeds.

Per split it scored, a run logs `predictions/<split>.npy`: an int16 array of two rows, the
predicted and the true class of each image, in the order it scored them (one file a split:
reading 280 runs' back over a tracking server is one listing and one download a run). Read
back, it must be what it claims: small, a plain integer array (no pickle) of that shape, and
scoring what the run logged as its final accuracy; anything else is no predictions, with the
reason, and that run's group is compared on its seeds alone. Runs logged before 2026-12-02
have a one-row file (predicted classes only): no predictions either.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repo import ArtifactRepository
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

if TYPE_CHECKING:
    from torch import Tensor

ARTIFACT_DIR = "predictions"
#: The most bytes read of one predictions file: a million images, far from filling a disk.
MOST_BYTES = 4 * 2**20


def file_name(split: str) -> str:
    return f"{split}.npy"


def save(folder: Path, split: str, predicted: Tensor, labels: Tensor) -> Path:
    """Write a split's predicted and true classes into `folder`; returns the path."""
    path = folder / file_name(split)
    np.save(path, np.stack([predicted.numpy(), labels.numpy()]).astype(np.int16))
    return path


@dataclass(frozen=True)
class ImageScores:
    """Which images a run classified right (1) or wrong (0), and their true classes."""

    correct: np.ndarray
    labels: np.ndarray


def load(path: Path) -> np.ndarray:
    """The [2 x images] integer array in `path`; ValueError for anything else."""
    classes = np.load(path, allow_pickle=False)
    if classes.ndim == 1:
        raise ValueError("predicted classes only, no true ones (logged before 2026-12-02)")
    if classes.ndim != 2 or len(classes) != 2 or not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(
            f"{classes.dtype} of shape {classes.shape}, not predicted and true classes"
        )
    if not classes.shape[1]:
        raise ValueError("no images")
    return classes


def fetch_image_scores(
    client: MlflowClient, run: Run, finals: Mapping[str, float]
) -> dict[str, ImageScores | str]:
    """Per split in `finals` (mapped to the run's final accuracy on it, a fraction), the
    run's per-image scores, or why it has none usable: the file missing, too large, of
    another shape (a run logged before gpool logged the true classes), or not scoring that
    accuracy (one image of slack for stacked members' arithmetic). One listing of the
    run's predictions/ and one download a split: over a tracking server, requests are what
    a comparison of hundreds of runs waits for."""
    # MLflow draws a progress bar per download: noise in a report of hundreds of runs
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # By the run's artifact URI (the store's, not a tag), not its id: the client's calls by
    # run id fetch the run again each time, 3 requests more per run over a server.
    folder_uri = f"{run.info.artifact_uri}/{ARTIFACT_DIR}"
    try:
        repo = get_artifact_repository(folder_uri, tracking_uri=client.tracking_uri)
        sizes = {Path(a.path).name: a.file_size for a in repo.list_artifacts()}
    except (MlflowException, OSError) as err:
        why = f"{ARTIFACT_DIR}/ unreadable ({str(err).splitlines()[0][:200]})"
        return dict.fromkeys(finals, why)
    return {split: read_scores(repo, sizes, split, score) for split, score in finals.items()}


def read_scores(
    repo: ArtifactRepository, sizes: Mapping[str, int | None], split: str, score: float
) -> ImageScores | str:
    """The scores in `split`'s file of the listed folder `repo` (see fetch_image_scores)."""
    name = f"{ARTIFACT_DIR}/{file_name(split)}"
    if file_name(split) not in sizes:
        return f"no {name}"
    if (sizes[file_name(split)] or 0) > MOST_BYTES:
        return f"{name} is larger than {MOST_BYTES} bytes"
    try:
        with tempfile.TemporaryDirectory(prefix="gpool-predictions-") as folder:
            path = Path(folder) / file_name(split)
            # The file itself: the public download_artifacts lists it first, to learn it is
            # no folder, which the listing above already says (one request less a run).
            repo._download_file(file_name(split), str(path))
            predicted, labels = load(path)
    except ValueError as err:  # np.load's refusal of a pickle included
        return f"{name}: {str(err).splitlines()[0][:200]}"
    except (MlflowException, OSError, EOFError) as err:  # EOFError: a truncated file
        return f"{name} unreadable ({str(err).splitlines()[0][:200]})"
    correct = (predicted == labels).astype(np.float64)
    if abs(correct.mean() - score) > max(1e-3, 1 / len(labels)) + 1e-9:
        return f"{name} scores {correct.mean():.4f}, the run logged {score:.4f}"
    return ImageScores(correct, labels)
