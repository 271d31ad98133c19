"""The data that flows through a round: Population, RoundState, Assignment, AggregationPlan.

All are frozen dataclasses of numpy arrays; nothing here imports torch. Notation follows
docs/algorithms.md section 1: ``i`` client (N of them), ``s`` model/task (S), ``b`` processor (P),
``d`` data weight, ``p`` inclusion probability, ``m`` budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property

import numpy as np


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class Population:
    """Who holds what, and how much each client can compute.

    Attributes:
        n_samples: (N, S) int, n_{i,s} training samples of client i for task s (0 = no data).
        capacity: (N,) int >= 1, B_i processors of client i.
        task_names: (S,) task names, in config order.
    """

    n_samples: np.ndarray
    capacity: np.ndarray
    task_names: tuple[str, ...]

    def __post_init__(self) -> None:
        n = np.asarray(self.n_samples, dtype=np.int64)
        c = np.asarray(self.capacity, dtype=np.int64)
        if n.ndim != 2 or c.shape != (n.shape[0],) or len(self.task_names) != n.shape[1]:
            raise ValueError("Population: n_samples (N, S), capacity (N,), task_names (S,)")
        if (n < 0).any() or (c < 1).any():
            raise ValueError("Population: n_samples must be >= 0 and capacity >= 1")
        object.__setattr__(self, "n_samples", _readonly(n))
        object.__setattr__(self, "capacity", _readonly(c))
        object.__setattr__(self, "task_names", tuple(self.task_names))

    @property
    def num_clients(self) -> int:
        """N."""
        return int(self.n_samples.shape[0])

    @property
    def num_tasks(self) -> int:
        """S."""
        return int(self.n_samples.shape[1])

    @property
    def num_processors(self) -> int:
        """P = sum_i B_i."""
        return int(self.capacity.sum())

    @cached_property
    def holds(self) -> np.ndarray:
        """(N, S) bool, n_{i,s} > 0 (the client-model membership matrix)."""
        return _readonly(self.n_samples > 0)

    @cached_property
    def data_weight(self) -> np.ndarray:
        """(N, S) float, d_{i,s} = n_{i,s} / sum_j n_{j,s} (0 for a task nobody holds)."""
        tot = self.n_samples.sum(axis=0, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            d = np.where(tot > 0, self.n_samples / np.where(tot > 0, tot, 1.0), 0.0)
        return _readonly(d)

    @cached_property
    def processor_client(self) -> np.ndarray:
        """(P,) int, the client i(b) that owns processor b (processors of a client are contiguous)."""
        return _readonly(np.repeat(np.arange(self.num_clients), self.capacity))

    @cached_property
    def first_processor(self) -> np.ndarray:
        """(N,) int, index of client i's first processor."""
        return _readonly(np.concatenate([[0], np.cumsum(self.capacity)[:-1]]).astype(np.int64))


class Signal(StrEnum):
    """What a sampler or aggregator asks the runner to gather before a round's allocation
    (``Allocator.requires``; docs/algorithms.md section 5). Members compare equal to their string
    values, so ``"local_loss" in requires`` also holds."""

    #: probe the global model's loss on the pairs of ``Allocator.probe_pairs`` (LVR)
    LOCAL_LOSS = "local_loss"
    #: full computation: every eligible pair trains and reports ||G|| / eta (GVR, StaleVR)
    UPDATES = "updates"
    #: keep a store of each pair's last aggregated update h even if the aggregator needs none
    STALE = "stale"
    #: a random probe set trains before sampling; its updates G~ are kept (StaleVRE, authors)
    PROBE = "probe"
    #: keep SCAFFOLD's control variates c_{i,s}, c_s and correct local training with them
    CONTROL_VARIATES = "control_variates"
    #: full computation (as ``UPDATES``) and the clients' pairwise update distances summed over
    #: the tasks (``group_pipeline``'s gradient grouping)
    UPDATE_DISTANCE = "update_distance"


