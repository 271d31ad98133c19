"""Server optimizers: the rule that turns a round's aggregated update A_s into the step of the
global model w_s (docs/algorithms.md section 3.2), after "Adaptive Federated Optimization"
(Reddi et al., ICLR 2021) and FedAvgM (Hsu et al., 2019).

With eta = ``[server] lr`` and A_s = sum_k c_k G_k (+ stale terms), the aggregate every sampler
and aggregator produces (an unbiased estimate of the full-participation update where the
sampler is unbiased):

* ``sgd``:     w <- w - eta A                                  (the papers; the default)
* ``fedavgm``: m <- beta m + A;                        w <- w - eta m
* ``fedadam``: m <- b1 m + (1 - b1) A;  v <- b2 v + (1 - b2) A^2;
               w <- w - eta m / (sqrt(v) + tau)
* ``fedyogi``: as fedadam with v <- v - (1 - b2) A^2 sign(v - A^2)

m starts at 0 and v at tau^2, per model; a model with no update in a round keeps its state.
The optimizers act on the aggregate only, so they compose with every sampler and aggregator,
and the statement "A_s is unbiased" is unchanged: what changes is the step taken from it.
The state is checkpointed (prefix ``server_optimizer``).
"""

from __future__ import annotations

import numpy as np
import torch

from mmfl.experiment.config import ServerOptimizerConfig

__all__ = ["ServerOptimizer", "build_server_optimizer"]


class ServerOptimizer:
    """One of the adaptive rules above for S models with ``dims`` (S,) parameters."""

    def __init__(self, cfg: ServerOptimizerConfig, dims: list[int]):
        self.name = cfg.name
        self.opts = dict(cfg.options)
        self.m = [torch.zeros(d) for d in dims]
        tau = self.opts.get("tau", 0.0)
        self.v = [torch.full((d,), tau * tau) for d in dims] if "tau" in self.opts else None

    def step(self, params: list[torch.Tensor], aggregates: list[torch.Tensor | None],
             lr: float) -> list[torch.Tensor]:
        """New global models from ``aggregates`` (S,) ((D_s,) or None); inputs unchanged."""
        new = list(params)
        for s, a in enumerate(aggregates):
            if a is None:
                continue
            if self.name == "fedavgm":
                self.m[s] = self.opts["momentum"] * self.m[s] + a
                new[s] = params[s] - lr * self.m[s]
                continue
            b1, b2, tau = self.opts["beta1"], self.opts["beta2"], self.opts["tau"]
            self.m[s] = b1 * self.m[s] + (1 - b1) * a
            a2 = a * a
            if self.name == "fedadam":
                self.v[s] = b2 * self.v[s] + (1 - b2) * a2
            else:  # fedyogi
                self.v[s] = self.v[s] - (1 - b2) * a2 * torch.sign(self.v[s] - a2)
            new[s] = params[s] - lr * self.m[s] / (torch.sqrt(self.v[s]) + tau)
        return new

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {f"m.{s}": m.numpy() for s, m in enumerate(self.m)}
        if self.v is not None:
            out.update({f"v.{s}": v.numpy() for s, v in enumerate(self.v)})
        return out

    def load_state_dict(self, d: dict[str, np.ndarray]) -> None:
        self.m = [torch.from_numpy(np.array(d[f"m.{s}"], np.float32)) for s in range(len(self.m))]
        if self.v is not None:
            self.v = [torch.from_numpy(np.array(d[f"v.{s}"], np.float32))
                      for s in range(len(self.v))]


def build_server_optimizer(cfg: ServerOptimizerConfig, dims: list[int]) -> ServerOptimizer | None:
    """The run's server optimizer, or None for ``sgd`` (the engine applies w -= eta A)."""
    return None if cfg.name == "sgd" else ServerOptimizer(cfg, dims)
