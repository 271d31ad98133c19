"""Explicit, derivable random streams.

Every random draw in mmfl comes from a generator derived from ``(seed, purpose, *keys)`` so that
round ``t`` of a resumed run draws exactly what the uninterrupted run drew, and two engines see the
same batches. Nothing in mmfl seeds a global generator.

``purpose`` is a short string (``"allocate"``, ``"partition"``, ``"shuffle"`` ...); ``keys`` are
non-negative integers such as the round, the client and the task index.
"""

from __future__ import annotations

import hashlib

import numpy as np


def _purpose_code(purpose: str) -> int:
    digest = hashlib.blake2b(purpose.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def seed_sequence(seed: int, purpose: str, *keys: int) -> np.random.SeedSequence:
    """The ``SeedSequence`` of stream ``(seed, purpose, *keys)``."""
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"stream keys must be non-negative, got {keys}")
    return np.random.SeedSequence([int(seed), _purpose_code(purpose), *map(int, keys)])


def stream(seed: int, purpose: str, *keys: int) -> np.random.Generator:
    """A numpy ``Generator`` (PCG64) for ``(seed, purpose, *keys)``; same arguments, same draws."""
    return np.random.Generator(np.random.PCG64(seed_sequence(seed, purpose, *keys)))


def torch_seed(seed: int, purpose: str, *keys: int) -> int:
    """A 63-bit integer seed for a ``torch.Generator`` derived like :func:`stream`."""
    return int(seed_sequence(seed, purpose, *keys).generate_state(2, np.uint64)[0] >> np.uint64(1))
