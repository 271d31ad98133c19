"""Sweeps: every combination of a grid of config values x seeds, one run directory each.

A sweep is planned, then run::

    grid = parse_grid(["sampler.name=gvr,random", "clients.active_rate=0.1,0.2"])
    plan = plan_sweep(cfg, grid, seeds=[1, 2, 3], out="runs/sweep")   # validates everything
    result = run_sweep(plan, jobs=4)                                   # resumable
    result.failures                                                    # [] when all went well

Layout of ``out``: one ordinary run directory per combination, named by its overrides and seed,
``sampler.name=gvr/clients.active_rate=0.1/seed=1`` (a key per folder level, in grid order; values
are made file-name safe), plus ``index.json`` mapping every run name to its overrides, seed,
status and error (``failures`` lists the failed ones).

Rules:

- Planning validates the config of every combination before anything runs: a bad key or value
  raises the config layer's one-line :class:`~mmfl.errors.ConfigError` naming the key; a run
  folder that holds a run of a different config raises :class:`~mmfl.errors.ResultsError`.
- ``sampler.name`` in a grid switches the sampler the way ``mmfl compare`` does
  (:func:`with_sampler`): the options the new sampler also has are kept, the others dropped,
  and the aggregator goes back to the sampler's default; the other overrides apply after it.
- Resumable: a run whose ``summary.json`` says ``completed`` (for the configured number of
  rounds) is skipped; any other run is started with ``resume=True``, so an interrupted one goes on
  from its last checkpoint.
- A run that raises is recorded as failed (in the outcome and ``index.json``) and the others go
  on; :attr:`SweepResult.failures` lists them at the end.
- ``jobs > 1`` runs in worker processes (``spawn`` context); each sets ``OMP_NUM_THREADS=1``
  before importing torch and ``torch.set_num_threads(1)``. Progress comes back over a queue and
  reaches :class:`SweepCallback` objects in the calling process; the library only reports it,
  the CLI draws it.
- Components registered outside mmfl (``@mmfl.register`` in a notebook, a script or a module)
  reach the workers: each worker receives every such registration (pickled: a class or
  function travels as a reference to its module, which the worker imports, by file path when
  it is not importable by name) before its first run. A component the sweep uses that cannot be
  sent (defined in ``__main__`` of an interactive session such as a notebook or ``python -c``,
  or inside a function) is a one-line ConfigError naming it, raised before anything runs. A
  script's ``__main__`` is re-imported by every worker (Python's spawn), so a script must start
  the sweep under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import json
import logging
import os
import pickle
import sys
import queue as queue_mod
import re
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from mmfl.errors import ConfigError, MmflError, ResultsError
from mmfl.experiment import tomlio
from mmfl.experiment.config import ExperimentConfig, config_from_dict
from mmfl.experiment.recording import Callback, RoundRecord
from mmfl.experiment.results import INDEX, write_json
from mmfl.experiment.rundir import check_out_dir
from mmfl.experiment.runner import run
from mmfl.supervisor import ONE_THREAD, sigint_ignored, supervised
from mmfl.threads import AUTO_THREADS_ENV

log = logging.getLogger(__name__)


__all__ = [
    "RunOutcome", "SweepCallback", "SweepPlan", "SweepProgress", "SweepResult", "SweepRun",
    "apply_overrides", "parse_grid", "parse_seeds", "plan_sweep", "run_sweep", "with_sampler",
]


# --------------------------------------------------------------------------------------------
# Parsing


def parse_grid(items: Iterable[str]) -> dict[str, list[Any]]:
    """``["dotted.key=v1,v2", ...]`` -> ``{"dotted.key": [v1, v2], ...}`` (order kept).

    Values are TOML (bare words are strings); commas inside ``[...]``, ``{...}`` or quotes do
    not split, so ``clients.processors={1=0.5,2=0.5},2`` has two values. Raises ConfigError
    (key ``--grid``) for a malformed item, an empty value list, a key given twice or ``seed``
    (use the seeds argument).
    """
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError("--grid", "must look like dotted.key=v1,v2", item)
        if key == "seed":
            raise ConfigError("--grid", "seeds are given with --seeds, not --grid", item)
        if key in grid:
            raise ConfigError("--grid", f"key {key} given twice", item)
        pieces = [p.strip() for p in _split_top_level(text)]
        if not pieces or any(p == "" for p in pieces):
            raise ConfigError("--grid", f"{key}: needs comma-separated non-empty values", item)
        values = [tomlio.parse_value(p, "--grid") for p in pieces]
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise ConfigError("--grid", f"{key}: a value is repeated", item)
        grid[key] = values
    return grid


def _split_top_level(text: str) -> list[str]:
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_seeds(text: str, key: str = "--seeds") -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]``; ConfigError naming ``key`` when not non-negative, distinct
    integers."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(key, "must be comma-separated integers", text) from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(key, "must be distinct non-negative integers", text)
    return seeds


# --------------------------------------------------------------------------------------------
# Planning


def with_sampler(cfg: ExperimentConfig, name: str) -> ExperimentConfig:
    """``cfg`` with sampler ``name``: the sampler options that ``name`` also has are kept, the
    others dropped, and the aggregator reset to the sampler's default."""
    from mmfl import registry

    raw = cfg.to_dict()
    valid = registry.get("sampler", name, key="sampler.name").options
    old = raw["sampler"]
    raw["sampler"] = {"name": name, **{k: v for k, v in old.items() if k in valid}}
    return config_from_dict(raw)


