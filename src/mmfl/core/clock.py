"""The simulated clock (docs/algorithms.md section 5.2): per-client compute speed and bandwidth,
a cost model per (client, task), and the duration of a round with its stragglers. Pure numpy;
:mod:`mmfl.experiment.profile` builds the profiles from a config.

Cost model of one active pair (i, s), in simulated seconds:

    seconds_{i,s} = 2 bytes_s / bandwidth_i                       (only for pairs that train)
                  + 3 flops_s samples_{i,s} / (speed_i F)         (local SGD: forward + backward)
                  + flops_s probe_samples_{i,s} / (speed_i F)     (loss probes, if any)

A round lasts as long as its slowest pair, or until the deadline (if > 0; by default there is
none); later pairs are stragglers, dropped from the aggregation, which biases the unbiased
estimator towards fast clients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SystemProfile:
    """Per-client system characteristics.

    Attributes:
        speed: (N,) float > 0, compute speed relative to the reference device.
        bandwidth: (N,) float > 0, bytes per second up and down.
        availability: (N,) float in [0, 1], probability the client is online in a round.
    """

    speed: np.ndarray
    bandwidth: np.ndarray
    availability: np.ndarray


def draw_profile(num_clients: int, *, speed_sigma: float, bandwidth: float,
                 bandwidth_sigma: float, availability: float,
                 rng: np.random.Generator) -> SystemProfile:
    """Lognormal speeds (median 1) and bandwidths (median ``bandwidth``); sigma 0 = homogeneous."""
    speed = np.exp(rng.normal(0.0, speed_sigma, num_clients)) if speed_sigma else np.ones(num_clients)
    bw = bandwidth * (np.exp(rng.normal(0.0, bandwidth_sigma, num_clients))
                      if bandwidth_sigma else np.ones(num_clients))
    return SystemProfile(speed, bw, np.full(num_clients, float(availability)))


def pair_seconds(profile: SystemProfile, clients: np.ndarray, tasks: np.ndarray,
                 train_samples: np.ndarray, probe_samples: np.ndarray, flops: np.ndarray,
                 model_bytes: np.ndarray, flops_per_second: float) -> np.ndarray:
    """(U,) simulated seconds of each pair (the cost model above).

    Args:
        clients, tasks: (U,) int pairs.
        train_samples: (U,) samples processed in local training (0 for a probe-only pair).
        probe_samples: (U,) samples of loss probes (0 if none).
        flops: (S,) forward FLOPs per sample of each model.
        model_bytes: (S,) bytes of each model's parameters.
        flops_per_second: F, the reference device's speed.
    """
    speed = profile.speed[clients] * flops_per_second
    compute = flops[tasks] * (3.0 * train_samples + probe_samples) / speed
    comm = np.where(train_samples > 0, 2.0 * model_bytes[tasks] / profile.bandwidth[clients], 0.0)
    return comm + compute


def round_clock(seconds: np.ndarray, deadline: float) -> tuple[float, np.ndarray]:
    """(duration, on_time (U,) bool): the round waits for its slowest pair, or ends at the
    deadline (> 0) and drops the pairs that would finish later."""
    if seconds.size == 0:
        return 0.0, np.ones(0, bool)
    if deadline > 0:
        on_time = seconds <= deadline
        return float(deadline if (~on_time).any() else seconds.max()), on_time
    return float(seconds.max()), np.ones(seconds.size, bool)
