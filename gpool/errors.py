"""The one exception gpool raises for what a user can act on."""

from hydra.errors import CompactHydraException


class GpoolError(CompactHydraException):
    """A failure the user can act on (missing data, NaN loss...).

    As a CompactHydraException, Hydra reports it as one message without a traceback, marks
    the job failed, lets the other jobs of a sweep run and exits non-zero.
    """
