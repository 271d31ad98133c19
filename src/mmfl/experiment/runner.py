"""The round loop: allocate, train, aggregate, evaluate, record, checkpoint.

One loop drives every engine. Per round t (0-based; files count completed rounds, t + 1):

1. ``RoundState`` from the population, budget m, availability mask, latest task losses;
2. ``allocator.allocate(state, rng=stream(seed, "allocate", t))`` -> Assignment;
3. ``engine.train`` on the unique active (client, task) pairs -> updates G (for SCAFFOLD,
   with the control-variate corrections c_s - c_{i,s}); pairs the engine returns no update for
   (a distributed engine whose node did not answer, see :mod:`mmfl.flower`) are *missing*:
   dropped from the assignment like stragglers past the deadline and counted in rounds.csv;
4. ``aggregator.plan`` -> coefficients; ``engine.apply`` -> new global models; stale updates
   h and SCAFFOLD's control variates are updated from the round's G;
5. evaluation every ``eval_every`` rounds, in each of the last ``eval_last`` rounds and in the
   last round, rows appended to the run directory, checkpoint every ``checkpoint_every``
   rounds (and the last).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from mmfl import registry
from mmfl.core.metrics import RoundCost, fairness_stats, round_cost
from mmfl.errors import MmflError, ResultsError
from mmfl.experiment import checkpoint, tomlio
from mmfl.experiment.config import ExperimentConfig, resolve_data_dir
from mmfl.experiment.federation import Federation, build_federation
from mmfl.experiment.results import RunWriter, write_json
from mmfl.experiment.system import build_profile
from mmfl.core.system import pair_seconds, round_clock
from mmfl.rng import stream
from mmfl.types import RoundState, Signals

log = logging.getLogger(__name__)

#: Number of last evaluated rounds averaged for the papers' headline metric (ALGORITHMS.md s. 8).
FINAL_WINDOW = 20
CHECKPOINT = "checkpoint.safetensors"


@dataclass
class RoundRecord:
    """What callbacks see after each round."""

    round: int                      # completed rounds (1-based)
    rounds: int                     # total rounds of the run
    task_names: tuple[str, ...]
    accuracy: np.ndarray | None     # (S,) test accuracy, None when not evaluated this round
    loss: np.ndarray | None         # (S,)
    slots: int
    seconds: float


class Callback(Protocol):
    def on_start(self, cfg: ExperimentConfig, federation: Federation, start_round: int) -> None: ...
    def on_round(self, record: RoundRecord) -> None: ...
    def on_end(self, summary: dict[str, Any]) -> None: ...


@dataclass
class _State:
    """Everything a checkpoint holds besides the allocator/aggregator state."""

    round: int = 0
    params: list = field(default_factory=list)
    task_losses: np.ndarray | None = None
    task_accuracies: np.ndarray | None = None
    cost: RoundCost = field(default_factory=RoundCost)
    local_steps: int = 0
    history: list[tuple[int, np.ndarray, np.ndarray]] = field(default_factory=list)
    sim_time: float = 0.0
    history_time: list[float] = field(default_factory=list)


def config_fingerprint(cfg: ExperimentConfig, data_dir: Path | None) -> str:
    """Hash of everything that determines a run's rounds except their number (and the data
    folder): a checkpoint only resumes under the same fingerprint."""
    d = cfg.to_dict()
    d.pop("rounds")
    text = tomlio.dumps(d) + f"\ndata_dir={data_dir}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def check_out_dir(cfg: ExperimentConfig, out: Path, *, resume: bool) -> bool:
    """Check the run directory before anything is written; True when a checkpoint will be
    resumed. Raises ResultsError for a run that exists without ``resume``, a different config,
    or an ``--out`` that is not a folder."""
    if out.exists() and not out.is_dir():
        raise ResultsError(f"{out}: --out exists and is not a folder")
    has_run = (out / "metrics.csv").exists()
    if has_run and not resume:
        raise ResultsError(
            f"{out} already holds a run; pass --resume to continue it or choose another --out"
        )
    if not (resume and has_run):
        return False
    old = tomlio.load(out / "config.toml") if (out / "config.toml").exists() else {}
    new = cfg.to_dict()
    diff = sorted(k for k in set(old) | set(new) if k != "rounds" and old.get(k) != new.get(k))
    if diff:
        raise ResultsError(
            f"{out}: the config differs from the run's config.toml (in: {', '.join(diff)}); "
            "resume with the same config (only rounds may change)"
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
def _writing(out: Path):
    """Turn a failed write into a one-line ResultsError naming the path."""
    try:
        yield
    except OSError as e:
        where = e.filename or out
        raise ResultsError(f"{where}: cannot write results ({e.strerror or e})") from None


class Runner:
    """Runs one experiment into one run directory. Use :func:`run` for the common case."""

    def __init__(self, cfg: ExperimentConfig, out: str | Path, *, data_dir: str | None = None,
                 callbacks: Sequence[Callback] = (),
                 engine_factory: Callable[[Federation], Any] | None = None):
        """``engine_factory(federation) -> Engine`` replaces the registry's construction of
        ``cfg.engine`` (e.g. an engine bound to a Flower grid inside a ServerApp). Without it,
        an engine class that defines ``host_run(runner, *, resume)`` (engine ``flower``) hosts
        the run: :meth:`run` hands over to it, and it calls :meth:`run` back with a factory."""
        self.cfg = cfg
        self.out = Path(out)
        self.data_dir = resolve_data_dir(cfg, data_dir)
        self.callbacks = list(callbacks)
        self.engine_factory = engine_factory

    # -- construction ----------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.cfg
        self.federation = fed = build_federation(cfg, self.data_dir)
        pop = fed.population
        entry = registry.get("sampler", cfg.sampler.name, key="sampler.name")
        self.allocator = entry.obj(dict(cfg.sampler.options), pop, cfg.seed)
        agg_name = cfg.sampler.aggregator
        if agg_name == "default":
            agg_name = self.allocator.default_aggregator
        agg = registry.get("aggregator", agg_name, key="sampler.aggregator")
        self.aggregator_name = agg_name
        shared = {k: v for k, v in cfg.sampler.options.items() if k in agg.options}  # e.g. beta, b0
        self.aggregator = agg.obj(
            registry.resolve_options("sampler", shared, agg.options, cfg.variant), pop)
        eng = registry.get("engine", cfg.engine, key="engine")
        if self.engine_factory is not None:
            self.engine = self.engine_factory(fed)
        else:
            self.engine = eng.obj(fed, seed=cfg.seed, threads=cfg.threads)
        self._task_lr = np.array([t.lr for t in cfg.tasks], dtype=np.float64)
        self.profile = build_profile(cfg)
        self._flops = np.array(self.engine.flops_per_sample())
        self._model_bytes = 4.0 * np.array(self.engine.num_parameters())
        from mmfl.engines.stale import ControlVariates, StaleStore

        def per_pair(cls, needed: bool, folder: str):
            """A per-(client, task) vector store, in RAM or memory-mapped under ``folder``."""
            if not needed:
                return None
            return cls(pop.holds, self.engine.num_parameters(), dtype=cfg.stale_dtype,
                       path=(self.out / folder) if cfg.stale_on_disk else None)

        req = self.allocator.requires
        self.store = per_pair(StaleStore, self.aggregator.uses_stale or "stale" in req, "stale")
        # latest probe update G~ per pair (StaleVRE score = "probe")
        self.probe_store = per_pair(StaleStore, "probe" in req, "probe")
        # SCAFFOLD's c_{i,s} and c_s (mmfl.core.scaffold)
        self.controls = per_pair(ControlVariates, "control_variates" in req, "controls")

    def _availability(self, t: int) -> np.ndarray:
        """(N,) bool: online this round (random availability, late joiners, leavers)."""
        c = self.cfg.clients
        n = self.federation.population.num_clients
        online = np.ones(n, dtype=bool)
        avail = self.profile.availability
        if (avail < 1.0).any():
            online &= stream(self.cfg.seed, "availability", t).random(n) < avail
        if c.join_fraction or c.leave_fraction:
            order = stream(self.cfg.seed, "churn").permutation(n)  # fixed for the whole run
            late = order[: int(round(c.join_fraction * n))]
            gone = order[n - int(round(c.leave_fraction * n)):] if c.leave_fraction else order[:0]
            if t < c.join_round:
                online[late] = False
            if c.leave_round and t >= c.leave_round:
                online[gone] = False
        return online

    def _task_active(self, t: int) -> np.ndarray | None:
        """(S,) bool: models trained this round ([start_round, stop_round)), None if all."""
        act = np.array([t >= k.start_round and not (k.stop_round and t >= k.stop_round)
                        for k in self.cfg.tasks])
        return None if act.all() else act

    def _stateful(self) -> list[tuple[str, object]]:
        objs = [("allocator", self.allocator), ("aggregator", self.aggregator)]
        objs += [("stale", self.store)] if self.store is not None else []
        objs += [("probe", self.probe_store)] if self.probe_store is not None else []
        return objs + ([("controls", self.controls)] if self.controls is not None else [])

    def _state_bytes(self) -> int:
        """Server memory of per-pair state: stale updates h (and probe updates) plus SCAFFOLD
        control variates."""
        return sum(x.nbytes for x in (self.store, self.probe_store, self.controls)
                   if x is not None)

    def _train(self, st: _State, clients: np.ndarray, tasks: np.ndarray, t: int):
        """``engine.train`` of the pairs, with SCAFFOLD's corrections c_s - c_{i,s} when the
        sampler keeps control variates."""
        if self.controls is None:
            return self.engine.train(st.params, clients, tasks, t)
        return self.engine.train(st.params, clients, tasks, t,
                                 corrections=self.controls.corrections(clients, tasks))

    # -- checkpoint --------------------------------------------------------------------------
    def _save(self, st: _State) -> None:
        arrays = {f"param.{s}": p.numpy() for s, p in enumerate(st.params)}
        for prefix, obj in self._stateful():
            for k, v in obj.state_dict().items():
                arrays[f"{prefix}.{k}"] = np.asarray(v)
        for name in ("task_losses", "task_accuracies"):
            v = getattr(st, name)
            if v is not None:
                arrays[f"runner.{name}"] = np.asarray(v, np.float64)
        if st.history:
            arrays["runner.history_rounds"] = np.array([h[0] for h in st.history], np.int64)
            arrays["runner.history_accuracy"] = np.array([h[1] for h in st.history], np.float64)
            arrays["runner.history_loss"] = np.array([h[2] for h in st.history], np.float64)
            arrays["runner.history_time"] = np.array(st.history_time, np.float64)
        meta = {"round": st.round, "sim_time": st.sim_time, "cost": st.cost.as_dict(), "local_steps": st.local_steps,
                "fingerprint": config_fingerprint(self.cfg, self.data_dir)}
        checkpoint.save(self.out / CHECKPOINT, arrays, meta)

    def _load(self, st: _State) -> None:
        import torch

        arrays, meta = checkpoint.load(self.out / CHECKPOINT)
        if meta.get("fingerprint") != config_fingerprint(self.cfg, self.data_dir):
            raise ResultsError(f"{self.out}: the checkpoint was written by another config or "
                               "data folder; resume with the run's own config and --data-dir")
        st.round = int(meta["round"])
        st.params = [torch.from_numpy(arrays[f"param.{s}"].copy()) for s in range(len(st.params))]
        for prefix, obj in self._stateful():
            obj.load_state_dict({k[len(prefix) + 1:]: v for k, v in arrays.items()
                                 if k.startswith(prefix + ".")})
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

    # -- the loop --------------------------------------------------------------------------------
    def run(self, *, resume: bool = False) -> dict[str, Any]:
        """Run (or continue) the experiment; returns the summary (also in summary.json)."""
        cfg = self.cfg
        if self.engine_factory is None:
            host = getattr(registry.get("engine", cfg.engine, key="engine").obj, "host_run", None)
            if host is not None:
                return host(self, resume=resume)
        resuming = check_out_dir(cfg, self.out, resume=resume)
        self._build()  # data and model errors surface before anything is written
        fed = self.federation
        st = _State(params=self.engine.init_params())
        with _writing(self.out):
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.toml").write_text(tomlio.dumps(cfg.to_dict()), encoding="utf-8")
            write_json(self.out / "federation.json", federation_info(fed))
            if resuming:
                self._load(st)
                log.info("resuming %s after round %d", self.out, st.round)
            writer = RunWriter(self.out)
            writer.open(keep_until_round=st.round if resuming else None)
        for cb in self.callbacks:
            cb.on_start(cfg, fed, st.round)
        t0 = time.perf_counter()
        try:
            with _writing(self.out):
                for t in range(st.round, cfg.rounds):
                    self._round(t, st, writer)
            summary = self._summary(st, status="completed", seconds=time.perf_counter() - t0)
        except (MmflError, KeyboardInterrupt) as e:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            failed = self._summary(st, status=status, seconds=time.perf_counter() - t0)
            failed["error"] = str(e) or type(e).__name__
            with contextlib.suppress(OSError):
                write_json(self.out / "summary.json", failed)
            raise
        finally:
            writer.close()
        with _writing(self.out):
            write_json(self.out / "summary.json", summary)
        for cb in self.callbacks:
            cb.on_end(summary)
        return summary

    def _signals(self, t: int, st: _State, state: RoundState) -> tuple[RoundState, dict]:
        """Gather what the sampler asked for (ALGORITHMS.md section 5): local-loss probes
        (LVR), a full-computation pass that trains every eligible pair (GVR, StaleVR), and the
        stale-update quantities; then the aggregator's beta. Returns the state and the extras
        (``full``: the full pass's TrainOutput, ``probes``, ``full_pairs`` counts)."""
        req = self.allocator.requires_at(t)
        pop = state.population
        lr = self._task_lr
        sig: dict[str, np.ndarray] = {}
        extra = {"full": None, "probes": 0, "full_pairs": 0, "probe_pairs": None,
                 "probe_set": None, "missing": 0, "notes": []}
        if "local_loss" in req:
            clients, tasks = _pairs_of(self.allocator.probe_pairs(state))
            loss = np.full(pop.n_samples.shape, np.nan)
            probed = np.asarray(self.engine.probe_losses(st.params, clients, tasks), np.float64)
            lost = ~np.isfinite(probed)  # a distributed engine's node did not answer
            if lost.any():
                state = _offline(state, clients[lost])
                extra["missing"] += int(lost.sum())
                extra["notes"].append(f"{int(lost.sum())} loss probes missing (clients offline "
                                      "this round)")
            loss[clients[~lost], tasks[~lost]] = probed[~lost]
            sig["local_loss"] = loss
            extra["probes"] = len(clients)
            extra["probe_pairs"] = (clients, tasks)
        if "updates" in req:
            clients, tasks = _pairs_of(state.eligible)
            full = self._train(st, clients, tasks, t)
            lost = ~_answered(clients, tasks, full, pop.num_clients)
            if lost.any():  # no update from these pairs: their clients sit this round out
                state = _offline(state, clients[lost])
                extra["missing"] += int(lost.sum())
                extra["notes"].append(f"{int(lost.sum())} pairs missing from the full "
                                      "computation (clients offline this round)")
            sig["update_norm"] = _update_norms(full, pop.n_samples.shape, lr)
            if self.store is not None:
                sig["stale_dot"] = self._stale_dots(full)
            extra["full"], extra["full_pairs"] = full, len(clients)
        if "probe" in req:  # a random probe set trains first; its updates G~ are kept
            clients, tasks = self.allocator.probe_set(state, stream(self.cfg.seed, "probe", t))
            probe = self._train(st, clients, tasks, t)
            for s in probe.updates:
                self.probe_store.put(s, *probe.pair_updates(s))
            sig["probe_norm_sq"] = self.probe_store.norm_sq / lr[None, :] ** 2
            sig["probe_dot"] = self._probe_dots()
            extra["probe_set"] = probe
        if self.store is not None:
            sig["stale_norm_sq"] = self.store.norm_sq / lr[None, :] ** 2
        state = dataclasses.replace(state, signals=Signals(**sig))
        beta = self.aggregator.beta(state)
        if beta is not None:
            state = dataclasses.replace(state, signals=dataclasses.replace(state.signals, beta=beta))
        return state, extra

    def _clock(self, out, extra) -> tuple[float, np.ndarray]:
        """Simulated duration of the round and the active pairs past the deadline
        (:mod:`mmfl.core.system`). Loss probes and a full computation form a first phase that
        every measured pair finishes before sampling; the active pairs' training is the second
        (with a full computation it already happened in the first, and the deadline applies
        there)."""
        n = self.federation.population.n_samples
        epochs = np.array([t.local_epochs for t in self.cfg.tasks])
        F, dl = self.cfg.system.flops_per_second, self.cfg.system.deadline
        args = (self._flops, self._model_bytes, F)

        def seconds(clients, tasks, train, probe):
            return pair_seconds(self.profile, clients, tasks, train, probe, *args)

        first = 0.0
        if extra["probe_pairs"] is not None:
            c, s = extra["probe_pairs"]
            first = float(seconds(c, s, np.zeros(len(c)), n[c, s]).max(initial=0.0))
        if extra["probe_set"] is not None:  # the probe set trains before sampling
            c, s = extra["probe_set"].clients, extra["probe_set"].tasks
            first = max(first, float(seconds(c, s, epochs[s] * n[c, s],
                                             np.zeros(len(c))).max(initial=0.0)))
        full = extra["full"]
        if full is not None:
            secs = seconds(full.clients, full.tasks, epochs[full.tasks] * n[full.clients, full.tasks],
                           np.zeros(len(full.clients)))
            duration, on_time = round_clock(secs, dl)
            width = n.shape[0]
            keys = full.tasks * width + full.clients
            late_keys = set(keys[~on_time].tolist())
            late = np.array([k in late_keys for k in (out.tasks * width + out.clients).tolist()],
                            dtype=bool)
            return first + duration, late
        secs = seconds(out.clients, out.tasks, epochs[out.tasks] * n[out.clients, out.tasks],
                       np.zeros(len(out.clients)))
        duration, on_time = round_clock(secs, dl)
        return first + duration, ~on_time

    def _observed(self, state: RoundState, out) -> RoundState:
        """``state`` with ``signals.update_norm`` (||G|| / eta_s) of the trained pairs of
        ``out`` added where the round had no full computation (for ``Allocator.observe``)."""
        if state.signals.update_norm is not None:
            return state
        norm = _update_norms(out, self.federation.population.n_samples.shape, self._task_lr)
        sig = dataclasses.replace(state.signals, update_norm=norm)
        return dataclasses.replace(state, signals=sig)

    def _probe_dots(self, chunk: int = 16) -> np.ndarray:
        """(N, S) <G~, h> / eta_s^2 of every pair with both a probe update and a stored h (0
        elsewhere), a few clients' rows at a time."""
        pop = self.federation.population
        dot = np.zeros(pop.n_samples.shape)
        for s in range(pop.num_tasks):
            both = np.flatnonzero(self.probe_store.stored[:, s] & self.store.stored[:, s])
            for a in range(0, len(both), chunk):
                c = both[a:a + chunk]
                dot[c, s] = self.store.dots(s, c, self.probe_store.get(s, c))
            dot[:, s] /= self._task_lr[s] ** 2
        return dot

    def _stale_dots(self, out) -> np.ndarray:
        """(N, S) <G, h> / eta_s^2 for the pairs of ``out`` (NaN elsewhere), h as stored now."""
        dot = np.full(self.federation.population.n_samples.shape, np.nan)
        for s in out.updates:
            clients, g = out.pair_updates(s)
            dot[clients, s] = self.store.dots(s, clients, g) / self._task_lr[s] ** 2
        return dot

    def _round(self, t: int, st: _State, writer: RunWriter) -> None:
        cfg, pop = self.cfg, self.federation.population
        t_start = time.perf_counter()
        available = self._availability(t)
        if self.allocator.needs_fresh_task_losses and t > 0 and (
                not st.history or st.history[-1][0] != t):  # round t-1 was not evaluated
            st.task_accuracies, st.task_losses = self.engine.evaluate(st.params)
        state = RoundState(t, pop, float(self.federation.budget), available, None,
                           st.task_losses, st.task_accuracies,
                           task_active=self._task_active(t))
        state, extra = self._signals(t, st, state)
        assignment = self.allocator.allocate(state, stream(cfg.seed, "allocate", t))
        clients, tasks = assignment.pairs()
        if extra["full"] is not None:
            full = extra["full"]
            width = pop.num_clients
            out = full.subset(np.isin(full.tasks * width + full.clients, tasks * width + clients))
        else:
            out = self._train(st, clients, tasks, t)
        trained_assignment = assignment
        lost = ~_answered(clients, tasks, out, pop.num_clients)
        missing = int(lost.sum()) + extra["missing"]
        notes = list(extra["notes"])
        if lost.any():
            # no reply (a node failed or timed out): dropped exactly like stragglers, so the
            # aggregation only sees the pairs that answered (biased unless failures are
            # independent of the updates)
            notes.append(f"{int(lost.sum())} pairs missing (no reply)")
            assignment = assignment.without_pairs(clients[lost], tasks[lost])
        if notes:
            assignment = dataclasses.replace(
                assignment, note="; ".join(x for x in (assignment.note, *notes) if x))
        sim_seconds, late = self._clock(out, extra)
        trained_out = out
        if late.any():  # stragglers past the deadline: their updates are lost
            assignment = assignment.without_pairs(out.clients[late], out.tasks[late],
                                                  note=f"{int(late.sum())} stragglers dropped")
            out = out.subset(~late)
        st.sim_time += sim_seconds
        if self.store is not None and extra["full"] is None:  # <G, h_old> of the active pairs
            post = dataclasses.replace(state.signals, stale_dot=self._stale_dots(out))
            state = dataclasses.replace(state, signals=post)
        plan = dataclasses.replace(self.aggregator.plan(assignment, state), server_lr=cfg.server_lr)
        if self.allocator.observes:
            self.allocator.observe(plan.client, plan.task, self._observed(state, out))
        st.params = self.engine.apply(st.params, out, plan, self.store)
        if self.store is not None:
            for s in out.updates:
                self.store.put(s, *out.pair_updates(s))
        if self.controls is not None:  # SCAFFOLD option II, c_s += sum d Delta c_i
            self.controls.update(out, self._task_lr, pop.data_weight)
        t_train = time.perf_counter()

        last = t + 1 == cfg.rounds
        acc = loss = None
        if (t + 1) % cfg.eval_every == 0 or last or t >= cfg.rounds - cfg.eval_last:
            acc, loss = self.engine.evaluate(st.params)
            st.task_accuracies, st.task_losses = acc, loss
            st.history.append((t + 1, acc, loss))
            st.history_time.append(st.sim_time)
        t_eval = time.perf_counter()

        probe = extra["probe_set"]
        cost = round_cost(trained_assignment, full_computation=extra["full_pairs"],
                          probes=extra["probes"],
                          probe_trainings=0 if probe is None else len(probe.clients))
        # stragglers and missing pairs were asked to train but their uploads never arrived
        cost = dataclasses.replace(
            cost, model_uploads=cost.model_uploads - int(late.sum()) - int(lost.sum()))
        if self.controls is not None:  # SCAFFOLD uploads G and Delta c: two vectors per pair
            cost = dataclasses.replace(cost, model_uploads=2 * cost.model_uploads)
        st.cost = st.cost + cost
        trained = extra["full"] if extra["full"] is not None else trained_out
        steps = int(trained.steps.sum()) + (0 if probe is None else int(probe.steps.sum()))
        st.local_steps += steps
        S = pop.num_tasks
        slots = trained_assignment.slots_per_task(S)
        rows = []
        for s, name in enumerate(pop.task_names):
            sel = out.tasks == s
            trained_s = trained.tasks == s
            rows.append({
                "round": t + 1, "task": name,
                "accuracy": None if acc is None else acc[s],
                "loss": None if loss is None else loss[s],
                "clients": int(sel.sum()), "slots": int(slots[s]),
                "local_trainings": int(trained_s.sum()),
                "local_steps": int(trained.steps[trained_s].sum()),
                "train_loss": float(out.train_loss[sel].mean()) if sel.any() else None,
            })
        writer.append("metrics.csv", rows)
        fair = fairness_stats(acc) if acc is not None else {}
        writer.append("rounds.csv", [{
            "round": t + 1, "available": int(np.sum(state.available)),  # minus silent nodes
            "budget": self.federation.budget,
            "expected_slots": assignment.expected_slots, "slots": trained_assignment.num_slots,
            **cost.as_dict(), "local_steps": steps,
            "stale_bytes": self._state_bytes(),
            "sim_seconds": sim_seconds, "sim_time": st.sim_time,
            "stragglers": int(late.sum()), "missing": missing,
            "mean_accuracy": fair.get("mean"), "min_accuracy": fair.get("min"),
            "max_min": fair.get("max_min"), "variance": fair.get("variance"),
            "note": assignment.note,
        }])
        t_end = time.perf_counter()
        writer.append("timing.csv", [{
            "round": t + 1, "train_seconds": t_train - t_start, "eval_seconds": t_eval - t_train,
            "round_seconds": t_end - t_start,
        }])
        writer.flush()
        st.round = t + 1
        if st.round % cfg.checkpoint_every == 0 or last:
            self._save(st)
        if acc is not None and not last:
            write_json(self.out / "summary.json",
                       self._summary(st, status="running", seconds=None))
        record = RoundRecord(t + 1, cfg.rounds, pop.task_names, acc, loss,
                             assignment.num_slots, t_end - t_start)
        for cb in self.callbacks:
            cb.on_round(record)

    def _time_to_accuracy(self, st: _State) -> dict[str, dict[str, dict[str, float] | None]]:
        """task -> target -> first evaluated {round, sim_time} with accuracy >= target (None if
        never), for the absolute targets :data:`TARGETS`."""
        out: dict[str, dict[str, dict[str, float] | None]] = {}
        for s, name in enumerate(self.federation.population.task_names):
            out[name] = {}
            for target in TARGETS:
                hit = next(((r, tm) for (r, a, _), tm in zip(st.history, st.history_time)
                            if a[s] >= target), None)
                out[name][f"{target:g}"] = (None if hit is None
                                            else {"round": hit[0], "sim_time": hit[1]})
        return out

    def _summary(self, st: _State, *, status: str, seconds: float | None) -> dict[str, Any]:
        pop = self.federation.population
        cfg = self.cfg
        summary: dict[str, Any] = {
            "name": cfg.name, "status": status, "rounds_completed": st.round,
            "rounds": cfg.rounds, "seed": cfg.seed, "sampler": cfg.sampler.name,
            "aggregator": self.aggregator_name, "engine": cfg.engine,
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
                     "stale_memory_bytes": self._state_bytes()},
            "sim_time": st.sim_time,
            "time_to_accuracy": self._time_to_accuracy(st),
            "budget": self.federation.budget, "clients": pop.num_clients,
            "processors": pop.num_processors,
        })
        if seconds is not None:
            summary["wall_seconds"] = round(seconds, 3)
        return summary


