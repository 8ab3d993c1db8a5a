"""A finished run's network and data back from its store, for what is measured after
training (gpool.compare --maps, --shift): its logged config (config.yaml) and weights
(model.pt). Read so that nothing in a store, which anyone with write access to it may have
forged, runs code or picks a file: the config builds only the targets gpool's own config
groups name, its data come from this machine's data_dir, files are size-checked before they
are read, and the weights load with weights_only."""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import torch
import yaml
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from torch import nn

from gpool import PROJECT_ROOT
from gpool.errors import GpoolError
from gpool.model import build_model
from gpool.names import CONFIG_FILE, WEIGHTS_FILE
from gpool.store import first_line, store_failing

#: The largest config.yaml and model.pt read back.
MOST_CONFIG_BYTES = 2**20
MOST_WEIGHTS_BYTES = 2**30


def targets(node: object) -> Iterator[str]:
    """Every _target_ in a config tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_":
                yield str(value)
            yield from targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from targets(value)


@cache
def own_targets() -> frozenset[str]:
    """The targets gpool's own config groups name (conf/**/*.yaml)."""
    found: set[str] = set()
    for path in (PROJECT_ROOT / "conf").rglob("*.yaml"):
        found.update(targets(yaml.safe_load(path.read_text())))
    return frozenset(found)


def fetch(client: MlflowClient, run: Run, name: str, most: int, folder: Path) -> Path:
    """The run's artifact `name`, at most `most` bytes, downloaded into `folder`."""
    try:
        repo = get_artifact_repository(run.info.artifact_uri, tracking_uri=client.tracking_uri)
        sizes = {a.path: a.file_size for a in repo.list_artifacts()}
        if name not in sizes:
            raise GpoolError(f"run {run.info.run_name} has no {name}")
        if (sizes[name] or 0) > most:
            raise GpoolError(f"run {run.info.run_name}'s {name} is larger than {most} bytes")
        repo._download_file(name, str(folder / name))  # listed above: a file, not a folder
    except (MlflowException, OSError) as err:
        if store_failing(err):
            raise
        raise GpoolError(f"run {run.info.run_name}'s {name}: {first_line(err)}") from None
    return folder / name


def run_config(client: MlflowClient, run: Run, data_dir: str) -> DictConfig:
    """The run's resolved config, its data read from `data_dir`; refused when it names a
    target gpool's config groups do not."""
    with tempfile.TemporaryDirectory(prefix="gpool-reload-") as folder:
        text = fetch(client, run, CONFIG_FILE, MOST_CONFIG_BYTES, Path(folder)).read_text()
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise GpoolError(f"run {run.info.run_name}'s {CONFIG_FILE}: {first_line(err)}") from None
    if not isinstance(tree, dict) or not {"model", "pool", "dataset"} <= tree.keys():
        raise GpoolError(f"run {run.info.run_name}'s {CONFIG_FILE} is no gpool config")
    if foreign := sorted(set(targets(tree)) - own_targets()):
        raise GpoolError(
            f"run {run.info.run_name}'s {CONFIG_FILE} names targets gpool's config groups do "
            f"not ({', '.join(foreign[:3])}): not built"
        )
    cfg = OmegaConf.create(tree)
    cfg.data_dir = data_dir
    for node in (cfg.dataset, cfg.dataset.get("base")):
        if node is not None and "root" in node:
            node.root = data_dir
    return cfg


def network(client: MlflowClient, run: Run, cfg: DictConfig) -> nn.Module:
    """The run's trained network (cfg: its run_config), on the CPU, in eval mode."""
    model = build_model(cfg)
    with tempfile.TemporaryDirectory(prefix="gpool-reload-") as folder:
        path = fetch(client, run, WEIGHTS_FILE, MOST_WEIGHTS_BYTES, Path(folder))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError) as err:
            raise GpoolError(
                f"run {run.info.run_name}'s {WEIGHTS_FILE} does not fit its config's network "
                f"({first_line(err)})"
            ) from None
    return model.eval()
