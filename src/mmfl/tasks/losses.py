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

``loss = "mse"`` is regression: a dataset with real-valued targets (``Dataset(...,
regression=True)``, targets y (n,) or (n, k)) and a model whose output is (B, k), or (B,) for
one target. The loss of a sample is its squared error averaged over the k outputs,
l_j = (1/k) sum_c (out_{j,c} - y_{j,c})^2, and a batch's loss the mean over its samples
(``F.mse_loss`` of the batch). ``auto`` on a regression dataset is ``mse``; ``mse`` on class
labels, ``nll`` / ``cross_entropy`` on real-valued targets, and a model that returns
log-probabilities (a classifier) under ``mse`` are ConfigErrors naming ``tasks[i].loss``.
Evaluation of a regression task reports the test MSE as its loss and the coefficient of
determination R^2 = 1 - SSE / SST as its accuracy (:func:`r_squared`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmfl.errors import ConfigError
from mmfl.tasks.models import eval_mode

__all__ = ["LOSSES", "LogSoftmaxOutput", "attach_loss", "is_log_probabilities", "r_squared",
           "squared_errors", "task_loss"]

LOSSES = ("auto", "nll", "cross_entropy", "mse")
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


def squared_errors(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) per-sample squared error averaged over the k outputs, l_j = (1/k) sum_c
    (out_{j,c} - y_{j,c})^2, of predictions ``out`` ((B, k) or (B,)) against targets ``y``
    ((B, k) or (B,), the dataset's shape)."""
    d = out.reshape(y.shape) - y
    return d.square().reshape(y.shape[0], -1).mean(1)


def task_loss(out: torch.Tensor, y: torch.Tensor, regression: bool,
              reduction: str = "mean") -> torch.Tensor:
    """A batch's loss as the engines train and probe with it: ``F.nll_loss`` of
    log-probabilities (classification), or :func:`squared_errors` (regression); ``reduction``
    "mean" (the batch loss), "sum" or "none" ((B,) per sample), as in ``F.nll_loss``."""
    if not regression:
        return F.nll_loss(out, y, reduction=reduction)
    per = squared_errors(out, y)
    return per.mean() if reduction == "mean" else per.sum() if reduction == "sum" else per


def r_squared(sse: float, y: torch.Tensor) -> float:
    """The coefficient of determination R^2 = 1 - SSE / SST of predictions with summed squared
    error ``sse`` over all entries of the targets ``y`` ((n,) or (n, k)), SST = sum of the
    squared deviations of y from its per-output mean (pooled over the k outputs). 1 is a
    perfect fit, 0 predicting the test mean, below 0 worse than that; 1 - R^2 = MSE / mean
    per-output variance of y. NaN-free: SST > 0 is checked when the federation is built."""
    yd = y.double()
    sst = float((yd - yd.mean(0)).square().sum())
    return 1.0 - sse / sst


def attach_loss(model: nn.Module, loss: str, x: torch.Tensor, num_classes: int,
                index: int, regression: bool = False) -> nn.Module:
    """``model`` ready for the engines' nll loss under ``tasks[index].loss = loss``: itself
    (log-probabilities) or wrapped in :class:`LogSoftmaxOutput` (logits). ``x`` holds a few
    training inputs for the start-up check of the output's shape (B, num_classes) and kind;
    the check runs in eval mode without touching any random stream. ``regression``: the
    task's dataset has real-valued targets; the model (unchanged) must then output (B, k) with
    k = ``num_classes``, or (B,) for k = 1, and the loss be ``mse`` or ``auto``."""
    with torch.random.fork_rng(devices=[]), torch.no_grad(), eval_mode(model):
        out = model(x)
    if regression or loss == "mse":
        return _regression_model(model, out, loss, num_classes, index, regression, len(x))
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


def _regression_model(model: nn.Module, out, loss: str, k: int, index: int,
                      regression: bool, n: int) -> nn.Module:
    """The checks of :func:`attach_loss` for ``loss = "mse"`` or a regression dataset."""
    key = f"tasks[{index}].loss"
    if not regression:
        raise ConfigError(key, "'mse' needs real-valued targets, but the task's dataset has "
                          "class labels; use \"auto\", \"cross_entropy\" or \"nll\" (or a "
                          "dataset built with regression=True)", loss)
    if loss not in ("mse", "auto"):
        raise ConfigError(key, f"'{loss}' needs class labels, but the task's dataset has "
                          "real-valued targets (regression); use \"mse\"", loss)
    ok = isinstance(out, torch.Tensor) and (
        tuple(out.shape) == (n, k) or (k == 1 and tuple(out.shape) == (n,)))
    if not ok:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"tasks[{index}].model", f"must return a (batch, {k}) tensor of "
                          f"predictions{' (or (batch,))' if k == 1 else ''} for a regression "
                          f"task; it returned {got}", show_got=False)
    if k > 1 and is_log_probabilities(out):
        raise ConfigError(key, "'mse' needs a model that returns predictions, but this one "
                          "returns log-probabilities (a classifier)", loss)
    return model
