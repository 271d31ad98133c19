"""mmfl's Flower ClientApp: one mmfl client, all of its tasks, trained like engine ``sequential``.

``client_app`` answers the messages of :mod:`mmfl.flower.messages`. It learns which client it is
and where that client's data is from its node config:

* deployment (``flower-supernode --node-config``): ``client-id`` (int, the mmfl client i) and
  ``data-file`` (str, absolute path of that client's shard written by
  :func:`mmfl.flower.shards.write_shards`);
* simulation (``run_simulation`` gives only ``partition-id`` / ``num-partitions``):
  client i = ``partition-id`` and the shard is ``client-<i>.npz`` in the folder named by the
  message's ``shard-dir``.

Local training is :class:`ShardEngine`: engine ``sequential``'s own ``train`` (the same
:func:`~mmfl.engines.sequential.local_batches`, SGD step, SCAFFOLD correction and class
masking, imported, not copied) on an engine whose data are the shard's samples, so a
ClientApp's update equals the ``sequential`` engine's for the same pair bit for bit. What
shapes training (learning rate, epochs, batch size, class masking, model, loss, optimizer)
comes from each message (:data:`mmfl.flower.messages.SPEC_KEYS`), never from the shard's
metadata: the shard is the node's data, the server decides how it is trained. The update is
returned as it is, finite or not; the server's runner checks every update centrally. Loaded
shards are cached per process (a Ray actor in simulation serves many messages; in
deployment every message starts a new ClientApp process, so loading is kept cheap: one ``.npz``
read, models built on demand).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from mmfl.engines.sequential import SequentialEngine
from mmfl.errors import DataError
from mmfl.tasks.buffers import float_buffers
from mmfl.tasks.datasets import Dataset
from mmfl.tasks.spec import TaskData
from mmfl.flower import messages as M
from mmfl.flower.shards import Shard, TaskShard, file_sha256, load_shard, shard_name

#: torch threads of a ClientApp: one core each (Ray gives each actor num_cpus = 1).
THREADS = 1


@dataclass(frozen=True)
class _ClientFederation:
    """The slice of a Federation that engine code reads on a client: ``tasks[s]`` with the
    task's training spec and ``client_indices`` = {i: positions 0..n_{i,s}-1 into the shard}."""

    tasks: tuple[TaskData, ...]


class _NoModel(torch.nn.Module):
    """Placeholder for a task whose model has not been needed yet (no parameters)."""


def _shard_dataset(t: TaskShard) -> Dataset:
    """Task ``t`` of a shard as a dataset: the client's samples as the training split (their
    dtypes as the engines' datasets: float32 inputs, int64 labels), an empty test split."""
    return Dataset(f"{t.spec.name} (client shard)", t.x, t.y,
                   np.zeros((0, *t.input_shape), np.float32), np.zeros(0, np.int64),
                   t.num_classes, t.input_shape)


