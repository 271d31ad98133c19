"""The ``sequential`` engine: one plain PyTorch SGD loop per (client, task) pair.

Obviously correct on purpose: it is the oracle the faster engines are tested against.
Batches: in local epoch e of round t, client i shuffles its indices with the e-th permutation
drawn from ``stream(seed, "shuffle", t, i, s)`` and takes consecutive batches of ``batch_size``
(the last one may be smaller; ``batch_size >= n_{i,s}`` is full-batch gradient descent).
With SCAFFOLD corrections r = c_s - c_{i,s} every step is ``p <- p - lr * (grad + r)``.
Another local optimizer (``tasks[i].optimizer``) is ``torch.optim``'s own, built fresh for
every pair and round, fed grad + r.
A task with ``class_mask`` other than ``"none"`` takes the nll of
:func:`~mmfl.tasks.masking.training_log_probs` of the output with the client's held classes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from mmfl.engines.base import Engine, TrainOutput, check_corrections
from mmfl.registry import register
from mmfl.rng import SHUFFLE, stream
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


@register("engine", "sequential")
class SequentialEngine(Engine):
    """Reference engine: trains the active pairs one after the other with plain PyTorch SGD."""

    def train(self, params, clients, tasks, round, corrections=None):
        clients, tasks = np.asarray(clients, np.int64), np.asarray(tasks, np.int64)
        corrections = check_corrections(corrections, tasks, self.num_parameters())
        updates: dict[int, list[torch.Tensor]] = {}
        losses = np.zeros(len(clients))
        steps = np.zeros(len(clients), dtype=np.int64)
        for k, (i, s) in enumerate(zip(clients.tolist(), tasks.tolist())):
            td = self.federation.tasks[s]
            cfg = td.spec
            model = self.models[s]
            # clone: vector_to_parameters makes the parameters views of the vector it is given
            vector_to_parameters(params[s].clone(), model.parameters())
            corr = None
            if corrections is not None:  # r_k = c_s - c_{i,s}, one view per parameter
                r = corrections[s][len(updates.get(s, []))]
                corr = [v.view_as(p) for v, p in zip(
                    torch.split(r, [p.numel() for p in model.parameters()]), model.parameters())]
            x, y = self.train_x[s], self.train_y[s]
            mode = self.class_mask(s)
            held = None if mode == "none" else self.held_classes(s)[i:i + 1]  # (1, K)
            total = 0.0
            options = options_of(cfg)
            opt = (None if is_plain_sgd(cfg.optimizer, options)  # fresh each round and pair
                   else torch_optimizer(cfg.optimizer, options, model.parameters(), cfg.lr))
            for batch in local_batches(td.client_indices[i], cfg.local_epochs, cfg.batch_size,
                                       self.seed, round, i, s):
                b = torch.from_numpy(batch)
                model.zero_grad(set_to_none=True)
                out = model(x[b])
                if held is not None:  # class masking (mmfl.tasks.masking), training only
                    out = training_log_probs(model, out, held, mode)
                loss = F.nll_loss(out, y[b])
                loss.backward()
                with torch.no_grad():
                    if opt is not None:  # SCAFFOLD's correction joins the gradient first
                        for p, r in zip(model.parameters(), corr or ()):
                            p.grad.add_(r)
                        opt.step()
                    elif corr is None:
                        for p in model.parameters():
                            p.sub_(cfg.lr * p.grad)
                    else:  # SCAFFOLD: y <- y - eta (g + c - c_i)
                        for p, r in zip(model.parameters(), corr):
                            p.sub_(cfg.lr * (p.grad + r))
                total += float(loss.detach())
                steps[k] += 1
            g = params[s] - parameters_to_vector(model.parameters()).detach()
            updates.setdefault(s, []).append(g)
            losses[k] = total / max(int(steps[k]), 1)
        return TrainOutput(
            clients=np.asarray(clients), tasks=np.asarray(tasks),
            updates={s: torch.stack(g) for s, g in updates.items()},
            train_loss=losses, steps=steps,
        )
