"""trainer.cuda_graph on a GPU: captured steps train what eager steps train (TF32 off), for
one model and a fused group, with schedulers, a resume after capture and a NaN; `auto`
says why it stays eager. Skipped without CUDA; the CPU side is in test_hardening."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import run_gpool, write_split
from hydra.utils import instantiate

from gpool.build import start
from gpool.checkpoint import load_checkpoint, restore, save_checkpoint
from gpool.config import build, compose_config
from gpool.engine import NonFiniteLossError, Trainer
from gpool.errors import GpoolError
from gpool.images import ImageData
from gpool.state import TrainState

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: 1000 training images: 15 batches of 64 and a short one of 40, which the graph pads.
TRAIN_IMAGES = 1000


@pytest.fixture(scope="module")
def ragged_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ragged")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    write_split(raw, "train", TRAIN_IMAGES, seed=3)
    write_split(raw, "test", 300, seed=4)
    return root


@pytest.fixture(autouse=True)
def exact_float32() -> None:
    """TF32 off, so that eager and graphed kernels differ only in summation order."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def load(root: Path, device: str = "cuda") -> ImageData:
    return instantiate(compose_config().dataset, root=str(root), checksums=None).load(device)


def begin(
    data: ImageData, graph: str, runs: list[tuple[str, int]], *overrides: str
) -> tuple[Trainer, TrainState]:
    """The state of runs (pool, seed) trained as one group, steps captured or not."""
    configs = [
        compose_config(
            f"pool={pool}",
            f"seed={seed}",
            f"trainer.device={data.train.images.device.type}",
            f"trainer.cuda_graph={graph}",
            "trainer.log_every_n_steps=5",
            *overrides,
        )
        for pool, seed in runs
    ]
    trainer: Trainer = build(configs[0].trainer)
    names = [f"{p}{s}" for p, s in runs] if len(runs) > 1 else None
    return trainer, start(trainer, data, configs, names)


def close(graphed: TrainState, eager: TrainState) -> None:
    for g, e in zip(graphed.members, eager.members, strict=True):
        assert [r.epoch for r in g.history] == [r.epoch for r in e.history]
        for a, b in zip(g.history, e.history, strict=True):
            assert a.lr == pytest.approx(b.lr, rel=1e-6)
            for key in ("train_loss", "val_loss"):
                assert getattr(a, key) == pytest.approx(getattr(b, key), rel=5e-3), key
            # Near chance, at one-cycle's peak lr, last-bit differences flip argmaxes: on an
            # H200 13 of 1000 images (0.146 vs 0.159) while the losses agreed to 2e-3.
            for key in ("train_acc", "val_acc"):
                assert getattr(a, key) == pytest.approx(getattr(b, key), abs=3e-2), key
            assert [s for s, _ in a.step_losses] == [s for s, _ in b.step_losses]
            losses = [loss for _, loss in b.step_losses]
            assert [loss for _, loss in a.step_losses] == pytest.approx(losses, rel=5e-3)
    # Adam scales every update to about lr, so single weights whose gradients differ in
    # their last bits drift by up to lr per step; on average they stay put.
    for p, q in zip(graphed.model.parameters(), eager.model.parameters(), strict=True):
        assert (p - q).abs().mean() <= 0.02 * q.abs().mean()


