"""The trained models back: models/<task>.safetensors, mmfl.load_model and mmfl.load_data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from testkit import tiny_config_text

import mmfl
from mmfl.errors import ResultsError
from mmfl.experiment.config import load_config
from mmfl.tasks.models import build_model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    p = tmp / "cfg.toml"
    p.write_text(tiny_config_text(rounds=3), encoding="utf-8")
    summary = mmfl.run(load_config(p, ["checkpoint_every=2"]), tmp / "r")
    return tmp / "r", summary


@pytest.mark.parametrize("task", ["digits", "wave"])
def test_load_model_reproduces_the_reported_accuracy_exactly(run, task):
    out, summary = run
    model = mmfl.load_model(out, task)
    x, y = mmfl.load_data(out, task)
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).double().mean())
    assert acc == summary["tasks"][task]["accuracy"]
    assert not model.training


def test_the_state_dict_file_loads_with_torch_and_safetensors_alone(run):
    out, _ = run
    state = load_file(str(out / "models" / "digits.safetensors"))
    cfg = mmfl.read_results(out).config["tasks"][0]
    x, _ = mmfl.load_data(out, "digits")
    plain = build_model(cfg["model"], cfg.get("model_options", {}), tuple(x.shape[1:]), 10, 123)
    plain.load_state_dict(state)  # standard names, strict
    assert set(state) == {k for k, _ in plain.named_parameters()}
    assert torch.equal(plain(x[:5]), mmfl.load_model(out, "digits")(x[:5]))


def test_load_data_returns_what_the_engine_evaluated(run):
    out, _ = run
    from mmfl.experiment.config import config_from_dict
    from mmfl.experiment.federation import build_federation
    from mmfl.experiment import tomlio

    fed = build_federation(config_from_dict(tomlio.load(out / "config.toml")))
    x, y = mmfl.load_data(out, "wave")
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert np.array_equal(x.numpy(), np.asarray(fed.tasks[1].dataset.x_test, np.float32))
    assert np.array_equal(y.numpy(), fed.tasks[1].dataset.y_test)
    xt, _ = mmfl.load_data(out, "wave", split="train")
    assert len(xt) == len(fed.tasks[1].dataset.y_train)


def test_a_kept_checkpoint_round_and_errors(run):
    out, _ = run
    with pytest.raises(ResultsError, match="digits after round 1 are not kept"):
        mmfl.load_model(out, "digits", round=1)
    assert isinstance(mmfl.load_model(out, "digits", round=3), torch.nn.Module)
    with pytest.raises(ResultsError, match="no such model file .*tasks with one: digits, wave"):
        mmfl.load_model(out, "nope")
    with pytest.raises(ResultsError, match="no task 'nope'"):
        mmfl.load_data(out, "nope")
