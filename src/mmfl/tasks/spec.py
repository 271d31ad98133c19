"""The data contract below the engines: what an engine trains from.

A :class:`Federation` is the population (who holds what, processors), the budget m and one
:class:`TaskData` per task: the task's :class:`TrainingSpec` (how its model trains), its dataset
and each client's sample indices. :mod:`mmfl.experiment.federation` builds one from a config;
the Flower ClientApp builds one from a client's shard. Engines read only these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from mmfl.types import Population

__all__ = ["Federation", "TaskData", "TrainingSpec"]


@dataclass(frozen=True)
class TrainingSpec:
    """How one task's model is built and trained locally.

    Attributes:
        name: the task's name (in messages and errors).
        model: model name (registry kind "model") and ``model_options`` its options.
        lr: local SGD learning rate eta_s; ``local_epochs`` E_s; ``batch_size`` B.
        class_mask: "none" | "zero" | "exclude" (local training's treatment of the classes a
            client holds no sample of, :mod:`mmfl.tasks.masking`).
        loss: "auto" | "nll" | "cross_entropy" (:mod:`mmfl.tasks.losses`).
        optimizer: "sgd" | "adam" | "adamw" and ``optimizer_options`` (a missing option takes
            its default), the local optimizer (:mod:`mmfl.tasks.optimizers`).
        buffers: "aggregate" | "local", models with buffers (:mod:`mmfl.tasks.buffers`).
        init_weights: a file of initial weights ("" = the seeded initialisation).
        index: the task's position s (names the config key ``tasks[s]`` in errors).
    """

    name: str
    model: str
    lr: float
    local_epochs: int
    batch_size: int
    model_options: Mapping[str, Any] = field(default_factory=dict)
    class_mask: str = "none"
    index: int = 0
    loss: str = "auto"
    optimizer: str = "sgd"
    optimizer_options: Mapping[str, Any] = field(default_factory=dict)
    buffers: str = "aggregate"
    init_weights: str = ""


@dataclass(frozen=True)
class TaskData:
    """One task's data as the engines see it.

    Attributes:
        spec: how the task's model trains.
        dataset: the (possibly subsampled) dataset; arrays are shared, never copied per client.
        client_indices: entry i is the sorted (n_{i,s},) int64 index array of client i into
            ``dataset.x_train`` (empty when the client does not hold the task); a length-N
            sequence, or a mapping for an engine that serves some clients only.
    """

    spec: TrainingSpec
    dataset: Any
    client_indices: Any


@dataclass(frozen=True)
class Federation:
    """Population (who holds what, processors), budget m and per-task data (S entries)."""

    population: Population
    budget: int
    tasks: tuple[TaskData, ...]

    @property
    def specs(self) -> tuple[TrainingSpec, ...]:
        """(S,) the tasks' training specs."""
        return tuple(t.spec for t in self.tasks)

