"""Experiment configuration: TOML in, validated frozen objects out.

Every rule lives in this module. An invalid value raises :class:`~mmfl.errors.ConfigError` naming
the dotted key (``clients.active_rate``, ``tasks[1].partition.alpha``), the rule and the value
received; the CLI prints that one line and exits with status 2. The accepted keys and their
defaults are documented in ``configs/example.toml``.
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from mmfl import registry
from mmfl.errors import ConfigError
from mmfl.experiment import tomlio
from mmfl.registry import Option, check_value

# --------------------------------------------------------------------------------------------
# Frozen config objects (no defaults here: every default lives in the Option tables below, and
# config_from_dict fills every field from them)


@dataclass(frozen=True)
class PartitionConfig:
    """How a task's training set is split over the clients holding it (``[tasks.partition]``)."""

    kind: str
    options: Mapping[str, Any]


@dataclass(frozen=True)
class TaskConfig:
    """One model to train (``[[tasks]]``): dataset + partition + model + local training."""

    name: str
    dataset: str
    model: str
    lr: float
    local_epochs: int
    batch_size: int
    partition: PartitionConfig
    dataset_options: Mapping[str, Any]
    model_options: Mapping[str, Any]
    train_samples: int
    test_samples: int
    start_round: int
    stop_round: int
    class_mask: str
    test_subset: str
    loss: str
    optimizer: str
    optimizer_options: Mapping[str, Any]
    buffers: str
    init_weights: str


@dataclass(frozen=True)
class ClientsConfig:
    """The federation (``[clients]``)."""

    count: int
    active_rate: float
    processors: int | tuple[tuple[int, float], ...] | str
    processor_levels: tuple[float, float, float]
    tasks_per_client: int | tuple[tuple[int, float], ...]
    budget: int
    availability: float
    join_fraction: float
    join_round: int
    leave_fraction: float
    leave_round: int
    federation_file: str
    preferences: float | tuple[tuple[float, float], ...]
    preference_file: str
    costs: float | tuple[float, float]
    payment_budget: float
    recruitment_aware: bool


@dataclass(frozen=True)
class SystemConfig:
    """Client devices and the virtual clock (``[system]``); see :mod:`mmfl.core.clock`."""

    flops_per_second: float
    speed_sigma: float
    bandwidth: float
    bandwidth_sigma: float
    deadline: float
    trace: str


@dataclass(frozen=True)
class SamplerConfig:
    """Client sampling and model allocation (``[sampler]``)."""

    name: str
    aggregator: str
    options: Mapping[str, Any]
    replay_file: str = ""
    preference_aware: bool = False


@dataclass(frozen=True)
class UpdateCheckConfig:
    """``[server]``'s limits on the updates the server accepts (docs/algorithms.md section
    3.1): ``max_update_norm`` (0 = none), ``max_norm_ratio`` (x the median norm of the model's
    updates in the round; 0 = off) and ``norm_action`` ("reject" | "clip")."""

    max_update_norm: float
    max_norm_ratio: float
    norm_action: str


@dataclass(frozen=True)
class ServerOptimizerConfig:
    """``[server] optimizer`` and ``[server.optimizer_options]`` (every option resolved): the
    rule that turns the aggregated update into the server's step (docs/algorithms.md section
    3.2)."""

    name: str
    options: Mapping[str, Any]


@dataclass(frozen=True)
class LoggingConfig:
    """``[logging]``: where a run also reports its rounds (``tensorboard``: a folder for
    TensorBoard event files, "" = none) and which intermediate weights it keeps
    (``keep_models``: every k rounds, 0 = the final weights only; :mod:`mmfl.experiment.trained`).
    Not part of what a run computes: may change on ``--resume``."""

    tensorboard: str
    keep_models: int


