"""Every config group option composes with Hydra and builds its object."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import options
from hydra.utils import instantiate
from omegaconf import OmegaConf

import gpool
from gpool.compare.cli import arguments as compare_arguments
from gpool.config import CONF_DIR, CONFIG_KEYS, GROUPS, check_values, unread_keys
from gpool.config import compose_config as make_cfg
from gpool.data import ImageFolderImages, TorchvisionImages
from gpool.engine import Trainer
from gpool.errors import GpoolError
from gpool.fusing import reasons_against_fusing
from gpool.model import build_model
from gpool.pooling import GlobalAvgPool, GlobalMaxPool
from gpool.resume import config_hash
from gpool.sweep import sweep_key, swept_keys
from gpool.tasks import DerivedImages


def test_defaults_are_the_articles_network_and_optimiser() -> None:
    cfg = make_cfg()
    assert cfg.seed == 0
    assert cfg.optimizer.lr == 3e-4 and cfg.trainer.batch_size == 64
    assert cfg.trainer.epochs == 60
    model = build_model(cfg)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (1, 8),
        (8, 8),
        (8, 16),
        (16, 16),
        (16, 32),
        (32, 32),
    ]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.features) == 3
    assert model.classifier.kernel_size == (1, 1) and model.classifier.out_channels == 10


#: The dataset options derived from FashionMNIST (gpool.tasks).
TASKS = ["cluttered", "occluded", "translated"]


def test_groups_have_the_promised_options() -> None:
    # Heads are open-ended (one class + one YAML file); the article's two must be there.
    assert {"avg", "max"} <= set(options("pool"))
    assert sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir()) == sorted(
        [*GROUPS, "trainer", "hydra"]
    )
    assert options("optimizer") == ["adam", "adamw", "sgd"]
    assert options("scheduler") == ["cosine", "none", "onecycle"]
    datasets = ["cifar10", "fashion_mnist", "image_folder", "kmnist", "mnist"]
    assert options("dataset") == sorted(datasets + TASKS)
    presets = ["article", "article_decide", "decide", "quick", "search", "tuned"]
    assert options("experiment") == presets
    assert options("model") == ["convnet", "resnet18"]


def test_the_keys_gpool_reads_are_the_configs_own() -> None:
    """CONFIG_KEYS decides what the config hash covers: it must name every top-level key
    of the config, and nothing else."""
    assert sorted(make_cfg()) == sorted(CONFIG_KEYS)
    assert unread_keys(make_cfg("+note=x", "+lr=0.1", "optimizer.lr=${lr}")) == ["note"]


def test_the_article_decide_preset_is_the_articles_protocol_decided() -> None:
    cfg, article = make_cfg("experiment=article_decide", hydra=True), make_cfg("experiment=article")
    assert OmegaConf.masked_copy(cfg, list(article)) == article
    assert cfg.hydra.sweeper._target_.endswith("DecideSweeper")
    assert dict(cfg.hydra.sweeper.params) == {"pool": "avg,max"}


def test_the_tuned_preset_holds_out_data_and_sweeps_heads_lrs_and_seeds() -> None:
    cfg = make_cfg("experiment=tuned", hydra=True)
    assert cfg.dataset.holdout == 5000
    assert dict(cfg.hydra.sweeper.params) == {
        "pool": "avg,max",
        "optimizer.lr": "3e-4,1e-3,3e-3",
        "seed": "0,1,2",
    }


def test_the_search_preset_searches_each_heads_lr_and_weight_decay_on_a_holdout() -> None:
    cfg = make_cfg("experiment=search", hydra=True)
    assert cfg.dataset.holdout == 5000
    assert cfg.hydra.sweeper._target_.endswith("SearchSweeper")
    assert dict(cfg.hydra.sweeper.params) == {"pool": "avg,max"}
    assert list(cfg.hydra.sweeper.search) == ["optimizer.lr", "optimizer.weight_decay"]
    assert swept_keys(cfg) == ["pool", "optimizer.lr", "optimizer.weight_decay"]


def test_new_options_at_their_old_behaviour_keep_earlier_runs_hashes() -> None:
    config = OmegaConf.to_container(make_cfg(), resolve=True)
    assert config["dataset"]["holdout"] == 0
    before = {**config, "dataset": {k: v for k, v in config["dataset"].items() if k != "holdout"}}
    assert config_hash(config) == config_hash(before)
    held = {**config, "dataset": {**config["dataset"], "holdout": 5000}}
    assert config_hash(held) != config_hash(config)
    model = {k: v for k, v in config["model"].items() if k != "pool_position"}
    assert config["model"]["pool_position"] == "class_maps"
    assert config_hash({**config, "model": model}) == config_hash(config)


@pytest.mark.parametrize("pool", options("pool"))
@pytest.mark.parametrize("hw", [(1, 1), (3, 3), (4, 7), (28, 28)])
def test_heads_work_for_any_map_size(pool: str, hw: tuple[int, int]) -> None:
    head = instantiate(make_cfg(f"pool={pool}").pool)
    x = torch.randn(5, 10, *hw)
    y = head(x)
    assert y.shape == (5, 10 * getattr(head, "width_factor", 1))
    if pool in ("avg", "max"):
        expected = x.mean((2, 3)) if pool == "avg" else x.flatten(2).max(2).values
        torch.testing.assert_close(y, expected)
        assert isinstance(head, {"avg": GlobalAvgPool, "max": GlobalMaxPool}[pool])


@pytest.mark.parametrize("position", ["class_maps", "features"])
@pytest.mark.parametrize("pool", options("pool"))
@pytest.mark.parametrize("network", options("model"))
def test_every_head_trains_inside_every_model(network: str, pool: str, position: str) -> None:
    """Three Adam steps on one batch: every parameter gets a gradient, the loss falls, and
    the backbone and the head both learn."""
    cfg = make_cfg(f"model={network}", f"pool={pool}", f"model.pool_position={position}")
    torch.manual_seed(0)
    model = build_model(cfg)
    model.initialise("xavier")
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        out = model(x)
        assert out.shape == (8, 10)
        loss = torch.nn.functional.cross_entropy(out, y)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    moved = {k.split(".")[0] for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert "features" in moved and moved & {"classifier", "head"}, moved


def test_pooling_the_features_classifies_them_linearly_with_class_activation_maps() -> None:
    model = build_model(make_cfg("model.pool_position=features"))
    assert isinstance(model.head, torch.nn.Linear) and model.head.in_features == 32
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():  # GAP of the class activation maps is the scores
        torch.testing.assert_close(model.class_maps(x).mean((2, 3)), model(x))
    attention = build_model(make_cfg("pool=attention", "model.pool_position=features"))
    assert attention.pool.score.in_channels == 32  # it scores the features it pools


def test_gem_that_clamps_is_refused_on_class_maps() -> None:
    with pytest.raises(GpoolError, match="clamps negative inputs, and class maps are logits"):
        build_model(make_cfg("pool=gem", "pool.shift=false"))
    build_model(make_cfg("pool=gem", "pool.shift=false", "model.pool_position=features"))


@pytest.mark.parametrize("name", options("optimizer"))
def test_optimizers_instantiate_on_model_parameters(name: str) -> None:
    cfg = make_cfg(f"optimizer={name}")
    model = build_model(cfg)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    assert type(optimizer).__name__.lower() == name
    assert optimizer.param_groups[0]["lr"] == cfg.optimizer.lr


@pytest.mark.parametrize("name", options("scheduler"))
def test_schedulers_instantiate(name: str) -> None:
    cfg = make_cfg(f"scheduler={name}", "trainer.epochs=3")
    assert cfg.scheduler.interval in ("step", "epoch")
    factory = instantiate(cfg.scheduler.lr_scheduler)
    if name == "none":
        assert factory is None
        return
    optimizer = torch.optim.SGD(build_model(cfg).parameters(), lr=0.1)
    extra = {"steps_per_epoch": 5} if cfg.scheduler.interval == "step" else {}
    scheduler = factory(optimizer, **extra)
    steps = 3 * (5 if extra else 1)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()  # a schedule sized from the config runs to its end without error
    assert optimizer.param_groups[0]["lr"] < 0.1 or name == "onecycle"


@pytest.mark.parametrize("network", options("model"))
@pytest.mark.parametrize("name", options("dataset"))
def test_model_output_matches_each_dataset(name: str, network: str, tmp_path: Path) -> None:
    own = ["dataset.num_classes=4"] if name == "image_folder" else []  # set by the user
    cfg = make_cfg(f"dataset={name}", f"model={network}", *own)
    dataset = instantiate(cfg.dataset, root=str(tmp_path))
    kinds = {"image_folder": ImageFolderImages, **dict.fromkeys(TASKS, DerivedImages)}
    assert isinstance(dataset, kinds.get(name, TorchvisionImages))
    if not own:
        assert len(dataset.classes) == cfg.dataset.num_classes
    model = build_model(cfg)
    size = cfg.dataset.image_size
    out = model(torch.randn(2, cfg.dataset.channels, size, size))
    assert out.shape == (2, cfg.dataset.num_classes)


def test_fashion_mnist_class_names() -> None:
    assert list(make_cfg().dataset.classes) == [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ]


def test_trainer_instantiates_with_auto_device() -> None:
    trainer = instantiate(make_cfg().trainer)
    assert isinstance(trainer, Trainer)
    assert trainer.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_article_experiment_sets_the_articles_protocol() -> None:
    cfg = make_cfg("experiment=article", "pool=max")
    assert cfg.model.output_activation == "sigmoid"
    assert cfg.dataset.normalize is False
    assert cfg.trainer.shuffle is False and cfg.trainer.init == "xavier"
    assert cfg.trainer.train_eval_pass is True and cfg.trainer.epochs == 60
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == 3e-4
    assert cfg.scheduler.lr_scheduler is None
    assert cfg.pool._target_ == "gpool.pooling.GlobalMaxPool"  # the command line still wins
    model = build_model(cfg)
    out = model(torch.randn(3, 1, 28, 28))
    assert ((out > 0) & (out < 1)).all()  # sigmoid outputs


def test_quick_experiment_uses_one_cycle() -> None:
    cfg = make_cfg("experiment=quick")
    assert cfg.scheduler.interval == "step"
    assert cfg.scheduler.lr_scheduler._target_.endswith("OneCycleLR")
    assert cfg.scheduler.lr_scheduler.epochs == cfg.trainer.epochs


def test_outputs_and_store_default_into_the_project(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("GPOOL_DATA", "/somewhere/data")
    cfg = make_cfg()
    assert cfg.mlflow.tracking_uri == f"sqlite:///{gpool.PROJECT_ROOT}/runs/mlflow.db"
    assert cfg.data_dir == "/somewhere/data"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert make_cfg().mlflow.tracking_uri == "http://127.0.0.1:5000"


@pytest.mark.parametrize("value", ["-1", "0", "inf"])
def test_a_one_cycle_peak_that_is_no_learning_rate_is_refused(value: str) -> None:
    """max_lr=-1 once trained to a loss of 6.8e16 and FINISHED."""
    cfg = make_cfg("scheduler=onecycle", f"scheduler.lr_scheduler.max_lr={value}")
    with pytest.raises(GpoolError, match="scheduler.lr_scheduler.max_lr must be a number > 0"):
        check_values(cfg)
    check_values(make_cfg("scheduler=onecycle"))


@pytest.mark.parametrize("switch", ["mlflow.system_metrics", "mlflow.log_model"])
def test_a_switch_that_is_not_true_or_false_is_refused(switch: str) -> None:
    with pytest.raises(GpoolError, match=f"{switch} must be true or false, not 'often'"):
        check_values(make_cfg(f"{switch}=often"))
    check_values(make_cfg(f"{switch}=false"))


def test_the_same_sweep_in_another_order_is_the_same_sweep() -> None:
    def key(*overrides: str) -> str:
        cfg = make_cfg(hydra=True)
        cfg.hydra.overrides.task = list(overrides)
        return sweep_key(cfg)

    assert key("seed=1,0", "pool=max,avg") == key("pool=avg,max", "seed=0,1")
    assert key("seed=0,1", "pool=avg,max") != key("seed=0,1,2", "pool=avg,max")
    assert key("seed=0") != key("seed=1")


@pytest.mark.parametrize("points", ["0", "-1", "nan", "inf", "100", "abc"])
@pytest.mark.parametrize("option", ["--detect", "--margin"])
def test_compare_refuses_points_that_are_no_margin_in_one_line(
    option: str, points: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused while the arguments are read, before any store is opened: argparse's usage
    and one line naming the value, exit status 2."""
    with pytest.raises(SystemExit) as stop:
        compare_arguments([option, points])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"{points!r} is no number of points in (0, 100)" in err and "Traceback" not in err
    assert compare_arguments([option, "0.5"]).__dict__[option[2:]] == 0.5


def test_the_default_launcher_fuses_only_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """gpool's default (hydra/launcher=auto) decides before any job runs; CUDA mocked here,
    the CPU side runs for real in tests/test_fused.py."""
    cfg = make_cfg(hydra=True)
    assert cfg.hydra.launcher._target_.endswith("AutoLauncher")
    assert reasons_against_fusing(cfg) == [  # this machine: no GPU
        "torch sees no CUDA GPU here, and on a CPU fusing does not pay"
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert reasons_against_fusing(cfg) == []
    assert reasons_against_fusing(make_cfg("trainer.device=cuda:1", hydra=True)) == []
    assert reasons_against_fusing(make_cfg("trainer.device=cpu", hydra=True)) == [
        "trainer.device=cpu"
    ]
    batches = make_cfg("hydra.sweeper.max_batch_size=2", hydra=True)
    assert reasons_against_fusing(batches) == [
        "hydra.sweeper.max_batch_size hands the launcher the sweep in batches"
    ]
    explicit = make_cfg("hydra/launcher=basic", hydra=True)  # the user's choice wins
    assert explicit.hydra.launcher._target_.endswith("BasicLauncher")
