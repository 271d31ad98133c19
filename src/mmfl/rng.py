"""Explicit, derivable random streams.

Every random draw in mmfl comes from a generator derived from ``(seed, purpose, *keys)`` so that
round ``t`` of a resumed run draws exactly what the uninterrupted run drew, and two engines see the
same batches. Nothing in mmfl seeds a global generator.

``purpose`` is one of the constants below (a short string: changing one changes every draw of
that purpose); ``keys`` are non-negative integers such as the round, the client and the task
index.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator

import numpy as np

# -- stream purposes (keys after the seed in brackets) -----------------------------------------
ALLOCATE = "allocate"              # the round's allocation [round]
AVAILABILITY = "availability"      # who is online [round]
CHURN = "churn"                    # which clients join late / leave (one order per run)
PROBE = "probe"                    # StaleVRE's random probe set [round]
LVR_FRESHNESS = "lvr-freshness"    # which local losses LVR re-measures [round]
PREFERENCES = "preferences"        # clients' willingness w_{i,s} per pair (one draw per run)
DECLINE = "decline"                # which assigned pairs decline (soft preferences) [round]
COSTS = "costs"                    # clients' private training costs c_{i,s} (one draw per run)
AUCTION = "auction"                # the incentive auction's tie-break priorities [round]
GROUP_KMEANS = "group-kmeans"      # group sampling's grouping (k-means start, random groups)
GROUP_JOIN = "group-join"          # group sampling: the group of a joining client [round]
GROUP_PIPELINE = "group-pipeline"  # group_pipeline: the model entering the buffer [round]
SHUFFLE = "shuffle"                # local training batches [round, client, task]
INIT = "init"                      # model initialisation [task]
PROCESSORS = "processors"          # B_i of every client
MEMBERSHIP = "membership"          # which tasks each client holds
SUBSAMPLE = "subsample"            # train_samples / test_samples subsets [task]
PARTITION = "partition"            # the split of a task's data over its holders [task]
SYSTEM = "system"                  # client speeds, bandwidths and availabilities


def dataset_purpose(name: str) -> str:
    """The purpose of dataset ``name``'s own draws (its split, generated samples)."""
    return f"dataset:{name}"


@functools.lru_cache(maxsize=256)
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


# -- many streams at once ------------------------------------------------------------------------
# numpy's SeedSequence (numpy/random/bit_generator.pyx) hashes the entropy words into a pool of 4
# uint32 words and expands the pool into PCG64's 128-bit seed and increment; PCG64 then seeds
# itself with two LCG steps (pcg_setseq_128_srandom_r). Below is the same arithmetic, vectorized
# over many key rows (uint32 numpy arrays wrap modulo 2**32 like the C code). The result is the
# exact PCG64 state that ``stream`` would start from (tests/engines/test_rng_streams.py).

_MASK32 = 0xFFFFFFFF
_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R = 0xCA01F9DD, 0x4973F715
_POOL = 4
_PCG_MULT = 0x2360ED051FC65DA44385DF649FCCF645
_MASK128 = (1 << 128) - 1


def _words(n: int) -> list[int]:
    """The uint32 words SeedSequence makes of a non-negative int (little-endian; [0] for 0)."""
    n = int(n)
    out = [0] if n == 0 else []
    while n > 0:
        out.append(n & _MASK32)
        n >>= 32
    return out


def _pool(entropy: np.ndarray) -> list[np.ndarray]:
    """SeedSequence's mixed pool: entropy (M, L) uint32 -> 4 (M,) uint32 words."""
    M, L = entropy.shape
    hash_const = _INIT_A

    def hashmix(value: np.ndarray) -> np.ndarray:
        nonlocal hash_const
        value = value ^ np.uint32(hash_const)
        hash_const = (hash_const * _MULT_A) & _MASK32
        value = value * np.uint32(hash_const)
        return value ^ (value >> np.uint32(16))

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        r = np.uint32(_MIX_L) * x - np.uint32(_MIX_R) * y
        return r ^ (r >> np.uint32(16))

    zero = np.zeros(M, dtype=np.uint32)
    pool = [hashmix(entropy[:, i] if i < L else zero) for i in range(_POOL)]
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(_POOL, L):
        for dst in range(_POOL):
            pool[dst] = mix(pool[dst], hashmix(entropy[:, src]))
    return pool


def _pcg64_states(seed: int, purpose: str, keys: np.ndarray) -> list[tuple[int, int]]:
    """(state, inc) of the PCG64 of ``stream(seed, purpose, *row)`` for every row of ``keys``
    ((M, k) non-negative ints below 2**32)."""
    fixed = _words(seed) + _words(_purpose_code(purpose))
    M = keys.shape[0]
    entropy = np.empty((M, len(fixed) + keys.shape[1]), dtype=np.uint32)
    entropy[:, :len(fixed)] = np.array(fixed, dtype=np.uint32)
    entropy[:, len(fixed):] = keys
    pool = _pool(entropy)
    hash_const = _INIT_B
    words = []  # generate_state(4, uint64): 8 uint32 words cycling over the pool
    for i in range(8):
        v = pool[i % _POOL] ^ np.uint32(hash_const)
        hash_const = (hash_const * _MULT_B) & _MASK32
        v = v * np.uint32(hash_const)
        words.append((v ^ (v >> np.uint32(16))).astype(np.uint64))
    u64 = [(words[2 * j] | (words[2 * j + 1] << np.uint64(32))).tolist() for j in range(4)]
    out = []
    for s0, s1, i0, i1 in zip(*u64):
        inc = ((((i0 << 64) | i1) << 1) | 1) & _MASK128
        state = (inc + ((s0 << 64) | s1)) & _MASK128  # first LCG step from 0 gives inc
        out.append(((state * _PCG_MULT + inc) & _MASK128, inc))
    return out


def streams(seed: int, purpose: str, keys) -> Iterator[np.random.Generator]:
    """``stream(seed, purpose, *row)`` for every row of ``keys`` ((M, k) non-negative ints), in
    order and with the same draws, at a fraction of the cost (the seed derivation is vectorized
    and one bit generator is re-seeded per row).

    Each yielded generator is valid only until the next one is yielded (they share one PCG64);
    draw from it before advancing the iterator.
    """
    keys = np.asarray(keys, dtype=np.int64)
    if keys.ndim != 2:
        raise ValueError(f"keys must be a 2-d array of key rows, got shape {keys.shape}")
    if keys.size and int(keys.min()) < 0:
        raise ValueError("stream keys must be non-negative")
    if keys.size and int(keys.max()) > _MASK32:  # several words per key: the plain path
        for row in keys.tolist():
            yield stream(seed, purpose, *row)
        return
    if seed < 0:
        raise ValueError(f"stream keys must be non-negative, got seed {seed}")
    bit_generator = np.random.PCG64(0)
    gen = np.random.Generator(bit_generator)
    for state, inc in _pcg64_states(seed, purpose, keys):
        bit_generator.state = {"bit_generator": "PCG64", "state": {"state": state, "inc": inc},
                               "has_uint32": 0, "uinteger": 0}
        yield gen
