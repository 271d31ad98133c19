"""The round loop: who is available -> signals -> allocate -> train -> aggregate and apply ->
evaluate -> record (docs/algorithms.md section 1). One loop drives every engine; per round t
(0-based; files count completed rounds, t + 1):

1. ``RoundState`` (population, budget m, availability: :mod:`.environment`) and the signals
   the sampler requires (:mod:`.signals`);
2. the round's slots (:mod:`.allocation`: the sampler's draw or a replayed one, less declines);
3. ``engine.train`` on the unique active (client, task) pairs -> updates G; missing pairs,
   stragglers and updates the server's check rejects (:mod:`.update_check`) are dropped
   (:func:`.allocation.received`) and counted in rounds.csv;
4. ``aggregator.plan`` -> coefficients -> new global models (:mod:`.server_optimizer`), which
   must be finite; stale updates and control variates are updated from the round's G;
5. evaluation (``eval_every``, ``eval_last``, the last round); a RoundRecord to the recorder
   and the callbacks (:mod:`.recording`); checkpoints (:mod:`.rundir`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mmfl import registry
from mmfl.errors import MmflError
from mmfl.experiment import tomlio
from mmfl.experiment.allocation import RoundDraw, build_sampler, received
from mmfl.experiment.config import ExperimentConfig, resolve_data_dir
from mmfl.experiment.environment import Environment
from mmfl.experiment.federation import Federation, build_federation, check_engine_support
from mmfl.experiment.recording import (Callback, Recorder, RoundRecord, count_cost, summarize,
                                       task_rounds)
from mmfl.experiment.results import CONFIG, FEDERATION, write_json
from mmfl.experiment.rundir import (CHECKPOINT, Checkpointer, RunState, check_out_dir,
                                    config_fingerprint, federation_info, legacy_fingerprints,
                                    writing)
from mmfl.experiment.signals import Measurements, PairStores, SignalGatherer, answered
from mmfl.experiment.preferences import Preferences
from mmfl.experiment.profile import build_profile
from mmfl.experiment.runlock import RunLock, remove_leftovers
from mmfl.experiment.server_optimizer import build_server_optimizer
from mmfl.experiment.trained import drop_kept_after, write_models
from mmfl.experiment.update_check import UpdateCheck, check_losses, check_models
from mmfl.types import Assignment, RoundState

__all__ = ["CHECKPOINT", "Callback", "RoundRecord", "Runner", "check_out_dir", "run"]

log = logging.getLogger(__name__)


class Runner:
    """Runs one experiment into one run directory. Use :func:`run` for the common case."""

    def __init__(self, cfg: ExperimentConfig, out: str | Path, *, data_dir: str | None = None,
                 callbacks: Sequence[Callback] = (),
                 engine_factory: Callable[[Federation], Any] | None = None,
                 federation: Federation | None = None):
        """``engine_factory(federation) -> Engine`` replaces the registry's construction of
        ``cfg.engine`` (e.g. an engine bound to a Flower grid inside a ServerApp); ``federation``
        a federation already built from ``cfg`` (a host that built it once). Without a factory,
        an engine class that defines ``host_run(runner, *, resume)`` (engine ``flower``) hosts
        the run: :meth:`run` hands it over, and the host runs a runner of its own with a
        factory and the federation it built."""
        self.cfg = cfg
        self.out = Path(out)
        self.data_dir = resolve_data_dir(cfg, data_dir)
        self.callbacks = list(callbacks)
        if cfg.logging.tensorboard:  # [logging]: TensorBoard event files of the rounds
            from mmfl.experiment.tensorboard import TensorBoardCallback

            self.callbacks.append(TensorBoardCallback(cfg.logging.tensorboard))
        self.engine_factory = engine_factory
        self.prebuilt = federation

    def _build(self) -> None:
        """Federation, sampler, aggregator, engine and the run's helpers, from the config."""
        cfg = self.cfg
        fed = self.prebuilt or build_federation(cfg, self.data_dir)
        # clients.preferences: refused pairs hold no data for the samplers and the weights d
        self.preferences = Preferences.from_config(cfg, fed.population)
        self.federation = fed = self.preferences.restrict(fed)
        pop = fed.population
        self.allocator, self.aggregator, self.aggregator_name = build_sampler(cfg, pop)
        self.draw = RoundDraw.from_config(cfg, self.allocator, pop, self.preferences)
        if self.engine_factory is not None:
            self.engine = self.engine_factory(fed)
        else:
            eng = registry.get("engine", cfg.engine, key="engine")
            # device only when it is not the CPU (an engine of one's own may not take it)
            where = {} if cfg.device == "cpu" else {"device": cfg.device}
            self.engine = eng.obj(fed, seed=cfg.seed, threads=cfg.threads, **where)
        self._task_lr = np.array([t.lr for t in cfg.tasks], dtype=np.float64)
        self.env = Environment(cfg, pop, build_profile(cfg),
                               np.array(self.engine.flops_per_sample()),
                               4.0 * np.array(self.engine.num_parameters()))
        self.server_optimizer = build_server_optimizer(cfg.server_optimizer,
                                                       self.engine.num_parameters())
        buffered = [s for s in range(pop.num_tasks)  # their buffers join the checkpoint
                    if getattr(self.engine, "has_buffers", lambda s: False)(s)]
        check_engine_support(cfg, fed)
        self.check = UpdateCheck(cfg.update_check, pop.task_names)
        self.stores = PairStores(pop, self.engine.num_parameters(),
                                 needs_stale=self.aggregator.uses_stale,
                                 requires=self.allocator.requires, dtype=cfg.stale_dtype,
                                 root=self.out if cfg.stale_on_disk else None, check=self.check)
        self.signals = SignalGatherer(self.engine, self.allocator, self.aggregator, self.stores,
                                      self._task_lr, cfg.seed)
        self.checkpointer = Checkpointer(
            self.out, config_fingerprint(cfg, self.data_dir),
            [("allocator", self.allocator), ("aggregator", self.aggregator),
             *self.stores.stateful(),
             *([("server_optimizer", self.server_optimizer)] if self.server_optimizer else []),
             *([("engine", self.engine)] if buffered else [])],
            accepted=tuple(legacy_fingerprints(cfg, self.data_dir, self.out)))
        self.recorder = Recorder(self.out, lambda: self._summary("running", None))

    def run(self, *, resume: bool = False) -> dict[str, Any]:
        """Run (or continue) the experiment; returns the summary (also in summary.json)."""
        cfg = self.cfg
        if self.engine_factory is None:
            host = getattr(registry.get("engine", cfg.engine, key="engine").obj, "host_run", None)
            if host is not None:
                return host(self, resume=resume)
        check_out_dir(cfg, self.out, resume=resume)
        self._build()  # data and model errors surface before anything is written
        with writing(self.out):
            lock = RunLock(self.out).acquire()
        try:
            return self._run_locked(resume)
        finally:
            lock.release()
            if hasattr(self.engine, "close"):
                self.engine.close()

    def _run_locked(self, resume: bool) -> dict[str, Any]:
        cfg = self.cfg
        # checked again under the lock: another run may have written here in the meantime
        resuming = check_out_dir(cfg, self.out, resume=resume)
        self.state = st = RunState(params=self.engine.init_params())
        with writing(self.out):
            remove_leftovers(self.out)
            (self.out / CONFIG).write_text(tomlio.dumps(cfg.to_dict()), encoding="utf-8")
            write_json(self.out / FEDERATION, federation_info(self.federation))
            if resuming:
                self.recorder.restore = self.checkpointer.load(st)
                drop_kept_after(self.out, st.round)  # redone rounds write theirs again
                log.info("resuming %s after round %d", self.out, st.round)
            self.recorder.on_start(cfg, self.federation, st.round)
        for cb in self.callbacks:
            cb.on_start(cfg, self.federation, st.round)
        t0 = time.perf_counter()
        try:
            with writing(self.out):
                for t in range(st.round, cfg.rounds):
                    self._round(t, st)
                if hasattr(self.engine, "models"):  # the trained models back (.trained)
                    write_models(self.out, self.federation, self.engine, st.params, st.round)
            summary = self._summary("completed", time.perf_counter() - t0)
        except (MmflError, KeyboardInterrupt) as e:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            failed = self._summary(status, time.perf_counter() - t0)
            failed["error"] = str(e) or type(e).__name__
            with contextlib.suppress(OSError):
                self.recorder.on_end(failed)
            raise
        finally:
            self.recorder.close()
        with writing(self.out):
            self.recorder.on_end(summary)
        for cb in self.callbacks:
            cb.on_end(summary)
        return summary

    def _round(self, t: int, st: RunState) -> None:
        cfg, pop = self.cfg, self.federation.population
        t_start = time.perf_counter()
        # -- who is available, and what the sampler knows -----------------------------------
        if self.allocator.needs_fresh_task_losses and t > 0 and not st.evaluated_after(t):
            st.task_accuracies, st.task_losses = self.engine.evaluate(st.params)
        state = RoundState(t, pop, float(self.federation.budget), self.env.available(t),
                           st.task_losses, st.task_accuracies, task_active=self.env.task_active(t))
        # -- signals ------------------------------------------------------------------------
        state, measured = self.signals.gather(t, st.params, state)
        # -- allocate -----------------------------------------------------------------------
        asked, declined, bids = self.draw(t, state)
        # -- train (stragglers past the deadline and missing pairs are dropped) --------------
        trained, lost = self._train(t, st, asked, measured)
        sim_seconds, late = self.env.clock(trained, measured)
        st.sim_time += sim_seconds
        checked = self.check.take_round(t)
        assignment, out = received(asked, trained, lost, late, (
            *measured.notes, *checked.notes(pop.task_names)))
        # -- aggregate and apply ------------------------------------------------------------
        state = self.signals.after_training(state, out, measured)
        self._aggregate(st, state, assignment, out)
        t_train = time.perf_counter()
        # -- evaluate -----------------------------------------------------------------------
        acc = loss = None
        if (t + 1) % cfg.eval_every == 0 or t + 1 == cfg.rounds or t >= cfg.rounds - cfg.eval_last:
            acc, loss = self.engine.evaluate(st.params)
            check_losses(loss, pop.task_names, t)
            st.evaluated(t + 1, acc, loss)
        t_eval = time.perf_counter()
        # -- record -------------------------------------------------------------------------
        record = self._record(t, st, state, asked, assignment, trained, out, measured,
                              (sim_seconds, int(late.sum()), int(lost.sum()), declined, bids),
                              (acc, loss),
                              (t_start, t_train, t_eval))
        self.recorder.on_round(record)
        keep = cfg.logging.keep_models  # weights after every k-th round (.trained)
        if keep and st.round % keep == 0 and hasattr(self.engine, "models"):
            write_models(self.out, self.federation, self.engine, st.params, st.round, kept=True)
        if st.round % cfg.checkpoint_every == 0 or st.round == cfg.rounds:
            self.checkpointer.save(st, tables=self.recorder.writer.snapshot(),
                                   final=st.round == cfg.rounds)
        for cb in self.callbacks:
            cb.on_round(record)

    def _aggregate(self, st: RunState, state: RoundState, assignment: Assignment, out) -> None:
        """Plan the aggregation (docs/algorithms.md sections 3 and 6), let the aggregator and
        the sampler observe it, apply it to the global models and update the per-pair stores."""
        plan = dataclasses.replace(self.aggregator.plan(assignment, state),
                                   server_lr=self.cfg.server_lr)
        if self.aggregator.observes:
            self.aggregator.observe(plan.client, plan.task, state)
        if self.allocator.observes:
            self.allocator.observe(plan.client, plan.task, self.signals.observed(state, out))
        if self.server_optimizer is None:
            st.params = self.engine.apply(st.params, out, plan, self.stores.stale)
        else:
            aggregates = self.engine.aggregate(len(st.params), out, plan, self.stores.stale)
            st.params = self.server_optimizer.step(st.params, aggregates, plan.server_lr)
        check_models(st.params, self.federation.population.task_names, st.round)
        if out.buffers is not None:  # models with buffers (mmfl.tasks.buffers)
            self.engine.absorb_buffers(out)
        self.stores.absorb(out, self._task_lr, self.federation.population.data_weight)

    def _train(self, t: int, st: RunState, asked: Assignment, measured: Measurements):
        """TrainOutput of the assigned pairs (taken from the full computation when the round
        had one) and the (U,) bool of assigned pairs with no update (missing)."""
        clients, tasks = asked.pairs()
        if measured.full is not None:
            full, width = measured.full, self.federation.population.num_clients
            out = full.subset(np.isin(full.tasks * width + full.clients, tasks * width + clients))
        else:
            out = self.stores.train(self.engine, st.params, clients, tasks, t)
        return out, ~answered(clients, tasks, out, self.federation.population.num_clients)

    def _record(self, t, st, state, asked, assignment, trained, out, measured, drops, evaluation,
                times) -> RoundRecord:
        """The round's :class:`RoundRecord`; adds its cost and steps to ``st``, which then
        counts the round as completed."""
        sim_seconds, late, lost, declined, bids = drops
        acc, loss = evaluation
        cost = count_cost(asked, measured, late=late, lost=lost,
                          control_variates=self.stores.controls is not None)
        cost = dataclasses.replace(cost, declined=declined,
                                   scalar_uploads=cost.scalar_uploads + bids)
        rejected = 0 if trained.rejected is None else int(trained.rejected.sum())
        every = measured.full if measured.full is not None else trained  # every training
        probe = measured.probe_set
        steps = int(every.steps.sum()) + (0 if probe is None else int(probe.steps.sum()))
        st.cost, st.local_steps, st.round = st.cost + cost, st.local_steps + steps, t + 1
        pop = self.federation.population
        return RoundRecord(
            t + 1, self.cfg.rounds, pop.task_names, acc, loss, assignment.num_slots,
            time.perf_counter() - times[0],
            tasks=task_rounds(pop.task_names, acc, loss, out, every,
                              asked.slots_per_task(pop.num_tasks)),
            available=int(np.sum(state.available)), budget=self.federation.budget,
            expected_slots=assignment.expected_slots, slots_assigned=asked.num_slots, cost=cost,
            local_steps=steps, stale_bytes=self.stores.nbytes, sim_seconds=sim_seconds,
            sim_time=st.sim_time, stragglers=late, missing=lost + measured.missing + rejected,
            note=assignment.note, train_seconds=times[1] - times[0],
            eval_seconds=times[2] - times[1])

    def _summary(self, status: str, seconds: float | None) -> dict[str, Any]:
        summary = summarize(self.cfg, self.federation, self.state,
                            aggregator=self.aggregator_name, stale_bytes=self.stores.nbytes,
                            status=status, seconds=seconds)
        if self.preferences.willingness is not None:  # clients.preferences in use
            summary["preferences"] = self.preferences.summary()
        if self.draw.incentives.costs is not None:  # clients.costs in use
            summary["incentives"] = self.draw.incentives.summary()
        return summary


def run(cfg: ExperimentConfig, out: str | Path, *, resume: bool = False,
        data_dir: str | None = None, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Run ``cfg`` into the run directory ``out``; returns the summary dict.

    ``resume=True`` continues from the directory's last checkpoint (or starts afresh if there
    is none); the final metrics equal those of an uninterrupted run.
    """
    return Runner(cfg, out, data_dir=data_dir, callbacks=callbacks).run(resume=resume)
