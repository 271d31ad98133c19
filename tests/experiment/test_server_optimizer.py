"""Server optimizers (FedAvgM, FedAdam, FedYogi) on the aggregated update: hand-worked steps,
composition with the run loop, checkpoint and resume."""

from __future__ import annotations

from types import MappingProxyType

import numpy as np
import pytest
import torch
from testkit import tiny_config_text

import mmfl
from mmfl.experiment.config import ServerOptimizerConfig, load_config
from mmfl.experiment.server_optimizer import ServerOptimizer, build_server_optimizer


def _opt(name, **options):
    return ServerOptimizer(ServerOptimizerConfig(name, MappingProxyType(options)), [2])


def test_fedavgm_by_hand():
    opt = _opt("fedavgm", momentum=0.5)
    w = [torch.tensor([1.0, 2.0])]
    w = opt.step(w, [torch.tensor([1.0, -1.0])], lr=0.1)      # m = A = (1, -1)
    assert torch.allclose(w[0], torch.tensor([0.9, 2.1]))
    w = opt.step(w, [torch.tensor([2.0, 0.0])], lr=0.1)       # m = (0.5 + 2, -0.5)
    assert torch.allclose(w[0], torch.tensor([0.9 - 0.25, 2.1 + 0.05]))
    w = opt.step(w, [None], lr=0.1)                           # no update: nothing moves
    assert torch.allclose(w[0], torch.tensor([0.65, 2.15]))
    assert torch.allclose(opt.m[0], torch.tensor([2.5, -0.5]))


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_adaptive_steps_by_hand(name):
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 0.01
    opt = _opt(name, beta1=b1, beta2=b2, tau=tau)
    w = np.array([0.5, -0.5])
    m, v = np.zeros(2), np.full(2, tau**2)
    params = [torch.tensor(w, dtype=torch.float32)]
    for a in ([1.0, -2.0], [0.5, 0.25], [-3.0, 1.0]):
        a = np.array(a)
        m = b1 * m + (1 - b1) * a
        v = (b2 * v + (1 - b2) * a**2 if name == "fedadam"
             else v - (1 - b2) * a**2 * np.sign(v - a**2))
        w = w - lr * m / (np.sqrt(v) + tau)
        params = opt.step(params, [torch.tensor(a, dtype=torch.float32)], lr)
        assert np.allclose(params[0].numpy(), w, rtol=1e-5, atol=1e-7)


def test_sgd_needs_no_optimizer_and_takes_no_options(tmp_path):
    assert build_server_optimizer(ServerOptimizerConfig("sgd", MappingProxyType({})), [3]) is None
    with pytest.raises(mmfl.ConfigError, match=r"server\.optimizer_options\.momentum: unknown "
                                               "option; valid options: none"):
        _cfg(tmp_path, overrides=["server.optimizer_options.momentum=0.5"])


def _cfg(tmp_path, rounds=4, overrides=()):
    p = tmp_path / f"cfg-{rounds}.toml"
    p.write_text(tiny_config_text(rounds=rounds), encoding="utf-8")
    return load_config(p, list(overrides))


def test_fedavgm_without_momentum_is_exactly_sgd(tmp_path):
    mmfl.run(_cfg(tmp_path), tmp_path / "sgd")
    mmfl.run(_cfg(tmp_path, overrides=["server.optimizer=fedavgm",
                                       "server.optimizer_options.momentum=0"]), tmp_path / "m0")
    assert ((tmp_path / "sgd" / "metrics.csv").read_bytes()
            == (tmp_path / "m0" / "metrics.csv").read_bytes())


@pytest.mark.parametrize("sampler", ["random", "fedvarp"])
def test_fedadam_composes_with_samplers_and_resumes_bit_exactly(tmp_path, sampler):
    over = ["server.optimizer=fedadam", "server.lr=0.01", f"sampler.name={sampler}"]
    whole = mmfl.run(_cfg(tmp_path, rounds=6, overrides=over), tmp_path / "whole")
    assert whole["status"] == "completed"
    assert all(np.isfinite(t["accuracy"]) for t in whole["tasks"].values())
    mmfl.run(_cfg(tmp_path, rounds=3, overrides=over), tmp_path / "r")
    mmfl.run(_cfg(tmp_path, rounds=6, overrides=over), tmp_path / "r", resume=True)
    assert ((tmp_path / "whole" / "metrics.csv").read_bytes()
            == (tmp_path / "r" / "metrics.csv").read_bytes())


def test_options_are_validated_and_written_only_when_used(tmp_path):
    cfg = _cfg(tmp_path)
    assert cfg.to_dict()["server"] == {"lr": 1.0}
    adam = cfg.replace(**{"server.optimizer": "fedadam"})
    assert adam.to_dict()["server"]["optimizer_options"] == {"beta1": 0.9, "beta2": 0.99,
                                                              "tau": 0.001}
    with pytest.raises(mmfl.ConfigError, match=r"server\.optimizer_options\.momentum: unknown"):
        cfg.replace(**{"server.optimizer": "fedadam", "server.optimizer_options.momentum": 0.5})
    with pytest.raises(mmfl.ConfigError, match=r"server\.optimizer: must be one of"):
        cfg.replace(**{"server.optimizer": "adagrad"})
