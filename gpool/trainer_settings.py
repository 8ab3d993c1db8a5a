"""conf/trainer's keys: their names, types and defaults, which Hydra checks a config
against (config.register_trainer_schema), and the checks of their values. Torch-free, so
that composing a config (`--help`, `--cfg`, gpool.compare) imports no torch; the
gpool.engine.Trainer that trains is these settings and what they build."""

from __future__ import annotations

from dataclasses import dataclass

from gpool.errors import GpoolError

#: torch.compile's modes (trainer.compile also takes true, the default mode, or false).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(value: str | bool | None) -> str | None:
    """trainer.compile as torch.compile's mode, or None for no compilation."""
    value = str(value).lower()
    if value in ("false", "true", "none"):
        return "default" if value == "true" else None
    if value not in COMPILE_MODES:
        modes = ", ".join(COMPILE_MODES)
        raise GpoolError(f"trainer.compile must be false, true or one of {modes}, not {value}")
    return value


def at_least(minimum: int, **values: int | None) -> None:
    """Refuse a count below `minimum` (None means "no limit" and passes)."""
    for key, value in values.items():
        if value is not None and value < minimum:
            raise GpoolError(f"trainer.{key} must be >= {minimum}, not {value}")


@dataclass
class TrainerSettings:
    """What conf/trainer sets. Values no run can use are refused when built, each in one
    line naming its key; `cuda_graph` is lower-cased and `compile` becomes torch.compile's
    mode (None: no compilation)."""

    epochs: int
    batch_size: int = 64
    eval_batch_size: int = 1000
    device: str = "auto"
    shuffle: bool = True
    limit_train_batches: int | None = None
    limit_val_batches: int | None = None
    log_every_n_steps: int = 50
    init: str = "default"
    train_eval_pass: bool = False
    channels_last: bool = True
    precision: str = "32"
    compile: str | None = "false"
    cuda_graph: str = "auto"
    threads: int | None = None
    resume: bool = True

    def __post_init__(self) -> None:
        if self.precision not in ("32", "bf16"):
            raise GpoolError(f"trainer.precision must be '32' or 'bf16', not {self.precision!r}")
        self.cuda_graph = str(self.cuda_graph).lower()
        if self.cuda_graph not in ("auto", "true", "false"):
            raise GpoolError(
                f"trainer.cuda_graph must be auto, true or false, not {self.cuda_graph}"
            )
        if self.init not in ("default", "xavier"):
            raise GpoolError(f"trainer.init must be 'default' or 'xavier', not {self.init!r}")
        at_least(1, epochs=self.epochs, batch_size=self.batch_size)
        at_least(1, eval_batch_size=self.eval_batch_size, threads=self.threads)
        at_least(1, log_every_n_steps=self.log_every_n_steps)
        at_least(1, limit_train_batches=self.limit_train_batches)
        at_least(1, limit_val_batches=self.limit_val_batches)
        self.compile = compile_mode(self.compile)