@dataclass(frozen=True)
class FlowerConfig:
    """Settings of engine ``flower`` (``[flower]``); see :mod:`mmfl.flower` and docs/flower.md."""

    round_timeout: float
    pack: str
    node_wait: float
    ray_cpus: int


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment, validated. Build with :func:`load_config` or :func:`config_from_dict`."""

    name: str
    seed: int
    rounds: int
    engine: str
    eval_every: int
    threads: int | str
    device: str
    checkpoint_every: int
    server_lr: float
    data_dir: str
    stale_dtype: str
    stale_on_disk: bool
    variant: str
    eval_last: int
    clients: ClientsConfig
    system: SystemConfig
    sampler: SamplerConfig
    tasks: tuple[TaskConfig, ...]
    flower: FlowerConfig = field(default_factory=lambda: default_flower())
    update_check: UpdateCheckConfig = field(default_factory=lambda: default_update_check())
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(
        **{k: o.default for k, o in LOGGING.items()}))
    server_optimizer: ServerOptimizerConfig = field(
        default_factory=lambda: ServerOptimizerConfig(SERVER["optimizer"].default,
                                                      MappingProxyType({})))

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as a TOML-shaped nested dict (what ``config.toml`` holds);
        :func:`config_from_dict` of it gives back an equal config. The ``[flower]`` table
        appears only for engine ``flower`` or when it differs from its defaults, and so do the
        keys of :data:`_NEW_KEYS`, so runs that do not use them keep the config.toml (and
        checkpoint fingerprint) they always had."""
        d = _plain(self)
        if self.engine != "flower" and self.flower == default_flower():
            d.pop("flower")
        if not any(d["logging"].values()):
            d.pop("logging")
        opt = d.pop("server_optimizer")
        d["server"] = {"lr": d.pop("server_lr"), **d.pop("update_check"),
                       "optimizer": opt["name"]}
        if opt["options"]:
            d["server"]["optimizer_options"] = opt["options"]
        d["sampler"] = {"name": d["sampler"]["name"], "aggregator": d["sampler"]["aggregator"],
                        "replay_file": d["sampler"]["replay_file"],
                        "preference_aware": d["sampler"]["preference_aware"],
                        **d["sampler"]["options"]}
        for t, task in zip(d["tasks"], self.tasks):
            t["partition"] = {"kind": t["partition"]["kind"], **t["partition"]["options"]}
            if dict(task.optimizer_options) == _optimizer_options("", task.optimizer, {}):
                del t["optimizer_options"]  # at its defaults: kept out (as every new key)
        _drop_new_defaults(d)
        order = [*TOP, "server", "clients", "system", "sampler", "tasks",
                 *(["flower"] if "flower" in d else []), *(["logging"] if "logging" in d else [])]
        return {k: d[k] for k in order if k in d}

    def replace(self, **overrides: Any) -> "ExperimentConfig":
        """A re-validated copy with dotted-key overrides, e.g. ``cfg.replace(**{"sampler.name": "full"})``."""
        raw = self.to_dict()
        for k, v in overrides.items():
            _set_dotted(raw, k, v)
        return config_from_dict(raw)


#: Keys added after the first release, written to config.toml only when they differ from their
#: paper default (read from the key's schema): the config.toml (and so the checkpoint
#: fingerprint) of a run that does not use them stays what it always was, so older run
#: directories still resume. (table, key); "tasks.dataset_options" is that table of every task,
#: "sampler" the options of the run's sampler.
_NEW_KEYS = (
    ("", "variant"), ("", "eval_last"), ("", "device"), ("clients", "processor_levels"),
    ("clients", "federation_file"), ("clients", "preferences"), ("clients", "preference_file"),
    ("clients", "costs"), ("clients", "payment_budget"),
    ("clients", "recruitment_aware"), ("sampler", "preference_aware"),
    ("tasks", "class_mask"), ("tasks", "test_subset"), ("tasks", "loss"), ("tasks", "optimizer"), ("tasks", "buffers"),
    ("tasks", "init_weights"), ("tasks.dataset_options", "normalize"),
    ("sampler", "d_index"), ("sampler", "init"), ("sampler", "score"), ("sampler", "budget"),
    ("sampler", "refresh"), ("sampler", "schedule"), ("sampler", "replay_file"),
    ("sampler", "idle_model"), ("server", "max_update_norm"),
    ("server", "max_norm_ratio"), ("server", "norm_action"), ("server", "optimizer"),
)


def _drop_new_defaults(d: dict[str, Any]) -> None:
    def schema(section: str, table: dict) -> dict[str, Option]:
        if section == "":
            return TOP
        if section == "clients":
            return CLIENTS
        if section == "server":
            return SERVER
        if section == "tasks":
            return TASK
        if section == "sampler":
            return {**SAMPLER_FIXED, **registry.get("sampler", d["sampler"]["name"]).options}
        return registry.get("dataset", table["dataset"]).options  # tasks.dataset_options

    for section, key in _NEW_KEYS:
        if section == "":
            tables = [(d, d)]
        elif section.startswith("tasks"):
            sub = section.partition(".")[2]
            tables = [(t[sub] if sub else t, t) for t in d["tasks"]]
        else:
            tables = [(d[section], d[section])]
        for table, owner in tables:
            spec = schema(section, owner).get(key)
            if key in table and spec is not None and table[key] == _plain(spec.default):
                del table[key]


def _plain(x: Any) -> Any:
    if is_dataclass(x):
        return {f.name: _plain(getattr(x, f.name)) for f in fields(x)}
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, tuple) and x and all(isinstance(e, tuple) and len(e) == 2 for e in x):
        return {str(k): v for k, v in x}  # distribution tables
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# --------------------------------------------------------------------------------------------
# Schema of the fixed keys: key -> Option(type, default, rule, doc)

