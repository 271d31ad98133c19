"""The engine interface and what every engine shares: models, flat parameters, apply, evaluate.

Parameters of task s live as one flat float32 vector w_s of length D_s (the model's parameters
concatenated in ``module.parameters()`` order). An update is G = w_s - w_{i,s} (docs/algorithms.md
section 2), also a flat (D_s,) vector.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from mmfl import registry
from mmfl.engines.device import resolve_device
from mmfl.errors import ConfigError
from mmfl.rng import INIT, torch_seed
from mmfl.tasks.buffers import buffers_to_vector, vector_to_buffers
from mmfl.tasks.losses import r_squared, task_loss
from mmfl.tasks.models import eval_mode
from mmfl.threads import resolve_threads
from mmfl.types import AggregationPlan

EVAL_BATCH = 4096


@dataclass
class TrainOutput:
    """Result of one round of local training.

    Attributes:
        clients, tasks: (U,) int, the trained (client, task) pairs, sorted by (task, client).
        updates: per task s, a (U_s, D_s) float32 tensor of G for the pairs of task s, in order.
        train_loss: (U,) float, mean training loss over the pair's local steps.
        steps: (U,) int, local SGD steps taken by each pair.
        rejected: (U,) bool, pairs whose update the server's check rejected
            (:mod:`mmfl.experiment.update_check`), or None when none was.
        buffers: per task s with buffers, a (U_s, Db_s) float32 tensor of the buffers each
            pair ended local training with (:mod:`mmfl.tasks.buffers`); None when no task
            has buffers.
    """

    clients: np.ndarray
    tasks: np.ndarray
    updates: dict[int, torch.Tensor]
    train_loss: np.ndarray
    steps: np.ndarray
    rejected: np.ndarray | None = None
    buffers: dict[int, torch.Tensor] | None = None

    def subset(self, keep: np.ndarray) -> "TrainOutput":
        """The pairs where ``keep`` ((U,) bool) is True, in the same order."""
        keep = np.asarray(keep, bool)

        def rows(per_task: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
            out = {}
            for s, g in per_task.items():
                mine = keep[self.tasks == s]
                if mine.any():
                    out[s] = g[torch.from_numpy(np.flatnonzero(mine))]
            return out

        return TrainOutput(self.clients[keep], self.tasks[keep], rows(self.updates),
                           self.train_loss[keep], self.steps[keep],
                           None if self.rejected is None else self.rejected[keep],
                           None if self.buffers is None else rows(self.buffers))

    def accepted(self) -> "TrainOutput":
        """The pairs whose update the server accepted (all but :attr:`rejected`)."""
        return self if self.rejected is None else self.subset(~self.rejected)

    def pair_updates(self, s: int) -> tuple[np.ndarray, torch.Tensor]:
        """(clients (U_s,), updates (U_s, D_s)) of task s."""
        return self.clients[self.tasks == s], self.updates[s]


class Engine:
    """Base engine. Subclasses implement :meth:`train`.

    Constructed as ``cls(federation, seed=..., threads=..., device=...)``. Every torch kernel
    runs on one thread, so results never depend on ``threads``; ``threads`` (an int or "auto",
    :mod:`mmfl.threads`) is the number of worker threads that evaluate the tasks' models in
    parallel (:meth:`evaluate`). ``device`` ("cpu", "cuda", "cuda:N", "auto";
    :mod:`mmfl.engines.device`): the datasets and models move there once, here; parameters
    arrive and updates leave as CPU tensors, as on the CPU.
    """

    #: where the data and models live (set by :meth:`__init__`; the CPU by default)
    device = torch.device("cpu")

    def __init__(self, federation, *, seed: int, threads: int | str = 1,
                 device: str | torch.device = "cpu"):
        torch.set_num_threads(1)
        self.device = resolve_device(device)
        self.workers = resolve_threads(threads)
        self._pool: ThreadPoolExecutor | None = None
        self.federation = federation
        self.seed = seed
        self.models: list[torch.nn.Module] = []
        self.train_x: list[torch.Tensor] = []
        self.train_y: list[torch.Tensor] = []
        self.test_x: list[torch.Tensor] = []
        self.test_y: list[torch.Tensor] = []
        for s, td in enumerate(federation.tasks):
            ds, cfg = td.dataset, td.spec
            self.models.append(self.make_model(s, td))
            self.train_x.append(to_tensor(ds.x_train, np.float32))
            target = np.float32 if self.is_regression(s) else np.int64
            self.train_y.append(to_tensor(ds.y_train, target))
            self.test_x.append(to_tensor(ds.x_test, np.float32))
            self.test_y.append(to_tensor(ds.y_test, target))
        #: (S,) the server's buffer vectors b_s ((Db_s,), empty for a model without buffers)
        #: and, for ``buffers = "local"``, each client's own b_{i,s} (mmfl.tasks.buffers)
        self.buffers = [buffers_to_vector(m) for m in self.models]
        self.local_buffers: list[dict[int, torch.Tensor]] = [{} for _ in self.models]
        if self.device.type != "cpu":  # once: datasets and models to the device
            for data in (self.train_x, self.train_y, self.test_x, self.test_y):
                data[:] = [t.to(self.device) for t in data]
            for m in self.models:
                m.to(self.device)

    @property
    def num_tasks(self) -> int:
        return len(self.models)

    def make_model(self, s: int, td) -> torch.nn.Module:
        """Task s's model, built by :meth:`__init__` from ``td`` (its
        :class:`~mmfl.tasks.spec.TaskData`) with the seeded initialisation. An engine that
        builds its models later overrides this (the Flower ClientApp's engine builds a model
        when a message first needs it)."""
        return _build(s, td.spec, td.dataset, self.seed)

    def is_regression(self, s: int) -> bool:
        """Task s has real-valued targets and trains with ``loss = "mse"``
        (:mod:`mmfl.tasks.losses`); False for class labels."""
        return bool(getattr(self.federation.tasks[s].dataset, "regression", False))

    # -- buffers (mmfl.tasks.buffers) -------------------------------------------------------
    def has_buffers(self, s: int) -> bool:
        return self.buffers[s].numel() > 0

    def start_buffers(self, s: int, client: int) -> torch.Tensor:
        """b_s, or with ``buffers = "local"`` client i's own b_{i,s} once it has one."""
        return self.local_buffers[s].get(int(client), self.buffers[s])

    @contextlib.contextmanager
    def global_model(self, s: int, flat: torch.Tensor):
        """Task s's module holding w_s = ``flat`` and the server's b_s, in eval mode (for
        evaluation and loss probes); back in its mode afterwards."""
        model = self.models[s]
        # a copy on the device (vector_to_parameters makes the parameters views of it)
        vector_to_parameters(flat.detach().to(self.device, copy=True), model.parameters())
        if self.has_buffers(s):
            vector_to_buffers(self.buffers[s], model)
        with eval_mode(model):
            yield model

    def absorb_buffers(self, out: TrainOutput) -> None:
        """After aggregation: the server's b_s from the accepted pairs' final buffers."""
        if out.buffers is None:
            return
        n = self.federation.population.n_samples
        for s, B in out.buffers.items():
            clients = out.clients[out.tasks == s]
            if self.federation.tasks[s].spec.buffers == "local":
                for i, row in zip(clients.tolist(), B):
                    self.local_buffers[s][i] = row.clone()
                clients = np.array(sorted(self.local_buffers[s]), np.int64)
                B = torch.stack([self.local_buffers[s][i] for i in clients.tolist()])
            w = torch.from_numpy(n[clients, s].astype(np.float64))
            if float(w.sum()) > 0:
                self.buffers[s] = ((w / w.sum()) @ B.double()).float()

    def state_dict(self) -> dict[str, np.ndarray]:
        """The buffer state (for checkpoints): b_s and the clients' own b_{i,s}."""
        out = {}
        for s, b in enumerate(self.buffers):
            if b.numel():
                out[f"buffers.{s}"] = b.numpy()
                mine = sorted(self.local_buffers[s])
                out[f"local_clients.{s}"] = np.array(mine, np.int64)
                out[f"local.{s}"] = np.stack([self.local_buffers[s][i].numpy() for i in mine]) \
                    if mine else np.zeros((0, b.numel()), np.float32)
        return out

    def load_state_dict(self, d: dict[str, np.ndarray]) -> None:
        for s, b in enumerate(self.buffers):
            if b.numel():
                self.buffers[s] = torch.from_numpy(np.array(d[f"buffers.{s}"], np.float32))
                rows = np.array(d[f"local.{s}"], np.float32)
                self.local_buffers[s] = {int(i): torch.from_numpy(r) for i, r in
                                         zip(d[f"local_clients.{s}"].tolist(), rows)}

    def init_params(self) -> list[torch.Tensor]:
        """Initial global parameters: per task a (D_s,) float32 vector (a fresh copy on every
        call: engines may train inside the task modules, so they are not read again)."""
        if not hasattr(self, "_init"):
            self._init = [parameters_to_vector(m.parameters()).detach().cpu().clone()
                          for m in self.models]
        return [w.clone() for w in self._init]

    def train(self, params: list[torch.Tensor], clients: np.ndarray, tasks: np.ndarray,
              round: int, corrections: dict[int, torch.Tensor] | None = None) -> TrainOutput:
        """Run local training (E_s epochs of SGD) for every (client, task) pair.

        ``corrections`` (SCAFFOLD's control variates, :mod:`mmfl.core.scaffold`): per task s in
        ``tasks`` a (U_s, D_s) float32 tensor r_k = c_s - c_{i,s} for the pairs of task s in
        their order in ``clients``/``tasks``; every local step of pair k then uses the corrected
        gradient, y <- y - eta_s (g(y) + r_k). None (the default) is plain SGD; all-zero
        corrections give exactly the same result.

        A task whose ``class_mask`` is not ``"none"`` trains on the nll of
        :func:`~mmfl.tasks.masking.training_log_probs` with the client's held classes
        (:meth:`held_classes`); :meth:`evaluate` and :meth:`probe_losses` stay unmasked.
        """
        raise NotImplementedError

    def class_mask(self, s: int) -> str:
        """Task s's ``class_mask`` (``"none"``, ``"zero"`` or ``"exclude"``; see
        :mod:`mmfl.tasks.masking`): how its local training loss treats absent classes."""
        return self.federation.tasks[s].spec.class_mask

    def held_classes(self, s: int) -> torch.Tensor:
        """(N, K) bool: True where client i holds a training sample of class c in task s
        (:func:`~mmfl.tasks.masking.held_class_matrix`). Computed on first use and kept; only
        the engines' masked training (``class_mask`` other than ``"none"``) asks for it."""
        from mmfl.tasks.masking import held_class_matrix

        cache = self.__dict__.setdefault("_held_classes", {})
        if s not in cache:
            td = self.federation.tasks[s]
            cache[s] = torch.from_numpy(held_class_matrix(
                td.client_indices, self.train_y[s].cpu().numpy(),
                self.task_classes(s))).to(self.device)
        return cache[s]

    def task_classes(self, s: int) -> int:
        """K_s, the number of classes of task s (its models' output width)."""
        return int(self.federation.tasks[s].dataset.num_classes)

    def apply(self, params: list[torch.Tensor], out: TrainOutput, plan: AggregationPlan,
              store=None) -> list[torch.Tensor]:
        """w_s <- w_s - eta_g * (sum_k c_k G_k + sum_j e_j h_j) (docs/algorithms.md sections 3, 6, 7).

        ``out`` holds exactly the plan's fresh pairs; ``store`` (a
        :class:`~mmfl.engines.pair_store.PairStore`) provides h for the stale terms. Returns a new
        list; the inputs are not modified.
        """
        new = list(params)
        for s, step in enumerate(self.aggregate(len(params), out, plan, store)):
            if step is not None:
                new[s] = params[s] - plan.server_lr * step
        return new

    def aggregate(self, num_tasks: int, out: TrainOutput, plan: AggregationPlan,
                  store=None) -> list[torch.Tensor | None]:
        """(S,) the aggregated updates A_s = sum_k c_k G_k + sum_j e_j h_j of :meth:`apply`
        ((D_s,) each; None for a model without a term this round), for a server optimizer
        (:mod:`mmfl.experiment.server_optimizer`)."""
        steps: list[torch.Tensor | None] = []
        for s in range(num_tasks):
            step = None
            mine = plan.task == s
            if mine.any():
                sel = out.tasks == s
                if not np.array_equal(plan.client[mine], out.clients[sel]):
                    raise ValueError(f"aggregation plan and trained pairs differ for task {s}")
                coef = torch.from_numpy(plan.coefficient[mine].astype(np.float32))
                step = coef @ out.updates[s]
            stale = plan.stale_task == s
            if stale.any():
                if store is None:
                    raise ValueError("the aggregation plan has stale terms but no store exists")
                coef = torch.from_numpy(plan.stale_coefficient[stale].astype(np.float32))
                h_term = coef @ store.get(s, plan.stale_client[stale])
                step = h_term if step is None else step + h_term
            steps.append(step)
        return steps

    @torch.no_grad()
    def probe_losses(self, params: list[torch.Tensor], clients: np.ndarray,
                     tasks: np.ndarray) -> np.ndarray:
        """(U,) mean training loss f_{i,s}(w_s) of the global model on each pair's local data
        (the LVR score, docs/algorithms.md section 5): one forward pass over the client's samples."""
        out = np.zeros(len(clients))
        for s in np.unique(tasks):
            regression = self.is_regression(s)
            with self.global_model(s, params[s]) as model:
                x, y = self.train_x[s], self.train_y[s]
                for k in np.flatnonzero(tasks == s):
                    idx = torch.from_numpy(self.federation.tasks[s].client_indices[clients[k]]
                                           ).to(self.device)
                    total = 0.0
                    for a in range(0, len(idx), EVAL_BATCH):
                        b = idx[a:a + EVAL_BATCH]
                        total += float(task_loss(model(x[b]), y[b], regression, "sum"))
                    out[k] = total / max(len(idx), 1)
        return out

    def flops_per_sample(self) -> list[float]:
        """(S,) forward FLOPs of each task's model for one sample (for the system cost model).

        Models built from Linear and Conv layers are counted analytically with forward hooks
        (2 multiply-adds per weight use); other models go through PyTorch's FLOP counter, whose
        first use costs about a second of start-up."""
        out = []
        for s, model in enumerate(self.models):
            x = self.test_x[s][:1] if len(self.test_x[s]) else self.train_x[s][:1]
            out.append(float(max(count_flops(model, x), 1)))
        return out

    def num_parameters(self) -> list[int]:
        """(S,) parameter count D_s of each task's model."""
        return [int(sum(p.numel() for p in m.parameters())) for m in self.models]

    def evaluate(self, params: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """Test accuracy and mean loss of every task: two (S,) float arrays. The tasks are
        evaluated by :attr:`workers` threads at once (each task's numbers do not depend on it).
        A regression task reports R^2 as its accuracy and the test MSE as its loss
        (:meth:`_evaluate_regression`)."""
        results = self._map_tasks(lambda s: self._evaluate_task(s, params[s]),
                                  range(self.num_tasks))
        acc = np.array([r[0] for r in results], dtype=np.float64)
        loss = np.array([r[1] for r in results], dtype=np.float64)
        return acc, loss

    @torch.no_grad()
    def _evaluate_task(self, s: int, flat: torch.Tensor) -> tuple[float, float]:
        """(accuracy, mean loss) of task s's model with parameters ``flat`` on its test split."""
        torch.set_num_threads(1)  # a worker thread's own setting
        if self.is_regression(s):
            return self._evaluate_regression(s, flat)
        x, y = self.test_x[s], self.test_y[s]
        correct, total = 0, 0.0
        with self.global_model(s, flat) as model:
            for a in range(0, len(y), EVAL_BATCH):
                logp = model(x[a:a + EVAL_BATCH])
                total += float(F.nll_loss(logp, y[a:a + EVAL_BATCH], reduction="sum"))
                correct += int((logp.argmax(1) == y[a:a + EVAL_BATCH]).sum())
        return correct / max(len(y), 1), total / max(len(y), 1)

    def _evaluate_regression(self, s: int, flat: torch.Tensor) -> tuple[float, float]:
        """(R^2, test MSE) of regression task s: with predictions yhat and targets y (n, k),
        SSE = sum_{j,c} (yhat_{j,c} - y_{j,c})^2 (float64), MSE = SSE / (n k) (the mean of
        the per-sample losses of :func:`~mmfl.tasks.losses.squared_errors`) and
        R^2 = :func:`~mmfl.tasks.losses.r_squared`."""
        x, y = self.test_x[s], self.test_y[s]
        sse = 0.0
        with self.global_model(s, flat) as model:
            for a in range(0, len(y), EVAL_BATCH):
                yb = y[a:a + EVAL_BATCH]
                d = model(x[a:a + EVAL_BATCH]).reshape(yb.shape).double() - yb.double()
                sse += float(d.square().sum())
        return r_squared(sse, y), sse / max(y.numel(), 1)

    def _map_tasks(self, fn, tasks) -> list:
        """``[fn(s) for s in tasks]``, on :attr:`workers` threads when there are several."""
        tasks = list(tasks)
        if self.workers <= 1 or len(tasks) <= 1:
            return [fn(s) for s in tasks]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="mmfl-eval")
        return list(self._pool.map(fn, tasks))

    def close(self) -> None:
        """Stop the evaluation threads (the runner calls this when a run ends)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _build(s: int, cfg, ds, seed: int) -> torch.nn.Module:
    """Build task s's model; a model that cannot exist for this data is a ConfigError."""
    from mmfl.tasks.losses import PROBE_SAMPLES, attach_loss
    from mmfl.tasks.models import build_model

    try:
        model = build_model(cfg.model, dict(cfg.model_options), tuple(ds.input_shape),
                            ds.num_classes, torch_seed(seed, INIT, s))
    except ConfigError as e:
        raise ConfigError(f"tasks[{s}].model", e.constraint, cfg.model) from None
    except (RuntimeError, MemoryError, ValueError) as e:
        raise ConfigError(f"tasks[{s}].model_options", f"the model cannot be built ({e})",
                          dict(cfg.model_options)) from None
    if cfg.init_weights:
        load_initial_weights(model, cfg.init_weights, f"tasks[{s}].init_weights")
    regression = bool(getattr(ds, "regression", False))
    if regression and registry.get("model", cfg.model).builtin:
        raise ConfigError(f"tasks[{s}].model", "mmfl's own models are classifiers (they return "
                          "log-probabilities); a regression task needs a model of your own "
                          "that returns predictions", cfg.model)
    x = to_tensor(ds.x_train[:PROBE_SAMPLES], np.float32)
    return attach_loss(model, cfg.loss, x, ds.num_classes, s, regression)


