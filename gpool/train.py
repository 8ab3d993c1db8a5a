"""`python -m gpool.train [-m] overrides...`: one Hydra job = one training run = one MLflow run.

Its imports are Hydra's and gpool's config alone: `--help` and `--cfg` run without torch or
MLflow, and a training job imports them when it starts (gpool.training)."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from gpool import PROJECT_ROOT
from gpool.config import check_values, register
from gpool.errors import GpoolError

log = logging.getLogger("gpool.train")

register()  # before hydra.main composes: gpool's resolvers, the trainer schema


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="config")
def main(cfg: DictConfig) -> float:
    """Train one model and log it; returns the final validation accuracy (for sweepers)."""
    from mlflow.exceptions import MlflowException

    from gpool.config import build as build_object
    from gpool.engine import Trainer
    from gpool.job import Job
    from gpool.resume import stop_with_launcher
    from gpool.store import redact, store_failed
    from gpool.training import train_group

    check_values(cfg)
    trainer: Trainer = build_object(cfg.trainer)
    job = Job.current(cfg)
    log.info(
        "%s on %s: %s", job.run_name, trainer.device, redact(" ".join(job.hydra.overrides.task))
    )
    try:
        with stop_with_launcher():
            (result,) = train_group([job], trainer)
    except MlflowException as err:
        raise store_failed(err) from None
    if isinstance(result, GpoolError):
        raise result
    return result


if __name__ == "__main__":
    # Run the function of the importable module gpool.train, not of this __main__ copy:
    # launchers that ship jobs to other processes (joblib, submitit) pickle the task
    # function by reference, which only works for a function they can import.
    from gpool.train import main as task

    try:
        task()
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: the run is already marked KILLED
        sys.exit(f"gpool.train: {stop or 'interrupted'}")
