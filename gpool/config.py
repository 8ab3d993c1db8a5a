"""The config groups of conf/ and how gpool composes and checks a config outside `gpool.train`.

One place for the facts every module shares: which groups a run is tagged and compared by,
how the bench, compare and tests compose the same config `gpool.train` would, and which
values are refused before anything is built or logged.
"""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import field, make_dataclass
from dataclasses import fields as dataclass_fields
from functools import cache
from math import inf
from typing import Any, get_type_hints

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gpool import PROJECT_ROOT
from gpool.errors import GpoolError
from gpool.trainer_settings import TrainerSettings

CONF_DIR = PROJECT_ROOT / "conf"
#: MLflow's limit on a param's value; longer values are cut.
MAX_PARAM_LENGTH = 6000
#: The config groups a run is tagged with and `gpool.compare` groups by.
GROUPS = ("pool", "dataset", "optimizer", "scheduler", "model", "experiment")
#: The top-level keys gpool reads (conf/config.yaml's; `experiment` is no key, its presets
#: set the others). Any other (`+note=...`) changes nothing a run computes unless one of
#: these interpolates it, which its resolved value then shows: it is no part of the config
#: hash (gpool.resume.affects_result) and gets one warning (unread_keys).
CONFIG_KEYS = (
    "pool",
    "optimizer",
    "scheduler",
    "dataset",
    "model",
    "trainer",
    "seed",
    "data_dir",
    "checkpoint_dir",
    "mlflow",
    "compare",
)


def threads_per_job() -> int | None:
    """Torch threads for one job so that parallel jobs x threads <= cores.

    A launcher that gives each job `cpus_per_task` (submitit) sets the count; one that runs
    jobs side by side on this machine (joblib's `n_jobs`, -1 = one per core; submitit's
    `array_parallelism`) shares the cores among them (hydra/launcher=auto gives its jobs
    trainer.threads itself: gpool.parallel); with jobs one after another (the basic
    launcher), None keeps torch's default.
    """
    if not HydraConfig.initialized():
        return None
    launcher = HydraConfig.get().launcher
    if launcher.get("cpus_per_task"):
        return int(launcher.cpus_per_task)
    parallel = launcher.get("n_jobs") or launcher.get("array_parallelism")
    if not parallel:
        return None
    cores = os.cpu_count() or 1
    return max(1, cores // (cores if parallel < 0 else parallel))


def pooled_channels(model: DictConfig, classes: int) -> int:
    """The maps a pool head sees (conf/pool/attention.yaml): one per class, or the
    backbone's feature maps (a PooledNet's `channels`; the convnet's last width)."""
    if model.pool_position == "class_maps":
        return classes
    return model.channels if "channels" in model else model.widths[-1]


@cache
def register() -> None:
    """What composing conf/ needs besides its files: gpool's resolvers (`${gpool.root:}`,
    `${gpool.threads:}`, `${gpool.pooled_channels:...}`) and the trainer schema. Called
    before any composition (compose_config; gpool.train at import), not when this module
    is imported."""
    OmegaConf.register_new_resolver("gpool.root", lambda: str(PROJECT_ROOT), replace=True)
    OmegaConf.register_new_resolver("gpool.threads", threads_per_job, replace=True)
    OmegaConf.register_new_resolver("gpool.pooled_channels", pooled_channels, replace=True)
    register_trainer_schema()


@cache
def register_trainer_schema() -> None:
    """conf/trainer options extend this schema, generated from the Trainer's settings
    (gpool.trainer_settings, torch-free), so that Hydra rejects a wrong type
    (`trainer.epochs=ten`) or an unknown key when composing, before anything runs or is
    logged."""
    hints = get_type_hints(TrainerSettings)
    fields: list[tuple[str, Any, Any]] = [
        (f.name, hints[f.name], field(default=f.default)) for f in dataclass_fields(TrainerSettings)
    ]
    fields.append(("_target_", str, field(default="gpool.engine.Trainer")))
    ConfigStore.instance().store(
        group="trainer", name="schema", node=make_dataclass("TrainerSchema", fields)
    )


def build(node: DictConfig, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, letting a GpoolError raised by the object itself (a value
    it refuses) through as it is, one message, instead of wrapped in Hydra's report."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, GpoolError):
            raise err.__cause__ from None
        raise


def compose_config(*overrides: str, hydra: bool = False) -> DictConfig:
    """The config `python -m gpool.train overrides...` would run (with `hydra.*` if asked)."""
    register()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def check_values(cfg: DictConfig) -> None:
    """Refuse, with one message naming the key, what the schema's types let through but no
    run can use: mandatory values left unset, a seed that is not a whole number, a learning
    rate (or one-cycle's peak) that is not a positive number, a switch that is not true or false."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=False))  # unresolved: no errors here
    if missing := sorted(key for key, value in flat.items() if value == "???"):
        raise GpoolError(
            "these config values must be set: "
            + ", ".join(f"{key}=..." for key in missing)
            + " (e.g. dataset=image_folder needs dataset.root and dataset.num_classes)"
        )
    seed = cfg.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise GpoolError(f"seed must be a whole number >= 0, not {seed!r}")
    rates = {"optimizer.lr": cfg.optimizer.get("lr")}
    if (schedule := cfg.scheduler.get("lr_scheduler")) is not None and "max_lr" in schedule:
        rates["scheduler.lr_scheduler.max_lr"] = schedule.max_lr
    for key, rate in rates.items():
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 < rate < inf:
            raise GpoolError(f"{key} must be a number > 0, not {rate!r}")
    margin = cfg.compare.margin
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real) or not 0 < margin < 100:
        raise GpoolError(f"compare.margin must be a number of points in (0, 100), not {margin!r}")
    for switch in ("mlflow.system_metrics", "mlflow.log_model", "mlflow.log_figures"):
        if not isinstance(value := OmegaConf.select(cfg, switch), bool):
            raise GpoolError(f"{switch} must be true or false, not {value!r}")


def unread_keys(cfg: DictConfig) -> list[str]:
    """The top-level keys of `cfg` that gpool never reads and that no key it reads
    interpolates (`${key...}`): keys that change nothing (see CONFIG_KEYS)."""
    extra = [key for key in cfg if key not in CONFIG_KEYS]
    read = OmegaConf.to_container(OmegaConf.masked_copy(cfg, list(CONFIG_KEYS)), resolve=False)
    interpolations = " ".join(v for v in flatten(read).values() if "${" in v)
    return [k for k in extra if not re.search(rf"\$\{{[^}}]*\b{re.escape(k)}\b", interpolations)]


def override_key(override: str) -> str:
    """`+trainer.epochs=3` -> `trainer.epochs`; `hydra/launcher=joblib` -> `hydra/launcher`."""
    return override.split("=", 1)[0].lstrip("+~")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"dotted.key": "value"}: MLflow's params and the config hash."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat
