"""Intermediate weights: [logging] keep_models = k keeps models/<task>.round<R>.safetensors
every k rounds; mmfl.load_model(run, task, round=R) loads them (or the final file, or the
checkpoint, when of round R) and says which rounds exist otherwise; resume keeps the files
consistent with the checkpoint it continues."""

from __future__ import annotations

import csv

import pytest
import torch
from testkit import tiny_config_text

import mmfl
from mmfl.errors import ResultsError
from mmfl.experiment.config import load_config


def _config(tmp_path, *sets, rounds=4):
    p = tmp_path / "cfg.toml"
    p.write_text(tiny_config_text(rounds=rounds), encoding="utf-8")
    return load_config(p, list(sets))


def _accuracy(run, task):
    """metrics.csv's accuracy text of ``task``, round -> str."""
    with open(run / "metrics.csv", newline="") as f:
        return {int(r["round"]): r["accuracy"] for r in csv.DictReader(f) if r["task"] == task}


def _measured(run, task, round_):
    model = mmfl.load_model(run, task, round=round_)
    x, y = mmfl.load_data(run, task)
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


class StopAfterRound3:
    """Callback: interrupts the run (as Ctrl-C would) after its round 3."""

    def on_start(self, *a):
        pass

    def on_round(self, record):
        if record.round == 3:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kept")
    run = tmp / "r"
    mmfl.run(_config(tmp, "logging.keep_models=1", "checkpoint_every=3"), run)
    return run


@pytest.mark.parametrize("task", ["digits", "wave"])
def test_every_kept_round_reproduces_its_metrics_row(kept, task):
    reported = _accuracy(kept, task)
    assert sorted(reported) == [1, 2, 3, 4]
    got = {r: _measured(kept, task, r) for r in reported}
    assert {r: f"{a:.6f}" for r, a in got.items()} == reported
    w1, w2 = (torch.nn.utils.parameters_to_vector(mmfl.load_model(kept, task, round=r)
                                                  .parameters()) for r in (1, 2))
    assert not torch.equal(w1, w2)  # each round's own weights
    assert (kept / "models" / f"{task}.round2.safetensors").is_file()


def test_default_keeps_the_final_weights_and_the_checkpoint_only(tmp_path):
    run = tmp_path / "r"
    mmfl.run(_config(tmp_path, "checkpoint_every=2", rounds=3), run)
    assert sorted(p.name for p in (run / "models").iterdir()) == ["digits.safetensors",
                                                                  "wave.safetensors"]
    assert "logging" not in (run / "config.toml").read_text()  # config.toml unchanged
    with pytest.raises(ResultsError, match=r"the weights of digits after round 1 are not kept "
                       r"\(rounds kept: 3; keep more with \[logging\] keep_models\)"):
        mmfl.load_model(run, "digits", round=1)
    assert _measured(run, "wave", 3) == mmfl.read_results(run).summary["tasks"]["wave"]["accuracy"]


def test_the_checkpoint_round_loads_when_no_file_holds_it(tmp_path):
    """An interrupted run: the checkpoint (round 2) is the only copy of round 2's weights;
    its accuracy there equals metrics.csv's."""
    run = tmp_path / "r"

    with pytest.raises(KeyboardInterrupt):
        mmfl.run(_config(tmp_path, "checkpoint_every=2", "eval_every=1"), run, callbacks=[StopAfterRound3()])
    with pytest.raises(ResultsError, match="no such model file"):
        mmfl.load_model(run, "digits")  # no final weights: the run did not complete
    # load_model needs the final file for the model's metadata: take it from a completed twin
    twin = tmp_path / "twin"
    mmfl.run(_config(tmp_path, "logging.keep_models=2"), twin)
    (run / "models").mkdir()
    (run / "models" / "digits.safetensors").write_bytes(
        (twin / "models" / "digits.safetensors").read_bytes())
    assert f"{_measured(run, 'digits', 2):.6f}" == _accuracy(run, "digits")[2]
    with pytest.raises(ResultsError, match=r"rounds kept: 2, 4;"):
        mmfl.load_model(run, "digits", round=3)


def test_resume_keeps_the_files_consistent(tmp_path, kept):
    """Interrupted after round 3 (checkpoint of round 2), resumed with keep_models = 2: round
    3's file is gone (its round was redone under the new setting), rounds 1, 2 (before the
    checkpoint) and 4 are there, and every file holds the uninterrupted run's weights and metadata."""
    run = tmp_path / "r"

    with pytest.raises(KeyboardInterrupt):
        mmfl.run(_config(tmp_path, "logging.keep_models=1", "checkpoint_every=2"), run,
                 callbacks=[StopAfterRound3()])
    assert (run / "models" / "digits.round3.safetensors").is_file()
    mmfl.run(_config(tmp_path, "logging.keep_models=2", "checkpoint_every=2"), run, resume=True)
    names = sorted(p.name for p in (run / "models").glob("digits*"))
    assert names == ["digits.round1.safetensors", "digits.round2.safetensors",
                     "digits.round4.safetensors", "digits.safetensors"]
    for p in (run / "models").iterdir():  # (the header's key order varies between writes)
        assert _content(p) == _content(kept / "models" / p.name), p.name


def _content(path):
    """A model file's metadata and tensors (as lists), comparable with ==."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k).tolist() for k in f.keys()}
