"""sampler.replay_file: a recorded allocation replaces the sampler's draw in the rounds it lists."""

from __future__ import annotations

import json

import numpy as np
import pytest
from testkit import tiny_config_text

import mmfl
from mmfl.core.drawing import draw
from mmfl.errors import DataError
from mmfl.experiment.config import load_config
from mmfl.experiment.replay import read_replay_file
from mmfl.experiment.allocation import RoundDraw
from mmfl.types import Population

#: 3 clients with 1, 2 and 1 processors (P = 4), 2 models; client 0 holds only model 0
POP = Population(np.array([[5, 0], [4, 6], [3, 2]]), np.array([1, 2, 1]), ("a", "b"))
#: p_{s|b}: processor 0 is client 0's, 1-2 client 1's, 3 client 2's
P = np.array([[0.5, 0.0], [0.2, 0.3], [0.2, 0.3], [0.1, 0.6]])


def _write(tmp_path, rounds, name="alloc.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"rounds": rounds, "source": "test"}))
    return path


def test_replayed_slots_take_the_clients_processors_in_order(tmp_path):
    replay = read_replay_file(_write(tmp_path, {"2": [[1, 1], [2, 1], [1, 1]]}), POP)
    asked = draw(P, POP, np.random.default_rng(0))
    got = replay(1, asked, POP)  # round 2 (t = 1)
    # hand-worked: client 1's two slots take its processors 1 and 2, client 2's its processor 3
    assert got.client.tolist() == [1, 2, 1]
    assert got.task.tolist() == [1, 1, 1]
    assert got.processor.tolist() == [1, 3, 2]
    assert got.probability.tolist() == [0.3, 0.6, 0.3]
    assert got.share.tolist() == [0.5, 1.0, 0.5]  # 1 / B_i
    assert np.array_equal(got.probabilities, P)
    assert "replayed 3 slots from alloc.json" in got.note


def test_rounds_not_listed_keep_the_samplers_draw(tmp_path):
    replay = read_replay_file(_write(tmp_path, {"2": [[0, 0]]}), POP)
    asked = draw(P, POP, np.random.default_rng(1))
    assert replay(0, asked, POP) is asked
    assert replay(2, asked, POP) is asked


@pytest.mark.parametrize("rounds, message", [
    ({"1": [[0, 1]]}, "client 0 on b, which it holds no data for"),
    ({"1": [[0, 0], [0, 0]]}, "gives client 0 2 slots, more than its 1 processors"),
    ({"1": [[3, 0]]}, "outside the federation (3 clients, 2 tasks)"),
    ({"0": [[0, 0]]}, "rounds are numbered from 1"),
    ({"x": [[0, 0]]}, "round 'x' must be a number"),
])
def test_bad_files_name_the_round_and_the_problem(tmp_path, rounds, message):
    with pytest.raises(DataError, match="alloc.json: .*" + message.replace("(", r"\(")
                       .replace(")", r"\)")):
        read_replay_file(_write(tmp_path, rounds), POP)


def test_unreadable_file_is_a_data_error(tmp_path):
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="cannot read the replay file"):
        read_replay_file(tmp_path / "bad.json", POP)
    (tmp_path / "norounds.json").write_text("[]")
    with pytest.raises(DataError, match="needs a 'rounds' object"):
        read_replay_file(tmp_path / "norounds.json", POP)


def test_a_slot_the_sampler_gives_probability_zero_is_refused(tmp_path):
    p = P.copy()
    p[3, 1] = 0.0
    replay = read_replay_file(_write(tmp_path, {"1": [[2, 1]]}), POP)
    with pytest.raises(DataError, match="round 1 replays client 2 on b, which the sampler "
                                        "gives probability 0"):
        replay(0, draw(p, POP, np.random.default_rng(0)), POP)


def _config(tmp_path, sampler, overrides=()):
    path = tmp_path / "cfg.toml"
    path.write_text(tiny_config_text(rounds=3, sampler=sampler), encoding="utf-8")
    return load_config(path, list(overrides))


@pytest.mark.parametrize("sampler", ["random", "lvr"])
def test_replaying_the_samplers_own_draw_changes_nothing(tmp_path, monkeypatch, sampler):
    """Record a run's draws, replay them: metrics.csv byte-identical (so the replay path keeps
    the sampler's probabilities, shares and random streams)."""
    drawn: dict[str, list] = {}
    original = RoundDraw.__call__

    def recording(self, t, state):
        a, declined, bids = original(self, t, state)
        drawn[str(t + 1)] = np.stack([a.client, a.task], axis=1).tolist()
        return a, declined, bids

    monkeypatch.setattr(RoundDraw, "__call__", recording)
    mmfl.run(_config(tmp_path, sampler), tmp_path / "drawn")
    monkeypatch.setattr(RoundDraw, "__call__", original)
    path = _write(tmp_path, drawn)
    mmfl.run(_config(tmp_path, sampler, [f'sampler.replay_file="{path}"']), tmp_path / "replayed")
    before = (tmp_path / "drawn" / "metrics.csv").read_bytes()
    assert (tmp_path / "replayed" / "metrics.csv").read_bytes() == before
    assert "replayed" in (tmp_path / "replayed" / "rounds.csv").read_text()


def test_a_replayed_round_trains_the_listed_pairs(tmp_path):
    cfg = _config(tmp_path, "random")
    pop = mmfl.experiment.federation.build_federation(cfg).population
    i = int(np.flatnonzero(pop.holds[:, 0])[0])
    path = _write(tmp_path, {"1": [[i, 0]]})
    mmfl.run(_config(tmp_path, "random", [f'sampler.replay_file="{path}"']), tmp_path / "one")
    rounds = (tmp_path / "one" / "rounds.csv").read_text().splitlines()
    header, first = rounds[0].split(","), rounds[1].split(",")
    assert first[header.index("slots")] == "1"
    assert first[header.index("local_trainings")] == "1"


def test_the_option_is_written_only_when_used(tmp_path):
    plain = _config(tmp_path, "random")
    assert plain.sampler.replay_file == ""
    assert "replay_file" not in plain.to_dict()["sampler"]  # older fingerprints stay valid
    used = _config(tmp_path, "random", ['sampler.replay_file="x.json"'])
    assert used.to_dict()["sampler"]["replay_file"] == "x.json"
    assert used.replace(rounds=5).sampler.replay_file == "x.json"
