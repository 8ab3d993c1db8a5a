"""Whether and how a sweep's jobs train fused (hydra/launcher=fused and auto,
hydra_plugins/gpool_fused): what keeps a group apart, why a sweep should not fuse by
default, and one group's training, as one stacked model or job by job. Imported where a
sweep launches, not by Hydra's plugin scan: it needs torch."""

from __future__ import annotations

import logging

import torch
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from gpool.config import build as build_object
from gpool.job import Job
from gpool.model import build_model, kept_buffers
from gpool.store import store_failed
from gpool.training import train_group

log = logging.getLogger(__name__)


#: Optimisers whose update is elementwise with one shared step count.
ELEMENTWISE = ("torch.optim.Adam", "torch.optim.AdamW", "torch.optim.SGD")


def apart(cfg: DictConfig) -> str | None:
    """Why a group's jobs cannot train as one model (None: they can)."""
    if cfg.optimizer._target_ not in ELEMENTWISE:
        return f"optimizer {cfg.optimizer._target_} does not update elementwise"
    if kept := kept_buffers(build_model(cfg)):
        return (
            f"model {cfg.model._target_} keeps buffers besides its weights ({kept[0]}...: "
            "BatchNorm's running statistics), which a stack cannot hold per member"
        )
    return None


def fusing_blockers(device: str) -> list[str]:
    """Why a sweep on trainer.device=`device` should not fuse its jobs by default (empty:
    it should). Fusing pays on a GPU, where one small run leaves it idle between kernel
    launches; on a 2-core CPU a fused group measured 0.60x the throughput of one run at a
    time."""
    if device != "auto" and not device.startswith("cuda"):
        return [f"trainer.device={device}"]
    if not torch.cuda.is_available():
        return ["torch sees no CUDA GPU here, and on a CPU fusing does not pay"]
    return []


def reasons_against_fusing(config: DictConfig) -> list[str]:
    """Why a sweep with this config runs its jobs one after another (empty: it fuses)."""
    reasons = fusing_blockers(str(config.trainer.device))
    if config.hydra.sweeper.get("max_batch_size"):
        reasons.append("hydra.sweeper.max_batch_size hands the launcher the sweep in batches")
    return reasons


def train_fused(jobs: list[Job]) -> list[float | Exception]:
    """Train one group: as one model when it can be, else job by job; each job's final
    val acc, or the error that failed it."""
    cfg = jobs[0].cfg
    try:
        trainer = build_object(cfg.trainer)
        if len(jobs) > 1 and (reason := apart(cfg)):
            log.info("%s: its %d jobs train one by one", reason, len(jobs))
            return [outcome for job in jobs for outcome in train_group([job], trainer)]
        log.info(
            "training %d jobs as one model: %s", len(jobs), ", ".join(j.run_name for j in jobs)
        )
        return train_group(jobs, trainer)
    except MlflowException as error:  # the store broke: one line for each job
        return [store_failed(error)] * len(jobs)
    except Exception as error:  # the whole group failed (bad data, a bug): each job says so
        return [error] * len(jobs)
