"""The ``sequential`` engine: one plain PyTorch SGD loop per (client, task) pair.

Obviously correct on purpose: it is the oracle the faster engines are tested against.
Batches: in local epoch e of round t, client i shuffles its indices with the e-th permutation
drawn from ``stream(seed, "shuffle", t, i, s)`` and takes consecutive batches of ``batch_size``
(the last one may be smaller; ``batch_size >= n_{i,s}`` is full-batch gradient descent).
With SCAFFOLD corrections r = c_s - c_{i,s} every step is ``p <- p - lr * (grad + r)``.
Another local optimizer (``tasks[i].optimizer``) is ``torch.optim``'s own, built fresh for
every pair and round, fed grad + r.
A task with ``class_mask`` other than ``"none"`` takes the nll of
:func:`~mmfl.tasks.masking.training_log_probs` of the output with the client's held classes; a
regression task (``loss = "mse"``) the mean of :func:`~mmfl.tasks.losses.squared_errors`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from mmfl.engines.base import Engine, TrainOutput, check_corrections
from mmfl.registry import register
from mmfl.rng import SHUFFLE, stream
from mmfl.tasks.buffers import buffers_to_vector, vector_to_buffers
from mmfl.tasks.losses import task_loss
from mmfl.tasks.masking import training_log_probs
from mmfl.tasks.optimizers import is_plain_sgd, options_of, torch_optimizer


def local_batches(indices: np.ndarray, epochs: int, batch_size: int, seed: int, round: int,
                  client: int, task: int):
    """Yield the index batches of one client's local training (docs/algorithms.md section 2)."""
    rng = stream(seed, SHUFFLE, round, client, task)
    n = len(indices)
    for _ in range(epochs):
        perm = indices[rng.permutation(n)]
        for a in range(0, n, batch_size):
            yield perm[a:a + batch_size]


def train_pair(engine: Engine, s: int, i: int, w: torch.Tensor, r: torch.Tensor | None,
               round: int) -> tuple[torch.Tensor, float, int, torch.Tensor | None]:
    """Local training of client i on task s from the global model ``w`` (D_s,), one plain
    PyTorch loop: (update G (D_s,), mean loss, steps, final buffers (Db_s,) or None). ``r``:
    SCAFFOLD's correction c_s - c_{i,s} (D_s,) or None. A model with buffers starts from
    :meth:`Engine.start_buffers` and trains in train mode (mmfl.tasks.buffers)."""
    td = engine.federation.tasks[s]
    cfg = td.spec
    model = engine.models[s]
    dev = engine.device  # w, r and the result are CPU tensors; data and model live on dev
    # a copy: vector_to_parameters makes the parameters views of the vector it is given
    vector_to_parameters(w.to(dev, copy=True), model.parameters())
    buffered = engine.has_buffers(s)
    if buffered:
        vector_to_buffers(engine.start_buffers(s, i), model)
    corr = None
    if r is not None:  # one view per parameter
        corr = [v.view_as(p) for v, p in zip(
            torch.split(r.to(dev), [p.numel() for p in model.parameters()]), model.parameters())]
    x, y = engine.train_x[s], engine.train_y[s]
    mode = engine.class_mask(s)
    held = None if mode == "none" else engine.held_classes(s)[i:i + 1]  # (1, K)
    regression = engine.is_regression(s)
    # the loss sum in float64 on the device (no host sync per step): the same additions as
    # Python floats of the float32 losses
    total, steps = torch.zeros((), dtype=torch.float64, device=dev), 0
    options = options_of(cfg)
    opt = (None if is_plain_sgd(cfg.optimizer, options)  # fresh each round and pair
           else torch_optimizer(cfg.optimizer, options, model.parameters(), cfg.lr))
    batches = list(local_batches(td.client_indices[i], cfg.local_epochs, cfg.batch_size,
                                 engine.seed, round, i, s))
    for batch, b in zip(batches, _on_device(batches, dev)):
        if buffered and len(batch) < 2:  # batch norm cannot train on one sample
            continue
        model.zero_grad(set_to_none=True)
        out = model(x[b])
        if held is not None:  # class masking (mmfl.tasks.masking), training only
            out = training_log_probs(model, out, held, mode)
        loss = task_loss(out, y[b], regression)
        loss.backward()
        with torch.no_grad():
            if opt is not None:  # SCAFFOLD's correction joins the gradient first
                for p, c in zip(model.parameters(), corr or ()):
                    p.grad.add_(c)
                opt.step()
            elif corr is None:
                for p in model.parameters():
                    p.sub_(cfg.lr * p.grad)
            else:  # SCAFFOLD: y <- y - eta (g + c - c_i)
                for p, c in zip(model.parameters(), corr):
                    p.sub_(cfg.lr * (p.grad + c))
        total += loss.detach()
        steps += 1
    g = (w.to(dev) - parameters_to_vector(model.parameters()).detach()).cpu()
    return g, float(total) / max(steps, 1), steps, buffers_to_vector(model) if buffered else None


def _on_device(batches: list[np.ndarray], dev: torch.device) -> list[torch.Tensor]:
    """The index batches as tensors on ``dev``: off the CPU in one transfer per pair (a copy
    per step would wait for the previous step's kernels every time)."""
    if dev.type == "cpu" or not batches:
        return [torch.from_numpy(b) for b in batches]
    flat = torch.from_numpy(np.concatenate(batches)).to(dev)
    return list(torch.split(flat, [len(b) for b in batches]))


def train_pairs(engine: Engine, params, clients: np.ndarray, tasks: np.ndarray, round: int,
                corrections=None) -> TrainOutput:
    """:func:`train_pair` for every pair (the sequential engine's :meth:`train`)."""
    clients, tasks = np.asarray(clients, np.int64), np.asarray(tasks, np.int64)
    updates: dict[int, list[torch.Tensor]] = {}
    buffers: dict[int, list[torch.Tensor]] = {}
    losses = np.zeros(len(clients))
    steps = np.zeros(len(clients), dtype=np.int64)
    for k, (i, s) in enumerate(zip(clients.tolist(), tasks.tolist())):
        r = None if corrections is None else corrections[s][len(updates.get(s, []))]
        g, losses[k], steps[k], b = train_pair(engine, s, i, params[s], r, round)
        updates.setdefault(s, []).append(g)
        if b is not None:
            buffers.setdefault(s, []).append(b)
    return TrainOutput(
        clients=clients, tasks=tasks,
        updates={s: torch.stack(g) for s, g in updates.items()},
        train_loss=losses, steps=steps,
        buffers={s: torch.stack(b) for s, b in buffers.items()} if buffers else None,
    )


@register("engine", "sequential")
class SequentialEngine(Engine):
    """Reference engine: trains the active pairs one after the other with plain PyTorch SGD."""

    def train(self, params, clients, tasks, round, corrections=None):
        corrections = check_corrections(corrections, np.asarray(tasks, np.int64),
                                        self.num_parameters())
        return train_pairs(self, params, clients, tasks, round, corrections)
