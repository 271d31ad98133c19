"""Storage of the last update h_{i,s} of every (client, task) pair (ALGORITHMS.md section 6).

Memory is O(sum_s holders_s * D_s): one row per client that holds task s, never for the others.
Rows can be kept in float32 (exact), float16 (half the memory; h is an approximation anyway
and stale-update aggregation is unbiased for any h), and in memory or in a memory-mapped file on
disk (``path``), so that a large federation's stale updates need not fit in RAM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

DTYPES = {"float32": np.float32, "float16": np.float16}


class StaleStore:
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
        self.stored[clients, s] = True
        self.norm_sq[clients, s] = np.square(values.astype(np.float64)).sum(axis=1)

    def dots(self, s: int, clients: np.ndarray, updates: torch.Tensor) -> np.ndarray:
        """(k,) float64 <G_k, h_k> for ``clients`` and their fresh ``updates`` (k, D_s)."""
        h = self.get(s, clients).double()
        return (h * updates.double()).sum(dim=1).numpy()

    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays for a checkpoint."""
        out = {f"h.{s}": np.asarray(r) for s, r in enumerate(self.rows)}
        out["stored"] = self.stored
        out["norm_sq"] = self.norm_sq
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for s, r in enumerate(self.rows):
            r[...] = state[f"h.{s}"]
        self.stored[...] = state["stored"]
        self.norm_sq[...] = state["norm_sq"]
