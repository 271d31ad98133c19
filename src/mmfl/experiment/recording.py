"""What a run reports: the typed round record, the callback interface, and the recorder that
turns records into the run directory's tables and summary.json.

Callbacks (``mmfl.experiment.run(..., callbacks=[...])``, :class:`Callback`) see every round as a
:class:`RoundRecord`; the :class:`Recorder` that writes metrics.csv, rounds.csv, timing.csv and
summary.json is one of them, driven by the same interface.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from mmfl.core.metrics import RoundCost, fairness_stats, round_cost
from mmfl.experiment.results import SUMMARY, RunWriter, write_json

__all__ = ["FINAL_WINDOW", "TARGETS", "Callback", "Recorder", "RoundRecord", "TaskRound",
           "count_cost", "summarize", "time_to_accuracy"]

#: Number of last evaluated rounds averaged for the papers' headline metric (docs/algorithms.md
#: section 8).
FINAL_WINDOW = 20
#: Accuracy targets of ``summary.json``'s ``time_to_accuracy`` (absolute test accuracy).
TARGETS = (0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class TaskRound:
    """One model's round (a metrics.csv row).

    Attributes:
        task: the task's name.
        accuracy, loss: test accuracy and loss after the round; None when not evaluated.
        clients: updates aggregated (stragglers and missing pairs excluded).
        slots: processor slots assigned to the model.
        local_trainings: local trainings of the model this round (all eligible pairs with a
            full computation).
        local_steps: their local SGD steps.
        train_loss: mean local training loss of the aggregated updates; None if none.
    """

    task: str
    accuracy: float | None
    loss: float | None
    clients: int
    slots: int
    local_trainings: int
    local_steps: int
    train_loss: float | None


@dataclass(frozen=True)
class RoundRecord:
    """What callbacks see after each round (rounds count from 1).

    Attributes:
        round: completed rounds; rounds: total rounds of the run.
        task_names: (S,) names; accuracy, loss: (S,) after the round, None if not evaluated.
        slots: slots aggregated; seconds: wall-clock seconds of the round.
        tasks: (S,) :class:`TaskRound`.
        available: clients online; budget: m; expected_slots: sum of inclusion probabilities
            of the aggregated slots; slots_assigned: slots drawn (before drops), less those
            declined by their clients (``cost.declined``, docs/algorithms.md section 3.3).
        cost: the round's :class:`~mmfl.core.metrics.RoundCost`; local_steps: SGD steps of
            every training of the round; stale_bytes: server memory of per-pair state.
        sim_seconds, sim_time: simulated duration of the round and of the run so far.
        stragglers, missing: pairs dropped past the deadline / never answered.
        note: the assignment's note (drops, budget fallbacks).
        train_seconds, eval_seconds: wall-clock seconds of training and of evaluation.
    """

    round: int
    rounds: int
    task_names: tuple[str, ...]
    accuracy: np.ndarray | None
    loss: np.ndarray | None
    slots: int
    seconds: float
    tasks: tuple[TaskRound, ...] = ()
    available: int = 0
    budget: float = 0.0
    expected_slots: float = 0.0
    slots_assigned: int = 0
    cost: RoundCost = dataclasses.field(default_factory=RoundCost)
    local_steps: int = 0
    stale_bytes: int = 0
    sim_seconds: float = 0.0
    sim_time: float = 0.0
    stragglers: int = 0
    missing: int = 0
    note: str | None = None
    train_seconds: float = 0.0
    eval_seconds: float = 0.0


class Callback(Protocol):
    """Receives a run's progress: ``on_start`` before the first round (``start_round``
    completed rounds, > 0 when resuming), ``on_round`` after every round, ``on_end`` with the
    summary of a completed run."""

    def on_start(self, cfg, federation, start_round: int) -> None: ...
    def on_round(self, record: RoundRecord) -> None: ...
    def on_end(self, summary: dict[str, Any]) -> None: ...


def count_cost(asked, measured, *, late: int, lost: int, control_variates: bool) -> RoundCost:
    """The round's :class:`RoundCost` (docs/algorithms.md section 5): ``asked`` is the
    assignment as drawn, ``measured`` the round's Measurements. Stragglers were asked to train
    and trained, but their uploads never arrived; missing pairs (``lost``, and the full
    computation's ``measured.full_missing``) never answered, so neither their training nor
    their upload is counted, as in metrics.csv's per-model counts; updates the server
    rejected were trained and uploaded. SCAFFOLD uploads G and Delta c (two vectors per
    pair)."""
    probe = measured.probe_set
    cost = round_cost(asked, full_computation=measured.full_pairs, probes=measured.probes,
                      probe_trainings=0 if probe is None else len(probe.clients))
    uploads = cost.model_uploads - late - lost
    return dataclasses.replace(cost, model_uploads=2 * uploads if control_variates else uploads,
                               local_trainings=cost.local_trainings - (
                                   lost if measured.full is None else measured.full_missing))


def task_rounds(names, acc, loss, out, trained, slots) -> tuple[TaskRound, ...]:
    """(S,) :class:`TaskRound` from the aggregated updates ``out`` and every training of the
    round ``trained`` (TrainOutputs), ``slots`` (S,) assigned per model."""
    rows = []
    for s, name in enumerate(names):
        sel, mine = out.tasks == s, trained.tasks == s
        rows.append(TaskRound(
            name, None if acc is None else acc[s], None if loss is None else loss[s],
            int(sel.sum()), int(slots[s]), int(mine.sum()), int(trained.steps[mine].sum()),
            float(out.train_loss[sel].mean()) if sel.any() else None))
    return tuple(rows)


def time_to_accuracy(names, history, history_time) -> dict[str, dict[str, dict | None]]:
    """task -> target -> first evaluated {round, sim_time} with accuracy >= target (None if
    never), for the absolute targets :data:`TARGETS`."""
    out: dict[str, dict[str, dict | None]] = {}
    for s, name in enumerate(names):
        out[name] = {}
        for target in TARGETS:
            hit = next(((r, tm) for (r, a, _), tm in zip(history, history_time)
                        if a[s] >= target), None)
            out[name][f"{target:g}"] = None if hit is None else {"round": hit[0], "sim_time": hit[1]}
    return out


def summarize(cfg, federation, st, *, aggregator: str, stale_bytes: int, status: str,
              seconds: float | None) -> dict[str, Any]:
    """summary.json of a run in state ``st`` (a :class:`~mmfl.experiment.rundir.RunState`)."""
    pop = federation.population
    summary: dict[str, Any] = {
        "name": cfg.name, "status": status, "rounds_completed": st.round,
        "rounds": cfg.rounds, "seed": cfg.seed, "sampler": cfg.sampler.name,
        "aggregator": aggregator, "engine": cfg.engine,
    }
    if not st.history:
        return summary
    last_round, acc, loss = st.history[-1]
    window = np.array([h[1] for h in st.history[-FINAL_WINDOW:]])
    fair = fairness_stats(acc)
    summary.update({
        "evaluated_round": last_round,
        "mean_accuracy": fair["mean"], "min_accuracy": fair["min"],
        "max_min_accuracy": fair["max_min"], "accuracy_variance": fair["variance"],
        "final_window": len(window),
        "mean_accuracy_window": float(window.mean(axis=1).mean()),
        "min_accuracy_window": float(window.mean(axis=0).min()),
        "tasks": {
            name: {"accuracy": float(acc[s]), "loss": float(loss[s]),
                   "accuracy_window": float(window[:, s].mean())}
            for s, name in enumerate(pop.task_names)
        },
        "cost": {**st.cost.as_dict(), "local_steps": st.local_steps,
                 "stale_memory_bytes": stale_bytes},
        "sim_time": st.sim_time,
        "time_to_accuracy": time_to_accuracy(pop.task_names, st.history, st.history_time),
        "budget": federation.budget, "clients": pop.num_clients,
        "processors": pop.num_processors,
    })
    if seconds is not None:
        summary["wall_seconds"] = round(seconds, 3)
    return summary


class Recorder:
    """The callback that writes a run directory's tables (one metrics.csv row per task, one
    rounds.csv and timing.csv row per round, handed to the OS every round) and summary.json
    (after every evaluation while running, and at the end).

    Args:
        out: the run directory.
        running_summary: () -> the summary of the run so far (status "running").
    """

    def __init__(self, out: Path, running_summary: Callable[[], dict[str, Any]]):
        self.out = out
        self.running_summary = running_summary
        self.writer = RunWriter(out)
        #: the tables' snapshot of the checkpoint being resumed (``Checkpointer.load``)
        self.restore: dict | None = None

    def on_start(self, cfg, federation, start_round: int) -> None:
        """Open the tables: afresh, or (resuming after ``start_round`` rounds) as they were at
        the checkpoint (rows after it dropped)."""
        self.writer.open(keep_until_round=start_round or None, restore=self.restore)

    def on_round(self, r: RoundRecord) -> None:
        self.writer.append("metrics.csv", [{"round": r.round, **dataclasses.asdict(x)}
                                           for x in r.tasks])
        fair = fairness_stats(r.accuracy) if r.accuracy is not None else {}
        self.writer.append("rounds.csv", [{
            "round": r.round, "available": r.available, "budget": r.budget,
            "expected_slots": r.expected_slots, "slots": r.slots_assigned,
            **r.cost.as_dict(), "local_steps": r.local_steps, "stale_bytes": r.stale_bytes,
            "sim_seconds": r.sim_seconds, "sim_time": r.sim_time,
            "stragglers": r.stragglers, "missing": r.missing,
            "mean_accuracy": fair.get("mean"), "min_accuracy": fair.get("min"),
            "max_min": fair.get("max_min"), "variance": fair.get("variance"), "note": r.note,
        }])
        self.writer.append("timing.csv", [{
            "round": r.round, "train_seconds": r.train_seconds, "eval_seconds": r.eval_seconds,
            "round_seconds": r.seconds,
        }])
        self.writer.flush()
        if r.accuracy is not None and r.round < r.rounds:
            write_json(self.out / SUMMARY, self.running_summary())

    def on_end(self, summary: dict[str, Any]) -> None:
        self.writer.sync()
        write_json(self.out / SUMMARY, summary)

    def close(self) -> None:
        self.writer.close()
