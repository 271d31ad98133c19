"""Client system profiles from the config: lognormal distributions or a trace file.

Trace CSV (``[system] trace = "path.csv"``): a header ``client,speed,bandwidth,availability`` and
one row per client 0..N-1; speed is relative to ``flops_per_second``, bandwidth in bytes/s,
availability the probability of being online in a round.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from mmfl.core.clock import SystemProfile, draw_profile
from mmfl.errors import DataError
from mmfl.experiment.config import ExperimentConfig
from mmfl.rng import SYSTEM, stream

TRACE_COLUMNS = ("client", "speed", "bandwidth", "availability")


def read_table(path: str | Path, key: str, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of the CSV file ``path`` given by config key ``key`` (a header with at least
    ``columns``); DataError (one line, naming the file and the key) when it cannot be read."""
    p = Path(path)
    try:
        with open(p, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise DataError(f"{p}: cannot read {key} ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: {key} is not a UTF-8 text file (byte {e.start}: "
                        f"{e.reason})") from None
    except csv.Error as e:  # a NUL byte, a field beyond the size limit
        raise DataError(f"{p}: {key} is not a readable CSV file ({e})") from None
    if not rows or set(columns) - set(rows[0]):
        raise DataError(f"{p}: {key} needs the columns {','.join(columns)}")
    return rows


def load_trace(path: str | Path, num_clients: int) -> SystemProfile:
    """Read a trace CSV; DataError (one line, naming the file and row) when it is malformed."""
    p = Path(path)
    rows = read_table(p, "system.trace", TRACE_COLUMNS)
    speed, bandwidth, avail = np.ones(num_clients), np.ones(num_clients), np.ones(num_clients)
    seen = np.zeros(num_clients, bool)
    for k, row in enumerate(rows, start=2):
        try:
            i = int(row["client"])
            vals = float(row["speed"]), float(row["bandwidth"]), float(row["availability"])
        except (TypeError, ValueError):
            shown = ", ".join(f"{c}={row.get(c)!r}" for c in TRACE_COLUMNS)[:160]
            raise DataError(f"{p}:{k}: malformed row ({shown}); expected an integer client "
                            "and numbers speed, bandwidth, availability") from None
        if not 0 <= i < num_clients:
            raise DataError(f"{p}:{k}: client {i} outside 0..{num_clients - 1}")
        if not all(math.isfinite(v) for v in vals):
            raise DataError(f"{p}:{k}: speed, bandwidth and availability must be finite "
                            f"(got {vals[0]!r}, {vals[1]!r}, {vals[2]!r})")
        if vals[0] <= 0 or vals[1] <= 0 or not 0 <= vals[2] <= 1:
            raise DataError(f"{p}:{k}: speed and bandwidth must be > 0, availability in [0, 1]")
        speed[i], bandwidth[i], avail[i] = vals
        seen[i] = True
    if not seen.all():
        raise DataError(f"{p}: system.trace has no row for client {int(np.argmin(seen))}")
    return SystemProfile(speed, bandwidth, avail)


def build_profile(cfg: ExperimentConfig) -> SystemProfile:
    """The run's profile: the trace when given, else draws from ``[system]`` distributions."""
    n = cfg.clients.count
    if cfg.system.trace:
        return load_trace(cfg.system.trace, n)
    sy = cfg.system
    return draw_profile(n, speed_sigma=sy.speed_sigma, bandwidth=sy.bandwidth,
                        bandwidth_sigma=sy.bandwidth_sigma, availability=cfg.clients.availability,
                        rng=stream(cfg.seed, SYSTEM))
