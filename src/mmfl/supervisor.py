"""Process supervision shared by ``mmfl sweep``, the Flower simulation host and ``mmfl
flower-local``: the thread environment of worker processes, SIGINT guards, a death signal for
children, finding leftover processes by an environment marker or by parentage in ``/proc``,
and a watchdog that kills them when their parent dies.

The watchdog (:func:`start_watchdog`, ``python -m mmfl.supervisor watchdog NAME VALUE``) is a
small process that reads a pipe whose only writer is its parent. The pipe reaches end-of-file
when the parent exits, however it exits (SIGKILL included), and the watchdog then SIGKILLs
every process carrying the marker ``NAME=VALUE`` in its environment, including the ones that
left the parent's process tree or session (Flower's ``flower-superexec``, ``flwr-serverapp``,
``flwr-clientapp``), which ``PR_SET_PDEATHSIG`` (direct children only) cannot reach. Linux
(``/proc``) only; elsewhere it finds nothing and exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

__all__ = ["ONE_THREAD", "descendants", "environment", "poll_until", "processes_with_env",
           "set_pdeathsig", "sigint_ignored", "start_watchdog"]

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
    needle = f"{name}={value}".encode()
    pids: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return pids
    for d in proc.iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle not in (d / "environ").read_bytes().split(b"\0"):
                continue
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            pids.append(int(d.name))
    return pids


def descendants(pid: int) -> list[int]:
    """PIDs of all live descendants of ``pid`` (from the parent links in ``/proc/*/stat``)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), ()):
            out.append(c)
            todo.append(c)
    return out


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


def _watchdog(name: str, value: str, *, settle: float = 0.3, limit: float = 10.0) -> None:
    """Wait for end-of-file on stdin, then SIGKILL the processes marked ``name=value`` until
    none has been seen for ``settle`` seconds (at most ``limit`` seconds)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # outlive the parent's group
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        while sys.stdin.buffer.read(4096):
            pass
    deadline = time.monotonic() + limit
    quiet_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < settle:
        pids = processes_with_env(name, value)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if pids:
            quiet_since = time.monotonic()
        time.sleep(0.05)


if __name__ == "__main__" and sys.argv[1:2] == ["watchdog"] and len(sys.argv) == 4:
    _watchdog(sys.argv[2], sys.argv[3])
