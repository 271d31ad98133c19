"""Following a deployed run through what its ServerApp writes: the run directory's
``rounds.csv`` and ``summary.json``, ``OUT/flower/rejected.jsonl`` and
``OUT/flower/progress.jsonl``.

The ServerApp runs in a process of Flower's (``flwr-serverapp``); ``mmfl flower-local`` learns
how far it got by reading these files, never by parsing its log. ``progress.jsonl``
(:data:`PROGRESS`) carries the run's callbacks across the process boundary: the ServerApp's
:class:`ProgressWriter` appends one JSON object per event, ``{"event": "nodes", ...}`` while
it waits for the SuperNodes before round 1 (:func:`nodes_message`), ``{"event": "start",
"start_round": k}``, ``{"event": "round", "record": {...}}`` (a
:class:`~mmfl.experiment.recording.RoundRecord`, :func:`record_to_json`) and ``{"event":
"end"}``; :meth:`RunFollower.relay` hands them to flower-local's own callbacks, so its round
lines are those of ``mmfl run``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmfl.core.metrics import RoundCost
from mmfl.experiment.recording import RoundRecord, TaskRound
from mmfl.flower.identity import REJECTED
from mmfl.flower.workdir import append_record, plain

__all__ = ["PROGRESS", "ProgressWriter", "RunFollower", "RunProgress", "nodes_message",
           "record_from_json", "record_to_json"]

log = logging.getLogger(__name__)

#: File name (under ``OUT/flower/``) of the ServerApp's progress events (JSON lines).
PROGRESS = "progress.jsonl"


def nodes_message(event: dict) -> str:
    """The line that says how the wait for the SuperNodes before round 1 goes (a ``nodes``
    event: ``phase`` connect, discover or ready, ``have`` of ``want``, ``seconds`` so far)."""
    have, want, t = event["have"], event["want"], event["seconds"]
    if event["phase"] == "connect":
        return f"waiting for Flower nodes to connect: {have} of {want} ({t:.0f} s)"
    if event["phase"] == "discover":
        return f"waiting for Flower nodes to answer discovery: {have} of {want} ({t:.0f} s)"
    return f"{event.get('nodes', have)} Flower nodes serve {have} of {want} clients ({t:.0f} s)"


def record_to_json(record: RoundRecord) -> dict:
    """A round record as JSON values (numpy arrays as lists, numpy numbers as Python's)."""
    return json.loads(json.dumps(dataclasses.asdict(record), default=plain))


def record_from_json(data: dict) -> RoundRecord:
    """The :class:`~mmfl.experiment.recording.RoundRecord` of :func:`record_to_json` (fields
    this mmfl does not know are dropped)."""
    known = {f.name for f in dataclasses.fields(RoundRecord)}
    d = {k: v for k, v in data.items() if k in known}
    d["task_names"] = tuple(d["task_names"])
    for k in ("accuracy", "loss"):
        if d.get(k) is not None:
            d[k] = np.asarray(d[k], dtype=np.float64)
    d["tasks"] = tuple(TaskRound(**t) for t in d.get("tasks", ()))
    if "cost" in d:
        d["cost"] = RoundCost(**d["cost"])
    return RoundRecord(**d)


class ProgressWriter:
    """Callback of a deployed ServerApp: appends the run's start, every round's record and
    its end to ``path`` (``OUT/flower/progress.jsonl``) for ``mmfl flower-local`` to relay.
    A write that fails (or a value JSON cannot hold) is logged and skipped: the run goes on."""

    def __init__(self, path: str | Path):
        self.path = path

    def write(self, event: dict) -> None:
        try:
            append_record(self.path, event)
        except (OSError, TypeError, ValueError) as e:  # progress only informs: the run goes on
            log.warning("flower: cannot write progress to %s (%s)", self.path, e)

    def on_start(self, cfg, federation, start_round: int) -> None:
        self.write({"event": "start", "start_round": int(start_round)})

    def on_round(self, record: RoundRecord) -> None:
        self.write({"event": "round", "record": record_to_json(record)})

    def on_end(self, summary) -> None:
        self.write({"event": "end"})


@dataclass
class RunProgress:
    """What a progress callback sees: the round rows of ``rounds.csv`` read so far."""

    rounds: int                       # total rounds of the experiment
    done: int                         # rounds completed so far
    row: dict[str, str] = field(default_factory=dict)  # the last rounds.csv row
    seconds: float = 0.0              # since the run was submitted


class RunFollower:
    """Reads the files of run directory ``out`` (and its ``flower`` folder) as the ServerApp
    writes them."""

    def __init__(self, out: Path):
        self.out = out
        self.dir = out / "flower"
        self.rejections_seen = 0  # records of rejected.jsonl already logged
        self.events_seen = 0      # lines of progress.jsonl already relayed

    def rounds_done(self) -> list[dict[str, str]]:
        """Rows of ``OUT/rounds.csv`` written so far (one per completed round)."""
        try:
            with open(self.out / "rounds.csv", newline="", encoding="utf-8") as f:
                return [r for r in csv.DictReader(f) if r.get("round")]
        except OSError:
            return []

    def summary_status(self, since: float) -> str | None:
        """``status`` of ``OUT/summary.json`` if the ServerApp wrote it after time ``since``
        (``running`` between evaluations; ``completed``/``failed`` at the end), else None."""
        path = self.out / "summary.json"
        try:
            if path.stat().st_mtime < since:
                return None
            return str(json.loads(path.read_text(encoding="utf-8")).get("status"))
        except (OSError, ValueError, AttributeError):
            return None

    def summary(self) -> dict:
        """``OUT/summary.json`` (OSError or ValueError when it cannot be read)."""
        return json.loads((self.out / "summary.json").read_text(encoding="utf-8"))

    def skip_rejections(self) -> None:
        """Count the records ``rejected.jsonl`` already holds as seen (earlier attempts' were
        reported then)."""
        with contextlib.suppress(OSError):
            self.rejections_seen = len((self.dir / REJECTED).read_text().splitlines())

    def report_rejections(self) -> None:
        """Log the records the ServerApp appended to ``rejected.jsonl`` since the last look,
        so refused nodes and rejected replies show in this command's output too."""
        try:
            with open(self.dir / REJECTED, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            return
        for line in lines[self.rejections_seen:]:
            with contextlib.suppress(ValueError, AttributeError):
                r = json.loads(line)
                log.warning("Flower: rejected %s from node %s (client %s): %s", r.get("what"),
                            r.get("node"), r.get("client"), r.get("reason"))
        self.rejections_seen = max(self.rejections_seen, len(lines))

    def events(self) -> list[dict]:
        """The events the ServerApp appended to ``progress.jsonl`` since the last call (a line
        being written, not yet complete, waits for the next call)."""
        try:
            with open(self.dir / PROGRESS, encoding="utf-8") as f:
                text = f.read()
        except OSError:
            return []
        lines = text.split("\n")[:-1]  # complete lines only
        new = []
        for line in lines[self.events_seen:]:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    new.append(event)
        self.events_seen = max(self.events_seen, len(lines))
        return new

    def relay(self, callbacks, cfg, federation) -> int:
        """Hand the new events to ``callbacks`` (the
        :class:`~mmfl.experiment.recording.Callback` interface: ``on_start`` with ``cfg`` and
        ``federation``, ``on_round`` with each round's record) and log the wait for nodes;
        returns how many events there were. ``on_end`` is the caller's (it has the summary)."""
        events = self.events()
        for event in events:
            kind = event.get("event")
            if kind == "nodes":
                log.info("ServerApp: %s", nodes_message(event))
            elif kind == "start":
                for cb in callbacks:
                    cb.on_start(cfg, federation, int(event.get("start_round", 0)))
            elif kind == "round":
                record = record_from_json(event["record"])
                for cb in callbacks:
                    cb.on_round(record)
        return len(events)
