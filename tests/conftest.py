"""Shared helpers: small generated FashionMNIST-layout IDX data and image folders, gpool as
a subprocess (run to the end, or started and stopped), and a real MLflow server."""

from __future__ import annotations

import atexit
import functools
import gzip
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import warm
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from PIL import Image

from gpool.names import ROLE_TAG

ROOT = Path(__file__).resolve().parents[1]
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


#: Free RAM the tests' folders may take in /dev/shm (stores, artifacts, checkpoints: about
#: 1 GB at most in a whole run).
RAM_FOLDER_NEEDS = 4 << 30


def pytest_configure(config: pytest.Config) -> None:
    """The tests' folders in RAM where /dev/shm is a tmpfs with room: every run commits to
    a new sqlite store (a schema migration of a few hundred statements, then a commit per
    logged batch), and on this machine kind each commit waits 10-30 ms for the disk's
    fsync: seconds a test, none of them what the test is about. `--basetemp DIR` chooses
    a folder (and keeps it); this one is removed when pytest ends."""
    shm = Path("/dev/shm")
    if config.option.basetemp or hasattr(config, "workerinput") or not os.access(shm, os.W_OK):
        return
    if shutil.disk_usage(shm).free < RAM_FOLDER_NEEDS:
        return
    folder = tempfile.mkdtemp(prefix="gpool-tests-", dir=shm)
    config.option.basetemp = folder
    config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))


def options(group: str) -> list[str]:
    """The options of a config group: its YAML files in conf/."""
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes, the format of MNIST-family datasets."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable 28x28 images: a bright 8x8 square whose position encodes the label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, 28, 28))
    for i, label in enumerate(labels):
        r, c = divmod(int(label), 5)
        images[i, 2 + r * 13 : 10 + r * 13, 1 + c * 5 : 9 + c * 5] = 230
    return images.astype(np.uint8), labels.astype(np.uint8)


def write_split(directory: Path, split: str, n: int, seed: int, gz: bool = False) -> None:
    images, labels = make_images(n, seed)
    for name, array in zip(FILES[split], (images, labels), strict=True):
        payload = idx_bytes(array)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (directory / name).write_bytes(payload)


def make_idx_root(directory: Path) -> Path:
    """A data root holding a small FashionMNIST (512 train / 256 test) in torchvision's layout."""
    raw = directory / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    write_split(raw, "train", 512, seed=1)
    write_split(raw, "test", 256, seed=2)
    return directory / "data"


@pytest.fixture
def idx_root(tmp_path: Path) -> Path:
    return make_idx_root(tmp_path)


#: What a run logs besides its metrics, weights, checkpoints and predictions, off: the MLflow
#: model (about 4 s of CPU a process: torch.export's import, MLflow's scan of the installed
#: packages) and the figures (about 1 s a run, hundreds of runs a suite). The tests about
#: those keep them.
LEAN = ("mlflow.log_model=false", "mlflow.log_figures=false")

#: Runs long enough (under a second an epoch on big_root) to be stopped in: the test
#: sends its signal within 20 ms of the first checkpoint, 7 epochs before the end. The limit
#: is big_root's whole epoch (2048 / 64), said so that the default launcher's rule
#: (gpool.parallel) counts the steps there are, not a FashionMNIST epoch's: a sweep this
#: short runs one job after another, with no joblib workers to start.
LONG = ("trainer.epochs=8", "trainer.limit_train_batches=32", "trainer.log_every_n_steps=10", *LEAN)


