"""mmfl: multi-model federated learning with joint client sampling and model allocation.

The public API::

    import mmfl

    cfg = mmfl.load_config("configs/quickstart.toml", overrides=["rounds=5"])
    summary = mmfl.run(cfg, "runs/demo")
    results = mmfl.read_results("runs/demo")
    df = results.to_frame("metrics")                     # pandas (the analysis extra)
    table = mmfl.collect(["runs/sweep"], table="summary")  # many runs, grid keys and seed
    model = mmfl.load_model("runs/demo", "fmnist")       # the trained nn.Module
    x, y = mmfl.load_data("runs/demo", "fmnist")         # its test split, as evaluated

    @mmfl.register("sampler", "mine", options={"alpha": mmfl.Option(float, 1.0, "> 0")})
    class Mine(mmfl.Allocator): ...

Importing :mod:`mmfl` (or :mod:`mmfl.core`) does not import torch; the heavy parts load on use.
"""

from __future__ import annotations

from typing import Any

from mmfl.errors import ConfigError, DataError, MmflError, NumericalError, ResultsError
from mmfl.registry import Option, register

__version__ = "0.1.0"

_LAZY = {
    "load_config": ("mmfl.experiment.config", "load_config"),
    "config_from_dict": ("mmfl.experiment.config", "config_from_dict"),
    "ExperimentConfig": ("mmfl.experiment.config", "ExperimentConfig"),
    "run": ("mmfl.experiment.runner", "run"),
    "build_federation": ("mmfl.experiment.federation", "build_federation"),
    "read_results": ("mmfl.experiment.results", "read_results"),
    "load_model": ("mmfl.experiment.trained", "load_model"),
    "load_data": ("mmfl.experiment.trained", "load_data"),
    "RunResults": ("mmfl.experiment.results", "RunResults"),
    "collect": ("mmfl.experiment.frames", "collect"),
    "plan_sweep": ("mmfl.experiment.sweep", "plan_sweep"),
    "run_sweep": ("mmfl.experiment.sweep", "run_sweep"),
    "write_report": ("mmfl.experiment.report", "write_report"),
    "Allocator": ("mmfl.core.allocators", "Allocator"),
    "Aggregator": ("mmfl.core.aggregation", "Aggregator"),
    "Dataset": ("mmfl.tasks.datasets", "Dataset"),
    "Population": ("mmfl.types", "Population"),
    "RoundState": ("mmfl.types", "RoundState"),
    "Assignment": ("mmfl.types", "Assignment"),
    "AggregationPlan": ("mmfl.types", "AggregationPlan"),
    "Signal": ("mmfl.types", "Signal"),
    "Signals": ("mmfl.types", "Signals"),
    "Callback": ("mmfl.experiment.recording", "Callback"),
    "RoundRecord": ("mmfl.experiment.recording", "RoundRecord"),
    "TaskRound": ("mmfl.experiment.recording", "TaskRound"),
}

__all__ = [
    "ConfigError", "DataError", "MmflError", "NumericalError", "ResultsError", "Option",
    "register", "__version__", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmfl' has no attribute {name!r}")
