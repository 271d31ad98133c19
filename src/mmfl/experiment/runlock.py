"""Who owns a run directory: the marker that makes a folder an mmfl run, and the lock a run
holds on it while it writes.

* **Marker.** :data:`MARKER` (``.mmfl-run``) is written into every run directory. A folder
  without it (and without a run of an older mmfl, recognised by its ``metrics.csv`` and
  ``config.toml``) is the user's: mmfl writes into it only when none of the files it would
  write there exists (:data:`RUN_FILES`), so it never overwrites a file it did not create.
* **Lock.** The run holds an exclusive ``flock`` on the marker from before its first write to
  its end; a second run (or resume) on the same folder fails at once with exit status 2,
  naming the folder and the holder's pid. The kernel drops the lock when the holder dies
  (even by kill -9), so a crashed run never leaves a stale lock behind.
* **Leftovers.** Temporary files of an interrupted write (``<file>.tmp``) are removed when
  a run starts or resumes; row files in ``checkpoint-rows/`` that no checkpoint refers to (a
  crash between writing one and the checkpoint naming it) by the checkpointer, on resume and
  after each checkpoint (:class:`mmfl.experiment.checkpoint.RowLog`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mmfl.errors import ResultsError
from mmfl.experiment.results import INDEX, RUN_FILES

try:  # POSIX; elsewhere runs are not locked (documented)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["MARKER", "RUN_FILES", "RunLock", "check_ownership", "remove_leftovers"]

MARKER = ".mmfl-run"
FORMAT = "mmfl-run-1"


def is_run(out: Path) -> bool:
    """Whether ``out`` holds an mmfl run (the marker, or an older mmfl's run files)."""
    return (out / MARKER).exists() or ((out / "metrics.csv").exists()
                                       and (out / "config.toml").exists())


def check_ownership(out: Path) -> None:
    """ResultsError when ``out`` is not an mmfl run yet holds a file a run would write."""
    if not out.is_dir() or is_run(out):
        return
    theirs = [name for name in RUN_FILES if (out / name).exists()]
    if theirs:
        raise ResultsError(f"{out / theirs[0]}: exists and was not written by mmfl (the folder "
                           f"has no {MARKER}); choose another --out, or move it away")


def remove_leftovers(out: Path) -> list[str]:
    """Delete the temporary files an interrupted write left in ``out``; their names."""
    gone = []
    for name in (*RUN_FILES, INDEX):
        tmp = out / (name + ".tmp")
        if tmp.is_file():
            tmp.unlink()
            gone.append(tmp.name)
    return gone


class RunLock:
    """The exclusive lock of one run directory (a context manager; :meth:`release` at the
    end). Creates the directory and its marker."""

    def __init__(self, out: Path):
        self.out = out
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / MARKER
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _holder(fd)
                os.close(fd)
                raise ResultsError(f"{self.out}: in use by another mmfl run (pid {holder}); "
                                   "wait for it to end, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({"format": FORMAT, "pid": os.getpid()}) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> str:
    """The pid recorded in a locked marker ("unknown" if unreadable)."""
    try:
        return str(json.loads(os.pread(fd, 4096, 0).decode() or "{}").get("pid", "unknown"))
    except (OSError, ValueError, AttributeError):
        return "unknown"