class ShardEngine(SequentialEngine):
    """Engine ``sequential`` on one client's shard instead of a whole federation.

    Built through :class:`~mmfl.engines.base.Engine`'s own constructor on the client's slice
    of a federation: task s's dataset holds the shard's samples as its training split (in
    index order; no test split), ``federation.tasks[s].client_indices[i]`` is
    ``arange(n_{i,s})``, so ``train_x[s]`` (n_{i,s}, ...) float32 and ``train_y[s]``
    (n_{i,s},) int64 are the client's data. ``models[s]`` is built on first use
    (:meth:`make_model`, :meth:`need`; parameters are overwritten by every message).
    :meth:`train` and :meth:`probe_losses` are inherited unchanged; ``seed`` is set per message.
    """

    def __init__(self, shard: Shard, seed: int = 0, sha256: str = ""):
        self.shard = shard
        self.sha256 = sha256  # of the shard file: reported at discovery
        self.client = shard.client
        tasks = tuple(TaskData(t.spec, _shard_dataset(t),
                               {shard.client: np.arange(t.num_samples, dtype=np.int64)})
                      for t in shard.tasks)
        super().__init__(_ClientFederation(tasks), seed=seed, threads=THREADS)

    def make_model(self, s: int, td) -> torch.nn.Module:
        """No model yet: :meth:`need` builds it when a message first trains the task (so the
        buffer state starts empty; :meth:`take_buffers` sets it from each message)."""
        return _NoModel()

    def configure(self, tasks, conf) -> None:
        """Train ``tasks`` with the settings of the message config ``conf``
        (:data:`~mmfl.flower.messages.SPEC_KEYS`, lists in the order of ``tasks``): each
        task's spec becomes the shard's with those values; a model whose architecture or loss
        changed is rebuilt on next use."""
        fed = list(self.federation.tasks)
        for j, s in enumerate(tasks):
            values = {}
            for key, attr in M.SPEC_KEYS:
                if key not in conf or len(conf[key]) != len(tasks):
                    raise DataError(f"client {self.client}: message without {key} per task")
                v = conf[key][j]
                values[attr] = dict(json.loads(v)) if attr in M.MAPPINGS else v
            old = fed[s].spec
            new = replace(old, lr=float(values["lr"]), local_epochs=int(values["local_epochs"]),
                          batch_size=int(values["batch_size"]),
                          class_mask=str(values["class_mask"]), model=str(values["model"]),
                          model_options=values["model_options"], loss=str(values["loss"]),
                          optimizer=str(values["optimizer"]),
                          optimizer_options=values["optimizer_options"])
            if _arch(new) != _arch(old):
                self.models[s] = _NoModel()
            fed[s] = TaskData(new, fed[s].dataset, fed[s].client_indices)
        self.federation = _ClientFederation(tuple(fed))

    def need(self, tasks, dims: dict[int, int] | None = None) -> None:
        """Build the models of ``tasks`` (task indices) that are not built yet; ``dims``
        (s -> D_s of the server's vector) is checked against them."""
        from mmfl.tasks.losses import PROBE_SAMPLES, attach_loss
        from mmfl.tasks.models import build_model

        for s in tasks:
            if isinstance(self.models[s], _NoModel):
                t, spec = self.shard.tasks[s], self.federation.tasks[s].spec
                model = build_model(spec.model, dict(spec.model_options), t.input_shape,
                                    t.num_classes, 0)
                x = self.train_x[s][:PROBE_SAMPLES]  # the loss check, as the server's
                if not len(x):
                    x = torch.zeros((1, *t.input_shape))
                self.models[s] = attach_loss(model, spec.loss, x, t.num_classes, s)
            if dims is not None:
                d = sum(p.numel() for p in self.models[s].parameters())
                if d != dims[s]:
                    raise DataError(f"task {self.shard.tasks[s].spec.name}: the server's model has "
                                    f"{dims[s]} parameters, this client's {d} (shard of another "
                                    "config?)")


    def take_buffers(self, tasks, content) -> None:
        """The buffers of ``tasks`` (task indices, models built) from a message's ``b.<s>``
        (:mod:`mmfl.flower.messages`, :mod:`mmfl.tasks.buffers`): local training or a probe
        starts from them. The engine keeps none between messages (the server holds b_s and,
        for ``buffers = "local"``, every client's b_{i,s}); a model whose buffers do not match
        the message is a DataError."""
        for s in tasks:
            b = M.record_vector(content[f"b.{s}"]) if f"b.{s}" in content else torch.zeros(0)
            want = sum(x.numel() for x in float_buffers(self.models[s]))
            if b.numel() != want:
                raise DataError(f"task {self.shard.tasks[s].spec.name}: the server sent "
                                f"{b.numel()} buffer values, this client's model has {want}")
            self.buffers[s] = b
            self.local_buffers[s] = {}


def _arch(spec) -> tuple:
    """What a built model depends on: its name, options and loss."""
    return spec.model, json.dumps(dict(spec.model_options), sort_keys=True), spec.loss


_CACHE: dict[str, tuple[int, ShardEngine]] = {}


def _shard_path(msg: Message, context: Context) -> tuple[int, Path]:
    """(client i, shard path) of this node (see the module docstring)."""
    nc = context.node_config
    if "client-id" in nc:
        client = int(nc["client-id"])
    elif "partition-id" in nc:
        client = int(nc["partition-id"])
    else:
        raise DataError("node config has neither client-id nor partition-id")
    if "data-file" in nc:
        return client, Path(str(nc["data-file"]))
    conf = msg.content.get("config", {})
    if "shard-dir" not in conf:
        raise DataError(f"client {client}: no data-file in the node config and no shard-dir "
                        "in the message")
    return client, Path(str(conf["shard-dir"])) / shard_name(client)


