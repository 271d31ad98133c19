"""The shuffle streams and the vectorized engine's batch layout draw exactly what they drew before.

``mmfl.rng.streams`` derives many ``stream(seed, purpose, *keys)`` generators at once (the
SeedSequence hashing vectorized); ``vectorized.batch_plan`` lays out the batches of
``sequential.local_batches`` with array arithmetic. Both must give the same numbers as the plain
per-client code, and the pinned permutations below must never change (existing results and
resumed runs depend on them).
"""

from __future__ import annotations

import numpy as np
import pytest

from mmfl.engines.sequential import local_batches
from mmfl.engines.vectorized import batch_plan
from mmfl.rng import stream, streams

#: (seed, purpose, keys, n) -> permutation(n) of stream(seed, purpose, *keys), drawn with the
#: rng module as it was before the vectorized derivation existed.
PINNED = [
    ((11, "shuffle", (0, 3, 1), 12), [7, 0, 1, 2, 8, 3, 5, 10, 9, 11, 6, 4]),
    ((0, "shuffle", (5, 99999, 2), 10), [6, 0, 1, 3, 7, 5, 2, 9, 4, 8]),
    ((2**40 + 7, "shuffle", (149, 119, 4), 8), [6, 0, 3, 2, 1, 4, 5, 7]),
    ((3, "allocate", (7,), 9), [6, 7, 4, 0, 2, 5, 1, 8, 3]),
]


@pytest.mark.parametrize("args, want", PINNED)
def test_pinned_permutations(args, want):
    seed, purpose, keys, n = args
    assert stream(seed, purpose, *keys).permutation(n).tolist() == want
    (gen,) = list(streams(seed, purpose, np.array([keys])))
    assert gen.permutation(n).tolist() == want


@pytest.mark.parametrize("seed", [0, 1, 11, 2**32 - 1, 2**32, 2**40 + 5, 2**63])
@pytest.mark.parametrize("width", [0, 1, 3, 5])
def test_streams_equal_stream(seed, width):
    gen = np.random.default_rng(seed % 1000 + width)
    keys = gen.integers(0, 2**32, size=(40, width))
    keys[:3] = 0
    keys[3:6] = 2**32 - 1
    got = [(g.permutation(17), g.random(3)) for g in streams(seed, "shuffle", keys)]
    want = [(r.permutation(17), r.random(3))
            for r in (stream(seed, "shuffle", *row) for row in keys.tolist())]
    assert len(got) == len(want) == 40
    for (pa, xa), (pb, xb) in zip(got, want):
        np.testing.assert_array_equal(pa, pb)
        np.testing.assert_array_equal(xa, xb)


def test_streams_large_keys_and_errors():
    keys = np.array([[2**33, 1], [0, 2**40]])
    got = [g.integers(0, 1000, 5).tolist() for g in streams(4, "x", keys)]
    want = [stream(4, "x", *row).integers(0, 1000, 5).tolist() for row in keys.tolist()]
    assert got == want
    assert list(streams(4, "x", np.zeros((0, 3), np.int64))) == []
    with pytest.raises(ValueError, match="non-negative"):
        list(streams(4, "x", np.array([[1, -1]])))
    with pytest.raises(ValueError, match="2-d"):
        list(streams(4, "x", np.array([1, 2])))


@pytest.mark.parametrize("epochs, batch", [(1, 4), (2, 7), (3, 16), (2, 1)])
def test_batch_plan_lays_out_local_batches(epochs, batch):
    """Every client's (step, column) cells hold exactly local_batches' batches, weights 1/len."""
    gen = np.random.default_rng(epochs * 100 + batch)
    sizes = [0, 1, batch, batch + 1, 3 * batch, 5, 40, 2]
    indices = [np.sort(gen.choice(1000, size=n, replace=False)).astype(np.int64)
               for n in sizes]
    clients = np.array([7, 3, 0, 12, 5, 99, 41, 8], dtype=np.int64)
    plan = batch_plan(indices, clients, 2, epochs, batch, 13, 4)
    idx, weight = plan.idx.numpy(), plan.weight.numpy()
    assert sorted(plan.order.tolist()) == list(range(len(sizes)))
    assert (np.diff(plan.steps) <= 0).all()
    for slot, pos in enumerate(plan.order.tolist()):
        want = list(local_batches(indices[pos], epochs, batch, 13, 4, int(clients[pos]), 2))
        assert plan.steps[slot] == len(want)
        for t in range(idx.shape[0]):
            real = weight[t, slot] > 0
            if t < len(want):
                assert plan.active[t] > slot
                np.testing.assert_array_equal(idx[t, slot][real], want[t])
                np.testing.assert_array_equal(weight[t, slot][real],
                                              np.float32(1) / np.float32(len(want[t])))
            else:
                assert plan.active[t] <= slot and not real.any()
    assert plan.active == [int((plan.steps > t).sum()) for t in range(plan.num_steps)]
