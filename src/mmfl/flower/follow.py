"""Following a deployed run through what its ServerApp writes: the run directory's
``rounds.csv`` and ``summary.json``, and ``OUT/flower/rejected.jsonl``.

The ServerApp runs in a process of Flower's (``flwr-serverapp``); ``mmfl flower-local`` learns
how far it got by reading these files, never by parsing its log.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from mmfl.flower.identity import REJECTED

__all__ = ["RunFollower", "RunProgress"]

log = logging.getLogger(__name__)


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