@dataclass(frozen=True)
class Signals:
    """Per-(client, task) information the server gathers for sampling (docs/algorithms.md sections 5, 6).

    Every field but ``update_distance`` is an (N, S) float array or None when the round's
    sampler did not ask for it; entries that were not measured this round are NaN. Update
    quantities are in gradient units, G / eta_s (docs/algorithms.md section 2).

    Attributes:
        local_loss: f_{i,s}(w_s^t), local training loss of the current global model (LVR).
        update_norm: ||G_{i,s}|| / eta_s from training every pair (GVR, full computation).
        stale_dot: <G_{i,s}, h_{i,s}> / eta_s^2 with the stored stale update h (StaleVR).
        stale_norm_sq: ||h_{i,s}||^2 / eta_s^2 (0 where nothing is stored yet).
        beta: beta_{i,s}, the stale-update coefficient the aggregator will use (section 6).
        probe_norm_sq: ||G~_{i,s}||^2 / eta_s^2 of each pair's latest probe update G~
            (StaleVRE's ``score = "probe"``); 0 where never probed.
        probe_dot: <G~_{i,s}, h_{i,s}> / eta_s^2 (0 where either is missing).
        update_distance: (N, N), not (N, S): D_{ij} = sum_s ||G_{i,s} - G_{j,s}|| / eta_s over
            the tasks that both clients have an update of (``Signal.UPDATE_DISTANCE``).
    """

    local_loss: np.ndarray | None = None
    update_norm: np.ndarray | None = None
    stale_dot: np.ndarray | None = None
    stale_norm_sq: np.ndarray | None = None
    beta: np.ndarray | None = None
    probe_norm_sq: np.ndarray | None = None
    probe_dot: np.ndarray | None = None
    update_distance: np.ndarray | None = None


@dataclass(frozen=True)
class RoundState:
    """What an allocator may look at in round ``round``.

    Attributes:
        round: t, 0-based index of the round being allocated.
        population: the federation.
        budget: m, expected number of (processor, model) updates per round (may be fractional).
        available: (N,) bool, clients online this round (unavailable ones get p = 0).
        task_losses: (S,) float or None, latest global loss f_s of each model (test split).
        task_accuracies: (S,) float or None, latest test accuracy of each model.
        signals: per-(client, task) measurements for score-based samplers (see :class:`Signals`).
        task_active: (S,) bool or None (= all), models being trained this round (models may
            join or leave during training; an inactive model gets no slot).
    """

    round: int
    population: Population
    budget: float
    available: np.ndarray
    task_losses: np.ndarray | None = None
    task_accuracies: np.ndarray | None = None
    signals: Signals = field(default_factory=Signals)
    task_active: np.ndarray | None = None

    @cached_property
    def eligible(self) -> np.ndarray:
        """(N, S) bool: client i is available, holds data for task s, and s is active."""
        e = self.population.holds & np.asarray(self.available, bool)[:, None]
        if self.task_active is not None:
            e = e & np.asarray(self.task_active, bool)[None, :]
        return _readonly(e)


