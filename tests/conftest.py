"""Shared fixtures: small generated FashionMNIST-layout IDX data and a gpool subprocess runner."""

from __future__ import annotations

import gzip
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


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


def gpool_env(data_root: Path) -> dict[str, str]:
    env = dict(os.environ, GPOOL_DATA=str(data_root), PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


SHORT = (
    "trainer.epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.eval_batch_size=100",
    "trainer.limit_val_batches=1",
)


def run_gpool(
    tmp_path: Path, data_root: Path, *overrides: str, multirun: bool = False
) -> subprocess.CompletedProcess[str]:
    """`python -m gpool.train` as a user runs it, with its store and outputs under tmp_path."""
    args = [sys.executable, "-m", "gpool.train"]
    if multirun:
        args.append("-m")
    args += [
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        f"hydra.run.dir={tmp_path}/single",
        f"hydra.sweep.dir={tmp_path}/multirun",
        "trainer.log_every_n_steps=2",
        *overrides,
    ]
    return subprocess.run(
        args, cwd=tmp_path, env=gpool_env(data_root), capture_output=True, text=True, timeout=600
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(backend_uri: str, artifacts: Path) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 and a free port, serving artifacts; yields its URL."""
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [
            str(mlflow),
            "server",
            "--backend-store-uri",
            backend_uri,
            "--serve-artifacts",
            "--artifacts-destination",
            str(artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"mlflow server exited: {proc.stderr.read()}")
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer within 120 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
