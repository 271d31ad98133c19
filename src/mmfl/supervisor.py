"""Process supervision shared by ``mmfl sweep``, the Flower simulation host and ``mmfl
flower-local``: the thread environment of worker processes, SIGINT guards, a death signal for
children, finding leftover processes by an environment marker or by parentage in ``/proc``,
and a watchdog that kills them when their parent dies.

:func:`supervised` is the whole of it for a section of code that starts processes: the sweep's
worker pool and the Flower simulation host's Ray processes run inside one, so a ``kill -9`` of
``mmfl sweep`` or ``mmfl run`` leaves no worker, raylet or Ray actor behind, and whatever is
left when the section ends is killed too. ``mmfl flower-local`` keeps its own marker
(:mod:`mmfl.flower.processes`), on the same watchdog.

The watchdog (:func:`start_watchdog`, ``python -m mmfl.supervisor watchdog NAME VALUE``) is a
small process that reads a pipe whose only writer is its parent. The pipe reaches end-of-file
when the parent exits, however it exits (SIGKILL included), and the watchdog then SIGKILLs
every process carrying the marker ``NAME=VALUE`` in its environment, including the ones that
left the parent's process tree or session (Flower's ``flower-superexec``, ``flwr-serverapp``,
``flwr-clientapp``), which ``PR_SET_PDEATHSIG`` (direct children only) cannot reach, and every
descendant of a marked process that it saw in its scans of ``/proc`` while the parent lived
(some processes overwrite their ``/proc`` environment with their title, as Ray's do). Linux
(``/proc``) only; elsewhere it finds nothing and exits.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["ONE_THREAD", "SUPERVISED", "descendants", "environment", "poll_until",
           "processes_with_env", "set_pdeathsig", "sigint_ignored", "start_watchdog",
           "supervised"]

#: Environment marker of the processes started inside :func:`supervised` (value: its token).
SUPERVISED = "MMFL_SUPERVISED"
#: Seconds :func:`supervised` waits at its end for the watchdog to kill what is left.
LEFTOVER_WAIT = 5.0

#: One thread per worker process: N processes share the machine's cores.
ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                               "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")}


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """Set environment variables that are not set yet; restore them afterwards."""
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@contextlib.contextmanager
def sigint_ignored():
    """Ignore SIGINT in this process meanwhile (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def processes_with_env(name: str, value: str) -> list[int]:
    """PIDs of live processes (zombies ignored) whose environment holds ``name=value``, found
    by scanning ``/proc`` (processes of other users are skipped). Empty without ``/proc``."""
    table = _proc_table()
    return [pid for pid in _marked(name, value, table) if table[pid][2] not in ("Z", "X")]


def _marked(name: str, value: str, table: dict[int, tuple[int, str, str]]) -> list[int]:
    """The PIDs of ``table`` (this process left out) whose ``/proc`` environment holds
    ``name=value``; unreadable ones (other users', exited) are skipped."""
    needle = f"{name}={value}".encode()
    out = []
    for pid in table:
        if pid == os.getpid():
            continue
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                out.append(pid)
        except OSError:
            continue
    return out


def descendants(pid: int) -> list[int]:
    """PIDs of all descendants of ``pid`` (from the parent links in ``/proc/*/stat``)."""
    return sorted(_subtrees({pid}, _proc_table()) - {pid})


def set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM this child when its parent (mmfl) dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no glibc: the marker scan in stop() still cleans up
        return


def poll_until(done: Callable[[], bool], *, every: float, timeout: float | None,
               expired: Callable[[], Exception]) -> None:
    """Call ``done()`` every ``every`` seconds until it returns True; raise ``expired()`` once
    ``timeout`` seconds (None: no limit) have passed. ``done`` may raise to stop early."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not done():
        if deadline is not None and time.monotonic() > deadline:
            raise expired()
        time.sleep(every)


def start_watchdog(name: str, value: str) -> subprocess.Popen:
    """Start the watchdog of the processes marked ``name=value`` (module docstring). The
    caller keeps the returned Popen (its ``stdin`` is the pipe; closing it, or exiting, makes
    the watchdog kill what is left and exit). The watchdog itself carries no marker."""
    env = {k: v for k, v in os.environ.items() if k != name}
    return subprocess.Popen([sys.executable, "-m", "mmfl.supervisor", "watchdog", name, value],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, start_new_session=True)


@contextlib.contextmanager
def supervised(name: str = SUPERVISED) -> Iterator[str]:
    """Supervise the processes started inside the block; yields the block's token.

    ``name=<token>`` (a fresh token) is set in this process's environment meanwhile, so every
    process started in the block, and every descendant of those (they inherit it, also in
    sessions of their own), carries the marker, and a watchdog (:func:`start_watchdog`) is
    started first: if this process dies, however (SIGKILL included), the watchdog SIGKILLs
    every marked process within a fraction of a second. When the block ends, normally or by an
    exception, the watchdog is released and SIGKILLs the marked processes still alive (the
    block's workers have exited by then; leftovers, such as Ray processes slow to exit, are
    what it finds), and this waits for it at most :data:`LEFTOVER_WAIT` seconds.

    Nested blocks use fresh tokens: a process of the outer block that opens an inner one
    carries the outer token (a process's ``/proc`` environment is the one it started with),
    its children the inner one, so killing the outer block's owner kills that process, whose
    own watchdog then kills its children. Processes started by other threads while the block
    is open carry the marker too. Linux only (``/proc``); elsewhere nothing is found and the
    block only sets the variable.
    """
    token = secrets.token_hex(8)
    dog = start_watchdog(name, token)
    before = os.environ.get(name)
    os.environ[name] = token
    try:
        yield token
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
        with contextlib.suppress(OSError):
            dog.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            dog.wait(timeout=LEFTOVER_WAIT)


#: Seconds between the watchdog's scans of ``/proc`` while its parent lives.
SCAN_EVERY = 0.5


def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, start time in clock ticks, state) of every process in ``/proc``."""
    out: dict[int, tuple[int, str, str]] = {}
    for d in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(d.name)] = (int(f[1]), f[19], f[0])
        except (OSError, IndexError, ValueError):
            continue
    return out


def _subtrees(roots: set[int], table: dict[int, tuple[int, str, str]]) -> set[int]:
    """``roots`` and all their descendants in ``table``."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = set(roots), list(roots)
    while todo:
        for c in children.get(todo.pop(), ()):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


class _Tracked:
    """The processes a watchdog is responsible for: those marked ``name=value`` and every
    descendant of a marked process seen by a scan. Descendants count too because a process may
    overwrite its ``/proc`` environment (Ray's workers and agents set their process title with
    ``setproctitle``, which reuses that memory), and a descendant that was orphaned by its
    parent's death keeps running under init. A pid is remembered with its start time, so a
    reused pid is never killed."""

    def __init__(self, name: str, value: str):
        self.name, self.value = name, value
        self.known: dict[int, str] = {}  # pid -> start time

    def scan(self) -> list[int]:
        """Update the tracked set from ``/proc``; return the tracked pids alive now."""
        table = _proc_table()  # one pass over /proc serves the marker and the parent links
        for pid in _subtrees(set(_marked(self.name, self.value, table)), table):
            if pid in table and pid != os.getpid():
                self.known.setdefault(pid, table[pid][1])
        self.known = {pid: t for pid, t in self.known.items()
                      if pid in table and table[pid][1] == t}
        return [pid for pid in self.known if table[pid][2] not in ("Z", "X")]


def _watchdog(name: str, value: str, *, settle: float = 0.3, limit: float = 10.0) -> None:
    """While stdin is open, scan ``/proc`` every :data:`SCAN_EVERY` seconds for the processes
    to track (:class:`_Tracked`); at end-of-file SIGKILL them until none has been seen for
    ``settle`` seconds (at most ``limit`` seconds)."""
    import select

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # outlive the parent's group
        signal.signal(sig, signal.SIG_IGN)
    tracked = _Tracked(name, value)
    fd = sys.stdin.fileno()
    with contextlib.suppress(OSError):
        while True:
            if select.select([fd], [], [], SCAN_EVERY)[0]:
                if not os.read(fd, 4096):
                    break
            else:
                tracked.scan()
    deadline = time.monotonic() + limit
    quiet_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < settle:
        pids = tracked.scan()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if pids:
            quiet_since = time.monotonic()
        time.sleep(0.05)


if __name__ == "__main__" and sys.argv[1:2] == ["watchdog"] and len(sys.argv) == 4:
    _watchdog(sys.argv[2], sys.argv[3])
