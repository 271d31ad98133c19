"""The report of a set of run directories: ``report.html``, ``report.md`` and PNG plots.

Results are data: this module only reads run directories (``config.toml``, ``summary.json``,
``metrics.csv``, ``rounds.csv``) and never runs anything. Usage::

    write_report([Path("runs/sweep")], Path("runs/sweep-report"))   # -> .../report.html

Runs:
    Every path given is a run directory (it holds ``summary.json``) or a folder searched
    recursively for run directories. Only runs whose summary says ``completed`` enter the
    statistics; the others (running, interrupted, failed, unreadable) are listed as left out.

Groups:
    Runs are grouped by their resolved config minus ``seed`` (and minus the keys that do not
    change results: ``data_dir``, ``threads``, ``checkpoint_every``, ``stale_on_disk``). A group
    is labelled by the config keys whose values differ between groups and that every group has;
    groups those leave alike add the keys that differ among just them (two ``group_pipeline``
    groups add ``sampler.within``, not the options of other samplers). Where every label is one
    string key, the bare value is shown, e.g. ``gvr`` for ``sampler.name``.
    Statistics over a group's seeds are mean and population std (ddof = 0); plot bands span the
    min..max over seeds.

Contents (the same tables in the HTML and Markdown twins; the PNGs sit beside them):
    groups and what sets them apart; final accuracy (mean and min across tasks, mean ± std over
    seeds, and the papers' last-window mean); each sampler against a baseline sampler (default
    ``random``, ``baseline=``/``--baseline``): the paired difference of the final mean and min
    accuracy over seeds, its 95% interval and a paired t-test (:func:`significance_table`; no
    interval or p-value under 3 seed pairs); accuracy per task vs round (``accuracy.png``, with a
    mean-over-tasks panel and the target line); final accuracy per task (``tasks.png``); test
    loss and training loss per task vs round (``loss.png``, ``train_loss.png``); fairness across
    tasks at the end (mean, min, max-min, variance) and max-min over rounds
    (``fairness.png``); cost vs final mean accuracy (local trainings and model uploads,
    ``cost.png``) and mean accuracy against the cumulative cost over the run
    (``cost_curve.png``); rounds to a target accuracy (default: 90% of the best group's final mean
    accuracy) for the mean and for every task (min), with the local trainings spent until then and,
    when ``rounds.csv`` has a ``sim_time`` column (the simulated clock at the end of each round,
    in seconds), the simulated seconds until then; clients per task over rounds
    (``clients.png``, from ``metrics.csv``'s ``clients``; its y axis spans the rounds after the
    first, and a first round above them, such as StaleVRE's full round 0, is marked on the top
    edge with its value); and one row per run with its ``summary.json`` values.

The HTML is self-contained except for the PNGs (relative ``src``); a small inline script sets
``data-images-loaded="LOADED/TOTAL"`` on ``<html>`` once the page has loaded, which the tests read
from a headless browser.
"""

from __future__ import annotations

import csv
import functools
import html
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from mmfl.core.metrics import rounds_to_target
from mmfl.errors import ConfigError, ConfigFileError, ResultsError
from mmfl.experiment import plots
from mmfl.experiment.frames import ordered_run_dirs
from mmfl.experiment.results import RunResults, find_run_dirs, read_results

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_BASELINE", "DEFAULT_TARGET_FRACTION", "Group", "PairedTest", "find_run_dirs",
           "group_runs", "paired_t_test", "significance_table", "student_t_central",
           "student_t_critical", "write_report"]

#: Default target: this fraction of the best group's final mean accuracy.
DEFAULT_TARGET_FRACTION = 0.9
#: Default baseline of the significance table: the sampler every other one is compared with.
DEFAULT_BASELINE = "random"
#: Confidence level of the significance table's intervals (two-sided).
CONFIDENCE = 0.95
#: Fewest seed pairs for which the significance table shows an interval and a p-value.
MIN_PAIRS = 3
#: The final metrics the significance table compares: (label, summary.json key).
COMPARED = (("mean accuracy", "mean_accuracy"), ("min accuracy", "min_accuracy"))
#: Config keys that do not change results: ignored when grouping.
IGNORED_KEYS = ("seed", "data_dir", "threads", "checkpoint_every", "stale_on_disk")
COSTS = ("local_trainings", "model_uploads", "forward_passes", "scalar_uploads", "local_steps")


# --------------------------------------------------------------------------------------------
# Finding and grouping runs


def _read_run(d: Path) -> RunResults:
    """:func:`read_results` of ``d``, checked for everything the report reads; a file that
    cannot be read or holds the wrong thing is a ResultsError naming it (the run is left out)."""
    try:
        run = read_results(d)
    except ConfigFileError as e:
        raise ResultsError(str(e)) from None
    except (OSError, ValueError, RecursionError, csv.Error) as e:
        # which file: the first of the run's files that does not read back
        for name in ("summary.json", "metrics.csv", "rounds.csv"):
            why = _unreadable(d / name)
            if why:
                raise ResultsError(f"{d / name}: {why}") from None
        raise ResultsError(f"{d}: cannot read the run directory ({str(e)[:200]})") from None
    _check_summary(d / "summary.json", run.summary)
    _check_rows(d / "metrics.csv", run.metrics, ("accuracy", "clients", "loss", "train_loss"))
    _check_rows(d / "rounds.csv", run.rounds, ("local_trainings", "model_uploads", "sim_time"))
    seed = run.config.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ResultsError(f"{d / 'config.toml'}: seed must be an integer (got {str(seed)[:60]})")
    for key in ("tasks", "clients"):
        v = run.config.get(key)
        if v is not None and not (isinstance(v, dict) if key == "clients" else
                                  isinstance(v, list) and all(isinstance(t, dict) for t in v)):
            raise ResultsError(f"{d / 'config.toml'}: {key} is not "
                               f"{'a table' if key == 'clients' else 'an array of tables'}")
    return run


