"""Error types of mmfl.

Every error a user can cause carries enough context to be printed as a single line by the CLI
(which exits with status 2 for these) without a traceback.
"""

from __future__ import annotations


class MmflError(Exception):
    """Base class of all errors mmfl raises on purpose."""


class ConfigError(MmflError):
    """An invalid configuration value.

    Attributes:
        key: dotted config key, e.g. ``"sampler.name"`` or ``"tasks[1].partition.alpha"``.
        constraint: the rule that was broken, e.g. ``"must be one of: random, full"``.
        got: the value received (``repr`` is shown).
    """

    def __init__(self, key: str, constraint: str, got: object = None, *, show_got: bool = True):
        self.key = key
        self.constraint = constraint
        self.got = got
        msg = f"{key}: {constraint}"
        if show_got:
            msg += f" (got {got!r})"
        super().__init__(msg)


class ConfigFileError(MmflError):
    """A configuration file that cannot be read or parsed (names the file and line)."""


class DataError(MmflError):
    """A dataset that cannot be loaded (missing or malformed files); says how to fix it."""


class ResultsError(MmflError):
    """A run directory that cannot be written, resumed or read."""


class NumericalError(MmflError):
    """Non-finite values (NaN/inf) in updates or parameters."""
