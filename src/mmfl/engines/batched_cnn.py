"""Batched local SGD of the papers' CNN (:class:`~mmfl.tasks.models.CNN`) for K clients at once.

The K clients' parameters are stacked client-major so that each layer of all clients is one
kernel call:

* a convolution ``Conv2d(C_in, C_out, k, padding=p)`` of K clients is one grouped convolution:
  the inputs are laid out as (B, K * C_in, H, W) (client k's channels at ``k*C_in ...``), the
  weights as (K * C_out, C_in, k, k) and ``groups = K``, so output channels ``k*C_out ...``
  are exactly client k's convolution of its own batch; ReLU and max-pooling act per channel;
* a ``Linear(F_in, F_out)`` of K clients is one ``torch.baddbmm`` with weights stored
  transposed, (K, F_in, F_out) (so their gradients are contiguous), and biases (K, F_out).

A step of the K clients minimises the sum of their losses,
``L = sum_k sum_j c_{k,j} * nll(f(w_k; x_{k,j}), y_{k,j})`` with ``c_{k,j} = 1 / |batch_k|`` on
real samples and 0 on padding (the :class:`~mmfl.engines.vectorized.BatchPlan` weights). The
clients share no parameter, so ``dL / dw_k`` is client k's own batch-mean gradient; autograd
computes all of them in one backward pass, and every client takes its SGD step
``w_k <- w_k - lr * (dL/dw_k + r_k)`` (ALGORITHMS.md section 2; ``r_k`` the SCAFFOLD correction,
none for plain SGD), exactly as the sequential engine does one client at a time.

Only the built-in CNN class qualifies (:func:`cnn_spec`); any other model goes through the
generic ``torch.func`` path of the vectorized engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mmfl.tasks.models import CNN

__all__ = ["CNNSpec", "cnn_spec", "train_cnn"]


@dataclass(frozen=True)
class CNNSpec:
    """Shapes of a :class:`~mmfl.tasks.models.CNN` (conv-relu-pool x2, fc-relu, fc).

    Attributes:
        shapes: per parameter in ``model.parameters()`` order, its shape (one client).
        paddings: padding of conv1 and conv2.
        sample_floats: floats of activations kept for the backward pass per sample (an upper
            bound used to size client chunks).
    """

    shapes: tuple[tuple[int, ...], ...]
    paddings: tuple[int, int]
    sample_floats: int

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]


def cnn_spec(model: torch.nn.Module, input_shape: tuple[int, ...]) -> CNNSpec | None:
    """The :class:`CNNSpec` of ``model`` if it is exactly the built-in CNN, else None.

    A subclass (which may change ``forward``), strided or dilated convolutions, or a parameter
    order other than (conv1.w, conv1.b, conv2.w, conv2.b, fc1.w, fc1.b, fc2.w, fc2.b) is
    declined.
    """
    if type(model) is not CNN:
        return None
    convs = (model.conv1, model.conv2)
    for conv in convs:
        if (conv.bias is None or conv.stride != (1, 1) or conv.dilation != (1, 1)
                or conv.groups != 1 or conv.padding_mode != "zeros"
                or not isinstance(conv.padding, tuple) or conv.padding[0] != conv.padding[1]):
            return None
    expected = [p for m in (*convs, model.fc1, model.fc2) for p in (m.weight, m.bias)]
    actual = list(model.parameters())
    if len(expected) != len(actual) or any(a is not b for a, b in zip(expected, actual)):
        return None
    _, h, w = (int(d) for d in input_shape)
    c1, c2 = model.conv1.out_channels, model.conv2.out_channels
    # conv output + relu output per conv layer, pooled output, the fc activations
    floats = (2 * c1 * h * w + c1 * (h // 2) * (w // 2) + 2 * c2 * (h // 2) * (w // 2)
              + c2 * (h // 4) * (w // 4) + 2 * model.fc1.out_features
              + 2 * model.fc2.out_features)
    return CNNSpec(tuple(tuple(p.shape) for p in actual),
                   (int(convs[0].padding[0]), int(convs[1].padding[0])), int(floats))


def _stack(spec: CNNSpec, v: torch.Tensor) -> list[torch.Tensor]:
    """Per-parameter stacked copies of (K, D) flat client vectors ``v``, in the layout above:
    conv weights (K*C_out, C_in, kh, kw), conv biases (K*C_out,), fc weights transposed
    (K, in, out), fc biases (K, out). Always copies (with K = 1 a reshape of ``v`` could be a
    view of it, and the SGD steps update these tensors in place)."""
    K = v.shape[0]
    out, off = [], 0
    for j, (shape, n) in enumerate(zip(spec.shapes, spec.sizes)):
        part = v[:, off:off + n]
        if j < 4:  # conv: client-major channels
            t = part.reshape(K * shape[0], *shape[1:])
        elif len(shape) == 2:  # fc weight (out, in) -> (K, in, out): contiguous gradients
            t = part.reshape(K, *shape).transpose(1, 2)
        else:
            t = part.reshape(K, n)
        out.append(t.clone(memory_format=torch.contiguous_format))
        off += n
    return out


def _updates(spec: CNNSpec, w: torch.Tensor, P: list[torch.Tensor]) -> torch.Tensor:
    """(K, D) updates ``w - w_k`` of the stacked trained parameters ``P`` (one pass each)."""
    K = P[-1].shape[0]
    G = torch.empty((K, w.numel()), dtype=w.dtype)
    off = 0
    for t, shape, n in zip(P, spec.shapes, spec.sizes):
        if t.dim() == 3:  # fc weight, stored (K, in, out)
            torch.sub(w[off:off + n].view(1, *shape), t.transpose(1, 2),
                      out=G[:, off:off + n].view(K, *shape))
        else:
            torch.sub(w[off:off + n], t.view(K, n), out=G[:, off:off + n])
        off += n
    return G


def _forward(spec: CNNSpec, p: list[torch.Tensor], xb: torch.Tensor, k: int) -> torch.Tensor:
    """Logits of k clients: ``xb`` (B, k*C_in, H, W) -> (k, B, num_classes)."""
    B = xb.shape[0]
    a = F.max_pool2d(F.relu(F.conv2d(xb, p[0], p[1], padding=spec.paddings[0], groups=k)), 2)
    a = F.max_pool2d(F.relu(F.conv2d(a, p[2], p[3], padding=spec.paddings[1], groups=k)), 2)
    feats = a.reshape(B, k, -1).transpose(0, 1)  # (k, B, C2*h*w), each client's flatten order
    hid = F.relu(torch.baddbmm(p[5].unsqueeze(1), feats, p[4]))
    return torch.baddbmm(p[7].unsqueeze(1), hid, p[6])


def train_cnn(spec: CNNSpec, w: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, plan,
              lr: float, corr: torch.Tensor | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """SGD of K clients from the global (D,) vector ``w`` along a batch plan.

    Args:
        X, Y: the task's train inputs (n, C, H, W) float32 and labels (n,) int64.
        plan: a :class:`~mmfl.engines.vectorized.BatchPlan` of K clients (``idx``/``weight``
            (T, K, Bm); the first ``plan.active[t]`` clients take step t).
        corr: (K, D) SCAFFOLD corrections in ``plan.order``, or None.

    Returns:
        (K, D) updates ``G_k = w - w_k`` (in ``plan.order``) and (K,) summed batch losses.
    """
    K = len(plan.order)
    P = _stack(spec, w.detach().unsqueeze(0).expand(K, -1))
    R = None if corr is None else _stack(spec, corr)
    shape = tuple(X.shape[1:])
    Bm = plan.idx.shape[2]
    labels = Y[plan.idx].unsqueeze(3)  # (T, K, Bm, 1)
    loss_acc = torch.zeros(K, dtype=torch.float64)
    for t, k in enumerate(plan.active):
        # client k's rows of the stacked tensors are a prefix of length k (* C_out for convs)
        rows = [k * s[0] if j < 4 else k for j, s in enumerate(spec.shapes)]
        leaves = [v[:r].detach().requires_grad_() for v, r in zip(P, rows)]
        xb = X.index_select(0, plan.idx[t, :k].reshape(-1)).view(k, Bm, *shape)
        xb = xb.transpose(0, 1).reshape(Bm, k * shape[0], *shape[1:])
        with torch.enable_grad():
            logp = torch.log_softmax(_forward(spec, leaves, xb, k), dim=2)
            per_client = -(logp.gather(2, labels[t, :k]).squeeze(2) * plan.weight[t, :k]).sum(1)
            grads = torch.autograd.grad(per_client.sum(), leaves)
        with torch.no_grad():
            for j, (v, g) in enumerate(zip(P, grads)):
                if R is not None:  # SCAFFOLD: g + c - c_i
                    g = g + R[j][:rows[j]]
                v[:rows[j]].sub_(g.mul_(lr))  # g is a fresh tensor: scale it in place
            loss_acc[:k] += per_client.detach()
    return _updates(spec, w.detach(), P), loss_acc.numpy()