def apply_overrides(cfg: ExperimentConfig, overrides: Mapping[str, Any],
                    seed: int | None = None) -> ExperimentConfig:
    """``cfg`` with one combination applied: ``sampler.name`` first (:func:`with_sampler`), then
    the other dotted keys, then ``seed``. Raises the config layer's ConfigError."""
    rest = dict(overrides)
    if "sampler.name" in rest:
        cfg = with_sampler(cfg, str(rest.pop("sampler.name")))
    if seed is not None:
        rest["seed"] = seed
    return cfg.replace(**rest) if rest else cfg


def _about(cfg: ExperimentConfig) -> str:
    return f"tasks=[{', '.join(t.name for t in cfg.tasks)}], rounds={cfg.rounds}"


@dataclass(frozen=True)
class SweepRun:
    """One combination: its run directory name (relative to the sweep folder), the grid values
    it sets, its seed and its validated config."""

    name: str
    overrides: dict[str, Any]
    seed: int
    config: ExperimentConfig

    def __repr__(self) -> str:
        return f"SweepRun({self.name!r}, seed={self.seed}, {_about(self.config)})"


@dataclass(frozen=True)
class SweepPlan:
    """Every run of a sweep, validated (see :func:`plan_sweep`)."""

    out: Path
    base: ExperimentConfig
    grid: dict[str, list[Any]]
    seeds: list[int]
    runs: list[SweepRun]

    def run_dir(self, run_: SweepRun) -> Path:
        return self.out / run_.name

    def __repr__(self) -> str:
        grid = ", ".join(f"{k}={len(v)}" for k, v in self.grid.items())
        return (f"SweepPlan({str(self.out)!r}, runs={len(self.runs)}, grid=[{grid}], "
                f"seeds={self.seeds}, {_about(self.base)})")


Naming = Callable[[Mapping[str, Any], int], str]


def _slug(value: Any) -> str:
    text = value if isinstance(value, str) else tomlio.scalar(value)
    text = re.sub(r"[^A-Za-z0-9_.+=\[\]-]+", "_", text).strip("_") or "_"
    return text[:60]


def default_name(overrides: Mapping[str, Any], seed: int) -> str:
    """``key=value/.../seed=N``: one folder level per grid key, in grid order."""
    return "/".join([*(f"{k}={_slug(v)}" for k, v in overrides.items()), f"seed={seed}"])


