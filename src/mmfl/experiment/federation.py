"""Build the federation of an experiment: processors, task membership, datasets, partitions.

Everything is drawn from streams of the experiment seed, so the same config gives the same
federation on every machine and in every engine (and a resumed run rebuilds it identically).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from mmfl import registry
from mmfl.errors import ConfigError, DataError
from mmfl.experiment.config import ExperimentConfig, TaskConfig, budget_of
from mmfl.rng import MEMBERSHIP, PARTITION, PROCESSORS, SUBSAMPLE, stream
from mmfl.tasks.spec import Federation, TaskData, TrainingSpec
from mmfl.types import Population

__all__ = ["Federation", "TaskData", "authors_processors", "build_federation",
           "check_engine_support", "draw_capacity", "draw_distribution", "load_dataset",
           "membership", "task_dataset", "training_spec"]

log = logging.getLogger(__name__)


def training_spec(task: TaskConfig, index: int) -> TrainingSpec:
    """The engines' view of ``tasks[index]`` of a config."""
    return TrainingSpec(name=task.name, model=task.model, lr=task.lr,
                        local_epochs=task.local_epochs, batch_size=task.batch_size,
                        model_options=dict(task.model_options), class_mask=task.class_mask,
                        index=index, loss=task.loss, optimizer=task.optimizer,
                        optimizer_options=dict(task.optimizer_options), buffers=task.buffers,
                        init_weights=task.init_weights)