TOP = {
    "name": Option(str, "experiment", "", "Experiment name (used in logs and the summary)."),
    "seed": Option(int, 0, ">= 0", "Root seed; every random stream derives from it."),
    "rounds": Option(int, 20, "1..10000000", "Number of communication rounds."),
    "engine": Option(str, "vectorized", "", "Local-training engine (registry kind 'engine')."),
    "eval_every": Option(int, 1, ">= 1", "Evaluate every k rounds (the last round always)."),
    "threads": Option("table", "auto", "", "Worker threads that evaluate the tasks in "
                      "parallel (every kernel runs on one thread, so results do not depend on "
                      "it): an int 1..256, or \"auto\": every core for a lone run, one per "
                      "worker in a sweep with --jobs > 1."),
    "device": Option(str, "cpu", "", "Where the engines train and evaluate: \"cpu\", "
                     "\"cuda\", \"cuda:N\" or \"auto\" (a GPU when torch sees one, else the "
                     "CPU). Data and models move there once; bit-exact on cpu, deterministic "
                     "kernels on cuda (mmfl.engines.device)."),
    "checkpoint_every": Option(int, 1, ">= 1", "Write a resumable checkpoint every k rounds "
                               "(and after the last): one atomic file write, plus the rows of "
                               "per-pair stores changed since the previous checkpoint; kill -9 "
                               "loses at most the rounds since it (mmfl.experiment.rundir)."),
    "data_dir": Option(str, "", "", "Dataset folder ('' = --data-dir, $MMFL_DATA, then defaults)."),
    "stale_dtype": Option(str, "float32", "one of float32|float16",
                          "Storage of the last update per (client, task) for stale-update methods."),
    "stale_on_disk": Option(bool, False, "", "Keep stale updates in a memory-mapped file in the run directory."),
    "variant": Option(str, "paper", "one of paper|authors",
                      "Estimator choices: the papers' (default) or the authors' code's, for every "
                      "sampler/aggregator option that has an authors' value (each option given "
                      "explicitly still wins); see docs/reproduction.md."),
    "eval_last": Option(int, 0, ">= 0", "Also evaluate every round of the last k rounds "
                        "(the papers' metric is the mean over the last 20 rounds)."),
}
SERVER = {
    "lr": Option(float, 1.0, "> 0", "Global (server) learning rate eta_g."),
    "max_update_norm": Option(float, 0.0, ">= 0", "Updates G whose L2 norm exceeds this are "
                              "rejected or clipped (norm_action); 0 = no limit. Non-finite "
                              "updates are always rejected (docs/algorithms.md section 3.1)."),
    "max_norm_ratio": Option(float, 0.0, ">= 0", "Updates whose L2 norm exceeds this multiple "
                             "of the median norm of the same model's updates in the round are "
                             "rejected or clipped (0 = off; applies when the model has at least "
                             "3 updates in the round)."),
    "norm_action": Option(str, "reject", "one of reject|clip", "What happens to an update over "
                          "a norm limit: rejected like a missing pair, or scaled down to the "
                          "limit."),
    "optimizer": Option(str, "sgd", "one of sgd|fedavgm|fedadam|fedyogi", "Server optimizer "
                        "applied to the aggregated update with learning rate lr: sgd (w -= lr "
                        "x aggregate, the papers'), or the adaptive federated optimizers, "
                        "options in [server.optimizer_options] (docs/algorithms.md 3.2)."),
}
#: ``[server.optimizer_options]`` of each server optimizer
SERVER_OPTIMIZERS: dict[str, dict[str, Option]] = {
    "sgd": {},
    "fedavgm": {"momentum": Option(float, 0.9, "0..1", "Server momentum beta.")},
    **{name: {"beta1": Option(float, 0.9, "0..1", "First-moment decay beta_1."),
              "beta2": Option(float, 0.99, "0..1", "Second-moment decay beta_2."),
              "tau": Option(float, 1e-3, "> 0", "Adaptivity tau (added to sqrt(v)); v starts "
                            "at tau^2.")}
       for name in ("fedadam", "fedyogi")},
}
SYSTEM = {
    "flops_per_second": Option(float, 1e9, "> 0", "FLOP/s of the reference client device."),
    "speed_sigma": Option(float, 0.0, "0..10", "Lognormal spread of client speeds (0 = equal)."),
    "bandwidth": Option(float, 1e6, "> 0", "Median client bandwidth, bytes/s (up and down)."),
    "bandwidth_sigma": Option(float, 0.0, "0..10", "Lognormal spread of client bandwidths."),
    "deadline": Option(float, 0.0, ">= 0", "Round deadline in simulated seconds (0 = none); "
                       "later pairs are dropped as stragglers."),
    "trace": Option(str, "", "", "CSV with columns client,speed,bandwidth,availability "
                    "(overrides the distributions and clients.availability)."),
}
CLIENTS = {
    "count": Option(int, 50, "1..10000000", "Number of clients N."),
    "federation_file": Option(str, "", "", "JSON file that fixes the federation instead of "
                              "drawing it: membership, processors and each task's client sample "
                              "indices (e.g. exported from another code for a paired "
                              "comparison; mmfl.experiment.federation_file). Empty = drawn."),
    "active_rate": Option(float, 0.1, "(0..1]", "C: budget m = floor(C * P) updates per round."),
    "processors": Option("table", 1, "", "B_i: an int, a table {value = probability}, or "
                         "\"authors\": the authors' rule (see processor_levels)."),
    "processor_levels": Option(
        "table", (0.25, 0.5, 0.25), "",
        "With processors = \"authors\": probabilities [p1, p2, p3] that client i has "
        "B_i = 1, max(1, k_i // 2) or k_i processors, k_i = the number of tasks it holds (the "
        "authors' client_cpu straggler / common / expert levels)."),
    "tasks_per_client": Option(
        "table", 0, "", "Tasks each client holds: 0 = all, an int, or {count = probability}."
    ),
    "budget": Option(int, 0, ">= 0", "Explicit budget m (0 = floor(active_rate * P))."),
    "availability": Option(float, 1.0, "(0..1]", "Probability a client is online in a round."),
    "join_fraction": Option(float, 0.0, "0..1", "Fraction of clients that join late..."),
    "join_round": Option(int, 0, ">= 0", "...at this round (0-based; offline before it)."),
    "leave_fraction": Option(float, 0.0, "0..1", "Fraction of clients that leave..."),
    "leave_round": Option(int, 0, ">= 0", "...from this round on (0 = never)."),
    "preferences": Option(
        "table", 1.0, "", "Willingness w in [0, 1] of each client to train each task it holds: "
        "a number for every pair, or a table {w = probability} drawn per pair (e.g. {\"1\" = "
        "0.7, \"0.5\" = 0.2, \"0\" = 0.1}). 0 refuses (the pair is never assigned); in "
        "between, an assigned client declines with probability 1 - w (a wasted slot, "
        "rounds.csv declined). 1 = everyone willing (docs/preferences.md)."),
    "preference_file": Option(str, "", "", "CSV client,task,willingness (task by name or "
                              "index) whose rows replace the willingness of the pairs they "
                              "list. Empty = none."),
    "costs": Option(
        "table", 0.0, "", "Private cost c >= 0 of each client for training each task once: a "
        "number for every pair, or [lo, hi] drawn uniformly per pair. 0 = free clients, no "
        "auction. Otherwise every round's drawn clients bid the cost of their drawn tasks in "
        "mmfl's own budget-feasible truthful reverse auction (not the paper's; "
        "docs/incentives.md); clients not recruited lose their slots (rounds.csv declined)."),
    "payment_budget": Option(float, 0.0, ">= 0", "With clients.costs: B, the payment budget "
                             "per round of the auction (> 0 then)."),
    "recruitment_aware": Option(bool, False, "", "With clients.costs: the recruited slots "
                                "report p * k*/n (n drawn clients, k* recruited), so the "
                                "unbiased aggregate keeps its length instead of shrinking by "
                                "the recruited fraction; exactly unbiased when every pair has "
                                "the same cost and B_i = 1 (docs/algorithms.md section 3.4)."),
}
SAMPLER_FIXED = {
    "name": Option(str, "random", "", "Sampler (registry kind 'sampler')."),
    "aggregator": Option(str, "default", "", "'default' = the sampler's own, or an aggregator name."),
    "replay_file": Option(str, "", "", "JSON of (client, task) slots per round that replace the "
                          "sampler's draw in those rounds, for paired comparisons with another "
                          "code (mmfl.experiment.replay). Empty = the sampler draws."),
    "preference_aware": Option(bool, False, "", "With clients.preferences: every slot reports "
                               "its effective inclusion probability p * w (the pair is drawn "
                               "and accepts), so unbiased aggregation stays unbiased over the "
                               "willing clients; false: p, biased by the declines "
                               "(docs/algorithms.md section 3.3)."),
}
TASK = {
    "name": Option(str, None, "", "Unique task name."),
    "dataset": Option(str, None, "", "Dataset (registry kind 'dataset')."),
    "model": Option(str, "mlp", "", "Model (registry kind 'model')."),
    "lr": Option(float, 0.05, "> 0", "Local SGD learning rate eta_s."),
    "local_epochs": Option(int, 1, "1..10000", "Local epochs E_s."),
    "batch_size": Option(int, 32, "1..1000000000",
                         "Local batch size (>= client size = full batch)."),
    "train_samples": Option(int, 0, ">= 0", "Use a random subset of the training set (0 = all)."),
    "test_samples": Option(int, 0, ">= 0", "Evaluate on a subset of the test set of this size "
                           "(0 = all), chosen by test_subset."),
    "test_subset": Option(str, "random", "one of random|first|last",
                          "Which test_samples images: a random subset (fixed for the seed), the "
                          "first k in file order (the authors' --validation: the first 30%), or "
                          "the last k (the authors' default: the last 70%)."),
    "start_round": Option(int, 0, ">= 0", "First round the model is trained (it joins late)."),
    "stop_round": Option(int, 0, ">= 0", "Round from which it is no longer trained (0 = never)."),
    "loss": Option(str, "auto", "one of auto|nll|cross_entropy|mse",
                   "Local training and evaluation loss: 'nll' on a model that returns "
                   "log-probabilities (mmfl's own models), 'cross_entropy' on one that returns "
                   "logits; 'auto' tells them apart by one forward pass at start-up; 'mse' "
                   "(regression: a dataset with real-valued targets, chosen by 'auto' there) "
                   "reports the test MSE as loss and R^2 as accuracy (docs/algorithms.md "
                   "section 2)."),
    "optimizer": Option(str, "sgd", "one of sgd|adam|adamw",
                        "Local optimizer, started fresh each round; options in "
                        "[tasks.optimizer_options] (docs/algorithms.md section 2)."),
    "init_weights": Option(str, "", "", "A .npz or .safetensors file of initial weights: one "
                           "array per parameter, in the model's parameter order and shapes "
                           "(names may differ), e.g. another code's initial model for a paired "
                           "comparison. Empty = mmfl's seeded initialisation."),
    "buffers": Option(str, "aggregate", "one of aggregate|local",
                      "Models with buffers (batch norm): the server averages the clients' "
                      "buffers after each round, or each client keeps its own (FedBN); "
                      "docs/algorithms.md section 2."),
    "class_mask": Option(str, "none", "one of none|zero|exclude",
                         "Local training only: 'zero' sets the loss scores of the classes the "
                         "client holds no sample of to 0 (the authors' code, with their CNN's "
                         "probabilities as scores), 'exclude' removes them from the softmax."),
}
TASK_TABLES = ("partition", "dataset_options", "model_options", "optimizer_options")
LOGGING = {
    "tensorboard": Option(str, "", "", "Folder for TensorBoard event files of the run's rounds "
                          "(accuracy, loss, costs, simulated time); \"\" = none. Needs the "
                          "tensorboard package (the logging extra)."),
    "keep_models": Option(int, 0, ">= 0", "Also keep each task's weights after every k-th round "
                          "as models/<task>.round<R>.safetensors (mmfl.load_model(run, task, "
                          "round=R) loads them); 0 = the final weights only."),
}
FLOWER = {
    "round_timeout": Option(float, 600.0, ">= 0", "Seconds the server waits for a round's "
                            "replies (0 = no limit); pairs without a reply are missing."),
    "pack": Option(str, "pair", "one of pair|node", "Messages per round: one per assigned "
                   "(node, task) pair, or one per node carrying all its tasks."),
    "node_wait": Option(float, 120.0, "> 0", "Seconds to wait at start for every client's "
                        "SuperNode."),
    "ray_cpus": Option(int, 2, ">= 1", "Simulation: CPUs Ray may use (one ClientApp each)."),
}


