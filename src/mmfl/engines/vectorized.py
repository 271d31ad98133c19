"""The ``vectorized`` engine: all active clients of a task train together, in lock step.

Semantics are exactly those of the ``sequential`` oracle (docs/algorithms.md section 2): client i of
task s in round t sees the index batches of :func:`~mmfl.engines.sequential.local_batches`
(same stream, same order, same number of steps, a smaller last batch per epoch) and takes plain
SGD steps ``w <- w - lr * grad(mean nll over the batch)`` (with SCAFFOLD corrections r_k,
``w <- w - lr * (grad + r_k)``: the client's constant (D,) correction is added to its gradient
at every step it takes). Only the arithmetic is batched.

How unequal clients are handled (padding + masks, with the idle tail cut off):

* Each client's batches are laid out as rows of a padded index tensor ``idx (T, K, Bm)`` with a
  weight tensor ``weight (T, K, Bm)`` holding ``1 / len(batch)`` for a real sample and ``0`` for
  padding. ``sum_j weight_j * nll_j`` is the batch mean, so padded samples contribute nothing to
  the loss or the gradient.
* Clients are sorted by their number of steps (descending). At step t exactly the first
  ``active[t]`` clients still have a batch, so the step works on a contiguous prefix of the
  stacked parameters: a finished client is simply no longer touched (no wasted compute on it).
* Clients are trained in groups (:func:`client_groups`): sorted by data size and cut where the
  batch length ``min(n_i, batch_size)`` drops below half of the group's largest, so a few big
  clients do not pad the many small ones' batches to their length (and at most a client chunk).

Three implementations of a step:

* Fast path for ``logreg`` and ``mlp`` (Linear-ReLU stacks): forward and backward written by hand
  with batched matmuls (``torch.bmm``) over the client dimension; the clients' weights and
  weight gradients live in scratch buffers the engine reuses across steps and rounds, and the
  updates are written into the returned tensor directly where the row order allows. No autograd.
* Fast path for the papers' ``cnn`` (:mod:`mmfl.engines.batched_cnn`): the K clients' convolutions
  as one grouped convolution (``groups = K``) with one autograd pass for their gradients (the
  clients share no parameter, so each gets its own), their linear layers as ``baddbmm`` with a
  hand-written backward and a fused SGD step. Client chunks keep the activations within
  :data:`ACTIVATION_BUDGET` floats and, for speed, a chunk's working set within
  :data:`CNN_CACHE_BUDGET` floats.
* One client at a time, the sequential engine's loop (:func:`~mmfl.engines.sequential.train_pairs`,
  so the same results bit for bit), for models with buffers (batch norm) and, on the CPU, for
  convolutional models the grouped-conv path does not cover (``authors_cnn``, ``cnn`` with
  class masking or another optimizer than plain SGD, user CNNs): torch.func.vmap batches
  their convolutions as grouped convolutions, which measured 2.3x slower than the loop for
  ``authors_cnn`` on the authors' federation (benchmarks/README.md).
* Generic path for any other model (``lstm``, user models without convolutions, and every model
  when ``fast_path=False``) and every
  regression task (``loss = "mse"``, whose vmapped loss is sum_j c_j l_j of the per-sample
  squared errors of :func:`~mmfl.tasks.losses.squared_errors`):
  ``torch.func.vmap`` over ``grad_and_value`` of a ``functional_call`` of the task's module,
  with the clients' stacked parameters as the vmapped argument. Large models are processed in
  client chunks so the stacked parameters and gradients stay within :data:`STACK_BUDGET` floats.
  For a model with convolutions the clients of one vmap call are further limited so that their
  activations stay within :data:`GENERIC_CONV_BUDGET` floats (vmapped convolutions with
  per-client weights run as grouped convolutions, which slow down once they leave the cache).

Batch norm (models with buffers, :mod:`mmfl.tasks.buffers`) on the generic path: clients of equal
data size train together (:func:`equal_size_groups`), so at every step their batches have one
length; the padding columns are cut (no padding row enters a batch's mean and variance), a
one-sample step is skipped as the sequential loop skips it, and each client's buffers are one
more vmapped argument of ``functional_call``, which batch norm updates in place. Only plain SGD
(with momentum or weight decay) takes this path (:func:`_batches_buffers`).

Class masking (``tasks[].class_mask`` other than ``"none"``, :mod:`mmfl.tasks.masking`): the
loss of every client is the nll of :func:`~mmfl.tasks.masking.training_log_probs` of its output
with its own held classes, a (K_classes,) bool row passed to the vmapped loss as one more
vmapped argument. Only the generic path implements it: a masked task whose model would take a
fast path (``logreg``, ``mlp``, ``cnn``) goes through the generic path instead (slower, same
results as the sequential engine). ``"none"`` tasks are untouched.

Per-client state exists only inside :meth:`VectorizedEngine.train`; between rounds the engine
holds the global flat vectors only (index arrays into the shared dataset, no per-client copies)
and its scratch buffers (each at most :data:`SCRATCH_BUDGET` floats; their contents are
overwritten before use).

:meth:`VectorizedEngine.probe_losses` is the batched LVR probe: the mean training loss of the
current global model on each client's local data (``Engine.probe_losses`` of the base class is the plain
per-pair loop every engine can use and the tests compare against).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from mmfl import rng
from mmfl.engines.base import (EVAL_BATCH, Engine, TrainOutput, check_corrections,
                               sum_over_forward)
from mmfl.engines.batched_cnn import cnn_spec, train_cnn
from mmfl.engines.batched_ops import nll_and_grad_, write_updates
from mmfl.engines.sequential import train_pairs
from mmfl.registry import register
from mmfl.tasks.losses import squared_errors, task_loss
from mmfl.tasks.masking import training_log_probs
from mmfl.tasks.models import MLP, LogReg
from mmfl.tasks.optimizers import LocalOptimizer, is_plain_sgd, options_of

log = logging.getLogger(__name__)

__all__ = ["BatchPlan", "VectorizedEngine", "batch_plan", "client_groups"]

#: Upper bound on the floats of stacked per-client parameters (plus their gradients) that one
#: client chunk of the generic path may hold (2**26 floats = 256 MiB per copy).
STACK_BUDGET = 2**26

#: Upper bound on the activation floats (batch rows x floats kept per sample) of one step of
#: the batched CNN path (2**27 floats = 512 MiB); larger groups are cut into client chunks.
ACTIVATION_BUDGET = 2**27

#: Client chunks of the batched CNN path are further cut so that one chunk's activations
#: (``batch_size`` rows per client) and conv weights + gradients fit in this many floats
#: (2**22 floats = 16 MiB). The grouped convolutions slow down sharply once a call's working set
#: leaves the cache: one round of 100 clients on 8x8 digits takes 206 ms as one chunk and 155
#: ms in chunks of 25 (conv1 forward on 28x28: 97 ms for 100 clients in one call, 14 ms in 25
#: calls of 4), on the 2-core development VM with 32 MiB of L3.
CNN_CACHE_BUDGET = 2**22

#: Client chunks of the generic path for a model with convolutions (``authors_cnn``, a masked
#: ``cnn``, user models) are cut so that the batch rows of one vmap call times the model's
#: activation floats per sample (:func:`_activation_floats`) stay within this many floats
#: (2**22 = 16 MiB; at least one client per call). ``authors_cnn`` on 28x28 (38k floats per
#: sample), one round of 120 clients x 5 full-batch steps of 150 samples on the 2-core
#: development VM: 70 s in vmap calls of 20 clients (the STACK_BUDGET chunk), 39 s in calls of
#: one client (the sequential engine: 44 s). Models without convolutions are not cut.
GENERIC_CONV_BUDGET = 2**22

#: Scratch buffers (the batched-matmul path's stacked weights and weight gradients, and the
#: staging buffer of updates whose rows of the output are not consecutive) of up to this many
#: floats each are kept by the engine and reused in the next round: a fresh buffer of that size costs a page fault per 4 KiB when first written, which is
#: a large part of a short round. Larger ones are allocated per round.
SCRATCH_BUDGET = 2**22

#: Clients trained together have batch lengths ``min(n_i, batch_size)`` within this factor of
#: each other, so padding rows stay below this factor of the real rows at every full step.
GROUP_RATIO = 2.0


@dataclass
class BatchPlan:
    """The padded batch layout of K clients of one task in one round.

    Attributes:
        order: (K,) int, the clients' positions in the caller's list, sorted by steps descending.
        steps: (K,) int, local steps of each client, in ``order`` (descending).
        idx: (T, K, Bm) int64 tensor, sample indices into the task's train arrays (0 = padding).
        weight: (T, K, Bm) float32 tensor, 1 / batch length for a real sample, 0 for padding.
        active: (T,) int list, number of clients with a batch at step t (a prefix of ``order``).
    """

    order: np.ndarray
    steps: np.ndarray
    idx: torch.Tensor
    weight: torch.Tensor
    active: list[int]

    @property
    def num_steps(self) -> int:
        return len(self.active)

    def to(self, device: torch.device) -> "BatchPlan":
        """The plan with ``idx`` and ``weight`` on ``device`` (itself on the CPU)."""
        if device.type == "cpu":
            return self
        return replace(self, idx=self.idx.to(device), weight=self.weight.to(device))


def batch_plan(indices: list[np.ndarray], clients: np.ndarray, task: int, epochs: int,
               batch_size: int, seed: int, round: int) -> BatchPlan:
    """Lay out the batches :func:`~mmfl.engines.sequential.local_batches` yields for each client
    (docs/algorithms.md section 2), without calling it.

    Client i (n_i samples) shuffles its indices in every epoch e with the e-th permutation of
    ``stream(seed, "shuffle", round, i, task)`` and cuts it into ceil(n_i / B) consecutive
    batches, so sample j of epoch e lands in step ``e * ceil(n_i / B) + j // B``, column
    ``j % B``, with weight ``1 / min(B, n_i - (j // B) * B)``. The permutations come from
    :func:`mmfl.rng.streams` (the same draws as ``local_batches``' ``stream``, derived for
    all clients at once); the layout is computed with array arithmetic, not batch by batch.

    Args:
        indices: per listed client, its (n_i,) index array into the task's train set.
        clients: (K,) client ids (the keys of their shuffle streams), same order as ``indices``.
    """
    K = len(indices)
    n = np.fromiter(map(len, indices), dtype=np.int64, count=K)
    per_epoch = -(-n // batch_size)  # ceil(n_i / B); 0 without data
    order = np.argsort(-(epochs * per_epoch), kind="stable")
    steps = epochs * per_epoch[order]
    T = int(steps[0]) if K else 0
    Bm = max(int(min(int(n.max()), batch_size)), 1) if K else 1
    idx = np.zeros((T, K, Bm), dtype=np.int64)
    weight = np.zeros((T, K, Bm), dtype=np.float32)
    n_ord = n[order]
    if T:
        keys = np.stack([np.full(K, round), np.asarray(clients, np.int64)[order],
                         np.full(K, task)], axis=1)
        # (client in order, epoch) segments of sample indices, each shuffled in place with the
        # draws local_batches' permutation(ind) makes (a shuffle of a copy of ind)
        seg = np.repeat(n_ord, epochs)  # (K * E,) segment lengths
        shuffled = np.concatenate([indices[pos] for pos in order.tolist()
                                   for _ in range(epochs)]).astype(np.int64, copy=False)
        ends, lens = np.cumsum(seg).tolist(), seg.tolist()
        for k, gen in enumerate(rng.streams(seed, rng.SHUFFLE, keys)):
            for e in range(k * epochs, (k + 1) * epochs):
                if lens[e]:
                    gen.shuffle(shuffled[ends[e] - lens[e]:ends[e]])
        j = np.arange(int(seg.sum())) - np.repeat(np.cumsum(seg) - seg, seg)
        k_of = np.repeat(np.repeat(np.arange(K), epochs), seg)
        e_of = np.repeat(np.tile(np.arange(epochs), K), seg)
        full = j // batch_size
        where = (e_of * per_epoch[order][k_of] + full, k_of, j % batch_size)
        idx[where] = shuffled
        # the mean over a batch of b samples: weight 1/b each (float32, like nll_loss's mean)
        blen = np.minimum(batch_size, n_ord[k_of] - full * batch_size)
        weight[where] = np.float32(1.0) / blen.astype(np.float32)
    active = np.searchsorted(-steps, -np.arange(T), side="left").tolist()
    return BatchPlan(order, steps, torch.from_numpy(idx), torch.from_numpy(weight), active)


def client_groups(pairs: np.ndarray, sizes: np.ndarray, batch_size: int,
                  chunk: int, max_rows: int = 0) -> list[np.ndarray]:
    """Split one task's pairs into the client groups that are trained together.

    Every step of a group is padded to the group's longest batch, so clients whose batch
    lengths ``min(n_i, batch_size)`` differ a lot waste compute on padding rows. The pairs are
    sorted by local data size (descending) and cut into runs whose batch lengths are within a
    factor of :data:`GROUP_RATIO` of the run's first (largest), each run further cut into chunks
    of at most ``chunk`` clients and (when ``max_rows`` > 0) at most ``max_rows`` batch rows,
    i.e. ``len(group) * (the group's largest batch length) <= max_rows`` unless a single client
    exceeds it. A client without data counts as batch length 1.

    Args:
        pairs: (K,) positions of the task's pairs (any integers; returned regrouped).
        sizes: (K,) local data sizes n_i of those pairs.

    Returns:
        the groups, each a slice of ``pairs`` sorted by size; together a permutation of them.
    """
    order = np.argsort(-sizes, kind="stable")
    by_size = pairs[order]
    lens = np.maximum(np.minimum(sizes[order], batch_size), 1)
    groups: list[np.ndarray] = []
    a = 0
    while a < len(by_size):
        # first position whose batch length is below lens[a] / GROUP_RATIO (lens is descending)
        end = a + int(np.searchsorted(-lens[a:], -lens[a] / GROUP_RATIO, side="right"))
        cap = chunk if max_rows <= 0 else min(chunk, max(1, max_rows // int(lens[a])))
        end = min(max(end, a + 1), a + cap)
        groups.append(by_size[a:end])
        a = end
    return groups


def _activation_floats(model: nn.Module, x: torch.Tensor) -> int:
    """Floats of the outputs of ``model``'s leaf modules for the input batch ``x`` (one sample):
    an estimate of the activations one sample keeps for the backward pass (functional ops such
    as ``F.max_pool2d`` are not counted)."""
    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    return sum_over_forward(model, x, leaves,
                            lambda mod, out: out.numel() if isinstance(out, torch.Tensor) else 0)


def _linear_stack(model: nn.Module) -> list[nn.Linear] | None:
    """The Linear layers of a Linear-ReLU-...-Linear-log_softmax model, or None if it is not one.

    Only the exact built-in :class:`LogReg` and :class:`MLP` qualify (a subclass may change
    ``forward``); their ``parameters()`` order must be (weight, bias) per layer.
    """
    if type(model) is LogReg:
        layers = [model.fc]
    elif type(model) is MLP:
        body = list(model.body)
        if len(body) % 2 or not all(
                type(a) is nn.Linear and type(r) is nn.ReLU for a, r in zip(body[::2], body[1::2])):
            return None
        layers = [*body[::2], model.out]
    else:
        return None
    if any(lin.bias is None for lin in layers):
        return None
    expected = [p for lin in layers for p in (lin.weight, lin.bias)]
    actual = list(model.parameters())
    if len(expected) != len(actual) or any(a is not b for a, b in zip(expected, actual)):
        return None
    return layers


def _batches_buffers(model: nn.Module, spec) -> bool:
    """Whether the generic path trains ``model``'s clients together carrying their own buffers:
    every buffer is a running statistic of a batch-norm-style layer (``_NormBase``) with a
    ``momentum`` (the exponential average, which a vmapped step updates per client exactly as
    the sequential loop does), and the local optimizer is ``sgd``. Other buffers (a cumulative
    average, a user's own) and ``adam`` / ``adamw`` keep the one-at-a-time loop: a bias
    followed by batch norm has a gradient that is zero up to float rounding, which an adaptive
    optimizer turns into steps of the full learning rate with the rounding's sign, so batched
    arithmetic would leave the sequential oracle by whole steps."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    owned = {id(b) for m in norms for b in m.buffers(recurse=False)}
    return (spec.optimizer == "sgd" and all(m.momentum is not None for m in norms)
            and all(id(b) in owned for b in model.buffers()))


def equal_size_groups(pairs: np.ndarray, sizes: np.ndarray, batch_size: int, chunk: int,
                      max_rows: int = 0) -> list[np.ndarray]:
    """:func:`client_groups` for models with batch statistics (batch norm): only clients of
    equal data size n_i train together, so every step's batches have one length and no
    padding row enters a batch's mean and variance; each size's clients are cut into chunks of
    at most ``chunk`` clients and (``max_rows`` > 0) ``max_rows`` batch rows."""
    groups: list[np.ndarray] = []
    for n in np.unique(sizes)[::-1].tolist():
        same = pairs[sizes == n]
        rows = max(min(n, batch_size), 1)
        cap = chunk if max_rows <= 0 else min(chunk, max(1, max_rows // rows))
        groups += [same[a:a + cap] for a in range(0, len(same), cap)]
    return groups


def _has_conv(model: nn.Module) -> bool:
    """Whether ``model`` has a convolution layer (any dimension)."""
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


@register("engine", "vectorized")
class VectorizedEngine(Engine):
    """Trains all active clients of a task together; same results as ``sequential``.

    Constructed as ``VectorizedEngine(federation, seed=..., threads=..., device="cpu",
    fast_path=True)``; ``fast_path=False`` forces the generic ``torch.func`` path for every
    model (for tests). On a ``device`` other than the CPU every buffer and batch plan lives
    there; parameters arrive and updates leave once per task and round.
    """

    def __init__(self, federation, *, seed: int, threads: int | str = 1,
                 device: str | torch.device = "cpu", fast_path: bool = True):
        super().__init__(federation, seed=seed, threads=threads, device=device)
        # the fast paths have no class masking and no regression loss: such tasks take the
        # generic path
        fast = [fast_path and self.class_mask(s) == "none" and not self.is_regression(s)
                for s in range(self.num_tasks)]
        self._layers = [_linear_stack(m) if f else None for m, f in zip(self.models, fast)]
        self._cnn = [cnn_spec(m, tuple(td.dataset.input_shape)) if f else None
                     for m, td, f in zip(self.models, federation.tasks, fast)]
        self._grad_fns: dict[int, object] = {}
        self._conv_rows: dict[int, int] = {}
        self._scratch_bufs: dict[str, torch.Tensor] = {}
        #: tasks trained one client at a time by the sequential engine's loop (so with its
        #: results bit for bit): models with buffers that the generic path does not carry
        #: (:func:`_batches_buffers`), and on the CPU convolutional models
        #: without the grouped-conv path, whose convolutions torch.func.vmap batches more
        #: slowly than one client at a time there (benchmarks/README.md, authors_cnn)
        self._one_by_one = [(self.has_buffers(s) and not _batches_buffers(m, td.spec)) or (
            fast_path and self.device.type == "cpu" and _has_conv(m) and not (
                self._cnn[s] is not None and is_plain_sgd(td.spec.optimizer, options_of(td.spec))))
            for s, (m, td) in enumerate(zip(self.models, federation.tasks))]
        for s, (layers, cnn) in enumerate(zip(self._layers, self._cnn)):
            if self._one_by_one[s]:
                log.info("task %s: %s: the vectorized engine trains it one client at a time "
                         "(the sequential engine's loop)", federation.tasks[s].spec.name,
                         "its model has buffers other than batch norm's running statistics, or "
                         "trains them with an adaptive optimizer (adam, adamw)"
                         if self.has_buffers(s) and not _batches_buffers(
                             self.models[s], federation.tasks[s].spec) else "its model's "
                         "convolutions have no batched path here, and vmap's is slower than "
                         "one client at a time on a CPU")
                continue
            log.debug("task %d: %s path", s,
                      "batched-matmul" if layers else "grouped-conv" if cnn else "vmap")

    # -- training -------------------------------------------------------------------------------
    def train(self, params, clients, tasks, round, corrections=None):
        """Local training of every (client, task) pair, all clients of a task at once.

        Same contract and results as :meth:`SequentialEngine.train` (pairs in any order; a
        client without data takes no step and returns a zero update; SCAFFOLD
        ``corrections`` are added to each client's gradient at each of its steps).
        """
        clients = np.asarray(clients, dtype=np.int64)
        tasks = np.asarray(tasks, dtype=np.int64)
        corrections = check_corrections(corrections, tasks, self.num_parameters())
        losses = np.zeros(len(clients))
        steps = np.zeros(len(clients), dtype=np.int64)
        updates: dict[int, torch.Tensor] = {}
        buffers: dict[int, torch.Tensor] = {}
        for s in np.unique(tasks).tolist():
            sel = np.flatnonzero(tasks == s)
            if self._one_by_one[s]:  # one client at a time (said once at start-up)
                sub = train_pairs(self, params, clients[sel], tasks[sel], round,
                                  None if corrections is None else {s: corrections[s]})
                updates[s] = sub.updates[s]
                if sub.buffers is not None:
                    buffers[s] = sub.buffers[s]
                losses[sel], steps[sel] = sub.train_loss, sub.steps
                continue
            td = self.federation.tasks[s]
            cfg = td.spec
            w = params[s].detach().to(self.device)  # the broadcast: once per task and round
            D = w.numel()
            sizes = np.array([len(td.client_indices[i]) for i in clients[sel]], dtype=np.int64)
            chunk = max(1, STACK_BUDGET // max(2 * D, 1))
            options = options_of(cfg)
            plain = is_plain_sgd(cfg.optimizer, options)  # else: the vmap path steps it
            cnn, layers = (self._cnn[s], self._layers[s]) if plain else (None, None)
            max_rows = 0
            if cnn is not None:
                max_rows = ACTIVATION_BUDGET // cnn.sample_floats
                per_client = cfg.batch_size * cnn.sample_floats + 2 * cnn.conv_floats
                chunk = min(chunk, max(1, CNN_CACHE_BUDGET // per_client))
            elif layers is None:
                max_rows = self._generic_rows(s)
            G = torch.empty((len(sel), D), dtype=w.dtype, device=self.device)
            pos_in_task = np.empty(len(clients), dtype=np.int64)
            pos_in_task[sel] = np.arange(len(sel))
            buffered = self.has_buffers(s)  # batch norm: each client carries its own buffers
            if buffered:
                B_out = torch.empty((len(sel), self.buffers[s].numel()))
            grouping = equal_size_groups if buffered else client_groups
            for part in grouping(sel, sizes, cfg.batch_size, chunk, max_rows):
                # the caller's order within the group: clients with equal step counts then keep
                # it in plan.order, and a group whose rows of G are consecutive gets its updates
                # written straight into them (the clients train independently, so their order
                # changes no result)
                part = np.sort(part)
                plan = batch_plan([td.client_indices[i] for i in clients[part]], clients[part],
                                  s, cfg.local_epochs, cfg.batch_size, self.seed, round)
                # the batch length of each step, equal for all clients of an equal-size group
                # (batch norm: padding rows are cut, one-sample batches skipped)
                lengths = (plan.weight[:, 0] > 0).sum(1).tolist() if buffered else None
                plan = plan.to(self.device)
                rows = part[plan.order]
                dest = pos_in_task[rows]
                corr = (None if corrections is None
                        else corrections[s][torch.from_numpy(dest)].to(self.device))
                U, direct = self._rows_of(G, dest)
                if layers is not None:
                    loss_sum = self._train_linear(s, w, plan, cfg.lr, corr, U)
                elif cnn is not None:
                    loss_sum = train_cnn(cnn, w, self.train_x[s], self.train_y[s], plan,
                                         cfg.lr, corr, U)
                else:
                    held = (None if self.class_mask(s) == "none"
                            else self.held_classes(s)[torch.from_numpy(clients[rows])
                                                      .to(self.device)])
                    opt = None if plain else LocalOptimizer(cfg.optimizer, options, cfg.lr)
                    bufs = self._client_buffers(s, clients[rows]) if buffered else None
                    loss_sum = self._train_generic(s, w, plan, cfg.lr, corr, U, held, opt,
                                                   bufs, lengths)
                    if buffered:
                        B_out[torch.from_numpy(dest)] = self._buffer_rows(s, bufs).cpu()
                if not direct:
                    G.index_copy_(0, torch.from_numpy(dest).to(self.device), U)
                taken = plan.steps - (sum(n < 2 for n in lengths) if buffered else 0)
                steps[rows] = taken
                losses[rows] = loss_sum / np.maximum(taken, 1)
            updates[s] = G.cpu()  # the uploads: once per task and round
            if buffered:
                buffers[s] = B_out
        return TrainOutput(clients=clients, tasks=tasks, updates=updates, train_loss=losses,
                           steps=steps, buffers=buffers or None)

    def _generic_rows(self, s: int) -> int:
        """Most batch rows per vmap call of the generic path for task s: for a model with
        convolutions :data:`GENERIC_CONV_BUDGET` // its activation floats per sample, else 0
        (no limit). Computed on first use (one forward pass of one sample)."""
        if s not in self._conv_rows:
            model, x = self.models[s], self.train_x[s]
            rows = 0
            if len(x) and any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()):
                rows = max(1, GENERIC_CONV_BUDGET // max(_activation_floats(model, x[:1]), 1))
            self._conv_rows[s] = rows
        return self._conv_rows[s]

    def _scratch(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised float32 buffer of ``shape`` for one use inside a call; buffers of up
        to :data:`SCRATCH_BUDGET` floats are kept and reused by later calls (one per ``name``,
        shared by all tasks, grown to the largest size asked for)."""
        n = int(np.prod(shape))
        buf = self._scratch_bufs.get(name)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=torch.float32, device=self.device)
            if n <= SCRATCH_BUDGET:
                self._scratch_bufs[name] = buf
        return buf[:n].view(shape)

    def _rows_of(self, G: torch.Tensor, dest: np.ndarray) -> tuple[torch.Tensor, bool]:
        """Where a group's (K, D) updates are written, and whether that is ``G`` itself: rows
        ``dest`` of ``G`` when they are consecutive and ascending, else a scratch buffer the
        caller copies into them."""
        K = len(dest)
        a = int(dest[0])
        if bool((dest == np.arange(a, a + K)).all()):
            return G[a:a + K], True
        return self._scratch("updates", (K, G.shape[1])), False

    @torch.no_grad()
    def _train_linear(self, s: int, w: torch.Tensor, plan: BatchPlan, lr: float,
                      corr: torch.Tensor | None, out: torch.Tensor) -> np.ndarray:
        """Hand-written batched SGD for Linear(-ReLU-Linear)* + log_softmax models.

        Per client k (batch X (b, d0), labels y, weights c = 1/b on real samples):
        z_l = a_{l-1} W_l^T + b_l, a_l = relu(z_l), logp = log_softmax(z_L);
        loss = -sum_j c_j logp[j, y_j]; dz_L = c (softmax(z_L) - onehot(y));
        dW_l = dz_l^T a_{l-1}, db_l = sum_j dz_l, dz_{l-1} = (dz_l W_l) * [a_{l-1} > 0].
        The update is ``W -= lr * dW`` as in the sequential engine, after dz_{l-1} is formed;
        with SCAFFOLD corrections ``corr`` ((K, D) in ``plan.order``) ``W -= lr * (dW + r_W)``.

        The K clients' flat parameter vectors are the rows of one (K, D) scratch buffer, so each
        W_l is a (K, out, in) view in the flat vector's own order (stacking is one broadcast
        copy and the updates one subtraction; batched matmuls read the views transposed where
        needed, which costs nothing); the weight gradients live in another buffer. Both are
        reused across steps and rounds, so a short round allocates (and page-faults) little. At
        step 0 every client still holds ``w``, so the matmuls with W_l there are one ``mm`` of
        all clients' rows.

        Writes the (K, D) updates ``G_k = w - w_k`` of the trained flat parameters w_k (in
        ``plan.order``) into ``out`` and returns the (K,) summed batch losses.
        """
        layers = self._layers[s]
        K = len(plan.order)
        shapes = [tuple(lin.weight.shape) for lin in layers]  # (out, in) per layer
        P = self._scratch("weights", (K, w.numel()))  # row k: client k's flat vector
        P.copy_(w.expand_as(P))
        Ws, bs, rW, rb = [], [], [], []
        off = 0
        for o, i in shapes:
            Ws.append(P[:, off:off + o * i].view(K, o, i))
            bs.append(P[:, off + o * i:off + o * i + o])
            if corr is not None:
                rW.append(corr[:, off:off + o * i].view(K, o, i))
                rb.append(corr[:, off + o * i:off + o * i + o])
            off += o * i + o
        dW_buf = self._scratch("weight_grad", (K * max(o * i for o, i in shapes),))
        X = self.train_x[s].reshape(len(self.train_x[s]), -1)
        labels = self.train_y[s][plan.idx].unsqueeze(3)  # (T, K, Bm, 1)
        weights = plan.weight.unsqueeze(3)                # (T, K, Bm, 1)
        neg_weights = weights.neg()
        loss_acc = torch.zeros(K, dtype=torch.float64, device=w.device)
        L = len(layers)
        Bm = plan.idx.shape[2]
        for t, k in enumerate(plan.active):
            acts = [X.index_select(0, plan.idx[t, :k].reshape(-1)).view(k, Bm, X.shape[1])]
            for l in range(L):
                a, W = acts[-1], Ws[l]
                if t == 0:  # every client still holds w: one matmul of all rows
                    z = torch.mm(a.view(k * Bm, -1), W[0].t()).view(k, Bm, -1)
                else:
                    z = torch.bmm(a, W[:k].transpose(1, 2))
                z.add_(bs[l][:k].unsqueeze(1))
                acts.append(torch.relu_(z) if l + 1 < L else z)
            loss, dz = nll_and_grad_(z, labels[t, :k], weights[t, :k], neg_weights[t, :k])
            loss_acc[:k] += loss
            for l in range(L - 1, -1, -1):
                prev, W = acts[l], Ws[l][:k]
                o, i = shapes[l]
                dprev = None
                if l > 0:  # dz_l W_l, before W_l steps
                    dprev = (torch.mm(dz.view(k * Bm, o), W[0]).view(k, Bm, i) if t == 0
                             else torch.bmm(dz, W))
                dW = torch.bmm(dz.transpose(1, 2), prev, out=dW_buf[:k * o * i].view(k, o, i))
                db = dz.sum(1)
                if corr is not None:  # SCAFFOLD: g + c - c_i
                    dW.add_(rW[l][:k])
                    db.add_(rb[l][:k])
                W.sub_(dW.mul_(lr))
                bs[l][:k].sub_(db.mul_(lr))
                if l > 0:
                    dz = torch.ops.aten.threshold_backward(dprev, prev, 0)  # relu'
        torch.sub(w, P, out=out)  # G_k = w - w_k
        return loss_acc.cpu().numpy()

    def _grad_fn(self, s: int):
        """vmap over clients of (grad, value) of the weighted nll of the task's module (for a
        regression task the weighted squared errors, sum_j c_j l_j).

        Arguments per client: parameters, for a model with buffers its buffers (every one,
        updated in place by the forward pass in train mode), x (Bm, ...), y (Bm,), weights c
        (Bm,), and for a masked task (``class_mask`` other than ``"none"``) its held classes
        (K_classes,) bool.
        """
        if s not in self._grad_fns:
            from torch.func import functional_call, grad_and_value, vmap

            model = self.models[s]
            mode = self.class_mask(s)
            regression = self.is_regression(s)

            def objective(out, y, c, m=None):
                if regression:  # c-weighted squared errors (mmfl.tasks.losses)
                    return (squared_errors(out, y) * c).sum()
                logp = out if m is None else training_log_probs(model, out, m.unsqueeze(0),
                                                                mode)
                return -(logp.gather(1, y.unsqueeze(1)).squeeze(1) * c).sum()

            if self.has_buffers(s):  # the client's buffers b, which batch norm updates in place
                def loss(p, b, x, y, c, *m):
                    return objective(functional_call(model, (p, b), (x,)), y, c, *m)
            else:
                def loss(p, x, y, c, *m):
                    return objective(functional_call(model, p, (x,)), y, c, *m)

            self._grad_fns[s] = vmap(grad_and_value(loss))
        return self._grad_fns[s]

    def _train_generic(self, s: int, w: torch.Tensor, plan: BatchPlan, lr: float,
                       corr: torch.Tensor | None, out: torch.Tensor,
                       held: torch.Tensor | None = None,
                       opt: LocalOptimizer | None = None,
                       bufs: dict[str, torch.Tensor] | None = None,
                       lengths: list[int] | None = None) -> np.ndarray:
        """vmap(grad(functional_call)) SGD for any model; same arguments and returns as
        :meth:`_train_linear`, plus ``held``: for a masked task the clients' (K, K_classes)
        bool held classes in ``plan.order`` (None for ``class_mask = "none"``), ``opt``:
        a fresh local optimizer other than plain SGD (:mod:`mmfl.tasks.optimizers`), ``bufs``:
        for a model with buffers the clients' stacked buffers (:meth:`_client_buffers`,
        updated in place), with ``lengths``: the (T,) batch lengths of its steps, the same for
        every client (:func:`equal_size_groups`): each step's padding columns are cut, so that
        batch statistics see real samples only, and a one-sample step is skipped, as the
        sequential loop does."""
        model = self.models[s]
        K = len(plan.order)
        P: dict[str, torch.Tensor] = {}
        R: dict[str, torch.Tensor] = {}
        off = 0
        for name, p in model.named_parameters():
            n = p.numel()
            P[name] = w[off:off + n].view(1, *p.shape).repeat(K, *([1] * p.dim()))
            if corr is not None:
                R[name] = corr[:, off:off + n].reshape(K, *p.shape)
            off += n
        fn = self._grad_fn(s)
        X, Y = self.train_x[s], self.train_y[s]
        shape = tuple(X.shape[1:])
        loss_acc = torch.zeros(K, dtype=torch.float64, device=w.device)
        for t, k in enumerate(plan.active):
            cut = plan.idx.shape[2] if lengths is None else lengths[t]
            if cut < 2 and lengths is not None:  # batch norm cannot train on one sample
                continue
            ib = plan.idx[t, :k, :cut]
            flat = ib.reshape(-1)
            xb = X.index_select(0, flat).view(k, ib.shape[1], *shape)
            yb = Y.index_select(0, flat).view(k, ib.shape[1], *Y.shape[1:])
            c = plan.weight[t, :k, :cut]
            args = (xb, yb, c) if held is None else (xb, yb, c, held[:k])
            if bufs is not None:
                args = ({n: v[:k] for n, v in bufs.items()}, *args)
            g, value = fn({n: v[:k] for n, v in P.items()}, *args)
            if opt is not None:
                opt.tick()
            with torch.no_grad():
                for n, v in P.items():
                    # out of place: torch.func may return one tensor as the gradient of two
                    # parameters (e.g. a sum of two biases), which in-place ops would scale twice
                    gn = g[n] + R[n][:k] if R else g[n]  # SCAFFOLD: g + c - c_i
                    if opt is None:
                        v[:k].sub_(lr * gn)
                    else:
                        opt.step(n, v, gn)
                loss_acc[:k] += value
        with torch.no_grad():
            write_updates(out, w, P.values())
        return loss_acc.cpu().numpy()

    def _client_buffers(self, s: int, client_ids: np.ndarray) -> dict[str, torch.Tensor]:
        """Per buffer name of task s's model, a (K, *shape) stack of the clients' starting
        buffers (:meth:`~mmfl.engines.base.Engine.start_buffers`: b_s, or with
        ``buffers = "local"`` the client's own) on the device; integer buffers (batch norm's
        ``num_batches_tracked``) as the module holds them (they are not carried)."""
        K = len(client_ids)
        start = torch.stack([self.start_buffers(s, i) for i in client_ids.tolist()]) \
            .to(self.device) if K else torch.zeros((0, self.buffers[s].numel()))
        out, off = {}, 0
        for name, b in self.models[s].named_buffers():
            if b.is_floating_point():
                out[name] = start[:, off:off + b.numel()].reshape(K, *b.shape).to(b.dtype,
                                                                                 copy=True)
                off += b.numel()
            else:
                out[name] = b.detach().unsqueeze(0).repeat(K, *([1] * b.dim()))
        return out

    def _buffer_rows(self, s: int, bufs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(K, Db_s) float32: the clients' floating-point buffers of ``bufs`` as rows in the
        flat order of :func:`~mmfl.tasks.buffers.buffers_to_vector`."""
        floats = [bufs[n].reshape(len(bufs[n]), -1).float()
                  for n, b in self.models[s].named_buffers() if b.is_floating_point()]
        return torch.cat(floats, 1)

    # -- the LVR probe -----------------------------------------------------------------------
    @torch.no_grad()
    def probe_losses(self, params, clients, tasks) -> np.ndarray:
        """(U,) mean loss (nll; MSE for regression) of the global model w_s on client i's
        whole local train set, per pair.

        All samples of one task's listed clients go through the (shared) global model in
        batches of ``EVAL_BATCH``; per-client means are segment sums. A client without data for
        the task gets 0. The tasks are probed by :attr:`workers` threads at once, like
        :meth:`evaluate` (each task's numbers do not depend on it).
        """
        clients = np.asarray(clients, dtype=np.int64)
        tasks = np.asarray(tasks, dtype=np.int64)
        out = np.zeros(len(clients))
        for sel, means in self._map_tasks(
                lambda s: self._probe_task(s, params[s], clients, np.flatnonzero(tasks == s)),
                np.unique(tasks).tolist()):
            out[sel] = means
        return out

    @torch.no_grad()
    def _probe_task(self, s: int, flat_params: torch.Tensor, clients: np.ndarray,
                    sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sel, (len(sel),) mean losses) of task s's global model on the local train sets of
        the pairs ``sel`` (positions in ``clients``) of :meth:`probe_losses`."""
        torch.set_num_threads(1)  # a worker thread's own setting
        parts = [self.federation.tasks[s].client_indices[i] for i in clients[sel]]
        lens = np.array([len(p) for p in parts], dtype=np.int64)
        if lens.sum() == 0:
            return sel, np.zeros(len(sel))
        flat = torch.from_numpy(np.concatenate(parts).astype(np.int64, copy=False)
                                ).to(self.device)
        nll = torch.empty(len(flat), dtype=torch.float64, device=self.device)
        regression = self.is_regression(s)
        with self.global_model(s, flat_params) as model:
            for a in range(0, len(flat), EVAL_BATCH):
                b = flat[a:a + EVAL_BATCH]
                nll[a:a + len(b)] = task_loss(model(self.train_x[s][b]), self.train_y[s][b],
                                              regression, "none").double()
        seg = torch.from_numpy(np.repeat(np.arange(len(sel)), lens)).to(self.device)
        sums = torch.zeros(len(sel), dtype=torch.float64,
                           device=self.device).index_add_(0, seg, nll)
        return sel, sums.cpu().numpy() / np.maximum(lens, 1)
