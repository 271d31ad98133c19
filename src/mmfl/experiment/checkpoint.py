"""Resumable checkpoints: one safetensors file, written atomically, and the row files of the
per-pair stores.

Arrays (model parameters, allocator / aggregator state, last losses) are stored as tensors and
the rest (round, cost totals) as JSON metadata, so loading never unpickles anything. The file is
written to a temporary name, fsynced and renamed over the previous checkpoint: a kill -9 at any
moment leaves either the old or the new checkpoint, never a torn one. No RNG state is stored:
every random stream is derived from (seed, purpose, round, ...) (see :mod:`mmfl.rng`).

The per-pair stores (stale updates h, probe updates, SCAFFOLD's client controls; one row per
(client, task) pair, :class:`mmfl.engines.pair_store.PairStore`) are too large to rewrite every
round, so their rows travel in a :class:`RowLog`: each checkpoint writes the rows changed since
the previous one into one new, immutable file in ``checkpoint-rows/``, and the checkpoint itself
holds the manifest (which file holds the latest version of each row, each file's CRC-32s).
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from mmfl.errors import ResultsError
from mmfl.experiment.results import CHECKPOINT_ROWS, RECOVER

FORMAT = "mmfl-checkpoint-1"
#: the format of a row file (:class:`RowLog`)
ROWS_FORMAT = "mmfl-checkpoint-rows-1"
#: the row files of a checkpoint hold at most this many times the bytes of the rows they keep
#: (older files whose rows were mostly rewritten since are compacted away, oldest first)
ROWS_SPACE = 1.5


def crc32(a: np.ndarray) -> int:
    """CRC-32 of an array's bytes: detects damage to a checkpoint's tensors."""
    return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def save(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any], *,
         durable: bool = True, fmt: str = FORMAT) -> None:
    """Atomically write ``arrays`` and JSON-able ``meta`` to ``path`` (a temporary file renamed
    over it). ``durable``: fsync the new file before the rename, so that it survives a system
    crash (about 4 ms on a local disk; without it, a kill -9 still never sees a torn file). The
    directory is not fsynced: after a system crash the name may still point at the previous
    checkpoint, which is as consistent as the new one (each carries the state of its own round,
    see :class:`mmfl.experiment.results.RunWriter`)."""
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    save_file(tensors, str(tmp), metadata={"format": fmt, "meta": json.dumps(meta, sort_keys=True)})
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


def load_with_rows(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """:func:`load`, with the rows of the per-pair stores as checkpoints before the row log
    held them: ``<prefix>.h.<s>`` (rows_s, D_s), assembled from the row files in
    ``checkpoint-rows/`` next to ``path`` (to inspect a checkpoint; resuming reads the rows into
    the stores directly)."""
    arrays, meta = load(path)
    manifest = meta.get("rows")
    if manifest is None:
        return arrays, meta
    stores = {}
    for p, info in manifest["stores"].items():
        n = [len(arrays[f"{RowLog.KEY}.{p}.owner.{s}"]) for s in range(len(info["dims"]))]
        stores[p] = _Rows([np.zeros((k, d), info["dtype"]) for k, d in zip(n, info["dims"])])
    RowLog(path.parent / CHECKPOINT_ROWS, stores).restore(arrays, manifest)
    for p, st in stores.items():
        arrays.update({f"{p}.h.{s}": r for s, r in enumerate(st.rows)})
    return arrays, meta


class _Rows:
    """The rows of a store without the store (what :class:`RowLog` reads and writes)."""

    def __init__(self, rows: list[np.ndarray]):
        self.rows = rows
        self.dirty = [np.zeros(len(r), bool) for r in rows]


class RowLog:
    """The rows of the per-pair stores, checkpointed incrementally.

    Each store (a :class:`~mmfl.engines.pair_store.PairStore`: per task s, ``rows[s]``
    (rows_s, D_s) and ``dirty[s]`` (rows_s,) bool) is named by its checkpoint prefix. A
    checkpoint (:meth:`write`) puts the rows changed since the previous one, of every store,
    into one new file ``checkpoint-rows/rows-<id>.safetensors`` (tensors ``<prefix>.rows.<s>``, the
    row numbers, and ``<prefix>.h.<s>``, those rows), fsynced, never modified afterwards. The
    checkpoint holds the manifest: per store and task the (rows_s,) int64 ``owner``, the id of
    the file with the row's latest version (-1: never written, zero), and each file's CRC-32s.
    A file stays while it holds a row's latest version; when the files hold more than
    :data:`ROWS_SPACE` times the bytes of the rows they keep, the rows of the oldest files are
    written again into the new file and those files go. A checkpoint thus writes the changed
    rows, plus the still-current rows of the files compacted away (amortised a fraction of the
    changed rows in the tests), and the folder holds at most :data:`ROWS_SPACE` times the
    stored rows (with ``stale_on_disk``, next to the memory-mapped store itself).

    Crash guarantee: a row file is complete and fsynced before the checkpoint that refers to
    it replaces the previous one, and files are deleted only after the checkpoint that stopped
    referring to them; a kill -9 leaves the previous checkpoint with all its files, and files
    that no checkpoint refers to are removed on the next save or resume.
    """

    KEY = "rowlog"

    def __init__(self, folder: Path, stores: dict[str, Any]):
        self.folder = folder
        self.stores = stores
        self.owner = {p: [np.full(len(r), -1, np.int64) for r in st.rows]
                      for p, st in stores.items()}
        self.files: dict[int, dict[str, Any]] = {}  # id -> {"bytes": payload, "crc32": {...}}
        self.next_id = 1

    def path(self, fid: int) -> Path:
        return self.folder / f"rows-{fid:06d}.safetensors"

    def _row_bytes(self, p: str, s: int) -> int:
        r = self.stores[p].rows[s]
        return int(r.shape[1]) * r.dtype.itemsize

    def write(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Write the changed rows (and those of compacted files) into a new row file; returns
        the checkpoint's arrays (``rowlog.<prefix>.owner.<s>``) and manifest (its metadata
        ``rows``). Call :meth:`committed` once the checkpoint is saved."""
        sel = {p: [d.copy() for d in st.dirty] for p, st in self.stores.items()}
        live = new = 0  # bytes of the rows kept after this checkpoint, of the new file
        kept: dict[int, int] = {}  # file id -> bytes of the latest rows it still holds
        for p, owners in self.owner.items():
            for s, o in enumerate(owners):
                rb = self._row_bytes(p, s)
                live += int(((o >= 0) | sel[p][s]).sum()) * rb
                new += int(sel[p][s].sum()) * rb
                for fid, n in zip(*np.unique(o[(o >= 0) & ~sel[p][s]], return_counts=True)):
                    kept[int(fid)] = kept.get(int(fid), 0) + int(n) * rb
        total = sum(self.files[f]["bytes"] for f in kept)
        for fid in sorted(kept):  # compaction: the oldest files' rows move to the new file
            if total + new <= ROWS_SPACE * live:
                break
            for p, owners in self.owner.items():
                for s, o in enumerate(owners):
                    sel[p][s] |= o == fid
            new, total = new + kept.pop(fid), total - self.files[fid]["bytes"]
        self.files = {f: self.files[f] for f in kept}
        if new:
            fid, self.next_id = self.next_id, self.next_id + 1
            tensors = {}
            for p, st in self.stores.items():
                for s, m in enumerate(sel[p]):
                    if m.any():
                        idx = np.flatnonzero(m)
                        tensors[f"{p}.rows.{s}"] = idx.astype(np.int64)
                        tensors[f"{p}.h.{s}"] = np.asarray(st.rows[s][idx])
                        self.owner[p][s][idx] = fid
            self.folder.mkdir(parents=True, exist_ok=True)
            save(self.path(fid), tensors, {"id": fid}, durable=True, fmt=ROWS_FORMAT)
            self.files[fid] = {"bytes": new, "crc32": {k: crc32(v) for k, v in tensors.items()}}
        arrays = {f"{self.KEY}.{p}.owner.{s}": o.copy()
                  for p, owners in self.owner.items() for s, o in enumerate(owners)}
        manifest = {"next": self.next_id,
                    "files": {str(f): info for f, info in sorted(self.files.items())},
                    "stores": {p: {"dtype": str(st.rows[0].dtype),
                                   "dims": [int(r.shape[1]) for r in st.rows]}
                               for p, st in self.stores.items()}}
        return arrays, manifest

    def committed(self) -> None:
        """After the checkpoint of :meth:`write` is saved: rows are clean, and files it no
        longer refers to are deleted."""
        for st in self.stores.values():
            for d in st.dirty:
                d[...] = False
        self.remove_unreferenced()

    def remove_unreferenced(self) -> list[str]:
        """Delete the row files (and temporary files) no checkpoint refers to; their names."""
        if not self.folder.is_dir():
            return []
        keep = {self.path(f).name for f in self.files}
        gone = []
        for q in sorted(self.folder.iterdir()):
            if q.name.startswith("rows-") and q.name not in keep and q.is_file():
                q.unlink()
                gone.append(q.name)
        return gone

    def restore(self, arrays: dict[str, np.ndarray], manifest: dict[str, Any] | None) -> None:
        """Fill the stores from the checkpoint's ``arrays`` and ``manifest`` (its metadata
        ``rows``) and their row files. Without a manifest (a checkpoint written before the row
        log) the stores' rows came with the checkpoint's arrays (``<prefix>.h.<s>``, loaded by
        the stores' ``load_state_dict``, which marks them changed for the next checkpoint).

        Raises ResultsError naming the file when a row file is missing or damaged; KeyError or
        ValueError when the checkpoint's own arrays do not fit the stores."""
        self.files, self.next_id = {}, 1
        if manifest is None:
            for p, st in self.stores.items():
                for s in range(len(st.rows)):
                    if f"{p}.h.{s}" not in arrays:
                        raise KeyError(f"{p}.h.{s}")
                self.owner[p] = [np.full(len(r), -1, np.int64) for r in st.rows]
            return
        self.files = {int(f): info for f, info in manifest["files"].items()}
        self.next_id = int(manifest["next"])
        for p, st in self.stores.items():
            for s, r in enumerate(st.rows):
                o = np.asarray(arrays[f"{self.KEY}.{p}.owner.{s}"], np.int64)
                if o.shape != (len(r),) or not np.isin(o[o >= 0], list(self.files)).all():
                    raise ValueError(f"{self.KEY}.{p}.owner.{s} does not fit the store")
                self.owner[p][s] = o.copy()
                r[...] = 0
                st.dirty[s][...] = False
        for fid in sorted(self.files):
            self._read(fid)

    def _read(self, fid: int) -> None:
        from safetensors import safe_open

        path, want = self.path(fid), self.files[fid]["crc32"]
        if not path.is_file():
            raise ResultsError(f"{path}: missing (the checkpoint keeps rows in it); {RECOVER}")

        def damaged(what: str) -> ResultsError:
            return ResultsError(f"{path}: damaged checkpoint rows ({what}); {RECOVER}")

        found = 0
        try:
            with safe_open(str(path), framework="numpy") as f:
                if (f.metadata() or {}).get("format") != ROWS_FORMAT:
                    raise damaged("not a row file")
                if set(f.keys()) != set(want):
                    raise damaged("its tensors are not those the checkpoint recorded")
                tensors = {k: f.get_tensor(k) for k in f.keys() if ".rows." in k}
                for k, idx in tensors.items():
                    p, s = k.split(".rows.")[0], int(k.rsplit(".", 1)[1])
                    h = f.get_tensor(f"{p}.h.{s}")
                    if crc32(idx) != want[k] or crc32(h) != want[f"{p}.h.{s}"]:
                        raise damaged(f"tensor {p}.h.{s} checksum mismatch")
                    store, owner = self.stores[p], self.owner[p][s]
                    if idx.ndim != 1 or h.shape != (len(idx), store.rows[s].shape[1]) \
                            or h.dtype != store.rows[s].dtype \
                            or (len(idx) and not 0 <= idx.min() <= idx.max() < len(owner)):
                        raise damaged(f"tensor {p}.h.{s} does not fit the store")
                    mine = owner[idx] == fid
                    store.rows[s][idx[mine]] = h[mine]
                    found += int(mine.sum())
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise damaged(f"{type(e).__name__}: {e}") from None
        if found != sum(int((o == fid).sum()) for owners in self.owner.values() for o in owners):
            raise damaged("rows the checkpoint keeps in it are absent")