def default_update_check() -> UpdateCheckConfig:
    """``[server]``'s update limits at their defaults (from :data:`SERVER`): none."""
    return UpdateCheckConfig(**{k: o.default for k, o in SERVER.items()
                                if k in UpdateCheckConfig.__dataclass_fields__})


def default_flower() -> FlowerConfig:
    """``[flower]`` with every key at its default (from :data:`FLOWER`)."""
    return FlowerConfig(**{k: o.default for k, o in FLOWER.items()})

_STR_KEYS = {"name", "engine", "dataset", "model", "kind", "data_dir", "aggregator"}
#: keys whose value may be a string or a number/table: an override keeps the type it is given
_MIXED_KEYS = {"processors", "threads"}
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: a dotted key has at most this many parts (the deepest real one has 5:
#: tasks[0].partition.quantity_skew.clients)
_MAX_KEY_PARTS = 16


# --------------------------------------------------------------------------------------------
# Loading and overrides


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a TOML experiment, apply ``dotted.key=value`` overrides, validate.

    Raises ConfigFileError (unreadable / malformed file, with line) or ConfigError (invalid value).
    """
    raw = tomlio.load(path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError("--set", "must look like dotted.key=value", item)
        key, _, text = item.partition("=")
        _set_dotted(raw, key.strip(), tomlio.parse_value(text.strip(), key.strip() or "--set"))
    return config_from_dict(raw)


def _split_key(key: str) -> list[str]:
    parts: list[str] = []
    if key.count(".") + key.count("[") > _MAX_KEY_PARTS:
        raise ConfigError("--set", f"dotted key of more than {_MAX_KEY_PARTS} parts", key)
    for piece in key.split("."):
        m = re.fullmatch(r"([^\[\]]+)((?:\[\d+\])*)", piece)
        if not m:
            raise ConfigError("--set", "malformed dotted key", key)
        parts.append(m.group(1))
        parts.extend(re.findall(r"\[(\d+)\]", m.group(2)))
    return parts


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set ``raw[a][b]... = value`` for ``a.b.c``; ``tasks[1].lr``, ``tasks.1.lr`` and
    ``tasks.NAME.lr`` address tasks by index or by name."""
    parts = _split_key(key)
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, ".".join(parts[: i + 1]))]
            continue
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, (dict, list)):
            raise ConfigError(".".join(parts[: i + 1]), "is a value, not a table", nxt)
        node = nxt
    last = parts[-1]
    if isinstance(node, list):
        raise ConfigError(key, "must address a key inside a task (e.g. tasks[0].lr)", value)
    if (last not in _MIXED_KEYS and (isinstance(node.get(last), str) or last in _STR_KEYS)
            and not isinstance(value, str)):
        value = _as_text(value)  # typed by the schema: a string key keeps the text
    node[last] = value


