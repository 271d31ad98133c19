"""A task's loss, and what a model must output for it (``tasks[i].loss``).

Every engine trains and evaluates with ``F.nll_loss`` of log-probabilities, and mmfl's own
models end with ``log_softmax``. A model that returns logits (as most PyTorch code is written)
is trained with the cross-entropy loss, which is exactly ``nll_loss(log_softmax(logits))``:
such a model is wrapped in :class:`LogSoftmaxOutput` once, at start-up, and every engine path
(sequential, vectorized, Flower) sees log-probabilities as before. The wrapper adds no
parameter, so the flat parameter vector w_s is the user model's own.

``loss = "auto"`` (the default) decides from one forward pass of a few training samples:
outputs whose rows satisfy sum_k exp(out_k) = 1 are log-probabilities (``nll``), anything else
is logits (``cross_entropy``). An explicit ``nll`` on outputs that are not log-probabilities is
a ConfigError naming ``tasks[i].loss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmfl.errors import ConfigError
from mmfl.tasks.models import eval_mode

__all__ = ["LOSSES", "LogSoftmaxOutput", "attach_loss", "is_log_probabilities"]

LOSSES = ("auto", "nll", "cross_entropy")
#: samples of the start-up forward pass
PROBE_SAMPLES = 8
#: |sum_k exp(out_k) - 1| below this (every row) reads as log-probabilities
TOLERANCE = 1e-3


class LogSoftmaxOutput(nn.Module):
    """``log_softmax(model(x))``: a logits model as log-probabilities, so that the engines'
    ``nll_loss`` is the cross-entropy of its logits. ``inner`` is the user's model."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.inner(x), dim=-1)


def is_log_probabilities(out: torch.Tensor) -> bool:
    """Whether every row of ``out`` (B, K) is a log-probability vector."""
    return bool(torch.isfinite(out).all() and
                ((out.exp().sum(dim=-1) - 1).abs() < TOLERANCE).all())


def attach_loss(model: nn.Module, loss: str, x: torch.Tensor, num_classes: int,
                index: int) -> nn.Module:
    """``model`` ready for the engines' nll loss under ``tasks[index].loss = loss``: itself
    (log-probabilities) or wrapped in :class:`LogSoftmaxOutput` (logits). ``x`` holds a few
    training inputs for the start-up check of the output's shape (B, num_classes) and kind;
    the check runs in eval mode without touching any random stream."""
    with torch.random.fork_rng(devices=[]), torch.no_grad(), eval_mode(model):
        out = model(x)
    key = f"tasks[{index}].model"
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(x), num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(key, f"must return a (batch, {num_classes}) tensor of class scores; "
                          f"it returned {shape}", show_got=False)
    log_probs = is_log_probabilities(out)
    if loss == "nll" and not log_probs:
        total = float(out.double().exp().sum(dim=-1).mean())
        raise ConfigError(f"tasks[{index}].loss", "'nll' needs a model that returns "
                          f"log-probabilities, but the rows of exp(output) sum to {total:.3g}, "
                          "not 1; set loss = \"cross_entropy\" for a model that returns logits",
                          loss)
    if loss == "cross_entropy" or (loss == "auto" and not log_probs):
        return LogSoftmaxOutput(model)
    return model
