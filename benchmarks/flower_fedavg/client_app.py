"""Flower ClientApp: local SGD of one mmfl client, batch for batch as mmfl does it.

Messages (all carry ``config["spec"]``, the mmfl experiment config as a JSON string):

* ``query``: reply ``partition-id`` (the mmfl client id of this node); warms the per-process
  cache (dataset, partition, model) so the timed rounds don't pay for it.
* ``train``: ``arrays`` = the global model (parameters in ``module.parameters()`` order),
  ``config["round"]`` = the 0-based round t. Reply: the locally trained parameters and
  ``metrics`` ``num-examples`` (n_i), ``train-loss`` (mean batch loss), ``train-seconds``.
"""

from __future__ import annotations

import copy
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from mmfl.engines.sequential import local_batches
from mmfl.experiment.config import config_from_dict
from mmfl.experiment.federation import build_federation
from mmfl.tasks.models import build_model

torch.set_num_threads(1)  # one core per ClientApp (Ray gives each actor num_cpus=1)

app = ClientApp()

_CACHE: dict[str, dict] = {}  # spec -> federation, tensors, model (one per Ray actor process)


def _setup(spec: str) -> dict:
    if spec not in _CACHE:
        raw = json.loads(spec)
        fed = build_federation(config_from_dict(raw))
        td = fed.tasks[0]
        ds, cfg = td.dataset, td.spec
        _CACHE[spec] = {
            "seed": int(raw["seed"]),
            "task": td,
            "x": torch.from_numpy(np.ascontiguousarray(ds.x_train, np.float32)),
            "y": torch.from_numpy(np.ascontiguousarray(ds.y_train, np.int64)),
            # the architecture only: the weights are overwritten by every train message
            "model": build_model(cfg.model, dict(cfg.model_options), tuple(ds.input_shape),
                                 ds.num_classes, 0),
        }
        _warm_up(_CACHE[spec])
    return _CACHE[spec]


def _warm_up(st: dict) -> None:
    """One throwaway SGD step, so torch's one-time costs (autograd, optimizer) fall in start-up."""
    model = copy.deepcopy(st["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    b = torch.arange(min(8, len(st["y"])))
    opt.zero_grad(set_to_none=True)
    F.nll_loss(model(st["x"][b]), st["y"][b]).backward()
    opt.step()


def _client_id(context: Context) -> int:
    return int(context.node_config["partition-id"])


@app.query()
def query(msg: Message, context: Context) -> Message:
    _setup(str(msg.content["config"]["spec"]))
    reply = MetricRecord({"partition-id": _client_id(context)})
    return Message(RecordDict({"metrics": reply}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    conf: ConfigRecord = msg.content["config"]
    st = _setup(str(conf["spec"]))
    rnd, client = int(conf["round"]), _client_id(context)
    td, model, x, y = st["task"], st["model"], st["x"], st["y"]
    cfg = td.spec
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    with torch.no_grad():
        for p, a in zip(model.parameters(), arrays, strict=True):
            p.copy_(torch.from_numpy(a).view_as(p))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    indices = td.client_indices[client]
    total, steps = 0.0, 0
    for batch in local_batches(indices, cfg.local_epochs, cfg.batch_size, st["seed"], rnd,
                               client, 0):
        b = torch.from_numpy(batch)
        opt.zero_grad(set_to_none=True)
        loss = F.nll_loss(model(x[b]), y[b])
        loss.backward()
        opt.step()
        total += float(loss.detach())
        steps += 1
    new = [p.detach().numpy().copy() for p in model.parameters()]
    metrics = MetricRecord({"num-examples": int(len(indices)), "partition-id": client,
                            "train-loss": total / max(steps, 1),
                            "train-seconds": time.perf_counter() - t0})
    return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics}), reply_to=msg)