def plan_sweep(cfg: ExperimentConfig, grid: Mapping[str, Sequence[Any]], seeds: Sequence[int],
               out: str | Path, *, naming: Naming | None = None) -> SweepPlan:
    """Validate every combination of ``grid`` x ``seeds`` on ``cfg``; nothing is written.

    Args:
        cfg: the base experiment (``--set`` overrides already applied).
        grid: dotted key -> values (see :func:`parse_grid`); combinations in row-major order.
        seeds: one run per seed for every combination.
        out: the sweep folder.
        naming: ``(overrides, seed) -> relative folder name``; default :func:`default_name`.

    Raises:
        ConfigError: a bad grid key or value (the config layer's message naming the key), or
            two combinations with the same folder name.
        ResultsError: a run folder holding a run of another config (only rounds may differ).
    """
    if not seeds:
        raise ConfigError("--seeds", "needs at least one seed", list(seeds))
    naming = naming or default_name
    out = Path(out)
    keys = list(grid)
    runs: list[SweepRun] = []
    names: dict[str, dict] = {}
    for values in itertools.product(*(list(grid[k]) for k in keys)):
        overrides = dict(zip(keys, values))
        for seed in seeds:
            one = apply_overrides(cfg, overrides, int(seed))
            name = naming(overrides, int(seed))
            if name in names:
                raise ConfigError("--grid", f"two combinations share the run folder {name}",
                                  [names[name], overrides])
            names[name] = overrides
            runs.append(SweepRun(name, overrides, int(seed), one))
    plan = SweepPlan(out, cfg, {k: list(v) for k, v in grid.items()}, [int(s) for s in seeds],
                     runs)
    if out.exists() and not out.is_dir():
        raise ResultsError(f"{out}: --out exists and is not a folder")
    for r in runs:
        check_out_dir(r.config, plan.run_dir(r), resume=True)
    return plan


# --------------------------------------------------------------------------------------------
# Progress and outcomes


@dataclass
class RunOutcome:
    """What happened to one run of a sweep.

    ``status``: ``completed`` (ran to the end now), ``skipped`` (finished before), ``failed``.
    ``start_round``: rounds already done when it started (> 0: resumed from a checkpoint).
    """

    name: str
    status: str
    summary: dict[str, Any] | None = None
    error: str | None = None
    start_round: int = 0
    seconds: float = 0.0

    def __repr__(self) -> str:
        acc = (self.summary or {}).get("mean_accuracy")
        more = (f", error={self.error[:80]!r}" if self.error else
                f", mean_accuracy={acc:.4f}" if isinstance(acc, float) else "")
        return f"RunOutcome({self.name!r}, {self.status}{more})"


@dataclass
class SweepProgress:
    """A snapshot for progress displays.

    ``done`` counts finished runs (completed, skipped or failed) of ``total``; ``running`` maps
    the runs in progress to (completed rounds, rounds); ``eta`` is the estimated seconds left
    (None until a round of this session finished), from the rounds still to run and the pace
    of the rounds run so far.
    """

    total: int
    done: int = 0
    skipped: int = 0
    failed: int = 0
    running: dict[str, tuple[int, int]] = field(default_factory=dict)
    elapsed: float = 0.0
    eta: float | None = None


class SweepCallback:
    """Receives sweep progress (in the calling process). Override what you need."""

    def on_start(self, progress: SweepProgress) -> None:
        """Before the first run (skipped runs are already counted in ``done``)."""

    def on_update(self, progress: SweepProgress) -> None:
        """A run started or finished a round."""

    def on_run_end(self, progress: SweepProgress, outcome: RunOutcome) -> None:
        """A run completed, was skipped or failed."""

    def on_end(self, progress: SweepProgress) -> None:
        """After the last run."""


