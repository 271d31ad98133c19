"""The run directory: its checks before anything is written, the config fingerprint, and the
checkpoint (:class:`RunState` plus every stateful object of the run).

Crash guarantee: a round's rows are handed to the operating system before its checkpoint is
written; a checkpoint replaces the previous one atomically (a temporary file renamed over it)
and carries the tables' bytes written since they were last fsynced, so ``--resume`` restores
the tables exactly as they were at the checkpoint and continues bit-exactly from it.

* kill -9, an out-of-memory kill or Ctrl-C at any point: nothing is lost beyond the round in
  progress (one atomic write per checkpoint, no fsync needed).
* a system crash or power loss: the checkpoint is fsynced when it is written at least
  :data:`DURABLE_SECONDS` after the last fsynced one, and at the end of the run, so resuming
  loses at most that many seconds of rounds (on file systems that order a rename after the
  data it installs, as ext4 does by default; elsewhere the newest checkpoint may be unreadable
  and the run must restart). The tables are fsynced once per 64 KB of rows.

Durability therefore costs one atomic write per checkpoint (``checkpoint_every``) and an fsync
every :data:`DURABLE_SECONDS`, not five fsyncs per round. Runs that keep per-pair stores (stale
updates, SCAFFOLD) add one row file per checkpoint with the rows changed since the previous one,
fsynced before the checkpoint that refers to it (:class:`~mmfl.experiment.checkpoint.RowLog`),
so the guarantees above hold for the stores too.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mmfl.core.metrics import RoundCost
from mmfl.errors import ResultsError
from mmfl.experiment import checkpoint, tomlio
from mmfl.experiment.config import ExperimentConfig
from mmfl.experiment.federation import Federation
from mmfl.experiment.results import CHECKPOINT, CHECKPOINT_ROWS, RECOVER
from mmfl.experiment.runlock import check_ownership

__all__ = ["CHECKPOINT", "Checkpointer", "RunState", "check_out_dir", "config_fingerprint",
           "federation_info", "writing"]

#: a checkpoint written this many seconds after the last fsynced one is fsynced
DURABLE_SECONDS = 30.0
#: top-level keys that may change when a run is resumed: ``rounds``, ``threads`` (an
#: execution setting: results do not depend on it, :mod:`mmfl.threads`) and ``[logging]``
RESUMABLE_KEYS = ("rounds", "threads", "logging")


@dataclass
class RunState:
    """The runner's own state between rounds (a checkpoint holds it, and the state of the
    allocator, aggregator and per-pair stores).

    Attributes:
        round: completed rounds.
        params: S flat parameter tensors, the global models w_s.
        task_losses, task_accuracies: (S,) of the latest evaluation, None before the first.
        cost: cumulative :class:`~mmfl.core.metrics.RoundCost`.
        local_steps: cumulative local SGD steps.
        history: (round, accuracy (S,), loss (S,)) of every evaluation.
        sim_time: simulated seconds so far (:mod:`mmfl.core.clock`).
        history_time: sim_time at each evaluation of ``history``.
    """

    round: int = 0
    params: list = field(default_factory=list)
    task_losses: np.ndarray | None = None
    task_accuracies: np.ndarray | None = None
    cost: RoundCost = field(default_factory=RoundCost)
    local_steps: int = 0
    history: list[tuple[int, np.ndarray, np.ndarray]] = field(default_factory=list)
    sim_time: float = 0.0
    history_time: list[float] = field(default_factory=list)

    def evaluated(self, round_: int, accuracy: np.ndarray, loss: np.ndarray) -> None:
        """Record an evaluation of the global models after ``round_`` completed rounds."""
        self.task_accuracies, self.task_losses = accuracy, loss
        self.history.append((round_, accuracy, loss))
        self.history_time.append(self.sim_time)

    def evaluated_after(self, round_: int) -> bool:
        """Whether the latest evaluation is of the models after ``round_`` completed rounds."""
        return bool(self.history) and self.history[-1][0] == round_


def config_fingerprint(cfg: ExperimentConfig, data_dir: Path | None, *,
                       threads: int | None = None) -> str:
    """Hash of everything that determines a run's rounds except :data:`RESUMABLE_KEYS` (and
    with the data folder): a checkpoint only resumes under the same fingerprint. ``threads``:
    keep that value in place of the config's (the fingerprint of older checkpoints)."""
    d = cfg.to_dict()
    d.pop("rounds")
    d.pop("logging", None)
    if threads is None:
        d.pop("threads")
    else:
        d["threads"] = threads  # in its place, as the older mmfl wrote it
    text = tomlio.dumps(d) + f"\ndata_dir={data_dir}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def legacy_fingerprints(cfg: ExperimentConfig, data_dir: Path | None, out: Path) -> list[str]:
    """Fingerprints of checkpoints written before ``threads`` left the fingerprint: the same
    hash with the ``threads`` value of the run's config.toml (none if it has none)."""
    try:
        old = tomlio.load(out / "config.toml").get("threads")
    except Exception:  # no readable config.toml: nothing to accept
        return []
    if not isinstance(old, int):
        return []
    return [config_fingerprint(cfg, data_dir, threads=old)]


