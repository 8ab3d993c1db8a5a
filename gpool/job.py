"""One Hydra job = one run: its config, output folder, run name and config hash, and what
an earlier run of the same config means for it (skip it, resume it, or train it afresh)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from gpool.checkpoint import load_checkpoint
from gpool.config import override_key
from gpool.engine import Trainer
from gpool.names import (
    CHECKPOINT_TAG,
    HASH_TAG,
    SECONDS_TAG,
    SWEPT_KEYS_ENV,
)
from gpool.resume import (
    checkpoint_path,
    config_hash,
    resume_point,
)
from gpool.store import register_job
from gpool.tracking import Tracker, tags_for

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One Hydra job, i.e. one run: its config, its Hydra config (output folder, choices,
    overrides) and what follows from them."""

    cfg: DictConfig
    hydra: DictConfig

    @classmethod
    def current(cls, cfg: DictConfig) -> Job:
        return cls(cfg, HydraConfig.get())

    @cached_property
    def config(self) -> dict[str, Any]:
        return OmegaConf.to_container(self.cfg, resolve=True)

    @cached_property
    def fingerprint(self) -> str:
        return config_hash(self.config)

    @property
    def output_dir(self) -> Path:
        return Path(self.hydra.runtime.output_dir)

    def checkpoint(self, tracking_uri: str, experiment: str) -> Path:
        """Where this job's run keeps the checkpoint it resumes from (see checkpoint_path)."""
        root = Path(self.cfg.checkpoint_dir)
        return checkpoint_path(root, tracking_uri, experiment, self.fingerprint)

    @property
    def run_name(self) -> str:
        """mlflow.run_name, else the head, every other key the sweep varies, and the seed:
        `pool=gem pool.p=3 optimizer.lr=0.003 seed=0`."""
        if self.cfg.mlflow.run_name:
            return self.cfg.mlflow.run_name
        mine = {override_key(o): o for o in self.hydra.overrides.task}
        swept = os.environ.get(SWEPT_KEYS_ENV, "").split()
        varied = [mine[k] for k in swept if k not in ("pool", "seed") and k in mine]
        return " ".join(
            [f"pool={self.hydra.runtime.choices.pool}", *varied, f"seed={self.cfg.seed}"]
        )

    def tracker(
        self,
        client: MlflowClient,
        experiment: str,
        resume: Run | None,
        group: Mapping[str, str],
    ) -> Tracker:
        """This job's run, new or resumed; `group` tags say how it trains (device, threads,
        the fused group)."""
        overrides = list(self.hydra.overrides.task)
        tags = tags_for(dict(self.hydra.runtime.choices), self.cfg.seed, overrides)
        checkpoint = self.checkpoint(client.tracking_uri, experiment)
        tags.update({HASH_TAG: self.fingerprint, CHECKPOINT_TAG: str(checkpoint), **group})
        resume_id = resume.info.run_id if resume is not None else None
        earlier = float(resume.data.tags.get(SECONDS_TAG, 0)) if resume is not None else 0.0
        system_metrics = self.cfg.mlflow.system_metrics
        return Tracker(
            client, experiment, self.run_name, self.config, tags, resume_id, system_metrics, earlier
        )

    def skip(self, client: MlflowClient, finished: Run) -> float:
        """This config already FINISHED: count that run in this sweep, train nothing."""
        log.info(
            "skipping %s: this config already FINISHED as MLflow run %s "
            "(trainer.resume=false trains it again)",
            self.run_name,
            finished.info.run_id,
        )
        register_job(client, self.fingerprint, finished.info.run_id)
        return finished.data.metrics.get("val_acc", float("nan"))


@dataclass
class Resumed:
    """A job to train, and the earlier run and checkpoint it continues, if any."""

    job: Job
    run: Run | None = None
    checkpoint: dict[str, Any] | None = None

    @property
    def epoch(self) -> int:
        return self.checkpoint["epoch"] if self.checkpoint is not None else 0


def plan(
    jobs: list[Job],
    client: MlflowClient,
    experiment: str,
    trainer: Trainer,
    stop: Callable[[str], None] | None = None,
) -> tuple[dict[int, float], list[tuple[int, Resumed]]]:
    """For each job: skip it (its FINISHED run's val_acc), or train it, fresh or from its
    checkpoint; a config another command trains now is waited for (resume_point, asking
    `stop`). Call with every job's claim held."""
    skipped: dict[int, float] = {}
    todo: list[tuple[int, Resumed]] = []
    for i, job in enumerate(jobs):
        checkpoint = job.checkpoint(client.tracking_uri, experiment)
        run, path = (
            resume_point(client, experiment, job.fingerprint, checkpoint, stop)
            if trainer.resume
            else (None, None)
        )
        if run is not None and path is None:
            skipped[i] = job.skip(client, run)
        elif run is not None:
            todo.append(
                (i, Resumed(job, run, load_checkpoint(path, run.info.run_id, job.fingerprint)))
            )
        else:
            todo.append((i, Resumed(job)))
    return skipped, todo
