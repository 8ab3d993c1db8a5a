"""The training state of runs before their first epoch: each network seeded and
initialised as its own run would be, several stacked into one model (a fused group), one
optimiser over all; and a member's network back out of a stack. Shared by training, the
bench (gpool.bench)."""

from __future__ import annotations

import logging

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn

from gpool.checkpoint import member_parts
from gpool.engine import Trainer, seed_everything
from gpool.errors import GpoolError
from gpool.images import ImageData
from gpool.model import build_model
from gpool.stacking import StackedModel
from gpool.state import TrainState

log = logging.getLogger(__name__)


def member_network(state: TrainState, n: int, cfg: DictConfig, trainer: Trainer) -> nn.Module:
    """Member n's network as its own run would hold it (a copy, when stacked)."""
    if not isinstance(state.model, StackedModel):
        return state.model
    with torch.random.fork_rng(devices=[]):  # drawing initial weights leaves the RNG as it was
        model = trainer.prepare(build_model(cfg))
    model.load_state_dict(member_parts(state, n)["model"])
    return model


def network(cfg: DictConfig, trainer: Trainer) -> nn.Module:
    """The network of one run, seeded and initialised as its own run would be."""
    seed_everything(cfg.seed)
    return trainer.prepare(build_model(cfg))


class FusingFailed(GpoolError):
    """Several runs' networks could not be stacked into one model: they train one by one."""


def stacked(networks: list[nn.Module], probe: Tensor, device: torch.device) -> StackedModel:
    """The networks as one StackedModel on `device`, tried on the images `probe` (each
    member on them) in eval mode: a stack that cannot be built or run is FusingFailed,
    found before any run is made."""
    try:
        model = StackedModel(networks).to(device)
        model.eval()
        with torch.no_grad():
            model(probe.repeat(len(networks), *[1] * (probe.ndim - 1)))
        model.train()
    except (RuntimeError, ValueError, TypeError) as err:
        why = str(err).strip().splitlines()[0][:300]
        raise FusingFailed(f"{type(err).__name__}: {why}") from err
    return model


def start(
    trainer: Trainer, data: ImageData, configs: list[DictConfig], names: list[str] | None = None
) -> TrainState:
    """The training state of runs with these configs before epoch 1: one network, or a
    StackedModel of several, each initialised exactly as its own run would be; one
    optimiser over all. `names` label the members in the log."""
    networks = [network(cfg, trainer) for cfg in configs]
    probe, _ = data.batch(data.train, torch.arange(min(2, len(data.train)), device=trainer.device))
    networks[0].check_features(probe)  # every member shares its trunk (StackedModel)
    model = networks[0] if len(networks) == 1 else stacked(networks, probe, trainer.device)
    cfg = configs[0]
    try:
        optimizer = instantiate(cfg.optimizer)(model.parameters())
    except (TypeError, ValueError) as err:  # torch's checks of lr, betas, momentum...
        raise GpoolError(f"optimizer: {err}") from None
    seeds = [(name, c.seed) for name, c in zip(names or [""] * len(configs), configs, strict=True)]
    scheduler = instantiate(cfg.scheduler.lr_scheduler)
    return trainer.start(model, optimizer, data, seeds, scheduler, cfg.scheduler.interval)
