"""What gpool's sweepers share (hydra/sweeper=decide, search): the sweep's factors and
the groups of their combinations, each run over seeds the sweeper chooses, and the base
class. Hydra and OmegaConf alone: a sweeper's plugin module imports this when Hydra scans
its plugins, which every command does, so torch, MLflow and gpool's heavy rooms are
imported only where a sweep runs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from gpool.errors import GpoolError


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a multirun varies, in the order given: swept in its sweeper's `params` (a
    preset's) or on the command line (`pool=avg,max`, `seed=range(3)`), or searched
    (`hydra/sweeper=search`)."""
    sweeper = config.hydra.sweeper
    given = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    try:
        parsed = OverridesParser.create().parse_overrides([*given, *config.hydra.overrides.task])
    except Exception:  # Hydra rejects it itself before any job runs
        return []
    keys = [o.key_or_group for o in parsed if o.is_sweep_override()]
    return list(dict.fromkeys([*keys, *searched_keys(config)]))


def searched_keys(config: DictConfig) -> list[str]:
    """The keys a `hydra/sweeper=search` searches; its verdict tunes them (compare --tune)."""
    return list(config.hydra.sweeper.get("search") or {})


def factor_groups(overrides: list[str], sweeper: str, least: int) -> list[list[str]]:
    """Every combination of the factors' values (`pool=avg,max ...`), for a sweeper that
    owns the seed and runs each combination as a group (decide, search)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    if any(o.get_key_element() == "seed" for o in parsed):
        raise GpoolError(
            f"{sweeper} chooses the seeds itself (0, 1, ...): drop seed=... and set "
            "its seed count in hydra.sweeper"
        )
    (combinations,) = BasicSweeper.split_arguments(parsed, None)
    if len(combinations) < least:
        raise GpoolError(
            f"{sweeper} needs something to compare: sweep a factor over {least} or more "
            "values, e.g. pool=avg,max"
        )
    return combinations


class GroupSweeper(Sweeper):
    """A sweeper that owns the seed and runs every combination of the other factors as a
    group (decide, search): `params` are factors as in Hydra's basic sweeper."""

    name = "hydra/sweeper=..."  # how its messages name it
    least = 1  # the groups it needs

    def __init__(self, params: Mapping[str, str] | None = None) -> None:
        self.params = dict(params or {})
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None

    @classmethod
    def check(cls, config: DictConfig) -> list[list[str]]:
        """Refuse settings it cannot sweep with one message (called by SweepTracking
        before the sweep's run exists, and again by setup); returns the groups."""
        params = config.hydra.sweeper.get("params") or {}
        overrides = [*(f"{k}={v}" for k, v in params.items()), *config.hydra.overrides.task]
        return factor_groups(overrides, cls.name, cls.least)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.check(config)
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def groups(self, arguments: list[str]) -> list[list[str]]:
        """The groups of `params` and the command line's sweeps; saves the sweep's config
        (multirun.yaml) as Hydra's basic sweeper does."""
        assert self.config is not None
        overrides = [*(f"{k}={v}" for k, v in self.params.items()), *arguments]
        groups = factor_groups(overrides, self.name, self.least)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        return groups
