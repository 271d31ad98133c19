"""Checkpoints of the per-pair stores (stale updates, probe updates, SCAFFOLD's controls): the
row log writes the rows changed since the previous checkpoint, compacts its files, restores
bit-exactly (also after kill -9), reads checkpoints of the older format (every row inside
checkpoint.safetensors) and names a damaged row file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from testkit import ROOT, tiny_config_text

import mmfl
from mmfl.engines.pair_store import ControlVariates, PairStore
from mmfl.errors import ResultsError
from mmfl.experiment import checkpoint
from mmfl.experiment.checkpoint import ROWS_SPACE, RowLog
from mmfl.experiment.config import load_config
from mmfl.experiment.results import CHECKPOINT, CHECKPOINT_ROWS
from mmfl.experiment.runner import Runner

HEADER = 1024  # a row file's bytes besides its rows and row numbers (safetensors header)


def _cfg(tmp_path, rounds, sampler, overrides=()):
    p = tmp_path / f"cfg-{rounds}-{sampler}.toml"
    p.write_text(tiny_config_text(rounds=rounds, sampler=sampler), encoding="utf-8")
    return load_config(p, list(overrides))


def _store(dtype="float32"):
    holds = np.array([[1, 1], [1, 0], [0, 1], [1, 1], [1, 1], [0, 1]], bool)  # 4 and 5 holders
    return PairStore(holds, [50, 30], dtype=dtype)


def _put(store, s, clients, seed):
    g = torch.from_numpy(np.random.default_rng(seed).normal(size=(len(clients), store.dims[s])))
    store.put(s, np.array(clients), g.float())


def _checkpoint(log):
    arrays, manifest = log.write()
    log.committed()
    return arrays, manifest


def _files(folder):
    return {p.name: p.stat().st_size for p in folder.iterdir()}


def _restored(arrays, manifest, folder, dtype="float32"):
    fresh = _store(dtype)
    RowLog(folder, {"stale": fresh}).restore(arrays, manifest)
    return fresh


def test_a_checkpoint_writes_the_changed_rows_only(tmp_path):
    store = _store()
    log = RowLog(tmp_path / "rows", {"stale": store})
    _put(store, 0, [0, 3], seed=1)
    _checkpoint(log)
    files = _files(tmp_path / "rows")
    assert list(files) == ["rows-000001.safetensors"]
    rows = 2 * 50 * 4 + 2 * 8  # two float32 rows of task 0, their int64 row numbers
    assert rows <= files["rows-000001.safetensors"] <= rows + HEADER
    _put(store, 1, [5], seed=2)
    _checkpoint(log)
    size = _files(tmp_path / "rows")["rows-000002.safetensors"]
    assert 30 * 4 + 8 <= size <= 30 * 4 + 8 + HEADER
    _checkpoint(log)  # nothing changed: no file
    assert len(_files(tmp_path / "rows")) == 2
    # rewriting both rows of file 1: it no longer holds a latest row and goes
    _put(store, 0, [3, 0], seed=3)
    arrays, manifest = _checkpoint(log)
    assert sorted(_files(tmp_path / "rows")) == ["rows-000002.safetensors",
                                                 "rows-000003.safetensors"]
    assert sorted(manifest["files"]) == ["2", "3"]
    assert arrays["rowlog.stale.owner.0"].tolist() == [3, -1, 3, -1]  # rows of clients 0,1,3,4
    assert arrays["rowlog.stale.owner.1"].tolist() == [-1, -1, -1, -1, 2]  # of 0,2,3,4,5
    fresh = _restored(arrays, manifest, tmp_path / "rows")
    for s in (0, 1):
        assert np.array_equal(fresh.rows[s], store.rows[s])
    assert not any(d.any() for d in fresh.dirty) and not any(d.any() for d in store.dirty)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 1), st.lists(st.integers(0, 3), min_size=1,
                                                              max_size=4, unique=True)),
                         max_size=3), min_size=1, max_size=12),
       st.sampled_from(["float32", "float16"]))
def test_row_log_restores_every_checkpoint_exactly_within_its_space(tmp_path_factory, rounds,
                                                                    dtype):
    """Any sequence of puts and checkpoints: each checkpoint restores the store bit-exactly,
    the folder holds exactly the files the manifest names, at most ROWS_SPACE times the bytes
    of the stored rows, and compaction rewrote at most the changed rows' bytes plus the
    store's."""
    folder = tmp_path_factory.mktemp("rows")
    store = _store(dtype)
    log = RowLog(folder, {"stale": store})
    row_bytes = [d * store.dtype().itemsize for d in store.dims]
    changed = written = most = 0
    for t, puts in enumerate(rounds):
        for k, (s, rows) in enumerate(puts):
            holders = np.flatnonzero(store.holds[:, s])
            _put(store, s, holders[[r for r in rows if r < len(holders)]], seed=100 * t + k)
        changed += sum(int(d.sum()) * b for d, b in zip(store.dirty, row_bytes))
        before = set(log.files)
        arrays, manifest = _checkpoint(log)
        written += sum(log.files[f]["bytes"] for f in set(log.files) - before)
        assert set(_files(folder)) == {log.path(int(f)).name for f in manifest["files"]}
        stored_bytes = sum(int(store.stored[:, s].sum()) * row_bytes[s] for s in (0, 1))
        most = max(most, stored_bytes)
        assert sum(f["bytes"] for f in manifest["files"].values()) <= ROWS_SPACE * stored_bytes
        assert written - changed <= changed + most
        fresh = _restored(arrays, manifest, folder, dtype)
        for s in (0, 1):
            assert np.array_equal(fresh.rows[s], store.rows[s])