def check_out_dir(cfg: ExperimentConfig, out: Path, *, resume: bool) -> bool:
    """Check the run directory before anything is written; True when a checkpoint will be
    resumed. Raises ResultsError for a run that exists without ``resume``, a different config,
    an ``--out`` that is not a folder or cannot be used, or a folder holding files mmfl did
    not write (:func:`~mmfl.experiment.runlock.check_ownership`)."""
    try:
        return _check_out_dir(cfg, out, resume)
    except OSError as e:  # e.g. a name too long for the file system
        raise ResultsError(f"{out}: unusable --out ({e.strerror or e})") from None


def _check_out_dir(cfg: ExperimentConfig, out: Path, resume: bool) -> bool:
    if out.exists() and not out.is_dir():
        raise ResultsError(f"{out}: --out exists and is not a folder")
    check_ownership(out)
    has_run = (out / "metrics.csv").exists()
    if has_run and not resume:
        raise ResultsError(
            f"{out} already holds a run; pass --resume to continue it or choose another --out"
        )
    if not (resume and has_run):
        return False
    old = tomlio.load(out / "config.toml") if (out / "config.toml").exists() else {}
    new = cfg.to_dict()
    diff = sorted(k for k in set(old) | set(new)
                  if k not in RESUMABLE_KEYS and old.get(k) != new.get(k))
    if diff:
        raise ResultsError(
            f"{out}: the config differs from the run's config.toml (in: {', '.join(diff)}); "
            "resume with the same config (only rounds and threads may change)"
        )
    old_rounds = old.get("rounds", cfg.rounds)
    if old_rounds != cfg.rounds and old_rounds % cfg.eval_every:
        raise ResultsError(
            f"{out}: the run ended at round {old_rounds}, which is not a multiple of eval_every "
            f"= {cfg.eval_every}; its forced final evaluation would make an extended run differ "
            "from a fresh one"
        )
    if old_rounds != cfg.rounds and cfg.eval_last:
        raise ResultsError(
            f"{out}: eval_last = {cfg.eval_last} evaluates the last rounds of the run, which "
            f"moved from round {old_rounds} to {cfg.rounds}; an extended run would differ from "
            "a fresh one (start a new run)"
        )
    return (out / CHECKPOINT).exists()


@contextlib.contextmanager
def writing(out: Path) -> Iterator[None]:
    """Turn a failed write into a one-line ResultsError naming the path."""
    try:
        yield
    except OSError as e:
        where = e.filename or out
        raise ResultsError(f"{where}: cannot write results ({e.strerror or e})") from None


def federation_info(fed: Federation) -> dict[str, Any]:
    """JSON-able description of the federation (also printed by ``mmfl describe``)."""
    pop = fed.population
    return {
        "clients": pop.num_clients, "processors": pop.num_processors, "budget": fed.budget,
        "tasks": list(pop.task_names),
        "capacity": pop.capacity.tolist(),
        "n_samples": pop.n_samples.tolist(),
    }


