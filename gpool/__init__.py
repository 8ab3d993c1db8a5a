"""gpool: sweeps that answer "global average or global max pooling for my convnet?"."""

from pathlib import Path

from hydra.errors import CompactHydraException
from omegaconf import OmegaConf

#: The checkout that holds conf/ and runs/; outputs land here whatever the job's cwd is.
PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Registered on import so that `${gpool.root:}` resolves for `gpool.train` and for tests
# that compose the config with hydra.compose.
OmegaConf.register_new_resolver("gpool.root", lambda: str(PROJECT_ROOT), replace=True)


class GpoolError(CompactHydraException):
    """A failure the user can act on (missing data, NaN loss...).

    As a CompactHydraException, Hydra reports it as one message without a traceback, marks
    the job failed, lets the other jobs of a sweep run and exits non-zero.
    """
