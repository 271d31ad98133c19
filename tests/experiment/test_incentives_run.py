"""Paid recruitment in a run (clients.costs, clients.payment_budget; mmfl's own auction,
docs/algorithms.md section 3.4, docs/incentives.md): only recruited clients train, payments stay
within the budget, clients not recruited are counted, the default changes nothing, and bad values
are one-line errors naming the key."""

from __future__ import annotations

import numpy as np
import pytest

from test_preferences_run import RAW, _run  # the recording engine and run helper
from mmfl.core.incentives import auction
from mmfl.errors import ConfigError
from mmfl.experiment.config import config_from_dict
from mmfl.experiment.incentives import Incentives
from mmfl.types import Assignment, Population


def _cfg(**clients):
    return config_from_dict({**RAW, "clients": {**RAW["clients"], **clients}})


POP3 = Population(np.ones((3, 2), int), np.array([1, 1, 2]), ("a", "b"))
ASKED = Assignment(np.array([0, 1, 2, 3]), np.array([0, 1, 2, 2]), np.array([0, 1, 0, 1]),
                   np.full(4, 0.5), np.array([1, 1, 0.5, 0.5]), np.full((4, 2), 0.25))


def test_recruit_keeps_the_auction_winners_and_counts_the_rest():
    """Three drawn clients, costs c_{i,s} = 1 + i; client 2 drawn for two tasks bids 6.
    Bids (1, 2, 6), B = 4: k* = 2 (2 <= 4/2, 6 > 4/3): clients 0 and 1 recruited."""
    costs = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    inc = Incentives(costs, 4.0, seed=0)
    kept, gone = inc.recruit(0, ASKED, POP3)
    assert gone == 2 and kept.client.tolist() == [0, 1] and "not recruited" in kept.note
    # client 0 (others 2, 6): k = 1: min(4, 2) = 2; k = 2: min(2, 6) = 2; k = 3: 6 > 4/3
    # client 1 (others 1, 6): k = 1: min(4, 1) = 1; k = 2: min(2, 6) = 2: both paid 2
    won, pay = auction(np.array([1.0, 2.0, 6.0]), 4.0)
    assert won.tolist() == [True, True, False] and pay.tolist() == [2.0, 2.0, 0.0]
    s = inc.summary()
    assert (s["bidders"], s["recruited"], s["unrecruited_slots"]) == (3, 2, 2)
    assert (s["paid"], s["recruited_cost"]) == (4.0, 3.0)


def test_recruitment_aware_scales_the_kept_probabilities():
    """k* = 2 of n = 3 drawn clients: aware slots report p * 2/3; unaware keep p."""
    costs = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    plain, _ = Incentives(costs, 4.0, seed=0).recruit(0, ASKED, POP3)
    aware, _ = Incentives(costs, 4.0, seed=0, aware=True).recruit(0, ASKED, POP3)
    np.testing.assert_allclose(plain.probability, [0.5, 0.5])
    np.testing.assert_allclose(aware.probability, [0.5 * 2 / 3, 0.5 * 2 / 3])
    np.testing.assert_allclose(aware.probabilities, np.full((4, 2), 0.25 * 2 / 3))
    everyone, gone = Incentives(costs, 100.0, seed=0, aware=True).recruit(0, ASKED, POP3)
    assert gone == 0 and everyone is ASKED  # all recruited: nothing to scale


def test_a_run_trains_only_recruited_clients_within_budget(tmp_path):
    summary, rounds, engine, _ = _run(tmp_path, "paid",
                                      _cfg(costs=[0.5, 1.5], payment_budget=2.0))
    inc = summary["incentives"]
    declined = [int(r["declined"]) for r in rounds]
    assert inc["unrecruited_slots"] == sum(declined) > 0  # B = 2 cannot pay every drawn client
    assert summary["cost"]["declined"] == sum(declined)
    assert 0 < inc["recruited"] < inc["bidders"]
    # random uploads no scalars of its own: every scalar upload is a bid, one per drawn client
    assert summary["cost"]["scalar_uploads"] == inc["bidders"]
    assert inc["recruited_cost"] <= inc["paid"] <= 2.0 * inc["rounds"] + 1e-9
    for t, r in enumerate(rounds):
        trained = {(i, s) for (rt, i, s) in engine.asked if rt == t}
        assert int(r["local_trainings"]) == len(trained)
        assert ("not recruited" in r["note"]) == (int(r["declined"]) > 0)
    # each round at most floor(B / min cost) = 4 clients can be recruited
    clients_per_round = [len({i for (rt, i, _) in engine.asked if rt == t}) for t in range(4)]
    assert max(clients_per_round) <= 4


def test_recruitment_aware_run_differs_only_in_weights(tmp_path):
    """The same recruits train (same streams); only the aggregation weights change."""
    _, r0, e0, _ = _run(tmp_path, "plain", _cfg(costs=1.0, payment_budget=2.5))
    _, r1, e1, _ = _run(tmp_path, "aware", _cfg(costs=1.0, payment_budget=2.5,
                                                  recruitment_aware=True))
    assert [r["declined"] for r in r0] == [r["declined"] for r in r1]
    assert [x for x in e0.asked if x[0] == 0] == [x for x in e1.asked if x[0] == 0]
    assert r0[0]["expected_slots"] != r1[0]["expected_slots"]


def test_default_is_the_run_without_incentives(tmp_path):
    """costs = 0 (the default): no auction, no incentives entry, metrics unchanged."""
    s0, r0, _, out0 = _run(tmp_path, "plain", _cfg())
    s1, r1, _, out1 = _run(tmp_path, "zero", _cfg(costs=0, payment_budget=0))
    assert "incentives" not in s0 and "incentives" not in s1
    assert (out0 / "metrics.csv").read_bytes() == (out1 / "metrics.csv").read_bytes()
    assert "costs" not in (out0 / "config.toml").read_text()


@pytest.mark.parametrize("clients, key", [
    ({"costs": -1, "payment_budget": 1}, "clients.costs"),
    ({"costs": [2, 1], "payment_budget": 1}, "clients.costs"),
    ({"costs": [0, 1, 2], "payment_budget": 1}, "clients.costs"),
    ({"costs": "high", "payment_budget": 1}, "clients.costs"),
    ({"costs": 1}, "clients.payment_budget"),
    ({"payment_budget": 3}, "clients.payment_budget"),
    ({"costs": 1, "payment_budget": -1}, "clients.payment_budget"),
])
def test_bad_values_name_the_key(clients, key):
    with pytest.raises(ConfigError) as e:
        _cfg(**clients)
    assert e.value.key == key and "\n" not in str(e.value)


def test_describe_names_the_incentives():
    from mmfl.experiment.describe import describe_federation
    from mmfl.experiment.federation import build_federation

    cfg = _cfg(costs=[0.5, 1.5], payment_budget=2.5, recruitment_aware=True)
    text = describe_federation(cfg, build_federation(cfg))
    assert ("incentives: costs per pair uniform [0.5, 1.5), payment budget B = 2.5 per round "
            "(mmfl's own auction, not the paper's); recruitment-aware") in text
    assert "incentives" not in describe_federation(_cfg(), build_federation(_cfg()))
