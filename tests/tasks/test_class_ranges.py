"""Partition kind ``class_ranges``: the authors' non-IID rule with sample-count ranges."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmfl.tasks.partition import class_ranges_partition, partition, ranges_option


def _labels(counts):
    # class k's samples interleaved in dataset order: labels 0,1,2,...,0,1,2,... as available
    out, left = [], list(counts)
    while any(left):
        for k in range(len(left)):
            if left[k]:
                out.append(k)
                left[k] -= 1
    return np.array(out)


def test_hand_worked_greedy_classes_and_first_images():
    labels = _labels([5, 4, 2, 1])  # 12 samples; class k's images in dataset order
    by_class = [np.flatnonzero(labels == k) for k in range(4)]
    parts = class_ranges_partition(labels, 2, 0.5, [(0.5, 2, 2), (0.5, 3, 3)], 4,
                                   np.random.default_rng(0))
    # client 0: the two classes with the most samples left (0: 5, 1: 4), one image of each,
    # the first of each class
    assert sorted(parts[0].tolist()) == sorted([by_class[0][0], by_class[1][0]])
    # client 1: classes left 0: 4, 1: 3 -> classes 0 and 1 again; 3 images round-robin from a
    # random start: 2 of one class and 1 of the other, each the next unused in dataset order
    got = sorted(parts[1].tolist())
    assert got in (sorted([by_class[0][1], by_class[0][2], by_class[1][1]]),
                   sorted([by_class[1][1], by_class[1][2], by_class[0][1]]))


def test_authors_regime_sizes_groups_and_classes():
    labels = np.random.default_rng(0).integers(0, 10, 60_000)
    parts = class_ranges_partition(labels, 120, 0.3, [(0.9, 9, 15), (0.1, 90, 150)], 10,
                                   np.random.default_rng(1))
    sizes = np.array([len(p) for p in parts])
    assert ((sizes[:108] >= 9) & (sizes[:108] <= 15)).all()     # int(0.9 * 120) = 108 poor
    assert ((sizes[108:] >= 90) & (sizes[108:] <= 150)).all()   # the last 12 are rich
    assert 0.4 < sizes[108:].sum() / sizes.sum() < 0.65          # the rich hold about 53%
    assert all(len(np.unique(labels[p])) == 3 for p in parts)
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat)                     # disjoint
    for k in range(10):                                          # first images of each class
        used = np.sort(flat[labels[flat] == k])
        np.testing.assert_array_equal(used, np.flatnonzero(labels == k)[:len(used)])


def test_partition_returns_holders_of_all_clients_draw():
    labels = np.random.default_rng(0).integers(0, 10, 5000)
    opts = {"class_ratio": 0.3, "sample_ranges": [[0.5, 5, 5], [0.5, 20, 20]]}
    every = partition(labels, np.arange(10), "class_ranges", opts, 10,
                      np.random.default_rng(3), num_clients=10)
    some = partition(labels, np.array([1, 7, 8]), "class_ranges", opts, 10,
                     np.random.default_rng(3), num_clients=10)
    # a holder's part does not depend on who else holds the task (non-holders still draw)
    for j, i in enumerate([1, 7, 8]):
        np.testing.assert_array_equal(some[j], every[i])
    assert [len(p) for p in some] == [5, 20, 20]  # rich by client index, not by holder rank


@settings(max_examples=25, deadline=None)
@given(n_clients=st.integers(1, 30), ratio=st.sampled_from([0.1, 0.3, 0.5, 1.0]),
       lo=st.integers(0, 8), extra=st.integers(0, 8), seed=st.integers(0, 10_000))
def test_properties(n_clients, ratio, lo, extra, seed):
    labels = np.random.default_rng(seed).integers(0, 5, 300)
    parts = class_ranges_partition(labels, n_clients, ratio, [(1.0, lo, lo + extra)], 5,
                                   np.random.default_rng(seed))
    flat = np.concatenate(parts) if parts else np.zeros(0, int)
    assert len(parts) == n_clients and len(np.unique(flat)) == len(flat)
    c = max(1, int(ratio * 5 + 1e-9))
    for p in parts:
        assert len(p) <= lo + extra and len(np.unique(labels[p])) <= c
    again = class_ranges_partition(labels, n_clients, ratio, [(1.0, lo, lo + extra)], 5,
                                   np.random.default_rng(seed))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))  # deterministic


def test_exhausted_classes_are_skipped():
    labels = np.array([0, 0, 1])
    parts = class_ranges_partition(labels, 2, 1.0, [(1.0, 3, 3)], 2, np.random.default_rng(0))
    assert sorted(np.concatenate(parts).tolist()) == [0, 1, 2]
    assert len(parts[1]) == 0  # nothing left


@pytest.mark.parametrize("bad", [[], [[0.5, 1, 2]], [[1.0, 3, 2]], [[1.0, 1.5, 2]],
                                 [[0.0, 1, 2], [1.0, 1, 2]], "x", [[1.0, 1]]])
def test_ranges_validation(bad):
    with pytest.raises(ValueError, match="sample_ranges"):
        ranges_option(bad)
