"""How many worker threads a run uses: ``threads = "auto"`` (the default) or a fixed count.

Every torch kernel runs on one thread (``torch.set_num_threads(1)``), so a run's numbers are
the same for any thread count; the workers evaluate the tasks' models in parallel
(:meth:`mmfl.engines.base.Engine.evaluate`). "auto" is every core the process may run on for a
lone run, and one inside the worker processes of ``mmfl sweep --jobs k`` (k > 1), which set
:data:`AUTO_THREADS_ENV` to 1. Being an execution setting, ``threads`` is left out of the
checkpoint fingerprint and of the resume check.
"""

from __future__ import annotations

import os

__all__ = ["AUTO_THREADS_ENV", "resolve_threads"]

#: environment variable that fixes what "auto" means in this process (a sweep worker sets 1)
AUTO_THREADS_ENV = "MMFL_AUTO_THREADS"


def resolve_threads(threads: int | str) -> int:
    """The thread count for ``threads`` (an int >= 1, or "auto")."""
    if threads != "auto":
        return int(threads)
    fixed = os.environ.get(AUTO_THREADS_ENV, "")
    if fixed.isdigit() and int(fixed) >= 1:
        return int(fixed)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
