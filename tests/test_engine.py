"""The training engine on generated IDX data: determinism, learning, schedules, NaN handling."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from gpool.build import start
from gpool.config import compose_config as make_cfg
from gpool.cuda_graph import LiveValues, blockers, cycles_momentum
from gpool.engine import NonFiniteLossError, Trainer, seed_everything
from gpool.errors import GpoolError
from gpool.images import ImageData
from gpool.model import build_model
from gpool.state import EpochResult


@pytest.fixture
def data(idx_root: Path) -> ImageData:
    return instantiate(make_cfg().dataset, root=str(idx_root), checksums=None).load("cpu")


def train(
    data: ImageData, seed: int = 0, *overrides: str, lr: float = 3e-3, scheduler=None, **trainer
) -> tuple[list[EpochResult], torch.nn.Module, Trainer]:
    cfg = make_cfg(*overrides)
    seed_everything(seed)
    options = dict(epochs=2, batch_size=64, log_every_n_steps=2, device="cpu") | trainer
    engine = Trainer(**options)
    model = engine.prepare(build_model(cfg))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    interval = "step" if scheduler is not None else "epoch"
    state = engine.start(model, optimizer, data, [("", seed)], scheduler, interval)
    engine.fit(state, data)
    return state.members[0].history, model, engine


def measured(history: list[EpochResult]) -> list[tuple]:
    """Everything an epoch measured except its wall time."""
    return [
        (r.epoch, r.train_loss, r.train_acc, r.val_loss, r.val_acc, r.lr, r.step_losses)
        for r in history
    ]


def test_same_seed_gives_identical_metrics(data: ImageData) -> None:
    first, model_a, _ = train(data, 7)
    second, model_b, _ = train(data, 7)
    assert measured(first) == measured(second)  # every metric and step loss, bit for bit
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other, _, _ = train(data, 8)
    assert [r.train_loss for r in other] != [r.train_loss for r in first]


def test_training_learns_the_generated_task(data: ImageData) -> None:
    history, _, _ = train(data, 0, epochs=6)
    assert history[-1].train_loss < history[0].train_loss
    assert history[-1].val_acc > 0.5  # chance is 0.1


def test_epoch_results_and_step_sampling(data: ImageData) -> None:
    history, _, engine = train(
        data, 0, epochs=2, limit_train_batches=5, limit_val_batches=1, eval_batch_size=100
    )
    assert engine.steps_per_epoch(data) == 5
    assert [r.epoch for r in history] == [1, 2]
    assert [s for s, _ in history[0].step_losses] == [2, 4]
    assert [s for s, _ in history[1].step_losses] == [6, 8, 10]
    seen = 5 * 64
    for r in history:
        assert r.epoch_seconds > 0
        assert (r.train_acc * seen) == pytest.approx(round(r.train_acc * seen))  # a count / 320
        assert r.lr == pytest.approx(3e-3)
        assert set(r.metrics()) == {
            "train_loss",
            "train_acc",
            "val_loss",
            "val_acc",
            "lr",
            "epoch_seconds",
        }
        assert (r.val_acc * 100) == pytest.approx(round(r.val_acc * 100))  # 100 val images


def test_train_eval_pass_reports_a_full_pass_with_final_weights(data: ImageData) -> None:
    history, model, engine = train(data, 0, train_eval_pass=True)
    assert [(history[-1].train_loss, history[-1].train_acc)] == engine.evaluate(
        model, data, data.train
    )


def test_per_step_one_cycle_schedule_runs_to_its_end(data: ImageData) -> None:
    scheduler = partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=3e-3, epochs=2)
    history, _, _ = train(data, 0, scheduler=scheduler)
    assert history[0].lr == pytest.approx(3e-3 / 25)  # OneCycle starts at max_lr / div_factor
    assert history[1].lr > history[0].lr  # mid-cycle


def test_nan_loss_stops_the_run_with_a_clear_error(data: ImageData) -> None:
    with pytest.raises(NonFiniteLossError, match="training loss became nan in epoch 1"):
        train(data, 0, lr=1e12)


def test_sigmoid_article_protocol_trains(data: ImageData) -> None:
    history, model, _ = train(
        data, 0, "experiment=article", train_eval_pass=True, shuffle=False, init="xavier"
    )
    assert model.output_activation == "sigmoid"
    bias = model.classifier.bias.detach()
    assert history[-1].train_loss > 1.4  # CE over sigmoid outputs cannot go below ~1.46
    assert not torch.allclose(bias, torch.full_like(bias, 0.01))  # xavier init, then trained


def test_bf16_autocast_path_trains(data: ImageData) -> None:
    history, model, engine = train(data, 0, precision="bf16")
    assert engine.autocast().fast_dtype == torch.bfloat16
    assert all(math.isfinite(r.train_loss) for r in history)
    assert history[-1].train_loss < history[0].train_loss
    assert next(model.parameters()).dtype == torch.float32  # weights stay fp32 under autocast


def test_values_no_run_can_use_are_refused() -> None:
    with pytest.raises(GpoolError, match="trainer.precision must be"):
        Trainer(epochs=1, precision="fp8")
    with pytest.raises(GpoolError, match="trainer.epochs must be >= 1, not 0"):
        Trainer(epochs=0)
    with pytest.raises(GpoolError, match="trainer.limit_val_batches must be >= 1, not -2"):
        Trainer(epochs=1, limit_val_batches=-2)


@pytest.mark.slow
def test_compiled_model_matches_eager_closely(data: ImageData) -> None:
    eager, _, _ = train(data, 3, epochs=1, limit_train_batches=4)
    compiled, model, _ = train(data, 3, epochs=1, limit_train_batches=4, compile=True)
    assert "classifier.weight" in model.state_dict()  # the plain model, no _orig_mod prefix
    assert compiled[0].train_loss == pytest.approx(eager[0].train_loss, rel=1e-3)


def test_the_quick_recipe_has_no_reason_against_capture_but_the_device(data: ImageData) -> None:
    cfg = make_cfg("experiment=quick", "trainer.device=cpu")
    trainer: Trainer = instantiate(cfg.trainer)
    state = start(trainer, data, [cfg])
    assert cycles_momentum(state.scheduler)  # one-cycle cycles beta1, and still:
    assert blockers(torch.device("cpu"), None, state) == ["the device is cpu, not CUDA"]
    assert blockers(torch.device("cuda"), None, state) == []


def test_live_values_are_tensors_in_a_pass_and_numbers_between(data: ImageData) -> None:
    """What a captured step reads (gpool.cuda_graph.LiveValues), stepped eagerly on the CPU:
    one-cycle's lr and beta1 reach the tensors at every step, so the run trains what a
    plain run trains; between passes the optimiser, what a checkpoint saves, holds numbers."""
    x, y = data.batch(data.train, torch.arange(64))

    def run(live: bool) -> tuple[list[tuple[float, float]], torch.nn.Module, torch.optim.Adam]:
        seed_everything(0)
        model = build_model(make_cfg())
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=20)
        values = LiveValues(optimizer, torch.device("cpu"), cycles_momentum(scheduler))
        seen, group = [], optimizer.param_groups[0]
        for step in range(20):
            if live and step % 10 == 0:  # two passes of ten steps
                values.install()
            if live:
                values.follow()
                assert isinstance(group["lr"], torch.Tensor) and not group["foreach"]
                assert isinstance(group["betas"][0], torch.Tensor)
                seen.append((values.lrs[0].item(), values.beta1s[0].item()))
            else:
                seen.append((group["lr"], group["betas"][0]))
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            scheduler.step()
            if live and step % 10 == 9:
                values.uninstall()
                saved = optimizer.state_dict()["param_groups"][0]
                assert all(type(v) is float for v in (saved["lr"], *saved["betas"]))
        return seen, model, optimizer

    plain, live = run(False), run(True)
    assert len({beta1 for _, beta1 in plain[0]}) > 5  # beta1 did cycle
    assert np.allclose(live[0], plain[0], rtol=1e-6)
    # The steps read the tensors: weights end where the plain run's do. Not bit for bit: beta1
    # as a float32 tensor alone moves single weights by up to 1e-3 after 20 steps on one batch
    # (measured: as much as rounding the plain run's beta1 to float32), a few % of their size.
    for p, q in zip(live[1].parameters(), plain[1].parameters(), strict=True):
        assert (p - q).abs().mean() <= 0.02 * q.abs().mean()
    assert live[2].param_groups[0]["foreach"] == plain[2].param_groups[0]["foreach"]


def test_a_model_with_batchnorm_is_not_captured(data: ImageData) -> None:
    """Its running statistics would count the padding of an epoch's last batch."""
    cfg = make_cfg("model=resnet18", "trainer.device=cpu")
    state = start(instantiate(cfg.trainer), data, [cfg])
    (reason,) = blockers(torch.device("cuda"), None, state)
    assert reason.startswith("the model keeps buffers (features.bn1.running_mean...: BatchNorm)")