@dataclass
class SweepResult:
    plan: SweepPlan
    outcomes: list[RunOutcome]  # in plan order

    @property
    def failures(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def summaries(self) -> list[dict[str, Any] | None]:
        return [o.summary for o in self.outcomes]

    def __repr__(self) -> str:
        counts = {k: sum(o.status == k for o in self.outcomes)
                  for k in ("completed", "skipped", "failed")}
        other = len(self.outcomes) - sum(counts.values())
        status = ", ".join(f"{n} {k}" for k, n in counts.items()) + (
            f", {other} interrupted" if other else "")
        return (f"SweepResult({str(self.plan.out)!r}, runs={len(self.outcomes)}, "
                f"{_about(self.plan.base)}, status: {status})")


class _Tracker:
    """Turns run events into SweepProgress snapshots for the callbacks."""

    def __init__(self, plan: SweepPlan, pending: list[SweepRun], skipped: int,
                 callbacks: Sequence[SweepCallback]):
        self.callbacks = list(callbacks)
        self.t0 = time.perf_counter()
        self.progress = SweepProgress(total=len(plan.runs), skipped=skipped)
        self.ended: set[str] = set()
        self.left = {r.name: r.config.rounds - _rounds_done(plan.run_dir(r)) for r in pending}
        self.rounds_run = 0
        self.last_round: dict[str, int] = {}
        self.start_rounds: dict[str, int] = {}

    def _snapshot(self) -> SweepProgress:
        p = self.progress
        p.elapsed = time.perf_counter() - self.t0
        left = sum(max(v, 0) for v in self.left.values())
        p.eta = p.elapsed / self.rounds_run * left if self.rounds_run else None
        return p

    def start(self) -> None:
        snap = self._snapshot()
        for cb in self.callbacks:
            cb.on_start(snap)

    def run_started(self, name: str, start_round: int, rounds: int) -> None:
        if name in self.ended:  # a late message from a worker
            return
        self.progress.running[name] = (start_round, rounds)
        self.last_round[name] = self.start_rounds[name] = start_round
        self.left[name] = rounds - start_round
        snap = self._snapshot()
        for cb in self.callbacks:
            cb.on_update(snap)

    def round_done(self, name: str, round_: int, rounds: int) -> None:
        if name in self.ended:
            return
        step = round_ - self.last_round.get(name, round_ - 1)
        self.last_round[name] = round_
        self.rounds_run += max(step, 0)
        self.left[name] = rounds - round_
        self.progress.running[name] = (round_, rounds)
        snap = self._snapshot()
        for cb in self.callbacks:
            cb.on_update(snap)

    def run_ended(self, outcome: RunOutcome) -> None:
        p = self.progress
        self.ended.add(outcome.name)
        p.running.pop(outcome.name, None)
        self.left[outcome.name] = 0
        p.done += 1
        p.failed += outcome.status == "failed"
        snap = self._snapshot()
        for cb in self.callbacks:
            cb.on_run_end(snap, outcome)

    def end(self) -> None:
        snap = self._snapshot()
        for cb in self.callbacks:
            cb.on_end(snap)


def _read_summary(run_dir: Path) -> dict[str, Any] | None:
    """summary.json of ``run_dir`` when it reads back as a JSON object, else None (missing,
    damaged: the run is treated as not finished)."""
    try:
        s = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return s if isinstance(s, dict) else None


def _completed(s: dict[str, Any] | None) -> int:
    """``rounds_completed`` of a summary (0 when absent or not a number)."""
    try:
        return int(s.get("rounds_completed", 0)) if s else 0
    except (TypeError, ValueError, OverflowError):
        return 0


def _rounds_done(run_dir: Path) -> int:
    return _completed(_read_summary(run_dir))


def finished_summary(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any] | None:
    """The summary of a run directory that finished ``cfg``'s rounds, else None."""
    s = _read_summary(run_dir)
    if s and s.get("status") == "completed" and _completed(s) >= cfg.rounds:
        return s
    return None


# --------------------------------------------------------------------------------------------
# Running


def run_sweep(plan: SweepPlan, *, jobs: int = 1, data_dir: str | None = None,
              callbacks: Sequence[SweepCallback] = (),
              run_callbacks: Sequence[Callback] = ()) -> SweepResult:
    """Run every run of ``plan`` not finished yet; returns the outcomes in plan order.

    Args:
        jobs: worker processes (1: runs one after another in this process).
        data_dir: dataset folder passed to every run.
        callbacks: sweep progress receivers (:class:`SweepCallback`).
        run_callbacks: runner callbacks (per round of a run); only with ``jobs == 1``, where
            runs happen in this process.

    A failed run (any exception) is recorded and the sweep goes on; KeyboardInterrupt stops the
    sweep (runs in progress keep their checkpoints; run the same sweep again to resume).
    With worker processes, components registered outside mmfl are sent to them
    (:func:`registrations_for_workers`), also from a notebook.

    Raises:
        ConfigError: ``jobs < 1``, or (``jobs > 1``) a registered component the runs use that
            worker processes cannot import (defined in an interactive ``__main__`` or inside a
            function), named, before anything runs.
        MmflError: called in a worker process that is importing an unguarded main script.
    """
    if jobs < 1:
        raise ConfigError("--jobs", "must be >= 1", jobs)
    if run_callbacks and jobs > 1:
        raise ValueError("run_callbacks need jobs == 1 (runs in this process)")
    if _bootstrapping():
        raise MmflError("run_sweep was called while a worker process imported the main script; "
                        "start the sweep under 'if __name__ == \"__main__\":'")
    outcomes: dict[str, RunOutcome] = {}
    pending: list[SweepRun] = []
    for r in plan.runs:
        s = finished_summary(r.config, plan.run_dir(r))
        if s is not None:
            log.info("%s: finished already, skipped", r.name)
            outcomes[r.name] = RunOutcome(r.name, "skipped", summary=s,
                                          start_round=int(s.get("rounds_completed", 0)))
        else:
            pending.append(r)
    pool = jobs > 1 and len(pending) > 1
    # user components for the workers; one they cannot get is an error before anything runs
    registrations = registrations_for_workers(plan) if pool else []
    plan.out.mkdir(parents=True, exist_ok=True)
    _write_index(plan, outcomes)
    tracker = _Tracker(plan, pending, len(outcomes), callbacks)
    tracker.start()
    for o in list(outcomes.values()):
        tracker.run_ended(o)

    def finish(outcome: RunOutcome) -> None:
        outcomes[outcome.name] = outcome
        if outcome.status == "failed":
            log.error("%s failed: %s", outcome.name, outcome.error)
        tracker.run_ended(outcome)
        _write_index(plan, outcomes)

    try:
        if not pool:
            for r in pending:
                finish(_run_here(plan, r, data_dir, tracker, run_callbacks))
        else:
            _run_pool(plan, pending, jobs, data_dir, tracker, finish, registrations)
    finally:
        _write_index(plan, outcomes)
    tracker.end()
    return SweepResult(plan, [outcomes[r.name] for r in plan.runs])


class _Relay:
    """Runner callback feeding the tracker (in-process runs)."""

    def __init__(self, name: str, tracker: _Tracker):
        self.name, self.tracker = name, tracker

    def on_start(self, cfg, federation, start_round):
        self.tracker.run_started(self.name, start_round, cfg.rounds)

    def on_round(self, record: RoundRecord):
        self.tracker.round_done(self.name, record.round, record.rounds)

    def on_end(self, summary):
        pass


def _run_here(plan: SweepPlan, r: SweepRun, data_dir: str | None, tracker: _Tracker,
              run_callbacks: Sequence[Callback]) -> RunOutcome:
    t0 = time.perf_counter()
    log.info("%s: starting", r.name)
    try:
        summary = run(r.config, plan.run_dir(r), resume=True, data_dir=data_dir,
                      callbacks=[_Relay(r.name, tracker), *run_callbacks])
    except Exception as e:  # one failed run must not lose the others
        log.debug("%s failed", r.name, exc_info=True)
        return RunOutcome(r.name, "failed", summary=_read_summary(plan.run_dir(r)),
                          error=_describe(e), start_round=tracker.start_rounds.get(r.name, 0),
                          seconds=time.perf_counter() - t0)
    return RunOutcome(r.name, "completed", summary=summary,
                      start_round=tracker.start_rounds.get(r.name, 0),
                      seconds=time.perf_counter() - t0)


def _describe(e: BaseException) -> str:
    from concurrent.futures.process import BrokenProcessPool

    if isinstance(e, BrokenProcessPool):
        return ("a worker process died (killed, out of memory, or a script that starts the "
                "sweep outside 'if __name__ == \"__main__\":', which every worker re-runs when "
                "it imports the script)")
    text = str(e) or type(e).__name__
    return text if isinstance(e, MmflError) else f"{type(e).__name__}: {text}"


def _bootstrapping() -> bool:
    """True in a spawned process that is still importing its parent's main script."""
    import multiprocessing

    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))