@pytest.mark.parametrize(
    ("runs", "overrides"),
    [
        ([("avg", 0)], ("trainer.epochs=3",)),
        ([("max", 1)], ("experiment=article", "trainer.epochs=3")),
        (
            [("avg", 0), ("avg", 1), ("max", 0), ("max", 1)],
            ("scheduler=cosine", "trainer.epochs=3"),
        ),
        (
            [("gem", 0), ("attention", 0)],
            ("experiment=quick", "trainer.epochs=3"),
        ),
    ],
    ids=["one run", "article protocol", "fused, cosine per epoch", "one-cycle lr and beta1"],
)
def test_captured_steps_train_what_eager_steps_train(
    ragged_root: Path, runs: list[tuple[str, int]], overrides: tuple[str, ...]
) -> None:
    data = load(ragged_root)
    graph_trainer, graphed = begin(data, "true", runs, *overrides)
    eager_trainer, eager = begin(data, "false", runs, *overrides)
    assert graphed.cuda_graph and not eager.cuda_graph
    graph_trainer.fit(graphed, data)
    eager_trainer.fit(eager, data)
    close(graphed, eager)
    group = graphed.optimizer.param_groups[0]  # the eager form between passes:
    assert isinstance(group["lr"], float) and not group["capturable"]
    assert all(isinstance(beta, float) for beta in group["betas"])


def test_a_resume_after_capture_continues_like_one_run(tmp_path: Path, ragged_root: Path) -> None:
    data = load(ragged_root)
    runs = [("avg", 0), ("max", 0)]
    trainer, whole = begin(data, "true", runs, "trainer.epochs=3")
    trainer.fit(whole, data)
    trainer, first = begin(data, "true", runs, "trainer.epochs=2")
    trainer.fit(first, data)
    meta = {"mlflow_run_id": "run", "config_hash": "hash"}
    paths = [tmp_path / f"{n}.pt" for n in range(2)]
    for n, path in enumerate(paths):
        save_checkpoint(path, first, n, meta)
    saved = [load_checkpoint(path, "run", "hash") for path in paths]
    assert not saved[0]["optimizer"]["param_groups"][0]["capturable"]
    trainer, resumed = begin(data, "true", runs, "trainer.epochs=3")
    restore(saved, resumed)  # restored first, captured in fit
    trainer.fit(resumed, data)
    close(resumed, whole)
    # A graphed run's checkpoint resumes eagerly on the CPU too.
    cpu = load(ragged_root, "cpu")
    trainer, alone = begin(cpu, "auto", runs[:1], "trainer.epochs=3")
    restore(saved[:1], alone)
    trainer.fit(alone, cpu)
    assert [r.epoch for r in alone.members[0].history] == [1, 2, 3]
    assert alone.members[0].history[2].val_acc == pytest.approx(
        whole.members[0].history[2].val_acc, abs=0.02
    )


def test_auto_says_why_it_stays_eager_and_true_refuses(
    ragged_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = load(ragged_root)
    with caplog.at_level(logging.INFO, logger="gpool.engine"):
        _, state = begin(data, "auto", [("avg", 0)], "optimizer=sgd")
    assert not state.cuda_graph
    assert "not as a CUDA graph: optimizer SGD is not Adam or AdamW" in caplog.text
    with pytest.raises(GpoolError, match="trainer.cuda_graph=true, but trainer.compile is set"):
        begin(data, "true", [("avg", 0)], "trainer.compile=true")
    for recipe in ((), ("experiment=quick",)):  # one-cycle's beta1 is captured too
        _, state = begin(data, "auto", [("avg", 0)], *recipe)
        assert state.cuda_graph


def test_a_nan_in_a_captured_step_fails_the_run(ragged_root: Path) -> None:
    data = load(ragged_root)
    trainer, state = begin(data, "true", [("avg", 0)], "optimizer.lr=1e12", "trainer.epochs=2")
    with pytest.raises(NonFiniteLossError, match="training loss became nan in epoch 1"):
        trainer.fit(state, data)


def test_the_default_sweep_on_the_gpu_fuses_and_captures_its_steps(
    tmp_path: Path, ragged_root: Path
) -> None:
    """No launcher named: gpool's default (hydra/launcher=auto) fuses on a GPU."""
    sweep = ("pool=avg,max", "seed=0,1", "experiment=quick", "trainer.epochs=2")
    proc = run_gpool(tmp_path, ragged_root, *sweep, multirun=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "train fused, on the GPU" in output and "training 4 jobs as one model" in output
    assert output.count("capturing the training step as a CUDA graph") == 1  # one group
