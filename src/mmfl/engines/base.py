"""The engine interface and what every engine shares: models, flat parameters, apply, evaluate.

Parameters of task s live as one flat float32 vector w_s of length D_s (the model's parameters
concatenated in ``module.parameters()`` order). An update is G = w_s - w_{i,s} (ALGORITHMS.md
section 2), also a flat (D_s,) vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from mmfl.errors import NumericalError
from mmfl.rng import torch_seed
from mmfl.types import AggregationPlan

EVAL_BATCH = 4096


@dataclass
class TrainOutput:
    """Result of one round of local training.

    Attributes:
        clients, tasks: (U,) int, the trained (client, task) pairs, sorted by (task, client).
        updates: per task s, a (U_s, D_s) float32 tensor of G for the pairs of task s, in order.
        train_loss: (U,) float, mean training loss over the pair's local steps.
        steps: (U,) int, local SGD steps taken by each pair.
    """

    clients: np.ndarray
    tasks: np.ndarray
    updates: dict[int, torch.Tensor]
    train_loss: np.ndarray
    steps: np.ndarray


class Engine:
    """Base engine. Subclasses implement :meth:`train`.

    Constructed as ``cls(federation, seed=..., threads=...)``.
    """

    def __init__(self, federation, *, seed: int, threads: int = 1):
        from mmfl.tasks.models import build_model

        torch.set_num_threads(threads)
        self.federation = federation
        self.seed = seed
        self.models: list[torch.nn.Module] = []
        self.train_x: list[torch.Tensor] = []
        self.train_y: list[torch.Tensor] = []
        self.test_x: list[torch.Tensor] = []
        self.test_y: list[torch.Tensor] = []
        for s, td in enumerate(federation.tasks):
            ds, cfg = td.dataset, td.config
            self.models.append(
                build_model(cfg.model, dict(cfg.model_options), tuple(ds.input_shape),
                            ds.num_classes, torch_seed(seed, "init", s))
            )
            self.train_x.append(_tensor(ds.x_train, np.float32))
            self.train_y.append(_tensor(ds.y_train, np.int64))
            self.test_x.append(_tensor(ds.x_test, np.float32))
            self.test_y.append(_tensor(ds.y_test, np.int64))

    @property
    def num_tasks(self) -> int:
        return len(self.models)

    def init_params(self) -> list[torch.Tensor]:
        """Initial global parameters: per task a (D_s,) float32 vector."""
        return [parameters_to_vector(m.parameters()).detach().clone() for m in self.models]

    def train(self, params: list[torch.Tensor], clients: np.ndarray, tasks: np.ndarray,
              round: int) -> TrainOutput:
        """Run local training (E_s epochs of SGD) for every (client, task) pair."""
        raise NotImplementedError

    def apply(self, params: list[torch.Tensor], out: TrainOutput,
              plan: AggregationPlan) -> list[torch.Tensor]:
        """w_s <- w_s - eta_g * sum_k c_k G_k (ALGORITHMS.md sections 3 and 7); new list, inputs kept."""
        new = list(params)
        for s, g in out.updates.items():
            sel = out.tasks == s
            mine = plan.task == s
            if not np.array_equal(plan.client[mine], out.clients[sel]):
                raise ValueError(f"aggregation plan and trained pairs differ for task {s}")
            coef = torch.from_numpy(plan.coefficient[mine].astype(np.float32))
            new[s] = params[s] - plan.server_lr * (coef @ g)
        return new

    @torch.no_grad()
    def evaluate(self, params: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """Test accuracy and mean loss of every task: two (S,) float arrays."""
        acc = np.zeros(self.num_tasks)
        loss = np.zeros(self.num_tasks)
        for s, model in enumerate(self.models):
            vector_to_parameters(params[s], model.parameters())
            x, y = self.test_x[s], self.test_y[s]
            correct, total = 0, 0.0
            for a in range(0, len(y), EVAL_BATCH):
                logp = model(x[a:a + EVAL_BATCH])
                total += float(F.nll_loss(logp, y[a:a + EVAL_BATCH], reduction="sum"))
                correct += int((logp.argmax(1) == y[a:a + EVAL_BATCH]).sum())
            acc[s] = correct / max(len(y), 1)
            loss[s] = total / max(len(y), 1)
        return acc, loss


def _tensor(a: np.ndarray, dtype) -> torch.Tensor:
    """A torch view of a dataset array (copied only when not contiguous, typed or writable)."""
    return torch.from_numpy(np.require(a, dtype, ["C_CONTIGUOUS", "WRITEABLE"]))


def check_finite(update: torch.Tensor, task: str, client: int, round: int) -> None:
    """Raise NumericalError when a client's update holds NaN or inf."""
    if not bool(torch.isfinite(update).all()):
        raise NumericalError(
            f"task {task}: client {client} produced a non-finite update in round {round + 1} "
            "(learning rate too large?); the run stopped, results up to the last round are kept"
        )
