"""Tests of mmfl.tasks.partition: membership and sample partitions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmfl import registry
from mmfl.tasks.partition import (
    PARTITION_OPTIONS,
    partition,
    partition_summary,
    split_counts,
    task_membership,
)


def rng(seed=0):
    return np.random.default_rng(seed)


def balanced_labels(n_per_class=100, K=10, seed=0):
    return rng(seed).permutation(np.repeat(np.arange(K), n_per_class))


def check_disjoint_cover(parts, n, *, full=True):
    allidx = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    assert len(np.unique(allidx)) == len(allidx), "parts overlap"
    assert allidx.min(initial=0) >= 0 and allidx.max(initial=-1) < n
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "not sorted"
    if full:
        assert len(allidx) == n


# ---------------------------------------------------------------------------------- membership


@pytest.mark.parametrize("N,S,k", [(10, 3, 1), (40, 5, 2), (7, 4, 4), (3, 6, 2), (2, 5, 1)])
def test_membership_fixed_k(N, S, k):
    m = task_membership(N, S, k, rng(1))
    assert m.shape == (N, S) and m.dtype == bool
    assert m.any(axis=0).all(), "a task nobody holds"
    if N * k >= S:
        np.testing.assert_array_equal(m.sum(1), k)
    else:  # too few holdings: clients gain tasks so all are covered
        assert (m.sum(1) >= k).all() and m.sum() == S


def test_membership_distribution():
    m = task_membership(2000, 5, {1: 0.5, 3: 0.5}, rng(2))
    counts = m.sum(1)
    assert set(np.unique(counts)) == {1, 3}
    assert abs((counts == 1).mean() - 0.5) < 0.05
    assert m.any(axis=0).all()
    # uniform choice: each task held about equally
    per_task = m.sum(0) / 2000
    assert np.all(np.abs(per_task - per_task.mean()) < 0.05)


def test_membership_deterministic():
    a = task_membership(30, 4, {1: 0.3, 2: 0.7}, rng(5))
    b = task_membership(30, 4, {1: 0.3, 2: 0.7}, rng(5))
    np.testing.assert_array_equal(a, b)


def test_membership_coverage_fixup_keeps_counts():
    # with S = N * k exactly, coverage forces a permutation-like design
    for seed in range(20):
        m = task_membership(5, 10, 2, rng(seed))
        np.testing.assert_array_equal(m.sum(0), 1)
        np.testing.assert_array_equal(m.sum(1), 2)


@pytest.mark.parametrize("k", [0, 4, {0: 1.0}, {1: 0.5, 5: 0.5}, {1: 0.5, 2: 0.2}, 1.5])
def test_membership_bad_k(k):
    with pytest.raises(ValueError):
        task_membership(10, 3, k, rng())


# ---------------------------------------------------------------------------------- split_counts


def test_split_counts():
    np.testing.assert_array_equal(split_counts(10, np.ones(3)), [4, 3, 3])
    np.testing.assert_array_equal(split_counts(10, np.array([1.0, 0, 0]), min_each=1), [8, 1, 1])
    np.testing.assert_array_equal(split_counts(2, np.ones(3), min_each=1), [1, 1, 0])
    assert split_counts(7, np.zeros(2)).sum() == 7


# ---------------------------------------------------------------------------------- partitions


def test_iid_equal_sizes():
    labels = balanced_labels(101)
    parts = partition(labels, np.arange(7), "iid", {}, 10, rng())
    check_disjoint_cover(parts, len(labels))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    # iid: each client sees most classes
    assert min(len(np.unique(labels[p])) for p in parts) >= 9


def test_iid_more_holders_than_samples():
    parts = partition(np.zeros(3, np.int64), np.arange(5), "iid", {}, 2, rng())
    check_disjoint_cover(parts, 3)
    assert sorted(len(p) for p in parts) == [0, 0, 1, 1, 1]


@pytest.mark.parametrize("kind,opts", [("iid", {}), ("classes", {"class_ratio": 0.3})])
def test_quantity_skew(kind, opts):
    labels = balanced_labels(300)
    h = 50
    parts = partition(labels, np.arange(h), kind, {**opts, "skew_clients": 0.9,
                                                    "skew_data": 0.1}, 10, rng(3))
    check_disjoint_cover(parts, len(labels))
    sizes = np.sort([len(p) for p in parts])
    poor = sizes[:45].sum() / sizes.sum()
    assert abs(poor - 0.1) < 0.03, poor
    assert sizes.min() >= 1
    assert sizes[45:].min() > 3 * sizes[:45].max() or kind == "classes"


def test_quantity_skew_choice_random():
    labels = balanced_labels(50)
    a = [len(p) for p in partition(labels, np.arange(10), "iid",
                                   {"skew_clients": 0.5, "skew_data": 0.1}, 10, rng(1))]
    b = [len(p) for p in partition(labels, np.arange(10), "iid",
                                   {"skew_clients": 0.5, "skew_data": 0.1}, 10, rng(2))]
    assert a != b  # which clients are poor depends on rng


@pytest.mark.parametrize("ratio,K,h", [(0.3, 10, 20), (0.1, 10, 40), (0.5, 10, 7),
                                       (1.0, 10, 3), (0.3, 62, 15), (0.05, 10, 12)])
def test_classes_counts_and_coverage(ratio, K, h):
    labels = balanced_labels(60, K)
    parts = partition(labels, np.arange(h), "classes", {"class_ratio": ratio}, K, rng(4))
    c = max(1, int(np.floor(ratio * K)))
    per_client = [len(np.unique(labels[p])) for p in parts]
    assert per_client == [c] * h
    covered = np.unique(np.concatenate([labels[p] for p in parts]))
    if h * c >= K:
        assert len(covered) == K
        check_disjoint_cover(parts, len(labels))
    else:
        assert len(covered) == h * c
        check_disjoint_cover(parts, len(labels), full=False)


def test_classes_split_equally_among_holders():
    labels = balanced_labels(100)
    parts = partition(labels, np.arange(20), "classes", {"class_ratio": 0.3}, 10, rng(0))
    # 20 clients x 3 classes = 60 slots over 10 classes: 6 holders per class, 100/6 each
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 3 * 16 and sizes.max() <= 3 * 17


def test_dirichlet():
    labels = balanced_labels(200)
    a = partition(labels, np.arange(20), "dirichlet", {"alpha": 0.1}, 10, rng(9))
    b = partition(labels, np.arange(20), "dirichlet", {"alpha": 0.1}, 10, rng(9))
    c = partition(labels, np.arange(20), "dirichlet", {"alpha": 0.1}, 10, rng(10))
    check_disjoint_cover(a, len(labels))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert min(len(p) for p in a) >= 1
    skewed = np.mean([len(np.unique(labels[p])) for p in a])
    flat = partition(labels, np.arange(20), "dirichlet", {"alpha": 100.0}, 10, rng(9))
    check_disjoint_cover(flat, len(labels))
    assert skewed < np.mean([len(np.unique(labels[p])) for p in flat]) - 3


def test_dirichlet_tiny_alpha_no_nan():
    labels = balanced_labels(30)
    parts = partition(labels, np.arange(8), "dirichlet", {"alpha": 1e-4}, 10, rng(0))
    check_disjoint_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 1


def test_natural():
    groups = np.repeat(np.arange(6), [5, 1, 3, 2, 4, 7])
    labels = np.zeros(len(groups), np.int64)
    parts = partition(labels, np.arange(4), "natural", {}, 1, rng(), groups=groups)
    check_disjoint_cover(parts, len(labels))
    for j, p in enumerate(parts):
        assert set(np.unique(groups[p])) == {g for g in range(6) if g % 4 == j}
    with pytest.raises(ValueError, match="6 groups"):
        partition(labels, np.arange(7), "natural", {}, 1, rng(), groups=groups)
    with pytest.raises(ValueError, match="natural groups"):
        partition(labels, np.arange(2), "natural", {}, 1, rng())


def test_unknown_kind():
    with pytest.raises(ValueError, match="iid"):
        partition(np.zeros(3), np.arange(2), "shards", {}, 1, rng())


def test_options_tables_validate():
    assert set(PARTITION_OPTIONS) == {"iid", "dirichlet", "classes", "natural", "class_ranges"}
    assert registry.resolve_options("p", {}, PARTITION_OPTIONS["classes"])["class_ratio"] == 0.3
    assert registry.resolve_options("p", {}, PARTITION_OPTIONS["dirichlet"])["alpha"] == 0.5
    from mmfl.errors import ConfigError
    with pytest.raises(ConfigError):
        registry.resolve_options("p", {"class_ratio": 0.0}, PARTITION_OPTIONS["classes"])
    with pytest.raises(ConfigError):
        registry.resolve_options("p", {"alpha": 1.0}, PARTITION_OPTIONS["iid"])


def test_summary():
    labels = np.array([0, 0, 1, 2, 2, 2])
    parts = [np.array([0, 1]), np.array([2, 3, 4]), np.array([5])]
    s = partition_summary(labels, parts, 3)
    assert s["clients"] == 3 and s["samples"] == 6 and s["empty"] == 0
    assert s["size"] == {"min": 1, "median": 2.0, "max": 3}
    assert s["classes"] == {"min": 1, "mean": pytest.approx(4 / 3), "max": 2}


# ---------------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 300),
    K=st.integers(1, 12),
    h=st.integers(1, 30),
    kind=st.sampled_from(["iid", "dirichlet", "classes"]),
    ratio=st.floats(0.01, 1.0),
    alpha=st.floats(0.01, 10.0),
    skew=st.sampled_from([(0.0, 0.0), (0.9, 0.1), (0.5, 0.0), (0.3, 1.0)]),
    seed=st.integers(0, 2**32 - 1),
)
def test_partition_invariants(n, K, h, kind, ratio, alpha, skew, seed):
    labels = np.random.default_rng(seed).integers(0, K, size=n)
    opts = {"iid": {"skew_clients": skew[0], "skew_data": skew[1]},
            "dirichlet": {"alpha": alpha},
            "classes": {"class_ratio": ratio, "skew_clients": skew[0], "skew_data": skew[1]}}[kind]
    parts = partition(labels, np.arange(h), kind, opts, K, np.random.default_rng(seed))
    assert len(parts) == h
    c = max(1, int(np.floor(ratio * K + 1e-9)))  # tolerance for float products like 0.29*100
    full = kind != "classes" or h * c >= K
    check_disjoint_cover(parts, n, full=full)
    if kind in ("iid", "dirichlet") and n >= h:
        assert min(len(p) for p in parts) >= 1
    if kind == "classes":
        assert max(len(np.unique(labels[p])) for p in parts) <= c
    again = partition(labels, np.arange(h), kind, opts, K, np.random.default_rng(seed))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


@settings(max_examples=60, deadline=None)
@given(N=st.integers(1, 40), S=st.integers(1, 8), data=st.data())
def test_membership_invariants(N, S, data):
    k = data.draw(st.integers(1, S))
    m = task_membership(N, S, k, np.random.default_rng(data.draw(st.integers(0, 1000))))
    assert m.any(axis=0).all()
    if N * k >= S:
        assert (m.sum(1) == k).all()