def engine_for(msg: Message, context: Context) -> ShardEngine:
    """This node's :class:`ShardEngine` (cached per process while the file is unchanged)."""
    torch.set_num_threads(THREADS)
    client, path = _shard_path(msg, context)
    key = str(path.resolve())
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        raise DataError(f"client {client}: shard {path} not found") from None
    hit = _CACHE.get(key)
    if hit is None or hit[0] != stamp:
        shard = load_shard(path)
        if shard.client != client:
            raise DataError(f"{path} is the shard of client {shard.client}, but this node is "
                            f"client {client}")
        hit = _CACHE[key] = (stamp, ShardEngine(shard, sha256=file_sha256(path)))
    return hit[1]


def _tasks_of(msg: Message, eng: ShardEngine) -> list[int]:
    """The task indices a message asks for (checked against the client's id and shard)."""
    conf = msg.content["config"]
    if int(conf["client"]) != eng.client:
        raise DataError(f"message for client {int(conf['client'])} reached client {eng.client}")
    tasks = [int(s) for s in conf["tasks"]]
    names = [str(n) for n in conf["task-names"]]
    for s, name in zip(tasks, names, strict=True):
        if not 0 <= s < len(eng.shard.tasks) or eng.shard.tasks[s].spec.name != name:
            raise DataError(f"client {eng.client}: the shard has no task {name!r} at index {s}")
    return tasks


client_app = ClientApp()


@client_app.query("discover")
def discover(msg: Message, context: Context) -> Message:
    """Reply which mmfl client this node is, its n_{i,s} and its shard's SHA-256 (the server
    checks them against the shard fingerprints it knows)."""
    eng = engine_for(msg, context)
    return M.reply(msg, {"client": eng.client, "n-samples": eng.shard.n_samples.tolist()},
                   config={"sha256": eng.sha256})


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training of the requested tasks (``sequential`` semantics) with the message's
    settings and buffers; reply the updates as computed (finite or not) and, for models with
    buffers, the buffers training ended with."""
    eng = engine_for(msg, context)
    tasks = _tasks_of(msg, eng)
    conf = msg.content["config"]
    eng.configure(tasks, conf)
    params = [torch.zeros(0)] * len(eng.models)
    corrections = None
    dims = {}
    for s in tasks:
        params[s] = M.record_vector(msg.content[f"w.{s}"])
        dims[s] = params[s].numel()
        if f"r.{s}" in msg.content:
            corrections = corrections if corrections is not None else {}
            corrections[s] = M.record_vector(msg.content[f"r.{s}"])[None, :]
    if corrections is not None and set(corrections) != set(tasks):
        raise DataError(f"client {eng.client}: corrections for some tasks only")
    eng.need(tasks, dims)
    eng.take_buffers(tasks, msg.content)
    eng.seed = int(conf["seed"])
    clients = np.full(len(tasks), eng.client, dtype=np.int64)
    out = eng.train(params, clients, np.asarray(tasks, np.int64), int(conf["round"]),
                    corrections)
    vectors = {f"g.{s}": out.updates[s][0] for s in tasks}
    for s, b in (out.buffers or {}).items():  # the buffers local training ended with
        vectors[f"b.{s}"] = b[0]
    return M.reply(msg, {"client": eng.client, "tasks": tasks,
                         "train-loss": [float(x) for x in out.train_loss],
                         "steps": [int(x) for x in out.steps]}, vectors)


@client_app.query("probe")
def probe(msg: Message, context: Context) -> Message:
    """Mean training loss of the sent global models on this client's data (LVR probes)."""
    eng = engine_for(msg, context)
    tasks = _tasks_of(msg, eng)
    eng.configure(tasks, msg.content["config"])
    params = [torch.zeros(0)] * len(eng.models)
    dims = {}
    for s in tasks:
        params[s] = M.record_vector(msg.content[f"w.{s}"])
        dims[s] = params[s].numel()
    eng.need(tasks, dims)
    eng.take_buffers(tasks, msg.content)
    clients = np.full(len(tasks), eng.client, dtype=np.int64)
    loss = eng.probe_losses(params, clients, np.asarray(tasks, np.int64))
    return M.reply(msg, {"client": eng.client, "tasks": tasks,
                         "loss": [float(x) for x in loss]})
