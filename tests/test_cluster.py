"""Beyond one machine: jobs in their own processes against a real MLflow tracking server, and
the SLURM preset as submitit would submit it (no cluster here: the sbatch script it writes)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from conftest import SHORT, run_gpool
from hydra.utils import instantiate
from mlflow.artifacts import download_artifacts
from mlflow.tracking import MlflowClient
from submitit.slurm.slurm import SlurmExecutor, _convert_mem, _make_sbatch_string

from gpool.bench.server import mlflow_server
from gpool.config import compose_config, threads_per_job
from gpool.names import ROLE_TAG
from gpool.resume import is_alive

pytestmark = pytest.mark.process


def test_submitit_jobs_in_their_own_processes_log_through_a_tracking_server(
    tmp_path: Path, idx_root: Path
) -> None:
    with mlflow_server(f"sqlite:///{tmp_path}/server.db", tmp_path / "served") as url:
        proc = run_gpool(
            tmp_path,
            idx_root,
            "hydra/launcher=submitit_local",
            "pool=avg,max",
            *SHORT,
            f"mlflow.tracking_uri={url}",
            multirun=True,
        )
        assert proc.returncode == 0, proc.stderr
        client = MlflowClient(url)
        experiment = client.get_experiment_by_name("gpool")
        runs = client.search_runs([experiment.experiment_id])
        (parent,) = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(r.info.run_name for r in children) == ["pool=avg seed=0", "pool=max seed=0"]
        assert {r.info.status for r in runs} == {"FINISHED"}
        # each job in a process of its own, neither the launcher's nor this one's
        pids = {r.data.tags["gpool.pid"] for r in children} | {str(os.getpid())}
        assert len(pids) == 3 and parent.data.tags["gpool.pid"] not in pids
        for run in children:  # artifacts went through the server, and come back from it
            local = download_artifacts(
                run_id=run.info.run_id,
                artifact_path="model.pt",
                tracking_uri=url,
                dst_path=str(tmp_path / run.info.run_id),
            )
            assert "classifier.weight" in torch.load(local, weights_only=True)
    assert any((tmp_path / "served").rglob("model.pt"))  # stored by the server, not the jobs
    assert not (tmp_path / "mlartifacts").exists()


def sbatch_script(overrides: list[str], tmp_path: Path) -> str:
    """The sbatch file submitit writes for a job of a sweep with these overrides.

    Composes the launcher config, translates it with submitit's own SLURM parameter names
    (what SlurmExecutor.update_parameters does) and renders it with submitit's sbatch
    writer. The executor itself refuses to start without `srun`, and there is no cluster
    here to submit to.
    """
    cfg = compose_config(*overrides, hydra=True)
    params = dict(instantiate(cfg.hydra.launcher).params)
    for key in ("submitit_folder", "max_num_timeout"):  # executor-wide, not sbatch flags
        params.pop(key)
    names = SlurmExecutor._equivalence_dict()
    params = {names.get(k, k): v for k, v in params.items()}
    params["mem"] = _convert_mem(params["mem"])
    return _make_sbatch_string(command="python -m gpool.train", folder=str(tmp_path), **params)


def test_slurm_preset_asks_for_one_gpu_per_job(tmp_path: Path) -> None:
    script = sbatch_script(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], tmp_path)
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=32GB",
        "#SBATCH --time=120",
        "#SBATCH --signal=USR2@120",  # time for submitit to requeue before the kill
    ):
        assert line in script.splitlines(), line


def test_slurm_preset_knobs_are_overridable(tmp_path: Path) -> None:
    script = sbatch_script(
        [
            "hydra/launcher=slurm",
            "hydra.launcher.partition=a100",
            "hydra.launcher.gpus_per_node=2",
            "hydra.launcher.cpus_per_task=16",
            "hydra.launcher.mem_gb=64",
            "hydra.launcher.timeout_min=30",
        ],
        tmp_path,
    ).splitlines()
    for line in (
        "#SBATCH --partition=a100",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --mem=64GB",
        "#SBATCH --time=30",
    ):
        assert line in script, line


def test_slurm_jobs_use_their_cpus_as_torch_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_config("hydra/launcher=slurm", hydra=True)
    HydraConfig.instance().set_config(cfg)
    try:
        assert threads_per_job() == 8
    finally:
        HydraConfig.instance().cfg = None
    assert threads_per_job() is None  # outside a Hydra job: torch's default


def test_a_requeued_slurm_job_sees_its_earlier_incarnation_as_dead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("gpool")
    tags = {"gpool.host": "node17", "gpool.pid": "4242", "gpool.slurm_job": "981_3"}
    run = client.get_run(client.create_run(experiment, tags=tags).info.run_id)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "981")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert not is_alive(run)  # requeued: same array task, new node
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    assert is_alive(run)  # another task of the array may well be running it elsewhere
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")

    def run_of(pid: int):
        here = {"gpool.host": socket.gethostname(), "gpool.pid": str(pid)}
        return client.get_run(client.create_run(experiment, tags=here).info.run_id)

    assert is_alive(run_of(os.getppid()))  # a living process on this host
    assert not is_alive(run_of(os.getpid()))  # our pid, yet not our run: a stale one
