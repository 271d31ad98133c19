"""Batched local SGD of the papers' CNN (:class:`~mmfl.tasks.models.CNN`) for K clients at once.

The K clients' parameters are stacked client-major so that each layer of all clients is one
kernel call:

* a convolution ``Conv2d(C_in, C_out, k, padding=p)`` of K clients is one grouped convolution:
  the inputs are laid out as (B, K * C_in, H, W) (client k's channels at ``k*C_in ...``), the
  weights as (K * C_out, C_in, k, k) and ``groups = K``, so output channels ``k*C_out ...``
  are exactly client k's convolution of its own batch; ReLU and max-pooling act per channel;
* a ``Linear(F_in, F_out)`` of K clients is one ``torch.baddbmm`` with weights (K, F_out, F_in)
  (the flat vector's own order, so stacking and the updates are contiguous copies) and biases
  (K, F_out); its backward and SGD step are written by hand, the step fused into one
  ``baddbmm_`` that never stores the weight gradient.

A step of the K clients minimises the sum of their losses,
``L = sum_k sum_j c_{k,j} * nll(f(w_k; x_{k,j}), y_{k,j})`` with ``c_{k,j} = 1 / |batch_k|`` on
real samples and 0 on padding (the :class:`~mmfl.engines.vectorized.BatchPlan` weights). The
clients share no parameter, so ``dL / dw_k`` is client k's own batch-mean gradient; one
autograd pass computes the conv layers' gradients of all clients, and every client takes its
SGD step ``w_k <- w_k - lr * (dL/dw_k + r_k)`` (docs/algorithms.md section 2; ``r_k`` the
SCAFFOLD correction, none for plain SGD), exactly as the sequential engine does one client at a
time.

Only the built-in CNN class qualifies (:func:`cnn_spec`); any other model goes through the
generic ``torch.func`` path of the vectorized engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mmfl.engines.batched_ops import linear_sgd_, nll_and_grad_, write_updates
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

    @property
    def conv_floats(self) -> int:
        """Parameters of the two conv layers (one client)."""
        return sum(self.sizes[:4])


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
    conv weights (K*C_out, C_in, kh, kw), conv biases (K*C_out,), fc weights (K, out, in), fc
    biases (K, out); each a contiguous copy (the SGD steps update them in place)."""
    K = v.shape[0]
    out, off = [], 0
    for j, (shape, n) in enumerate(zip(spec.shapes, spec.sizes)):
        t = torch.empty((K, n), dtype=v.dtype, device=v.device)
        t.copy_(v[:, off:off + n])
        out.append(t.view(K * shape[0], *shape[1:]) if j < 4 else t.view(K, *shape))
        off += n
    return out


def _forward_convs(spec: CNNSpec, p: list[torch.Tensor], xb: torch.Tensor,
                   k: int) -> torch.Tensor:
    """Flattened conv features of k clients: ``xb`` (B, k*C_in, H, W) -> (k, B, C2*h*w), each
    client's features in :meth:`CNN.forward`'s flatten order."""
    B = xb.shape[0]
    a = F.max_pool2d(F.relu(F.conv2d(xb, p[0], p[1], padding=spec.paddings[0], groups=k)), 2)
    a = F.max_pool2d(F.relu(F.conv2d(a, p[2], p[3], padding=spec.paddings[1], groups=k)), 2)
    return a.reshape(B, k, -1).transpose(0, 1)


def train_cnn(spec: CNNSpec, w: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, plan,
              lr: float, corr: torch.Tensor | None, out: torch.Tensor) -> np.ndarray:
    """SGD of K clients from the global (D,) vector ``w`` along a batch plan.

    A step: the conv layers run forward under autograd up to the features ``f`` (k, B, F);
    the two linear layers and the loss are done by hand (``h = relu(f W3^T + b3)``,
    ``z = h W4^T + b4``, ``dz`` from :func:`~mmfl.engines.batched_ops.nll_and_grad_`,
    ``dh = (dz W4) * [h > 0]``, ``df = dh W3``), each linear layer stepped with one fused
    ``baddbmm_`` (:func:`~mmfl.engines.batched_ops.linear_sgd_`), then one autograd pass from
    ``f`` with incoming gradient ``df`` gives the conv gradients, and the conv parameters step.
    Every gradient is taken at the step's starting parameters, as in the sequential engine.

    Args:
        X, Y: the task's train inputs (n, C, H, W) float32 and labels (n,) int64.
        plan: a :class:`~mmfl.engines.vectorized.BatchPlan` of K clients (``idx``/``weight``
            (T, K, Bm); the first ``plan.active[t]`` clients take step t).
        corr: (K, D) SCAFFOLD corrections in ``plan.order``, or None.
        out: (K, D) float32 tensor (may be a row block of a larger one) that receives the
            updates ``G_k = w - w_k`` in ``plan.order``.

    Returns:
        (K,) summed batch losses (float64) in ``plan.order``.
    """
    K = len(plan.order)
    w = w.detach()
    P = _stack(spec, w.unsqueeze(0).expand(K, -1))
    R = None if corr is None else _stack(spec, corr)
    shape = tuple(X.shape[1:])
    Bm = plan.idx.shape[2]
    labels = Y[plan.idx].unsqueeze(3)  # (T, K, Bm, 1)
    weights = plan.weight.unsqueeze(3)  # (T, K, Bm, 1)
    neg_weights = weights.neg()
    loss_acc = torch.zeros(K, dtype=torch.float64, device=w.device)
    for t, k in enumerate(plan.active):
        # client k's rows of the stacked tensors are a prefix of length k (* C_out for convs)
        rows = [k * s[0] if j < 4 else k for j, s in enumerate(spec.shapes)]
        leaves = [v[:r].detach().requires_grad_() for v, r in zip(P[:4], rows)]
        xb = X.index_select(0, plan.idx[t, :k].reshape(-1)).view(k, Bm, *shape)
        xb = xb.transpose(0, 1).reshape(Bm, k * shape[0], *shape[1:])
        with torch.enable_grad():
            feats = _forward_convs(spec, leaves, xb, k)
        with torch.no_grad():
            f = feats.detach()
            W3, b3, W4, b4 = (v[:k] for v in P[4:])
            h = torch.baddbmm(b3.unsqueeze(1), f, W3.transpose(1, 2)).relu_()
            z = torch.baddbmm(b4.unsqueeze(1), h, W4.transpose(1, 2))
            loss, dz = nll_and_grad_(z, labels[t, :k], weights[t, :k], neg_weights[t, :k])
            dh = torch.ops.aten.threshold_backward(torch.bmm(dz, W4), h, 0)
            df = torch.bmm(dh, W3)
            r = [None] * 4 if R is None else [v[:k] for v in R[4:]]
            linear_sgd_(W4, b4, dz, h, lr, r[2], r[3])
            linear_sgd_(W3, b3, dh, f, lr, r[0], r[1])
        grads = torch.autograd.grad(feats, leaves, grad_outputs=df)
        with torch.no_grad():
            for j, g in enumerate(grads):
                if R is not None:  # SCAFFOLD: g + c - c_i
                    g = g + R[j][:rows[j]]
                P[j][:rows[j]].sub_(g.mul_(lr))  # g is a fresh tensor: scale it in place
            loss_acc[:k] += loss
    write_updates(out, w, P)
    return loss_acc.cpu().numpy()
