"""mmfl.core.scaffold: SCAFFOLD's control-variate equations (docs/algorithms.md section 6.4) and
its sampler (the runner side is tests/experiment/test_scaffold.py)."""

from __future__ import annotations

import numpy as np
import pytest

from mmfl import registry
from mmfl.core.scaffold import control_update, server_control_step, server_control_weights
from mmfl.types import Population, RoundState


def test_control_update_worked_example():
    """c_i^+ = c_i - c + G / (K eta): c_i = (1, 2), c = (0.5, 0.5), G = (0.3, -0.6), K = 3,
    eta = 0.1 -> G / (K eta) = (1, -2), c_i^+ = (1.5, -0.5), Delta c = (0.5, -2.5). A pair that
    took no step keeps its control."""
    c_i = np.array([[1.0, 2.0], [7.0, -1.0]])
    c = np.array([0.5, 0.5])
    g = np.array([[0.3, -0.6], [5.0, 5.0]])
    new, delta = control_update(c_i, c, g, np.array([3, 0]), 0.1)
    np.testing.assert_allclose(new, [[1.5, -0.5], [7.0, -1.0]], rtol=1e-12)
    np.testing.assert_allclose(delta, [[0.5, -2.5], [0.0, 0.0]], atol=1e-12)
    assert c_i[0, 0] == 1.0 and g[0, 0] == 0.3  # inputs untouched
    # server: c <- c + sum_i d_i Delta c_i
    np.testing.assert_allclose(server_control_step(c, delta, np.array([0.25, 0.75])),
                               [0.625, -0.125], rtol=1e-12)
    with pytest.raises(ValueError):
        control_update(c_i, c, g[:1], np.array([3]), 0.1)


def test_control_update_is_the_mean_local_gradient():
    """Option II: after K corrected steps y <- y - eta (g_k + c - c_i) from x,
    (x - y) / (K eta) = mean_k g_k + c - c_i, so c_i^+ is the mean uncorrected gradient."""
    rng = np.random.default_rng(0)
    c_i, c = rng.normal(size=(1, 5)), rng.normal(size=5)
    grads = rng.normal(size=(4, 5))
    eta = 0.05
    y = x = rng.normal(size=5)
    for g in grads:
        y = y - eta * (g + c - c_i[0])
    new, _ = control_update(c_i, c, (x - y)[None, :], np.array([4]), eta)
    np.testing.assert_allclose(new[0], grads.mean(axis=0), rtol=1e-10, atol=1e-12)


def test_sampler_is_random_with_control_variates():
    pop = Population(np.array([[5, 0], [3, 4], [0, 9], [2, 2]]), np.array([1, 2, 1, 1]), ("a", "b"))
    entry = registry.get("sampler", "scaffold")
    alloc = entry.obj({}, pop, 0)
    assert "control_variates" in alloc.requires and alloc.default_aggregator == "unbiased"
    assert set(entry.options) == {"draw"}
    rand = registry.get("sampler", "random").obj({}, pop, 0)
    state = RoundState(2, pop, 2.0, np.ones(4, bool))
    for seed in range(5):
        a = alloc.allocate(state, np.random.default_rng(seed))
        b = rand.allocate(state, np.random.default_rng(seed))
        for f in ("processor", "client", "task", "probability", "share"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    np.testing.assert_allclose(server_control_weights(pop, np.array([1, 3]), np.array([1, 1])),
                               [4 / 15, 2 / 15])
