"""gpool: sweeps that answer "global average or global max pooling for my convnet?"."""

import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

#: The checkout that holds conf/ and runs/; outputs land here whatever the job's cwd is.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def threads_per_job() -> int | None:
    """Torch threads for one job so that parallel jobs x threads <= cores.

    A launcher that gives each job `cpus_per_task` (submitit) sets the count; one that runs
    jobs side by side on this machine (joblib's `n_jobs`, -1 = one per core; submitit's
    `array_parallelism`) shares the cores among them; with jobs one after another (the
    basic launcher), None keeps torch's default.
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


# Registered on import so that these resolve for `gpool.train` and for tests that compose
# the config with hydra.compose.
OmegaConf.register_new_resolver("gpool.root", lambda: str(PROJECT_ROOT), replace=True)
OmegaConf.register_new_resolver("gpool.threads", threads_per_job, replace=True)


def pooled_channels(model: DictConfig, classes: int) -> int:
    """The maps a pool head sees (conf/pool/attention.yaml): one per class, or the
    backbone's feature maps (a PooledNet's `channels`; the convnet's last width)."""
    if model.pool_position == "class_maps":
        return classes
    return model.channels if "channels" in model else model.widths[-1]


OmegaConf.register_new_resolver("gpool.pooled_channels", pooled_channels, replace=True)


class GpoolError(CompactHydraException):
    """A failure the user can act on (missing data, NaN loss...).

    As a CompactHydraException, Hydra reports it as one message without a traceback, marks
    the job failed, lets the other jobs of a sweep run and exits non-zero.
    """
