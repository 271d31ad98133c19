"""Who trains what in a round, from the sampler's draw to the slots aggregation sees.

* :func:`build_sampler` - the run's sampler (registry kind "sampler") and its aggregator
  (the sampler's default or ``sampler.aggregator``), options resolved under ``variant``.
* :class:`RoundDraw` - round t's assignment: the sampler's draw (``allocate(state,
  rng=stream(seed, "allocate", t))``), or the slots ``sampler.replay_file`` lists for the round
  (:mod:`.replay`); then the declines of soft preferences (:mod:`.preferences`) and the clients
  the incentive auction does not recruit (:mod:`.incentives`), both dropped before training.
* :func:`received` - the slots and updates aggregation sees after training: without the pairs
  that never answered, the stragglers and the updates the server's check rejected.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from mmfl import registry
from mmfl.experiment.config import ExperimentConfig
from mmfl.experiment.incentives import Incentives
from mmfl.experiment.preferences import Preferences
from mmfl.experiment.replay import AllocationReplay, read_replay_file
from mmfl.rng import ALLOCATE, stream
from mmfl.types import Assignment, Population, RoundState

__all__ = ["RoundDraw", "build_sampler", "received"]


def build_sampler(cfg: ExperimentConfig, population: Population):
    """(allocator, aggregator, aggregator name) of ``cfg.sampler``; the aggregator gets the
    sampler options it shares (e.g. StaleVRE's b0), resolved under ``cfg.variant``."""
    entry = registry.get("sampler", cfg.sampler.name, key="sampler.name")
    allocator = entry.obj(dict(cfg.sampler.options), population, cfg.seed)
    name = cfg.sampler.aggregator
    if name == "default":
        name = allocator.default_aggregator
    agg = registry.get("aggregator", name, key="sampler.aggregator")
    shared = {k: v for k, v in cfg.sampler.options.items() if k in agg.options}
    aggregator = agg.obj(registry.resolve_options("sampler", shared, agg.options, cfg.variant),
                         population)
    return allocator, aggregator, name


@dataclass
class RoundDraw:
    """The sampler, the optional replay file, the preferences and the auction of a run."""

    allocator: object
    seed: int
    replay: AllocationReplay | None
    preferences: Preferences
    incentives: Incentives

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, allocator, population: Population,
                    preferences: Preferences) -> "RoundDraw":
        replay = (read_replay_file(cfg.sampler.replay_file, population)
                  if cfg.sampler.replay_file else None)
        # clients.costs: the drawn clients' auction (mmfl's own mechanism, docs/incentives.md)
        return cls(allocator, cfg.seed, replay, preferences,
                   Incentives.from_config(cfg, population))

    def __call__(self, t: int, state: RoundState) -> tuple[Assignment, int, int]:
        """(the slots that train in round t, slots dropped before training (declined or not
        recruited: rounds.csv ``declined``), auction bids (one scalar upload each))."""
        pop = state.population
        asked = self.allocator.allocate(state, stream(self.seed, ALLOCATE, t))
        if self.replay is not None:  # sampler.replay_file: another code's draw
            asked = self.replay(t, asked, pop)
        asked, declined = self.preferences.decline(t, asked, pop)
        asked, unrecruited = self.incentives.recruit(t, asked, pop)
        return asked, declined + unrecruited, self.incentives.last_bidders


def received(asked: Assignment, trained, lost: np.ndarray, late: np.ndarray,
             notes: tuple[str, ...]):
    """The assignment and TrainOutput that aggregation sees: ``asked`` without the pairs that
    never answered (``lost``, (U,) over ``asked.pairs()``: biased unless failures are
    independent of the updates), without the stragglers (``late``, (K,) over ``trained``) and
    the updates the server's check rejected (``trained.rejected``), with the round's notes."""
    clients, tasks = asked.pairs()
    assignment = asked
    notes = list(notes)
    if lost.any():
        notes.append(f"{int(lost.sum())} pairs missing (no reply)")
        assignment = assignment.without_pairs(clients[lost], tasks[lost])
    if notes:
        assignment = dataclasses.replace(
            assignment, note="; ".join(x for x in (assignment.note, *notes) if x))
    if late.any():  # stragglers past the deadline: their updates are lost
        assignment = assignment.without_pairs(trained.clients[late], trained.tasks[late],
                                              note=f"{int(late.sum())} stragglers dropped")
        trained = trained.subset(~late)
    if trained.rejected is not None and trained.rejected.any():  # named in ``notes``
        bad = trained.rejected
        assignment = assignment.without_pairs(trained.clients[bad], trained.tasks[bad])
        trained = trained.accepted()
    return assignment, trained