class Checkpointer:
    """Saves and restores a run: :class:`RunState` and the ``state_dict`` of every
    ``(prefix, object)`` in ``stateful`` (allocator, aggregator, per-pair stores), under the
    config fingerprint.

    The rows of the per-pair stores (objects with a ``pair_store``) are written incrementally
    by a :class:`~mmfl.experiment.checkpoint.RowLog` into ``checkpoint-rows/``: a checkpoint
    costs the rows changed since the previous one (plus the still-current rows of compacted
    files), not the whole store; its manifest travels in ``checkpoint.safetensors``.
    Checkpoints of older versions (rows inside ``checkpoint.safetensors``) still resume."""

    def __init__(self, out: Path, fingerprint: str, stateful: list[tuple[str, Any]],
                 accepted: tuple[str, ...] = ()):
        """``accepted``: further fingerprints a checkpoint may carry (older mmfl versions')."""
        self.path = out / CHECKPOINT
        self.fingerprint = fingerprint
        self.accepted = (fingerprint, *accepted)
        self.stateful = stateful
        self._synced = -math.inf  # perf_counter of the last fsynced checkpoint
        self.row_log = checkpoint.RowLog(out / CHECKPOINT_ROWS, {
            prefix: obj.pair_store for prefix, obj in stateful if hasattr(obj, "pair_store")})

    def save(self, st: RunState, tables: dict[str, Any] | None = None, *,
             final: bool = False) -> None:
        """Write the checkpoint of ``st``; ``tables`` (``RunWriter.snapshot()``) travels in it.
        It is fsynced when ``final`` or :data:`DURABLE_SECONDS` after the last fsync."""
        arrays = {f"param.{s}": p.numpy() for s, p in enumerate(st.params)}
        for prefix, obj in self.stateful:
            incremental = prefix in self.row_log.stores  # its rows: the row log's file
            state = obj.state_dict(rows=False) if incremental else obj.state_dict()
            for k, v in state.items():
                arrays[f"{prefix}.{k}"] = np.asarray(v)
        manifest = None
        if self.row_log.stores:
            row_arrays, manifest = self.row_log.write()
            arrays.update(row_arrays)
        for name in ("task_losses", "task_accuracies"):
            v = getattr(st, name)
            if v is not None:
                arrays[f"runner.{name}"] = np.asarray(v, np.float64)
        if st.history:
            arrays["runner.history_rounds"] = np.array([h[0] for h in st.history], np.int64)
            arrays["runner.history_accuracy"] = np.array([h[1] for h in st.history], np.float64)
            arrays["runner.history_loss"] = np.array([h[2] for h in st.history], np.float64)
            arrays["runner.history_time"] = np.array(st.history_time, np.float64)
        meta = {"round": st.round, "sim_time": st.sim_time, "cost": st.cost.as_dict(),
                "local_steps": st.local_steps, "fingerprint": self.fingerprint,
                "crc32": {k: checkpoint.crc32(v) for k, v in arrays.items()}}
        if tables is not None:
            meta["tables"] = tables
        if manifest is not None:
            meta["rows"] = manifest
        now = time.perf_counter()
        durable = final or now - self._synced >= DURABLE_SECONDS
        checkpoint.save(self.path, arrays, meta, durable=durable)
        self.row_log.committed()
        if durable:
            self._synced = now

    def load(self, st: RunState) -> dict[str, Any] | None:
        """Fill ``st`` (whose ``params`` has the run's S tensors) and the stateful objects;
        returns the tables' snapshot saved with the checkpoint (None in older checkpoints)."""
        arrays, meta = checkpoint.load(self.path)
        if meta.get("fingerprint") not in self.accepted:
            raise ResultsError(f"{self.path.parent}: the checkpoint was written by another config "
                               "or data folder; resume with the run's own config and --data-dir")
        for k, crc in meta.get("crc32", {}).items():  # absent in older checkpoints
            if k not in arrays or checkpoint.crc32(arrays[k]) != crc:
                raise ResultsError(f"{self.path}: tensor {k} is damaged (checksum mismatch); "
                                   f"{RECOVER}")
        try:
            return self._restore(st, arrays, meta)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise ResultsError(f"{self.path}: damaged checkpoint ({type(e).__name__}: {e}); "
                               f"{RECOVER}") from None

    def _restore(self, st: RunState, arrays: dict, meta: dict) -> dict[str, Any] | None:
        import torch

        for s, p in enumerate(st.params):
            got = arrays[f"param.{s}"].shape
            if got != tuple(p.shape):
                raise ValueError(f"param.{s} has shape {got}, the model {tuple(p.shape)}")
        st.round = int(meta["round"])
        st.params = [torch.from_numpy(arrays[f"param.{s}"].copy()) for s in range(len(st.params))]
        for prefix, obj in self.stateful:
            obj.load_state_dict({k[len(prefix) + 1:]: v for k, v in arrays.items()
                                 if k.startswith(prefix + ".")})
        self.row_log.restore(arrays, meta.get("rows"))  # ResultsError naming a damaged row file
        self.row_log.remove_unreferenced()  # row files of checkpoints after this one (a crash)
        st.task_losses = arrays.get("runner.task_losses")
        st.task_accuracies = arrays.get("runner.task_accuracies")
        st.cost = RoundCost(**meta["cost"])
        st.local_steps = int(meta["local_steps"])
        if "runner.history_rounds" in arrays:
            st.history = [(int(r), a, lo) for r, a, lo in zip(
                arrays["runner.history_rounds"], arrays["runner.history_accuracy"],
                arrays["runner.history_loss"])]
            st.history_time = [float(x) for x in arrays["runner.history_time"]]
        st.sim_time = float(meta.get("sim_time", 0.0))
        return meta.get("tables")
