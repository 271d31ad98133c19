"""A federation read from a file instead of drawn (``clients.federation_file``): for paired
comparisons with another code (docs/reproduction.md), or a deployment's real layout.

The file is JSON::

    {"membership": [[0 or 1, ...S], ...N],       # client i holds task s
     "processors": [B_1, ..., B_N],              # processors per client, >= 1
     "indices":    [[[j, ...], ...N], ...S]}     # per task, per client: sample indices into
                                                 # the task's training split (file order)

Indices of a client that does not hold the task are ignored (such a pair never trains). The
tasks' ``train_samples`` must be 0 (the indices refer to the whole split), and
``clients.count`` must equal N.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmfl.errors import ConfigError, DataError

__all__ = ["FixedFederation", "read_federation_file"]


@dataclass(frozen=True)
class FixedFederation:
    """``membership`` (N, S) bool, ``processors`` (N,) int, ``indices[s][i]`` (n_{i,s},)."""

    membership: np.ndarray
    processors: np.ndarray
    indices: list[list[np.ndarray]]


def read_federation_file(path: str | Path, num_clients: int, num_tasks: int,
                         train_sizes: list[int]) -> FixedFederation:
    """Read and check a federation file; DataError naming the file and what is wrong."""
    path = Path(path).expanduser()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise DataError(f"{path}: cannot read the federation file ({e})") from None

    def bad(what: str) -> DataError:
        return DataError(f"{path}: {what}")

    if not isinstance(raw, dict) or {"membership", "processors", "indices"} - set(raw):
        raise bad("needs the keys membership, processors and indices")
    try:
        member = np.asarray(raw["membership"], dtype=np.int64)
        procs = np.asarray(raw["processors"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise bad("membership and processors must be integer arrays") from None
    if member.shape != (num_clients, num_tasks) or not np.isin(member, (0, 1)).all():
        raise bad(f"membership must be {num_clients} x {num_tasks} zeros and ones (clients.count "
                  f"x tasks), got shape {member.shape}")
    if procs.shape != (num_clients,) or (procs < 1).any():
        raise bad(f"processors must be {num_clients} integers >= 1")
    idx = raw["indices"]
    if not isinstance(idx, list) or len(idx) != num_tasks:
        raise bad(f"indices must hold one list per task ({num_tasks})")
    indices: list[list[np.ndarray]] = []
    for s, per_client in enumerate(idx):
        if not isinstance(per_client, list) or len(per_client) != num_clients:
            raise bad(f"indices[{s}] must hold one list per client ({num_clients})")
        rows = []
        for i, a in enumerate(per_client):
            try:
                arr = np.asarray(a, dtype=np.int64).reshape(-1)
            except (TypeError, ValueError, OverflowError):
                raise bad(f"indices[{s}][{i}] must be a list of integers") from None
            if len(arr) and (arr.min() < 0 or arr.max() >= train_sizes[s]):
                raise bad(f"indices[{s}][{i}] reaches outside task {s}'s {train_sizes[s]} "
                          "training samples")
            rows.append(np.sort(arr) if member[i, s] else np.zeros(0, np.int64))
        indices.append(rows)
    if not member.any(axis=0).all():
        s = int(np.flatnonzero(~member.any(axis=0))[0])
        raise ConfigError("clients.federation_file", f"no client holds task {s}", str(path))
    return FixedFederation(member.astype(bool), procs, indices)
