"""FedFairMMFL alpha-fair allocation (docs/algorithms.md section 7)."""

import numpy as np
import pytest

from testkit import assert_frequency_within
from mmfl import registry
from mmfl.core.allocators import FairAllocator, fedfair_distribution
from mmfl.types import Population, RoundState


def test_hand_numbers_alpha3():
    # pi ∝ f^(alpha-1) = (1, 4) -> (1/5, 4/5)
    np.testing.assert_allclose(fedfair_distribution(np.array([1.0, 2.0]), 3.0), [0.2, 0.8])
    # with weights (3, 1): (3*1, 1*4) / 7
    np.testing.assert_allclose(
        fedfair_distribution(np.array([1.0, 2.0]), 3.0, np.array([3.0, 1.0])), [3 / 7, 4 / 7])
    # alpha = 2: proportional to f: (1, 2, 5) / 8
    np.testing.assert_allclose(fedfair_distribution(np.array([1.0, 2.0, 5.0]), 2.0),
                               [1 / 8, 2 / 8, 5 / 8])


def test_alpha1_is_proportional_to_weights():
    losses = np.array([0.3, 5.0, 2.0])
    np.testing.assert_allclose(fedfair_distribution(losses, 1.0), [1 / 3] * 3)
    np.testing.assert_allclose(fedfair_distribution(losses, 1.0, np.array([1.0, 2.0, 5.0])),
                               [1 / 8, 2 / 8, 5 / 8])


def test_large_alpha_concentrates_on_worst_model():
    pi = fedfair_distribution(np.array([1.0, 1.5, 1.4]), 200.0)
    assert pi[1] > 0.999
    pi = fedfair_distribution(np.array([1.0, 1.5, 1.4]), 1e6)  # no overflow
    assert np.isfinite(pi).all() and pi[1] == pytest.approx(1.0)


@pytest.mark.parametrize("losses", [[0.0, 1.0], [np.inf, 1.0], [np.nan, 1.0], [0.0, 0.0],
                                    [np.nan, np.nan], [-1.0, 2.0]])
@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.0, 50.0])
def test_degenerate_losses_never_nan(losses, alpha):
    pi = fedfair_distribution(np.array(losses, float), alpha)
    assert np.isfinite(pi).all() and (pi >= 0).all()
    assert pi.sum() == pytest.approx(1.0)


def test_nan_or_inf_loss_counts_as_worst():
    assert fedfair_distribution(np.array([np.nan, 1.0]), 3.0)[0] > 0.99
    assert fedfair_distribution(np.array([np.inf, 1.0]), 3.0)[0] > 0.99


def test_does_not_mutate_inputs():
    f = np.array([np.nan, 0.0, 2.0])
    w = np.array([1.0, 2.0, 3.0])
    fedfair_distribution(f, 3.0, w)
    assert np.isnan(f[0]) and f[1] == 0.0 and (w == [1, 2, 3]).all()


POP = Population(np.array([[30, 10, 5], [60, 0, 7], [10, 90, 0], [5, 5, 5]]),
                 np.array([1, 2, 1, 1]), ("a", "b", "c"))


def test_monte_carlo_model_frequencies():
    losses = np.array([0.5, 1.0, 2.0])
    alloc = FairAllocator({"alpha": 3.0, "loss_proxy": "loss", "weights": "uniform"}, POP, 0)
    state = RoundState(4, POP, 2.5, np.array([True, True, True, False]), task_losses=losses)
    rng = np.random.default_rng(0)
    reps = 20_000
    counts = np.zeros((POP.num_processors, 3))
    for _ in range(reps):
        a = alloc.allocate(state, rng)
        np.add.at(counts, (a.processor, a.task), 1)
    p = a.probabilities
    # processor 0 (client 0, holds all): q * fedfair_distribution(losses)
    q = 2.5 / 4
    np.testing.assert_allclose(p[0], q * fedfair_distribution(losses, 3.0))
    np.testing.assert_allclose(p[1], q * fedfair_distribution(losses[[0, 2]], 3.0)[[0, 0, 1]]
                               * [1, 0, 1])
    assert (p[4] == 0).all()  # offline client
    assert_frequency_within(counts, reps, p)


def test_no_losses_yet_is_uniform_over_held_tasks():
    alloc = FairAllocator({"alpha": 3.0}, POP, 0)
    a = alloc.allocate(RoundState(0, POP, 5.0, np.ones(4, bool)), np.random.default_rng(0))
    np.testing.assert_allclose(a.probabilities[0], [1 / 3] * 3)
    np.testing.assert_allclose(a.probabilities[1], [0.5, 0, 0.5])


def test_error_proxy_and_data_weights():
    acc = np.array([0.9, 0.8, 0.6])  # error 10, 20, 40
    alloc = FairAllocator({"alpha": 2.0, "loss_proxy": "error", "weights": "data"}, POP, 0)
    a = alloc.allocate(RoundState(0, POP, 5.0, np.ones(4, bool), task_accuracies=acc),
                       np.random.default_rng(0))
    tot = POP.n_samples.sum(axis=0)
    w = tot / tot.sum()
    expect = w * np.array([10.0, 20.0, 40.0])
    np.testing.assert_allclose(a.probabilities[0], expect / expect.sum())


def test_registration_and_flags():
    e = registry.get("sampler", "fedfair")
    assert e.obj is FairAllocator
    assert e.options["alpha"].default == 3.0
    assert FairAllocator.default_aggregator == "average"
    opts = registry.resolve_options("sampler", {"alpha": 1}, e.options)
    assert opts == {"alpha": 1.0, "loss_proxy": "loss", "weights": "uniform", "refresh": "evaluation",
                    "draw": "independent"}


def test_huge_alpha_picks_the_worst_model_without_nan():
    from mmfl.core.allocators import fedfair_distribution

    np.testing.assert_array_equal(fedfair_distribution(np.array([90.0, 80.0]), 1e308), [1.0, 0.0])
    p = fedfair_distribution(np.array([1.0, 2.0, 2.0]), 1e6)
    np.testing.assert_allclose(p, [0.0, 0.5, 0.5])
