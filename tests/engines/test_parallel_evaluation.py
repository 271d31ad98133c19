"""``threads``: the tasks are evaluated by several worker threads, every kernel on one thread,
so the numbers do not depend on the thread count."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from testkit import tiny_config_text

import mmfl
from mmfl import registry
from mmfl.experiment.config import load_config
from mmfl.experiment.federation import build_federation


@pytest.mark.parametrize("engine", ["sequential", "vectorized"])
def test_evaluation_is_identical_for_any_thread_count(tmp_path, engine):
    p = tmp_path / "c.toml"
    p.write_text(tiny_config_text(), encoding="utf-8")
    fed = build_federation(load_config(p))
    cls = registry.get("engine", engine).obj
    one = cls(fed, seed=0, threads=1)
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(x.numel(), generator=gen) * 0.1 for x in one.init_params()]
    acc1, loss1 = one.evaluate(params)
    many = cls(fed, seed=0, threads=3)
    assert many.workers == 3 and torch.get_num_threads() == 1
    acc3, loss3 = many.evaluate(params)
    np.testing.assert_array_equal(acc1, acc3)
    np.testing.assert_array_equal(loss1, loss3)
    assert acc1.shape == (fed.population.num_tasks,) and np.isfinite(loss1).all()


def test_probe_losses_are_identical_for_any_thread_count(tmp_path):
    """The LVR probe runs the tasks on the worker threads too: the same numbers as one thread,
    and as the sequential reference engine (up to float rounding of the summation order)."""
    p = tmp_path / "c.toml"
    p.write_text(tiny_config_text(), encoding="utf-8")
    fed = build_federation(load_config(p))
    cls = registry.get("engine", "vectorized").obj
    one, many = cls(fed, seed=0, threads=1), cls(fed, seed=0, threads=3)
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(x.numel(), generator=gen) * 0.1 for x in one.init_params()]
    n, s = fed.population.num_clients, fed.population.num_tasks
    clients = np.repeat(np.arange(n), s)
    tasks = np.tile(np.arange(s), n)
    l1, l3 = one.probe_losses(params, clients, tasks), many.probe_losses(params, clients, tasks)
    many.close()
    np.testing.assert_array_equal(l1, l3)
    has_data = np.array([len(fed.tasks[t].client_indices[i]) > 0 for i, t in zip(clients, tasks)])
    assert l1.shape == (n * s,) and has_data.sum() > n
    assert (l1[has_data] > 0).all() and (l1[~has_data] == 0).all()
    ref = registry.get("engine", "sequential").obj(fed, seed=0).probe_losses(params, clients,
                                                                              tasks)
    np.testing.assert_allclose(l1, ref, rtol=1e-5)


def test_a_run_stops_its_evaluation_threads(tmp_path):
    """The evaluation pool lives as long as the run: no threads are left behind."""
    p = tmp_path / "cfg.toml"
    p.write_text(tiny_config_text(rounds=2), encoding="utf-8")
    mmfl.run(load_config(p, ["threads=2"]), tmp_path / "r")
    assert not [t for t in threading.enumerate() if t.name.startswith("mmfl-eval")]
