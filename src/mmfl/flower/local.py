"""``mmfl flower-local``: a real Flower deployment of one experiment on this machine.

:class:`LocalDeployment` starts one ``flower-superlink`` and one ``flower-supernode`` per client
as separate processes on loopback, submits mmfl's Flower app with ``flwr run``, follows the run
until Flower reports it finished, and stops every process it started, whatever happens
(success, failure, exception, Ctrl-C, SIGTERM).

Layout of the run directory ``OUT`` (the experiment's own files, ``config.toml``,
``metrics.csv``, ``rounds.csv``, ``summary.json``..., are written by the ServerApp)::

    OUT/flower/
      deployment.json    ports, run id, status, timings (kept)
      logs/              superlink.log, node<i>.log, serverapp.log, flwr-*.log (kept on failure,
                         or always with keep_logs)
      experiment.toml    the resolved experiment config the ServerApp reads (run config
                         ``config-file``)
      run-config.toml    the ``--run-config`` overrides given to ``flwr run``
      app/               copy of the Flower app directory that ``flwr run`` packs into a FAB
      home/              private FLWR_HOME: config.toml with the connection, installed FABs
      shards/            one data shard per client (node config ``data-file``)
      superlink/, nodes/node<i>/   working directories of the processes
      tls/, keys/        generated certificates and SuperNode keys (``tls`` / ``auth``)
      identity.json      each client's shard fingerprint (n_{i,s}, SHA-256) and, with ``auth``,
                         its key's digest: what the ServerApp checks nodes against
      rejected.jsonl     refused nodes and rejected replies (written by the ServerApp; kept)
      commands.sh        the command of every process (:meth:`LocalDeployment.commands`,
                         ``--prepare-only``)
      .mmfl-created      the names above that mmfl created (JSON list): the only ones it ever
                         removes or overwrites

Everything is private: folders 0700, files 0600, created so (a umask of 077 while the files are
written and in every process started), not changed afterwards (:mod:`mmfl.flower.workdir`). A name mmfl needs that exists
without being listed in ``.mmfl-created`` (a user's file) is a one-line ResultsError; other
files in ``OUT/flower`` are left alone. After a completed run the listed names are removed
except ``deployment.json``, ``rejected.jsonl`` (and ``logs/`` with ``keep_logs``); after a
failure or interruption all of it is kept for diagnosis.

The SuperLink runs through :mod:`mmfl.flower.linkguard`: its Control and Runtime APIs answer
loopback peers only, even with ``host = 0.0.0.0``.

Process hygiene. Every child starts in its own session (so its own process group), with
``PR_SET_PDEATHSIG`` = SIGTERM on Linux (it is told when this process dies, even by SIGKILL),
and with the environment marker ``MMFL_FLOWER_LOCAL=<token>``, which its own children
(``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``) inherit. :meth:`stop` sends
SIGTERM to every group, waits, SIGKILLs the groups, then scans ``/proc`` for any process that
still carries the marker and kills it: nothing of a run survives it (:func:`marked_processes`).
If this process dies without stopping them (SIGKILL), a watchdog started with the first child
(:func:`mmfl.supervisor.start_watchdog`) SIGKILLs every marked process within a fraction of a
second. When the SuperLink dies mid-run, the run fails with "flower-superlink exited (code
N)", and a ``summary.json`` still saying ``running`` is marked ``failed`` with that reason.
"""

from __future__ import annotations

import contextlib
import csv
import ipaddress
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from mmfl.errors import ConfigError, MmflError, ResultsError
from mmfl.flower.workdir import KEPT, UMASK, WorkDir, copy_app, private_files
from mmfl.supervisor import (ONE_THREAD, descendants, poll_until, processes_with_env,
                             set_pdeathsig, start_watchdog)

log = logging.getLogger(__name__)

#: Environment variable that marks every process of one deployment (value: the run's token).
MARKER = "MMFL_FLOWER_LOCAL"
#: Name of the SuperLink connection written into the private FLWR_HOME/config.toml.
CONNECTION = "mmfl-local"
#: The hand-written Flower app shipped with mmfl (pyproject.toml only; the components are
#: ``mmfl.flower.server:server_app`` and ``mmfl.flower.client:client_app``).
APP_DIR = Path(__file__).resolve().parent / "fab"

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "PYTHONUNBUFFERED": "1",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


