"""What a checkpoint holds and how a run writes, checks and restores it.

A checkpoint holds tensors and plain Python data only, and is read with
`torch.load(weights_only=True)`, so no file, whoever wrote it, can run code when loaded. It
must also record the MLflow run id and config hash of the run that resumes from it. Where it
lies follows from the job alone (gpool.resume.checkpoint_path).
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim import Optimizer

from gpool.errors import GpoolError
from gpool.stacking import StackedModel
from gpool.state import EpochResult, TrainState


class CheckpointError(GpoolError):
    """A checkpoint cannot be read or belongs to another run; the message names the fix."""


# --- checkpoints --------------------------------------------------------------------------

#: Optimiser state that all members of a stack share (one step count); every other slot
#: (Adam's moments, SGD's momentum) holds one slice per member, even for a 0-dim parameter.
SHARED_SLOTS = ("step",)


def member_parts(state: TrainState, n: int) -> dict[str, Any]:
    """Member n's weights and optimiser state as its own run would hold them, whether it
    trains alone or stacked with others (so it can resume either way)."""
    if not isinstance(state.model, StackedModel):
        return {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict()}
    placed = state.model.placed(n)
    full = state.optimizer.state_dict()
    index = {id(p): i for i, p in enumerate(state.optimizer.param_groups[0]["params"])}
    slots = {}
    for i, (_, weight, j) in enumerate(placed):
        if (slot := full["state"].get(index[id(weight)])) is not None:
            slots[i] = {
                k: v.clone() if k in SHARED_SLOTS else v[j].clone() for k, v in slot.items()
            }
    group = {k: v for k, v in full["param_groups"][0].items() if k != "params"}
    group["params"] = list(range(len(placed)))
    model = state.model.state_of(n)
    return {"model": model, "optimizer": {"state": slots, "param_groups": [group]}}


def save_checkpoint(path: Path, state: TrainState, n: int, meta: Mapping[str, str]) -> None:
    """Everything member n needs to continue bit for bit, as tensors and plain data:
    weights, optimiser and scheduler state, its shuffling generator, the global RNGs and
    its epochs so far. Written to a temporary file and renamed, so a kill mid-write leaves
    the previous checkpoint intact; a failed write (a full disk) leaves no temporary file."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    member = state.members[n]
    payload = {
        **member_parts(state, n),
        "epoch": len(member.history),
        "history": [asdict(r) for r in member.history],
        "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
        "generator": member.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy_rng": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "python_rng": random.getstate(),
        "meta": dict(meta),
    }
    partial = path.with_name(f"{path.name}.tmp")
    try:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        torch.save(payload, partial)
        os.replace(partial, path)
    except (OSError, RuntimeError) as err:  # torch's zip writer reports a full disk as either
        partial.unlink(missing_ok=True)
        reason = getattr(err, "strerror", None) or "write failed"
        free = shutil.disk_usage(path.parent).free
        raise CheckpointError(
            f"cannot write the checkpoint {path} ({reason}; {free:,} bytes free there); free "
            "space or choose another output folder (hydra.run.dir / hydra.sweep.dir)"
        ) from None


def load_checkpoint(path: Path, run_id: str, fingerprint: str) -> dict[str, Any]:
    """Read the checkpoint of MLflow run `run_id` with config hash `fingerprint`.

    Weights-only loading: a file holding anything but tensors and plain data is refused,
    never executed. A file that records another run or config is refused too.
    """
    fix = "delete it, or pass trainer.resume=false to train this config again in a new run"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        meta = state["meta"]
    except Exception as err:  # unpickling errors, truncation, wrong layout: all unusable
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {first_line}); {fix}"
        ) from None
    if meta.get("mlflow_run_id") != run_id or meta.get("config_hash") != fingerprint:
        raise CheckpointError(
            f"checkpoint {path} records run {meta.get('mlflow_run_id')} and config "
            f"{meta.get('config_hash')}, not run {run_id} with config {fingerprint}; {fix}"
        )
    return state


def restore(checkpoints: Sequence[Mapping[str, Any]], state: TrainState) -> None:
    """Load each member's checkpoint into live training state, before training continues.
    Members that train together resume from the same epoch: the optimiser's step count and
    the scheduler are shared."""
    model, first = state.model, checkpoints[0]
    if isinstance(model, StackedModel):
        load_stacked(checkpoints, model, state.optimizer)
    else:
        model.load_state_dict(first["model"])
        state.optimizer.load_state_dict(first["optimizer"])
    if state.scheduler is not None:
        state.scheduler.load_state_dict(first["scheduler"])
    for member, checkpoint in zip(state.members, checkpoints, strict=True):
        member.generator.set_state(checkpoint["generator"])
        member.history[:] = [
            EpochResult(**{**r, "step_losses": [tuple(s) for s in r["step_losses"]]})
            for r in checkpoint["history"]
        ]
    torch.set_rng_state(first["torch_rng"])
    if first["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(first["cuda_rng"])
    kind, keys, position, has_gauss, cached = first["numpy_rng"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    random.setstate(first["python_rng"])


def load_stacked(
    checkpoints: Sequence[Mapping[str, Any]], model: StackedModel, optimizer: Optimizer
) -> None:
    """Put the members' weights and optimiser slots back into a StackedModel's stacks,
    each into its own slice."""
    full = optimizer.state_dict()
    index = {id(p): i for i, p in enumerate(optimizer.param_groups[0]["params"])}
    for n, checkpoint in enumerate(checkpoints):
        for i, (name, weight, j) in enumerate(model.placed(n)):
            with torch.no_grad():
                weight[j].copy_(checkpoint["model"][name])
            if (slot := checkpoint["optimizer"]["state"].get(i)) is None:
                continue
            stacked = full["state"].setdefault(index[id(weight)], {})
            for k, v in slot.items():
                if k in SHARED_SLOTS:
                    stacked[k] = v.clone()
                else:
                    stacked.setdefault(k, v.new_zeros((weight.shape[0], *v.shape)))[j] = v
    optimizer.load_state_dict(full)
