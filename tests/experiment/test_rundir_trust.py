"""Run directories are owned, locked and verified: two runs on one folder, user files in
--out, leftovers of an interrupted write, and every way a resumed folder can be damaged."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from testkit import ROOT, tiny_config_text

import mmfl
from mmfl.errors import ResultsError
from mmfl.experiment import checkpoint
from mmfl.experiment.config import load_config
from mmfl.experiment.results import RunWriter
from mmfl.experiment.runlock import MARKER, RunLock


def _cfg(tmp_path, rounds=4, overrides=()):
    p = tmp_path / f"cfg-{rounds}.toml"
    p.write_text(tiny_config_text(rounds=rounds), encoding="utf-8")
    return load_config(p, list(overrides))


def test_a_locked_folder_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "r"
    with RunLock(out):
        with pytest.raises(ResultsError, match=rf"{out}: in use by another mmfl run "
                                               rf"\(pid {os.getpid()}\)"):
            mmfl.run(_cfg(tmp_path), out)
        assert sorted(p.name for p in out.iterdir()) == [MARKER]  # nothing written
    mmfl.run(_cfg(tmp_path), out)  # released: the folder is usable again
    assert json.loads((out / MARKER).read_text())["pid"] == os.getpid()


def test_two_runs_started_together_on_one_folder(tmp_path):
    """One wins and completes every round; the other exits 2 naming the clash."""
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(tiny_config_text(rounds=12), encoding="utf-8")
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "mmfl.cli", "run", str(cfg), "--out", str(out),
           "--progress", "none"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], results
    loser = next(err for c, err in results if c == 2)
    errors = [line for line in loser.splitlines() if line.startswith("mmfl: error")]
    assert "Traceback" not in loser and len(errors) == 1
    assert "in use by another mmfl run (pid" in errors[0] or "already holds a run" in errors[0]
    r = mmfl.read_results(out)
    assert r.summary["status"] == "completed"
    assert sorted({int(x["round"]) for x in r.metrics}) == list(range(1, 13))


def test_user_files_in_out_are_never_overwritten(tmp_path):
    out = tmp_path / "d2"
    out.mkdir()
    (out / "config.toml").write_text("mine = 1\n")
    with pytest.raises(ResultsError, match=r"config\.toml: exists and was not written by mmfl"):
        mmfl.run(_cfg(tmp_path), out)
    assert (out / "config.toml").read_text() == "mine = 1\n"
    assert not (out / MARKER).exists()
    # unrelated files are fine, and kept
    (out / "config.toml").unlink()
    (out / "notes.txt").write_text("keep me")
    mmfl.run(_cfg(tmp_path), out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_run_files_are_every_name_a_run_writes(tmp_path):
    """runlock.RUN_FILES, the names the ownership check protects in a user's folder, is the
    run directory's list (mmfl.experiment.results), and runs that keep every kind of
    per-pair state on disk (stale updates, StaleVRE's probe updates, SCAFFOLD's control
    variates) write nothing else but the marker and the trained models."""
    from mmfl.experiment import results, runlock

    assert runlock.RUN_FILES is results.RUN_FILES
    written = set()
    for sampler, options in (("stalevre", ['sampler.score="probe"']), ("scaffold", [])):
        out = tmp_path / sampler
        mmfl.run(_cfg(tmp_path, rounds=2, overrides=[f'sampler.name="{sampler}"',
                                                     "stale_on_disk=true", *options]), out)
        written |= {p.name for p in out.iterdir()}
    assert written - {MARKER, "models"} == set(results.RUN_FILES)
    assert len(set(results.RUN_FILES)) == len(results.RUN_FILES)


def test_leftover_temp_files_are_removed_on_resume(tmp_path):
    cfg = _cfg(tmp_path, rounds=2)
    out = tmp_path / "r"
    mmfl.run(cfg, out)
    for name in ("checkpoint.safetensors.tmp", "summary.json.tmp", "metrics.csv.tmp"):
        (out / name).write_bytes(b"\0" * 4096)
    (out / "user.tmp").write_text("not ours")
    mmfl.run(cfg.replace(rounds=4), out, resume=True)
    assert not list(out.glob("*.safetensors.tmp")) and not (out / "summary.json.tmp").exists()
    assert not (out / "metrics.csv.tmp").exists() and (out / "user.tmp").exists()


def test_a_too_long_out_name_is_a_one_line_error(tmp_path):
    with pytest.raises(ResultsError, match="unusable --out"):
        mmfl.run(_cfg(tmp_path), tmp_path / ("x" * 300))


# -- resume verifies before it continues ----------------------------------------------------

@pytest.fixture
def stopped(tmp_path):
    """A run stopped after 4 of 8 rounds (config with rounds = 4, resumed with rounds = 8),
    and the metrics.csv of the same run done in one go."""
    cfg = _cfg(tmp_path)
    mmfl.run(cfg, tmp_path / "r")
    mmfl.run(cfg.replace(rounds=8), tmp_path / "whole")
    return cfg.replace(rounds=8), tmp_path / "r", (tmp_path / "whole" / "metrics.csv").read_bytes()


def _rewrite_checkpoint(path, edit_arrays=None, edit_meta=None, raw_meta=None):
    arrays, meta = checkpoint.load(path)
    if edit_arrays:
        edit_arrays(arrays)
    if edit_meta:
        edit_meta(meta)
    tmp = path.with_name("x.safetensors")
    save_file(arrays, str(tmp), metadata={"format": checkpoint.FORMAT,
                                          "meta": raw_meta if raw_meta is not None
                                          else json.dumps(meta)})
    os.replace(tmp, path)


def test_an_intact_folder_resumes_bit_exactly_even_with_garbage_appended(stopped):
    cfg, out, whole = stopped
    with open(out / "metrics.csv", "ab") as f:
        f.write(b"\xff\xfe garbage \x00\n9,zz\n")
    mmfl.run(cfg, out, resume=True)
    assert (out / "metrics.csv").read_bytes() == whole


def _flip_tensor_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # the data section ends the file
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (_flip_tensor_byte, r"tensor \S+ is damaged \(checksum mismatch\)"),
    (lambda p: _rewrite_checkpoint(p, edit_meta=lambda m: m.update(round=70)),
     r"metrics\.csv: holds rounds up to 4 .* checkpoint is at round 70"),
    (lambda p: _rewrite_checkpoint(p, raw_meta="{not json"),
     r"damaged checkpoint \(its metadata is not a JSON object\)"),
    (lambda p: _rewrite_checkpoint(
        p, edit_arrays=lambda a: a.update({"param.0": a["param.0"][:-1]}),
        edit_meta=lambda m: m.pop("crc32")),
     r"damaged checkpoint \(ValueError: param\.0 has shape"),
    (lambda p: _rewrite_checkpoint(p, edit_meta=lambda m: m.pop("cost")),
     r"damaged checkpoint \(KeyError"),
])
def test_a_damaged_checkpoint_is_refused(stopped, damage, message):
    cfg, out, _ = stopped
    before = (out / "metrics.csv").read_bytes()
    damage(out / "checkpoint.safetensors")
    with pytest.raises(ResultsError, match=message):
        mmfl.run(cfg, out, resume=True)
    assert (out / "metrics.csv").read_bytes() == before  # nothing lost


def _delete_rows(path):
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join(lines[:3] + lines[5:]))


def _cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("table", ["metrics.csv", "rounds.csv"])
@pytest.mark.parametrize("damage", [_delete_rows, _cut_in_half])
def test_damaged_synced_tables_are_refused(tmp_path, monkeypatch, table, damage):
    """Rows already fsynced when the checkpoint was written are verified against its hash."""
    monkeypatch.setattr(RunWriter, "SYNC_BYTES", 0)  # every round's rows are synced
    cfg = _cfg(tmp_path)
    mmfl.run(cfg, tmp_path / "r")
    damage(tmp_path / "r" / table)
    with pytest.raises(ResultsError, match=rf"{table}: .*(shorter than|rows differ)"):
        mmfl.run(cfg.replace(rounds=8), tmp_path / "r", resume=True)


@pytest.mark.parametrize("damage", [_delete_rows, _cut_in_half])
def test_damaged_unsynced_rows_are_restored_from_the_checkpoint(stopped, damage, caplog):
    """Rows written after the last fsync travel in the checkpoint: a damaged copy on disk is
    replaced by them (and said), and the run continues bit-exactly."""
    cfg, out, whole = stopped
    damage(out / "metrics.csv")
    with caplog.at_level("WARNING"):
        mmfl.run(cfg, out, resume=True)
    assert (out / "metrics.csv").read_bytes() == whole
    assert any("metrics.csv" in r.message and "restored" in r.message for r in caplog.records)


def test_tables_are_checked_without_a_checkpoint_copy_too(stopped):
    """A checkpoint of an older mmfl carries no copy of the tables: the rows must still
    cover rounds 1..4."""
    cfg, out, _ = stopped
    _rewrite_checkpoint(out / "checkpoint.safetensors", edit_meta=lambda m: m.pop("tables"))
    _delete_rows(out / "rounds.csv")
    with pytest.raises(ResultsError, match=r"rounds\.csv: holds rounds up to 2 with gaps"):
        mmfl.run(cfg, out, resume=True)


def test_checkpoint_checksums_cover_every_tensor(stopped):
    _, out, _ = stopped
    arrays = load_file(str(out / "checkpoint.safetensors"))
    _, meta = checkpoint.load(out / "checkpoint.safetensors")
    assert set(meta["crc32"]) == set(arrays)
    assert all(isinstance(v, int) for v in meta["crc32"].values())
    assert all(isinstance(t["sha256"], str) for t in meta["tables"].values())
    assert np.all([len(t["sha256"]) == 64 for t in meta["tables"].values()])


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00", b"[1, 2]"])
def test_read_results_names_a_damaged_summary(tmp_path, content):
    out = tmp_path / "r"
    mmfl.run(_cfg(tmp_path, rounds=1), out)
    (out / "summary.json").write_bytes(content)
    with pytest.raises(ResultsError, match=r"summary\.json: not a JSON object"):
        mmfl.read_results(out)
