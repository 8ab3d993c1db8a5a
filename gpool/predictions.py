"""Per-image predictions, as runs log them and gpool.compare reads them back: what lets a
comparison's interval cover the test images as well as the seeds.

Per split it scored, a run logs `predictions/<split>.npy`: an int16 array of two rows, the
predicted and the true class of each image, in the order it scored them (one file a split:
reading 280 runs' back over a tracking server is one listing and one download a run). Read
back, it must be what it claims, checked from its header before its data is read: a plain
.npy integer array (no pickle, no archive) of two rows and exactly as many images as the run
says it scored (its logged validation or test dataset, cut at trainer.limit_val_batches eval
batches), scoring what the run logged as its final accuracy. Anything else is no
predictions, with the reason, and that run's group is compared on its seeds alone: a file
anyone who can write to a run may replace costs a comparison no more memory or time than
an honest one. Files of gpool's first format have one row (predicted classes only): no
predictions either.
"""

from __future__ import annotations

import json
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
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from gpool.names import PREDICTIONS_DIR, SPLIT_CONTEXTS
from gpool.store import store_failing

if TYPE_CHECKING:
    from torch import Tensor

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


def load(path: Path, images: int) -> np.ndarray:
    """The [2 x images] integer array in `path`; ValueError for anything else, said from
    the header before any data is read (a header may claim any shape)."""
    with path.open("rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }[version]
            shape, _, dtype = read_header(f)
        except (ValueError, KeyError):  # a zip archive, text, a header np.save never writes
            raise ValueError("not a .npy file of one array") from None
        data_at = f.tell()
    if dtype.hasobject:
        raise ValueError("an object array, a pickle gpool never loads")
    if len(shape) == 1:
        raise ValueError("predicted classes only, no true ones (gpool's first format)")
    if len(shape) != 2 or shape[0] != 2 or dtype.kind not in "iu":
        raise ValueError(f"{dtype} of shape {shape}, not predicted and true classes")
    if shape[1] != images:
        raise ValueError(f"holds {shape[1]} images, the run scored {images}")
    if path.stat().st_size != data_at + 2 * images * dtype.itemsize:
        raise ValueError("its size does not match its header")
    return np.load(path, allow_pickle=False)


def scored_images(run: Run, split: str) -> int | str:
    """How many images of `split` the run scored: its logged dataset of that split, cut at
    trainer.limit_val_batches eval batches (MLflow params cannot be changed once logged);
    or why that is not known."""
    sizes = set()
    for dataset_input in run.inputs.dataset_inputs if run.inputs else []:
        contexts = {t.value for t in dataset_input.tags if t.key == MLFLOW_DATASET_CONTEXT}
        if SPLIT_CONTEXTS[split] in contexts:
            sizes.add(json.loads(dataset_input.dataset.profile or "{}").get("num_images"))
    if len(sizes) != 1 or not isinstance(images := sizes.pop(), int) or images < 1:
        return f"its logged {SPLIT_CONTEXTS[split]} dataset does not say how many images it scored"
    params = run.data.params
    limit = params.get("trainer.limit_val_batches", "None")
    batch = params.get("trainer.eval_batch_size", "")
    if limit == "None":
        return images
    if not (limit.isdigit() and batch.isdigit()):
        return "its trainer.limit_val_batches and eval_batch_size params are no counts"
    return min(images, int(limit) * int(batch))


def fetch_image_scores(
    client: MlflowClient, run: Run, finals: Mapping[str, float]
) -> dict[str, ImageScores | str]:
    """Per split in `finals` (mapped to the run's final accuracy on it, a fraction), the
    run's per-image scores, or why it has none usable: the file missing, too large, of
    another shape (a run logged before gpool logged the true classes), or not scoring that
    accuracy (one image of slack for stacked members' arithmetic), or of another size than
    the images the run scored (scored_images). One listing of the
    run's predictions/ and one download a split: over a tracking server, requests are what
    a comparison of hundreds of runs waits for."""
    # MLflow draws a progress bar per download: noise in a report of hundreds of runs
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # By the run's artifact URI (the store's, not a tag), not its id: the client's calls by
    # run id fetch the run again each time, 3 requests more per run over a server.
    folder_uri = f"{run.info.artifact_uri}/{PREDICTIONS_DIR}"
    try:
        repo = get_artifact_repository(folder_uri, tracking_uri=client.tracking_uri)
        sizes = {Path(a.path).name: a.file_size for a in repo.list_artifacts()}
    except (MlflowException, OSError) as err:
        if store_failing(err):
            raise
        why = f"{PREDICTIONS_DIR}/ unreadable ({str(err).splitlines()[0][:200]})"
        return dict.fromkeys(finals, why)
    return {
        split: read_scores(repo, sizes, split, score, scored_images(run, split))
        for split, score in finals.items()
    }


def read_scores(
    repo: ArtifactRepository,
    sizes: Mapping[str, int | None],
    split: str,
    score: float,
    images: int | str,
) -> ImageScores | str:
    """The scores in `split`'s file of the listed folder `repo`, which must hold `images`
    images (or why their number is unknown) (see fetch_image_scores)."""
    name = f"{PREDICTIONS_DIR}/{file_name(split)}"
    if file_name(split) not in sizes:
        return f"no {name}"
    if isinstance(images, str):
        return f"{name}: {images}"
    if (sizes[file_name(split)] or 0) > MOST_BYTES:
        return f"{name} is larger than {MOST_BYTES} bytes"
    try:
        with tempfile.TemporaryDirectory(prefix="gpool-predictions-") as folder:
            path = Path(folder) / file_name(split)
            # The file itself: the public download_artifacts lists it first, to learn it is
            # no folder, which the listing above already says (one request less a run).
            repo._download_file(file_name(split), str(path))
            predicted, labels = load(path, images)
    except ValueError as err:  # np.load's refusal of a pickle included
        return f"{name}: {str(err).splitlines()[0][:200]}"
    except (MlflowException, OSError, EOFError) as err:  # EOFError: a truncated file
        if store_failing(err):
            raise
        return f"{name} unreadable ({str(err).splitlines()[0][:200]})"
    correct = (predicted == labels).astype(np.float64)
    if abs(correct.mean() - score) > max(1e-3, 1 / len(labels)) + 1e-9:
        return f"{name} scores {correct.mean():.4f}, the run logged {score:.4f}"
    return ImageScores(correct, labels)
