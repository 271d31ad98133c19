"""Client task preferences in a run (clients.preferences, clients.preference_file,
sampler.preference_aware; docs/algorithms.md section 3.3, docs/preferences.md): refused pairs
are never trained, declines are counted in rounds.csv and summary.json, the default changes
nothing, and bad values are one-line errors naming the key."""

from __future__ import annotations

import csv
import json
import tomllib

import numpy as np
import pytest

from testkit import run_cli
from mmfl.engines.sequential import SequentialEngine
from mmfl.errors import ConfigError, DataError
from mmfl.experiment.config import config_from_dict, load_config
from mmfl.experiment.runner import Runner

RAW = {
    "name": "prefs", "seed": 4, "rounds": 4, "engine": "sequential",
    "clients": {"count": 10, "active_rate": 0.5, "processors": {"1": 0.5, "2": 0.5}},
    "sampler": {"name": "random"},
    "tasks": [
        {"name": "digits", "dataset": "digits", "model": "logreg", "lr": 0.1, "batch_size": 32},
        {"name": "wave", "dataset": "mnist1d", "model": "logreg", "lr": 0.1, "batch_size": 32,
         "dataset_options": {"num_samples": 300}},
    ],
}


class RecordingEngine(SequentialEngine):
    """The sequential engine that records every (round, client, task) it is asked to train."""

    def __init__(self, federation, **kw):
        super().__init__(federation, **kw)
        self.asked: list[tuple[int, int, int]] = []

    def train(self, params, clients, tasks, round, corrections=None):
        self.asked += [(round, int(i), int(s)) for i, s in zip(clients, tasks)]
        return super().train(params, clients, tasks, round, corrections)


def _cfg(clients=None, sampler=None):
    return config_from_dict({**RAW, "clients": {**RAW["clients"], **(clients or {})},
                             "sampler": {**RAW["sampler"], **(sampler or {})}})


def _run(tmp_path, name, cfg):
    engines = []

    def factory(fed):
        engines.append(RecordingEngine(fed, seed=cfg.seed))
        return engines[0]

    out = tmp_path / name
    summary = Runner(cfg, out, engine_factory=factory).run()
    with open(out / "rounds.csv", newline="") as f:
        rounds = list(csv.DictReader(f))
    return summary, rounds, engines[0], out


def test_declines_are_counted_in_rounds_csv_and_summary(tmp_path):
    summary, rounds, engine, _ = _run(tmp_path, "soft", _cfg({"preferences": 0.5}))
    declined = [int(r["declined"]) for r in rounds]
    assert sum(declined) > 0  # w = 0.5 everywhere: about half the slots decline
    for t, r in enumerate(rounds):
        trained = {(i, s) for (rt, i, s) in engine.asked if rt == t}
        assert int(r["local_trainings"]) == len(trained)  # declined pairs never train
        assert ("declined" in r["note"]) == (int(r["declined"]) > 0)
    assert summary["cost"]["declined"] == sum(declined)
    assert summary["preferences"]["refused_pairs"] == 0
    assert summary["preferences"]["soft_pairs"] == sum(
        1 for row in json.loads((tmp_path / "soft" / "federation.json").read_text())
        ["n_samples"] for n in row if n > 0)


def test_declines_draw_from_their_own_stream(tmp_path):
    """Soft preferences only (no refusal): the allocation is the one without preferences, so
    in every round slots + declined equals the slots of the run without them; aware and
    unaware runs decline the same slots (only the reported probabilities differ)."""
    _, plain, _, _ = _run(tmp_path, "plain", _cfg())
    _, soft, _, _ = _run(tmp_path, "soft", _cfg({"preferences": 0.6}))
    _, aware, _, _ = _run(tmp_path, "aware", _cfg({"preferences": 0.6},
                                                   {"preference_aware": True}))
    assert [int(r["slots"]) + int(r["declined"]) for r in soft] == [
        int(r["slots"]) for r in plain]
    assert sum(int(r["declined"]) for r in soft) > 0
    assert [r["declined"] for r in aware] == [r["declined"] for r in soft]
    # aware: expected slots sum p w = 0.6 sum p
    np.testing.assert_allclose(float(aware[0]["expected_slots"]),
                               0.6 * float(soft[0]["expected_slots"]), rtol=1e-5)


def test_refused_pairs_are_never_trained(tmp_path):
    """A preference file refuses client 0 everything and client 1 task digits (by name) and
    softens client 2's wave (by index); sampler full trains every other eligible pair."""
    f = tmp_path / "prefs.csv"
    f.write_text("client,task,willingness\n0,digits,0\n0,wave,0\n1,digits,0\n2,1,0.5\n",
                 encoding="utf-8")
    cfg = _cfg({"preference_file": str(f)}, {"name": "full"})
    summary, rounds, engine, out = _run(tmp_path, "refuse", cfg)
    asked = {(i, s) for (_, i, s) in engine.asked}
    assert asked and not asked & {(0, 0), (0, 1), (1, 0)}
    n = np.array(json.loads((out / "federation.json").read_text())["n_samples"])
    assert (n[0] == 0).all() and n[1, 0] == 0  # refused pairs hold no data for the samplers
    held = (n > 0).sum()
    # full: every held pair but the softened one trains every round, that one half the time
    assert all(int(r["local_trainings"]) + int(r["declined"]) == held for r in rounds)
    assert summary["preferences"]["soft_pairs"] == 1


