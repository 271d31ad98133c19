"""Models with buffers (batch norm): tasks[i].buffers = "aggregate" | "local" in every local
engine, evaluation in eval mode with the server's buffers, checkpoints and load_model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import mmfl
from mmfl.engines.sequential import SequentialEngine
from mmfl.engines.vectorized import VectorizedEngine
from mmfl.experiment.config import config_from_dict
from mmfl.experiment.federation import build_federation
from mmfl.tasks.buffers import buffers_to_vector


class BNNet(nn.Module):
    """Linear - BatchNorm1d - ReLU - Linear: returns logits (a torchvision-style block)."""

    def __init__(self, d, k):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(d, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                  nn.Linear(16, k))

    def forward(self, x):
        return self.body(x)


@pytest.fixture(scope="module", autouse=True)
def registered():
    mmfl.register("model", "bn_test")(
        lambda options, input_shape, num_classes: BNNet(int(np.prod(input_shape)), num_classes))


def _raw(buffers="aggregate", rounds=3, engine="vectorized", optimizer="adam"):
    return {"name": "bn", "seed": 0, "rounds": rounds, "engine": engine,
            "clients": {"count": 6, "active_rate": 0.5},
            "tasks": [{"name": "d", "dataset": "digits", "model": "bn_test", "lr": 0.01,
                       "batch_size": 16, "buffers": buffers, "optimizer": optimizer,
                       "partition": {"kind": "dirichlet", "alpha": 0.5}},
                      {"name": "m", "dataset": "digits", "model": "mlp", "lr": 0.1}]}


def test_batch_norm_trains_the_same_in_both_engines():
    fed = build_federation(config_from_dict(_raw()))
    outs = []
    for cls in (SequentialEngine, VectorizedEngine):
        eng = cls(fed, seed=0)
        outs.append(eng.train(eng.init_params(), np.arange(6), np.zeros(6, np.int64), 0))
    assert torch.equal(outs[0].updates[0], outs[1].updates[0])
    assert torch.equal(outs[0].buffers[0], outs[1].buffers[0])
    assert outs[0].buffers[0].shape == (6, 32)  # running mean and variance of 16 features


@pytest.mark.parametrize("mode", ["aggregate", "local"])
def test_server_buffers_follow_the_rule(mode):
    fed = build_federation(config_from_dict(_raw(buffers=mode)))
    eng = SequentialEngine(fed, seed=0)
    b0 = eng.buffers[0].clone()
    n = fed.population.n_samples[:, 0].astype(np.float64)
    out = eng.train(eng.init_params(), np.array([0, 2]), np.zeros(2, np.int64), 0)
    eng.absorb_buffers(out)
    w = n[[0, 2]] / n[[0, 2]].sum()
    want = (torch.from_numpy(w) @ out.buffers[0].double()).float()
    assert torch.allclose(eng.buffers[0], want) and not torch.equal(eng.buffers[0], b0)
    if mode == "local":  # clients keep theirs and start from them; the others from b_0
        assert torch.equal(eng.start_buffers(0, 2), out.buffers[0][1])
        assert torch.equal(eng.start_buffers(0, 1), eng.buffers[0])
    else:
        assert torch.equal(eng.start_buffers(0, 2), eng.buffers[0])


@pytest.mark.parametrize("mode", ["aggregate", "local"])
def test_buffered_runs_resume_bit_exactly_and_load_back(tmp_path, mode):
    whole = mmfl.run(config_from_dict(_raw(mode, rounds=4)), tmp_path / "whole")
    mmfl.run(config_from_dict(_raw(mode, rounds=2)), tmp_path / "r")
    mmfl.run(config_from_dict(_raw(mode, rounds=4)), tmp_path / "r", resume=True)
    assert ((tmp_path / "whole" / "metrics.csv").read_bytes()
            == (tmp_path / "r" / "metrics.csv").read_bytes())
    model = mmfl.load_model(tmp_path / "whole", "d")
    assert isinstance(model, BNNet) and not model.training
    x, y = mmfl.load_data(tmp_path / "whole", "d")
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).double().mean())
    assert acc == whole["tasks"]["d"]["accuracy"]
    assert float(model.body[2].running_var.mean()) != 1.0  # trained statistics, not the init


def test_evaluation_uses_eval_mode_and_the_server_buffers():
    fed = build_federation(config_from_dict(_raw()))
    eng = VectorizedEngine(fed, seed=0)
    w = eng.init_params()
    eng.buffers[0] = eng.buffers[0] + 0.5  # moves the running mean: eval output changes
    acc1, loss1 = eng.evaluate(w)
    eng.buffers[0] = eng.buffers[0] - 0.5
    acc2, loss2 = eng.evaluate(w)
    assert loss1[0] != loss2[0] and loss1[1] == loss2[1]
    assert eng.models[0].training  # back in train mode
    before = buffers_to_vector(eng.models[0])
    eng.probe_losses(w, np.arange(3), np.zeros(3, np.int64))
    assert torch.equal(before, buffers_to_vector(eng.models[0]))  # probes update no statistics
