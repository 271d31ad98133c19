"""SCAFFOLD (Karimireddy et al., ICML 2020): uniform sampling, local SGD corrected with control
variates, server update of the models and of the control variates (docs/algorithms.md section 6,
"SCAFFOLD: control variates"). Pure numpy: the sampler registration and the control-variate
equations; the runner keeps the control variates (:class:`mmfl.engines.pair_store.ControlVariates`)
and the engines apply the corrections.

Per model s, the server holds a control c_s (D_s,) and every client i holding s a control
c_{i,s} (D_s,), all zero at the start. In round t an active pair (i, s):

1. starts from y = w_s^t and takes its K_{i,s} local SGD steps (E_s epochs, batch B_s, lr eta_s
   as in section 2) with the corrected gradient

       y <- y - eta_s (g_{i,s}(y) + c_s - c_{i,s});

2. uploads G_{i,s} = w_s^t - y (the model update, as every method) and computes, with the
   paper's option II,

       c_{i,s}^+ = c_{i,s} - c_s + G_{i,s} / (K_{i,s} eta_s),    Delta c_{i,s} = c_{i,s}^+ - c_{i,s}

   (c_{i,s}^+ is the mean of the uncorrected local gradients over the K steps); a pair that took
   no step keeps c_{i,s}; it uploads Delta c_{i,s} as a second vector.

The server then applies

    w_s <- w_s - eta_g * sum_{active (i, s)} a_{i,s} G_{i,s}      (the aggregator's coefficients)
    c_s <- c_s + sum_{active (i, s)} d_{i,s} Delta c_{i,s}
    c_{i,s} <- c_{i,s}^+ for the active pairs.

Model step: the sampler's default aggregator is ``unbiased`` (a = d_{i,s} share / p, the true
inclusion probability of section 3). With N clients of equal data (d = 1/N) sampled uniformly
|S| at a time (p = |S|/N) this is the paper's x <- x + eta_g mean_{i in S} Delta y_i; with data
weights it is its unbiased generalisation. ``sampler.aggregator = "average"`` gives the
data-weighted mean over the sampled clients instead.

Control step: the paper's c <- c + (|S|/N) mean_{i in S} Delta c_i = c + (1/N) sum_{i in S}
Delta c_i keeps the invariant c = mean_i c_i exactly (bookkeeping, not an estimate). With data
weights we keep c_s = sum_i d_{i,s} c_{i,s} exactly (the control of f_s = sum_i d_{i,s} f_{i,s}),
hence weight d_{i,s} and no 1/p factor; with d = 1/N this is the paper's rule. (Dividing by p
would make c_s an unbiased but noisy estimate and break the invariant.)

Multi-model details: controls are per (client, model) pair; a client whose processors draw the
same model twice trains (and updates its control) once, its aggregation coefficient counts both
slots. K_{i,s} is the pair's own step count (E_s epochs of ceil(n_{i,s} / B_s) batches), so
clients of different sizes take different numbers of corrected steps. Models inactive in a round
and unavailable clients keep their controls.

Cost: every active pair uploads two vectors (G and Delta c): ``model_uploads = 2 U``. The
control-variate memory (O(sum_s holders_s D_s) for the c_{i,s} plus S server vectors) is
reported in the ``stale_bytes`` column / ``stale_memory_bytes`` summary entry (together with
a stale-update store if the chosen aggregator keeps one). The c_{i,s} follow the ``stale_dtype``
and ``stale_on_disk`` settings; with float16 storage Delta c is taken from the rounded stored
value, so the invariant still holds. The download of c_s with w_s is not counted (no download
counter exists for any method).
"""

from __future__ import annotations

import numpy as np

from mmfl.core.allocators import RandomAllocator
from mmfl.core.drawing import DRAW_OPTION
from mmfl.registry import register
from mmfl.types import Population, Signal

__all__ = ["ScaffoldAllocator", "control_update", "server_control_step", "server_control_weights"]

@register("sampler", "scaffold", options={"draw": DRAW_OPTION},
          doc="SCAFFOLD: uniform sampling, local SGD corrected with control variates.")
class ScaffoldAllocator(RandomAllocator):
    """SCAFFOLD (see the module docstring): samples exactly like ``random`` (same draws for the
    same generator), declares ``requires = {Signal.CONTROL_VARIATES}`` so that the runner passes the
    corrections c_s - c_{i,s} to local training and updates the controls after aggregation."""

    requires = frozenset({Signal.CONTROL_VARIATES})


def control_update(c_client: np.ndarray, c_server: np.ndarray, update: np.ndarray,
                   steps: np.ndarray, lr: float) -> tuple[np.ndarray, np.ndarray]:
    """Option II client control update of SCAFFOLD for U pairs of one model.

    Args:
        c_client: (U, D) c_{i,s} before the round.
        c_server: (D,) c_s used in the round.
        update: (U, D) G_{i,s} = w_s^t - y_{i,s} (the corrected local training's update).
        steps: (U,) int K_{i,s}, local steps taken.
        lr: eta_s, the local learning rate.

    Returns:
        (c_new, delta), both (U, D) float64: c_{i,s}^+ = c_{i,s} - c_s + G / (K eta_s) and
        Delta c = c^+ - c_{i,s}; rows with K = 0 are unchanged (delta 0). Inputs are not mutated.
    """
    c_i = np.asarray(c_client, np.float64)
    c = np.asarray(c_server, np.float64)
    g = np.asarray(update, np.float64)
    k = np.asarray(steps, np.float64).reshape(-1, 1)
    if c_i.shape != g.shape or c_i.ndim != 2 or c.shape != c_i.shape[1:] or len(k) != len(c_i):
        raise ValueError("control_update: c_client (U, D), c_server (D,), update (U, D), "
                         "steps (U,)")
    if not lr > 0:
        raise ValueError(f"control_update: lr must be > 0, got {lr}")
    took = k > 0
    new = np.where(took, c_i - c[None, :] + g / (np.where(took, k, 1.0) * float(lr)), c_i)
    return new, new - c_i


def server_control_weights(population: Population, clients: np.ndarray,
                           tasks: np.ndarray) -> np.ndarray:
    """(U,) d_{i,s} of each pair: the weights of Delta c_{i,s} in the server control step."""
    return population.data_weight[np.asarray(clients, np.int64), np.asarray(tasks, np.int64)]


def server_control_step(c_server: np.ndarray, delta: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """c_s + sum_k weights_k delta_k as a new (D,) float64 array.

    Args:
        c_server: (D,) c_s.
        delta: (U, D) Delta c of the active pairs of model s.
        weights: (U,) their d_{i,s}.
    """
    w = np.asarray(weights, np.float64)
    return np.asarray(c_server, np.float64) + w @ np.asarray(delta, np.float64)