def _as_text(value: Any) -> str:
    return tomlio.scalar(value).strip('"') if not isinstance(value, str) else value


def _list_index(items: list, part: str, key: str) -> int:
    if part.isdigit():
        if int(part) >= len(items):
            raise ConfigError(key, f"index out of range ({len(items)} entries)", int(part))
        return int(part)
    for j, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return j
    raise ConfigError(key, "no task with that name", part)


# --------------------------------------------------------------------------------------------
# Validation


def _table(key: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(key, "must be a table", value)
    return value


def _fixed(prefix: str, raw: dict, schema: dict[str, Option], extra: tuple[str, ...] = ()) -> dict:
    """Validate the keys of ``schema`` in ``raw``; unknown keys (not in schema nor extra) fail."""
    for k in raw:
        if k not in schema and k not in extra:
            valid = ", ".join(sorted([*schema, *extra]))
            raise ConfigError(f"{prefix}{k}", f"unknown key; valid keys: {valid}", raw[k])
    out = {}
    for k, spec in schema.items():
        if k in raw:
            out[k] = check_value(f"{prefix}{k}", raw[k], spec)
        elif spec.default is None:
            raise ConfigError(f"{prefix}{k}", "is required", None, show_got=False)
        else:
            out[k] = spec.default
    return out


def _threads(value: Any) -> int | str:
    """``threads``: "auto" or an int in 1..256."""
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
        raise ConfigError("threads", 'must be "auto" or an integer in 1..256', value)
    return value


def _device(value: str, engine: str) -> str:
    """``device``: "cpu", "cuda", "cuda:N" or "auto" (whether the GPU exists is checked when
    the engine is built, mmfl.engines.device); engine flower computes on the CPU only."""
    if not re.fullmatch(r"cpu|cuda|cuda:\d{1,4}|auto", value):
        raise ConfigError("device", 'must be "cpu", "cuda", "cuda:N" or "auto"', value)
    if engine == "flower" and value != "cpu":
        raise ConfigError("device", 'engine flower trains on the CPU only so far; use "cpu"',
                          value)
    return value


def _distribution(key: str, value: Any, *, lo: int, hi: int | None) -> int | tuple:
    """An int in [lo, hi], or a table {int value = probability} with probabilities summing to 1."""
    if isinstance(value, bool):
        raise ConfigError(key, "must be an integer or a table {value = probability}", value)
    if isinstance(value, int):
        if value < lo or (hi is not None and value > hi):
            rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
            raise ConfigError(key, f"must be {rng}", value)
        return value
    if not isinstance(value, dict) or not value:
        raise ConfigError(key, "must be an integer or a table {value = probability}", value)
    items = []
    for k, p in value.items():
        try:
            v = int(k)
        except ValueError:
            raise ConfigError(f"{key}.{k}", "table keys must be integers", k) from None
        if v < max(lo, 1) or (hi is not None and v > hi):
            raise ConfigError(f"{key}.{k}", f"value must be in {max(lo, 1)}..{hi or 'inf'}", v)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ConfigError(f"{key}.{k}", "probability must be a number in [0, 1]", p)
        items.append((v, float(p)))
    total = sum(p for _, p in items)
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(key, "probabilities must sum to 1", round(total, 9))
    return tuple(sorted(items))


def _levels(key: str, value: Any) -> tuple[float, float, float]:
    """Three probabilities (numbers in [0, 1] summing to 1)."""
    ok = (isinstance(value, (list, tuple)) and len(value) == 3
          and all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1
                  for p in value))
    if not ok or abs(sum(value) - 1.0) > 1e-6:
        raise ConfigError(key, "must be three probabilities [p1, p2, p3] summing to 1", value)
    return tuple(float(p) for p in value)


