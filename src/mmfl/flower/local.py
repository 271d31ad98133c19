"""``mmfl flower-local``: a real Flower deployment of one experiment on this machine.

:class:`LocalDeployment` starts one ``flower-superlink`` and one ``flower-supernode`` per client
as separate processes on loopback, submits mmfl's Flower app with ``flwr run``, follows the run
until Flower reports it finished, and stops every process it started, whatever happens
(success, failure, exception, Ctrl-C, SIGTERM). Its parts live in modules of their own: the
processes and how they are stopped (:mod:`mmfl.flower.processes`), the ``flwr`` command line
(:mod:`mmfl.flower.flwr_cli`), reading the run's files while it runs
(:mod:`mmfl.flower.follow`) and the private working folder (:mod:`mmfl.flower.workdir`).

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
written and in every process started), not changed afterwards (:mod:`mmfl.flower.workdir`). A
name mmfl needs that exists without being listed in ``.mmfl-created`` (a user's file) is a
one-line ResultsError; other files in ``OUT/flower`` are left alone. After a completed run the
listed names are removed except ``deployment.json``, ``rejected.jsonl`` (and ``logs/`` with
``keep_logs``); after a failure or interruption all of it is kept for diagnosis.

The SuperLink runs through :mod:`mmfl.flower.linkguard`: its Control and Runtime APIs answer
loopback peers only, even with ``host = 0.0.0.0``.

Nothing of a deployment survives it: every process carries the deployment's marker and is
stopped by group and by marker, with a watchdog for the case that this process is killed
(:mod:`mmfl.flower.processes`). When the SuperLink dies mid-run, the run fails with
"flower-superlink exited (code N)", and a ``summary.json`` still saying ``running`` is marked
``failed`` with that reason.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

from mmfl.errors import ConfigError, MmflError, ResultsError
from mmfl.experiment.recording import Callback
from mmfl.flower.flwr_cli import (CONNECTION, FLOWER_ENV, FlowerRunError, FlwrCli,
                                  flower_executable, server_traceback, toml_str,
                                  write_connection)
from mmfl.flower.follow import RunFollower, RunProgress
from mmfl.flower.launch import commands_script, superlink_argv, supernode_argv
from mmfl.flower.processes import (MARKER, Proc, Processes, Terminated, free_port,
                                   marked_processes, port_open, signals_ignored, tail,
                                   terminate_on_signals)
from mmfl.flower.workdir import KEPT, WorkDir, copy_app, private_files
from mmfl.supervisor import ONE_THREAD, poll_until

__all__ = ["APP_DIR", "CONNECTION", "FLOWER_ENV", "MARKER", "FlowerRunError", "LocalDeployment",
           "RunProgress", "Terminated", "check_host", "check_seconds", "flower_executable",
           "free_port", "marked_processes"]

log = logging.getLogger(__name__)

#: The hand-written Flower app shipped with mmfl (pyproject.toml only; the components are
#: ``mmfl.flower.server:server_app`` and ``mmfl.flower.client:client_app``).
APP_DIR = Path(__file__).resolve().parent / "fab"

#: Seconds between two lines saying that the run waits for its ServerApp to report.
WAITING_EVERY = 5.0
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


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
        self.token = uuid.uuid4().hex
        self.dir = self.out / "flower"
        self.logs = self.dir / "logs"
        self.home = self.dir / "home"
        self.procs = Processes(self.token, grace)  # every process of the deployment
        self.superlink: Proc | None = None
        self.nodes: list[Proc] = []
        self.shards: list[Path] = []
        self.node_ids: dict[int, int] = {}   # client id -> node id (auth mode)
        self.run_id: str | None = None
        self.status: str | None = None
        self.env: dict[str, str] = {}  # of every process and flwr call (set by prepare)
        self.cli = FlwrCli(self.dir, self.logs, self.env)
        self.follower = RunFollower(self.out)
        self.federation = None  # built by prepare (the shards', and the callbacks' on_start)
        self._tls_files = None
        self._keys: list[tuple[Path, Path]] = []  # (private, public) key file per SuperNode
        self._prepared = False
        self._t_submit = 0.0
        self._submitted_at = float("inf")
        self._times: dict[str, float] = {}
        self._signals: contextlib.ExitStack | None = None
        self._status_at = 0.0  # monotonic time of the last `flwr ls`
        self.workdir = WorkDir(self.dir)  # OUT/flower: private, ours only once claimed

    # -- context manager: always stop ---------------------------------------------------------
    def __enter__(self) -> Self:
        self._signals = contextlib.ExitStack()
        self._signals.enter_context(terminate_on_signals())
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.stop(completed=exc_type is None and self.status == "finished:completed")
        finally:
            if self._signals is not None:
                self._signals.close()
                self._signals = None

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
        from mmfl.flower.shards import shard_federation

        t0 = time.perf_counter()
        check_out_dir(self.cfg, self.out, resume=self.resume)
        if not (self.app_dir / "pyproject.toml").is_file():
            raise MmflError(f"{self.app_dir}: Flower app directory without pyproject.toml")
        bindir = str(Path(flower_executable("flower-superlink")).parent)  # Flower installed?
        if self.port is not None and port_open(self.connect_host, self.port):
            raise ConfigError("--port", "is in use on this machine", self.port)
        data_dir = resolve_data_dir(self.cfg, self.data_dir)
        federation = self.federation = build_federation(self.cfg, data_dir)
        try:
            self.out.mkdir(parents=True, exist_ok=True)  # the run directory: not ours to restrict
            with private_files():  # shards without refused pairs' data (clients.preferences)
                self._write_files(shard_federation(self.cfg, federation))
        except OSError as e:
            raise ResultsError(f"{e.filename or self.dir}: cannot write the deployment's files "
                               f"({e.strerror or e})") from None
        self.env.clear()  # shared with self.cli
        self.env.update({**os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.home),
                         MARKER: self.token,  # Flower starts flower-superexec etc. from PATH:
                         "PATH": bindir + os.pathsep + os.environ.get("PATH", "")})
        self._prepared = True
        self._times["prepare_s"] = time.perf_counter() - t0
        self._save_state()

    def _write_files(self, federation) -> None:
        """Everything :meth:`prepare` writes under ``OUT/flower`` (see the module docstring)."""
        from mmfl.experiment import tomlio
        from mmfl.flower.shards import write_identity

        self.workdir.claim()
        self.follower.skip_rejections()  # earlier attempts' records were reported then
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
        write_connection(self.home, self.address,
                         self._tls_files.ca_cert if self.tls else None)
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

    def _write_run_config(self) -> None:
        (self.dir / "run-config.toml").write_text("\n".join([
            f"config-file = {toml_str(str(self.dir / 'experiment.toml'))}",
            f"out-dir = {toml_str(str(self.out))}",
            f"round-timeout = {self.round_timeout!r}",
            f"nodes = {self.num_clients}",
            f"node-wait = {self.node_wait!r}",
            f"resume = {'true' if self.resume else 'false'}",
            f"identity-file = {toml_str(str(self.dir / 'identity.json'))}",
        ]) + "\n", encoding="utf-8")

    def _save_state(self) -> None:
        if not self.workdir.claimed:  # never write into a folder mmfl did not claim
            return
        state = {
            "superlink": f"{self.host}:{self.port}", "connection": CONNECTION,
            "tls": self.tls, "auth": self.auth, "run_id": self.run_id, "status": self.status,
            "round_timeout": self.round_timeout,
            "nodes": [{"client": i, "port": p.port, "node_id": self.node_ids.get(i)}
                      for i, p in enumerate(self.nodes)],
            **{k: round(v, 3) for k, v in self._times.items()},
        }
        with contextlib.suppress(OSError), private_files():
            (self.dir / "deployment.json").write_text(json.dumps(state, indent=2) + "\n",
                                                     encoding="utf-8")

    # -- 2. processes ---------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        """Start the SuperLink, wait until its port accepts connections, register the node keys
        (``auth``), then start one SuperNode per client."""
        if not self._prepared:
            self.prepare()
        t0 = time.perf_counter()
        self.superlink = self._superlink_proc()
        self.procs.spawn(self.superlink)
        self._wait_port(timeout)
        self._times["superlink_start_s"] = time.perf_counter() - t0
        if self.auth:
            from concurrent.futures import ThreadPoolExecutor

            def register(i: int) -> int:
                return self.cli.register(self._keys[i][1], f"client{i}")

            with ThreadPoolExecutor(max_workers=4) as pool:  # each call is a Python start-up
                self.node_ids = dict(enumerate(pool.map(register, range(self.num_clients))))
        self.nodes = [self._node_proc(i) for i in range(self.num_clients)]
        for p in self.nodes:
            self.procs.spawn(p)
        self._times["start_s"] = time.perf_counter() - t0
        self._save_state()
        log.info("Flower SuperLink on %s:%d (%s), %d SuperNodes; logs in %s (%s)", self.host,
                 self.port, "TLS + node auth" if self.auth else "TLS" if self.tls else "insecure",
                 len(self.nodes), self.logs, "kept" if self.keep_logs else
                 "kept if the run fails; --keep-logs keeps them after a completed run")

    def _superlink_proc(self) -> Proc:
        argv = superlink_argv(self.host, self.port, self._tls_files, self.auth)
        # every torch kernel runs on one thread (mmfl.threads); the environment may override
        env = {**ONE_THREAD, **self.env}
        return Proc("superlink", argv, self.dir / "superlink", self.logs / "superlink.log", env)

    def _wait_port(self, timeout: float) -> None:
        def serving() -> bool:
            if port_open(self.connect_host, self.port):
                return True
            if not self.superlink.alive:
                raise FlowerRunError(
                    f"flower-superlink exited with status {self.superlink.popen.returncode} "
                    f"before serving port {self.port}; see {self.superlink.log}",
                    tail(self.superlink.log))
            return False

        poll_until(serving, every=0.2, timeout=timeout, expired=lambda: FlowerRunError(
            f"flower-superlink did not open port {self.port} within {timeout:.0f}s; see "
            f"{self.superlink.log}", tail(self.superlink.log)))

    def _node_proc(self, i: int) -> Proc:
        used = {self.port} | {p.port for p in self.nodes if p is not None}
        argv = supernode_argv(self.address, free_port(avoid=used), i, self.shards[i],
                              self._tls_files.ca_cert if self.tls else None,
                              self._keys[i][0] if self.auth else None)
        return Proc(f"node{i}", argv, self.dir / "nodes" / f"node{i}",
                    self.logs / f"node{i}.log", {**self.env, **ONE_THREAD})

    def commands(self) -> str:
        """A shell script of what :meth:`start` and :meth:`submit` run: the SuperLink, the key
        registrations (``auth``), one SuperNode per client and ``flwr run``, with this
        deployment's paths and ports (:func:`mmfl.flower.launch.commands_script`). Written as
        ``OUT/flower/commands.sh`` by ``mmfl flower-local --prepare-only``; the starting point
        for running the same on several machines (docs/flower.md)."""
        if not self._prepared:
            self.prepare()
        text = commands_script(self.cfg.name, self.home, self._superlink_proc(),
                               [self._node_proc(i) for i in range(self.num_clients)],
                               [pub for _, pub in self._keys], tls=self.tls,
                               app=self.dir / "app", run_config=self.dir / "run-config.toml")
        fd = os.open(self.dir / "commands.sh", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
        with os.fdopen(fd, "w", encoding="utf-8") as f:  # owner only
            f.write(text)
        return text

    # -- 3. the run -----------------------------------------------------------------------------
    def submit(self) -> str:
        """``flwr run`` the app with the run config (``run-config.toml``: config-file, out-dir,
        round-timeout, nodes, node-wait, resume, identity-file); returns the run id."""
        self._submitted_at = time.time()
        self.run_id = self.cli.submit(self.dir / "app", self.dir / "run-config.toml")
        self._t_submit = time.perf_counter()
        self.status = "submitted"
        self._save_state()
        log.info("submitted Flower run %s", self.run_id)
        return self.run_id

    def run_status(self) -> str:
        """The run's status from ``flwr ls``: ``pending``, ``starting``, ``running`` or
        ``finished:completed|failed|stopped``."""
        return self.cli.status(self.run_id)

    def server_log(self) -> str:
        """The ServerApp's captured output (``flwr log --show``), also saved as
        ``logs/serverapp.log``."""
        out = self.cli.server_log(self.run_id)
        with contextlib.suppress(OSError):
            (self.logs / "serverapp.log").write_text(out, encoding="utf-8")
        return out

    # -- 4. following the run -------------------------------------------------------------------
    def rounds_done(self) -> list[dict[str, str]]:
        """Rows of ``OUT/rounds.csv`` written so far (one per completed round)."""
        return self.follower.rounds_done()

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
        with contextlib.suppress(OSError, ValueError, AttributeError):
            summary = self.follower.summary()
            if summary.get("status") == "running":
                write_json(self.out / "summary.json",
                           {**summary, "status": "failed", "error": reason})
        return FlowerRunError(f"{reason}; see {self.superlink.log}")

    def wait(self, *, progress: Callable[[RunProgress], None] | None = None,
             callbacks: Sequence[Callback] = (), poll: float = 1.0, status_every: float = 10.0,
             timeout: float | None = None) -> dict[str, Any]:
        """Follow the run until Flower reports it finished; returns ``summary.json``.

        ``callbacks`` get the ServerApp's callback events as ``mmfl run``'s do (``on_start``,
        ``on_round`` with each round's record, ``on_end`` with the summary of a completed
        run; relayed through ``progress.jsonl``, :mod:`mmfl.flower.follow`). ``progress`` is
        called once per newly completed round (from ``rounds.csv``). Until the ServerApp
        reports, a line every :data:`WAITING_EVERY` seconds says what the run waits for.
        Raises FlowerRunError (with the ServerApp's log tail in ``details``) when the run ends
        other than ``finished:completed``, a process dies, or ``timeout`` seconds pass.
        """
        seen = len(self.rounds_done()) if self.resume else 0
        heard = False  # an event from the ServerApp so far
        said = time.monotonic()  # the last "waiting" line

        def report() -> int:
            nonlocal heard, said
            self.follower.report_rejections()
            heard = self.follower.relay(callbacks, self.cfg, self.federation) > 0 or heard
            if not heard and time.monotonic() - said >= WAITING_EVERY:
                said = time.monotonic()
                log.info("Flower run %s %s: waiting for the ServerApp (%.0f s)", self.run_id,
                         self.status, time.perf_counter() - self._t_submit)
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
            ended = self.follower.summary_status(self._submitted_at) not in (None, "running")
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
                f"{self.logs / 'serverapp.log'}", server_traceback(text))
        try:
            summary = self.follower.summary()
        except (OSError, json.JSONDecodeError) as e:
            raise FlowerRunError(f"run {self.run_id} completed but {self.out / 'summary.json'} "
                                 f"cannot be read ({e})", server_traceback(text)) from None
        for cb in callbacks:
            cb.on_end(summary)
        return summary

    def wait_round(self, r: int, timeout: float = 300.0) -> None:
        """Block until ``rounds.csv`` holds round ``r`` (for fault injection in tests)."""
        self._status_at = time.monotonic()

        def reached() -> bool:
            if len(self.rounds_done()) >= r:
                return True
            self._check_processes()
            if self._finished(4.0):
                raise FlowerRunError(f"Flower run {self.run_id} ended {self.status} before "
                                     f"round {r}", server_traceback(self.server_log()))
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
            callbacks: Sequence[Callback] = (), timeout: float | None = None) -> dict[str, Any]:
        """prepare + start + submit + wait (see :meth:`wait` for ``progress`` and
        ``callbacks``); returns the summary. Use inside ``with``."""
        if not self._prepared:
            self.prepare()
        if self.superlink is None:
            self.start()
        self.submit()
        return self.wait(progress=progress, callbacks=callbacks, timeout=timeout)

    # -- 5. faults ------------------------------------------------------------------------------
    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Kill SuperNode ``i`` and everything it started (its process group), as a crash."""
        self.procs.kill(self.nodes[i], sig)
        log.info("killed SuperNode %s (client %d)", self.nodes[i].name, i)

    def restart_node(self, i: int) -> None:
        """Start SuperNode ``i`` again (same client id, data and key; a fresh runtime port).
        Without ``auth`` it joins under a new node id; with ``auth`` under its registered id,
        once the SuperLink has noticed the old connection is gone (FLOWER-NOTES s. 6)."""
        old = self.nodes[i]
        if old.alive:
            raise MmflError(f"SuperNode {old.name} is still running")
        self.nodes[i] = self._node_proc(i)
        self.procs.spawn(self.nodes[i])
        self._save_state()
        log.info("restarted SuperNode node%d", i)

    # -- 6. stopping ----------------------------------------------------------------------------
    def processes(self) -> list[int]:
        """PIDs of every live process of this deployment (children and their descendants)."""
        return self.procs.alive()

    def stop(self, *, completed: bool = False) -> None:
        """Stop every process of the deployment (:meth:`Processes.stop
        <mmfl.flower.processes.Processes.stop>`: SuperNodes first, then the SuperLink, then
        whatever still carries the marker). SIGINT, SIGTERM and SIGHUP are ignored meanwhile.
        After a completed run the working files are removed (see the module docstring)."""
        with signals_ignored():  # a second Ctrl-C or SIGTERM must not cut the cleanup short
            t0 = time.perf_counter()
            self.procs.stop([*self.nodes, self.superlink])
            self._times["stop_s"] = time.perf_counter() - t0
            log.debug("stopped the Flower processes in %.1fs", self._times["stop_s"])
            self._save_state()
            if completed and self.dir.exists():
                # the working files mmfl created, except KEPT (and logs with keep_logs)
                self.workdir.clean(set(KEPT) | ({"logs"} if self.keep_logs else set()))
