"""Local optimizers (``tasks[i].optimizer`` with ``[tasks.optimizer_options]``): the step a
client takes from its minibatch gradient g during local training (docs/algorithms.md
section 2).

* ``sgd``:   momentum mu, ``nesterov``, L2 ``weight_decay`` wd, as ``torch.optim.SGD``:
             g <- g + wd p;  b <- g (first step), b <- mu b + g;  d = g + mu b (nesterov) or b;
             p <- p - lr d.  Without momentum and weight decay: p <- p - lr g (the papers').
* ``adam``:  ``torch.optim.Adam`` (L2 weight decay in the gradient, bias-corrected moments):
             m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
             p <- p - lr (m / (1 - b1^k)) / (sqrt(v / (1 - b2^k)) + eps)   at step k = 1, 2, ...
* ``adamw``: as adam with decoupled weight decay p <- p (1 - lr wd) before the step.

Optimizer state (b, m, v, k) starts fresh every round for every pair, as is standard in
federated learning: the server sends w_s only, and a client keeps nothing between rounds.
SCAFFOLD's correction c_s - c_{i,s} is added to g before the optimizer sees it.

:class:`LocalOptimizer` works on stacked per-client tensors (K, *shape) of one parameter, so
the vectorized engine steps all clients of a task at once; the sequential engine (the oracle)
uses ``torch.optim`` itself (:func:`torch_optimizer`).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from mmfl.registry import Option

__all__ = ["LocalOptimizer", "OPTIMIZERS", "is_plain_sgd", "options_of", "torch_optimizer"]

_DECAY = "L2 weight decay wd (added to the gradient)."
OPTIMIZERS: dict[str, dict[str, Option]] = {
    "sgd": {"momentum": Option(float, 0.0, "0..1", "Momentum mu (0 = none)."),
            "nesterov": Option(bool, False, "", "Nesterov momentum (needs momentum > 0)."),
            "weight_decay": Option(float, 0.0, ">= 0", _DECAY)},
    "adam": {"betas": Option("table", [0.9, 0.999], "", "[beta1, beta2], each in [0, 1)."),
             "eps": Option(float, 1e-8, "> 0", "Added to the root of the second moment."),
             "weight_decay": Option(float, 0.0, ">= 0", _DECAY)},
    "adamw": {"betas": Option("table", [0.9, 0.999], "", "[beta1, beta2], each in [0, 1)."),
              "eps": Option(float, 1e-8, "> 0", "Added to the root of the second moment."),
              "weight_decay": Option(float, 1e-2, ">= 0", "Decoupled weight decay: p <- p (1 "
                                     "- lr wd) each step.")},
}


def options_of(spec) -> dict[str, Any]:
    """A TrainingSpec's optimizer options with the missing ones at their defaults."""
    return {k: spec.optimizer_options.get(k, o.default)
            for k, o in OPTIMIZERS[spec.optimizer].items()}


def is_plain_sgd(name: str, options: Mapping[str, Any]) -> bool:
    """Plain SGD (the papers' local step, which every engine's fast path implements)."""
    return name == "sgd" and not options.get("momentum") and not options.get("weight_decay")


def torch_optimizer(name: str, options: Mapping[str, Any], params, lr: float):
    """The ``torch.optim`` optimizer of the same rule (the sequential engine's oracle)."""
    o = dict(options)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o["momentum"], nesterov=o["nesterov"],
                               weight_decay=o["weight_decay"])
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=tuple(o["betas"]), eps=o["eps"],
               weight_decay=o["weight_decay"])


class LocalOptimizer:
    """The rule above on stacked tensors: ``step(p, g, k_active)`` updates ``p[:k]`` in place
    from ``g`` ((k, *shape)), with one state per parameter name, sized for K clients."""

    def __init__(self, name: str, options: Mapping[str, Any], lr: float):
        self.name, self.o, self.lr = name, dict(options), lr
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.k = 0  # steps taken by the active clients (they all started together)

    def tick(self) -> None:
        """Advance the step counter k (once per local step, before its parameter updates)."""
        self.k += 1

    @torch.no_grad()
    def step(self, key: str, p: torch.Tensor, g: torch.Tensor) -> None:
        """One step of parameter ``key`` for the first ``len(g)`` clients of ``p``."""
        k = len(g)
        p_k = p[:k]
        st = self.state.setdefault(key, {})
        o, lr = self.o, self.lr
        if self.name == "sgd":
            if o["weight_decay"]:
                g = g + o["weight_decay"] * p_k
            mu = o["momentum"]
            if mu:
                if "b" not in st:
                    st["b"] = torch.zeros_like(p)
                    st["b"][:k] = g
                else:
                    st["b"][:k] = mu * st["b"][:k] + g
                g = g + mu * st["b"][:k] if o["nesterov"] else st["b"][:k]
            p_k.sub_(lr * g)
            return
        b1, b2 = o["betas"]
        if self.name == "adamw":
            p_k.mul_(1 - lr * o["weight_decay"])
        elif o["weight_decay"]:
            g = g + o["weight_decay"] * p_k
        if "m" not in st:
            st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
        m, v = st["m"][:k], st["v"][:k]
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        bias1, bias2 = 1 - b1 ** self.k, 1 - b2 ** self.k
        denom = (v.sqrt() / (bias2 ** 0.5)).add_(o["eps"])
        p_k.addcdiv_(m, denom, value=-lr / bias1)