def draw_distribution(spec: int | tuple, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size,) int draws of a config distribution: an int (constant) or ((value, prob), ...)."""
    if isinstance(spec, int):
        return np.full(size, spec, dtype=np.int64)
    values = np.array([v for v, _ in spec], dtype=np.int64)
    probs = np.array([p for _, p in spec], dtype=np.float64)
    return rng.choice(values, size=size, p=probs / probs.sum())


def draw_capacity(cfg: ExperimentConfig, member: np.ndarray) -> np.ndarray:
    """(N,) int B_i drawn from ``clients.processors``; with ``"authors"`` by
    :func:`authors_processors` from the tasks each client holds (``member``, (N, S) bool)."""
    rng = stream(cfg.seed, PROCESSORS)
    if cfg.clients.processors == "authors":
        return authors_processors(member.sum(axis=1), cfg.clients.processor_levels, rng)
    return draw_distribution(cfg.clients.processors, cfg.clients.count, rng)


def authors_processors(held: np.ndarray, levels: tuple[float, float, float],
                       rng: np.random.Generator) -> np.ndarray:
    """(N,) int B_i by the authors' ``client_cpu`` rule: client i, holding k_i = ``held[i]``
    tasks, is a straggler (B_i = 1), common (B_i = max(1, k_i // 2)) or expert (B_i = k_i) with
    probabilities ``levels``; B_i >= 1 always."""
    held = np.maximum(np.asarray(held, np.int64), 1)
    choice = rng.choice(3, size=len(held), p=np.asarray(levels) / sum(levels))
    options = np.stack([np.ones_like(held), np.maximum(1, held // 2), held], axis=1)
    return options[np.arange(len(held)), choice]


def membership(cfg: ExperimentConfig) -> np.ndarray:
    """(N, S) bool: which clients hold data for which tasks (``clients.tasks_per_client``)."""
    n, s = cfg.clients.count, len(cfg.tasks)
    spec = cfg.clients.tasks_per_client
    if spec == 0:
        return np.ones((n, s), dtype=bool)
    from mmfl.tasks.partition import task_membership

    spec = spec if isinstance(spec, int) else dict(spec)
    return task_membership(n, s, spec, stream(cfg.seed, MEMBERSHIP))


_DATASETS: dict[tuple, object] = {}
_EMPTY = np.zeros(0, dtype=np.int64)


def load_dataset(task: TaskConfig, data_dir: Path | None, seed: int):
    """Load (and cache in-process) the dataset of ``task``."""
    key = (task.dataset, tuple(sorted(task.dataset_options.items())), str(data_dir), seed)
    if key not in _DATASETS:
        loader = registry.get("dataset", task.dataset).obj
        _DATASETS[key] = loader(dict(task.dataset_options), data_dir, seed)
    return _DATASETS[key]


def _partition(cfg: ExperimentConfig, s: int, ds, holders: np.ndarray, n_clients: int):
    """Task s's training indices split over its ``holders`` (``tasks[s].partition``)."""
    from mmfl.tasks.partition import partition

    task = cfg.tasks[s]
    labels = ds.y_train
    if ds.regression:  # real-valued targets: no classes to split by
        if task.partition.kind not in LABEL_FREE_PARTITIONS:
            raise ConfigError(f"tasks[{s}].partition.kind", "splits by class label, but dataset "
                              f"{task.dataset} has real-valued targets (regression); use one "
                              f"of {', '.join(LABEL_FREE_PARTITIONS)}", task.partition.kind)
        labels = np.zeros(len(ds.y_train), np.int64)
    try:
        return partition(
            labels, holders, task.partition.kind, dict(task.partition.options),
            ds.num_classes, stream(cfg.seed, PARTITION, s), groups=ds.groups,
            num_clients=n_clients,
        )
    except ValueError as e:
        raise ConfigError(f"tasks[{s}].partition", str(e), task.partition.kind) from None


#: partition kinds that do not read class labels (the ones a regression dataset allows)
LABEL_FREE_PARTITIONS = ("iid", "natural")


def _check_regression(cfg: ExperimentConfig, s: int, ds) -> None:
    """What a regression task (real-valued targets, mmfl.tasks.losses) cannot have: class
    masking (there are no classes) and a test split whose targets do not vary (R^2, its
    accuracy, would be undefined)."""
    task = cfg.tasks[s]
    if task.class_mask != "none":
        raise ConfigError(f"tasks[{s}].class_mask", "must be \"none\" for a regression task "
                          f"(dataset {task.dataset} has real-valued targets, not classes)",
                          task.class_mask)
    y = np.asarray(ds.y_test, np.float64)
    if not (y - y.mean(axis=0)).any():
        raise DataError(f"task {task.name}: the test targets of regression dataset "
                        f"{task.dataset} are all equal, so R^2 (its accuracy) is undefined; "
                        "use more test samples")


def _fixed_federation(cfg: ExperimentConfig, data_dir: Path | None):
    """The federation of ``clients.federation_file``, or None when it is drawn."""
    if not cfg.clients.federation_file:
        return None
    from mmfl.experiment.federation_file import read_federation_file

    for s, t in enumerate(cfg.tasks):
        if t.train_samples:
            raise ConfigError(f"tasks[{s}].train_samples", "must be 0 with "
                              "clients.federation_file (its indices refer to the whole split)",
                              t.train_samples)
    sizes = [len(task_dataset(cfg, s, data_dir).y_train) for s in range(len(cfg.tasks))]
    return read_federation_file(cfg.clients.federation_file, cfg.clients.count,
                                len(cfg.tasks), sizes)


def task_dataset(cfg: ExperimentConfig, s: int, data_dir: Path | None):
    """Task s's dataset exactly as the engines train and evaluate on it (loaded, subsampled)."""
    return _subsample(load_dataset(cfg.tasks[s], data_dir, cfg.seed), cfg.tasks[s], s, cfg.seed)


def _subsample(ds, task: TaskConfig, s: int, seed: int):
    """Deterministic subsets of the train / test splits (``train_samples``, ``test_samples``):
    random (sorted indices drawn from the task's stream), or for the test split with
    ``test_subset`` "first" / "last" the first / last ``test_samples`` in file order."""
    import dataclasses

    changes = {}
    rng = stream(seed, SUBSAMPLE, s)
    for split, limit in (("train", task.train_samples), ("test", task.test_samples)):
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        if limit and limit < len(y):
            if split == "test" and task.test_subset == "first":
                idx = np.arange(limit)
            elif split == "test" and task.test_subset == "last":
                idx = np.arange(len(y) - limit, len(y))
            else:
                idx = np.sort(rng.choice(len(y), size=limit, replace=False))
            changes[f"x_{split}"], changes[f"y_{split}"] = x[idx], y[idx]
            if split == "train" and getattr(ds, "groups", None) is not None:
                changes["groups"] = ds.groups[idx]
    return dataclasses.replace(ds, **changes) if changes else ds


def build_federation(cfg: ExperimentConfig, data_dir: Path | None = None) -> Federation:
    """Draw processors and membership (or read them, ``clients.federation_file``), check the
    budget, load and partition every task."""
    fixed = _fixed_federation(cfg, data_dir)
    member = membership(cfg) if fixed is None else fixed.membership
    capacity = draw_capacity(cfg, member) if fixed is None else fixed.processors
    budget = budget_of(cfg.clients, int(capacity.sum()))
    n_clients, n_tasks = member.shape
    n_samples = np.zeros((n_clients, n_tasks), dtype=np.int64)
    tasks = []
    for s, task in enumerate(cfg.tasks):
        ds = task_dataset(cfg, s, data_dir)
        if len(ds.y_test) == 0 or len(ds.y_train) < ds.num_classes:
            raise DataError(f"task {task.name}: dataset {task.dataset} has {len(ds.y_train)} "
                            f"training and {len(ds.y_test)} test samples; it needs at least "
                            f"{ds.num_classes} training samples and one test sample")
        if ds.regression:
            _check_regression(cfg, s, ds)
        holders = np.flatnonzero(member[:, s])
        if fixed is not None:
            parts = [fixed.indices[s][i] for i in holders]
        else:
            parts = _partition(cfg, s, ds, holders, n_clients)
        # parts are int64 views into one array per task (no per-client copies)
        indices: list[np.ndarray] = [_EMPTY] * n_clients
        for i, idx in zip(holders.tolist(), parts):
            indices[i] = np.asarray(idx, dtype=np.int64)
        n_samples[holders, s] = np.fromiter(map(len, parts), np.int64, count=len(parts))
        if n_samples[:, s].sum() == 0:
            raise ConfigError(f"tasks[{s}]", "no client received any training sample", task.name)
        tasks.append(TaskData(training_spec(task, s), ds, tuple(indices)))
        if ds.regression:
            continue
        held = np.unique(np.concatenate([ds.y_train[i] for i in indices if len(i)]))
        if len(held) < ds.num_classes:
            log.warning("task %s: classes %s are held by no client: the model never trains on "
                        "them", task.name, sorted(set(range(ds.num_classes)) - set(held.tolist())))
        log.info("task %s: %s, %d clients hold %d samples", task.name, task.dataset,
                 int((n_samples[:, s] > 0).sum()), int(n_samples[:, s].sum()))
    population = Population(n_samples, capacity, tuple(t.name for t in cfg.tasks))
    return Federation(population, budget, tuple(tasks))


def check_engine_support(cfg: ExperimentConfig, federation: Federation) -> None:
    """ConfigError naming the task when the run's engine cannot train one of its tasks:
    regression (real-valued targets, loss mse) runs on the local engines only so far."""
    regression = [s for s, td in enumerate(federation.tasks) if td.dataset.regression]
    if regression and cfg.engine == "flower":
        s = regression[0]
        raise ConfigError(f"tasks[{s}].loss", "regression (real-valued targets, loss mse) runs "
                          "on the local engines only so far, not on engine flower",
                          cfg.tasks[s].loss)
