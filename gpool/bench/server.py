"""`python -m gpool.bench --compare RUNS`: how long `gpool.compare` takes to read and compare
RUNS runs over a local `mlflow server`, against the same runs in a sqlite store.

The runs are simulated, not trained: HEADS made-up heads `h0`, `h1`, ... whose final
accuracies differ by 0.2 points a step, each over RUNS / HEADS seeds, with EPOCHS epochs of
`val_acc` and `train_acc` and a predictions file that scores the run's final accuracy: what a
sweep's runs hold for gpool.compare, so that it makes every request a real comparison makes.
Both stores are timed in turns, the whole command each time (its start-up included), since a
user waits for all of it.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from gpool import predictions
from gpool.names import HASH_TAG, PREDICTIONS_DIR, VAL_CONTEXT
from gpool.tracking import dataset_inputs

HEADS = 7
EPOCHS = 4
IMAGES = 10_000
EXPERIMENT = "simulated-heads"
#: What the servers gpool starts are for: tracking and artifacts, not MLflow's job runner.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def log_simulated_run(client: MlflowClient, experiment_id: str, head: int, seed: int) -> None:
    """One FINISHED run of head `head` and seed `seed`, as a gpool job logs it."""
    labels = np.random.default_rng(0).integers(0, 10, IMAGES)  # one test split for all
    rng = np.random.default_rng([head, seed])
    right = round(IMAGES * (0.88 + 0.002 * head + rng.normal(0, 0.004)))
    predicted = labels.copy()
    wrong = rng.choice(IMAGES, IMAGES - right, replace=False)
    predicted[wrong] = (labels[wrong] + 1) % 10
    final, now = right / IMAGES, int(time.time() * 1000)
    tags = {"pool": f"h{head}", HASH_TAG: f"simulated-h{head}-{seed}"}
    run = client.create_run(experiment_id, tags=tags, run_name=f"pool=h{head} seed={seed}")
    metrics = [
        Metric(key, final - gap * (EPOCHS - epoch), now, epoch)
        for epoch in range(1, EPOCHS + 1)
        for key, gap in (("val_acc", 0.01), ("train_acc", 0.008))
    ]
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param("seed", str(seed))])
    client.log_inputs(run.info.run_id, dataset_inputs("simulated", {VAL_CONTEXT: ("0", IMAGES)}))
    with tempfile.TemporaryDirectory() as folder:
        path = predictions.save(
            Path(folder), "val", torch.from_numpy(predicted), torch.from_numpy(labels)
        )
        client.log_artifact(run.info.run_id, str(path), PREDICTIONS_DIR)
    client.set_terminated(run.info.run_id)


def fill(client: MlflowClient, runs: int, artifacts: str | None = None) -> None:
    """The simulated experiment: `runs` runs, HEADS heads of `runs // HEADS` seeds."""
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=artifacts)
    for seed in range(runs // HEADS):
        for head in range(HEADS):
            log_simulated_run(client, experiment_id, head, seed)


def free_port() -> int:
    """A port free now on 127.0.0.1 (a server started next binds it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, workers: int = 1) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 and a free port, serving artifacts; yields its
    URL. Its log goes to a file (a pipe would fill and stall it), shown if it fails to start.
    Without MLflow's job execution (SERVER_ENV): its pool of about ten Python processes
    serves MLflow's GenAI jobs, which gpool never submits, and costs some 20 s of CPU at
    every start, more than the tracking server itself."""
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    command = [str(mlflow), "server", "--backend-store-uri", backend_uri, "--serve-artifacts"]
    command += ["--artifacts-destination", str(artifacts), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", str(workers)]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
            env={**os.environ, **SERVER_ENV},
        )
        try:
            for _ in range(240):
                try:
                    urllib.request.urlopen(f"{url}/health", timeout=1).close()
                    break
                except OSError:
                    if server.poll() is not None:
                        log.seek(0)
                        raise RuntimeError(f"mlflow server exited: {log.read()[-2000:]}") from None
                    time.sleep(0.5)
            else:
                raise RuntimeError("mlflow server did not answer within 120 s")
            yield url
        finally:
            server.terminate()
            server.wait(timeout=30)


def compare_seconds(tracking_uri: str, out: Path) -> float:
    """The wall time of one `python -m gpool.compare` of the simulated experiment."""
    command = [sys.executable, "-m", "gpool.compare", "--tracking-uri", tracking_uri]
    start = time.perf_counter()
    done = subprocess.run(
        [*command, "--experiment", EXPERIMENT, "--out", str(out)],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if done.returncode or "seeds alone" in done.stdout:
        raise SystemExit(
            "gpool.compare failed or compared seeds alone:\n"
            + done.stdout[-2000:]
            + done.stderr[-2000:]
        )
    return seconds


def compare_over_server(runs: int, rounds: int) -> float:
    """Time gpool.compare over `runs` simulated runs in sqlite and on a server, `rounds`
    turns each; print the medians and return server / sqlite."""
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # a line a simulated run
    with tempfile.TemporaryDirectory(prefix="gpool-storebench-") as tmp:
        root = Path(tmp)
        local = f"sqlite:///{root}/local.db"
        fill(MlflowClient(local), runs, str(root / "local-artifacts"))
        with mlflow_server(f"sqlite:///{root}/served.db", root / "served-artifacts", 2) as url:
            fill(MlflowClient(url), runs)
            times: dict[str, list[float]] = {"sqlite": [], "server": []}
            for _ in range(rounds):
                times["sqlite"].append(compare_seconds(local, root / "out"))
                times["server"].append(compare_seconds(url, root / "out"))
    medians = {side: statistics.median(seconds) for side, seconds in times.items()}
    for side, seconds in times.items():
        print(f"{side}: median {medians[side]:.1f} s of {', '.join(f'{s:.1f}' for s in seconds)}")
    ratio = medians["server"] / medians["sqlite"]
    print(
        f"\ngpool.compare of {runs} runs, mlflow {mlflow.__version__}: server / sqlite {ratio:.2f}x"
    )
    return ratio
