"""Class masking of the local training loss (config key ``tasks[].class_mask``).

The authors' code (haoran-zh/mmfl-Dec, ``utility/training.py``) trains a client with non-iid
data on a masked loss: the model output q (B, K) gets the entries of the classes the client
holds no sample of set to 0 (``q.masked_fill(mask == 0, 0)``) before ``CrossEntropyLoss``
(log_softmax, then nll). Evaluation and the global model's probe losses stay unmasked.

A client's **held classes** are the distinct labels of its local training data
(:func:`held_class_matrix`). :func:`training_log_probs` turns a model's forward output into the
log-probabilities the local training loss ``F.nll_loss`` is taken of:

* ``"none"``: the output unchanged (the same tensor: no arithmetic is added);
* ``"zero"``: the authors' rule. Scores s = the model's loss scores (for
  :class:`~mmfl.tasks.models.AuthorsCNN` its probabilities q, recovered from the output with
  its ``scores_from_log_probs``; for any other model the output, i.e. its log-probabilities),
  absent classes set to 0, then ``log_softmax(s)``. For ``authors_cnn`` this is exactly their
  ``CrossEntropyLoss(q.masked_fill(~held, 0), y)``. It is meant for that model: for a model
  whose scores are log-probabilities (<= 0) the literal rule gives the absent classes the
  *top* score 0, which pulls the held classes' log-probabilities towards 0 as well;
* ``"exclude"``: the softmax restricted to the held classes (absent scores -> -inf):
  ``log p(y) = o_y - logsumexp_{held}(o)`` with o the output. Absent classes get no gradient.

Every function here is plain tensor arithmetic (``torch.where``, ``log_softmax``), so it runs
per sample in the sequential engine and inside ``torch.func.vmap`` over clients in the
vectorized engine, with the same results.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["MODES", "NEG", "held_class_matrix", "loss_scores", "training_log_probs"]

#: The ``class_mask`` values.
MODES = ("none", "zero", "exclude")

#: The score given to an excluded class: finite, but ``exp(NEG - max)`` is exactly 0 in float32
#: whenever some held score is above ``NEG + 104``, so the result equals the one with -inf. A
#: finite value keeps a zero-weight padding row of the vectorized engine, whose placeholder
#: label may be a class the client does not hold, at ``0 * finite = 0`` instead of NaN.
NEG = -1e30


def held_class_matrix(client_indices, y: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, K) bool: entry (i, c) is True when client i holds a training sample of class c.

    Args:
        client_indices: per client i its index array into ``y`` (a sequence, entry i for
            client i, or a mapping client id -> index array; N = the largest id + 1 then).
        y: (n,) int labels of the task's training set.
        num_classes: K.
    """
    items = (client_indices.items() if isinstance(client_indices, Mapping)
             else enumerate(client_indices))
    items = [(int(i), np.asarray(idx, dtype=np.int64)) for i, idx in items]
    n = max((i for i, _ in items), default=-1) + 1
    held = np.zeros((n, int(num_classes)), dtype=bool)
    y = np.asarray(y)
    for i, idx in items:
        if len(idx):
            held[i, np.unique(y[idx])] = True
    return held


def loss_scores(model: torch.nn.Module, out: torch.Tensor) -> torch.Tensor:
    """The scores (..., K) the authors' loss sees, from ``model``'s forward output (..., K):
    ``model.scores_from_log_probs(out)`` where the model defines it (the authors' CNN: its
    probabilities q), else ``out`` itself."""
    recover = getattr(model, "scores_from_log_probs", None)
    return out if recover is None else recover(out)


def training_log_probs(model: torch.nn.Module, out: torch.Tensor, held: torch.Tensor,
                       mode: str) -> torch.Tensor:
    """The log-probabilities of the masked local training loss (see the module docstring).

    Args:
        model: the module that produced ``out`` (only its class matters: which scores it has).
        out: (B, K) the model's forward output (log-probabilities).
        held: (B, K) or (1, K) or (K,) bool, True for the classes the client holds.
        mode: ``"none"``, ``"zero"`` or ``"exclude"``.

    Returns:
        (B, K) log-probabilities; ``F.nll_loss`` of them is the client's training loss. For
        ``"none"`` this is ``out`` itself.
    """
    if mode == "none":
        return out
    if mode == "zero":
        s = torch.where(held, loss_scores(model, out), 0.0)
    elif mode == "exclude":
        s = torch.where(held, out, NEG)
    else:
        raise ValueError(f"class_mask must be one of {'|'.join(MODES)}, got {mode!r}")
    return F.log_softmax(s, dim=-1)