def test_control_variates_checkpoint_their_client_rows_in_the_log(tmp_path):
    holds = np.ones((3, 1), bool)
    cv = ControlVariates(holds, [4])
    cv.clients.put(0, np.array([1]), torch.ones(1, 4))
    cv.server[0][:] = 2.0
    assert set(cv.state_dict(rows=False)) == {"stored", "norm_sq", "c.0"}
    log = RowLog(tmp_path / "rows", {"controls": cv.pair_store})
    arrays, manifest = _checkpoint(log)
    other = ControlVariates(holds, [4])
    other.load_state_dict(cv.state_dict(rows=False))
    RowLog(tmp_path / "rows", {"controls": other.pair_store}).restore(arrays, manifest)
    assert np.array_equal(other.clients.rows[0], cv.clients.rows[0])
    assert other.server[0].tolist() == [2.0] * 4


@pytest.mark.parametrize("sampler", ["stalevr", "fedvarp"])
def test_checkpoints_every_round_write_bytes_of_the_changed_rows(tmp_path, sampler):
    """Checkpointed every round, a stale-update run writes per round one file with the rows
    that round changed (and, in a round that compacts, the still-current rows of the files it
    deletes): its size is their bytes plus a small header, not the whole store; and
    checkpoint.safetensors holds no rows."""
    out = tmp_path / "r"
    seen: list[tuple[int, set, dict]] = []  # per round: files deleted, rows changed, new file

    class Rows:
        def on_start(self, *a):
            self.before, self.files = None, set()

        def on_end(self, *a):
            pass

        def on_round(self, record):
            store = runner.stores.stale
            now = [np.array(r) for r in store.rows]
            changed = {(s, int(i)) for s, r in enumerate(now) for i in np.flatnonzero(
                (r != (0 if self.before is None else self.before[s])).any(axis=1))}
            files = set(_files(out / CHECKPOINT_ROWS))
            new = {}
            for name in files - self.files:
                with safe_open(str(out / CHECKPOINT_ROWS / name), framework="numpy") as f:
                    new = {k: f.get_tensor(k) for k in f.keys() if ".rows." in k}
                new["bytes"] = (out / CHECKPOINT_ROWS / name).stat().st_size
            seen.append((len(self.files - files), changed, new))
            self.before, self.files = now, files
            assert (out / CHECKPOINT).stat().st_size < store.nbytes / 4  # no rows in it

    runner = Runner(_cfg(tmp_path, 8, sampler), out, callbacks=[Rows()])
    runner.run()
    store = runner.stores.stale
    row_bytes = [d * 4 for d in store.dims]
    assert sum(bool(c) for _, c, _ in seen) >= 6
    for deleted, changed, new in seen:
        assert bool(new) == bool(changed)
        if not new:
            continue
        in_file = {(s, int(i)) for s in range(len(row_bytes))
                   for i in new.get(f"stale.rows.{s}", [])}
        assert changed <= in_file
        if not deleted:  # no compaction: exactly the changed rows
            assert in_file == changed
        payload = sum(row_bytes[s] + 8 for s, _ in in_file)
        assert payload <= new["bytes"] <= payload + HEADER
    assert any(not deleted for deleted, _, new in seen if new)
    with safe_open(str(out / CHECKPOINT), framework="numpy") as f:
        assert not [k for k in f.keys() if k.startswith("stale.h.")]


@pytest.mark.parametrize("sampler, options", [("stalevr", []), ("scaffold", []),
                                              ("stalevre", ['sampler.score="probe"'])])