@pytest.fixture(scope="session")
def big_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2048 training images: epochs long enough (a quarter of a second) to be killed in."""
    root = tmp_path_factory.mktemp("big")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    write_split(raw, "train", 2048, seed=5)
    write_split(raw, "test", 256, seed=6)
    return root


#: One torch (OpenMP) thread per process: pytest-xdist runs a worker per core, and two
#: processes of two threads each on two cores measured 2.2x slower each than one thread each
#: (OpenMP's threads spin while they wait). Launchers that share the cores among parallel
#: jobs still set their own count (gpool.config.threads_per_job).
torch.set_num_threads(1)


def gpool_env(data_root: Path) -> dict[str, str]:
    env = dict(os.environ, GPOOL_DATA=str(data_root), PYTHONUNBUFFERED="1", **warm.ONE_THREAD)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


#: Two short epochs that log everything a run logs, its MLflow model included.
SHORT_WITH_MODEL = (
    "trainer.epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.eval_batch_size=100",
    "trainer.limit_val_batches=1",
)
#: ... without the MLflow model (model.pt still): tests about what a run logs.
SHORT_WITH_FIGURES = (*SHORT_WITH_MODEL, "mlflow.log_model=false")
#: ... LEAN: tests about the model and the runs a browser shows use SHORT_WITH_MODEL.
SHORT = (*SHORT_WITH_MODEL, *LEAN)
#: Generated data cannot match the real FashionMNIST's md5s: runs on it skip that check.
GENERATED = "dataset.checksums=null"


def on_generated_data(overrides: tuple[str, ...]) -> list[str]:
    """The overrides, with GENERATED first unless they choose another dataset."""
    other = any(o.startswith("dataset=") for o in overrides)
    return [*([] if other else [GENERATED]), *overrides]


def write_image_folder(root: Path, classes: dict[str, int], size: int = 20, count: int = 6):
    """PNG files in ImageFolder layout: per class a distinct brightness; `count` training
    and count // 2 validation images per class."""
    for split, n in (("train", count), ("val", count // 2)):
        for c, (name, level) in enumerate(classes.items()):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.full((size, size, 3), level, dtype=np.uint8)
                pixels[c % size, i % size] = 255
                Image.fromarray(pixels).save(folder / f"{i}.png")


def store(tmp: Path) -> MlflowClient:
    """The sqlite store run_gpool and start_gpool log to."""
    return MlflowClient(f"sqlite:///{tmp}/mlflow.db")


def all_runs(tmp: Path) -> list[Run]:
    """Every run of the experiment gpool in tmp's store, oldest first."""
    client = store(tmp)
    experiment = client.get_experiment_by_name("gpool")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time"])


def job_runs(tmp: Path) -> list[Run]:
    """The runs of jobs (not sweeps' parent runs), oldest first."""
    return [r for r in all_runs(tmp) if ROLE_TAG not in r.data.tags]


def sweep_runs(tmp: Path) -> list[Run]:
    """The sweeps' parent runs, oldest first."""
    return [r for r in all_runs(tmp) if ROLE_TAG in r.data.tags]


def history(tmp: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in store(tmp).get_metric_history(run_id, key))


def run_python(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300, fresh: bool = False
) -> subprocess.CompletedProcess[str]:
    """subprocess.run(args, capture_output=True, text=True): forked from this worker's warm
    interpreter when args are `python -m ...` or `python -c ...` (tests/warm.py), else (or
    given `fresh`) a fresh process (interpreter flags such as -X importtime)."""
    if not fresh and warm.can_fork(args):
        return warm.run(args, cwd, env, timeout)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@functools.cache
def migrated_store() -> Path:
    """An empty sqlite store with MLflow's schema, made once per test worker."""
    folder = Path(tempfile.mkdtemp(prefix="gpool-migrated-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    MlflowClient(f"sqlite:///{folder}/mlflow.db").search_experiments()
    return folder / "mlflow.db"


def existing_store(tmp: Path) -> None:
    """tmp's store as a user's second command finds it: made already (a copy of an empty
    migrated one) unless it exists. A new sqlite store costs its first command 1-2 s of
    CPU for MLflow's schema migration; the tests about new stores pass fresh_store=True."""
    if not (tmp / "mlflow.db").exists():
        shutil.copyfile(migrated_store(), tmp / "mlflow.db")


def run_gpool(
    tmp_path: Path,
    data_root: Path,
    *overrides: str,
    multirun: bool = False,
    entry: tuple[str, ...] = ("-m", "gpool.train"),
    fresh_store: bool = False,
) -> subprocess.CompletedProcess[str]:
    """`python -m gpool.train` as a user runs it, with its store and outputs under tmp_path
    (`entry`: what follows `python` instead; `fresh_store`: no store there yet unless
    an earlier command made one, else existing_store)."""
    if not fresh_store:
        existing_store(tmp_path)
    args = [sys.executable, *entry]
    if multirun:
        args.append("-m")
    args += [
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        f"checkpoint_dir={tmp_path}/checkpoints",
        f"hydra.run.dir={tmp_path}/single",
        f"hydra.sweep.dir={tmp_path}/multirun",
        "trainer.log_every_n_steps=2",
        *on_generated_data(overrides),
    ]
    return run_python(args, tmp_path, gpool_env(data_root), timeout=600)


def compare(
    sweep: Path,
    out: Path,
    *args: str,
    tracking_uri: str | None = None,
    python_flags: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """`python -m gpool.compare` on the store run_gpool logged to in `sweep` (or on
    `tracking_uri`, a server over it), files to `out`; `python_flags` go to the interpreter."""
    uri = tracking_uri or f"sqlite:///{sweep}/mlflow.db"
    command = [sys.executable, *python_flags, "-m", "gpool.compare", "--tracking-uri", uri]
    return run_python([*command, "--out", str(out), *args], Path.cwd(), gpool_env(sweep / "data"))


START_DEADLINE_S = 300


def start_gpool(
    tmp: Path,
    data: Path,
    *overrides: str,
    until: list[Path] | None = None,
    output: str | None = None,
    multirun: bool = False,
) -> warm.Forked:
    """Start `python -m gpool.train` in a session of its own, logging to tmp's store (an
    existing_store); return once every file in `until` exists, or once a line of its log
    contains `output`, while it goes on."""
    existing_store(tmp)
    proc = warm.Forked(
        [sys.executable, "-m", "gpool.train", *(["-m"] if multirun else [])]
        + [
            f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
            f"checkpoint_dir={tmp}/checkpoints",
            *on_generated_data(overrides),
        ],
        cwd=tmp,
        env=gpool_env(data),
        stderr=subprocess.STDOUT if output else subprocess.PIPE,
        start_new_session=True,
    )
    # A guard against a hang, not a timing check: machines of this kind differ 2x by the day,
    # and a multirun's later job starts only after the earlier ones finished.
    deadline = time.monotonic() + START_DEADLINE_S
    if output is not None:
        for line in proc.stdout:
            if output in line:
                return proc
            assert time.monotonic() < deadline, f"no {output!r} within {START_DEADLINE_S} s"
        pytest.fail(f"gpool.train ended without printing {output!r}")
    while not all(path.exists() for path in until or []):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no checkpoint within {START_DEADLINE_S} s"
        time.sleep(0.02)
    return proc


def session_ends(pgid: int, seconds: float) -> bool:
    """Whether every process of group `pgid` is gone within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False