# -- user components in worker processes ------------------------------------------------------

#: (kind, name, module of the object, that module's file, pickled (Entry, class OPTIONS))
_Registration = tuple[str, str, str, "str | None", bytes]


def _used_components(plan: SweepPlan) -> set[tuple[str, str]]:
    """(kind, name) of every component a run of ``plan`` looks up by name."""
    used: set[tuple[str, str]] = set()
    for r in plan.runs:
        c = r.config
        used |= {("sampler", c.sampler.name), ("engine", c.engine)}
        if c.sampler.aggregator != "default":
            used.add(("aggregator", c.sampler.aggregator))
        for t in c.tasks:
            used |= {("dataset", t.dataset), ("model", t.model)}
    return used


def _unsendable(obj: Any) -> str | None:
    """Why ``obj`` cannot reach a spawned worker by reference, or None."""
    module = getattr(obj, "__module__", None)
    if module == "__main__" and not getattr(sys.modules.get("__main__"), "__file__", None):
        return ("is defined in __main__ of an interactive session (a notebook, python -c or a "
                "REPL), which worker processes cannot import")
    if "<locals>" in getattr(obj, "__qualname__", ""):
        return "is defined inside a function, which worker processes cannot import"
    return None


def registrations_for_workers(plan: SweepPlan) -> list[_Registration]:
    """Every component registered outside mmfl, ready for :func:`restore_registrations` in a
    worker process. A component that cannot be sent is left out, unless ``plan`` uses it: then
    a ConfigError names it and says what to do."""
    from mmfl import registry

    used = _used_components(plan)
    out: list[_Registration] = []
    for kind, entry in registry.user_entries():
        why = _unsendable(entry.obj)
        blob = b""
        if why is None:
            cls_options = entry.obj.__dict__.get("OPTIONS") if isinstance(entry.obj, type) else None
            try:
                blob = pickle.dumps((entry, cls_options))
            except Exception as e:  # noqa: BLE001 - any pickling failure means "cannot send"
                why = f"cannot be sent to worker processes ({type(e).__name__}: {str(e)[:120]})"
        if why is not None:
            if (kind, entry.name) in used:
                raise ConfigError("jobs", f"{kind} {entry.name!r} (registered by "
                                  f"{entry.origin or 'unknown code'}) {why}; define it at the top "
                                  "level of a module (a .py file) that you import, or run the "
                                  "sweep with jobs=1", show_got=False)
            log.debug("%s %r is not sent to the sweep's workers: %s", kind, entry.name, why)
            continue
        module = getattr(entry.obj, "__module__", None) or ""
        file = getattr(sys.modules.get(module), "__file__", None)
        out.append((kind, entry.name, module, file, blob))
    return out


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # e.g. a parent package that is not importable either
        return False