def test_a_checkpoint_of_the_older_format_still_resumes(tmp_path, sampler, options):
    """A checkpoint as mmfl wrote it before the row log (every row inside
    checkpoint.safetensors, no checkpoint-rows/) resumes to the metrics of an uninterrupted
    run, and the next checkpoint is of the new format."""
    whole = tmp_path / "whole"
    mmfl.run(_cfg(tmp_path, 6, sampler, options), whole)
    out = tmp_path / "old"
    mmfl.run(_cfg(tmp_path, 3, sampler, options), out)
    arrays, meta = checkpoint.load_with_rows(out / CHECKPOINT)  # rows as "<store>.h.<s>"
    arrays = {k: v for k, v in arrays.items() if not k.startswith("rowlog.")}
    del meta["rows"]
    meta["crc32"] = {k: checkpoint.crc32(v) for k, v in arrays.items()}
    checkpoint.save(out / CHECKPOINT, arrays, meta)
    for p in (out / CHECKPOINT_ROWS).iterdir():
        p.unlink()
    (out / CHECKPOINT_ROWS).rmdir()
    mmfl.run(_cfg(tmp_path, 6, sampler, options), out, resume=True)
    assert (out / "metrics.csv").read_bytes() == (whole / "metrics.csv").read_bytes()
    # the rows loaded from the old format are written into the new one's row files
    def state(run):  # the files holding the rows differ: the resume wrote every row anew
        arrays = checkpoint.load_with_rows(run / CHECKPOINT)[0]
        return {k: v for k, v in arrays.items() if not k.startswith("rowlog.")}

    resumed, uninterrupted = state(out), state(whole)
    assert sorted(resumed) == sorted(uninterrupted)
    assert len([k for k in resumed if ".h." in k]) == (4 if options else 2)  # probe + stale
    for k, h in resumed.items():
        np.testing.assert_array_equal(h, uninterrupted[k], err_msg=k)  # NaN equal to NaN


@pytest.fixture
def stale_run(tmp_path):
    out = tmp_path / "r"
    mmfl.run(_cfg(tmp_path, 3, "stalevr"), out)
    return _cfg(tmp_path, 5, "stalevr"), out


def test_a_damaged_row_file_is_a_one_line_error_naming_it(stale_run):
    cfg, out = stale_run
    victim = sorted((out / CHECKPOINT_ROWS).iterdir())[-1]
    raw = bytearray(victim.read_bytes())
    raw[-5] ^= 0xFF  # a byte of the last tensor's data
    victim.write_bytes(bytes(raw))
    with pytest.raises(ResultsError) as e:
        mmfl.run(cfg, out, resume=True)
    msg = str(e.value)
    assert "\n" not in msg and str(victim) in msg and "damaged checkpoint rows" in msg
    assert "checksum mismatch" in msg


def test_a_missing_row_file_is_a_one_line_error_naming_it(stale_run):
    cfg, out = stale_run
    victim = sorted((out / CHECKPOINT_ROWS).iterdir())[0]
    victim.unlink()
    with pytest.raises(ResultsError, match=f"{victim}: missing") as e:
        mmfl.run(cfg, out, resume=True)
    assert "\n" not in str(e.value)


def test_row_files_no_checkpoint_refers_to_are_removed_on_resume(stale_run, tmp_path):
    cfg, out = stale_run
    kept = set(_files(out / CHECKPOINT_ROWS))
    (out / CHECKPOINT_ROWS / "rows-000099.safetensors").write_bytes(b"\0" * 64)  # a crash's
    (out / CHECKPOINT_ROWS / "rows-000100.safetensors.tmp").write_bytes(b"\0" * 64)
    mmfl.run(cfg, out, resume=True)
    names = set(_files(out / CHECKPOINT_ROWS))
    assert not {"rows-000099.safetensors", "rows-000100.safetensors.tmp"} & names
    _, meta = checkpoint.load(out / CHECKPOINT)
    assert names == {f"rows-{int(f):06d}.safetensors" for f in meta["rows"]["files"]}
    assert names != kept
    mmfl.run(cfg, tmp_path / "whole")
    assert (out / "metrics.csv").read_bytes() == (tmp_path / "whole" / "metrics.csv").read_bytes()


@pytest.mark.parametrize("options", [["sampler.name=\"stalevr\""],
                                     ["sampler.name=\"scaffold\"", "stale_on_disk=true"]])
def test_kill_9_then_resume_equals_uninterrupted(tmp_path, options):
    """kill -9 in the middle of a run that checkpoints its stores every round (in RAM, and
    memory-mapped on disk), then --resume: the tables equal an uninterrupted run's."""
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(tiny_config_text(rounds=14), encoding="utf-8")
    sets = [a for o in options for a in ("--set", o)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    base = [sys.executable, "-m", "mmfl.cli", "run", str(cfg_path), "--progress", "none", *sets]
    ref = subprocess.run([*base, "--out", str(tmp_path / "ref")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    cmd = [*base, "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rounds_file = out / "rounds.csv"
    deadline = time.time() + 120
    while time.time() < deadline:
        if rounds_file.exists() and rounds_file.read_text().count("\n") > 4:
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert rounds_file.read_text().count("\n") - 1 < 14
    r = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for f in ("metrics.csv", "rounds.csv"):
        assert (out / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f
