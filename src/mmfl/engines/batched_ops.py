"""Kernels shared by the batched local-training paths (K clients' models at once).

Both hand-written paths of the vectorized engine (the ``mlp``/``logreg`` batched matmuls and the
papers' ``cnn``) end a forward pass in K clients' logits and need the weighted negative
log-likelihood and its gradient with respect to those logits; the CNN path also steps its linear
layers with one fused batched matmul. The CNN and the generic ``torch.func`` path keep one stacked
tensor per parameter and write the clients' updates from them with :func:`write_updates`.
"""

from __future__ import annotations

import torch

__all__ = ["linear_sgd_", "nll_and_grad_", "write_updates"]


def nll_and_grad_(z: torch.Tensor, y: torch.Tensor, c: torch.Tensor,
                  neg_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted nll of K clients' logits and its gradient (overwrites ``z``).

    With ``logp = log_softmax(z)`` (written out: torch's kernel is slow for a short last dim on
    the CPU): ``loss_k = -sum_j c_{k,j} logp[k, j, y_{k,j}]`` and
    ``dz = c * (softmax(z) - onehot(y))``, the gradient of ``sum_k loss_k`` (client k's loss
    depends on its own logits only, so ``dz[k]`` is client k's own gradient).

    Args:
        z: (K, B, C) float32 logits; overwritten by ``z - max(z)``.
        y: (K, B, 1) int64 labels.
        c: (K, B, 1) float32 sample weights (1 / batch length, 0 on padding).
        neg_c: ``-c``.

    Returns:
        (K,) float32 loss per client and (K, B, C) ``dz``.
    """
    z.sub_(z.amax(2, keepdim=True))
    e = z.exp()
    se = e.sum(2, keepdim=True)
    logp_y = z.gather(2, y).sub_(se.log())
    loss = logp_y.mul_(c).sum((1, 2)).neg_()
    dz = e.mul_(c / se).scatter_add_(2, y, neg_c)
    return loss, dz


def linear_sgd_(W: torch.Tensor, b: torch.Tensor, dz: torch.Tensor, a: torch.Tensor, lr: float,
                rW: torch.Tensor | None = None, rb: torch.Tensor | None = None) -> None:
    """SGD step of K clients' ``Linear`` layers, ``z = a W^T + b``, fused with its gradient.

    ``W_k <- W_k - lr * (dz_k^T a_k + rW_k)`` as one ``baddbmm_`` (the weight gradient is never
    stored) and ``b_k <- b_k - lr * (sum_j dz_k[j] + rb_k)``; ``rW``/``rb`` are SCAFFOLD
    corrections (None for plain SGD). Any gradient that flows through ``W`` (``dz W``) must be
    taken before this call.

    Args:
        W: (K, out, in) weights, updated in place. b: (K, out) biases, updated in place.
        dz: (K, B, out) gradient of the loss sum with respect to ``z``. a: (K, B, in) inputs.
    """
    W.baddbmm_(dz.transpose(1, 2), a, alpha=-lr)
    db = dz.sum(1)
    if rW is not None:
        W.sub_(rW, alpha=lr)
        db.add_(rb)
    b.sub_(db, alpha=lr)


def write_updates(out: torch.Tensor, w: torch.Tensor, stacked) -> None:
    """``out[k] = w - w_k`` from per-parameter stacked trained parameters.

    Args:
        out: (K, D) float32 destination (may be a row block of a larger tensor).
        w: (D,) the global flat vector the clients started from.
        stacked: per parameter, in flat-vector order, a contiguous tensor holding K clients'
            copies client-major (any shape of K * n_j elements, e.g. (K, *shape) or a grouped
            conv weight (K * C_out, C_in, kh, kw)).
    """
    K = out.shape[0]
    off = 0
    for t in stacked:
        n = t.numel() // K
        torch.sub(w[off:off + n], t.view(K, n), out=out[:, off:off + n])
        off += n
