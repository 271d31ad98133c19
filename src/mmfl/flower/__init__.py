"""mmfl on Flower (flwr 1.42): engine ``flower`` and the Flower apps it runs on.

Importing this package does not import ``flwr`` (mmfl works without the ``flower`` extra); the
Flower parts live in submodules that need it:

* :mod:`mmfl.flower.server`: ``server_app`` (a ``flwr.serverapp.ServerApp`` that runs a whole
  mmfl experiment; its run config names the experiment file and the run directory) and
  :class:`~mmfl.flower.server.FlowerEngine`, the engine that sends local training to the
  ClientApps through the ServerApp's grid.
* :mod:`mmfl.flower.client`: ``client_app`` (a ``flwr.clientapp.ClientApp`` holding one client's
  data for all of its tasks and training the requested one exactly like engine ``sequential``).
* :mod:`mmfl.flower.shards`: the per-client data files (no flwr needed).
* :mod:`mmfl.flower.simulation`: engine ``flower`` of ``mmfl run``, i.e. the same apps under
  Flower's simulation engine (``flwr.simulation.run_simulation``, Ray backend).
* :mod:`mmfl.flower.local`: ``mmfl flower-local``, a real deployment on this machine, whose
  SuperLink runs through :mod:`mmfl.flower.linkguard` (Control and Runtime APIs for loopback
  peers of the same user only). Its parts: :mod:`~mmfl.flower.processes` (starting and
  stopping every process), :mod:`~mmfl.flower.launch` (their command lines, commands.sh),
  :mod:`~mmfl.flower.flwr_cli` (the ``flwr`` command line), :mod:`~mmfl.flower.follow`
  (reading the run's files while it runs) and :mod:`~mmfl.flower.workdir` (the private
  ``OUT/flower`` folder).

See docs/flower.md ("The flower engine") for the protocol, the options and how faults are
handled, and its "Threat model" for what each deployment mode defends against.
"""

from __future__ import annotations

import importlib.util

from mmfl.errors import ConfigError
from mmfl.registry import register

INSTALL_HINT = "pip install 'mmfl[flower]'"


def require_flwr() -> None:
    """Raise a one-line ConfigError (key ``engine``) when Flower is not installed."""
    if importlib.util.find_spec("flwr") is None:
        raise ConfigError("engine", f"needs Flower, which is not installed; {INSTALL_HINT}",
                          "flower")


@register("engine", "flower")
class FlowerEngineEntry:
    """Flower ClientApps under Flower's simulation engine (Ray); needs the flower extra."""

    def __init__(self, federation, *, seed: int, threads: int | str = 1):
        """Not an engine itself: the engine (:class:`mmfl.flower.server.FlowerEngine`) needs a
        Flower grid, which exists only inside a ServerApp; :meth:`host_run` starts one."""
        require_flwr()
        raise ConfigError("engine", "engine flower runs inside a Flower ServerApp (use mmfl run "
                          "/ mmfl.run, which start Flower's simulation, or mmfl.flower.server."
                          "run_experiment inside your own ServerApp)", "flower")

    @staticmethod
    def host_run(runner, *, resume: bool = False):
        """Run ``runner`` (a :class:`~mmfl.experiment.runner.Runner`) inside a ServerApp under
        Flower's simulation engine; returns the summary."""
        require_flwr()
        from mmfl.flower.simulation import host_run

        return host_run(runner, resume=resume)