def _unreadable(path: Path) -> str:
    """Why ``path`` (a run's JSON or CSV file) does not read back, or "" (also when absent)."""
    if not path.exists():
        return ""
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            json.loads(text)
        else:
            list(csv.DictReader(text.splitlines()))
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    except UnicodeDecodeError:
        return "not a UTF-8 text file"
    except (ValueError, RecursionError, csv.Error) as e:
        return f"not valid {'JSON' if path.suffix == '.json' else 'CSV'} ({str(e)[:120]})"
    return ""


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _check_summary(path: Path, s: Any) -> None:
    def bad(why: str) -> ResultsError:
        return ResultsError(f"{path}: {why}")

    if not isinstance(s, dict):
        raise bad(f"must hold a JSON object, not {type(s).__name__}")
    for k in ("mean_accuracy", "min_accuracy", "mean_accuracy_window", "max_min_accuracy",
              "accuracy_variance"):
        if not _is_number(s.get(k)):
            raise bad(f"{k} must be a number or null (got {str(s.get(k))[:60]})")
    seed = s.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise bad(f"seed must be an integer (got {str(seed)[:60]})")
    if not isinstance(s.get("status", ""), str):
        raise bad("status must be a string")
    tasks, cost = s.get("tasks", {}), s.get("cost", {})
    if not isinstance(tasks, dict) or not all(
            isinstance(v, dict) and _is_number(v.get("accuracy")) for v in tasks.values()):
        raise bad('tasks must map task names to {"accuracy": number, ...}')
    if not isinstance(cost, dict) or not all(_is_number(v) for v in cost.values()):
        raise bad("cost must map names to numbers")


def _check_rows(path: Path, rows: list[dict[str, str]], columns: Sequence[str]) -> None:
    for i, row in enumerate(rows, start=2):
        try:
            int(row.get("round") or "")
            for c in columns:
                if row.get(c) not in ("", None):
                    float(row[c])
        except (TypeError, ValueError):
            raise ResultsError(f"{path}:{i}: malformed row (round must be an integer, "
                               f"{', '.join(columns)} numbers)") from None
        if None in row or (columns[0] == "accuracy" and row.get("task") is None):
            raise ResultsError(f"{path}:{i}: malformed row (wrong number of fields)")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict) and (d or not prefix):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = d
    return out


def _show(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)


@dataclass
class Group:
    """Runs of one config (minus the seed), sorted by seed."""

    label: str
    config: dict[str, Any]            # flattened config of the group (without ignored keys)
    runs: list[RunResults] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [int(r.config.get("seed", r.summary.get("seed", 0))) for r in self.runs]

    @property
    def tasks(self) -> list[str]:
        return self.runs[0].task_names if self.runs else []

    def values(self, get: Callable[[dict], Any]) -> np.ndarray:
        """(runs,) float: ``get(summary)`` of every run (NaN when missing)."""
        out = []
        for r in self.runs:
            try:
                v = get(r.summary)
            except (KeyError, TypeError):
                v = None
            out.append(np.nan if v is None else float(v))
        return np.array(out, dtype=np.float64)


def group_runs(runs: Sequence[RunResults]) -> tuple[list[Group], list[str]]:
    """Group runs by config minus the ignored keys; returns the groups (in order of first
    appearance) and the keys that tell them apart (used in the labels)."""
    groups: dict[str, Group] = {}
    for r in runs:
        flat = {k: v for k, v in _flatten(r.config).items() if k not in IGNORED_KEYS}
        key = json.dumps(flat, sort_keys=True, default=str)
        if key not in groups:
            groups[key] = Group("", flat)
        groups[key].runs.append(r)
    out = list(groups.values())
    for g in out:
        g.runs.sort(key=lambda r: (int(r.config.get("seed", 0)), str(r.path)))
    per_group = _label_keys([g.config for g in out])
    bare = all(len(k) == 1 and k == per_group[0] and isinstance(g.config.get(k[0]), str)
               for g, k in zip(out, per_group))
    for g, k in zip(out, per_group):
        if not k:
            g.label = str(g.config.get("sampler.name", "runs"))
        else:
            g.label = g.config[k[0]] if bare else _label(g.config, k)
    return out, list(dict.fromkeys(k for ks in per_group for k in ks))


def _differing(configs: list[dict[str, Any]]) -> list[str]:
    """The keys (in order of first appearance) whose values, or presence, differ."""
    order = list(dict.fromkeys(k for c in configs for k in c))
    return [k for k in order
            if len({json.dumps(c.get(k, "\0missing"), sort_keys=True, default=str)
                    for c in configs}) > 1]


def _label_keys(configs: list[dict[str, Any]]) -> list[list[str]]:
    """Per config, the keys its label shows: the differing keys that every config has (e.g.
    ``sampler.name``) and, for configs that those leave alike, the keys that differ among just
    those configs (e.g. ``sampler.within`` between two ``group_pipeline`` groups), not the
    options of other samplers."""
    if len(configs) < 2:
        return [[] for _ in configs]
    differ = _differing(configs)
    everywhere = [k for k in differ if all(k in c for c in configs)]
    clusters: dict[str, list[int]] = {}
    for i, c in enumerate(configs):
        clusters.setdefault(json.dumps([c[k] for k in everywhere], default=str), []).append(i)
    out = [list(everywhere) for _ in configs]
    for members in clusters.values():
        if len(members) > 1:
            extra = [k for k in _differing([configs[i] for i in members]) if k not in everywhere]
            for i in members:
                out[i] += [k for k in extra if k in configs[i]]
    return out


