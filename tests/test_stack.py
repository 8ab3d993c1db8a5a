"""gpool.stacking.StackedModel on the CPU, in-process: one trunk for every member whatever its
head, each member's gradients, checkpoints and convolutions as its own run's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import options
from hydra.utils import instantiate

from gpool.bench import cli as bench
from gpool.bench.profile import KINDS, profile_step, training_step
from gpool.build import start
from gpool.checkpoint import load_checkpoint, member_parts, restore, save_checkpoint
from gpool.config import build, compose_config
from gpool.engine import Trainer, seed_everything
from gpool.images import ImageData
from gpool.model import build_model
from gpool.stacking import StackedModel


@pytest.fixture
def data(idx_root: Path) -> ImageData:
    return instantiate(compose_config().dataset, root=str(idx_root), checksums=None).load("cpu")


def mixed_networks(position: str, order: str) -> list[tuple[str, torch.nn.Module]]:
    """Two seeds of every head in float64, each head's members next to each other or
    interleaved (the order a sweep `seed=0,1 pool=...` gives its jobs)."""
    pools, seeds = options("pool"), (0, 1)
    runs = [(p, s) for p in pools for s in seeds]
    if order == "interleaved":
        runs = [(p, s) for s in seeds for p in pools]
    networks = []
    for pool, seed in runs:
        seed_everything(seed)
        cfg = compose_config(f"pool={pool}", f"model.pool_position={position}")
        networks.append((pool, build_model(cfg).double()))
    return networks


@pytest.mark.parametrize("order", ["grouped", "interleaved"])
@pytest.mark.parametrize("position", ["class_maps", "features"])
def test_one_step_of_a_stack_has_each_runs_own_gradients(position: str, order: str) -> None:
    """Every head in one stack, in float64, so that float32 rounding cannot hide a wrong
    grouping or a member's maps sent to another member's head."""
    networks = mixed_networks(position, order)
    stacked, size = StackedModel([net for _, net in networks]), len(networks)
    assert len(stacked.heads) == len(options("pool"))  # one stack per kind of head
    x = torch.randn(size * 8, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (size * 8,))
    F.cross_entropy(stacked(x), y, reduction="none").view(size, 8).mean(1).sum().backward()
    for n, (pool, network) in enumerate(networks):
        F.cross_entropy(network(x[8 * n : 8 * (n + 1)]), y[8 * n : 8 * (n + 1)]).backward()
        own = dict(network.named_parameters())
        assert [name for name, _, _ in stacked.placed(n)] == list(own)
        scale = max(p.grad.abs().max() for p in network.parameters())  # this run's gradient
        for name, weight, j in stacked.placed(n):
            assert (weight.grad[j] - own[name].grad).abs().max() / scale < 1e-9, (pool, name)


def group(pools: tuple[str, ...], seeds: int, *overrides: str) -> list:
    """The configs of every head with `seeds` seeds, seed by seed (heads interleaved)."""
    return [
        compose_config(f"pool={p}", f"seed={s}", "trainer.device=cpu", *overrides)
        for s in range(seeds)
        for p in pools
    ]


def same(a: object, b: object) -> bool:
    """Nested checkpoint parts equal, tensors exactly."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    return a == b


def test_a_members_checkpoint_is_its_own_runs_and_restores_in_any_order(
    data: ImageData, tmp_path: Path
) -> None:
    """Heads with parameters (GeM's 0-dim p), a scoring conv, a linear layer and none."""
    configs = group(("gem", "attention", "catavgmax", "avg"), 2, "trainer.limit_train_batches=3")
    trainer: Trainer = build(configs[0].trainer, epochs=1)
    names = [str(n) for n in range(len(configs))]
    trained = start(trainer, data, configs, names)
    trainer.fit(trained, data)
    parts = [member_parts(trained, n) for n in range(len(configs))]
    for cfg, part in zip(configs, parts, strict=True):  # what a lone run loads, strictly
        alone = start(trainer, data, [cfg])
        alone.model.load_state_dict(part["model"])
        alone.optimizer.load_state_dict(part["optimizer"])
        for p in alone.model.parameters():
            assert all(
                v.shape == p.shape for k, v in alone.optimizer.state[p].items() if k != "step"
            )
    meta = {"mlflow_run_id": "run", "config_hash": "hash"}
    for n in range(len(configs)):
        save_checkpoint(tmp_path / f"{n}.pt", trained, n, meta)
    back = list(reversed(range(len(configs))))  # another order: other slices of the stacks
    again = start(trainer, data, [configs[n] for n in back], names)
    restore([load_checkpoint(tmp_path / f"{n}.pt", "run", "hash") for n in back], again)
    for i, n in enumerate(back):
        assert same(member_parts(again, i), parts[n]), configs[n].pool._target_


def convolutions(data: ImageData, pools: tuple[str, ...], seeds: int) -> tuple[int, int]:
    """Convolution calls (forward, backward) in one fused step of these heads and seeds."""
    configs = group(pools, seeds, "trainer.batch_size=8")  # counts, not speed: small batches
    counted = profile_step(training_step(build(configs[0].trainer), data, configs))
    return counted["convolution forward"][0], counted["convolution backward"][0]


def test_a_fused_step_runs_one_set_of_convolutions_whatever_the_heads(data: ImageData) -> None:
    network = build_model(compose_config())
    layers = sum(isinstance(m, torch.nn.Conv2d) for m in network.modules())
    one = convolutions(data, ("avg",), 1)
    assert one == (layers, layers)  # one run: each conv once forward, once backward
    heads = tuple(p for p in options("pool") if p != "attention")
    assert convolutions(data, heads, 2) == one  # 12 members of 6 heads: the same calls
    # Attention pooling adds its own 1x1 scoring conv: one for all of its members.
    assert convolutions(data, tuple(options("pool")), 2) == (layers + 1, layers + 1)


def test_bench_profile_prints_a_row_per_group(
    idx_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = (f"dataset.root={idx_root}", "dataset.checksums=null", "trainer.batch_size=8")
    assert bench.main(["--profile", "--device", "cpu", *data]) is None
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    header, *groups = rows
    assert header.split(" | ")[1:-1] == list(KINDS)
    assert [row.split(" | ")[0] for row in groups] == [
        "| 1 (1 head x 1)",
        "| 6 (2 heads x 3)",
        "| 35 (7 heads x 5)",
    ]
    # 35 members of 7 heads: one run's convolutions and the attention head's scoring conv.
    one, _, every = (row.split(" | ")[1] for row in groups)
    assert int(every.split(" / ")[0]) == int(one.split(" / ")[0]) + 1
