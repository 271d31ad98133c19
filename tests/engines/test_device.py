"""The top-level ``device`` setting (mmfl.engines.device), exercised on the CPU: the config's
rules, "auto" without a GPU, "cuda" without one (a one-line error naming ``device``), the GPU
determinism switches (with torch.cuda mocked) and identical results for "cpu" and "auto"."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import mmfl
from mmfl.engines import device as device_mod
from mmfl.engines.device import resolve_device
from mmfl.engines.sequential import SequentialEngine
from mmfl.engines.vectorized import VectorizedEngine
from mmfl.experiment.config import config_from_dict
from mmfl.experiment.federation import build_federation

RAW = {"name": "dev", "seed": 1, "rounds": 2, "clients": {"count": 8, "active_rate": 0.5},
       "tasks": [{"name": "a", "dataset": "digits", "model": "mlp", "lr": 0.1},
                 {"name": "b", "dataset": "digits", "model": "cnn", "lr": 0.05,
                  "model_options": {"hidden": 16}, "batch_size": 16}]}


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _cfg(**top):
    return config_from_dict({**RAW, **top})


def test_resolve_device_without_a_gpu(no_gpu):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(mmfl.ConfigError, match=r"^device: needs a CUDA GPU, but torch .* "
                                                   r"sees none; use \"cpu\"") as e:
            resolve_device(name)
        assert "\n" not in str(e.value)
    with pytest.raises(mmfl.ConfigError, match=r'^device: must be "cpu", "cuda", "cuda:N"'):
        resolve_device("gpu")


def test_a_gpu_switches_on_the_deterministic_settings(monkeypatch):
    """torch.cuda mocked to one GPU: "cuda" and "auto" give cuda:0 and set cuDNN's and
    torch's deterministic switches and CUBLAS_WORKSPACE_CONFIG; cuda:1 does not exist."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    calls = []
    monkeypatch.setattr(device_mod.torch, "use_deterministic_algorithms",
                        lambda mode, warn_only=False: calls.append((mode, warn_only)))
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert calls == [(True, True)] * 3
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    with pytest.raises(mmfl.ConfigError, match=r"^device: there are 1 CUDA devices"):
        resolve_device("cuda:1")


def test_config_rules():
    assert _cfg().device == "cpu"
    assert "device" not in _cfg().to_dict()          # the default stays out of config.toml
    assert _cfg(device="auto").to_dict()["device"] == "auto"
    assert _cfg(device="cuda:3").device == "cuda:3"  # whether it exists: when the engine starts
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", "cuda:12345"):
        with pytest.raises(mmfl.ConfigError, match=r'^device: must be "cpu", "cuda"'):
            _cfg(device=bad)
    with pytest.raises(mmfl.ConfigError, match=r"^device: engine flower trains on the CPU only"):
        _cfg(device="cuda", engine="flower")
    assert _cfg(device="cpu", engine="flower").device == "cpu"


@pytest.mark.parametrize("cls", [SequentialEngine, VectorizedEngine])
def test_engines_keep_their_data_and_models_on_the_device(cls, no_gpu):
    fed = build_federation(_cfg())
    eng = cls(fed, seed=1, device="auto")
    assert eng.device == torch.device("cpu")
    assert all(t.device == eng.device for t in (*eng.train_x, *eng.train_y, *eng.test_y))
    assert all(p.device == eng.device for m in eng.models for p in m.parameters())
    w = eng.init_params()
    out = eng.train(w, np.array([0, 1]), np.array([0, 1]), 0)
    assert all(g.device.type == "cpu" for g in out.updates.values())  # uploads: CPU tensors


def test_cuda_without_a_gpu_stops_the_run_before_it_writes(tmp_path, no_gpu):
    with pytest.raises(mmfl.ConfigError, match=r"^device: needs a CUDA GPU"):
        mmfl.run(_cfg(device="cuda"), tmp_path / "r")
    assert not (tmp_path / "r" / "metrics.csv").exists()


@pytest.mark.parametrize("engine", ["vectorized", "sequential"])
def test_cpu_and_auto_give_identical_metrics(tmp_path, engine, no_gpu):
    """The device code path (engines built with device=...) on the CPU: byte-identical
    metrics.csv to the default."""
    mmfl.run(_cfg(engine=engine), tmp_path / "cpu")
    mmfl.run(_cfg(engine=engine, device="auto"), tmp_path / "auto")
    a = (tmp_path / "cpu" / "metrics.csv").read_bytes()
    assert a == (tmp_path / "auto" / "metrics.csv").read_bytes() and a.count(b"\n") == 5


def test_bench_device_without_a_gpu_times_the_cpu_side(capsys, no_gpu):
    """benchmarks/bench_device.py on a machine without a GPU: says so, and runs the CPU side of
    a case for both engines."""
    import runpy

    from testkit import ROOT

    bench = runpy.run_path(str(ROOT / "benchmarks" / "bench_device.py"))
    assert bench["main"](["--rounds", "2", "--clients", "6", "--cases", "0"]) == 0
    out = capsys.readouterr().out
    assert "no GPU is available (torch.cuda.is_available() is False): CPU side only" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("mlp digits")]
    assert [r[4] for r in rows] == ["vectorized", "sequential"]
    assert all(float(r[5]) > 0 and r[6:] == ["-"] * 5 for r in rows)


def test_a_non_cpu_device_receives_the_data_and_models_at_start(monkeypatch):
    """The move itself, with PyTorch's "meta" device standing in for a GPU: every dataset tensor
    and model parameter is there after the constructor; the server's buffer vectors stay on the
    CPU (they travel with the checkpoints)."""
    import mmfl.engines.base as base

    monkeypatch.setattr(base, "resolve_device", lambda name: torch.device("meta"))
    eng = SequentialEngine(build_federation(_cfg()), seed=1, device="cuda")
    meta = torch.device("meta")
    assert all(t.device == meta for t in (*eng.train_x, *eng.train_y, *eng.test_x, *eng.test_y))
    assert all(p.device == meta for m in eng.models for p in m.parameters())
    assert all(b.device.type == "cpu" for b in eng.buffers)


def test_the_index_batches_of_a_pair_cross_in_one_transfer():
    from mmfl.engines.sequential import _on_device

    batches = [np.array([3, 1, 2]), np.array([0]), np.array([5, 4])]
    cpu = _on_device(batches, torch.device("cpu"))
    assert [b.tolist() for b in cpu] == [[3, 1, 2], [0], [5, 4]]
    moved = _on_device(batches, torch.device("meta"))  # one concatenated copy, split there
    assert [tuple(b.shape) for b in moved] == [(3,), (1,), (2,)]
    assert all(b.device.type == "meta" for b in moved)
    assert _on_device([], torch.device("meta")) == []
