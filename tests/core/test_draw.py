"""The drawing rule of docs/algorithms.md section 1 (mmfl.core.drawing.draw)."""

import numpy as np
import pytest

from testkit import assert_frequency_within
from mmfl.core.drawing import draw, draw_fixed
from mmfl.types import Population

POP = Population(np.array([[30, 10], [60, 0], [10, 90]]), np.array([1, 2, 1]), ("a", "b"))
# (P, S) = (4, 2); rows sum to <= 1; zero where client 1 has no data for task 1.
P_MAT = np.array([[0.1714, 0.0286], [0.0857, 0.0], [0.6, 0.0], [0.1143, 0.5143]])


def test_draw_frequencies_match_probabilities():
    rng = np.random.default_rng(123)
    reps = 40_000
    counts = np.zeros_like(P_MAT)
    for _ in range(reps):
        a = draw(P_MAT, POP, rng)
        np.add.at(counts, (a.processor, a.task), 1)
    assert_frequency_within(counts, reps, P_MAT)
    assert counts[1, 1] == 0 and counts[2, 1] == 0  # zero-probability entries never drawn


def test_draw_one_model_per_processor_and_slot_fields():
    rng = np.random.default_rng(5)
    for _ in range(2000):
        a = draw(P_MAT, POP, rng)
        assert len(np.unique(a.processor)) == a.num_slots
        np.testing.assert_array_equal(a.client, POP.processor_client[a.processor])
        np.testing.assert_allclose(a.probability, P_MAT[a.processor, a.task])
        np.testing.assert_allclose(a.share, 1.0 / POP.capacity[a.client])
    assert a.expected_slots == pytest.approx(P_MAT.sum())


def test_draw_deterministic_for_same_seed():
    a = [draw(P_MAT, POP, np.random.default_rng(42)) for _ in range(2)]
    for name in ("processor", "client", "task", "probability"):
        np.testing.assert_array_equal(getattr(a[0], name), getattr(a[1], name))
    seqs = [[tuple(draw(P_MAT, POP, g).processor) for _ in range(50)]
            for g in (np.random.default_rng(7), np.random.default_rng(7))]
    assert seqs[0] == seqs[1]
    g = np.random.default_rng(8)
    other = [tuple(draw(P_MAT, POP, g).processor) for _ in range(50)]
    assert other != seqs[0]  # the draw really depends on the generator


def test_draw_does_not_mutate_input():
    p = P_MAT.copy()
    draw(p, POP, np.random.default_rng(0))
    np.testing.assert_array_equal(p, P_MAT)


@pytest.mark.parametrize(
    "bad",
    [
        np.array([[0.6, 0.6], [0, 0], [0, 0], [0, 0]]),  # row sum > 1
        np.array([[-0.1, 0], [0, 0], [0, 0], [0, 0]]),  # negative
        np.array([[np.nan, 0], [0, 0], [0, 0], [0, 0]]),
        np.zeros((3, 2)),  # wrong shape
    ],
)
def test_draw_rejects_invalid_matrices(bad):
    with pytest.raises(ValueError):
        draw(bad, POP, np.random.default_rng(0))


def test_draw_all_ones_row_always_active():
    p = np.array([[0, 1.0], [1.0, 0], [0, 0], [0.5, 0.5]])
    for seed in range(50):
        a = draw(p, POP, np.random.default_rng(seed))
        assert {0, 1} <= set(a.processor.tolist())
        assert 2 not in a.processor
        assert 3 in a.processor


def test_draw_fixed_count_and_marginals():
    rng = np.random.default_rng(1)
    eligible = np.array([True, True, False, True])
    cond = np.array([[0.5, 0.5], [1.0, 0.0], [1.0, 0.0], [0.25, 0.75]])
    reps = 20_000
    counts = np.zeros((4, 2))
    for _ in range(reps):
        b, s = draw_fixed(2, eligible, cond, rng)
        assert b.size == 2 and len(set(b.tolist())) == 2
        np.add.at(counts, (b, s), 1)
    expect = (2 / 3) * cond * eligible[:, None]
    assert_frequency_within(counts, reps, expect)


def test_options_default_from_the_registered_table_only():
    """Samplers read defaults from their registered Option table (a registered subclass with
    fewer options falls back to its base's table); no default is restated in code."""
    from mmfl import registry
    from mmfl.core.allocators import RandomAllocator

    fedvarp = registry.get("sampler", "fedvarp").obj({}, POP, 0)
    assert isinstance(fedvarp, RandomAllocator)
    assert fedvarp.opt("probability") == registry.get("sampler", "random").options["probability"].default
    assert fedvarp.opt("draw") == "independent"
    assert registry.get("sampler", "random").obj({"draw": "fixed"}, POP, 0).opt("draw") == "fixed"
    with pytest.raises(KeyError, match="no registered option 'nope'"):
        fedvarp.opt("nope")
