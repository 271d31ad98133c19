"""The processes of one ``mmfl flower-local`` deployment, and how every one of them is stopped.

Each child starts in a session (so a process group) of its own, with umask 077, with
``PR_SET_PDEATHSIG`` = SIGTERM on Linux (it is told when this process dies, even by SIGKILL),
and with the environment marker ``MMFL_FLOWER_LOCAL=<token>`` (:data:`MARKER`), which its own
children (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``, started by Flower in
sessions of their own) inherit. :meth:`Processes.stop` sends SIGTERM to every group, waits,
SIGKILLs the groups, then scans ``/proc`` for any process that still carries the marker and
stops it: nothing of a deployment survives it (:func:`marked_processes`). If this process dies
without stopping them (SIGKILL), a watchdog started with the first child
(:func:`mmfl.supervisor.start_watchdog`) SIGKILLs every marked process within a fraction of a
second.

While a deployment runs, SIGTERM and SIGHUP raise :class:`Terminated` in the main thread
(:func:`terminate_on_signals`); while it stops, SIGINT, SIGTERM and SIGHUP are ignored
(:func:`signals_ignored`), so a second Ctrl-C cannot cut the cleanup short.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmfl.errors import MmflError
from mmfl.flower.workdir import UMASK, private_files
from mmfl.supervisor import descendants, processes_with_env, set_pdeathsig, start_watchdog

__all__ = ["MARKER", "Proc", "Processes", "Terminated", "free_port", "marked_processes",
           "port_open", "signals_ignored", "terminate_on_signals"]

log = logging.getLogger(__name__)

#: Environment variable that marks every process of one deployment (value: the run's token).
MARKER = "MMFL_FLOWER_LOCAL"
#: SIGTERM rounds (0.1 s apart) for leftover marked processes before SIGKILL is used.
LEFTOVER_TERM_TRIES = 20


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM/SIGHUP while a deployment runs (exit 128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def free_port(host: str = "127.0.0.1", avoid: set[int] | None = None) -> int:
    """A TCP port that is free on ``host`` now (the OS picks it; ``avoid`` is skipped)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if not avoid or port not in avoid:
            return port
    raise MmflError("no free TCP port found on " + host)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def marked_processes(token: str) -> list[int]:
    """PIDs of live processes of the deployment whose marker is ``token``
    (``MMFL_FLOWER_LOCAL=<token>`` in their environment)."""
    return processes_with_env(MARKER, token)


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file ('' when it cannot be read)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


@dataclass
class Proc:
    """One process to start: its argv, working directory, log file and environment; once
    started, the Popen (the leader of its own process group)."""

    name: str
    argv: list[str]
    cwd: Path
    log: Path
    env: dict[str, str]
    popen: subprocess.Popen | None = None
    stopped: bool = False  # stopped on purpose (a killed node, stop()): its exit is no failure

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def port(self) -> int | None:
        """The value of its ``--port`` argument (None without one)."""
        return int(self.argv[self.argv.index("--port") + 1]) if "--port" in self.argv else None