def load_initial_weights(model: torch.nn.Module, path: str, key: str) -> None:
    """Copy the arrays of ``path`` (.npz or .safetensors, in file order) into the model's
    parameters in their order; ConfigError naming ``key`` when the file cannot be read or its
    arrays do not match the parameters' count and shapes."""
    from pathlib import Path

    p = Path(path).expanduser()
    try:
        if p.suffix == ".safetensors":
            from safetensors.numpy import load_file

            arrays = list(load_file(str(p)).values())
        else:
            with np.load(p, allow_pickle=False) as z:
                arrays = [z[k] for k in z.files]
    except Exception as e:  # any unreadable file: one line naming it
        raise ConfigError(key, f"cannot read {p} ({type(e).__name__}: {e})", path) from None
    params = list(model.parameters())
    shapes = [tuple(a.shape) for a in arrays]
    want = [tuple(q.shape) for q in params]
    if shapes != want:
        raise ConfigError(key, f"{p} holds arrays of shapes {shapes}; the model's parameters "
                          f"are {want}", path)
    with torch.no_grad():
        for q, a in zip(params, arrays):
            q.copy_(torch.from_numpy(np.asarray(a, np.float32)))


_COUNTED = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Forward FLOPs of ``model`` on the batch ``x`` (one sample): analytic for models built
    from Linear and Conv layers, PyTorch's FLOP counter otherwise. The pass runs in eval mode
    (batch norm's statistics are neither needed nor updated)."""
    with eval_mode(model):
        return _count_flops(model, x)


def _count_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    counted = sum(p.numel() for m in model.modules() if isinstance(m, _COUNTED)
                  for p in m.parameters(recurse=False))
    if counted != sum(p.numel() for p in model.parameters()):
        from torch.utils.flop_counter import FlopCounterMode

        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        return int(counter.get_total_flops())

    def flops(mod, output) -> int:
        if isinstance(mod, torch.nn.Linear):
            return 2 * mod.in_features * mod.out_features * (output.numel() // mod.out_features)
        return 2 * mod.weight[0].numel() * output.numel()  # conv: Cin/groups * kernel per output

    return sum_over_forward(model, x, [m for m in model.modules() if isinstance(m, _COUNTED)],
                            flops)


def sum_over_forward(model: torch.nn.Module, x: torch.Tensor, modules, count) -> int:
    """One no-grad forward pass of ``model`` on ``x`` with a hook on each of ``modules``;
    returns the sum of ``count(module, output)`` over the modules' calls."""
    total = 0

    def hook(mod, inputs, output):
        nonlocal total
        total += int(count(mod, output))

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


def to_tensor(a: np.ndarray, dtype) -> torch.Tensor:
    """A torch view of a dataset array (copied only when not contiguous, typed or writable)."""
    return torch.from_numpy(np.require(a, dtype, ["C_CONTIGUOUS", "WRITEABLE"]))


def check_corrections(corrections: dict[int, torch.Tensor] | None, tasks: np.ndarray,
                      dims: list[int]) -> dict[int, torch.Tensor] | None:
    """Validate :meth:`Engine.train`'s ``corrections``: a (U_s, D_s) float32 tensor for every
    task s among ``tasks``. Returns them (contiguous float32), or None."""
    if corrections is None:
        return None
    tasks = np.asarray(tasks, np.int64)
    out = {}
    for s in np.unique(tasks).tolist():
        if s not in corrections:
            raise ValueError(f"corrections: missing task {s}")
        r = corrections[s]
        want = (int((tasks == s).sum()), dims[s])
        if tuple(r.shape) != want:
            raise ValueError(f"corrections[{s}] must have shape {want}, got {tuple(r.shape)}")
        out[s] = r.detach().to(torch.float32).contiguous()
    return out
