"""The per-pair vector store of the server: one row per (client, task) pair with data, used for
the last update h_{i,s} (docs/algorithms.md section 6), StaleVRE's probe updates, and SCAFFOLD's
control variates (:class:`ControlVariates`, the same per-pair row layout).

Memory is O(sum_s holders_s * D_s): one row per client that holds task s, never for the others.
Rows can be kept in float32 (exact), float16 (half the memory; h is an approximation anyway
and stale-update aggregation is unbiased for any h), and in memory or in a memory-mapped file on
disk (``path``), so that a large federation's stale updates need not fit in RAM.

A store remembers which rows changed since its last checkpoint (``dirty``): checkpoints write
only those rows (:class:`mmfl.experiment.checkpoint.RowLog`), not the whole store.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

DTYPES = {"float32": np.float32, "float16": np.float16}


class PairStore:
    """h_{i,s} for every pair with data; zero until the pair is first active.

    Args:
        holds: (N, S) bool, which clients hold which tasks.
        dims: (S,) parameter count D_s of each task's model.
        dtype: "float32" or "float16".
        path: folder for memory-mapped storage (one ``stale-<s>.bin`` per task), or None (RAM).
    """

    def __init__(self, holds: np.ndarray, dims: list[int], *, dtype: str = "float32",
                 path: str | Path | None = None):
        self.holds = np.asarray(holds, bool)
        self.dims = [int(d) for d in dims]
        self.dtype = DTYPES[dtype]
        self.row = np.full(self.holds.shape, -1, dtype=np.int64)  # (N, S) client -> row
        self.rows: list[np.ndarray] = []
        for s, d in enumerate(self.dims):
            holders = np.flatnonzero(self.holds[:, s])
            self.row[holders, s] = np.arange(len(holders))
            shape = (len(holders), d)
            if path is None:
                self.rows.append(np.zeros(shape, dtype=self.dtype))
            else:
                Path(path).mkdir(parents=True, exist_ok=True)
                self.rows.append(np.lib.format.open_memmap(
                    Path(path) / f"stale-{s}.npy", mode="w+", dtype=self.dtype, shape=shape))
        self.stored = np.zeros(self.holds.shape, dtype=bool)   # (N, S) h ever written
        self.norm_sq = np.zeros(self.holds.shape)               # (N, S) ||h||^2 as stored
        #: per task s, (rows_s,) bool: rows written since the last checkpoint
        self.dirty = [np.zeros(len(r), dtype=bool) for r in self.rows]

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored updates."""
        return int(sum(r.nbytes for r in self.rows))

    def _rows(self, s: int, clients: np.ndarray) -> np.ndarray:
        r = self.row[np.asarray(clients, np.int64), s]
        if (r < 0).any():
            raise ValueError(f"task {s}: clients without data have no stale update")
        return r

    def get(self, s: int, clients: np.ndarray) -> torch.Tensor:
        """(k, D_s) float32 tensor of h for ``clients`` (zeros where never stored)."""
        return torch.from_numpy(np.asarray(self.rows[s][self._rows(s, clients)], np.float32))

    def put(self, s: int, clients: np.ndarray, updates: torch.Tensor) -> None:
        """h_{i,s} <- G_{i,s} for ``clients`` ((k,) int) and ``updates`` ((k, D_s))."""
        r = self._rows(s, clients)
        values = updates.detach().numpy().astype(self.dtype)
        self.rows[s][r] = values
        self.dirty[s][r] = True
        self.stored[clients, s] = True
        self.norm_sq[clients, s] = np.square(values.astype(np.float64)).sum(axis=1)

    def dots(self, s: int, clients: np.ndarray, updates: torch.Tensor) -> np.ndarray:
        """(k,) float64 <G_k, h_k> for ``clients`` and their fresh ``updates`` (k, D_s)."""
        h = self.get(s, clients).double()
        return (h * updates.double()).sum(dim=1).numpy()

    @property
    def pair_store(self) -> "PairStore":
        """The rows a checkpoint writes incrementally (this store)."""
        return self

    def state_dict(self, *, rows: bool = True) -> dict[str, np.ndarray]:
        """Arrays for a checkpoint: ``stored``, ``norm_sq`` and, with ``rows``, every row
        (``h.<s>``, (rows_s, D_s)); without, the rows travel in a
        :class:`~mmfl.experiment.checkpoint.RowLog`."""
        out = {f"h.{s}": np.asarray(r) for s, r in enumerate(self.rows)} if rows else {}
        out["stored"] = self.stored
        out["norm_sq"] = self.norm_sq
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore ``stored`` and ``norm_sq``, and the rows where ``state`` has them
        (``h.<s>``, as checkpoints before the row log wrote them); the rows count as
        changed, so that the next checkpoint writes them (dirty = stored)."""
        self.stored[...] = state["stored"]
        self.norm_sq[...] = state["norm_sq"]
        if any(f"h.{s}" in state for s in range(len(self.rows))):
            for s, r in enumerate(self.rows):
                r[...] = state[f"h.{s}"]
                self.dirty[s][...] = False
                self.dirty[s][self.row[self.stored[:, s], s]] = True


class ControlVariates:
    """SCAFFOLD's control variates (:mod:`mmfl.core.scaffold`, docs/algorithms.md section 6).

    The client controls c_{i,s} live in a :class:`PairStore` (one row per holder of s, same
    ``dtype`` and on-disk options as the stale updates); the server controls c_s are S float32
    vectors. All are zero at the start.

    Args:
        holds: (N, S) bool, which clients hold which tasks.
        dims: (S,) parameter count D_s.
        dtype: "float32" or "float16" storage of the c_{i,s}.
        path: folder for memory-mapped c_{i,s} storage, or None (RAM).
    """

    def __init__(self, holds: np.ndarray, dims: list[int], *, dtype: str = "float32",
                 path: str | Path | None = None):
        self.clients = PairStore(holds, dims, dtype=dtype, path=path)
        self.server = [np.zeros(int(d), dtype=np.float32) for d in dims]

    @property
    def nbytes(self) -> int:
        """Bytes held by the client and server controls."""
        return self.clients.nbytes + int(sum(c.nbytes for c in self.server))

    def corrections(self, clients: np.ndarray, tasks: np.ndarray) -> dict[int, torch.Tensor]:
        """Per task s among ``tasks``: the (U_s, D_s) float32 tensor c_s - c_{i,s} for the pairs
        of task s in their order (the ``corrections`` argument of ``Engine.train``)."""
        clients, tasks = np.asarray(clients, np.int64), np.asarray(tasks, np.int64)
        out = {}
        for s in np.unique(tasks).tolist():
            c_i = self.clients.get(s, clients[tasks == s])
            out[s] = torch.from_numpy(self.server[s]).unsqueeze(0) - c_i
        return out

    def update(self, out, lr: np.ndarray, data_weight: np.ndarray) -> None:
        """After a round trained with :meth:`corrections`: option II client update and the
        server step c_s <- c_s + sum_active d_{i,s} Delta c_{i,s}; stores c_{i,s}^+.

        Args:
            out: the round's :class:`~mmfl.engines.base.TrainOutput` (active pairs).
            lr: (S,) local learning rates eta_s.
            data_weight: (N, S) d_{i,s}.

        Delta c is taken from the stored (dtype-rounded) c^+, so c_s = sum_i d_{i,s} c_{i,s}
        holds up to float rounding even with float16 storage.
        """
        from mmfl.core.scaffold import control_update, server_control_step

        for s in sorted(out.updates):
            clients, g = out.pair_updates(s)
            old = self.clients.get(s, clients).numpy()
            new, _ = control_update(old, self.server[s], g.detach().numpy(),
                                    out.steps[out.tasks == s], float(lr[s]))
            stored = new.astype(self.clients.dtype)
            self.clients.put(s, clients, torch.from_numpy(stored))
            delta = stored.astype(np.float64) - old.astype(np.float64)
            self.server[s] = server_control_step(
                self.server[s], delta, data_weight[clients, s]).astype(np.float32)

    @property
    def pair_store(self) -> PairStore:
        """The rows a checkpoint writes incrementally (the client controls c_{i,s})."""
        return self.clients

    def state_dict(self, *, rows: bool = True) -> dict[str, np.ndarray]:
        """Arrays for a checkpoint: the client store's (``h.<s>`` with ``rows`` ...) and
        ``c.<s>``."""
        out = self.clients.state_dict(rows=rows)
        out.update({f"c.{s}": c for s, c in enumerate(self.server)})
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.clients.load_state_dict({k: v for k, v in state.items() if not k.startswith("c.")})
        for s in range(len(self.server)):
            self.server[s] = np.array(state[f"c.{s}"], dtype=np.float32)
