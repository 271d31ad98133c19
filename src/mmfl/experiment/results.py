"""The run directory: what a run writes and how to read it back.

Layout (the first three are contracts, see DESIGN.md):

- ``config.toml``: the resolved, validated config of the run.
- ``metrics.csv``: one row per round and task: ``round,task,accuracy,loss,...`` (accuracy and loss
  are empty in rounds that were not evaluated, see ``eval_every``). Deterministic: the same config
  and seed give a byte-identical file.
- ``summary.json``: final (or, while running, latest) ``mean_accuracy``, ``min_accuracy``,
  fairness statistics, cost totals, and ``tasks`` (name -> ``accuracy``, ``loss``, ...).
- ``rounds.csv``: one row per round: availability, budget, slots, cost counters, fairness stats.
- ``federation.json``: the population (processors, samples per client and task, budget).
- ``timing.csv``: wall-clock seconds per round (the only non-deterministic file).
- ``checkpoint.safetensors``: the latest resumable state (see :mod:`mmfl.experiment.checkpoint`).
- ``checkpoint-rows/``: the checkpoint's rows of the per-pair stores (stale updates, control
  variates), one file per checkpoint with the rows changed since the previous one.

Rows are appended and handed to the OS each round, so a killed run loses at most the round in
progress; see :class:`RunWriter` for what survives a system crash.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from mmfl.errors import ResultsError

log = logging.getLogger(__name__)

#: a sweep folder's index of its runs (mmfl.experiment.sweep writes it)
INDEX = "index.json"
#: the files of a run directory (the layout above)
CONFIG = "config.toml"
FEDERATION = "federation.json"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.safetensors"
#: the checkpoint's row files of the per-pair stores (:class:`mmfl.experiment.checkpoint.RowLog`)
CHECKPOINT_ROWS = "checkpoint-rows"
#: folders of the server's per-pair state (stale updates h, StaleVRE's probe updates,
#: SCAFFOLD's control variates) when it is kept on disk (``stale_on_disk``)
STALE_FOLDER, PROBE_FOLDER, CONTROLS_FOLDER = "stale", "probe", "controls"
#: how to recover from a damaged run directory (said by every such error)
RECOVER = ("start the run afresh in another --out (or delete this folder's checkpoint and "
           "tables to restart it here)")

METRICS_COLUMNS = (
    "round", "task", "accuracy", "loss", "clients", "slots", "local_trainings", "local_steps",
    "train_loss",
)
ROUNDS_COLUMNS = (
    "round", "available", "budget", "expected_slots", "slots", "local_trainings", "local_steps",
    "forward_passes", "scalar_uploads", "model_uploads", "stale_bytes", "sim_seconds", "sim_time",
    "stragglers", "missing", "mean_accuracy", "min_accuracy",
    "max_min", "variance", "note", "declined",
)
TIMING_COLUMNS = ("round", "train_seconds", "eval_seconds", "round_seconds")
TABLES = {"metrics.csv": METRICS_COLUMNS, "rounds.csv": ROUNDS_COLUMNS, "timing.csv": TIMING_COLUMNS}
#: every name a run writes into its directory, files and folders (what
#: :func:`mmfl.experiment.runlock.check_ownership` refuses to overwrite in a user's folder)
RUN_FILES = (CONFIG, FEDERATION, *TABLES, SUMMARY, CHECKPOINT, CHECKPOINT_ROWS, STALE_FOLDER,
             PROBE_FOLDER, CONTROLS_FOLDER)


def fmt(x: Any) -> str:
    """Deterministic CSV text of a value: floats with 6 decimals, None/NaN as empty."""
    if x is None:
        return ""
    if isinstance(x, (float, np.floating)):
        return "" if np.isnan(x) else f"{float(x):.6f}"
    if isinstance(x, (np.integer,)):
        return str(int(x))
    return str(x)


def write_json(path: Path, obj: Any) -> None:
    """Atomically replace ``path`` with ``obj`` as indented JSON; NaN and infinite numbers
    become null, so the file is always valid JSON."""
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(_json_safe(obj), indent=2, sort_keys=False, allow_nan=False)
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _json_safe(x: Any) -> Any:
    """``x`` with every non-finite float (also numpy's) replaced by None."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


class RunWriter:
    """Appends rows to the CSV tables of a run directory.

    Durability (the crash guarantee of :mod:`mmfl.experiment.rundir`): :meth:`flush` hands the
    rows to the operating system every round (no fsync), which a killed process cannot lose.
    The bytes written since the tables were last fsynced travel in every checkpoint
    (:meth:`snapshot`), so a checkpoint restores its tables exactly even after a system crash
    lost unsynced rows; the tables themselves are fsynced only when that tail exceeds
    :attr:`SYNC_BYTES`, and at the end of the run (:meth:`sync`).
    """

    #: bytes of unsynced rows (all tables) after which :meth:`flush` fsyncs the tables
    SYNC_BYTES = 1 << 16

    def __init__(self, out: Path):
        self.out = out
        self._files: dict[str, io.TextIOBase] = {}
        self._cols: dict[str, tuple[str, ...]] = {}
        self._durable: dict[str, int] = {}    # bytes known to be on disk
        self._hash: dict[str, Any] = {}        # sha256 of those bytes
        self._tail: dict[str, list[str]] = {}  # text written after them
        self._pending = 0                       # characters in the tails

    def open(self, *, keep_until_round: int | None, restore: dict | None = None) -> None:
        """Open the tables for appending. ``keep_until_round`` (resume): drop rows after it,
        and any torn last line; with ``restore`` (a checkpoint's :meth:`snapshot`) the tables
        become exactly what they were at that checkpoint. ``None``: start the tables afresh.
        A resumed table must then hold exactly the rounds 1..keep_until_round (ResultsError
        naming the damage otherwise)."""
        for name, cols in TABLES.items():
            path = self.out / name
            if keep_until_round is None or not path.exists():
                path.write_text(",".join(cols) + "\n", encoding="utf-8")
            elif restore is not None and name in restore:
                _restore_table(path, **restore[name])
            else:
                truncate_rows(path, keep_until_round)
            if keep_until_round is not None:
                check_rounds(path, keep_until_round, per_round=name != "metrics.csv")
            self._hash[name] = hashlib.sha256(path.read_bytes())
            # a run written by an older mmfl keeps its own columns when it is resumed
            with open(path, encoding="utf-8", newline="") as f:
                cols = tuple(next(csv.reader(f), cols))
            self._cols[name] = cols
            self._files[name] = open(path, "a", encoding="utf-8", newline="")
        self.sync()

    def append(self, name: str, rows: list[dict[str, Any]]) -> None:
        cols = self._cols.get(name, TABLES[name])
        text = "".join(",".join(_csv_cell(fmt(row.get(c))) for c in cols) + "\n" for row in rows)
        self._files[name].write(text)
        self._tail[name].append(text)
        self._pending += len(text)

    def flush(self) -> None:
        """Hand the rows to the OS; fsync the tables once their unsynced tail is large."""
        for f in self._files.values():
            f.flush()
        if self._pending > self.SYNC_BYTES:
            self.sync()

    def sync(self) -> None:
        """fsync every table; they are then durable without the checkpoint's copy."""
        for name, f in self._files.items():
            f.flush()
            os.fsync(f.fileno())
            self._durable[name] = os.fstat(f.fileno()).st_size
            for text in self._tail.get(name, ()):
                self._hash[name].update(text.encode("utf-8"))
            self._tail[name] = []
        self._pending = 0

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """table -> {"durable": bytes fsynced, "sha256": their hash, "tail": text written
        after them} (JSON-able)."""
        return {name: {"durable": self._durable[name], "sha256": self._hash[name].hexdigest(),
                       "tail": "".join(self._tail[name])} for name in self._files}

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _restore_table(path: Path, durable: int, tail: str, sha256: str | None = None) -> None:
    """Make ``path`` its first ``durable`` bytes followed by ``tail`` (a checkpoint's copy),
    after checking those bytes against the checkpoint's ``sha256`` of them (older checkpoints
    have none)."""
    size = path.stat().st_size
    if size < durable:
        raise ResultsError(f"{path}: {size} bytes, shorter than the {durable} the checkpoint "
                           f"found on disk; the table is damaged: {RECOVER}")
    if sha256 is not None:
        with open(path, "rb") as f:
            if hashlib.sha256(f.read(durable)).hexdigest() != sha256:
                raise ResultsError(f"{path}: its rows differ from those the checkpoint "
                                   f"recorded (edited or damaged); {RECOVER}")
    with open(path, "r+b") as f:
        data = tail.encode("utf-8")
        f.seek(durable)
        if f.read(len(data)) != data:  # later rows (a round in progress) are expected
            log.warning("%s: the rows after byte %d differ from the checkpoint's copy "
                        "(damaged, or lost in a system crash); restored from it", path, durable)
        f.truncate(durable)
        f.seek(durable)
        f.write(data)


def _csv_cell(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def truncate_rows(path: Path, last_round: int) -> None:
    """Keep the header and the complete rows with ``round <= last_round`` (atomic rewrite)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ResultsError(f"{path}: not text (damaged or not written by mmfl); "
                           f"{RECOVER}") from None
    lines = text.split("\n")
    complete = lines[:-1]  # the part after the last newline is a torn row (or empty)
    if not complete:
        raise ResultsError(f"{path}: no header; the run directory is damaged")
    kept = [complete[0]]
    for line in complete[1:]:
        head = line.split(",", 1)[0]
        if head.isdigit() and int(head) <= last_round:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(kept) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def check_rounds(path: Path, last_round: int, *, per_round: bool) -> None:
    """ResultsError unless the rows of ``path`` cover rounds 1..``last_round`` in order: one
    row each (``per_round``) or any number per round (metrics.csv, one per task)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rounds = [int(row[0]) for row in list(csv.reader(f))[1:]]
    except (ValueError, IndexError, UnicodeDecodeError, csv.Error):
        raise ResultsError(f"{path}: unreadable rows (not written by mmfl); {RECOVER}") from None
    want = list(range(1, last_round + 1))
    ok = (rounds == want if per_round
          else sorted(set(rounds)) == want and rounds == sorted(rounds))
    if not ok:
        last = rounds[-1] if rounds else 0
        raise ResultsError(f"{path}: holds rounds up to {last} with gaps or repeats, where the "
                           f"checkpoint is at round {last_round}; {RECOVER}")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@dataclass(repr=False)
class RunResults:
    """A finished (or partial) run read back from its directory.

    Attributes:
        path: the run directory.
        config: the resolved config (nested dict from config.toml).
        summary: summary.json.
        metrics: rows of metrics.csv (strings, as written).
        rounds: rows of rounds.csv.
    """

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    metrics: list[dict[str, str]]
    rounds: list[dict[str, str]]

    @property
    def task_names(self) -> list[str]:
        return list(self.summary.get("tasks", {}))

    def __repr__(self) -> str:
        s = self.summary
        tasks = self.task_names or [t.get("name", "?") for t in self.config.get("tasks", [])
                                    if isinstance(t, dict)]
        return (f"RunResults({str(self.path)!r}, tasks=[{', '.join(map(str, tasks))}], "
                f"rounds={s.get('rounds_completed', '?')}/{s.get('rounds', '?')}, "
                f"status={s.get('status', '?')})")

    def to_frame(self, table: str = "metrics"):
        """``table`` as a pandas DataFrame: ``"metrics"`` (one row per round and task),
        ``"rounds"`` (one row per round) or ``"summary"`` (one row, summary.json flattened
        with dotted names). Numeric columns are numbers, empty cells NaN; see
        :mod:`mmfl.experiment.frames`. Needs pandas (``pip install 'mmfl[analysis]'``)."""
        from mmfl.experiment.frames import run_frame

        return run_frame(self, table)

    def accuracy(self, task: str) -> tuple[np.ndarray, np.ndarray]:
        """(rounds (R,), accuracy (R,)) of ``task`` over the evaluated rounds."""
        rows = [r for r in self.metrics if r["task"] == task and r["accuracy"] != ""]
        return (np.array([int(r["round"]) for r in rows]),
                np.array([float(r["accuracy"]) for r in rows]))


def read_results(path: str | Path) -> RunResults:
    """Read a run directory written by :func:`mmfl.run`."""
    from mmfl.experiment import tomlio

    p = Path(path)
    for f in ("config.toml", "metrics.csv", "summary.json"):
        if not (p / f).exists():
            raise ResultsError(f"{p}: not a run directory (missing {f})")
    try:
        summary = json.loads((p / "summary.json").read_text(encoding="utf-8"))
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError included
        summary = None
    if not isinstance(summary, dict):
        raise ResultsError(f"{p / 'summary.json'}: not a JSON object (damaged or not written "
                           "by mmfl)")
    return RunResults(
        path=p,
        config=tomlio.load(p / "config.toml"),
        summary=summary,
        metrics=read_csv(p / "metrics.csv"),
        rounds=read_csv(p / "rounds.csv") if (p / "rounds.csv").exists() else [],
    )


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories among ``paths``: each path that holds ``summary.json`` itself, else every
    folder below it that does (sorted). Raises ResultsError for a missing path or when none is
    found."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ResultsError(f"{p}: no such run directory or folder")
        if (p / "summary.json").is_file():
            found.append(p)
            continue
        below = sorted(s.parent for s in p.rglob("summary.json") if s.is_file())
        if not below:
            raise ResultsError(f"{p}: holds no run directory (no summary.json found below it)")
        found.extend(below)
    return list(dict.fromkeys(found))
