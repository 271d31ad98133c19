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
            msg += f" (got {_shown(got)})"
        super().__init__(msg)


def _shown(got: object, limit: int = 200) -> str:
    """``repr(got)``, cut to ``limit`` characters (a value pasted by mistake can be huge; an
    integer too long for ``repr`` is shown by its length)."""
    try:
        text = repr(got)
    except ValueError:  # int with more digits than int -> str allows
        return f"<an integer of about {int(got.bit_length() * 0.30103) + 1} digits>"
    except RecursionError:
        return f"<a {type(got).__name__} nested too deeply to show>"
    return text if len(text) <= limit else text[:limit] + "..."


class ConfigFileError(MmflError):
    """A configuration file that cannot be read or parsed (names the file and line)."""


class DataError(MmflError):
    """A dataset that cannot be loaded (missing or malformed files); says how to fix it."""


class ResultsError(MmflError):
    """A run directory that cannot be written, resumed or read."""


class NumericalError(MmflError):
    """Non-finite values (NaN/inf) in updates or parameters."""
