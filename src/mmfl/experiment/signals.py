"""Gathering what a sampler asks for before allocation (docs/algorithms.md section 5), and the
per-pair server state those measurements read and the aggregation writes.

:class:`PairStores` holds the per-(client, task) vectors the server keeps: stale updates h
(section 6), the latest probe update G~ of StaleVRE's ``score = "probe"``, SCAFFOLD's control
variates. :class:`SignalGatherer` turns the allocator's :class:`~mmfl.types.Signal` requests
into a :class:`~mmfl.types.Signals` (every array (N, S), NaN where not measured) and the
round's :class:`Measurements`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mmfl.engines.pair_store import ControlVariates, PairStore
from mmfl.experiment.results import CONTROLS_FOLDER, PROBE_FOLDER, STALE_FOLDER
from mmfl.rng import PROBE, stream
from mmfl.types import Population, RoundState, Signal, Signals

__all__ = ["Measurements", "PairStores", "SignalGatherer", "answered", "held_classes",
           "offline", "pairs_of", "update_distances", "update_norms"]


@dataclass(frozen=True)
class Measurements:
    """What the server measured before allocating round t.

    Attributes:
        full: TrainOutput of the full computation (every eligible pair trained), or None.
        full_pairs: pairs the full computation asked to train.
        probes: local-loss probes asked for.
        probe_pairs: (clients (U,), tasks (U,)) of the loss probes, or None.
        probe_set: TrainOutput of StaleVRE's random probe set, or None.
        missing: requested measurements that never arrived (offline nodes), and updates of
            the full computation that the server's check rejected (their clients sit the
            round out like those of missing pairs; counted in rounds.csv's ``missing``).
        full_missing: pairs of the full computation among them.
        notes: human-readable notes for rounds.csv.
    """

    full: object | None = None
    full_pairs: int = 0
    probes: int = 0
    probe_pairs: tuple[np.ndarray, np.ndarray] | None = None
    probe_set: object | None = None
    missing: int = 0
    full_missing: int = 0
    notes: tuple[str, ...] = ()


class PairStores:
    """Per-(client, task) vectors of the server, each in RAM or memory-mapped under ``root``:
    ``stale`` (h, when the aggregator aggregates stale updates or the sampler scores them),
    ``probe`` (G~, StaleVRE's probe set) and ``controls`` (SCAFFOLD's c_{i,s} and c_s).
    :meth:`train` is the server's one way to get updates: each passes ``check``
    (:class:`~mmfl.experiment.update_check.UpdateCheck`) first."""

    def __init__(self, population: Population, num_params: list[int], *, needs_stale: bool,
                 requires: frozenset[Signal], dtype: str, root: Path | None,
                 check: Callable | None = None):
        self.check = check or (lambda out, t: out)
        def per_pair(cls, needed: bool, folder: str):
            if not needed:
                return None
            return cls(population.holds, num_params, dtype=dtype,
                       path=None if root is None else root / folder)

        self.stale = per_pair(PairStore, needs_stale or Signal.STALE in requires, STALE_FOLDER)
        self.probe = per_pair(PairStore, Signal.PROBE in requires, PROBE_FOLDER)
        self.controls = per_pair(ControlVariates, Signal.CONTROL_VARIATES in requires,
                                 CONTROLS_FOLDER)

    def stateful(self) -> list[tuple[str, object]]:
        """(checkpoint prefix, store) of the stores in use."""
        named = (("stale", self.stale), ("probe", self.probe), ("controls", self.controls))
        return [(k, v) for k, v in named if v is not None]

    @property
    def nbytes(self) -> int:
        """Server memory of per-pair state (``stale_bytes`` in rounds.csv)."""
        return sum(x.nbytes for _, x in self.stateful())

    def train(self, engine, params, clients: np.ndarray, tasks: np.ndarray, t: int):
        """``engine.train`` of the pairs, with SCAFFOLD's corrections c_s - c_{i,s} when
        control variates are kept, through the update check (rejected pairs are marked in
        the TrainOutput's ``rejected``)."""
        if self.controls is None:
            return self.check(engine.train(params, clients, tasks, t), t)
        return self.check(engine.train(params, clients, tasks, t,
                                       corrections=self.controls.corrections(clients, tasks)), t)

    def absorb(self, out, lr: np.ndarray, data_weight: np.ndarray) -> None:
        """After aggregation: h <- G for the aggregated pairs of ``out``; SCAFFOLD option II,
        c_s += sum_i d_{i,s} Delta c_{i,s}."""
        if self.stale is not None:
            for s in out.updates:
                self.stale.put(s, *out.pair_updates(s))
        if self.controls is not None:
            self.controls.update(out, lr, data_weight)

    def stale_dots(self, out, lr: np.ndarray) -> np.ndarray:
        """(N, S) <G, h> / eta_s^2 for the pairs of ``out`` (NaN elsewhere), h as stored now."""
        dot = np.full(self.stale.stored.shape, np.nan)
        for s in out.updates:
            clients, g = out.pair_updates(s)
            dot[clients, s] = self.stale.dots(s, clients, g) / lr[s] ** 2
        return dot

    def probe_dots(self, lr: np.ndarray, chunk: int = 16) -> np.ndarray:
        """(N, S) <G~, h> / eta_s^2 of every pair with both a probe update and a stored h (0
        elsewhere), a few clients' rows at a time."""
        dot = np.zeros(self.stale.stored.shape)
        for s in range(dot.shape[1]):
            both = np.flatnonzero(self.probe.stored[:, s] & self.stale.stored[:, s])
            for a in range(0, len(both), chunk):
                c = both[a:a + chunk]
                dot[c, s] = self.stale.dots(s, c, self.probe.get(s, c))
            dot[:, s] /= lr[s] ** 2
        return dot


class SignalGatherer:
    """Measures what the allocator requires before a round's allocation, then asks the
    aggregator for beta (section 6)."""

    def __init__(self, engine, allocator, aggregator, stores: PairStores, lr: np.ndarray,
                 seed: int):
        self.engine, self.allocator, self.aggregator = engine, allocator, aggregator
        self.stores, self.lr, self.seed = stores, lr, seed
        if getattr(allocator, "needs_held_classes", False):  # static: handed over once
            allocator.set_held_classes(held_classes(engine.federation))

    def gather(self, t: int, params, state: RoundState) -> tuple[RoundState, Measurements]:
        """``state`` with its signals filled in, and what was measured. Pairs whose node did
        not answer a measurement are marked unavailable for the round."""
        req = self.allocator.requires_at(t)
        shape = state.population.n_samples.shape
        sig: dict[str, np.ndarray] = {}
        got: dict = {"missing": 0, "notes": []}
        if Signal.LOCAL_LOSS in req:
            clients, tasks = pairs_of(self.allocator.probe_pairs(state))
            loss = np.full(shape, np.nan)
            probed = np.asarray(self.engine.probe_losses(params, clients, tasks), np.float64)
            lost = ~np.isfinite(probed)  # a distributed engine's node did not answer
            if lost.any():
                state = offline(state, clients[lost])
                got["missing"] += int(lost.sum())
                got["notes"].append(f"{int(lost.sum())} loss probes missing (clients offline "
                                    "this round)")
            loss[clients[~lost], tasks[~lost]] = probed[~lost]
            sig["local_loss"] = loss
            got["probes"], got["probe_pairs"] = len(clients), (clients, tasks)
        if Signal.UPDATES in req or Signal.UPDATE_DISTANCE in req:
            clients, tasks = pairs_of(state.eligible)
            full = self.stores.train(self.engine, params, clients, tasks, t)
            lost = ~answered(clients, tasks, full, shape[0])
            if lost.any():  # no update from these pairs: their clients sit this round out
                state = offline(state, clients[lost])
                got["missing"] += int(lost.sum())
                got["full_missing"] = int(lost.sum())
                got["notes"].append(f"{int(lost.sum())} pairs missing from the full "
                                    "computation (clients offline this round)")
            if full.rejected is not None:  # so do the clients of rejected updates
                state = offline(state, full.clients[full.rejected])
                got["missing"] += int(full.rejected.sum())
            kept = full.accepted()
            sig["update_norm"] = update_norms(kept, shape, self.lr)
            if Signal.UPDATE_DISTANCE in req:
                sig["update_distance"] = update_distances(kept, shape[0], self.lr)
            if self.stores.stale is not None:
                sig["stale_dot"] = self.stores.stale_dots(kept, self.lr)
            got["full"], got["full_pairs"] = full, len(clients)
        if Signal.PROBE in req:  # a random probe set trains first; its updates G~ are kept
            clients, tasks = self.allocator.probe_set(state, stream(self.seed, PROBE, t))
            probe = self.stores.train(self.engine, params, clients, tasks, t)
            kept = probe.accepted()
            for s in kept.updates:
                self.stores.probe.put(s, *kept.pair_updates(s))
            sig["probe_norm_sq"] = self.stores.probe.norm_sq / self.lr[None, :] ** 2
            sig["probe_dot"] = self.stores.probe_dots(self.lr)
            got["probe_set"] = probe
        if self.stores.stale is not None:
            sig["stale_norm_sq"] = self.stores.stale.norm_sq / self.lr[None, :] ** 2
        state = dataclasses.replace(state, signals=Signals(**sig))
        beta = self.aggregator.beta(state)
        if beta is not None:
            state = dataclasses.replace(state, signals=dataclasses.replace(state.signals, beta=beta))
        got["notes"] = tuple(got["notes"])
        return state, Measurements(**got)

    def after_training(self, state: RoundState, out, measured: Measurements) -> RoundState:
        """``state`` with ``stale_dot`` <G, h_old> of the trained pairs of ``out`` when the
        round had no full computation (the stale aggregators need it)."""
        if self.stores.stale is None or measured.full is not None:
            return state
        post = dataclasses.replace(state.signals, stale_dot=self.stores.stale_dots(out, self.lr))
        return dataclasses.replace(state, signals=post)

    def observed(self, state: RoundState, out) -> RoundState:
        """``state`` with ``signals.update_norm`` (||G|| / eta_s) of the trained pairs of
        ``out`` added where the round had no full computation and the sampler's ``observe``
        needs it (``Allocator.observes_update_norm``); otherwise ``state`` itself."""
        if state.signals.update_norm is not None or not self.allocator.observes_update_norm:
            return state
        norm = update_norms(out, state.population.n_samples.shape, self.lr)
        return dataclasses.replace(state, signals=dataclasses.replace(state.signals,
                                                                      update_norm=norm))


def answered(clients: np.ndarray, tasks: np.ndarray, out, width: int) -> np.ndarray:
    """(U,) bool: which requested (client, task) pairs have an update in ``out`` (a
    TrainOutput); all of them for a local engine."""
    if len(out.clients) == len(clients):
        return np.ones(len(clients), dtype=bool)
    return np.isin(np.asarray(tasks) * width + np.asarray(clients),
                   out.tasks * width + out.clients)


def offline(state: RoundState, clients: np.ndarray) -> RoundState:
    """``state`` with ``clients`` marked unavailable (their node did not answer a
    measurement this round, so the sampler must not choose them)."""
    available = np.array(state.available, dtype=bool)
    available[np.asarray(clients, np.int64)] = False
    return dataclasses.replace(state, available=available)


def update_norms(out, shape: tuple[int, int], lr: np.ndarray) -> np.ndarray:
    """(N, S) ||G_{i,s}|| / eta_s for the pairs of the TrainOutput ``out`` (NaN elsewhere)."""
    norm = np.full(shape, np.nan)
    for s, g in out.updates.items():
        g_norm = torch.linalg.vector_norm(g, dim=1, dtype=torch.float64)  # no float64 copy
        norm[out.clients[out.tasks == s], s] = g_norm.numpy() / lr[s]
    return norm


def update_distances(out, n: int, lr: np.ndarray, chunk: int = 16) -> np.ndarray:
    """(N, N) D_{ij} = sum_s ||G_{i,s} - G_{j,s}|| / eta_s over the tasks s of which both i and
    j have an update in the TrainOutput ``out`` (0 elsewhere, 0 on the diagonal).

    Computed in float64 on blocks of ``chunk`` clients (no float64 copy of a task's whole
    update matrix): O(U_s^2 P_s) per task, U_s its clients and P_s its parameters."""
    dist = np.zeros((n, n))
    for s, g in out.updates.items():
        clients = out.clients[out.tasks == s]
        block = np.zeros((len(clients), len(clients)))
        for a in range(0, len(clients), chunk):
            xa = g[a:a + chunk].to(torch.float64)
            for b in range(a, len(clients), chunk):
                d = torch.cdist(xa, g[b:b + chunk].to(torch.float64)).numpy()
                block[a:a + chunk, b:b + chunk] = d
                block[b:b + chunk, a:a + chunk] = d.T
        dist[np.ix_(clients, clients)] += block / lr[s]
    np.fill_diagonal(dist, 0.0)
    return dist


def held_classes(federation) -> list[np.ndarray]:
    """Per task s an (N, K_s) bool: client i holds a training sample of class c (the class
    sets a label-grouping sampler reads, ``Allocator.needs_held_classes``)."""
    from mmfl.tasks.masking import held_class_matrix

    n = federation.population.num_clients
    out = []
    for td in federation.tasks:
        held = held_class_matrix(td.client_indices, td.dataset.y_train, td.dataset.num_classes)
        full = np.zeros((n, held.shape[1]), bool)
        full[:held.shape[0]] = held
        out.append(full)
    return out


def pairs_of(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(clients, tasks) of the True entries of an (N, S) mask, sorted by (task, client)."""
    tasks, clients = np.nonzero(np.asarray(mask).T)
    return clients.astype(np.int64), tasks.astype(np.int64)
