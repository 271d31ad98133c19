"""Run directories as pandas DataFrames (the ``analysis`` extra: ``pip install 'mmfl[analysis]'``).

The contract::

    mmfl.read_results(run_dir).to_frame("metrics")   # one run: "metrics", "rounds" or "summary"
    mmfl.collect(["runs/sw"], table="metrics")       # many runs or sweeps in one frame

- ``metrics``: one row per round and task, the columns of ``metrics.csv``; ``rounds``: one row
  per round, the columns of ``rounds.csv``. Every column is numeric (int64 where every cell
  holds an integer, else float64; an empty cell, e.g. the accuracy of a round that was not
  evaluated, is NaN) except the text columns ``task`` and ``note``.
- ``summary``: one row per run, ``summary.json`` flattened with dotted names
  (``tasks.digits.accuracy``, ``cost.local_trainings``, ``time_to_accuracy.digits.0.5.round``);
  null is NaN; ``name``, ``status``, ``sampler``, ``aggregator``, ``engine`` are text.
- :func:`collect` puts in front of a table's columns ``run`` (the run directory), the grid keys
  of the sweeps the runs belong to (``sampler.name``, ``clients.active_rate``, ...: dotted config
  keys, in grid order, valued from the sweep's ``index.json`` or, for a run that did not vary a
  key, from its ``config.toml``; a table value as its TOML text) and ``seed``.

pandas is imported on first use only; without it these functions raise a one-line
:class:`~mmfl.errors.MmflError` naming the extra.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from mmfl.errors import ConfigError, MmflError, ResultsError
from mmfl.experiment.results import INDEX

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from mmfl.experiment.results import RunResults

__all__ = ["TABLES", "TEXT_COLUMNS", "collect", "require_pandas", "run_frame"]

#: the tables a frame can be made of
TABLES = ("metrics", "rounds", "summary")
#: columns that hold text (every other column of metrics.csv / rounds.csv is a number)
TEXT_COLUMNS = ("task", "note")
#: text fields of summary.json
SUMMARY_TEXT = ("name", "status", "sampler", "aggregator", "engine")


def require_pandas():
    """The pandas module, or a one-line MmflError saying how to install it."""
    try:
        import pandas
    except ImportError:
        raise MmflError("DataFrames need pandas, which is not installed: "
                        "pip install 'mmfl[analysis]' (or pip install pandas)") from None
    return pandas


def _check_table(table: str) -> None:
    if table not in TABLES:
        raise ConfigError("table", f"must be one of {', '.join(TABLES)}", table)


def run_frame(res: RunResults, table: str) -> pd.DataFrame:
    """``table`` ("metrics", "rounds" or "summary") of one run as a DataFrame (see the module
    docstring for the columns and dtypes)."""
    _check_table(table)
    pd = require_pandas()
    if table == "summary":
        return _summary_frame(pd, res.summary)
    from mmfl.experiment.results import METRICS_COLUMNS, ROUNDS_COLUMNS

    rows = res.metrics if table == "metrics" else res.rounds
    columns = list(rows[0]) if rows else list(
        METRICS_COLUMNS if table == "metrics" else ROUNDS_COLUMNS)
    path = res.path / f"{table}.csv"
    data: dict[str, Any] = {}
    for c in columns:
        cells = [r.get(c) for r in rows]
        if c in TEXT_COLUMNS:
            data[c] = pd.Series(["" if v is None else str(v) for v in cells], dtype=str)
            continue
        cells = [None if v is None or v == "" else v for v in cells]
        try:
            col = pd.to_numeric(pd.Series(cells, dtype=object), errors="raise")
        except (ValueError, TypeError):
            bad = next((v for v in cells if v is not None and not _is_number_text(v)), None)
            raise ResultsError(f"{path}: column {c} holds a value that is not a number "
                               f"({str(bad)[:40]!r}); the table is damaged") from None
        data[c] = col if col.dtype != object else col.astype("float64")  # all cells empty
    return pd.DataFrame(data, columns=columns)


def _is_number_text(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def _flatten_summary(summary: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(v: Any, key: str) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, f"{key}.{k}" if key else str(k))
        elif isinstance(v, list):
            out[key] = json.dumps(v)
        else:
            out[key] = v

    for k, v in summary.items():
        if k == "time_to_accuracy" and isinstance(v, dict):
            # task -> target -> {round, sim_time} or null: the same columns either way
            for task, targets in v.items():
                for target, hit in (targets or {}).items():
                    hit = hit if isinstance(hit, dict) else {}
                    for field in ("round", "sim_time"):
                        out[f"{k}.{task}.{target}.{field}"] = hit.get(field)
        else:
            walk(v, k)
    return out


def _summary_frame(pd, summary: dict[str, Any]) -> pd.DataFrame:
    flat = _flatten_summary(summary)
    df = pd.DataFrame([flat], columns=list(flat))
    return _numeric_columns(pd, df, keep=SUMMARY_TEXT)


def _numeric_columns(pd, df: pd.DataFrame, keep: Sequence[str] = ()) -> pd.DataFrame:
    """Columns whose cells are all numbers or missing become numeric (None -> NaN)."""
    for c in df.columns:
        if c in keep:
            continue
        values = list(df[c])
        if all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
               or (isinstance(v, float) and math.isnan(v)) for v in values):
            df[c] = pd.to_numeric(pd.Series([math.nan if v is None else v for v in values],
                                            index=df.index, dtype=object))
            if df[c].dtype == object:
                df[c] = df[c].astype("float64")
    return df


# --------------------------------------------------------------------------------------------
# Many runs


def ordered_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """:func:`~mmfl.experiment.results.find_run_dirs`, a sweep's runs in plan (grid) order."""
    from mmfl.experiment.results import find_run_dirs

    found: list[Path] = []
    for p in map(Path, paths):
        below = find_run_dirs([p])
        index = None if (p / "summary.json").is_file() else _read_index(p / INDEX)
        if index is not None:  # a sweep: its runs in plan (grid) order, then any others
            order = {name: i for i, name in enumerate(index["runs"])}
            below.sort(key=lambda d: order.get(d.relative_to(p).as_posix(), len(order)))
        found.extend(below)
    return list(dict.fromkeys(found))


