"""Engine ``flower`` of ``mmfl run``: the mmfl Flower apps under Flower's simulation engine.

:func:`host_run` is what :class:`~mmfl.experiment.runner.Runner` calls for ``engine =
"flower"``:

1. build the federation and write one shard per client into a temporary folder
   (:func:`mmfl.flower.shards.write_shards`, without the data of refused pairs:
   :func:`~mmfl.flower.shards.shard_federation`; removed at the end) with their fingerprints
   (:func:`~mmfl.flower.shards.write_identity`): the ClientApps, which run in Ray worker
   processes, read their client's data from there, like a SuperNode in deployment reads its
   ``data-file``, and the server checks their claims as in deployment;
2. ``flwr.simulation.run_simulation`` with one virtual SuperNode per mmfl client
   (``partition-id`` i = client i), the Ray backend limited to ``flower.ray_cpus`` CPUs and one
   CPU (one torch/OpenMP thread) per ClientApp;
3. its ServerApp runs the same Runner with a :class:`~mmfl.flower.server.FlowerEngine` on the
   simulation's grid, writing the usual run directory; an exception in it is re-raised here
   (``run_simulation`` itself would only log it). When the caller is interrupted (Ctrl-C
   reaches ``run_simulation`` in the calling thread), the engine is told to stop: the runner
   records the run as interrupted (resumable with ``--resume``) and the ServerApp's thread ends.
   Ray's processes run inside :func:`mmfl.supervisor.supervised`: none of them outlives this
   process, even when it is killed with SIGKILL.

``run_simulation`` gives an empty run config, so the settings travel in the ServerApp's closure
and the shard folder in every message (``shard-dir``).

Models of one's own (``mmfl.register("model", ...)`` in the calling process) reach the Ray
workers with the ClientApp (:class:`UserModels`): pickled with Ray's cloudpickle, so a model
defined in the running script (``__main__``) travels by value and one defined in a module by
reference (a module that the workers cannot import is loaded from its file, as for a sweep's
workers, :func:`mmfl.experiment.sweep.restore_registrations`).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import tempfile
import threading
from typing import Any

from flwr.clientapp import ClientApp

from mmfl.experiment.federation import build_federation
from mmfl.flower.identity import REJECTED
from mmfl.flower.server import FlowerError, FlowerSettings, engine_factory
from mmfl.flower.shards import shard_federation, write_identity, write_shards
from mmfl.supervisor import ONE_THREAD, environment, supervised

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _stop_on_sigint(stop: threading.Event):
    """Ctrl-C also sets ``stop``, so the ServerApp's thread ends the run (recorded as
    interrupted; the runner re-raises KeyboardInterrupt there) even when Flower's or Ray's code
    in the main thread swallows the KeyboardInterrupt. Only where Python's default handler is
    in place (the main thread of ``mmfl run``; sweep workers ignore SIGINT on purpose)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return

    def on_sigint(signum, frame):
        stop.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)

#: Seconds an interrupted host waits for the ServerApp's thread to record the interruption.
STOP_WAIT = 60.0