def restore_registrations(items: Sequence[_Registration]) -> dict[tuple[str, str], str]:
    """Register ``items`` (from :func:`registrations_for_workers`) in this process; returns
    (kind, name) -> why, for those that could not be restored."""
    from mmfl import registry

    failed: dict[tuple[str, str], str] = {}
    for kind, name, module, file, blob in items:
        try:
            if module and module not in sys.modules and file and not _importable(module):
                spec = importlib.util.spec_from_file_location(module, file)
                mod = importlib.util.module_from_spec(spec)
                sys.modules[module] = mod
                spec.loader.exec_module(mod)
            entry, cls_options = pickle.loads(blob)
        except Exception as e:  # noqa: BLE001 - reported when a run needs the component
            failed[(kind, name)] = (f"{kind} {name!r}: the worker process could not import it "
                                    f"from {file or module} ({type(e).__name__}: {str(e)[:160]})")
            continue
        registry.add_entry(kind, entry)
        if cls_options is not None:
            entry.obj.OPTIONS = cls_options
    return failed


# -- worker processes ------------------------------------------------------------------------

_QUEUE = None  # the progress queue of a worker process
_STOP = None  # set by the parent on Ctrl-C: runs stop after their round, queued ones are dropped
_LOST: dict[tuple[str, str], str] = {}  # user components this worker could not restore


