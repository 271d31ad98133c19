"""Replay a recorded allocation (``sampler.replay_file``): the rounds a file lists train exactly
the (client, model) slots it names instead of the sampler's draw.

For paired comparisons with another code (docs/reproduction.md): with the federation
(``clients.federation_file``) and the initial weights (``tasks[i].init_weights``) shared, the
last source of difference between two runs of the same sampler is its random draw; replaying
the other code's draw of the first rounds removes it, so what remains is the computation.

The file is JSON::

    {"rounds": {"1": [[client, task], ...], "2": [...], ...},   # rounds 1-based, as in metrics.csv
     "source": "free text"}                                      # optional

A client may appear up to B_i times in a round (one slot per processor; the same model twice
is two processors training it, as the independent rule of docs/algorithms.md section 1 can
draw). Rounds not listed use the sampler's own draw.

What stays the sampler's: it still computes its probabilities and draws as usual (so its
random stream, and every later round's, is the unreplayed run's), and each replayed slot keeps
the sampler's inclusion probability p_{s|b} of that slot, so the aggregation coefficient
d_{i,s} * share / p (docs/algorithms.md section 3) is mmfl's. A replayed slot whose probability
is 0 under the sampler is an error (its coefficient would be infinite). Sampler state that
depends on its own draw (``budget = "walk"`` counts the slots it drew) sees the sampler's
draw, not the replayed one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmfl.errors import DataError
from mmfl.types import Assignment, Population

__all__ = ["AllocationReplay", "read_replay_file"]


@dataclass(frozen=True)
class AllocationReplay:
    """``rounds[r]``: (K, 2) int array of the (client, task) slots of round r (1-based)."""

    path: Path
    rounds: dict[int, np.ndarray]

    def __call__(self, t: int, asked: Assignment, population: Population) -> Assignment:
        """The assignment of round ``t`` (0-based): ``asked`` unless the file lists round t + 1.

        Processor-level samplers (P, S) get processor slots: the k-th slot of client i in the
        file takes client i's k-th processor, share 1/B_i, probability p[b, s] of ``asked``'s
        matrix. Client-level samplers ((N, S) rows, processor -1) get client slots, share 1.
        """
        slots = self.rounds.get(t + 1)
        if slots is None:
            return asked
        p = asked.probabilities
        client, task = slots[:, 0], slots[:, 1]
        client_level = (asked.processor < 0).any() if asked.processor.size else (
            p.shape[0] != population.num_processors)
        if client_level:
            processor = np.full(len(slots), -1, np.int64)
            probability = p[client, task]
            share = np.ones(len(slots))
        else:
            first = np.concatenate(([0], np.cumsum(population.capacity)[:-1]))
            order = np.argsort(client, kind="stable")  # k-th slot of its client in the file
            grouped = client[order]
            rank = np.empty(len(slots), np.int64)
            rank[order] = np.arange(len(slots)) - np.searchsorted(grouped, grouped, "left")
            processor = first[client] + rank
            probability = p[processor, task]
            share = 1.0 / population.capacity[client]
        zero = np.flatnonzero(probability <= 0)
        if zero.size:
            i, s = int(client[zero[0]]), int(task[zero[0]])
            raise DataError(f"{self.path}: round {t + 1} replays client {i} on "
                            f"{population.task_names[s]}, which the sampler gives probability "
                            "0 (the client is unavailable, does not hold the task or refuses "
                            "it; its aggregation coefficient would be infinite)")
        note = f"replayed {len(slots)} slots from {self.path.name}"
        return Assignment(processor=processor, client=client, task=task,
                          probability=probability, share=share, probabilities=p,
                          note="; ".join(x for x in (asked.note, note) if x),
                          expected_slots=asked.expected_slots)


def read_replay_file(path: str | Path, population: Population) -> AllocationReplay:
    """Read and check a replay file against the federation; DataError naming the file, the
    round and what is wrong."""
    path = Path(path).expanduser()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise DataError(f"{path}: cannot read the replay file ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("rounds"), dict):
        raise DataError(f"{path}: needs a 'rounds' object mapping round numbers to slot lists")
    rounds: dict[int, np.ndarray] = {}
    n, s_count = population.num_clients, population.num_tasks
    for key, value in raw["rounds"].items():
        try:
            r = int(key)
            slots = np.asarray(value, dtype=np.int64).reshape(-1, 2)
        except (TypeError, ValueError, OverflowError):
            raise DataError(f"{path}: round {key!r} must be a number with a list of "
                            "[client, task] pairs") from None
        if r < 1:
            raise DataError(f"{path}: rounds are numbered from 1, got {r}")
        bad = (slots[:, 0] < 0) | (slots[:, 0] >= n) | (slots[:, 1] < 0) | (slots[:, 1] >= s_count)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise DataError(f"{path}: round {r} slot {slots[k].tolist()} is outside the "
                            f"federation ({n} clients, {s_count} tasks)")
        held = population.holds[slots[:, 0], slots[:, 1]]
        if not held.all():
            i, s = slots[np.flatnonzero(~held)[0]].tolist()
            raise DataError(f"{path}: round {r} replays client {i} on "
                            f"{population.task_names[s]}, which it holds no data for")
        per_client = np.bincount(slots[:, 0], minlength=n)
        over = np.flatnonzero(per_client > population.capacity)
        if over.size:
            i = int(over[0])
            raise DataError(f"{path}: round {r} gives client {i} {per_client[i]} slots, more "
                            f"than its {population.capacity[i]} processors")
        rounds[r] = slots
    return AllocationReplay(path, rounds)