#: Accuracy targets of ``summary.json``'s ``time_to_accuracy`` (absolute test accuracy).
TARGETS = (0.5, 0.6, 0.7, 0.8, 0.9)


def _answered(clients: np.ndarray, tasks: np.ndarray, out, width: int) -> np.ndarray:
    """(U,) bool: which requested (client, task) pairs have an update in ``out`` (a
    TrainOutput); all of them for a local engine."""
    if len(out.clients) == len(clients):
        return np.ones(len(clients), dtype=bool)
    return np.isin(np.asarray(tasks) * width + np.asarray(clients),
                   out.tasks * width + out.clients)


def _offline(state: RoundState, clients: np.ndarray) -> RoundState:
    """``state`` with ``clients`` marked unavailable (their node did not answer a
    measurement this round, so the sampler must not choose them)."""
    available = np.array(state.available, dtype=bool)
    available[np.asarray(clients, np.int64)] = False
    return dataclasses.replace(state, available=available)


def _update_norms(out, shape: tuple[int, int], lr: np.ndarray) -> np.ndarray:
    """(N, S) ||G_{i,s}|| / eta_s for the pairs of the TrainOutput ``out`` (NaN elsewhere)."""
    norm = np.full(shape, np.nan)
    for s, g in out.updates.items():
        g_norm = torch.linalg.vector_norm(g, dim=1, dtype=torch.float64)  # no float64 copy
        norm[out.clients[out.tasks == s], s] = g_norm.numpy() / lr[s]
    return norm


def _pairs_of(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(clients, tasks) of the True entries of an (N, S) mask, sorted by (task, client)."""
    tasks, clients = np.nonzero(np.asarray(mask).T)
    return clients.astype(np.int64), tasks.astype(np.int64)


def federation_info(fed: Federation) -> dict[str, Any]:
    """JSON-able description of the federation (also printed by ``mmfl describe``)."""
    pop = fed.population
    return {
        "clients": pop.num_clients, "processors": pop.num_processors, "budget": fed.budget,
        "tasks": list(pop.task_names),
        "capacity": pop.capacity.tolist(),
        "n_samples": pop.n_samples.tolist(),
    }


def run(cfg: ExperimentConfig, out: str | Path, *, resume: bool = False,
        data_dir: str | None = None, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Run ``cfg`` into the run directory ``out``; returns the summary dict.

    ``resume=True`` continues from the directory's last checkpoint (or starts afresh if there
    is none); the final metrics equal those of an uninterrupted run.
    """
    return Runner(cfg, out, data_dir=data_dir, callbacks=callbacks).run(resume=resume)
