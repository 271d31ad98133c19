"""The system cost model and virtual clock (mmfl.core.clock), worked by hand."""

import numpy as np

from mmfl.core.clock import SystemProfile, draw_profile, pair_seconds, round_clock


def test_pair_seconds_by_hand():
    prof = SystemProfile(speed=np.array([1.0, 0.5]), bandwidth=np.array([1e6, 2e6]),
                         availability=np.ones(2))
    flops = np.array([1000.0, 10.0])        # forward FLOPs per sample of models 0, 1
    nbytes = np.array([4e6, 1e6])
    secs = pair_seconds(prof, np.array([0, 1, 1]), np.array([0, 0, 1]),
                        train_samples=np.array([200.0, 200.0, 0.0]),
                        probe_samples=np.array([0.0, 0.0, 50.0]),
                        flops=flops, model_bytes=nbytes, flops_per_second=1e6)
    # client 0, model 0: 2 * 4e6 / 1e6 = 8 s comm + 3 * 1000 * 200 / 1e6 = 0.6 s
    # client 1, model 0: 2 * 4e6 / 2e6 = 4 s + 3 * 1000 * 200 / (0.5 * 1e6) = 1.2 s
    # client 1, model 1, probe only: no comm, 10 * 50 / 0.5e6 = 0.001 s
    np.testing.assert_allclose(secs, [8.6, 5.2, 0.001])


def test_round_clock_waits_for_the_slowest_or_drops_stragglers():
    secs = np.array([1.0, 5.0, 3.0])
    d, on_time = round_clock(secs, 0.0)
    assert d == 5.0 and on_time.all()
    d, on_time = round_clock(secs, 4.0)
    assert d == 4.0 and on_time.tolist() == [True, False, True]
    d, on_time = round_clock(secs, 10.0)
    assert d == 5.0 and on_time.all()   # nobody late: the round ends with its slowest pair
    assert round_clock(np.zeros(0), 3.0)[0] == 0.0


def test_draw_profile_is_lognormal_with_the_given_median():
    p = draw_profile(20000, speed_sigma=0.5, bandwidth=1e6, bandwidth_sigma=1.0,
                     availability=0.8, rng=np.random.default_rng(0))
    assert abs(np.median(p.speed) - 1.0) < 0.02
    assert abs(np.median(p.bandwidth) / 1e6 - 1.0) < 0.04
    assert abs(np.log(p.speed).std() - 0.5) < 0.01 and (p.availability == 0.8).all()
    flat = draw_profile(5, speed_sigma=0.0, bandwidth=2.0, bandwidth_sigma=0.0,
                        availability=1.0, rng=np.random.default_rng(0))
    assert (flat.speed == 1).all() and (flat.bandwidth == 2).all()
