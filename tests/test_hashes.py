"""Config hashes pinned as main computed them at 8f6d422 (2026-12-06): a rerun finds a run
of the same config by its hash, so a change of code or layout that moved any of them would
make every store made before train its runs again instead of skipping them."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from gpool.config import compose_config
from gpool.resume import config_hash

PINNED = [
    ((), "da95a6542f67aa13f7b4"),
    (("pool=max", "seed=2"), "958ac186627533e3f791"),
    (("experiment=quick", "pool=max", "seed=1"), "d19ed5bb9b06e7f0f331"),
    (("experiment=article", "pool=max", "seed=2"), "6616de97b8baa4b5be15"),
    # the preset for the article's decided question trains the article's very runs
    (("experiment=article_decide", "pool=max", "seed=2"), "6616de97b8baa4b5be15"),
    (("experiment=tuned", "pool=avg", "optimizer.lr=0.001", "seed=1"), "47417d9bddde6e3d3cfd"),
    # a search's trial, its floats written as the search sweeper writes them (repr)
    (
        (
            "experiment=search",
            "pool=max",
            "optimizer.lr=0.0012345678901234567",
            "optimizer.weight_decay=0.0031622776601683794",
            "seed=0",
        ),
        "6403f92ec93862af75b8",
    ),
    (
        (
            "model=resnet18",
            "experiment=quick",
            "pool=avg",
            "trainer.epochs=1",
            "trainer.limit_train_batches=100",
        ),
        "40aca0627eba9763f813",
    ),
    (
        (
            "pool=gem",
            "model.pool_position=features",
            "dataset.holdout=5000",
            "optimizer=adamw",
            "scheduler=cosine",
        ),
        "c451c81adbf1acab28bc",
    ),
    (
        (
            "pool=lse",
            "optimizer=sgd",
            "scheduler=onecycle",
            "trainer.precision=bf16",
            "trainer.compile=true",
        ),
        "415630884b7273d4f345",
    ),
]


@pytest.mark.parametrize(("overrides", "pinned"), PINNED)
def test_config_hashes_are_the_ones_earlier_stores_hold(
    overrides: tuple[str, ...], pinned: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # dataset.root follows data_dir: the hash of the same data in another folder differs
    monkeypatch.setenv("GPOOL_DATA", "/pinned/data")
    cfg = compose_config(*overrides)
    assert config_hash(OmegaConf.to_container(cfg, resolve=True)) == pinned