def _costs(key: str, value: Any, budget: float) -> float | tuple[float, float]:
    """``clients.costs``: a cost >= 0, or [lo, hi] with 0 <= lo <= hi, hi > 0, as (lo, hi);
    a positive cost needs ``clients.payment_budget`` > 0 (and a budget needs costs)."""
    rule = "must be a number >= 0 or a range [lo, hi] with 0 <= lo <= hi"

    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) \
            and x >= 0

    if isinstance(value, (list, tuple)):
        if len(value) != 2 or not all(map(number, value)) or value[0] > value[1]:
            raise ConfigError(key, rule, value)
        out: float | tuple[float, float] = (float(value[0]), float(value[1]))
        if out[1] == 0:
            out = 0.0
    elif number(value):
        out = float(value)
    else:
        raise ConfigError(key, rule, value)
    if out != 0 and not budget > 0:
        raise ConfigError("clients.payment_budget", "must be > 0 when clients.costs is set "
                          "(the auction's budget per round)", budget)
    if out == 0 and budget > 0:
        raise ConfigError("clients.payment_budget", "needs clients.costs (the clients' costs "
                          "the auction pays for)", budget)
    return out


def _preferences(key: str, value: Any) -> float | tuple[tuple[float, float], ...]:
    """``clients.preferences``: a willingness in [0, 1], or a table {w = probability} (w in
    [0, 1], probabilities summing to 1) as ((w, probability), ...) ascending in w. TOML reads an
    unquoted decimal key (``0.5 = 0.2``) as the nested table {0 = {5 = 0.2}}: joined back."""
    rule = "must be a number in [0, 1] or a table {willingness = probability}"
    if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
        raise ConfigError(key, rule, value)
    if not isinstance(value, dict):
        if not 0 <= value <= 1:
            raise ConfigError(key, rule, value)
        return float(value)

    def flat(prefix: str, table: dict) -> list[tuple[str, Any]]:
        return [kv for k, v in table.items() for kv in (
            flat(f"{prefix}{k}.", v) if isinstance(v, dict) else [(f"{prefix}{k}", v)])]

    items: dict[float, float] = {}
    for k, p in flat("", value):
        try:
            w = float(k)
        except ValueError:
            w = float("nan")
        if not 0 <= w <= 1:
            raise ConfigError(f"{key}.{k}", "keys must be willingness values in [0, 1]", k)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ConfigError(f"{key}.{k}", "probability must be a number in [0, 1]", p)
        if w in items:
            raise ConfigError(f"{key}.{k}", "willingness listed twice", k)
        items[w] = float(p)
    if not items or abs(sum(items.values()) - 1.0) > 1e-6:
        raise ConfigError(key, "probabilities must sum to 1", round(sum(items.values()), 9))
    return tuple(sorted(items.items()))


