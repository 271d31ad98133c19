"""SCAFFOLD (Karimireddy et al., ICML 2020): uniform sampling, local SGD corrected with control
variates, server update of the models and of the controls (docs/algorithms.md section 6.4).
Pure numpy: the sampler registration and the control-variate equations; the runner keeps the
controls (:class:`mmfl.engines.pair_store.ControlVariates`) and the engines apply the
corrections.

Per model s the server holds c_s (D_s,) and every client i holding s a control c_{i,s} (D_s,),
all zero at the start. An active pair trains with gradients g + c_s - c_{i,s}, uploads G_{i,s}
and Delta c_{i,s} (option II, :func:`control_update`), and the server applies

    w_s <- w_s - eta_g sum_{active} a_{i,s} G_{i,s}        (the aggregator's coefficients)
    c_s <- c_s + sum_{active} d_{i,s} Delta c_{i,s},    c_{i,s} <- c_{i,s}^+

The control step has weight d_{i,s} and no 1/p, keeping c_s = sum_i d_{i,s} c_{i,s} exactly.
The default aggregator is ``unbiased``; ``sampler.aggregator = "average"`` gives the
data-weighted mean over the sampled clients instead. Duplicate slots of a pair update its
control once; inactive models and unavailable clients keep theirs. Cost (two uploads per
pair) and memory: docs/algorithms.md sections 5.1 and 6.5.
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
    """SCAFFOLD (docs/algorithms.md section 6.4): samples exactly like ``random`` (same draws for
    the same generator) and declares ``requires = {Signal.CONTROL_VARIATES}``, so that the runner
    passes the corrections c_s - c_{i,s} to local training and updates the controls after
    aggregation."""

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