def test_default_is_byte_identical(tmp_path):
    """preferences = 1 (the default) with preference_aware: the run without preferences,
    byte for byte (metrics.csv, rounds.csv, config.toml), and no summary entry."""
    s0, _, _, a = _run(tmp_path, "a", _cfg())
    s1, _, _, b = _run(tmp_path, "b", _cfg({"preferences": 1}, {"preference_aware": True}))
    for name in ("metrics.csv", "rounds.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    cfg_a = tomllib.loads((a / "config.toml").read_text())
    cfg_b = tomllib.loads((b / "config.toml").read_text())
    assert "preferences" not in cfg_a["clients"] and "preference_aware" not in cfg_a["sampler"]
    assert cfg_b["sampler"].pop("preference_aware") is True and cfg_a == cfg_b
    assert "preferences" not in s0 and s0["cost"]["declined"] == 0


def test_unquoted_decimal_keys_and_round_trip(tmp_path):
    """TOML reads {1.0 = 0.6, 0.5 = 0.3, 0.0 = 0.1} as nested tables; the config joins the
    keys back, and the resolved config.toml reads back equal."""
    p = tmp_path / "c.toml"
    p.write_text('name = "p"\nengine = "sequential"\n[clients]\ncount = 10\n'
                 'preferences = { 1.0 = 0.6, 0.5 = 0.3, 0.0 = 0.1 }\n'
                 '[[tasks]]\nname = "d"\ndataset = "digits"\n', encoding="utf-8")
    cfg = load_config(p)
    assert cfg.clients.preferences == ((0.0, 0.1), (0.5, 0.3), (1.0, 0.6))
    assert config_from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["clients"]["preferences"] == {"0.0": 0.1, "0.5": 0.3, "1.0": 0.6}


@pytest.mark.parametrize("clients, sampler, key", [
    ({"preferences": 1.5}, {}, "clients.preferences"),
    ({"preferences": -0.1}, {}, "clients.preferences"),
    ({"preferences": "high"}, {}, "clients.preferences"),
    ({"preferences": True}, {}, "clients.preferences"),
    ({"preferences": {"0.5": 0.5}}, {}, "clients.preferences"),
    ({"preferences": {}}, {}, "clients.preferences"),
    ({"preferences": {"x": 1.0}}, {}, "clients.preferences.x"),
    ({"preferences": {"2": 1.0}}, {}, "clients.preferences.2"),
    ({"preferences": {"0.5": 1.5}}, {}, "clients.preferences.0.5"),
    ({"preferences": {"1": 0.5, "1.0": 0.5}}, {}, "clients.preferences.1.0"),
    ({"preference_file": 3}, {}, "clients.preference_file"),
    ({}, {"preference_aware": "yes"}, "sampler.preference_aware"),
])
def test_bad_values_name_the_key(clients, sampler, key):
    with pytest.raises(ConfigError) as e:
        _cfg(clients, sampler)
    assert e.value.key == key


@pytest.mark.parametrize("rows, where", [
    ("client,task\n0,digits\n", "needs the columns client,task,willingness"),
    ("client,task,willingness\nzero,digits,1\n", ":2: clients.preference_file: malformed"),
    ("client,task,willingness\n10,digits,1\n", ":2: clients.preference_file: client 10"),
    ("client,task,willingness\n0,nope,1\n", ":2: clients.preference_file: task 'nope'"),
    ("client,task,willingness\n0,2,1\n", ":2: clients.preference_file: task '2'"),
    ("client,task,willingness\n0,0,1.2\n", ":2: clients.preference_file: willingness"),
    ("client,task,willingness\n0,0,nan\n", ":2: clients.preference_file: willingness"),
    ("client,task,willingness\n0,0,1\n0,digits,0\n", ":3: clients.preference_file: client 0"),
])
def test_bad_preference_files(tmp_path, rows, where):
    f = tmp_path / "p.csv"
    f.write_text(rows, encoding="utf-8")
    with pytest.raises(DataError, match="clients.preference_file") as e:
        Runner(_cfg({"preference_file": str(f)}), tmp_path / "out").run()
    assert where in str(e.value)


def test_cli_names_the_key_and_exits_2(tiny_config, tmp_path):
    r = run_cli("run", str(tiny_config), "--set", "clients.preferences=2", "--out",
                str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert "clients.preferences" in r.stderr and "Traceback" not in r.stderr


def test_resume_with_preferences_equals_uninterrupted(tmp_path):
    """Declines come from per-round streams and the declined total travels in the checkpoint:
    a run stopped after 2 rounds and resumed to 4 writes what the uninterrupted run writes."""
    import mmfl

    full = _cfg({"preferences": {"1": 0.5, "0.5": 0.3, "0": 0.2}}, {"preference_aware": True})
    mmfl.run(full, tmp_path / "full")
    mmfl.run(full.replace(rounds=2), tmp_path / "part")
    mmfl.run(full, tmp_path / "part", resume=True)
    for f in ("metrics.csv", "rounds.csv", "federation.json"):
        assert (tmp_path / "part" / f).read_bytes() == (tmp_path / "full" / f).read_bytes(), f
    a = json.loads((tmp_path / "full" / "summary.json").read_text())
    b = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert a["cost"] == b["cost"] and a["preferences"] == b["preferences"]
    assert a["cost"]["declined"] > 0 and a["preferences"]["refused_pairs"] > 0


def test_describe_names_the_preferences():
    from mmfl.experiment.describe import describe_federation
    from mmfl.experiment.federation import build_federation

    cfg = _cfg({"preferences": {"1": 0.5, "0.5": 0.3, "0": 0.2}}, {"preference_aware": True})
    text = describe_federation(cfg, build_federation(cfg))
    line = next(x for x in text.splitlines() if x.startswith("preferences: "))
    assert "refused" in line and "soft" in line and "preference-aware" in line
    assert "preferences" not in describe_federation(_cfg(), build_federation(_cfg()))
