"""`python -m gpool.train` end to end, as subprocesses, with the MLflow store queried back."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pytorch
import numpy as np
import pytest
import torch
from conftest import (
    GENERATED,
    SHORT,
    SHORT_WITH_FIGURES,
    SHORT_WITH_MODEL,
    all_runs,
    job_runs,
    run_gpool,
    write_image_folder,
)
from mlflow.artifacts import download_artifacts
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

import gpool
from gpool.config import compose_config
from gpool.model import build_model

pytestmark = pytest.mark.process


#: The figures a run logs unless mlflow.log_figures is off.
FIGURES = {"curves.png", "class_maps.png", "confusion_matrix.png"}


def check_finished_run(tmp_path: Path, run: Run, pool: str, seed: int, figures: bool) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"pool={pool} seed={seed}"
    tags, params = run.data.tags, run.data.params
    assert (tags["pool"], tags["dataset"], tags["optimizer"]) == (pool, "fashion_mnist", "adam")
    assert tags["seed"] == str(seed) and "trainer.epochs=2" in tags["overrides"]
    assert params["seed"] == str(seed) and params["trainer.epochs"] == "2"
    assert params["optimizer.lr"] == "0.0003" and params["pool._target_"].endswith(
        {"avg": "GlobalAvgPool", "max": "GlobalMaxPool"}[pool]
    )
    assert params["mlflow.experiment_name"] == "gpool"
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [1, 2], key
    steps = client.get_metric_history(run.info.run_id, "train_step_loss")
    assert sorted(m.step for m in steps) == [2, 4, 6]  # every 2nd of 3 steps x 2 epochs
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    expected = {"config.yaml", "hydra", "predictions", "model.pt", "confusion_matrix.json"}
    assert names == expected | (FIGURES if figures else set())
    hydra_files = {a.path for a in client.list_artifacts(run.info.run_id, "hydra")}
    assert hydra_files == {"hydra/config.yaml", "hydra/hydra.yaml", "hydra/overrides.yaml"}
    local = Path(
        download_artifacts(
            run_id=run.info.run_id,
            artifact_path="model.pt",
            tracking_uri=client.tracking_uri,
            dst_path=str(tmp_path),
        )
    )
    state = torch.load(local, weights_only=True)
    assert state["classifier.weight"].shape == (10, 32, 1, 1)
    confusion = json.loads(
        Path(
            download_artifacts(
                run_id=run.info.run_id,
                artifact_path="confusion_matrix.json",
                tracking_uri=client.tracking_uri,
                dst_path=str(tmp_path),
            )
        ).read_text()
    )
    # over the images val_acc scored: SHORT's one eval batch of 100, of the 256 generated
    assert len(confusion["matrix"]) == 10 and sum(map(sum, confusion["matrix"])) == 100
    assert set(confusion["per_class_accuracy"]) == set(confusion["classes"])


def test_the_logged_model_loads_back_and_images_have_steps(
    tmp_path: Path, idx_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    every_epoch = "mlflow.class_maps_every_n_epochs=1"
    proc = run_gpool(tmp_path, idx_root, *SHORT_WITH_MODEL, "pool=attention", every_epoch)
    assert proc.returncode == 0
    (run,) = all_runs(tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    steps = {p.split("+step+")[1].split("+")[0] for p in images if "/class_maps+step+" in p}
    assert {int(s) for s in steps} == {1, 2}  # the image slider: one per epoch
    (output,) = client.get_run(run.info.run_id).outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert logged.name == "model" and logged.source_run_id == run.info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    loaded = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    own = build_model(compose_config(GENERATED, "pool=attention"))
    own.load_state_dict(torch.load(tmp_path / "single" / "model.pt", weights_only=True))
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), own.eval()(x))
    assert run.data.metrics["mlflow_seconds"] < 10


def test_runs_log_system_metrics_unless_switched_off(
    tmp_path: Path, idx_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MLflow samples every 10 s, so sample 10 times a second, and train long enough for two
    # samples and their writes: 4 whole epochs of the generated data (32 steps, about half a
    # second; 3 epochs of 3 steps were sampled once on a fast machine).
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    longer = (*SHORT, "trainer.epochs=4", "trainer.limit_train_batches=8")
    assert run_gpool(tmp_path, idx_root, *longer).returncode == 0
    switched_off = run_gpool(tmp_path, idx_root, *longer, "seed=1", "mlflow.system_metrics=false")
    assert switched_off.returncode == 0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    on, off = (
        r.info.run_id for r in sorted(all_runs(tmp_path), key=lambda r: r.data.params["seed"])
    )
    system = {k for k in client.get_run(on).data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    assert len(client.get_metric_history(on, "system/cpu_utilization_percentage")) >= 2
    assert not any(k.startswith("system/") for k in client.get_run(off).data.metrics)


def test_single_run_logs_params_metrics_and_artifacts(tmp_path: Path, idx_root: Path) -> None:
    proc = run_gpool(tmp_path, idx_root, *SHORT_WITH_FIGURES, fresh_store=True)  # first command
    assert proc.returncode == 0, proc.stderr
    assert "validation_accuracy" in proc.stdout  # the article-style summary line per epoch
    (run,) = all_runs(tmp_path)
    check_finished_run(tmp_path, run, "avg", 0, figures=True)
    assert "mlflow.parentRunId" not in run.data.tags
    assert (tmp_path / "single" / "curves.png").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    # SHORT_WITH_FIGURES has mlflow.log_model=false: no logged model, model.pt alone (checked above)
    assert client.get_run(run.info.run_id).outputs.model_outputs == []
    experiment = client.get_experiment_by_name("gpool")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()
    # What the runs table's Source and Dataset columns show
    assert run.data.tags["mlflow.source.name"] == "gpool.train"
    assert run.data.tags["mlflow.source.type"] == "LOCAL"
    inputs = {
        i.tags[0].value: i.dataset for i in client.get_run(run.info.run_id).inputs.dataset_inputs
    }
    assert set(inputs) == {"training", "validation"}
    assert {d.name for d in inputs.values()} == {"fashion_mnist"}
    sizes = {c: json.loads(d.profile)["num_images"] for c, d in inputs.items()}
    assert sizes == {"training": 512, "validation": 256}
    assert inputs["training"].digest != inputs["validation"].digest
    # Another dataset, or a holdout of this one, is told apart by its digest.
    other = tmp_path / "held"
    other.mkdir()
    assert run_gpool(other, idx_root, *SHORT, "dataset.holdout=64").returncode == 0
    (held,) = all_runs(other)
    held_inputs = {
        i.tags[0].value: i.dataset
        for i in MlflowClient(f"sqlite:///{other}/mlflow.db")
        .get_run(held.info.run_id)
        .inputs.dataset_inputs
    }
    assert set(held_inputs) == {"training", "validation", "testing"}
    assert held_inputs["testing"].digest == inputs["validation"].digest  # the same test split
    assert held_inputs["training"].digest != inputs["training"].digest
    assert "test_acc" in held.data.metrics
    # Every image's predicted class, per split (what an interval over images needs).
    store_of = {run.info.run_id: tmp_path, held.info.run_id: other}
    for logged, splits in ((run, ("val",)), (held, ("val", "test"))):
        uri = f"sqlite:///{store_of[logged.info.run_id]}/mlflow.db"
        folder = download_artifacts(
            run_id=logged.info.run_id,
            artifact_path="predictions",
            tracking_uri=uri,
            dst_path=str(tmp_path / "download" / logged.info.run_id),
        )
        assert sorted(p.name for p in Path(folder).iterdir()) == [
            f"{s}.npy" for s in sorted(splits)
        ]
    predicted, labels = np.load(Path(folder) / "val.npy")  # predicted and true classes
    assert predicted.shape == labels.shape == (64,) and predicted.dtype == np.int16
    assert (predicted == labels).mean() == pytest.approx(held.data.metrics["val_acc"])


def test_multirun_sweep_logs_one_run_per_job(tmp_path: Path, idx_root: Path) -> None:
    maps = "mlflow.class_maps_every_n_epochs=1"  # none either: SHORT logs no figures
    proc = run_gpool(tmp_path, idx_root, "pool=avg,max", "seed=0,1", *SHORT, maps, multirun=True)
    assert proc.returncode == 0, proc.stderr
    runs = [run for run in all_runs(tmp_path) if "gpool.role" not in run.data.tags]
    assert len(runs) == 4
    for run, (pool, seed) in zip(
        runs, [("avg", 0), ("avg", 1), ("max", 0), ("max", 1)], strict=True
    ):
        check_finished_run(tmp_path, run, pool, seed, figures=False)  # SHORT: none
    (parent_id,) = {run.data.tags["mlflow.parentRunId"] for run in runs}
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["gpool.role"] == "sweep"
    assert parent.data.tags["sweep_dir"] == str(tmp_path / "multirun")
    assert "pool=avg,max seed=0,1" in parent.info.run_name
    folders = sorted(p.name for p in (tmp_path / "multirun").iterdir() if p.is_dir())
    assert folders == ["0", "1", "2", "3", "comparison"]  # the jobs', and the sweep's verdict
    # its report and table, and no figure either (mlflow.log_figures=false)
    written = sorted(p.name for p in (tmp_path / "multirun" / "comparison").iterdir())
    logged = sorted(Path(a.path).name for a in client.list_artifacts(parent_id, "comparison"))
    assert written == logged == ["comparison.csv", "comparison.md"]
    assert runs[0].data.metrics["val_loss"] != runs[2].data.metrics["val_loss"]  # heads differ


def test_unknown_option_key_or_wrong_type_fails_before_anything_is_logged(
    tmp_path: Path, idx_root: Path
) -> None:
    proc = run_gpool(tmp_path, idx_root, "pool=median")
    assert proc.returncode != 0
    assert "Could not find 'pool/median'" in proc.stderr
    assert "avg" in proc.stderr and "max" in proc.stderr  # Hydra lists the options
    proc = run_gpool(tmp_path, idx_root, "trainer.epochz=3")
    assert proc.returncode != 0 and "Key 'epochz' not in 'TrainerSchema'" in proc.stderr
    proc = run_gpool(tmp_path, idx_root, "trainer.epochs=ten")
    assert proc.returncode != 0
    assert "Value 'ten' of type 'str' could not be converted to Integer" in proc.stderr
    assert all_runs(tmp_path) == []


def test_a_top_level_key_gpool_never_reads_is_one_warning_and_no_new_config(
    tmp_path: Path, idx_root: Path
) -> None:
    """`+nosuch=1` changes nothing a run computes: one warning, and the run of the same
    config without it counts (skipped); a key another key interpolates is no warning."""
    assert run_gpool(tmp_path, idx_root, *SHORT).returncode == 0
    proc = run_gpool(tmp_path, idx_root, *SHORT, "+nosuch=1")
    assert proc.returncode == 0, proc.stderr
    log = proc.stdout + proc.stderr
    warnings = [line for line in log.splitlines() if "gpool reads no top-level key" in line]
    assert len(warnings) == 1 and "key nosuch and nothing interpolates it" in warnings[0], log
    assert "skipping" in log and len(job_runs(tmp_path)) == 1
    proc = run_gpool(tmp_path, idx_root, *SHORT, "+peak=0.01", "optimizer.lr=${peak}")
    assert proc.returncode == 0 and "gpool reads no top-level key" not in proc.stdout
    assert len(job_runs(tmp_path)) == 2  # another lr: another config


def test_missing_data_is_one_clear_error_and_no_run(tmp_path: Path, monkeypatch) -> None:
    # A proxy on a closed local port makes torchvision's download fail at once, online or not.
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    proc = run_gpool(tmp_path, tmp_path / "no-data", "dataset.offline_copy.dir=/nonexistent")
    assert proc.returncode != 0
    assert "FashionMNIST is not available offline" in proc.stderr
    assert "apt-get install dataset-fashion-mnist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert all_runs(tmp_path) == []


def test_nan_loss_fails_its_run_and_the_sweep_goes_on(tmp_path: Path, idx_root: Path) -> None:
    proc = run_gpool(tmp_path, idx_root, "optimizer.lr=1e12,3e-4", *SHORT, multirun=True)
    assert proc.returncode != 0  # Hydra reports the failed job
    assert "training loss became nan" in proc.stderr
    parent, failed, finished = all_runs(tmp_path)
    assert parent.data.tags["gpool.role"] == "sweep" and parent.info.status == "FAILED"
    assert (
        failed.info.status == "FAILED" and failed.data.params["optimizer.lr"] == "1000000000000.0"
    )
    assert "NonFiniteLossError" in failed.data.tags["failure"]
    assert finished.info.status == "FINISHED"
    # The sweep's run states what its finished job allows, and which job is missing.
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("Verdict: only one group") and "\nNot compared:\n" in note
    assert "\n\n1 finished runs from sweep" in note
    assert f"- {failed.info.run_name}: FAILED: NonFiniteLossError" in note


def test_output_dirs_live_under_the_projects_runs_and_do_not_collide() -> None:
    cfg = compose_config(hydra=True)
    runs = gpool.PROJECT_ROOT / "runs"
    for directory in (cfg.hydra.run.dir, cfg.hydra.sweep.dir):
        path = Path(directory)
        assert path.is_relative_to(runs)
        assert len(path.name.split("-")) == 4  # HH-MM-SS-microseconds


def test_every_head_trains_and_logs_in_a_sweep(tmp_path: Path, idx_root: Path) -> None:
    heads = ["attention", "avgmax", "catavgmax", "gem", "lse"]
    proc = run_gpool(tmp_path, idx_root, f"pool={','.join(heads)}", *SHORT, multirun=True)
    assert proc.returncode == 0, proc.stderr
    runs = [r for r in all_runs(tmp_path) if "gpool.role" not in r.data.tags]
    assert sorted(r.data.tags["pool"] for r in runs) == heads
    assert {r.info.status for r in runs} == {"FINISHED"}
    # 256 validation images at 100 per batch, one batch: accuracies are multiples of 1/100
    assert all(
        r.data.metrics["val_acc"] * 100 == pytest.approx(round(r.data.metrics["val_acc"] * 100))
        for r in runs
    )


def test_own_images_in_image_folder_layout_train_and_log(tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_image_folder(images, {"ash": 40, "birch": 120, "cedar": 200})
    proc = run_gpool(
        tmp_path,
        tmp_path / "unused",
        "dataset=image_folder",
        f"dataset.root={images}",
        "dataset.num_classes=3",
        *SHORT,
    )
    assert proc.returncode == 0, proc.stderr
    (run,) = all_runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.tags["dataset"] == "image_folder"
    assert run.data.params["dataset.num_classes"] == "3"