@contextlib.contextmanager
def _handling(signals, handler):
    """``handler`` for ``signals`` meanwhile (main thread only; elsewhere a no-op); the
    previous handlers are restored afterwards."""
    saved: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in signals:
            with contextlib.suppress(OSError, ValueError):
                saved[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in saved.items():
            with contextlib.suppress(OSError, ValueError, TypeError):
                signal.signal(sig, old)


def terminate_on_signals():
    """Context manager: SIGTERM and SIGHUP raise :class:`Terminated` meanwhile (main thread
    only)."""
    def terminate(signum, frame):
        raise Terminated(signum)

    return _handling((signal.SIGTERM, signal.SIGHUP), terminate)


def signals_ignored():
    """Context manager: SIGINT, SIGTERM and SIGHUP are ignored meanwhile (main thread only)."""
    return _handling((signal.SIGINT, signal.SIGTERM, signal.SIGHUP), signal.SIG_IGN)


class Processes:
    """Starts and stops the processes of one deployment, all marked ``MARKER=token``.

    Args:
        token: the deployment's marker value (every child's environment must carry it).
        grace: seconds a process group gets between SIGTERM and SIGKILL in :meth:`stop`.
    """

    def __init__(self, token: str, grace: float = 8.0):
        self.token = token
        self.grace = grace
        self._watchdog: subprocess.Popen | None = None

    def spawn(self, proc: Proc) -> None:
        """Start ``proc`` in its own session, with the death signal, umask 077 and (first)
        the watchdog that kills the deployment's processes if this one dies; its output goes
        to ``proc.log`` after a first line with its command."""
        if self._watchdog is None or self._watchdog.poll() is not None:
            self._watchdog = start_watchdog(MARKER, self.token)
        with private_files():
            proc.cwd.mkdir(mode=0o700, parents=True, exist_ok=True)
            logf = open(proc.log, "ab")  # noqa: SIM115 - closed below, after the fork
        # only async-signal-safe work between fork and exec (one prctl call)
        death_signal = set_pdeathsig if sys.platform.startswith("linux") else None
        with logf:
            logf.write(f"$ {' '.join(proc.argv)}\n".encode())
            logf.flush()
            proc.popen = subprocess.Popen(
                proc.argv, cwd=proc.cwd, env=proc.env, stdin=subprocess.DEVNULL, stdout=logf,
                stderr=subprocess.STDOUT, start_new_session=True, umask=UMASK,
                preexec_fn=death_signal)  # noqa: PLW1509
        proc.stopped = False
        log.debug("started %s (pid %d): %s", proc.name, proc.popen.pid, " ".join(proc.argv))

    def alive(self) -> list[int]:
        """PIDs of every live process of the deployment (children and their descendants)."""
        return marked_processes(self.token)

    @staticmethod
    def signal_group(p: Proc, sig: int) -> None:
        """Send ``sig`` to ``p``'s process group (pgid == pid: it leads its own session)."""
        if p.popen is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.popen.pid, sig)

    def kill(self, p: Proc, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to ``p``'s group and to every descendant of it (those Flower started
        in sessions of their own included), as a crash; waits up to 10 s for ``p`` to exit."""
        p.stopped = True
        tree = descendants(p.popen.pid)
        self.signal_group(p, sig)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(timeout=10)

    def stop(self, procs: list[Proc]) -> None:
        """Stop ``procs`` (in that order) and every marked process: SIGTERM to each process
        group, wait up to ``grace`` seconds, SIGKILL the groups, then SIGTERM (and at last
        SIGKILL) any process still carrying the marker; finally close the watchdog. SIGINT,
        SIGTERM and SIGHUP are ignored meanwhile."""
        procs = [p for p in procs if p is not None and p.popen]
        with signals_ignored():
            for p in procs:
                self.signal_group(p, signal.SIGTERM)
            deadline = time.monotonic() + self.grace
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.popen.wait(timeout=max(0.05, deadline - time.monotonic()))
            for p in procs:  # leaders gone, but group members (superexec, apps) may remain
                self.signal_group(p, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.popen.wait(timeout=5)
            self._stop_leftovers()
            self._stop_watchdog()

    def _stop_leftovers(self) -> None:
        """Flower starts flower-superexec and the app processes in sessions of their own:
        find them by the marker; SIGTERM first, then SIGKILL."""
        left = self.alive()
        for k in range(2 * LEFTOVER_TERM_TRIES):
            if not left:
                break
            sig = signal.SIGTERM if k < LEFTOVER_TERM_TRIES else signal.SIGKILL
            log.debug("stopping leftover Flower processes %s (signal %d)", left, sig)
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            time.sleep(0.1)
            left = self.alive()
        if left:
            log.warning("Flower processes still alive after stop: %s", left)

    def _stop_watchdog(self) -> None:
        """Close the watchdog's pipe (it kills what might be left, nothing by now, and exits)."""
        w, self._watchdog = self._watchdog, None
        if w is None:
            return
        with contextlib.suppress(OSError):
            w.stdin.close()
        try:
            w.wait(timeout=5)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()