def _component(kind: str, key: str, name: str) -> registry.Entry:
    return registry.get(kind, name, key=key)


def _task(i: int, raw: Any) -> TaskConfig:
    prefix = f"tasks[{i}]."
    raw = _table(f"tasks[{i}]", raw)
    vals = _fixed(prefix, raw, TASK, TASK_TABLES)
    if not _KEY_RE.match(vals["name"]):
        raise ConfigError(prefix + "name", "must be an identifier (letters, digits, _)", vals["name"])
    ds = _component("dataset", prefix + "dataset", vals["dataset"])
    mdl = _component("model", prefix + "model", vals["model"])
    ds_opts = registry.resolve_options(
        prefix + "dataset_options", _table(prefix + "dataset_options", raw.get("dataset_options", {})), ds.options
    )
    md_opts = registry.resolve_options(
        prefix + "model_options", _table(prefix + "model_options", raw.get("model_options", {})), mdl.options
    )
    part_raw = dict(_table(prefix + "partition", raw.get("partition", {})))
    kind = part_raw.pop("kind", "iid")
    from mmfl.tasks.partition import PARTITION_OPTIONS

    if kind not in PARTITION_OPTIONS:
        raise ConfigError(
            prefix + "partition.kind", f"must be one of {', '.join(sorted(PARTITION_OPTIONS))}", kind
        )
    if "quantity_skew" in part_raw:
        part_raw.update(_quantity_skew(prefix + "partition.quantity_skew", part_raw.pop("quantity_skew")))
    part_opts = registry.resolve_options(prefix + "partition", part_raw, PARTITION_OPTIONS[kind])
    if "sample_ranges" in part_opts:
        from mmfl.tasks.partition import ranges_option

        try:
            part_opts["sample_ranges"] = tuple(ranges_option(part_opts["sample_ranges"]))
        except ValueError as e:
            raise ConfigError(prefix + "partition.sample_ranges", str(e),
                              part_opts["sample_ranges"]) from None
    return TaskConfig(
        **vals,
        partition=PartitionConfig(kind, MappingProxyType(part_opts)),
        dataset_options=MappingProxyType(ds_opts),
        model_options=MappingProxyType(md_opts),
        optimizer_options=MappingProxyType(_optimizer_options(
            prefix + "optimizer_options", vals["optimizer"],
            _table(prefix + "optimizer_options", raw.get("optimizer_options", {})))),
    )


def _optimizer_options(key: str, name: str, given: dict) -> dict[str, Any]:
    """``[tasks.optimizer_options]`` of local optimizer ``name``, resolved and checked."""
    from mmfl.tasks.optimizers import OPTIMIZERS

    opts = registry.resolve_options(key, given, OPTIMIZERS[name])
    if "betas" in opts:
        b = opts["betas"]
        if (not isinstance(b, (list, tuple)) or len(b) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                           and 0 <= x < 1 for x in b)):
            raise ConfigError(key + ".betas", "must be [beta1, beta2], each in [0, 1)", b)
        opts["betas"] = [float(x) for x in b]
    if opts.get("nesterov") and not opts.get("momentum"):
        raise ConfigError(key + ".nesterov", "needs momentum > 0", True)
    return opts


#: Most [[tasks]] a config may have.
MAX_TASKS = 1000
#: Most entries a per-client x per-task or per-processor array may have (N x S, P): beyond it
#: the federation needs tens of GB before the first round.
MAX_PAIRS = 10**8


def _check_size(cl: dict[str, Any], num_tasks: int) -> None:
    """N x S and the most processors P = sum B_i may reach stay within :data:`MAX_PAIRS`."""
    p = cl["processors"]
    most_b = (num_tasks if p == "authors" else p if isinstance(p, int)
              else max(v for v, prob in p if prob > 0))
    n = cl["count"]
    for what, k in (("tasks", num_tasks), ("processors per client", most_b)):
        if n * k > MAX_PAIRS:
            raise ConfigError("clients.count", f"times the {k} {what} gives more than "
                              f"{MAX_PAIRS} client entries to hold in memory", n)


def _quantity_skew(key: str, value: Any) -> dict[str, float]:
    """``quantity_skew = {clients = 0.9, data = 0.1}``: a fraction ``clients`` of the holders
    shares a fraction ``data`` of the samples (alias of ``skew_clients`` / ``skew_data``)."""
    if not isinstance(value, dict) or set(value) != {"clients", "data"}:
        raise ConfigError(key, "must be a table {clients = fraction, data = fraction}", value)
    return {"skew_clients": value["clients"], "skew_data": value["data"]}


