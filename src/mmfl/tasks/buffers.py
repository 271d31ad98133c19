"""Model buffers (batch norm's running statistics and the like) and ``tasks[i].buffers``.

A model's floating-point buffers travel as one flat float32 vector b_s per task (their
``named_buffers()`` order), beside the parameter vector w_s, which they never join: they are
not trained by gradients, so they stay out of G, its norms and every sampling signal.
Integer buffers (batch norm's ``num_batches_tracked``) keep their initial values.

* ``buffers = "aggregate"`` (the default): the server's b_s becomes, after each round, the
  average of the buffers the round's accepted pairs ended local training with, weighted by
  their sample counts n_{i,s} (FedAvg's rule; not the unbiased 1/p weighting of w_s, which
  would not keep running variances positive). Clients start local training from b_s.
* ``buffers = "local"`` (FedBN, Li et al., ICLR 2021): each client keeps its own b_{i,s}
  (the server's initial b_s until it first trains) and starts from it; the server's b_s, used
  for evaluation and loss probes, is the n_{i,s}-weighted average of the stored b_{i,s}.

Evaluation and loss probes run the global model in eval mode with the server's b_s. Local
training of a model with buffers skips a minibatch of a single sample (batch norm cannot
normalise one), as PyTorch's ``drop_last`` would. The vectorized engine trains clients of
equal data size together on its generic path, each carrying its own buffers (each batch's
statistics come from that client's samples only); a model with other buffers, or trained with
adam / adamw, trains one client at a time with the sequential engine's loop (it says so once
at start-up).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["buffers_to_vector", "float_buffers", "vector_to_buffers"]


def float_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The model's floating-point buffers, in ``named_buffers()`` order."""
    return [b for _, b in model.named_buffers() if b.is_floating_point()]


def buffers_to_vector(model: nn.Module) -> torch.Tensor:
    """(Db,) float32 CPU copy of the model's floating-point buffers (empty if none)."""
    bufs = float_buffers(model)
    if not bufs:
        return torch.zeros(0)
    return torch.cat([b.detach().reshape(-1).float() for b in bufs]).cpu().clone()


@torch.no_grad()
def vector_to_buffers(vec: torch.Tensor, model: nn.Module) -> None:
    """Copy ``vec`` (Db,) into the model's floating-point buffers (in place)."""
    off = 0
    for b in float_buffers(model):
        n = b.numel()
        b.copy_(vec[off:off + n].view_as(b))
        off += n