def _init_worker(q, stop, registrations: Sequence[_Registration] = ()) -> None:
    """Worker set-up: one thread for every numerical library, before torch is imported; Ctrl-C
    is left to the parent, which asks the runs to stop through ``stop``; the parent's user
    components registered (:func:`restore_registrations`)."""
    global _QUEUE, _STOP, _LOST
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update({**ONE_THREAD, AUTO_THREADS_ENV: "1"})
    import torch

    torch.set_num_threads(1)
    _QUEUE, _STOP = q, stop
    _LOST = restore_registrations(registrations)


def _lost_component(raw: dict) -> str | None:
    """Why a component the config ``raw`` names is missing in this worker, or None."""
    if not _LOST:
        return None
    sampler = raw.get("sampler") if isinstance(raw.get("sampler"), dict) else {}
    names = [("sampler", sampler.get("name")), ("aggregator", sampler.get("aggregator")),
             ("engine", raw.get("engine"))]
    for t in raw.get("tasks") or ():
        if isinstance(t, dict):
            names += [("dataset", t.get("dataset")), ("model", t.get("model"))]
    return next((_LOST[k] for k in names if k in _LOST), None)


class _QueueRelay:
    def __init__(self, name: str):
        self.name = name
        self.start_round = 0

    def on_start(self, cfg, federation, start_round):
        self.start_round = start_round
        _QUEUE.put(("start", self.name, start_round, cfg.rounds))

    def on_round(self, record):
        _QUEUE.put(("round", self.name, record.round, record.rounds))
        if _STOP.is_set():
            raise KeyboardInterrupt  # the runner records "interrupted" and keeps its checkpoint

    def on_end(self, summary):
        pass


def _worker_run(name: str, raw: dict, run_dir: str, data_dir: str | None) -> dict:
    """Run one config in a worker; never raises (an error comes back as a field)."""
    if _STOP.is_set():
        return {"status": "cancelled"}
    relay = _QueueRelay(name)
    t0 = time.perf_counter()
    lost = _lost_component(raw)
    if lost is not None:
        return {"status": "failed", "error": lost, "summary": _read_summary(Path(run_dir)),
                "start_round": 0, "seconds": 0.0}
    try:
        summary = run(config_from_dict(raw), run_dir, resume=True, data_dir=data_dir,
                      callbacks=[relay])
        return {"status": "completed", "summary": summary, "start_round": relay.start_round,
                "seconds": time.perf_counter() - t0}
    except KeyboardInterrupt:
        return {"status": "interrupted"}
    except Exception as e:
        return {"status": "failed", "error": _describe(e), "traceback": traceback.format_exc(),
                "summary": _read_summary(Path(run_dir)), "start_round": relay.start_round,
                "seconds": time.perf_counter() - t0}


