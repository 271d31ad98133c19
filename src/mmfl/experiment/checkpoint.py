"""Resumable checkpoints: one safetensors file, written atomically.

Arrays (model parameters, allocator / aggregator state, last losses) are stored as tensors and
the rest (round, cost totals) as JSON metadata, so loading never unpickles anything. The file is
written to a temporary name, fsynced and renamed over the previous checkpoint: a kill -9 at any
moment leaves either the old or the new checkpoint, never a torn one. No RNG state is stored:
every random stream is derived from (seed, purpose, round, ...) (see :mod:`mmfl.rng`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from mmfl.errors import ResultsError

FORMAT = "mmfl-checkpoint-1"


def save(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any], *,
         durable: bool = True) -> None:
    """Atomically write ``arrays`` and JSON-able ``meta`` to ``path`` (a temporary file renamed
    over it). ``durable``: fsync the new file before the rename, so that it survives a system
    crash (about 4 ms on a local disk; without it, a kill -9 still never sees a torn file). The
    directory is not fsynced: after a system crash the name may still point at the previous
    checkpoint, which is as consistent as the new one (each carries the state of its own round,
    see :class:`mmfl.experiment.results.RunWriter`)."""
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "meta": json.dumps(meta, sort_keys=True)})
    if durable:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint written by :func:`save`; ResultsError if it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
        arrays = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ResultsError(f"{path}: unreadable checkpoint ({e})") from None
    if header.get("format") != FORMAT:
        raise ResultsError(f"{path}: not an mmfl checkpoint (format {header.get('format')!r})")
    try:
        meta = json.loads(header.get("meta", ""))
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        raise ResultsError(f"{path}: damaged checkpoint (its metadata is not a JSON object)")
    return arrays, meta
