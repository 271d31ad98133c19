"""The run directory: checks, fingerprint, checkpoint round trip and the crash guarantee
(tables restored from the checkpoint's copy of their unsynced rows)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from testkit import tiny_config_text

import mmfl
from mmfl.errors import ResultsError
from mmfl.experiment import checkpoint
from mmfl.experiment.config import load_config
from mmfl.experiment.results import RunWriter
from mmfl.experiment.rundir import (CHECKPOINT, Checkpointer, RunState, check_out_dir,
                                    config_fingerprint)


def _cfg(tmp_path, rounds=4):
    p = tmp_path / f"cfg-{rounds}.toml"
    p.write_text(tiny_config_text(rounds=rounds), encoding="utf-8")
    return load_config(p)


class _Counter:
    """A stateful object with one array, for the checkpoint round trip."""

    def __init__(self, v):
        self.v = np.asarray(v, np.float64)

    def state_dict(self):
        return {"v": self.v}

    def load_state_dict(self, d):
        self.v = d["v"]


def test_checkpointer_round_trip_and_fingerprint(tmp_path):
    st = RunState(round=3, params=[torch.arange(4.0), torch.ones(2)], local_steps=17,
                  sim_time=2.5)
    st.evaluated(3, np.array([0.5, 0.25]), np.array([1.0, 2.0]))
    obj = _Counter([1.0, 2.0])
    Checkpointer(tmp_path, "abc", [("thing", obj)]).save(st, tables={"t": {"durable": 5,
                                                                          "tail": "x\n"}})
    back = RunState(params=[torch.zeros(4), torch.zeros(2)])
    other = _Counter([0.0])
    tables = Checkpointer(tmp_path, "abc", [("thing", other)]).load(back)
    assert tables == {"t": {"durable": 5, "tail": "x\n"}}
    assert back.round == 3 and back.local_steps == 17 and back.sim_time == 2.5
    assert torch.equal(back.params[0], st.params[0]) and back.evaluated_after(3)
    np.testing.assert_array_equal(other.v, [1.0, 2.0])
    np.testing.assert_array_equal(back.task_accuracies, [0.5, 0.25])
    with pytest.raises(ResultsError, match="another config or data folder"):
        Checkpointer(tmp_path, "xyz", []).load(RunState(params=[torch.zeros(4)]))


def test_fingerprint_ignores_rounds_only(tmp_path):
    cfg = _cfg(tmp_path)
    assert config_fingerprint(cfg, None) == config_fingerprint(cfg.replace(rounds=9), None)
    assert config_fingerprint(cfg, None) != config_fingerprint(cfg.replace(seed=9), None)
    assert config_fingerprint(cfg, None) != config_fingerprint(cfg, tmp_path)


def test_check_out_dir(tmp_path):
    cfg = _cfg(tmp_path, rounds=2)
    assert check_out_dir(cfg, tmp_path / "new", resume=False) is False
    (tmp_path / "file").write_text("x")
    with pytest.raises(ResultsError, match="not a folder"):
        check_out_dir(cfg, tmp_path / "file", resume=False)
    mmfl.run(cfg, tmp_path / "r")
    with pytest.raises(ResultsError, match="already holds a run"):
        check_out_dir(cfg, tmp_path / "r", resume=False)
    assert check_out_dir(cfg.replace(rounds=5), tmp_path / "r", resume=True) is True
    with pytest.raises(ResultsError, match="config differs"):
        check_out_dir(cfg.replace(seed=cfg.seed + 1), tmp_path / "r", resume=True)


def _append_round(w, r):
    w.append("metrics.csv", [{"round": r, "task": "a"}])
    w.append("rounds.csv", [{"round": r}])
    w.append("timing.csv", [{"round": r}])


def test_run_writer_restores_its_tables_from_a_snapshot(tmp_path):
    w = RunWriter(tmp_path)
    w.open(keep_until_round=None)
    _append_round(w, 1)
    w.sync()                                   # round 1 is on disk
    durable = (tmp_path / "metrics.csv").read_bytes()
    _append_round(w, 2)
    w.flush()
    snap = w.snapshot()
    assert snap["metrics.csv"]["durable"] == len(durable)
    assert snap["metrics.csv"]["tail"].startswith("2,a,")
    want = (tmp_path / "metrics.csv").read_bytes()
    _append_round(w, 3)  # after the snapshot: dropped
    w.close()
    # a system crash lost the unsynced row 2 (and 3)
    (tmp_path / "metrics.csv").write_bytes(durable)
    w = RunWriter(tmp_path)
    w.open(keep_until_round=2, restore=snap)
    w.close()
    assert (tmp_path / "metrics.csv").read_bytes() == want
    # the same snapshot over a file with extra rows: cut back to the snapshot
    (tmp_path / "metrics.csv").write_bytes(want + b"3,a,,,,,,,\n4,a,0.")
    w = RunWriter(tmp_path)
    w.open(keep_until_round=2, restore=snap)
    w.close()
    assert (tmp_path / "metrics.csv").read_bytes() == want
    # a changed byte among the rows the checkpoint found on disk
    (tmp_path / "metrics.csv").write_bytes(want.replace(b"1,a", b"7,a"))
    with pytest.raises(ResultsError, match="rows differ from those the checkpoint recorded"):
        RunWriter(tmp_path).open(keep_until_round=2, restore=snap)
    (tmp_path / "metrics.csv").write_bytes(durable[:5])
    with pytest.raises(ResultsError, match="shorter than the .* damaged"):
        RunWriter(tmp_path).open(keep_until_round=2, restore=snap)


def test_unsynced_rows_lost_in_a_system_crash_come_back_from_the_checkpoint(tmp_path):
    """After a crash that lost every row not fsynced, resuming gives the bytes of an
    uninterrupted run: the rows travel in the checkpoint."""
    cfg = _cfg(tmp_path, rounds=7)
    mmfl.run(cfg, tmp_path / "ref")
    out = tmp_path / "r"
    mmfl.run(cfg.replace(rounds=4), out)
    _, meta = checkpoint.load(out / CHECKPOINT)
    assert meta["round"] == 4 and meta["tables"]["metrics.csv"]["tail"]
    for name, snap in meta["tables"].items():  # the OS kept only the fsynced bytes
        path = out / name
        path.write_bytes(path.read_bytes()[:snap["durable"]])
    mmfl.run(cfg, out, resume=True)
    for f in ("metrics.csv", "rounds.csv"):
        assert (out / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f


def test_threads_may_change_on_resume_and_results_do_not(tmp_path):
    cfg = _cfg(tmp_path, rounds=5)
    mmfl.run(cfg.replace(threads=1), tmp_path / "ref")
    mmfl.run(cfg.replace(rounds=3, threads=1), tmp_path / "r")
    mmfl.run(cfg.replace(threads=2), tmp_path / "r", resume=True)
    for f in ("metrics.csv", "rounds.csv"):
        assert (tmp_path / "r" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f


def test_checkpoints_of_older_versions_resume(tmp_path):
    """A checkpoint whose fingerprint still includes ``threads`` (as older mmfl wrote it) is
    accepted; any other fingerprint is refused."""
    import hashlib

    from mmfl.experiment import tomlio

    cfg = _cfg(tmp_path, rounds=5).replace(threads=1)
    mmfl.run(cfg, tmp_path / "ref")
    out = tmp_path / "r"
    mmfl.run(cfg.replace(rounds=3), out)
    d = cfg.to_dict()
    d.pop("rounds")
    old_fp = hashlib.sha256((tomlio.dumps(d) + "\ndata_dir=None").encode()).hexdigest()[:16]
    arrays, meta = checkpoint.load(out / CHECKPOINT)
    checkpoint.save(out / CHECKPOINT, arrays, {**meta, "fingerprint": old_fp})
    mmfl.run(cfg.replace(threads="auto"), out, resume=True)
    assert (out / "metrics.csv").read_bytes() == (tmp_path / "ref" / "metrics.csv").read_bytes()
    checkpoint.save(out / CHECKPOINT, arrays, {**meta, "fingerprint": "0" * 16})
    with pytest.raises(ResultsError, match="another config or data folder"):
        mmfl.run(cfg.replace(rounds=6), out, resume=True)


def test_resolve_threads(monkeypatch):
    from mmfl.threads import AUTO_THREADS_ENV, resolve_threads

    assert resolve_threads(3) == 3
    monkeypatch.setenv(AUTO_THREADS_ENV, "1")
    assert resolve_threads("auto") == 1
    monkeypatch.delenv(AUTO_THREADS_ENV)
    import os
    assert resolve_threads("auto") == len(os.sched_getaffinity(0))
