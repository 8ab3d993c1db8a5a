"""Runs read back for what is measured after training (gpool.reload, gpool.shift): images
moved pixel-exactly, and a store's forged config or weights refused in one line before
anything of theirs is built or unpickled."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from gpool.config import compose_config
from gpool.errors import GpoolError
from gpool.names import CONFIG_FILE, WEIGHTS_FILE
from gpool.reload import network, run_config
from gpool.shift import moved


def test_images_move_whole_pixels_with_black_coming_in() -> None:
    images = torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4)
    right = moved(images, 0, 1)[0, 0]
    assert right[:, 0].tolist() == [0, 0, 0, 0] and right[:, 1:].equal(images[0, 0, :, :3])
    up = moved(images, -2, 0)[0, 0]
    assert up[:2].equal(images[0, 0, 2:]) and up[2:].sum() == 0
    assert moved(images, 0, 0).equal(images) and moved(images, 4, 0).sum() == 0


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/gpool-reload-pwned",))


def honest_config(data_dir: Path) -> str:
    """A config as gpool.train logs it (resolved)."""
    return OmegaConf.to_yaml(compose_config(f"data_dir={data_dir}"), resolve=True)


@pytest.fixture
def store(tmp_path: Path) -> tuple[MlflowClient, str]:
    """A real sqlite store with one run holding an honest config.yaml."""
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("gpool", (tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment, run_name="forged")
    client.log_text(run.info.run_id, honest_config(tmp_path), CONFIG_FILE)
    return client, run.info.run_id


def test_a_run_config_builds_only_gpools_own_targets_from_local_data(store, tmp_path) -> None:
    client, run_id = store
    cfg = run_config(client, client.get_run(run_id), "/here")
    assert cfg.data_dir == "/here" and cfg.dataset.root == "/here"
    tree = yaml.safe_load(honest_config(tmp_path))
    tree["model"]["_target_"] = "os.system"
    client.log_text(run_id, yaml.safe_dump(tree), CONFIG_FILE)
    with pytest.raises(
        GpoolError, match="names targets gpool's config groups do not \\(os.system\\)"
    ):
        run_config(client, client.get_run(run_id), "/here")
    client.log_text(run_id, "model: [", CONFIG_FILE)
    with pytest.raises(GpoolError, match=CONFIG_FILE):
        run_config(client, client.get_run(run_id), "/here")


def test_forged_weights_are_refused_unpickled(store, tmp_path) -> None:
    client, run_id = store
    cfg = run_config(client, client.get_run(run_id), str(tmp_path))
    with pytest.raises(GpoolError, match=f"has no {WEIGHTS_FILE}"):
        network(client, client.get_run(run_id), cfg)
    forged = tmp_path / WEIGHTS_FILE
    forged.write_bytes(pickle.dumps(Exploit()))
    client.log_artifact(run_id, str(forged))
    with pytest.raises(GpoolError, match="does not fit"):
        network(client, client.get_run(run_id), cfg)
    assert not Path("/tmp/gpool-reload-pwned").exists()
