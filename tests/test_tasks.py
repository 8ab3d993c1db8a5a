"""The tasks derived from FashionMNIST (gpool/tasks.py, conf/dataset/translated.yaml,
cluttered.yaml, occluded.yaml), built from generated IDX files: their shapes and labels,
what each does to an item, that a build is deterministic and cached, that a damaged cache is
built again, and that a run on a task logs its own digests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import SHORT, compare, job_runs, run_gpool
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from gpool.config import build, compose_config
from gpool.images import Split
from gpool.names import (
    ACROSS_FILE,
    COMPARISON_DIR,
    ROLE_TAG,
    SWEEP_ROLE,
    TABLE_FILE,
    VAL_CONTEXT,
)

TASKS = ["translated", "cluttered", "occluded"]


def task(name: str, data: Path, *overrides: str):
    """The dataset object of task `name` over the generated files under `data`."""
    cfg = compose_config(
        f"dataset={name}", f"data_dir={data}", "dataset.base.checksums=null", *overrides
    )
    return build(cfg.dataset)


def base_splits(data: Path) -> tuple[Split, Split]:
    cfg = compose_config(f"data_dir={data}", "dataset.checksums=null")
    return build(cfg.dataset).splits()


@pytest.mark.parametrize("name", TASKS)
def test_a_task_keeps_the_labels_and_has_its_own_size_and_digest(name: str, idx_root: Path):
    base_train, base_test = base_splits(idx_root)
    train, test = task(name, idx_root).splits()
    size = 28 if name == "occluded" else 56
    assert tuple(train.images.shape) == (512, 1, size, size)
    assert tuple(test.images.shape) == (256, 1, size, size)
    assert train.images.dtype == base_train.images.dtype
    assert (train.labels == base_train.labels).all() and (test.labels == base_test.labels).all()
    assert train.digest() != base_train.digest() and test.digest() != base_test.digest()
    data = task(name, idx_root).load("cpu")
    assert data.splits()[VAL_CONTEXT] == (test.digest(), 256)
    x, _ = data.batch(data.train, slice(0, 512))  # normalised by the task's own statistics
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2


def test_translation_moves_each_item_whole_and_clutter_only_adds(idx_root: Path) -> None:
    (base, _), (moved, _) = base_splits(idx_root), task("translated", idx_root).splits()
    (cluttered, _) = task("cluttered", idx_root).splits()
    corners = set()
    for i in range(32):
        item, canvas = base.images[i, 0].numpy(), moved.images[i, 0].numpy()
        assert canvas.astype(int).sum() == item.astype(int).sum()  # the item, whole
        rows, cols = np.nonzero(canvas)
        top, left = rows.min(), cols.min()  # generated items have no black border rows
        assert (canvas[top : top + 28, left : left + 28] == item).all()
        corners.add((int(top), int(left)))
        assert (cluttered.images[i, 0].numpy() >= canvas).all()  # other items' crops on top
    assert len(corners) > 20  # placed at random


def test_occlusion_blacks_out_one_square(idx_root: Path) -> None:
    (base, _), (hidden, _) = base_splits(idx_root), task("occluded", idx_root).splits()
    for i in range(32):
        before, after = base.images[i, 0].numpy(), hidden.images[i, 0].numpy()
        changed = np.argwhere(before != after)
        assert (after[before != after] == 0).all()
        rows, cols = np.nonzero(after == 0) if len(changed) == 0 else changed.T
        assert rows.max() - rows.min() < 14 and cols.max() - cols.min() < 14


def test_a_task_is_built_once_the_same_and_rebuilt_when_its_cache_is_damaged(
    idx_root: Path,
) -> None:
    first, _ = task("cluttered", idx_root).splits()
    (cached,) = (idx_root / "derived" / "cluttered").glob("train-*.npz")
    again, _ = task("cluttered", idx_root).splits()  # read back from the cache
    assert (again.images == first.images).all()
    for path in (idx_root / "derived" / "cluttered").iterdir():
        path.unlink()
    fresh, _ = task("cluttered", idx_root).splits()  # built anew: the same bytes
    assert fresh.digest() == first.digest()
    cached.write_bytes(cached.read_bytes()[:1000])  # a truncated cache
    damaged, _ = task("cluttered", idx_root).splits()
    assert damaged.digest() == first.digest()
    other, _ = task("cluttered", idx_root, "dataset.seed=1").splits()
    assert other.digest() != first.digest()  # another seed: another task, another file
    assert len(list((idx_root / "derived" / "cluttered").glob("train-*.npz"))) == 2


@pytest.mark.process
def test_a_sweep_over_tasks_logs_each_tasks_images_and_a_verdict_across_them(
    tmp_path: Path, idx_root: Path
) -> None:
    """Two heads on two tasks: every run logs its task's images, and the sweep's run gets
    each task's pairs and the answer across the tasks (no figure: the runs are LEAN);
    gpool.compare reads the same back and draws the figure across the tasks."""
    overrides = ("dataset=translated,occluded", "pool=avg,max", "seed=0,1")
    proc = run_gpool(
        tmp_path, idx_root, *overrides, "++dataset.base.checksums=null", *SHORT, multirun=True
    )
    assert proc.returncode == 0, proc.stderr
    runs = job_runs(tmp_path)
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}
    for name in ("translated", "occluded"):
        digests = {
            d.dataset.digest
            for r in runs
            if r.data.tags["dataset"] == name
            for d in r.inputs.dataset_inputs
            if any(t.value == VAL_CONTEXT for t in d.tags)
        }
        assert digests == {task(name, idx_root).splits()[1].digest()}
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (parent,) = client.search_runs(
        [runs[0].info.experiment_id], f"tags.`{ROLE_TAG}` = '{SWEEP_ROLE}'"
    )
    note = parent.data.tags[MLFLOW_RUN_NOTE]
    assert "on 2 tasks (" in note and "dataset=occluded" in note
    assert "On dataset=translated:" in note and "| pool=avg | pool=max |" in note
    assert "Verdict: pool=" in note and "mean over 2 tasks of" in note
    listed = {f.path for f in client.list_artifacts(parent.info.run_id, COMPARISON_DIR)}
    assert f"{COMPARISON_DIR}/{TABLE_FILE}" in listed  # no figure: mlflow.log_figures=false
    out = compare(tmp_path, tmp_path / "compare", "--parent", parent.info.run_id)
    assert out.returncode == 0, out.stderr
    assert note.split("Verdict: ")[1].splitlines()[0] in out.stdout
    assert out.stdout.count("comes from, per class") == 2  # a class table a task
    assert (tmp_path / "compare" / ACROSS_FILE).stat().st_size > 10_000