class FlowerRunError(MmflError):
    """The Flower run failed (ServerApp raised, a process died, or it did not start).

    Attributes:
        details: the ServerApp log tail or the process log tail that explains it ('' if none).
    """

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM/SIGHUP while a deployment runs (exit 128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


# -- helpers ------------------------------------------------------------------------------------
def flower_executable(name: str) -> str:
    """Path of a Flower console script (``flwr``, ``flower-superlink``...) of *this*
    interpreter's environment, so every process imports the same mmfl, flwr and torch."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if found:
        return found
    raise MmflError(f"{name}: Flower is not installed in this environment; "
                    "install the flower extra: pip install 'mmfl[flower]'")


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


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def check_host(host: str) -> str:
    """``host`` if it is an IP address or a DNS host name, else a one-line ConfigError."""
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return host
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if len(host) <= 253 and all(_LABEL.fullmatch(x) for x in labels):
        return host
    raise ConfigError("--host", "must be an IP address or a host name", host)


def check_seconds(key: str, value: float, *, zero: bool) -> float:
    """``value`` as float seconds: finite, and >= 0 (``zero``) or > 0; else ConfigError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(key, "must be a number of seconds", value) from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not zero):
        rule = ">= 0 seconds (0 = no limit)" if zero else "> 0 seconds"
        raise ConfigError(key, f"must be a finite number {rule}", value)
    return v


@dataclass
class _Proc:
    """One started process: a Popen in its own process group, its log file and its argv."""

    name: str
    argv: list[str]
    cwd: Path
    log: Path
    env: dict[str, str]
    popen: subprocess.Popen | None = None
    stopped: bool = False  # stopped on purpose (kill_node / stop): its exit is no failure

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


@dataclass
class RunProgress:
    """What a progress callback sees: the round rows of ``rounds.csv`` read so far."""

    rounds: int                       # total rounds of the experiment
    done: int                         # rounds completed so far
    row: dict[str, str] = field(default_factory=dict)  # the last rounds.csv row
    seconds: float = 0.0              # since the run was submitted


