"""mmfl's Flower ServerApp and the ``flower`` engine it drives.

``server_app`` runs one whole mmfl experiment: the ordinary :class:`~mmfl.experiment.runner.
Runner` (allocator, aggregator, evaluation on the test sets, the usual run directory), with
local training done by the ClientApps through :class:`FlowerEngine`. Its run config
(``context.run_config``, deployment):

* ``config-file`` (str): absolute path of the resolved mmfl config.toml;
* ``out-dir`` (str): absolute path of the run directory to write;
* ``round-timeout`` (float seconds): overrides ``flower.round_timeout`` (0 = no limit);
* ``nodes`` (int): SuperNodes to wait for before round 1 (0 = one per client, N);
* ``node-wait`` (float seconds): how long to wait for them (overrides ``flower.node_wait``);
* ``resume`` (bool): continue the run directory's last checkpoint;
* ``identity-file`` (str): absolute path of the deployment's identity file
  (:func:`mmfl.flower.shards.write_identity`: each client's shard fingerprint and, with
  ``--auth``, its SuperNode's public-key digest); "" = check n_{i,s} only.

Any error raises out of the ServerApp, so the Flower run ends as ``finished:failed``.

The server builds the federation from the config too (test sets for evaluation, n_{i,s} and B_i
for the allocator); the clients train from their own shards, with the training settings the
server sends in every message.

Node identity (nothing a node says about itself is taken on trust). At discovery a node
claims a client i; the claim is refused when i is not a client of the federation, when the
node's n_{i,s} or its shard's SHA-256 differ from the fingerprint the server knows, when the
identity file binds client i to a public key and the node's registered key (Flower's
``NodeInfo.public_key``, ``--auth`` only) is another, or when another node already serves
client i and still answers (a second claim; a node that no longer answers is replaced, which
is how a restarted SuperNode comes back). A refused node is never asked again. Every refused
node and every rejected reply (one that does not match its request: other client or tasks,
wrong shapes, missing fields) is logged and appended to the rejection file
(``OUT/flower/rejected.jsonl``, one JSON object per line: ``time``, ``round``, ``node``,
``what``, ``client``, ``reason``); a rejected reply's pairs are missing.

Faults. A pair whose node does not reply within the round timeout, or replies with an error
(Flower's NODE_UNAVAILABLE, code 5, for a node the SuperLink has declared dead; code 2 for an
exception in the ClientApp), is *missing*: :meth:`FlowerEngine.train` returns only the pairs
that answered, and the runner drops the missing ones from the assignment exactly like
stragglers past the deadline (``missing`` in rounds.csv and a note). The aggregation stays
well defined (the remaining slots keep their coefficients d / (B p)), but it is unbiased only
if failures are independent of the updates: like dropped stragglers, missing pairs make the
estimate missing-not-at-random when, e.g., clients with large data (slow) fail more often.
Errors are mapped to pairs through ``reply_to_message_id`` (never ``src_node_id``, which is the
SuperLink's for NODE_UNAVAILABLE). Node ids are mapped to clients by a ``query.discover``
message answered from the node config; new node ids are discovered at the start of every
round, so a SuperNode that restarts (new node id) is used again.

Updates are passed on as the nodes computed them (finite or not): the runner validates every
update centrally, in every engine.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from mmfl.engines.base import Engine, TrainOutput, check_corrections
from mmfl.errors import ConfigError, MmflError
from mmfl.experiment.config import FLOWER
from mmfl.flower import messages as M
from mmfl.flower.follow import PROGRESS, ProgressWriter, nodes_message
from mmfl.flower.identity import REJECTED, Claims, RejectionLog, node_keys

log = logging.getLogger(__name__)

#: Seconds between two polls for replies (or nodes): the first wait, growing by half each poll
#: up to the last, so a fast simulation round is not held up (a reply waits at most 0.1 s to be
#: collected) and a slow deployment round asks the SuperLink at most 10 times a second.
POLL = (0.005, 0.1)


def _polls():
    """Waits between polls: POLL[0], growing geometrically to POLL[1]."""
    wait = POLL[0]
    while True:
        yield wait
        wait = min(wait * 1.5, POLL[1])


#: A node that did not answer discovery is asked again this many rounds later.
RETRY_AFTER = 3
#: Seconds between two progress lines while the engine waits for its nodes before round 1.
PROGRESS_EVERY = 5.0


class FlowerError(MmflError):
    """The Flower federation cannot run the experiment (e.g. nodes never connected)."""


@dataclass(frozen=True)
class FlowerSettings:
    """How :class:`FlowerEngine` talks to the nodes (from ``[flower]`` and the run config;
    defaults from the ``[flower]`` Option table, :data:`mmfl.experiment.config.FLOWER`).

    Attributes:
        round_timeout: seconds to wait for a round's replies; 0 = no limit.
        pack: ``"pair"`` (one message per (client, task)) or ``"node"`` (one per client).
        nodes: SuperNodes to wait for at start (0 = N, one per client).
        node_wait: seconds to wait for them.
        shard_dir: simulation only: the folder of the client shards, sent in every message.
        identity_file: the identity file (:func:`mmfl.flower.shards.write_identity`) the
            nodes' claims are checked against; "" = n_{i,s} only.
        rejected_file: where refused nodes and rejected replies are appended (JSON lines,
            created on the first one); "" = the log only.
        progress_file: where the wait for the nodes is reported besides the log (``nodes``
            events of :mod:`mmfl.flower.follow`, for ``mmfl flower-local``); "" = the log only.
    """

    round_timeout: float = FLOWER["round_timeout"].default
    pack: str = FLOWER["pack"].default
    nodes: int = 0
    node_wait: float = FLOWER["node_wait"].default
    shard_dir: str = ""
    identity_file: str = ""
    rejected_file: str = ""
    progress_file: str = ""

    @classmethod
    def from_config(cls, cfg, **overrides) -> FlowerSettings:
        f = cfg.flower
        base = {"round_timeout": f.round_timeout, "pack": f.pack, "node_wait": f.node_wait}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


class _NodeWait:
    """Progress of the wait for the nodes before round 1: a log line (and, with a progress
    file, a ``nodes`` event) at the first call, then at most every :data:`PROGRESS_EVERY`
    seconds, and always for ``force``."""

    def __init__(self, file: str):
        self.file = file
        self.t0 = time.monotonic()
        self.last = -math.inf

    def __call__(self, phase: str, have: int, want: int, *, force: bool = False, **extra):
        now = time.monotonic()
        if not force and now - self.last < PROGRESS_EVERY:
            return
        self.last = now
        event = {"event": "nodes", "phase": phase, "have": int(have), "want": int(want),
                 "seconds": round(now - self.t0, 1), **extra}
        log.info("flower: %s", nodes_message(event))
        if self.file:
            ProgressWriter(self.file).write(event)


@dataclass
class _Sent:
    """One pushed message: its client and the task indices it carries."""

    client: int
    tasks: list[int]


class FlowerEngine(Engine):
    """Engine ``flower``: local training by the ClientApps of a Flower grid.

    Evaluation (:meth:`evaluate`), :meth:`apply` and the model bookkeeping are the base
    engine's, on the server. :meth:`train` sends the pairs to their nodes and returns a
    :class:`TrainOutput` with the pairs that answered (see the module docstring on faults);
    :meth:`probe_losses` asks the nodes too (``query.probe``) and gives NaN for a pair whose
    node did not answer (the runner then treats that client as offline for the round).
    Models with buffers: the base engine's b_s and b_{i,s} stay here, on the server; each
    message carries the buffers its pair starts from and the reply those it ended with
    (:mod:`mmfl.flower.messages`), so :meth:`absorb_buffers` works as for the local engines.

    ``stop``: when this event is set (the simulation host was interrupted), waiting for nodes
    or replies raises KeyboardInterrupt, so the runner records the run as interrupted and the
    ServerApp's thread ends instead of waiting out the round timeout.
    """

    def __init__(self, federation, *, seed: int, threads: int | str = 1, grid: Grid | None = None,
                 settings: FlowerSettings | None = None, stop: threading.Event | None = None):
        if grid is None:
            raise ConfigError("engine", "engine flower runs inside a Flower ServerApp (use "
                              "mmfl run / mmfl.run, which start Flower's simulation)", "flower")
        super().__init__(federation, seed=seed, threads=threads)
        self.grid = grid
        self.settings = settings or FlowerSettings()
        self._stop = stop
        if self.settings.pack not in ("pair", "node"):
            raise ConfigError("flower.pack", "must be one of pair, node", self.settings.pack)
        self._client_of: dict[int, int] = {}  # node id -> client
        self._node_of: dict[int, int] = {}    # client -> node id (the latest discovered)
        self._calls = 0                       # discover() calls so far
        self._retry: dict[int, int] = {}      # node id -> call from which to ask it again
        self._refused: set[int] = set()       # node ids refused at discovery (never asked again)
        self._round = -1                      # the round being trained (for the records)
        self._claims = Claims(federation.population, self.settings.identity_file)
        self._rejections = RejectionLog(self.settings.rejected_file)
        self._dims = self.num_parameters()
        self._names = list(federation.population.task_names)
        self.wait_for_nodes()

    # -- nodes -------------------------------------------------------------------------------
    def _config(self, **extra) -> dict:
        conf = dict(extra)
        if self.settings.shard_dir:
            conf["shard-dir"] = self.settings.shard_dir
        return conf

    def wait_for_nodes(self) -> None:
        """Wait (up to ``node_wait`` s) until the expected number of nodes is connected, then
        discover them. Raises FlowerError naming what is missing."""
        n_clients = self.federation.population.num_clients
        want = self.settings.nodes or n_clients
        deadline = time.monotonic() + self.settings.node_wait
        progress = _NodeWait(self.settings.progress_file)
        waits = _polls()
        while len(ids := list(self.grid.get_node_ids())) < want:
            progress("connect", len(ids), want)
            self._check_stop()
            if time.monotonic() > deadline:
                raise FlowerError(f"only {len(ids)} of {want} Flower nodes connected after "
                                  f"{self.settings.node_wait:g} s (flower.node_wait)")
            time.sleep(next(waits))
        # the first discovery may wait for the rest of node_wait, not only a round timeout:
        # a node's first ClientApp (process start, imports) can take longer than a round
        need = min(want, n_clients)
        while True:
            left = max(deadline - time.monotonic(), 0.0)
            self.discover(timeout=max(left, self._timeout() or 0.0) or None, retry=False,
                          waiting=lambda answered, known=len(self._node_of):
                          progress("discover", known + answered, need))
            if len(self._node_of) >= need or time.monotonic() > deadline:
                break
            self._check_stop()
            time.sleep(0.5)  # error replies come back at once: do not flood the nodes
        found = len(self._node_of)
        if found < need:
            refused = (f"; {len(self._refused)} node(s) refused, see the log"
                       + (f" and {self.settings.rejected_file}" if self.settings.rejected_file
                          else "") if self._refused else "")
            raise FlowerError(f"only {found} of {need} Flower nodes answered discovery within "
                              f"{self.settings.node_wait:g} s (flower.node_wait){refused}")
        progress("ready", found, n_clients, force=True, nodes=len(self._client_of))

    def discover(self, *, timeout: float | None = None, retry: bool = True,
                 waiting: Callable[[int], None] | None = None) -> None:
        """Map the node ids not seen before to their clients (``query.discover``); forget
        nodes that left. Each claim is checked (:class:`~mmfl.flower.identity.Claims`; a second
        claim to a
        client whose node still answers is refused; module docstring); refused nodes are
        recorded and never asked again. A client whose node stopped answering maps to the new
        node. A node that does not answer is asked again :data:`RETRY_AFTER` calls later (so a
        silent node does not cost every round a discovery timeout); ``retry=False`` asks every
        unknown node now. ``timeout``: seconds to wait for the answers (default: the round
        timeout); ``waiting(n)`` is called with the number of answers so far while waiting."""
        self._calls += 1
        ids = [int(n) for n in self.grid.get_node_ids()]
        current = set(ids)
        for nid in [n for n in self._client_of if n not in current]:
            client = self._client_of.pop(nid)
            if self._node_of.get(client) == nid:
                del self._node_of[client]
        new = [n for n in ids if n not in self._client_of and n not in self._refused
               and (not retry or self._retry.get(n, 0) <= self._calls)]
        if not new:
            return
        msgs = [M.request(M.DISCOVER, nid, self._config(), {}) for nid in new]
        keys = node_keys(self.grid) if self._claims.keyed else {}
        claims = []
        for msg, rep in self._exchange(msgs, timeout=timeout, waiting=waiting):
            nid = msg.metadata.dst_node_id
            if rep is None:  # no answer (yet): asked again a few rounds later
                self._retry[nid] = self._calls + RETRY_AFTER
                continue
            client, why = self._claims.check(nid, rep, keys)
            if why:
                self._refuse(nid, client, why)
            else:
                claims.append((nid, client))
        for nid, client in claims:
            old = self._node_of.get(client)
            if old is not None and old != nid and old in current:
                if self._answers(old, client, timeout, keys):
                    self._refuse(nid, client, f"a second claim to client {client}, which node "
                                              f"{old} serves")
                    continue
                log.warning("flower: client %d's node %d does not answer; node %d serves it now",
                            client, old, nid)
                self._client_of.pop(old, None)
            self._client_of[nid] = client
            self._node_of[client] = nid

    def _answers(self, nid: int, client: int, timeout: float | None,
                 keys: dict[int, str]) -> bool:
        """Whether node ``nid`` still answers discovery as ``client`` (a liveness check before
        a second claim to the client is refused)."""
        ((_, rep),) = self._exchange([M.request(M.DISCOVER, nid, self._config(), {})],
                                     timeout=timeout)
        return rep is not None and self._claims.check(nid, rep, keys) == (client, "")

    def _refuse(self, nid: int, client: int | None, why: str) -> None:
        self._refused.add(nid)
        self._reject(nid, "discovery", client, f"node refused: {why}")

    def _reject(self, nid: int, what: str, client: int | None, reason: str) -> None:
        self._rejections.record(nid, what, client, reason, self._round + 1)

    # -- messaging ---------------------------------------------------------------------------
    def _check_stop(self) -> None:
        if self._stop is not None and self._stop.is_set():
            raise KeyboardInterrupt("the Flower simulation was interrupted")

    def _timeout(self) -> float | None:
        return self.settings.round_timeout or None

    def _exchange(self, msgs: list[Message], *, timeout: float | None = None,
                  waiting: Callable[[int], None] | None = None
                  ) -> list[tuple[Message, Message | None]]:
        """Push ``msgs``, collect replies until all are in or ``timeout`` (default: the round
        timeout) passes; ``waiting(n)``, if given, is called with the n replies so far before
        each pause.
        Returns (request, reply) for every request; reply None = no (valid) reply. Error
        replies are logged and count as no reply; they are matched to their request through
        ``reply_to_message_id``."""
        if not msgs:
            return []
        accepted = {str(m) for m in self.grid.push_messages(msgs) if m}  # None: refused
        # both grids write the id into the pushed message's metadata
        ids = [msg.metadata.message_id if msg.metadata.message_id in accepted else None
               for msg in msgs]
        by_id = {mid: msg for msg, mid in zip(msgs, ids) if mid}
        if len(by_id) < len(msgs):
            log.warning("flower: the SuperLink refused %d of %d messages", len(msgs) - len(by_id),
                        len(msgs))
        got: dict[str, Message] = {}
        pending = set(by_id)
        timeout = self._timeout() if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        waits = _polls()
        while pending:
            for rep in self.grid.pull_messages(list(pending)):
                mid = rep.metadata.reply_to_message_id
                if mid not in pending:
                    continue
                pending.discard(mid)
                if rep.has_error():
                    req = by_id[mid]
                    log.warning("flower: node %s (%s) replied with error code %s: %s",
                                req.metadata.dst_node_id, req.metadata.message_type,
                                rep.error.code, rep.error.reason)
                    continue
                got[mid] = rep
            if pending and deadline is not None and time.monotonic() > deadline:
                log.warning("flower: %d of %d messages unanswered after %g s", len(pending),
                            len(by_id), timeout)
                break
            if pending:
                self._check_stop()
                if waiting is not None:
                    waiting(len(got))
                time.sleep(next(waits))
        return [(msg, got.get(mid) if mid else None) for msg, mid in zip(msgs, ids)]

    def _requests(self, kind: str, params, clients, tasks, extra: dict, *, pack: str,
                  corrections=None, group: str = "") -> tuple[list[Message], list[_Sent]]:
        """Messages for the (client, task) pairs whose client has a node, packed per pair
        (``pack = "pair"``) or per node (``"node"``); pairs without a node get none (they are
        missing)."""
        groups: dict[tuple, list[int]] = {}  # (client[, k]) -> positions k into the pairs
        for k, i in enumerate(clients.tolist()):
            if i not in self._node_of:
                continue
            key = (i,) if pack == "node" else (i, k)
            groups.setdefault(key, []).append(k)
        rows = {}  # position k -> row of its task's correction matrix
        if corrections is not None:
            for s in np.unique(tasks).tolist():
                for r, k in enumerate(np.flatnonzero(tasks == s).tolist()):
                    rows[k] = r
        msgs, sent = [], []
        for key, ks in groups.items():
            i = key[0]
            ts = [int(tasks[k]) for k in ks]
            vectors = {f"w.{s}": params[s] for s in ts}
            for s in ts:  # buffers (mmfl.tasks.buffers): the server keeps b_s and every b_{i,s}
                if self.has_buffers(s):
                    vectors[f"b.{s}"] = (self.start_buffers(s, i) if kind == M.TRAIN
                                         else self.buffers[s])
            if corrections is not None:
                vectors.update({f"r.{int(tasks[k])}": corrections[int(tasks[k])][rows[k]]
                                for k in ks})
            conf = self._config(client=i, tasks=ts, **{"task-names": [self._names[s] for s in ts]},
                                **M.spec_config([self.federation.tasks[s].spec for s in ts]),
                                **extra)
            msgs.append(M.request(kind, self._node_of[i], conf, vectors, group))
            sent.append(_Sent(i, ts))
        return msgs, sent

    # -- the engine interface ----------------------------------------------------------------
    def train(self, params, clients, tasks, round, corrections=None) -> TrainOutput:
        """Local training of the (client, task) pairs by their nodes (see :meth:`Engine.train`
        for the arguments). Returns the pairs that answered, in the order given; a pair whose
        node is unknown, silent past ``round_timeout`` or answered with an error is left out."""
        clients, tasks = np.asarray(clients, np.int64), np.asarray(tasks, np.int64)
        corrections = check_corrections(corrections, tasks, self._dims)
        self.discover()
        msgs, sent = self._requests(M.TRAIN, params, clients, tasks,
                                    {"round": int(round), "seed": int(self.seed)},
                                    pack=self.settings.pack, corrections=corrections,
                                    group=str(round))
        self._round = int(round)
        result: dict[tuple[int, int], tuple[torch.Tensor, float, int, torch.Tensor | None]] = {}
        for (msg, rep), info in zip(self._exchange(msgs), sent):
            if rep is None:
                continue
            got, why = self._read_train_reply(msg, rep, info)
            if why:
                self._reject(msg.metadata.dst_node_id, "train reply", info.client, why)
                continue
            result.update(got)
        keep = np.array([(i, s) in result for i, s in zip(clients.tolist(), tasks.tolist())],
                        dtype=bool)
        if not keep.all():
            log.warning("flower: round %d: %d of %d pairs missing", round + 1,
                        int((~keep).sum()), len(keep))
        kc, kt = clients[keep], tasks[keep]
        updates, buffers = {}, {}
        for s in np.unique(kt).tolist():
            updates[s] = torch.stack([result[(i, s)][0] for i in kc[kt == s].tolist()])
            if self.has_buffers(s):
                buffers[s] = torch.stack([result[(i, s)][3] for i in kc[kt == s].tolist()])
        return TrainOutput(
            clients=kc, tasks=kt, updates=updates,
            train_loss=np.array([result[p][1] for p in zip(kc.tolist(), kt.tolist())],
                                dtype=np.float64),
            steps=np.array([result[p][2] for p in zip(kc.tolist(), kt.tolist())],
                           dtype=np.int64),
            buffers=buffers or None,
        )

    def _read_train_reply(self, msg: Message, rep: Message, info: _Sent):
        """({(client, task): (update, loss, steps, final buffers or None)}, "") from a train
        reply, or ({}, why) when the reply does not match its request. Values are passed on as
        they are (finite or not: the runner checks updates centrally)."""
        try:
            src = int(rep.metadata.src_node_id)
            if src not in (0, int(msg.metadata.dst_node_id)):
                return {}, f"reply from node {src}, sent to node {msg.metadata.dst_node_id}"
            met = rep.content["metrics"]
            if int(met["client"]) != info.client or [int(s) for s in met["tasks"]] != info.tasks:
                return {}, (f"reply for client {met['client']} tasks {list(met['tasks'])}, "
                            f"request for client {info.client} tasks {info.tasks}")
            loss, steps = list(met["train-loss"]), list(met["steps"])
            if len(loss) != len(info.tasks) or len(steps) != len(info.tasks):
                return {}, "train-loss/steps do not match the tasks"
            got = {}
            for j, s in enumerate(info.tasks):
                g = M.record_vector(rep.content[f"g.{s}"])
                if g.numel() != self._dims[s]:
                    return {}, (f"{g.numel()} parameters for task {self._names[s]}, expected "
                                f"{self._dims[s]}")
                b = None
                if self.has_buffers(s):
                    b = M.record_vector(rep.content[f"b.{s}"])
                    if b.numel() != self.buffers[s].numel():
                        return {}, (f"{b.numel()} buffer values for task {self._names[s]}, "
                                    f"expected {self.buffers[s].numel()}")
                got[(info.client, s)] = (g, float(loss[j]), int(steps[j]), b)
            return got, ""
        except (KeyError, TypeError, ValueError) as e:
            return {}, f"malformed reply ({type(e).__name__}: {e})"

    def probe_losses(self, params, clients, tasks) -> np.ndarray:
        """(U,) mean training loss f_{i,s}(w_s) of each pair, measured by its node (one
        ``query.probe`` message per node); NaN where the node did not answer."""
        clients, tasks = np.asarray(clients, np.int64), np.asarray(tasks, np.int64)
        out = np.full(len(clients), np.nan)
        self.discover()
        # probes are always packed per node: a forward pass each, no update to return
        msgs, sent = self._requests(M.PROBE, params, clients, tasks, {}, pack="node")
        for (msg, rep), info in zip(self._exchange(msgs), sent):
            if rep is None:
                continue
            try:
                met = rep.content["metrics"]
                if int(met["client"]) != info.client or len(met["loss"]) != len(met["tasks"]):
                    raise ValueError(f"reply for client {met['client']}, request for client "
                                     f"{info.client}")
                loss = dict(zip((int(s) for s in met["tasks"]), (float(x) for x in met["loss"])))
            except (KeyError, TypeError, ValueError) as e:
                self._reject(msg.metadata.dst_node_id, "probe reply", info.client,
                             f"malformed reply ({type(e).__name__}: {e})")
                continue
            for k in np.flatnonzero(clients == info.client).tolist():
                if int(tasks[k]) in loss:
                    out[k] = loss[int(tasks[k])]
        return out


# -- the ServerApp -----------------------------------------------------------------------------

def engine_factory(grid: Grid, cfg, settings: FlowerSettings,
                   stop: threading.Event | None = None):
    """``federation -> FlowerEngine`` on ``grid`` (a Runner's ``engine_factory``)."""
    def factory(federation):
        return FlowerEngine(federation, seed=cfg.seed, threads=cfg.threads, grid=grid,
                            settings=settings, stop=stop)

    return factory


def run_experiment(grid: Grid, cfg, out: str | Path, *, settings: FlowerSettings,
                   resume: bool = False, data_dir: str | None = None, callbacks=()) -> dict:
    """Run experiment ``cfg`` into ``out`` with engine ``flower`` on ``grid``; the summary."""
    from mmfl.experiment.runner import Runner

    runner = Runner(cfg, out, data_dir=data_dir, callbacks=callbacks,
                    engine_factory=engine_factory(grid, cfg, settings))
    return runner.run(resume=resume)


class LogProgress:
    """Callback: one log line per round (the ServerApp's output goes to Flower's run log)."""

    def on_start(self, cfg, federation, start_round):
        log.info("mmfl %s: %d clients, %d tasks, %d rounds (from round %d)", cfg.name,
                 federation.population.num_clients, federation.population.num_tasks,
                 cfg.rounds, start_round + 1)

    def on_round(self, record):
        acc = ("" if record.accuracy is None else " ".join(
            f"{n}={a:.3f}" for n, a in zip(record.task_names, record.accuracy)))
        log.info("round %d/%d: %d slots, %.2f s %s", record.round, record.rounds, record.slots,
                 record.seconds, acc)

    def on_end(self, summary):
        log.info("mmfl done: mean accuracy %s", summary.get("mean_accuracy"))


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    """Deployment entry point: the run config names the experiment (module docstring)."""
    from mmfl.experiment.config import load_config

    rc = context.run_config
    root = logging.getLogger("mmfl")  # the flwr-serverapp process configures no mmfl handler
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    for key in ("config-file", "out-dir"):
        if not str(rc.get(key, "")):
            raise FlowerError(f"run config: {key} is required (absolute path)")
    cfg = load_config(str(rc["config-file"]))
    if cfg.engine != "flower":
        cfg = cfg.replace(engine="flower")
    flower_dir = Path(str(rc["out-dir"])) / "flower"
    settings = FlowerSettings.from_config(
        cfg, round_timeout=_opt(rc, "round-timeout", float), nodes=_opt(rc, "nodes", int),
        node_wait=_opt(rc, "node-wait", float), identity_file=str(rc.get("identity-file", "")),
        rejected_file=str(flower_dir / REJECTED), progress_file=str(flower_dir / PROGRESS))
    # the log for Flower's run log; the progress file for mmfl flower-local's own output
    run_experiment(grid, cfg, str(rc["out-dir"]), settings=settings,
                   resume=bool(rc.get("resume", False)),
                   callbacks=[LogProgress(), ProgressWriter(settings.progress_file)])


def _opt(rc, key: str, kind):
    """run config value ``key`` as ``kind``, or None when absent; a negative or non-finite
    number is a FlowerError (NaN would mean "no limit" to a comparison)."""
    if key not in rc:
        return None
    value = kind(rc[key])
    if not math.isfinite(value) or value < 0:
        raise FlowerError(f"run config: {key} must be a finite number >= 0 (got {rc[key]!r})")
    return value