#: Environment of the Ray workers (inherited from this process while the simulation runs).
WORKER_ENV = {**ONE_THREAD,
              "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "RAY_DEDUP_LOGS": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


class UserModels(ClientApp):
    """``app`` that first registers the models of one's own that the run's tasks use, in the
    Ray worker that runs it (once per process; :func:`model_registrations`)."""

    def __init__(self, app: ClientApp, items: list):
        super().__init__()
        self.app, self.items = app, items

    def __call__(self, message, context):
        from mmfl.errors import ConfigError
        from mmfl.experiment.sweep import restore_registrations

        key = tuple(name for _, name, *_ in self.items)
        if key not in _RESTORED:
            _RESTORED[key] = "; ".join(restore_registrations(self.items).values())
        if _RESTORED[key]:
            raise ConfigError("engine", f"a Flower ClientApp cannot build {_RESTORED[key]}",
                              "flower", show_got=False)
        return self.app(message=message, context=context)


#: the registrations a worker process restored (model names -> failures, "" = none)
_RESTORED: dict[tuple, str] = {}


def model_registrations(cfg) -> list:
    """The models of one's own (registered outside mmfl) that ``cfg``'s tasks use, as the
    items of :func:`mmfl.experiment.sweep.restore_registrations`: (kind, name, module, its
    file, the pickled (Entry, class OPTIONS)), pickled with Ray's cloudpickle (by value for
    ``__main__``)."""
    from ray import cloudpickle

    from mmfl import registry

    out = []
    for name in dict.fromkeys(t.model for t in cfg.tasks):
        entry = registry.get("model", name)
        if entry.builtin:
            continue
        module = getattr(entry.obj, "__module__", None) or ""
        file = getattr(sys.modules.get(module), "__file__", None)
        options = entry.obj.__dict__.get("OPTIONS") if isinstance(entry.obj, type) else None
        out.append(("model", name, module, file, cloudpickle.dumps((entry, options))))
    return out


@contextlib.contextmanager
def _quiet(verbose: bool):
    """Flower's and Ray's log only with ``verbose`` (errors always; the engine logs its own
    warnings about missing replies)."""
    names = ("flwr", "ray")
    before = {n: logging.getLogger(n).level for n in names}
    if not verbose:
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in before.items():
            logging.getLogger(n).setLevel(level)


def backend_config(ray_cpus: int) -> dict[str, Any]:
    """Ray backend: ``ray_cpus`` CPUs in all, one per ClientApp, no GPU, no worker logs."""
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": int(ray_cpus), "num_gpus": 0, "log_to_driver": False}}


def host_run(runner, *, resume: bool = False, client_app=None,
             verbose: bool | None = None) -> dict[str, Any]:
    """Run ``runner``'s experiment with engine ``flower`` under Flower's simulation engine;
    returns the summary (the run directory is written as by any engine).

    ``client_app`` replaces :data:`mmfl.flower.client.client_app` (tests inject faults this
    way); ``verbose`` shows Flower's logs (default: when mmfl logs at DEBUG, ``mmfl -v``).
    """
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from mmfl.experiment.rundir import check_out_dir
    from mmfl.experiment.runner import Runner

    if client_app is None:
        from mmfl.flower.client import client_app
    if items := model_registrations(runner.cfg):
        client_app = UserModels(client_app, items)
    if verbose is None:
        verbose = logging.getLogger("mmfl").isEnabledFor(logging.DEBUG)
    cfg = runner.cfg
    n = cfg.clients.count
    result: dict[str, Any] = {}
    stop, done = threading.Event(), threading.Event()
    check_out_dir(cfg, runner.out, resume=resume)  # input errors before Ray starts
    federation = build_federation(cfg, runner.data_dir)
    with tempfile.TemporaryDirectory(prefix="mmfl-shards-") as shard_dir:
        identity = f"{shard_dir}/identity.json"
        write_identity(write_shards(shard_federation(cfg, federation), shard_dir), identity)
        settings = FlowerSettings.from_config(
            cfg, nodes=n, shard_dir=shard_dir, identity_file=identity,
            rejected_file=str(runner.out / "flower" / REJECTED))
        app = ServerApp()

        @app.main()
        def main(grid: Grid, context: Context) -> None:
            hosted = Runner(cfg, runner.out, data_dir=runner.data_dir, callbacks=runner.callbacks,
                            engine_factory=engine_factory(grid, cfg, settings, stop),
                            federation=federation)
            try:
                result["summary"] = hosted.run(resume=resume)
            except BaseException as e:  # noqa: BLE001 - re-raised below; Flower would only log it
                result["error"] = e
            finally:
                done.set()

        log.info("flower: starting Flower's simulation engine (Ray, %d CPUs) with %d virtual "
                 "SuperNodes; their first answers wait for Ray to start", cfg.flower.ray_cpus, n)
        with supervised(), environment(WORKER_ENV), _quiet(verbose), _stop_on_sigint(stop):
            try:
                run_simulation(server_app=app, client_app=client_app, num_supernodes=n,
                               backend_name="ray",
                               backend_config=backend_config(cfg.flower.ray_cpus),
                               verbose_logging=verbose)
            except BaseException:  # Ctrl-C: stop the ServerApp's thread, then re-raise
                stop.set()
                done.wait(STOP_WAIT)
                raise
    if "error" in result:
        raise result["error"]
    if "summary" not in result:
        raise FlowerError("Flower's simulation ended without running the experiment (rerun "
                          "with -v to see Flower's log)")
    return result["summary"]