@dataclass(frozen=True)
class Assignment:
    """The outcome of one allocation: which processors train which model.

    One entry per active slot k (K of them):

    Attributes:
        processor: (K,) int, processor b of the slot (-1 for client-level slots, e.g. ``full``).
        client: (K,) int, i(b).
        task: (K,) int, model s trained in the slot.
        probability: (K,) float, inclusion probability p_{s|b} of the slot.
        share: (K,) float, the fraction of d_{i,s} the slot stands for: 1/B_i when each of the
            client's B_i processors is drawn independently (docs/algorithms.md section 3), 1 for
            client-level slots. The unbiased coefficient of the slot is d_{i,s} * share / p.
        probabilities: (P, S) float, the full matrix p_{s|b} the slots were drawn from (for logs
            and variance diagnostics); rows of client-level allocators are per client (N, S).
        expected_slots: sum of ``probabilities`` (m, or less when too few processors are eligible).
        note: free text for the round's record (e.g. why expected_slots < m).
    """

    processor: np.ndarray
    client: np.ndarray
    task: np.ndarray
    probability: np.ndarray
    share: np.ndarray
    probabilities: np.ndarray
    note: str = ""
    expected_slots: float = field(default=float("nan"))

    def __post_init__(self) -> None:
        k = len(self.client)
        arrays = {
            "processor": np.asarray(self.processor, np.int64),
            "client": np.asarray(self.client, np.int64),
            "task": np.asarray(self.task, np.int64),
            "probability": np.asarray(self.probability, np.float64),
            "share": np.asarray(self.share, np.float64),
        }
        for name, a in arrays.items():
            if a.shape != (k,):
                raise ValueError(f"Assignment.{name} must have shape ({k},), got {a.shape}")
            object.__setattr__(self, name, _readonly(a))
        if k and ((self.probability <= 0) | (self.probability > 1 + 1e-12)).any():
            raise ValueError("Assignment.probability must lie in (0, 1] for every active slot")
        object.__setattr__(self, "probabilities", _readonly(np.asarray(self.probabilities, float)))
        if np.isnan(self.expected_slots):
            object.__setattr__(self, "expected_slots", float(self.probabilities.sum()))

    def without_pairs(self, clients: np.ndarray, tasks: np.ndarray, note: str = "") -> "Assignment":
        """The assignment minus every slot of the given (client, task) pairs (e.g. stragglers);
        the remaining slots keep their probabilities."""
        drop = np.zeros(self.num_slots, bool)
        for i, s in zip(np.asarray(clients).tolist(), np.asarray(tasks).tolist()):
            drop |= (self.client == i) & (self.task == s)
        keep = ~drop
        return Assignment(self.processor[keep], self.client[keep], self.task[keep],
                          self.probability[keep], self.share[keep], self.probabilities,
                          "; ".join(x for x in (self.note, note) if x), self.expected_slots)

    @property
    def num_slots(self) -> int:
        """K, the number of active slots."""
        return int(len(self.client))

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Unique active (client, task) pairs, sorted by (task, client): two (U,) int arrays.

        Duplicate slots of a pair train once; its update serves every slot (docs/algorithms.md
        section 1, "Slots and pairs").
        """
        if self.num_slots == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        key = np.unique(self.task * (int(self.client.max()) + 1) + self.client)
        width = int(self.client.max()) + 1
        return key % width, key // width

    def slots_per_task(self, num_tasks: int) -> np.ndarray:
        """(S,) int, active slots per task."""
        return np.bincount(self.task, minlength=num_tasks)


@dataclass(frozen=True)
class AggregationPlan:
    """Per-model coefficients of the server update (docs/algorithms.md sections 3, 6, 7).

    The engine applies, for every task s,

        w_s <- w_s - server_lr * sum_k coefficient[k] * G_{client[k], s}    over k with task[k] = s

    where G is the fresh update of the active pair. One entry per unique active pair (sorted by
    task, then client), coefficients of duplicate slots summed. Stale-update aggregators
    (docs/algorithms.md section 6.1) add
    ``- server_lr * sum_j stale_coefficient[j] * h_{stale_client[j], s}`` over j with
    stale_task[j] = s, h the stored last update (read before this round's updates replace it).

    Attributes:
        client: (U,) int.
        task: (U,) int.
        coefficient: (U,) float.
        server_lr: eta_g.
        stale_client, stale_task, stale_coefficient: (V,) the stale terms (empty by default).
    """

    client: np.ndarray
    task: np.ndarray
    coefficient: np.ndarray
    server_lr: float = 1.0
    stale_client: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    stale_task: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    stale_coefficient: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        for name in ("stale_client", "stale_task", "stale_coefficient"):
            dtype = np.float64 if name == "stale_coefficient" else np.int64
            object.__setattr__(self, name, _readonly(np.asarray(getattr(self, name), dtype)))
        if not (self.stale_client.shape == self.stale_task.shape == self.stale_coefficient.shape):
            raise ValueError("AggregationPlan stale arrays must share one shape (V,)")
        for name in ("client", "task", "coefficient"):
            dtype = np.float64 if name == "coefficient" else np.int64
            object.__setattr__(self, name, _readonly(np.asarray(getattr(self, name), dtype)))
        if not (self.client.shape == self.task.shape == self.coefficient.shape):
            raise ValueError("AggregationPlan arrays must share one shape (U,)")