# -- the deployment ------------------------------------------------------------------------------
class LocalDeployment:
    """A SuperLink plus one SuperNode per client on this machine, running one experiment.

    Typical use (what ``mmfl flower-local`` does)::

        with LocalDeployment(cfg, out, tls=True) as dep:
            summary = dep.run(progress=print)

    or step by step, e.g. to inject faults in a test::

        with LocalDeployment(cfg, out, round_timeout=15) as dep:
            dep.prepare(); dep.start(); dep.submit()
            dep.wait_round(1); dep.kill_node(2)
            summary = dep.wait()

    Leaving the ``with`` block (normally, by an exception, Ctrl-C or SIGTERM) calls :meth:`stop`.

    Args:
        cfg: the validated experiment config (``mmfl.experiment.config.load_config``).
        out: run directory; the ServerApp writes the experiment's files there.
        data_dir: dataset folder (as ``mmfl run --data-dir``).
        tls: serve the SuperLink over TLS with a CA and certificate generated for the run.
        auth: SuperNode authentication (implies ``tls``): one ECDSA key per node, registered
            with ``flwr supernode register`` before the node starts.
        round_timeout: seconds the ServerApp waits for the replies of a round (run config
            ``round-timeout``; finite, 0 = no limit); a node that does not answer in time misses
            the round. Default: the config's ``flower.round_timeout``.
        node_wait: seconds the ServerApp waits for all SuperNodes to connect and answer
            discovery (``node-wait``). Default: the config's ``flower.node_wait``.
        port: SuperLink port (default: a free one).
        host: address the SuperLink listens on, an IP address or a host name (``127.0.0.1``;
            ``0.0.0.0`` lets other machines connect to the Fleet API, never to the Control and
            Runtime APIs: :mod:`mmfl.flower.linkguard`; see docs/flower.md).
        resume: continue the run in ``out`` from its checkpoint (run config ``resume``).
        keep_logs: keep ``OUT/flower/logs`` after a completed run.
        app_dir: Flower app directory to submit (default :data:`APP_DIR`, mmfl's own app).
        shard_writer: ``f(federation, folder) -> list[Path]`` writing one data shard per client
            (default ``mmfl.flower.shards.write_shards``).
        grace: seconds a process gets between SIGTERM and SIGKILL in :meth:`stop`.
    """

    def __init__(self, cfg, out: str | Path, *, data_dir: str | None = None, tls: bool = False,
                 auth: bool = False, round_timeout: float | None = None,
                 node_wait: float | None = None,
                 port: int | None = None, host: str = "127.0.0.1", resume: bool = False,
                 keep_logs: bool = False, app_dir: str | Path | None = None,
                 shard_writer: Callable | None = None, grace: float = 8.0):
        flower = getattr(cfg, "flower", None)  # the config's [flower] table gives the defaults
        if round_timeout is None:
            round_timeout = getattr(flower, "round_timeout", 600.0)
        if node_wait is None:
            node_wait = getattr(flower, "node_wait", 120.0)
        round_timeout = check_seconds("--round-timeout", round_timeout, zero=True)
        node_wait = check_seconds("--node-wait", node_wait, zero=False)
        host = check_host(host)
        if port is not None and not 1 <= port <= 65535:
            raise ConfigError("--port", "must be a TCP port 1..65535", port)
        # the ServerApp runs engine "flower"; the run directory's config.toml says so, and a
        # resumed run compares against it
        self.cfg = cfg if cfg.engine == "flower" else cfg.replace(engine="flower")
        self.out = Path(out).absolute()
        self.data_dir = data_dir
        self.auth = auth
        self.tls = tls or auth
        self.round_timeout = float(round_timeout)
        self.node_wait = float(node_wait)
        self.port = port
        self.host = host
        self.resume = resume
        self.keep_logs = keep_logs
        self.app_dir = Path(app_dir) if app_dir is not None else APP_DIR
        self.shard_writer = shard_writer
        self.grace = grace
        self.token = uuid.uuid4().hex
        self.dir = self.out / "flower"
        self.logs = self.dir / "logs"
        self.home = self.dir / "home"
        self.superlink: _Proc | None = None
        self.nodes: list[_Proc] = []
        self.shards: list[Path] = []
        self.node_ids: dict[int, int] = {}   # client id -> node id (auth mode)
        self.run_id: str | None = None
        self.status: str | None = None
        self._env: dict[str, str] = {}
        self._tls_files = None
        self._keys: list[tuple[Path, Path]] = []  # (private, public) key file per SuperNode
        self._prepared = False
        self._t_submit = 0.0
        self._submitted_at = float("inf")
        self._times: dict[str, float] = {}
        self._old_handlers: dict[int, Any] = {}
        self._status_at = 0.0  # monotonic time of the last `flwr ls`
        self._watchdog: subprocess.Popen | None = None
        self.workdir = WorkDir(self.dir)  # OUT/flower: private, ours only once claimed
        self._rejections_seen = 0  # records of rejected.jsonl already logged

    # -- context manager: always stop ---------------------------------------------------------
    def __enter__(self) -> Self:
        self._install_signal_handlers()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.stop(completed=exc_type is None and self.status == "finished:completed")
        finally:
            self._restore_signal_handlers()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def terminate(signum, frame):
            raise Terminated(signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(OSError, ValueError):
                self._old_handlers[sig] = signal.signal(sig, terminate)

    def _restore_signal_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            with contextlib.suppress(OSError, ValueError, TypeError):
                signal.signal(sig, old)
        self._old_handlers.clear()

    # -- 1. files -----------------------------------------------------------------------------
    @property
    def num_clients(self) -> int:
        return int(self.cfg.clients.count)

    def prepare(self) -> None:
        """Check the run directory, build the federation, write the shards, the resolved config,
        the app copy, FLWR_HOME with its connection, and (``tls``/``auth``) certificates and
        keys. Raises the usual input errors (ConfigError, DataError, ResultsError) before any
        process starts."""
        from mmfl.experiment.config import resolve_data_dir
        from mmfl.experiment.federation import build_federation
        from mmfl.experiment.rundir import check_out_dir

        t0 = time.perf_counter()
        check_out_dir(self.cfg, self.out, resume=self.resume)
        if not (self.app_dir / "pyproject.toml").is_file():
            raise MmflError(f"{self.app_dir}: Flower app directory without pyproject.toml")
        bindir = str(Path(flower_executable("flower-superlink")).parent)  # Flower installed?
        if self.port is not None and port_open(self.connect_host, self.port):
            raise ConfigError("--port", "is in use on this machine", self.port)
        data_dir = resolve_data_dir(self.cfg, self.data_dir)
        federation = build_federation(self.cfg, data_dir)
        try:
            self.out.mkdir(parents=True, exist_ok=True)  # the run directory: not ours to restrict
            with private_files():
                self._write_files(federation)
        except OSError as e:
            raise ResultsError(f"{e.filename or self.dir}: cannot write the deployment's files "
                               f"({e.strerror or e})") from None
        self._env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.home),
                     MARKER: self.token,  # Flower starts flower-superexec etc. from PATH:
                     "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
        self._prepared = True
        self._times["prepare_s"] = time.perf_counter() - t0
        self._save_state()

    def _write_files(self, federation) -> None:
        """Everything :meth:`prepare` writes under ``OUT/flower`` (see the module docstring)."""
        from mmfl.experiment import tomlio
        from mmfl.flower.shards import write_identity

        self.workdir.claim()
        with contextlib.suppress(OSError):  # earlier attempts' records were reported then
            self._rejections_seen = len((self.dir / "rejected.jsonl").read_text().splitlines())
        for d in (self.logs, self.home, self.dir / "superlink"):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        writer = self.shard_writer
        if writer is None:
            from mmfl.flower.shards import write_shards as writer
        self.shards = [Path(p).absolute() for p in writer(federation, self.dir / "shards")]
        if len(self.shards) != self.num_clients:
            raise MmflError(f"shard writer returned {len(self.shards)} shards for "
                            f"{self.num_clients} clients")
        raw = self.cfg.to_dict()
        if self.data_dir:  # --data-dir travels inside the config the ServerApp reads
            raw["data_dir"] = str(Path(self.data_dir).absolute())
        (self.dir / "experiment.toml").write_text(tomlio.dumps(raw), encoding="utf-8")
        copy_app(self.app_dir, self.dir / "app")
        if self.tls:
            from mmfl.flower.certs import make_tls_files

            extra = () if self.host in ("127.0.0.1", "0.0.0.0", "::", "localhost") else (self.host,)
            self._tls_files = make_tls_files(self.dir / "tls", extra)
        keys = None
        if self.auth:
            from mmfl.flower.certs import make_node_key, public_key_digest

            self._keys = [make_node_key(self.dir / "keys" / f"node{i}")
                          for i in range(self.num_clients)]
            keys = {i: public_key_digest(pub) for i, (_, pub) in enumerate(self._keys)}
        write_identity(self.shards, self.dir / "identity.json", keys)
        self.port = self.port or free_port()
        self._write_connection()
        self._write_run_config()

    @property
    def connect_host(self) -> str:
        """The host SuperNodes and ``flwr`` connect to: ``host``, or loopback when the SuperLink
        listens on every interface."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def address(self) -> str:
        """host:port where SuperNodes and ``flwr`` reach the SuperLink."""
        host = self.connect_host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def _write_connection(self) -> None:
        lines = ["[superlink]", f'default = "{CONNECTION}"', "",
                 f"[superlink.{CONNECTION}]", f'address = "{self.address}"']
        if self.tls:
            lines.append(f"root-certificates = {_toml_str(str(self._tls_files.ca_cert))}")
        else:
            lines.append("insecure = true")
        (self.home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _save_state(self) -> None:
        if not self.workdir.claimed:  # never write into a folder mmfl did not claim
            return
        state = {
            "superlink": f"{self.host}:{self.port}", "connection": CONNECTION,
            "tls": self.tls, "auth": self.auth, "run_id": self.run_id, "status": self.status,
            "round_timeout": self.round_timeout,
            "nodes": [{"client": i, "port": self._node_port(p), "node_id": self.node_ids.get(i)}
                      for i, p in enumerate(self.nodes)],
            **{k: round(v, 3) for k, v in self._times.items()},
        }
        with contextlib.suppress(OSError), private_files():
            (self.dir / "deployment.json").write_text(json.dumps(state, indent=2) + "\n",
                                                     encoding="utf-8")

    @staticmethod
    def _node_port(p: _Proc) -> int | None:
        return int(p.argv[p.argv.index("--port") + 1]) if "--port" in p.argv else None

    # -- 2. processes ---------------------------------------------------------------------------
    def _spawn(self, proc: _Proc) -> None:
        """Start ``proc`` in its own session, with the death signal, umask 077 and (first)
        the watchdog that kills the deployment's processes if this one dies."""
        if self._watchdog is None or self._watchdog.poll() is not None:
            self._watchdog = start_watchdog(MARKER, self.token)
        with private_files():
            proc.cwd.mkdir(mode=0o700, parents=True, exist_ok=True)
            logf = open(proc.log, "ab")  # noqa: SIM115 - closed below, after the fork
        with logf:
            logf.write(f"$ {' '.join(proc.argv)}\n".encode())
            logf.flush()
            proc.popen = subprocess.Popen(
                proc.argv, cwd=proc.cwd, env=proc.env, stdin=subprocess.DEVNULL, stdout=logf,
                stderr=subprocess.STDOUT, start_new_session=True, umask=UMASK,
                # only async-signal-safe work between fork and exec (one prctl call)
                preexec_fn=set_pdeathsig if sys.platform.startswith("linux") else None)  # noqa: PLW1509
        proc.stopped = False
        log.debug("started %s (pid %d): %s", proc.name, proc.popen.pid, " ".join(proc.argv))

    def start(self, timeout: float = 60.0) -> None:
        """Start the SuperLink, wait until its port accepts connections, register the node keys
        (``auth``), then start one SuperNode per client."""
        if not self._prepared:
            self.prepare()
        t0 = time.perf_counter()
        self.superlink = self._superlink_proc()
        self._spawn(self.superlink)
        self._wait_port(timeout)
        self._times["superlink_start_s"] = time.perf_counter() - t0
        if self.auth:
            from concurrent.futures import ThreadPoolExecutor

            def register(i: int) -> int:
                out = self.flwr("supernode", "register", str(self._keys[i][1]), CONNECTION,
                                "--name", f"client{i}", "--format", "json",
                                log_name="flwr-register")
                return int(self._json(out, "flwr supernode register")["node-id"])

            with ThreadPoolExecutor(max_workers=4) as pool:  # each call is a Python start-up
                self.node_ids = dict(enumerate(pool.map(register, range(self.num_clients))))
        self.nodes = [self._node_proc(i) for i in range(self.num_clients)]
        for p in self.nodes:
            self._spawn(p)
        self._times["start_s"] = time.perf_counter() - t0
        self._save_state()
        log.info("Flower SuperLink on %s:%d (%s), %d SuperNodes; logs in %s", self.host,
                 self.port, "TLS + node auth" if self.auth else "TLS" if self.tls else "insecure",
                 len(self.nodes), self.logs)

    def _superlink_proc(self) -> _Proc:
        # Flower's flower-superlink, its Control and Runtime APIs for loopback peers only
        argv = [sys.executable, "-m", "mmfl.flower.linkguard", "--host", self.host,
                "--port", str(self.port), "--disable-runtime-dependency-installation"]
        if self.tls:
            f = self._tls_files
            argv += ["--ssl-ca-certfile", str(f.ca_cert), "--ssl-certfile", str(f.server_cert),
                     "--ssl-keyfile", str(f.server_key)]
        else:
            argv.append("--insecure")
        if self.auth:
            argv.append("--enable-supernode-auth")
        # every torch kernel runs on one thread (mmfl.threads); the environment may override
        env = {**ONE_THREAD, **self._env}
        return _Proc("superlink", argv, self.dir / "superlink", self.logs / "superlink.log", env)

    def _wait_port(self, timeout: float) -> None:
        def serving() -> bool:
            if port_open(self.connect_host, self.port):
                return True
            if not self.superlink.alive:
                raise FlowerRunError(
                    f"flower-superlink exited with status {self.superlink.popen.returncode} "
                    f"before serving port {self.port}; see {self.superlink.log}",
                    _tail(self.superlink.log))
            return False

        poll_until(serving, every=0.2, timeout=timeout, expired=lambda: FlowerRunError(
            f"flower-superlink did not open port {self.port} within {timeout:.0f}s; see "
            f"{self.superlink.log}", _tail(self.superlink.log)))

    def _node_proc(self, i: int) -> _Proc:
        used = {self.port} | {self._node_port(p) for p in self.nodes if p is not None}
        argv = [flower_executable("flower-supernode"), "--superlink", self.address,
                "--port", str(free_port(avoid=used)),
                "--node-config", f"client-id={i} data-file={_toml_str(str(self.shards[i]))}"]
        if self.tls:
            argv += ["--root-certificates", str(self._tls_files.ca_cert)]
        else:
            argv.append("--insecure")
        if self.auth:
            argv += ["--auth-supernode-private-key", str(self._keys[i][0])]
        return _Proc(f"node{i}", argv, self.dir / "nodes" / f"node{i}",
                     self.logs / f"node{i}.log", {**self._env, **ONE_THREAD})

    def commands(self) -> str:
        """A shell script of what :meth:`start` and :meth:`submit` run: the SuperLink, the key
        registrations (``auth``), one SuperNode per client and ``flwr run``, with this
        deployment's paths and ports. Written as ``OUT/flower/commands.sh`` by
        ``mmfl flower-local --prepare-only``; the starting point for running the same on
        several machines (docs/flower.md)."""
        import shlex

        if not self._prepared:
            self.prepare()
        link = self._superlink_proc()
        nodes = [self._node_proc(i) for i in range(self.num_clients)]
        envs = " ".join(f"{k}={v}" for k, v in FLOWER_ENV.items() if k != "PYTHONUNBUFFERED")
        lines = [
            "#!/bin/sh",
            (f"# Flower deployment of {self.cfg.name} ({self.num_clients} clients), written "
             "by mmfl flower-local --prepare-only."),
            "# Start each process in its own terminal (or append ' &'), in this order.",
            f"export FLWR_HOME={shlex.quote(str(self.home))} {envs}",
            "# the SuperLink and SuperNodes start flower-superexec from PATH: the same environment",
            f"export PATH={shlex.quote(str(Path(flower_executable('flwr')).parent))}:\"$PATH\"",
            "",
            ("# 1. SuperLink (the server machine); the ServerApp runs in its working directory."
             "\n#    mmfl.flower.linkguard is flower-superlink with the Control and Runtime APIs "
             "for loopback peers only"),
            f"cd {shlex.quote(str(link.cwd))} && {shlex.join(link.argv)}",
        ]
        if self.auth:
            lines += ["", "# 2. register every SuperNode's public key (SuperLink running)"]
            lines += [shlex.join([flower_executable("flwr"), "supernode", "register",
                                  str(pub), CONNECTION])
                      for _, pub in self._keys]
        lines += ["", "# 3. one SuperNode per client (client i's machine needs only its shard"
                  + (", ca.crt" if self.tls else "") + (" and key" if self.auth else "") + ")"]
        lines += [f"OMP_NUM_THREADS=1 {shlex.join(p.argv)}" for p in nodes]
        lines += ["", "# 4. submit the experiment and follow it",
                  shlex.join([flower_executable("flwr"), "run", str(self.dir / "app"),
                              CONNECTION, "--run-config", str(self.dir / "run-config.toml"),
                              "--stream"]),
                  (f"# then: flwr ls {CONNECTION}   flwr log RUN_ID {CONNECTION} --show   "
                   f"flwr stop RUN_ID {CONNECTION}"), ""]
        text = "\n".join(lines)
        path = self.dir / "commands.sh"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)  # owner only
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return text

    # -- 3. the flwr CLI ------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120.0, log_name: str = "flwr",
             check: bool = True) -> str:
        """Run ``flwr ARGS`` with the deployment's FLWR_HOME; returns stdout. Its output is
        appended to ``logs/<log_name>.log``; a non-zero exit raises FlowerRunError (``check``)."""
        argv = [flower_executable("flwr"), *args]
        try:
            r = subprocess.run(argv, check=False, cwd=self.dir,
                               env={**self._env, "COLUMNS": "200"},
                               capture_output=True, text=True, timeout=timeout,
                               start_new_session=True, umask=UMASK)
        except subprocess.TimeoutExpired:
            raise FlowerRunError(
                f"`flwr {' '.join(args)}` did not answer within {timeout:.0f}s") from None
        with contextlib.suppress(OSError), private_files(), \
                open(self.logs / f"{log_name}.log", "a") as f:
            f.write(f"$ flwr {' '.join(args)}  (exit {r.returncode})\n{r.stdout}{r.stderr}\n")
        if check and r.returncode != 0:
            raise FlowerRunError(f"`flwr {' '.join(args[:2])}` failed (exit {r.returncode}); "
                                 f"see {self.logs / (log_name + '.log')}",
                                 (r.stdout + r.stderr).strip()[-3000:])
        return r.stdout

    @staticmethod
    def _json(text: str, what: str) -> dict:
        start = text.find("{")
        try:
            obj = json.loads(text[start:]) if start >= 0 else None
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            raise FlowerRunError(f"{what}: unexpected output", text.strip()[-2000:])
        if obj.get("success") is False:
            raise FlowerRunError(f"{what} failed: {obj.get('error-message', obj)}")
        return obj

    def _write_run_config(self) -> None:
        (self.dir / "run-config.toml").write_text("\n".join([
            f"config-file = {_toml_str(str(self.dir / 'experiment.toml'))}",
            f"out-dir = {_toml_str(str(self.out))}",
            f"round-timeout = {self.round_timeout!r}",
            f"nodes = {self.num_clients}",
            f"node-wait = {self.node_wait!r}",
            f"resume = {'true' if self.resume else 'false'}",
            f"identity-file = {_toml_str(str(self.dir / 'identity.json'))}",
        ]) + "\n", encoding="utf-8")

    def submit(self) -> str:
        """``flwr run`` the app with the run config (``run-config.toml``: config-file, out-dir,
        round-timeout, nodes, node-wait, resume, identity-file); returns the run id."""
        self._submitted_at = time.time()
        out = self.flwr("run", str(self.dir / "app"), CONNECTION, "--run-config",
                        str(self.dir / "run-config.toml"), "--format", "json",
                        log_name="flwr-run")
        self.run_id = str(self._json(out, "flwr run")["run-id"])
        self._t_submit = time.perf_counter()
        self.status = "submitted"
        self._save_state()
        log.info("submitted Flower run %s", self.run_id)
        return self.run_id

    def run_status(self) -> str:
        """The run's status from ``flwr ls``: ``pending``, ``starting``, ``running`` or
        ``finished:completed|failed|stopped``."""
        out = self.flwr("ls", CONNECTION, "--run-id", str(self.run_id), "--format", "json",
                        log_name="flwr-ls", timeout=60.0)
        runs = self._json(out, "flwr ls").get("runs") or []
        for r in runs:
            if str(r.get("run-id")) == str(self.run_id):
                return str(r.get("status"))
        raise FlowerRunError(f"flwr ls: run {self.run_id} not found", out[-2000:])

    def server_log(self) -> str:
        """The ServerApp's captured output (``flwr log --show``), also saved as
        ``logs/serverapp.log``."""
        out = self.flwr("log", str(self.run_id), CONNECTION, "--show", log_name="flwr-log",
                        check=False, timeout=60.0)
        out = _ANSI.sub("", out)
        with contextlib.suppress(OSError):
            (self.logs / "serverapp.log").write_text(out, encoding="utf-8")
        return out

    # -- 4. following the run -------------------------------------------------------------------
    def rounds_done(self) -> list[dict[str, str]]:
        """Rows of ``OUT/rounds.csv`` written so far (one per completed round)."""
        path = self.out / "rounds.csv"
        try:
            with open(path, newline="", encoding="utf-8") as f:
                return [r for r in csv.DictReader(f) if r.get("round")]
        except OSError:
            return []

    def _check_processes(self) -> None:
        if self.superlink is not None and not self.superlink.alive:
            raise self._superlink_died()
        for p in self.nodes:
            if not p.stopped and not p.alive:
                p.stopped = True  # report once; the ServerApp copes with the missing node
                log.warning("SuperNode %s exited (status %s); see %s", p.name,
                            p.popen.returncode, p.log)

    def _superlink_died(self) -> FlowerRunError:
        """The error for a SuperLink that exited mid-run; a ``summary.json`` that still says
        ``running`` is marked ``failed`` with the same reason (its ServerApp died with it)."""
        from mmfl.experiment.results import write_json

        reason = f"flower-superlink exited (code {self.superlink.popen.returncode})"
        self.status = "failed: " + reason
        self._save_state()
        path = self.out / "summary.json"
        with contextlib.suppress(OSError, ValueError, AttributeError):
            summary = json.loads(path.read_text(encoding="utf-8"))
            if summary.get("status") == "running":
                write_json(path, {**summary, "status": "failed", "error": reason})
        return FlowerRunError(f"{reason}; see {self.superlink.log}")

    def _summary_status(self) -> str | None:
        """``status`` of ``OUT/summary.json`` if the ServerApp wrote it since the submission
        (``running`` between evaluations; ``completed``/``failed`` at the end), else None."""
        path = self.out / "summary.json"
        try:
            if path.stat().st_mtime < self._submitted_at:
                return None
            return str(json.loads(path.read_text(encoding="utf-8")).get("status"))
        except (OSError, ValueError, AttributeError):
            return None

    def wait(self, *, progress: Callable[[RunProgress], None] | None = None,
             poll: float = 1.0, status_every: float = 10.0,
             timeout: float | None = None) -> dict[str, Any]:
        """Follow the run until Flower reports it finished; returns ``summary.json``.

        ``progress`` is called once per newly completed round (from ``rounds.csv``). Raises
        FlowerRunError (with the ServerApp's log tail in ``details``) when the run ends other
        than ``finished:completed``, a process dies, or ``timeout`` seconds pass.
        """
        seen = len(self.rounds_done()) if self.resume else 0

        def report() -> int:
            self._report_rejections()
            rows = self.rounds_done()
            for k in range(seen, len(rows)):
                if progress is not None:
                    progress(RunProgress(self.cfg.rounds, int(rows[k]["round"]), rows[k],
                                         time.perf_counter() - self._t_submit))
            return max(seen, len(rows))

        self._status_at = -float("inf")  # ask at once

        def finished() -> bool:
            nonlocal seen
            seen = report()
            self._check_processes()
            # `flwr ls` costs a Python start-up: ask every status_every seconds (to notice a
            # failure), and at once when summary.json says the experiment is over
            ended = self._summary_status() not in (None, "running")
            return self._finished(status_every, now=ended)

        poll_until(finished, every=poll, timeout=timeout, expired=lambda: FlowerRunError(
            f"run {self.run_id} did not finish within {timeout:.0f}s (status {self.status})"))
        seen = report()  # rows written between the last look and the end of the run
        self._times["run_s"] = time.perf_counter() - self._t_submit
        self._save_state()
        completed = self.status == "finished:completed"
        # the ServerApp's log explains a failure; after success it is only kept with keep_logs
        text = self.server_log() if not completed or self.keep_logs else ""
        if not completed:
            raise FlowerRunError(
                f"Flower run {self.run_id} ended {self.status}; ServerApp log in "
                f"{self.logs / 'serverapp.log'}", _server_traceback(text))
        try:
            return json.loads((self.out / "summary.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise FlowerRunError(f"run {self.run_id} completed but {self.out / 'summary.json'} "
                                 f"cannot be read ({e})", _server_traceback(text)) from None

    def _report_rejections(self) -> None:
        """Log the records the ServerApp appended to ``rejected.jsonl`` since the last look,
        so refused nodes and rejected replies show in this command's output too."""
        try:
            with open(self.dir / "rejected.jsonl", encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            return
        for line in lines[self._rejections_seen:]:
            with contextlib.suppress(ValueError, AttributeError):
                r = json.loads(line)
                log.warning("Flower: rejected %s from node %s (client %s): %s", r.get("what"),
                            r.get("node"), r.get("client"), r.get("reason"))
        self._rejections_seen = max(self._rejections_seen, len(lines))

    def wait_round(self, r: int, timeout: float = 300.0) -> None:
        """Block until ``rounds.csv`` holds round ``r`` (for fault injection in tests)."""
        self._status_at = time.monotonic()

        def reached() -> bool:
            if len(self.rounds_done()) >= r:
                return True
            self._check_processes()
            if self._finished(4.0):
                raise FlowerRunError(f"Flower run {self.run_id} ended {self.status} before "
                                     f"round {r}", _server_traceback(self.server_log()))
            return False

        poll_until(reached, every=0.3, timeout=timeout, expired=lambda: FlowerRunError(
            f"round {r} not finished within {timeout:.0f}s"))

    def _finished(self, every: float, *, now: bool = False) -> bool:
        """Whether Flower reports the run finished; ``self.status`` is refreshed with
        ``flwr ls`` only when ``every`` seconds have passed since the last look, or ``now``."""
        if now or time.monotonic() - self._status_at >= every:
            self._status_at = time.monotonic()
            try:
                self.status = self.run_status()
            except FlowerRunError:  # `flwr ls` fails when the SuperLink is gone: say that
                if self.superlink is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.superlink.popen.wait(timeout=3)
                    if not self.superlink.alive:
                        raise self._superlink_died() from None
                raise
        return self.status is not None and self.status.startswith("finished")

    def run(self, *, progress: Callable[[RunProgress], None] | None = None,
            timeout: float | None = None) -> dict[str, Any]:
        """prepare + start + submit + wait; returns the summary. Use inside ``with``."""
        if not self._prepared:
            self.prepare()
        if self.superlink is None:
            self.start()
        self.submit()
        return self.wait(progress=progress, timeout=timeout)

    # -- 5. faults ------------------------------------------------------------------------------
    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Kill SuperNode ``i`` and everything it started (its process group), as a crash."""
        p = self.nodes[i]
        p.stopped = True
        tree = descendants(p.popen.pid)  # its superexec and ClientApps run in other sessions
        self._signal_group(p, sig)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(timeout=10)
        log.info("killed SuperNode %s (client %d)", p.name, i)

    def restart_node(self, i: int) -> None:
        """Start SuperNode ``i`` again (same client id, data and key; a fresh runtime port).
        Without ``auth`` it joins under a new node id; with ``auth`` under its registered id,
        once the SuperLink has noticed the old connection is gone (FLOWER-NOTES s. 6)."""
        old = self.nodes[i]
        if old.alive:
            raise MmflError(f"SuperNode {old.name} is still running")
        self.nodes[i] = self._node_proc(i)
        self._spawn(self.nodes[i])
        self._save_state()
        log.info("restarted SuperNode node%d", i)

    # -- 6. stopping ----------------------------------------------------------------------------
    def processes(self) -> list[int]:
        """PIDs of every live process of this deployment (children and their descendants)."""
        return marked_processes(self.token)

    @staticmethod
    def _signal_group(p: _Proc, sig: int) -> None:
        if p.popen is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.popen.pid, sig)  # pgid == pid: start_new_session=True

    def stop(self, *, completed: bool = False) -> None:
        """Stop every process of the deployment: SIGTERM to each process group (SuperNodes
        first), wait up to ``grace`` seconds, SIGKILL the groups, then kill any process still
        carrying the marker. SIGINT, SIGTERM and SIGHUP are ignored meanwhile. After a
        completed run the working
        files are removed (see the module docstring)."""
        t0 = time.perf_counter()
        procs = [p for p in (*self.nodes, self.superlink) if p is not None and p.popen]
        saved: dict[int, Any] = {}  # a second Ctrl-C or SIGTERM must not cut the cleanup short
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                with contextlib.suppress(ValueError, OSError):
                    saved[sig] = signal.signal(sig, signal.SIG_IGN)
        try:
            for p in procs:
                self._signal_group(p, signal.SIGTERM)
            deadline = time.monotonic() + self.grace
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.popen.wait(timeout=max(0.05, deadline - time.monotonic()))
            for p in procs:  # leaders gone, but group members (superexec, apps) may remain
                self._signal_group(p, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.popen.wait(timeout=5)
            # Flower starts flower-superexec and the app processes in sessions of their own:
            # find them by the marker; SIGTERM first, then SIGKILL.
            left = self.processes()
            for k in range(40):
                if not left:
                    break
                sig = signal.SIGTERM if k < 20 else signal.SIGKILL
                log.debug("stopping leftover Flower processes %s (signal %d)", left, sig)
                for pid in left:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)
                time.sleep(0.1)
                left = self.processes()
            if left:
                log.warning("Flower processes still alive after stop: %s", left)
            self._stop_watchdog()
            self._times["stop_s"] = time.perf_counter() - t0
            log.debug("stopped %d Flower processes in %.1fs", len(procs), self._times["stop_s"])
            self._save_state()
            if completed and self.dir.exists():
                self._clean(keep_logs=self.keep_logs)
        finally:
            for sig, handler in saved.items():
                with contextlib.suppress(ValueError, OSError, TypeError):
                    signal.signal(sig, handler)

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

    def _clean(self, *, keep_logs: bool) -> None:
        """Remove the working files mmfl created except :data:`~mmfl.flower.workdir.KEPT`
        (and ``logs`` with ``keep_logs``); anything else in OUT/flower stays."""
        self.workdir.clean(set(KEPT) | ({"logs"} if keep_logs else set()))


def _server_traceback(text: str, lines: int = 40) -> str:
    """The last traceback in a ServerApp log (else its tail)."""
    body = text.rstrip().splitlines()
    for k in range(len(body) - 1, -1, -1):
        if body[k].startswith("Traceback"):
            return "\n".join(body[k:k + 200][-lines * 2:])
    return "\n".join(body[-lines:])