def _run_pool(plan: SweepPlan, pending: list[SweepRun], jobs: int, data_dir: str | None,
              tracker: _Tracker, finish: Callable[[RunOutcome], None],
              registrations: Sequence[_Registration] = ()) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()

    def drain() -> None:
        while True:
            try:
                kind, name, rnd, rounds = q.get_nowait()
            except queue_mod.Empty:
                return
            if kind == "start":
                tracker.run_started(name, rnd, rounds)
            else:
                tracker.round_done(name, rnd, rounds)

    def outcome(r: SweepRun, res: dict) -> RunOutcome:
        if res.get("traceback"):
            log.debug("%s failed in a worker:\n%s", r.name, res["traceback"])
        return RunOutcome(r.name, res["status"], summary=res.get("summary"),
                          error=res.get("error"), start_round=res.get("start_round", 0),
                          seconds=res.get("seconds", 0.0))

    # the queue and event above start multiprocessing's resource tracker outside the block,
    # which outlives it; the workers start inside and die with this process (even by kill -9)
    with supervised(), ProcessPoolExecutor(max_workers=min(jobs, len(pending)), mp_context=ctx,
                                           initializer=_init_worker,
                                           initargs=(q, stop, registrations)) as pool:
        futures: dict[Future, SweepRun] = {}
        handled: set[Future] = set()
        try:
            with sigint_ignored():  # workers start here and inherit it: no Ctrl-C mid-start-up
                for r in pending:
                    f = pool.submit(_worker_run, r.name, r.config.to_dict(),
                                    str(plan.run_dir(r)), data_dir)
                    futures[f] = r
            todo = set(futures)
            while todo:
                ready, todo = wait(todo, timeout=0.2, return_when=FIRST_COMPLETED)
                drain()
                for f in ready:
                    r = futures[f]
                    try:
                        res = f.result()
                    except Exception as e:  # the worker process died (e.g. killed)
                        res = {"status": "failed", "error": _describe(e),
                               "summary": _read_summary(plan.run_dir(r))}
                    handled.add(f)
                    finish(outcome(r, res))
        except BaseException:  # Ctrl-C (or a failing callback): stop the runs after their round
            log.warning("sweep stopping: runs in progress stop after their current round")
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            for f, r in futures.items():  # record what finished meanwhile
                if f not in handled and f.done() and not f.cancelled() and not f.exception():
                    if f.result()["status"] in ("completed", "failed"):
                        finish(outcome(r, f.result()))
            raise
        finally:
            drain()


def _write_index(plan: SweepPlan, outcomes: Mapping[str, RunOutcome]) -> None:
    """``index.json``: every run name -> overrides, seed, status, error; merged with the runs an
    earlier sweep into the same folder recorded."""
    path = plan.out / INDEX
    old: dict[str, Any] = {}
    if path.exists():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):  # damaged: rewritten from this sweep
            doc = {}
        old = doc.get("runs", {}) if isinstance(doc, dict) else {}
        old = {k: v for k, v in old.items() if isinstance(v, dict)} if isinstance(old, dict) else {}
    runs = dict(old)
    for r in plan.runs:
        o = outcomes.get(r.name)
        status = "pending" if o is None else "failed" if o.status == "failed" else "completed"
        runs[r.name] = {"overrides": r.overrides, "seed": r.seed, "status": status,
                        "error": o.error if o else None}
    failures = [{"name": n, "error": v.get("error")} for n, v in runs.items()
                if v.get("status") == "failed"]
    write_json(path, {"grid": plan.grid, "seeds": plan.seeds, "config": plan.base.to_dict(),
                      "runs": runs, "failures": failures})
