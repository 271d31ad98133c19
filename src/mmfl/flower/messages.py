"""The messages between mmfl's ServerApp and ClientApp (Flower 1.42 Message API).

Every message is addressed to one SuperNode, i.e. one mmfl client i. Flat parameter vectors
travel as one-array :class:`flwr.app.ArrayRecord` s of float32 numpy arrays.

``query.discover`` (start-up and whenever a new node id appears)
    content: ``config`` ConfigRecord (``shard-dir`` in simulation).
    reply: ``metrics`` MetricRecord ``client`` (i, from the node config) and ``n-samples``
    ((S,) n_{i,s} of the node's shard); ``config`` ConfigRecord ``sha256`` (of the shard
    file). The server checks the claim against what it knows (n_{i,s}, the shard's
    fingerprint, the node's registered key) and refuses a node that disagrees
    (:mod:`mmfl.flower.server`).

``train`` (local training of one or more tasks of client i in round t)
    content: ``config`` ConfigRecord ``round`` (t, 0-based), ``seed`` (experiment seed),
    ``client`` (i), ``tasks`` (list of task indices s), ``task-names`` (their names), the
    training settings of those tasks (:data:`SPEC_KEYS`: ``lr``, ``local-epochs``,
    ``batch-size``, ``class-mask``, ``model``, ``model-options`` (JSON), ``loss``,
    ``optimizer``, ``optimizer-options`` (JSON); lists in the order of ``tasks``: the ClientApp
    trains with these, never with its shard's metadata), and
    ``shard-dir`` in simulation; ``w.<s>`` ArrayRecord: w_s, the (D_s,) global parameters;
    with SCAFFOLD also ``r.<s>``: the (D_s,) correction c_s - c_{i,s}; for a model with
    buffers (batch norm, :mod:`mmfl.tasks.buffers`) also ``b.<s>``: the (Db_s,) buffers local
    training starts from (the server's b_s, or with ``buffers = "local"`` client i's own
    b_{i,s} once it has one: the server keeps them, as the local engines do).
    reply: ``g.<s>`` ArrayRecord: the (D_s,) update G = w_s - w_{i,s} per task, as computed
    (a non-finite update is returned as it is; the runner's central check rejects it);
    for a model with buffers ``b.<s>``: the (Db_s,) buffers local training ended with;
    ``metrics`` MetricRecord ``client``, ``tasks``, ``train-loss`` and ``steps`` (lists in the
    order of ``tasks``).

``query.probe`` (LVR loss probes)
    content: as ``train`` without ``round``/``seed``/``r.<s>``; ``b.<s>`` is the server's b_s
    (probes run the global model in eval mode, as evaluation does).
    reply: ``metrics`` ``client``, ``tasks``, ``loss`` (mean training loss f_{i,s}(w_s) of the
    global model on the client's samples).

The ``pair`` packing sends one ``train`` message per assigned (client, task); ``node`` packs
all the tasks of a client into one message (fewer, larger messages: in deployment every message
costs seconds of fixed overhead, see FLOWER-NOTES section 4).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

TRAIN = "train"
DISCOVER = "query.discover"
PROBE = "query.probe"

#: The per-task training settings every ``train`` / ``query.probe`` message carries, as
#: (message key, TrainingSpec attribute).
SPEC_KEYS = (("lr", "lr"), ("local-epochs", "local_epochs"), ("batch-size", "batch_size"),
             ("class-mask", "class_mask"), ("model", "model"), ("model-options", "model_options"),
             ("loss", "loss"), ("optimizer", "optimizer"),
             ("optimizer-options", "optimizer_options"))
#: The SPEC_KEYS attributes that are mappings (sent as JSON strings).
MAPPINGS = ("model_options", "optimizer_options")


def spec_config(specs) -> dict:
    """The message config entries of :data:`SPEC_KEYS` for ``specs`` (TrainingSpecs, in the
    order of the message's ``tasks``)."""
    conf: dict = {}
    for key, attr in SPEC_KEYS:
        values = [getattr(sp, attr) for sp in specs]
        if attr in MAPPINGS:
            values = [json.dumps(dict(v), sort_keys=True) for v in values]
        conf[key] = values
    return conf


def vector_record(v: torch.Tensor | np.ndarray) -> ArrayRecord:
    """A (D,) float32 vector as a one-array ArrayRecord."""
    a = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
    return ArrayRecord([np.ascontiguousarray(a, dtype=np.float32)])


def record_vector(rec: ArrayRecord) -> torch.Tensor:
    """The (D,) float32 tensor of a one-array ArrayRecord (a writable copy)."""
    (a,) = rec.to_numpy_ndarrays()
    return torch.from_numpy(np.array(a, dtype=np.float32, copy=True).reshape(-1))


def request(kind: str, node: int, config: dict, vectors: dict[str, torch.Tensor],
            group: str = "") -> Message:
    """A message of type ``kind`` to node ``node`` with ``config`` and named vectors."""
    content = RecordDict({"config": ConfigRecord(config)})
    for name, v in vectors.items():
        content[name] = vector_record(v)
    return Message(content, dst_node_id=int(node), message_type=kind, group_id=group or None)


def reply(msg: Message, metrics: dict, vectors: dict[str, torch.Tensor] | None = None,
          config: dict | None = None) -> Message:
    """The reply to ``msg`` with ``metrics``, named vectors and an optional ``config``."""
    content = RecordDict({"metrics": MetricRecord(metrics)})
    for name, v in (vectors or {}).items():
        content[name] = vector_record(v)
    if config:
        content["config"] = ConfigRecord(config)
    return Message(content, reply_to=msg)