def config_from_dict(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a nested dict (the TOML document) into an :class:`ExperimentConfig`."""
    depth, where = tomlio.nesting_depth(raw)
    if depth > tomlio.MAX_DEPTH:
        raise ConfigError(where[:60] or "config", f"tables or arrays nested more than "
                          f"{tomlio.MAX_DEPTH} levels deep", show_got=False)
    raw = copy.deepcopy(dict(raw))
    top = _fixed("", raw, TOP, ("clients", "sampler", "tasks", "server", "system", "flower",
                                "logging"))
    _component("engine", "engine", top["engine"])
    top["threads"] = _threads(top["threads"])
    top["device"] = _device(top["device"], top["engine"])

    server = _fixed("server.", _table("server", raw.get("server", {})), SERVER,
                    ("optimizer_options",))
    server_opt = ServerOptimizerConfig(server["optimizer"], MappingProxyType(
        registry.resolve_options("server.optimizer_options", _table(
            "server.optimizer_options", raw.get("server", {}).get("optimizer_options", {})),
            SERVER_OPTIMIZERS[server.pop("optimizer")])))
    system = SystemConfig(**_fixed("system.", _table("system", raw.get("system", {})), SYSTEM))
    flower = FlowerConfig(**_fixed("flower.", _table("flower", raw.get("flower", {})), FLOWER))
    logging_ = LoggingConfig(**_fixed("logging.", _table("logging", raw.get("logging", {})),
                                      LOGGING))

    craw = _table("clients", raw.get("clients", {}))
    cl = _fixed("clients.", craw, CLIENTS)
    if cl["processors"] != "authors":
        cl["processors"] = _distribution("clients.processors", cl["processors"], lo=1, hi=1024)
    cl["processor_levels"] = _levels("clients.processor_levels", cl["processor_levels"])
    cl["preferences"] = _preferences("clients.preferences", cl["preferences"])
    cl["costs"] = _costs("clients.costs", cl["costs"], cl["payment_budget"])

    traw = raw.get("tasks")
    if not isinstance(traw, list) or not traw:
        raise ConfigError("tasks", "at least one [[tasks]] table is required", traw)
    if len(traw) > MAX_TASKS:
        raise ConfigError("tasks", f"at most {MAX_TASKS} [[tasks]] tables", len(traw))
    tasks = tuple(_task(i, t) for i, t in enumerate(traw))
    seen: dict[str, int] = {}
    for i, t in enumerate(tasks):
        if t.stop_round and t.stop_round <= t.start_round:
            raise ConfigError(f"tasks[{i}].stop_round", f"must be 0 or > start_round = "
                              f"{t.start_round}", t.stop_round)
        if t.name in seen:
            raise ConfigError(f"tasks[{i}].name", f"duplicates tasks[{seen[t.name]}].name", t.name)
        if t.loss == "mse" and t.class_mask != "none":
            raise ConfigError(f"tasks[{i}].class_mask", "must be \"none\" with loss = \"mse\" "
                              "(regression has no classes)", t.class_mask)
        if t.loss == "mse" and top["engine"] == "flower":
            raise ConfigError(f"tasks[{i}].loss", "\"mse\" (regression) runs on the local "
                              "engines (vectorized, sequential) only so far, not on engine flower",
                              t.loss)
        seen[t.name] = i
    cl["tasks_per_client"] = _distribution(
        "clients.tasks_per_client", cl["tasks_per_client"], lo=0, hi=len(tasks)
    )
    _check_size(cl, len(tasks))
    clients = ClientsConfig(**cl)

    sraw = dict(_table("sampler", raw.get("sampler", {})))
    fixed = {k: sraw.pop(k) for k in list(sraw) if k in SAMPLER_FIXED}
    sv = _fixed("sampler.", fixed, SAMPLER_FIXED)
    entry = _component("sampler", "sampler.name", sv["name"])
    opts = registry.resolve_options("sampler", sraw, entry.options, top["variant"])
    if sv["aggregator"] != "default":
        _component("aggregator", "sampler.aggregator", sv["aggregator"])
    sampler = SamplerConfig(sv["name"], sv["aggregator"], MappingProxyType(opts),
                            sv["replay_file"], sv["preference_aware"])

    return ExperimentConfig(
        **top, server_lr=server.pop("lr"), update_check=UpdateCheckConfig(**server),
        server_optimizer=server_opt, logging=logging_,
        clients=clients, system=system, sampler=sampler,
        tasks=tasks, flower=flower
    )


def resolve_data_dir(cfg: ExperimentConfig, cli_data_dir: str | None = None) -> Path | None:
    """The dataset folder: ``--data-dir`` beats the config's ``data_dir`` beats ``$MMFL_DATA``."""
    for cand in (cli_data_dir, cfg.data_dir, os.environ.get("MMFL_DATA")):
        if cand:
            return Path(cand).expanduser()
    return None


def budget_of(clients: ClientsConfig, num_processors: int) -> int:
    """m = floor(active_rate * P), or the explicit budget; ConfigError if not in 1..P."""
    if clients.budget:
        if clients.budget > num_processors:
            raise ConfigError(
                "clients.budget", f"must not exceed the number of processors P = {num_processors}",
                clients.budget,
            )
        return clients.budget
    m = int(clients.active_rate * num_processors + 1e-9)
    if m < 1:
        raise ConfigError(
            "clients.active_rate",
            f"gives a budget floor(active_rate * P) = 0 with P = {num_processors} processors; "
            f"raise it to at least {1 / num_processors:.4g}",
            clients.active_rate,
        )
    return m