def _label(config: dict[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{k}={_show(config[k])}" for k in keys if k in config)


# --------------------------------------------------------------------------------------------
# Statistics


def _series(run: RunResults, column: str, tasks: Sequence[str], *, every_task: bool = True
            ) -> tuple[np.ndarray, np.ndarray]:
    """(rounds (R,), values (R, S)) of a metrics.csv column over the rounds where it is set
    for every task (``every_task``) or for some task (the others NaN: ``train_loss`` is empty
    for a task no client trained in that round)."""
    table: dict[int, dict[str, float]] = {}
    for row in run.metrics:
        if row.get(column, "") not in ("", None):
            table.setdefault(int(row["round"]), {})[row["task"]] = float(row[column])
    rounds = sorted(t for t, v in table.items() if not every_task or all(s in v for s in tasks))
    vals = np.array([[table[t].get(s, np.nan) for s in tasks] for t in rounds], dtype=np.float64)
    return np.array(rounds, dtype=np.int64), vals.reshape(len(rounds), len(tasks))


def _stack(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Align per-run (x (R_i,), y (R_i, ...)) on the union of x: (x (R,), Y (runs, R, ...))."""
    x = np.unique(np.concatenate([p[0] for p in parts])) if parts else np.array([], np.int64)
    tail = parts[0][1].shape[1:] if parts else ()
    out = np.full((len(parts), len(x), *tail), np.nan)
    for i, (xi, yi) in enumerate(parts):
        out[i, np.searchsorted(x, xi)] = yi
    return x, out


def _band(x: np.ndarray, y: np.ndarray):
    """(x, mean, min, max) over axis 0, on the x where some run has a value."""
    keep = ~np.all(np.isnan(y), axis=0)
    if not keep.any():
        return None
    y = y[:, keep]
    with np.errstate(all="ignore"):
        return x[keep], np.nanmean(y, axis=0), np.nanmin(y, axis=0), np.nanmax(y, axis=0)


@dataclass
class _GroupStats:
    rounds: np.ndarray                  # (R,) evaluated rounds
    acc: np.ndarray                     # (runs, R, S) accuracy per task
    client_rounds: np.ndarray           # (R',) every round
    clients: np.ndarray                 # (runs, R', S)
    cumulative: list[dict[int, dict[str, float]]]  # per run: round -> cumulative costs / sim time
    loss: tuple[np.ndarray, np.ndarray]        # (rounds (R'',), test loss (runs, R'', S))
    train_loss: tuple[np.ndarray, np.ndarray]  # (rounds, (runs, rounds, S)); NaN: no client


def _cumulative(run: RunResults) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    total = {"local_trainings": 0.0, "model_uploads": 0.0}
    for row in sorted(run.rounds, key=lambda r: int(r["round"])):
        for k in total:
            total[k] += float(row.get(k) or 0)
        entry = dict(total)
        if row.get("sim_time") not in (None, ""):
            entry["sim_time"] = float(row["sim_time"])
        out[int(row["round"])] = entry
    return out


def _stats(g: Group) -> _GroupStats:
    tasks = g.tasks
    rounds, acc = _stack([_series(r, "accuracy", tasks) for r in g.runs])
    crounds, clients = _stack([_series(r, "clients", tasks) for r in g.runs])
    return _GroupStats(rounds, acc, crounds, clients, [_cumulative(r) for r in g.runs],
                       _stack([_series(r, "loss", tasks) for r in g.runs]),
                       _stack([_series(r, "train_loss", tasks, every_task=False)
                               for r in g.runs]))


def _mean_std(v: np.ndarray) -> tuple[float, float]:
    v = v[~np.isnan(v)]
    return (float(v.mean()), float(v.std())) if v.size else (float("nan"), float("nan"))


def _pm(v: np.ndarray, digits: int = 4) -> str:
    m, s = _mean_std(np.asarray(v, dtype=np.float64))
    if np.isnan(m):
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _num(x: float, digits: int = 4) -> str:
    return "–" if x is None or np.isnan(x) else f"{x:.{digits}f}"


def _count(x: float) -> str:
    return "–" if np.isnan(x) else f"{x:.0f}"


# --------------------------------------------------------------------------------------------
# Significance: a paired t-test over seeds (numpy only; scipy is not a dependency)


def student_t_central(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` (a positive integer) degrees of freedom.

    The closed form of Abramowitz & Stegun, Handbook of Mathematical Functions, 26.7.3 (odd df)
    and 26.7.4 (even df), with theta = arctan(|t| / sqrt(df)):

        df = 1:      A = 2 theta / pi
        df odd > 1:  A = (2/pi) [theta + sin(theta) cos(theta) sum_{k=0}^{(df-3)/2} b_k cos^{2k}]
                     b_0 = 1, b_k = b_{k-1} (2k) / (2k + 1)
        df even:     A = sin(theta) sum_{k=0}^{df/2-1} a_k cos^{2k}(theta)
                     a_0 = 1, a_k = a_{k-1} (2k - 1) / (2k)

    e.g. df = 2: A = sin(theta) = t / sqrt(t^2 + 2). Exact for integer df (a finite sum of
    df/2 terms), which the paired test always has (df = pairs - 1).
    """
    if isinstance(df, bool) or int(df) != df or df < 1:
        raise ValueError(f"df must be a positive integer (got {df})")
    df = int(df)
    if np.isnan(t):
        return float("nan")
    theta = math.atan(abs(t) / math.sqrt(df)) if np.isfinite(t) else math.pi / 2
    c2 = math.cos(theta) ** 2
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return min(1.0, math.sin(theta) * total)
    if df == 1:
        return 2 * theta / math.pi
    term, total = 1.0, 1.0
    for k in range(1, (df - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return min(1.0, 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total))


@functools.lru_cache(maxsize=256)
def student_t_critical(level: float, df: int) -> float:
    """The t > 0 with P(|T| <= t) = ``level`` for ``df`` degrees of freedom: the two-sided
    critical value t_{(1+level)/2, df} (e.g. 4.3027 for level 0.95, df 2). Found by bisection
    on theta in (0, pi/2), on which :func:`student_t_central` is increasing; t = sqrt(df)
    tan(theta)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1) (got {level})")
    lo, hi = 0.0, math.pi / 2
    for _ in range(100):  # the bracket halves: 2^-100 pi/2 is below float resolution
        mid = 0.5 * (lo + hi)
        if student_t_central(math.sqrt(df) * math.tan(mid), df) < level:
            lo = mid
        else:
            hi = mid
    return math.sqrt(df) * math.tan(0.5 * (lo + hi))


@dataclass(frozen=True)
class PairedTest:
    """A paired comparison of two methods' metric over shared seeds (:func:`paired_t_test`).

    Attributes:
        n: pairs (seeds both ran, both values finite).
        mean: mean of the differences d_i = x_i - y_i.
        std: their sample standard deviation (ddof = 1); NaN when n < 2.
        low, high: the ``level`` confidence interval mean -+ t_crit std / sqrt(n); NaN when
            n < 2.
        t: the paired t statistic mean / (std / sqrt(n)) (+-inf when every d_i is the same
            non-zero number, NaN when n < 2 or every d_i is 0; "the same" up to rounding: a
            std below 64 machine epsilons of the largest |x_i|, |y_i| counts as 0).
        p: two-sided p-value P(|T_{n-1}| >= |t|) (1 when every d_i is 0, 0 when all are the
            same non-zero number); NaN when n < 2.
    """

    n: int
    mean: float
    std: float
    low: float
    high: float
    t: float
    p: float


def paired_t_test(x: Sequence[float], y: Sequence[float], level: float = 0.95) -> PairedTest:
    """Paired t-test of x against y: x (n,) and y (n,) are two methods' values on the same seeds
    (pair i = seed i); NaN pairs are dropped.

    With d_i = x_i - y_i, dbar their mean and s their sample std (ddof = 1):
    t = dbar / (s / sqrt(n)) on n - 1 degrees of freedom, p = P(|T_{n-1}| >= |t|) (two-sided),
    and the interval dbar -+ t_{(1+level)/2, n-1} s / sqrt(n). The test assumes the differences
    are independent draws from a normal distribution.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of the same length (got {x.shape}, {y.shape})")
    ok = np.isfinite(x) & np.isfinite(y)
    d = (x - y)[ok]
    n = int(d.size)
    nan = float("nan")
    if n == 0:
        return PairedTest(0, nan, nan, nan, nan, nan, nan)
    mean = float(d.mean())
    if n < 2:
        return PairedTest(n, mean, nan, nan, nan, nan, nan)
    std = float(d.std(ddof=1))
    # differences equal but for rounding (0.7 - 0.6 != 0.8 - 0.7) count as equal: a spread
    # below 64 machine epsilons of the values' magnitude is 0
    if std <= 64 * np.finfo(np.float64).eps * float(np.max(np.abs(np.r_[x[ok], y[ok]]))):
        std = 0.0
    se = std / math.sqrt(n)
    half = student_t_critical(level, n - 1) * se
    if se == 0.0:  # every difference the same number
        t = nan if mean == 0 else math.copysign(math.inf, mean)
        p = 1.0 if mean == 0 else 0.0
    else:
        t = mean / se
        p = max(0.0, 1.0 - student_t_central(t, n - 1))
    return PairedTest(n, mean, std, mean - half, mean + half, t, p)


# --------------------------------------------------------------------------------------------
# Tables: (title, header, rows, note); rendered as HTML and Markdown


@dataclass
class _Table:
    id: str
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""
    links: dict[int, list[str]] = field(default_factory=dict)  # column -> href per row


def _target_rows(groups, stats, target):
    rows, any_sim = [], False
    for g, st in zip(groups, stats):
        per = {"mean": [], "min": [], "lt": [], "sim": []}
        for i, run in enumerate(g.runs):
            acc = st.acc[i]  # (R, S)
            with np.errstate(all="ignore"):
                stacked = np.stack([acc.mean(axis=1), acc.min(axis=1)], axis=1)
            hit = rounds_to_target(stacked, st.rounds, target)
            per["mean"].append(hit[0])
            per["min"].append(hit[1])
            cum = st.cumulative[i]
            at = cum.get(int(hit[0]), {}) if not np.isnan(hit[0]) else {}
            per["lt"].append(at.get("local_trainings", np.nan))
            sim = at.get("sim_time", np.nan)
            any_sim |= any("sim_time" in v for v in cum.values())
            per["sim"].append(sim)
        n = len(g.runs)
        reached = int(np.sum(~np.isnan(per["mean"])))
        rows.append([g.label, f"{reached}/{n}", _pm(np.array(per["mean"]), 1),
                     f"{int(np.sum(~np.isnan(per['min'])))}/{n}", _pm(np.array(per["min"]), 1),
                     _pm(np.array(per["lt"]), 0), _pm(np.array(per["sim"]), 1)])
    header = ["group", "mean reached", "rounds (mean acc)", "every task reached",
              "rounds (min acc)", "local trainings until then", "simulated s until then"]
    if not any_sim:
        header, rows = header[:-1], [r[:-1] for r in rows]
    return header, rows


def _sampler(g: Group) -> Any:
    return g.config.get("sampler.name")


def baseline_name(groups: Sequence[Group], baseline: str | None) -> str | None:
    """The sampler the significance table compares with: ``baseline`` (a ConfigError naming
    ``--baseline`` when no group uses it), else :data:`DEFAULT_BASELINE` when some group uses
    it, else None."""
    names = list(dict.fromkeys(str(_sampler(g)) for g in groups))
    if baseline is not None:
        if baseline not in names:
            raise ConfigError("--baseline", "must name a sampler of the runs (one of: "
                              + ", ".join(names) + ")", baseline)
        return baseline
    return DEFAULT_BASELINE if DEFAULT_BASELINE in names else None


def significance_table(groups: Sequence[Group], baseline: str | None,
                       level: float = CONFIDENCE) -> tuple[list[str], list[list[str]], str]:
    """(header, rows, note) of the table comparing every group with its baseline group.

    Each group whose sampler is not ``baseline`` is compared with every group of the
    ``baseline`` sampler whose config is the same except the ``sampler.*`` keys (a grid over
    samplers and, say, the active rate compares like with like). Runs are paired by seed; per
    metric of :data:`COMPARED` the row holds the pairs n, the mean paired difference (group
    minus baseline), its ``level`` interval and the paired t-test (:func:`paired_t_test`).
    With fewer than :data:`MIN_PAIRS` pairs the interval and the p-value are not shown.
    """
    header = ["group", "baseline", "metric", "seed pairs", "group mean", "baseline mean",
              "difference", f"{level:.0%} CI", "t", "p (paired t)", "evidence"]
    note = (f"Each sampler against the baseline sampler ({baseline}) on the same config but for "
            "the sampler's keys. Runs are paired by seed; per pair d = group's final value - "
            "baseline's (summary.json). difference: mean of d over the pairs (group mean, "
            f"baseline mean: over the same seeds); {level:.0%} CI: mean ± t_{(1 + level) / 2:g}"
            "(n-1) x sd(d) / sqrt(n); p: two-sided paired t-test (Student's t on the "
            "differences, n-1 degrees of freedom), assuming normal differences. With fewer than "
            f"{MIN_PAIRS} pairs no interval or p-value is given. No correction for the number "
            "of comparisons: with many rows, some p < 0.05 arise by chance.")
    if baseline is None:
        return header, [], (f"No baseline: no group uses the sampler '{DEFAULT_BASELINE}'; name "
                            "one with mmfl report --baseline NAME.")
    rest = [{k: v for k, v in g.config.items() if not k.startswith("sampler.")} for g in groups]
    base = [i for i, g in enumerate(groups) if _sampler(g) == baseline]
    rows = []
    for gi, g in enumerate(groups):
        if gi in base:
            continue
        for bi in (b for b in base if rest[b] == rest[gi]):
            b = groups[bi]
            seeds = sorted(set(g.seeds) & set(b.seeds))
            for label, key in COMPARED:
                x = _by_seed(g, key, seeds)
                y = _by_seed(b, key, seeds)
                r = paired_t_test(x, y, level)
                ok = np.isfinite(x) & np.isfinite(y)
                shown = r.n >= MIN_PAIRS
                rows.append([
                    g.label, b.label, label, str(r.n),
                    _num(float(np.mean(x[ok])) if r.n else np.nan),
                    _num(float(np.mean(y[ok])) if r.n else np.nan),
                    _signed(r.mean), f"[{_signed(r.low)}, {_signed(r.high)}]" if shown else "–",
                    f"{r.t:.2f}" if shown and not np.isnan(r.t) else "–",
                    _p(r.p) if shown else "–", _evidence(r, level)])
    if not rows:
        note = (f"Every group uses the baseline sampler ({baseline}), or none shares a config "
                "with a baseline group but for the sampler: nothing to compare. " + note)
    return header, rows, note


def _by_seed(g: Group, key: str, seeds: Sequence[int]) -> np.ndarray:
    """(len(seeds),) the group's summary ``key`` for each seed (NaN when missing)."""
    values = dict(zip(g.seeds, g.values(lambda s: s[key])))
    return np.array([values[s] for s in seeds], dtype=np.float64)


def _signed(x: float) -> str:
    return "–" if np.isnan(x) else f"{x:+.4f}"


def _p(p: float) -> str:
    return "–" if np.isnan(p) else ("< 0.0001" if p < 1e-4 else f"{p:.4f}")


def _evidence(r: PairedTest, level: float) -> str:
    if r.n < MIN_PAIRS:
        return (f"too few seeds ({r.n} pair{'s' if r.n != 1 else ''}; {MIN_PAIRS} needed for "
                "a test)")
    alpha = 1 - level
    if r.p < alpha:
        return f"{'better' if r.mean > 0 else 'worse'} (p < {alpha:.2g})"
    return f"not significant (p >= {alpha:.2g})"


def _tables(groups: list[Group], stats: list[_GroupStats], keys: list[str], target: float,
            fraction: str, names: dict[int, str], hrefs: dict[int, str],
            baseline: str | None = None) -> list[_Table]:
    t: list[_Table] = []
    t.append(_Table(
        "groups", "Groups",
        ["group", "runs", "seeds", *keys],
        [[g.label, str(len(g.runs)), ", ".join(map(str, g.seeds)),
          *(_show(g.config[k]) if k in g.config else "–" for k in keys)] for g in groups],
        "Runs with the same config except the seed form a group; the columns show the config keys "
        "that differ between groups."))
    t.append(_Table(
        "accuracy", "Final accuracy",
        ["group", "runs", "mean accuracy", "min accuracy", "mean accuracy (last window)"],
        [[g.label, str(len(g.runs)), _pm(g.values(lambda s: s["mean_accuracy"])),
          _pm(g.values(lambda s: s["min_accuracy"])),
          _pm(g.values(lambda s: s["mean_accuracy_window"]))] for g in groups],
        "Mean and min across tasks at the final evaluation (summary.json), mean ± std over seeds; "
        "the last column averages the last evaluations (the papers' metric)."))
    header, rows, note = significance_table(groups, baseline)
    t.append(_Table("significance", f"Against the baseline{f' ({baseline})' if baseline else ''}",
                    header, rows, note))
    t.append(_Table(
        "fairness", "Fairness across tasks (final)",
        ["group", "mean", "min", "max - min", "variance"],
        [[g.label, _pm(g.values(lambda s: s["mean_accuracy"])),
          _pm(g.values(lambda s: s["min_accuracy"])),
          _pm(g.values(lambda s: s["max_min_accuracy"])),
          _pm(g.values(lambda s: s["accuracy_variance"]), 6)] for g in groups],
        "Statistics of the final per-task accuracies of a run, mean ± std over seeds."))
    t.append(_Table(
        "cost", "Cost and accuracy",
        ["group", "final mean accuracy", *(c.replace("_", " ") for c in COSTS)],
        [[g.label, _pm(g.values(lambda s: s["mean_accuracy"])),
          *(_pm(g.values(lambda s, c=c: s["cost"][c]), 0) for c in COSTS)] for g in groups],
        "Client-side totals per run (summary.json cost), mean ± std over seeds."))
    header, rows = _target_rows(groups, stats, target)
    t.append(_Table(
        "target", f"Rounds to target accuracy {target:.4f}", header, rows,
        f"Target: {fraction}. First evaluated round at which the mean across tasks (and the min, "
        "i.e. every task) reaches it; mean ± std over the seeds that reached it."))
    tasks = list(dict.fromkeys(s for g in groups for s in g.tasks))
    run_rows, links = [], []
    for g in groups:
        for r in g.runs:
            s = r.summary
            run_rows.append([
                names[id(r)], g.label, str(s.get("seed", "")), _num(s.get("mean_accuracy", np.nan)),
                _num(s.get("min_accuracy", np.nan)),
                *(_num(s.get("tasks", {}).get(k, {}).get("accuracy", np.nan)) for k in tasks),
                _count(float(s.get("cost", {}).get("local_trainings", np.nan))),
                _count(float(s.get("cost", {}).get("model_uploads", np.nan)))])
            links.append(hrefs[id(r)])
    t.append(_Table(
        "runs", "Runs",
        ["run", "group", "seed", "mean accuracy", "min accuracy", *(f"{k} accuracy" for k in tasks),
         "local trainings", "model uploads"],
        run_rows, "One row per run directory, its summary.json values.", {0: links}))
    return t


# --------------------------------------------------------------------------------------------
# Plots


def _plots(out: Path, groups: list[Group], stats: list[_GroupStats], target: float
           ) -> list[tuple[str, str, str]]:
    """Write the PNGs; returns (file, title, caption) per plot."""
    labels = [g.label for g in groups]
    tasks = list(dict.fromkeys(s for g in groups for s in g.tasks))
    figs = []

    def task_series(st: _GroupStats, g: Group, task: str, rounds, values):
        if task not in g.tasks:
            return None
        return _band(rounds, values[:, :, g.tasks.index(task)])

    panels = [{"title": task, "series": [task_series(st, g, task, st.rounds, st.acc)
                                         for g, st in zip(groups, stats)]} for task in tasks]
    with np.errstate(all="ignore"):
        mean_series = [_band(st.rounds, st.acc.mean(axis=2)) for st in stats]
    panels.append({"title": "mean over tasks", "series": mean_series,
                   "hline": (target, f"target {target:.3f}")})
    plots.band_panels(out / "accuracy.png", panels, labels, ylabel="test accuracy")
    figs.append(("accuracy.png", "Accuracy per task vs round",
                 "Test accuracy of every task at its evaluated rounds: mean over seeds (line) and "
                 "min..max over seeds (band); the last panel is the mean across tasks with the "
                 "target of the rounds-to-target table."))

    final = np.full((len(groups), len(tasks)), np.nan)
    final_std = np.zeros_like(final)
    for gi, g in enumerate(groups):
        for k, task in enumerate(tasks):
            if task in g.tasks:
                final[gi, k], final_std[gi, k] = _mean_std(
                    g.values(lambda s, t=task: s["tasks"][t]["accuracy"]))
    plots.grouped_bars(out / "tasks.png", tasks, labels, final, final_std,
                       ylabel="final accuracy")
    figs.append(("tasks.png", "Final accuracy per task",
                 "Final test accuracy of every task, mean ± std over seeds: how evenly a method "
                 "serves the tasks."))

    with np.errstate(all="ignore"):
        spread = [_band(st.rounds, st.acc.max(axis=2) - st.acc.min(axis=2)) for st in stats]
    plots.band_panels(out / "fairness.png", [{"title": "max - min accuracy across tasks",
                                              "series": spread}], labels,
                      ylabel="max - min accuracy")
    figs.append(("fairness.png", "Fairness over rounds",
                 "Gap between the best and the worst task at each evaluated round (lower is "
                 "fairer): mean over seeds and min..max band."))

    acc_m, acc_s = zip(*(_mean_std(g.values(lambda s: s["mean_accuracy"])) for g in groups))
    costs = []
    for c in ("local_trainings", "model_uploads"):
        m, s = zip(*(_mean_std(g.values(lambda x, c=c: x["cost"][c])) for g in groups))
        costs.append((c.replace("_", " "), np.array(m), np.array(s)))
    plots.cost_scatter(out / "cost.png", labels, np.array(acc_m), np.array(acc_s), costs)
    figs.append(("cost.png", "Cost vs accuracy",
                 "Final mean accuracy against the total local trainings and model uploads of a "
                 "run (mean ± std over seeds)."))

    for column, title, ylabel, caption in (
            ("loss", "Test loss per task vs round", "test loss",
             "Test loss of every task at its evaluated rounds (metrics.csv loss): mean over "
             "seeds (line) and min..max over seeds (band)."),
            ("train_loss", "Training loss per task vs round", "training loss",
             "Mean local training loss of the updates aggregated into each task's model in each "
             "round (metrics.csv train_loss; none in a round where no client trained the task): "
             "mean over seeds and min..max band.")):
        panels = [{"title": task, "series": [
            task_series(st, g, task, *getattr(st, column)) for g, st in zip(groups, stats)]}
            for task in tasks]
        if any(x is not None for panel in panels for x in panel["series"]):
            plots.band_panels(out / f"{column}.png", panels, labels, ylabel=ylabel)
            figs.append((f"{column}.png", title, caption))

    panels = [{"title": task, "series": [task_series(st, g, task, st.client_rounds, st.clients)
                                         for g, st in zip(groups, stats)],
               "clip_first": True} for task in tasks]
    plots.band_panels(out / "clients.png", panels, labels, ylabel="clients")
    figs.append(("clients.png", "Clients per task over rounds",
                 "Clients whose updates were aggregated into each task's model in each round "
                 "(metrics.csv clients): mean over seeds and min..max band. A first round far "
                 "above the later ones (showing it would more than double the axis; e.g. "
                 "StaleVRE's init = \"full\", where every pair trains) is left off the axis, "
                 "which spans the later rounds: a triangle on the top edge marks it and the "
                 "panel title gives its value."))

    panels = [{"title": f"vs cumulative {key.replace('_', ' ')}",
               "series": [None if not parts else _band_xy(parts)
                          for parts in _against(stats, key)],
               "hline": (target, f"target {target:.3f}")}
              for key in ("local_trainings", "model_uploads")]
    plots.band_panels(out / "cost_curve.png", panels, labels, ylabel="mean test accuracy",
                      xlabel="cumulative count")
    figs.append(("cost_curve.png", "Accuracy vs cost over the run",
                 "Mean accuracy across tasks against the run's cumulative local trainings and "
                 "model uploads (rounds.csv): the papers' trade-off, which method reaches an "
                 "accuracy for the least client work; band: min..max over seeds."))

    sim = _against(stats, "sim_time")
    if any(sim):
        panels = [{"title": "mean accuracy over tasks", "series": [
            None if not parts else _band_xy(parts) for parts in sim],
            "hline": (target, f"target {target:.3f}")}]
        plots.band_panels(out / "sim_time.png", panels, labels, ylabel="test accuracy",
                          xlabel="simulated seconds")
        figs.append(("sim_time.png", "Accuracy vs simulated time",
                     "Mean accuracy across tasks against the simulated clock (rounds.csv "
                     "sim_time); band: min..max over seeds at the shared time points."))
    return figs


def _against(stats: list[_GroupStats], key: str) -> list[list[np.ndarray]]:
    """Per group, per run: (K, 2) points (cumulative ``key`` after round t, mean accuracy
    across tasks after round t) at the evaluated rounds."""
    out = []
    for st in stats:
        parts = []
        for i, cum in enumerate(st.cumulative):
            pts = [(cum[int(t)][key], np.nanmean(st.acc[i, j]))
                   for j, t in enumerate(st.rounds)
                   if key in cum.get(int(t), {}) and not np.all(np.isnan(st.acc[i, j]))]
            if pts:
                parts.append(np.array(pts))
        out.append(parts)
    return out


def _band_xy(parts: list[np.ndarray]):
    """Per-run (time, value) curves on their own x: the mean curve on the union of times, runs
    carried forward; the band spans min..max."""
    xs = np.unique(np.concatenate([p[:, 0] for p in parts]))
    ys = np.full((len(parts), len(xs)), np.nan)
    for i, p in enumerate(parts):
        idx = np.searchsorted(p[:, 0], xs, side="right") - 1
        ok = idx >= 0
        ys[i, ok] = p[idx[ok], 1]
    return _band(xs, ys)


# --------------------------------------------------------------------------------------------
# Rendering

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.note{color:#555;font-size:.9em}figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}code{background:#f6f6f6;padding:0 .2em}
#significance+p+table td{white-space:nowrap}
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.documentElement.setAttribute("data-images-loaded", ok + "/" + imgs.length);
});
"""


def _html_table(t: _Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in t.header)
    body = []
    for i, row in enumerate(t.rows):
        cells = []
        for j, c in enumerate(row):
            text = e(c)
            if j in t.links:
                text = f'<a href="{e(t.links[j][i], quote=True)}">{text}</a>'
            cells.append(f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<h2 id="{t.id}">{e(t.title)}</h2>\n<p class="note">{e(t.note)}</p>\n'
            f"<table><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(body)
            + "\n</tbody></table>")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(t: _Table) -> str:
    lines = [f"## {t.title}", "", t.note, "",
             "| " + " | ".join(_md_cell(h) for h in t.header) + " |",
             "|" + "---|" * len(t.header)]
    for i, row in enumerate(t.rows):
        cells = [_md_cell(c) for c in row]
        for j in t.links:
            cells[j] = f"[{cells[j]}](<{t.links[j][i]}>)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def write_report(run_dirs: Sequence[str | Path], out: str | Path, *,
                 target: float | None = None, baseline: str | None = None) -> Path:
    """Write ``report.html``, ``report.md`` and the PNG plots into ``out``; returns the HTML path.

    Args:
        run_dirs: run directories, or folders searched recursively for them.
        out: report folder (created).
        target: accuracy target for "rounds to target"; default
            :data:`DEFAULT_TARGET_FRACTION` x the best group's final mean accuracy.
        baseline: the sampler (``sampler.name``) the significance table compares every other
            with; default :data:`DEFAULT_BASELINE` when some run uses it (else no comparison).

    Raises:
        ConfigError: ``baseline`` is no sampler of the completed runs (nothing is written).
        ResultsError: a path that does not exist, or no completed run among them.
        MmflError: matplotlib missing (names the ``plot`` extra).
    """
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))
                               or not 0.0 <= target <= 1.0):  # NaN fails too
        raise ConfigError("--target", "must be an accuracy in [0, 1]", target)
    plots.require_matplotlib()
    out = Path(out)
    dirs = ordered_run_dirs(run_dirs)  # a sweep's runs in grid order
    runs: list[RunResults] = []
    left_out: list[tuple[str, str]] = []
    for d in dirs:
        try:
            r = _read_run(d)
        except ResultsError as e:
            left_out.append((str(d), str(e)))
            continue
        status = r.summary.get("status", "?")
        if status != "completed":
            left_out.append((str(d), f"status {status}"))
            continue
        runs.append(r)
    if not runs:
        raise ResultsError("no completed run among " + ", ".join(map(str, run_dirs)) + (
            " (" + "; ".join(f"{p}: {why}" for p, why in left_out) + ")" if left_out else ""))
    groups, keys = group_runs(runs)
    baseline = baseline_name(groups, baseline)
    stats = [_stats(g) for g in groups]
    best = max(_mean_std(g.values(lambda s: s["mean_accuracy"]))[0] for g in groups)
    if target is None:
        target = DEFAULT_TARGET_FRACTION * best
        fraction = (f"{DEFAULT_TARGET_FRACTION:.0%} of the best group's final mean accuracy "
                    f"({best:.4f})")
    else:
        fraction = "given"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ResultsError(f"{out}: cannot create the report folder ({e.strerror or e})") from None
    common = Path(os.path.commonpath([str(r.path.resolve()) for r in runs]))
    if len(runs) == 1:
        common = common.parent
    names = {id(r): _relative(r.path, common) for r in runs}
    hrefs = {id(r): _relative(r.path, out) for r in runs}  # links from the report folder
    tables = _tables(groups, stats, keys, float(target), fraction, names, hrefs, baseline)
    figs = _plots(out, groups, stats, float(target))
    _write_html(out / "report.html", runs, groups, tables, figs, left_out, common)
    _write_md(out / "report.md", runs, groups, tables, figs, left_out, common)
    log.info("report of %d runs in %d groups: %s", len(runs), len(groups), out / "report.html")
    return out / "report.html"


def _setup(runs: list[RunResults]) -> str:
    cfg = runs[0].config
    tasks = ", ".join(f"{t.get('name')} ({t.get('dataset')}/{t.get('model')})"
                      for t in cfg.get("tasks", []))
    clients = cfg.get("clients", {})
    return (f"{cfg.get('name', '?')}: {cfg.get('rounds', '?')} rounds, "
            f"{clients.get('count', '?')} clients, active rate {clients.get('active_rate', '?')}, "
            f"engine {cfg.get('engine', '?')}, tasks {tasks} (the first run's config; groups "
            "differ as listed)")


def _layout(tables: list[_Table], figs):
    """Tables and figures in reading order."""
    by_id = {t.id: t for t in tables}
    fig = {f[0]: f for f in figs}
    order = [by_id["groups"], by_id["accuracy"], by_id["significance"], fig["accuracy.png"],
             fig["tasks.png"], *(fig[f] for f in ("loss.png", "train_loss.png") if f in fig),
             by_id["fairness"], fig["fairness.png"], by_id["cost"], fig["cost.png"],
             fig["cost_curve.png"], by_id["target"]]
    if "sim_time.png" in fig:
        order.append(fig["sim_time.png"])
    order += [fig["clients.png"], by_id["runs"]]
    return order


def _write_html(path: Path, runs, groups, tables, figs, left_out, common: Path) -> None:
    e = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>mmfl report</title>", f"<style>{_CSS}</style>", f"<script>{_SCRIPT}</script>",
        "</head>", "<body>", "<h1>mmfl report</h1>",
        f"<p>{len(runs)} completed runs in {len(groups)} groups, read from "
        f"<code>{e(str(common))}</code>.</p>",
        f'<p class="note">{e(_setup(runs))}</p>',
    ]
    for item in _layout(tables, figs):
        if isinstance(item, _Table):
            parts.append(_html_table(item))
        else:
            file, title, caption = item
            parts.append(f'<h2 id="{e(file[:-4])}">{e(title)}</h2>\n<figure><img src="{e(file)}" '
                         f'alt="{e(title)}"><figcaption>{e(caption)}</figcaption></figure>')
    if left_out:
        parts.append('<h2 id="left-out">Left out</h2><p class="note">Run directories not in the '
                     "statistics.</p><ul>" + "".join(
                         f"<li><code>{e(p)}</code>: {e(why)}</li>" for p, why in left_out)
                     + "</ul>")
    parts += ["</body>", "</html>", ""]
    path.write_text("\n".join(parts), encoding="utf-8")


def _write_md(path: Path, runs, groups, tables, figs, left_out, common: Path) -> None:
    parts = ["# mmfl report", "",
             f"{len(runs)} completed runs in {len(groups)} groups, read from `{common}`.", "",
             _setup(runs), ""]
    for item in _layout(tables, figs):
        if isinstance(item, _Table):
            parts += [_md_table(item), ""]
        else:
            file, title, caption = item
            parts += [f"## {title}", "", f"![{title}]({file})", "", caption, ""]
    if left_out:
        parts += ["## Left out", "", "Run directories not in the statistics.", ""]
        parts += [f"- `{p}`: {why}" for p, why in left_out] + [""]
    path.write_text("\n".join(parts), encoding="utf-8")