def _sweep_of(run_dir: Path, cache: dict[Path, dict | None]) -> tuple[dict, str] | None:
    """(index.json of the sweep that ``run_dir`` belongs to, the run's name in it), or None."""
    here = run_dir.resolve()
    for parent in list(here.parents)[:12]:
        if parent not in cache:  # an unreadable or foreign index.json up there is not ours
            try:
                cache[parent] = _read_index(parent / INDEX)
            except ResultsError:
                cache[parent] = None
        index = cache[parent]
        if index is not None:
            name = here.relative_to(parent).as_posix()
            if name in index["runs"]:
                return index, name
    return None


def _read_index(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise ResultsError(f"{path}: not a JSON object (damaged or not written by mmfl)") from None
    if not (isinstance(doc, dict) and isinstance(doc.get("runs"), dict)):
        raise ResultsError(f"{path}: not a sweep index (no runs table)")
    grid = doc.get("grid")
    doc["grid"] = grid if isinstance(grid, dict) else {}
    return doc


def config_value(config: dict[str, Any], key: str) -> Any:
    """The value of dotted ``key`` in a resolved config dict (``tasks[1].lr``, ``tasks.1.lr``
    and ``tasks.NAME.lr`` address tasks); None when it has no such key."""
    import re

    node: Any = config
    for piece in key.split("."):
        m = re.fullmatch(r"([^\[\]]+)((?:\[\d+\])*)", piece)
        if not m:
            return None
        for part in [m.group(1), *re.findall(r"\[(\d+)\]", m.group(2))]:
            if isinstance(node, list):
                if part.isdigit() and int(part) < len(node):
                    node = node[int(part)]
                else:
                    node = next((t for t in node if isinstance(t, dict)
                                 and t.get("name") == part), None)
            elif isinstance(node, dict):
                node = node.get(part)
            else:
                return None
            if node is None:
                return None
    return node


def _cell(v: Any) -> Any:
    """A grid value as a frame cell: scalars as they are, tables and arrays as TOML text."""
    if isinstance(v, (dict, list, tuple)):
        from mmfl.experiment import tomlio

        return tomlio.scalar(v)
    return v


def collect(paths: str | Path | Sequence[str | Path], table: str = "metrics") -> pd.DataFrame:
    """One DataFrame of ``table`` ("metrics", "rounds" or "summary") over every run directory
    among ``paths`` (run directories, sweep folders, or folders holding runs anywhere below).

    Columns: ``run`` (the run directory), the grid keys of the sweeps the runs belong to (in
    grid order), ``seed``, then the table's columns (:meth:`RunResults.to_frame`). Rows: runs in
    the order found (sorted below each folder), each run's rows in file order.

    Raises:
        ResultsError: a path that does not exist or holds no run, or a run directory or
            index.json that cannot be read (naming the file).
        MmflError: pandas is not installed (install the ``analysis`` extra).
    """
    _check_table(table)
    pd = require_pandas()
    from mmfl.experiment.results import read_results

    if isinstance(paths, (str, Path)):
        paths = [paths]
    dirs = ordered_run_dirs(paths)
    cache: dict[Path, dict | None] = {}
    sweeps = [_sweep_of(d, cache) for d in dirs]
    keys: list[str] = []
    for s in sweeps:
        if s is not None:
            keys.extend(k for k in s[0]["grid"] if k not in keys and k != "seed")
    frames = []
    for d, s in zip(dirs, sweeps):
        res = read_results(d)
        frame = run_frame(res, table)
        overrides = {}
        if s is not None:
            entry = s[0]["runs"].get(s[1])
            overrides = entry.get("overrides", {}) if isinstance(entry, dict) else {}
            overrides = overrides if isinstance(overrides, dict) else {}
        ids: dict[str, Any] = {"run": str(d)}
        for k in keys:
            ids[k] = _cell(overrides[k] if k in overrides else config_value(res.config, k))
        seed = res.config.get("seed", res.summary.get("seed"))
        ids["seed"] = seed
        frame = frame.drop(columns=[c for c in ids if c in frame.columns])
        for pos, (k, v) in enumerate(ids.items()):
            frame.insert(pos, k, pd.Series([v] * len(frame), index=frame.index, dtype=object))
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True)
    df["run"] = df["run"].astype(str)
    return _numeric_columns(pd, df, keep=[c for c in df.columns
                                         if c == "run" or df[c].dtype != object])
