"""The report's significance table: the paired t-test and Student's t by hand, against scipy,
by its properties and by Monte Carlo, and the table of a hand-made set of runs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mmfl.errors import ConfigError
from mmfl.experiment.report import (
    MIN_PAIRS,
    baseline_name,
    group_runs,
    paired_t_test,
    significance_table,
    student_t_central,
    student_t_critical,
)
from mmfl.experiment.results import RunResults

# ----------------------------------------------------------------------------------------------
# Student's t


def test_student_t_by_hand():
    # df = 1 (Cauchy): P(|T| <= 1) = 2 atan(1) / pi = 1/2
    assert student_t_central(1.0, 1) == pytest.approx(0.5, abs=1e-15)
    # df = 2: P(|T| <= t) = t / sqrt(t^2 + 2); t = sqrt(2) gives 1/sqrt(2)
    assert student_t_central(math.sqrt(2), 2) == pytest.approx(1 / math.sqrt(2), abs=1e-15)
    # df = 3: (2/pi)(theta + sin cos), theta = atan(1/sqrt(3)) = pi/6: (2/pi)(pi/6 + sqrt(3)/4)
    assert student_t_central(1.0, 3) == pytest.approx(
        2 / math.pi * (math.pi / 6 + math.sqrt(3) / 4), abs=1e-15)
    # df = 4: sin(theta) (1 + cos^2(theta) / 2); t = 2: theta = pi/4 -> (1/sqrt(2)) (1 + 1/4)
    assert student_t_central(2.0, 4) == pytest.approx(1.25 / math.sqrt(2), abs=1e-15)
    assert student_t_central(0.0, 5) == 0.0 and student_t_central(math.inf, 5) == 1.0
    assert student_t_central(-1.0, 1) == student_t_central(1.0, 1)  # |t|
    # the two-sided 95% critical value for df = 2: t / sqrt(t^2 + 2) = 0.95
    # -> t = 0.95 sqrt(2 / (1 - 0.95^2)) = 4.302653
    assert student_t_critical(0.95, 2) == pytest.approx(0.95 * math.sqrt(2 / (1 - 0.95**2)),
                                                        rel=1e-12)
    assert student_t_critical(0.5, 1) == pytest.approx(1.0, rel=1e-12)  # tan(pi/4)
    with pytest.raises(ValueError, match="df"):
        student_t_central(1.0, 0)
    with pytest.raises(ValueError, match="level"):
        student_t_critical(1.0, 3)


def test_student_t_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 5, 7, 10, 29, 30, 61, 200):
        for t in (0.01, 0.5, 1.0, 2.0, 3.5, 10.0, 100.0):
            assert student_t_central(t, df) == pytest.approx(
                stats.t.cdf(t, df) - stats.t.cdf(-t, df), abs=1e-12)
        for level in (0.5, 0.9, 0.95, 0.99):
            assert student_t_critical(level, df) == pytest.approx(
                stats.t.ppf((1 + level) / 2, df), rel=1e-9)


# ----------------------------------------------------------------------------------------------
# The paired t-test


def test_paired_t_test_by_hand():
    # d = (0.01, 0.02, 0.03): mean 0.02, sd sqrt((0.01^2 + 0 + 0.01^2) / 2) = 0.01,
    # se = 0.01 / sqrt(3), t = 0.02 / se = 2 sqrt(3), df = 2,
    # p = 1 - t / sqrt(t^2 + 2) = 1 - sqrt(12 / 14) = 1 - sqrt(6/7) = 0.0741799
    # CI = 0.02 -+ 4.302653 x 0.01 / sqrt(3) = 0.02 -+ 0.0248414
    r = paired_t_test([0.81, 0.84, 0.84], [0.80, 0.82, 0.81])
    half = 0.95 * math.sqrt(2 / (1 - 0.95**2)) * 0.01 / math.sqrt(3)
    assert r.n == 3
    assert r.mean == pytest.approx(0.02, abs=1e-12)
    assert r.std == pytest.approx(0.01, abs=1e-12)
    assert r.t == pytest.approx(2 * math.sqrt(3), rel=1e-9)
    assert r.p == pytest.approx(1 - math.sqrt(6 / 7), rel=1e-9)
    assert (r.low, r.high) == pytest.approx((0.02 - half, 0.02 + half), abs=1e-12)
    assert half == pytest.approx(0.0248414, abs=1e-7)


def test_paired_t_test_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 12):
        x, y = rng.normal(0.8, 0.02, n), rng.normal(0.79, 0.02, n)
        r = paired_t_test(x, y)
        ref = stats.ttest_rel(x, y)
        assert r.t == pytest.approx(ref.statistic, rel=1e-10)
        assert r.p == pytest.approx(ref.pvalue, rel=1e-8, abs=1e-14)
        ci = ref.confidence_interval(0.95)
        assert (r.low, r.high) == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_paired_t_test_edge_cases():
    nan = float("nan")
    r = paired_t_test([0.5, nan, 0.7], [0.4, 0.3, nan])  # NaN pairs are dropped
    assert r.n == 1 and r.mean == pytest.approx(0.1) and math.isnan(r.p) and math.isnan(r.low)
    assert paired_t_test([], []).n == 0
    r = paired_t_test([0.6, 0.7, 0.8], [0.5, 0.6, 0.7])  # every difference 0.1
    assert r.p == 0.0 and r.t == math.inf and r.low == pytest.approx(r.high)
    r = paired_t_test([0.6, 0.7, 0.8], [0.6, 0.7, 0.8])  # identical
    assert r.p == 1.0 and r.mean == 0.0 and math.isnan(r.t)
    with pytest.raises(ValueError, match="same length"):
        paired_t_test([1.0, 2.0], [1.0])


values = st.lists(st.floats(0.0, 1.0), min_size=2, max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_paired_t_test_properties(data):
    x = data.draw(values)
    y = data.draw(st.lists(st.floats(0.0, 1.0), min_size=len(x), max_size=len(x)))
    r, swapped = paired_t_test(x, y), paired_t_test(y, x)
    assert swapped.mean == pytest.approx(-r.mean, abs=1e-12)
    assert (swapped.low, swapped.high) == pytest.approx((-r.high, -r.low), abs=1e-12)
    assert (math.isnan(r.p) and math.isnan(swapped.p)) or swapped.p == pytest.approx(r.p)
    assert r.low <= r.mean + 1e-12 and r.mean <= r.high + 1e-12
    assert 0.0 <= r.p <= 1.0
    # duality of the test and the interval: p < 0.05 exactly when 0 lies outside the 95% CI
    assume(r.std > 1e-9 and abs(r.p - 0.05) > 1e-6)
    assert (r.p < 0.05) == (not r.low <= 0.0 <= r.high)


def test_monte_carlo_size_and_coverage():
    """Under the null (normal differences, mean 0) p < 0.05 in 5% of the experiments, and the 95%
    interval covers the true difference in 95% of them (n = 4 pairs, 20000 experiments:
    3 standard errors = 0.0046)."""
    rng = np.random.default_rng(1)
    reject = cover = 0
    trials = 20000
    for _ in range(trials):
        d = rng.normal(0.0, 0.03, 4)
        r = paired_t_test(0.8 + d, np.full(4, 0.8))
        reject += r.p < 0.05
        cover += r.low <= 0.0 <= r.high
    assert abs(reject / trials - 0.05) < 0.0046
    assert abs(cover / trials - 0.95) < 0.0046


# ----------------------------------------------------------------------------------------------
# The table of a hand-made set of runs


def _run(sampler: str, seed: int, mean: float, worst: float, rate: float = 0.1) -> RunResults:
    cfg = {"name": "x", "seed": seed, "rounds": 3, "clients": {"active_rate": rate},
           "sampler": {"name": sampler}, "tasks": [{"name": "a"}]}
    summary = {"seed": seed, "mean_accuracy": mean, "min_accuracy": worst, "tasks": {"a": {}}}
    return RunResults(Path(f"/r/{sampler}/{seed}"), cfg, summary, [], [])


HAND_MADE = [  # (sampler, seed, final mean accuracy, final min accuracy)
    ("random", 1, 0.80, 0.60), ("random", 2, 0.82, 0.62), ("random", 3, 0.81, 0.64),
    ("lvr", 1, 0.81, 0.70), ("lvr", 2, 0.84, 0.75), ("lvr", 3, 0.84, 0.71),
    ("gvr", 1, 0.85, 0.60), ("gvr", 2, 0.86, 0.62),  # two seeds only
]


def _table(runs, baseline):
    groups, _ = group_runs(runs)
    header, rows, note = significance_table(groups, baseline_name(groups, baseline))
    return [dict(zip(header, row)) for row in rows], note


def test_significance_table_on_a_hand_made_example():
    rows, note = _table([_run(*r) for r in HAND_MADE], None)  # default baseline: random
    assert [(r["group"], r["baseline"], r["metric"]) for r in rows] == [
        ("lvr", "random", "mean accuracy"), ("lvr", "random", "min accuracy"),
        ("gvr", "random", "mean accuracy"), ("gvr", "random", "min accuracy")]
    # lvr - random, mean accuracy: d = (0.01, 0.02, 0.03), worked in test_paired_t_test_by_hand:
    # +0.0200, CI 0.02 -+ 0.0248414, t = 2 sqrt(3) = 3.46, p = 1 - sqrt(6/7) = 0.0742
    assert rows[0] == {
        "group": "lvr", "baseline": "random", "metric": "mean accuracy", "seed pairs": "3",
        "group mean": "0.8300", "baseline mean": "0.8100", "difference": "+0.0200",
        "95% CI": "[-0.0048, +0.0448]", "t": "3.46", "p (paired t)": "0.0742",
        "evidence": "not significant (p >= 0.05)"}
    # min accuracy: d = (0.10, 0.13, 0.07): mean 0.10, sd = sqrt((0 + 0.03^2 + 0.03^2) / 2)
    # = 0.03, se = 0.03 / sqrt(3), t = 10 / sqrt(3) = 5.77, p = 1 - t / sqrt(t^2 + 2)
    # = 1 - sqrt(100 / 106) = 0.0287; CI 0.10 -+ 4.302653 x 0.0173205 = 0.10 -+ 0.0745241
    assert 1 - math.sqrt(100 / 106) == pytest.approx(0.028714, abs=1e-6)
    assert rows[1]["difference"] == "+0.1000" and rows[1]["95% CI"] == "[+0.0255, +0.1745]"
    assert rows[1]["t"] == "5.77" and rows[1]["p (paired t)"] == "0.0287"
    assert rows[1]["evidence"] == "better (p < 0.05)"
    # gvr: seeds 1 and 2 pair with random's: d = (0.05, 0.04); too few for an interval or p
    assert rows[2]["seed pairs"] == "2" and rows[2]["difference"] == "+0.0450"
    assert rows[2]["baseline mean"] == "0.8100"  # random's mean over the paired seeds 1 and 2
    assert rows[2]["95% CI"] == rows[2]["t"] == rows[2]["p (paired t)"] == "–"
    assert rows[2]["evidence"] == f"too few seeds (2 pairs; {MIN_PAIRS} needed for a test)"
    assert "paired t-test" in note and "Student's t" in note
    assert f"fewer than {MIN_PAIRS} pairs no interval or p-value" in note


def test_significance_table_named_baseline_and_matching_configs():
    rows, _ = _table([_run(*r) for r in HAND_MADE], "lvr")
    assert [(r["group"], r["metric"]) for r in rows][:2] == [("random", "mean accuracy"),
                                                            ("random", "min accuracy")]
    assert rows[0]["difference"] == "-0.0200" and rows[0]["p (paired t)"] == "0.0742"
    assert rows[0]["95% CI"] == "[-0.0448, +0.0048]"
    with pytest.raises(ConfigError, match=r"--baseline: must name a sampler of the runs "
                                          r"\(one of: random, lvr, gvr\) \(got 'nope'\)"):
        _table([_run(*r) for r in HAND_MADE], "nope")
    # no random among the runs: no rows, a note that says how to name one
    rows, note = _table([_run(*r) for r in HAND_MADE if r[0] != "random"], None)
    assert rows == [] and "--baseline NAME" in note
    # a grid over samplers x active rate compares like with like (same rate)
    runs = [_run(s, seed, m + rate, w, rate) for s, seed, m, w in HAND_MADE[:6]
            for rate in (0.1, 0.2)]
    rows, _ = _table(runs, None)
    assert len(rows) == 4
    assert {r["difference"] for r in rows if r["metric"] == "mean accuracy"} == {"+0.0200"}
