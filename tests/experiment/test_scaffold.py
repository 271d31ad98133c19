"""SCAFFOLD in the runner: the control store, and full runs checked against a plain
re-implementation of the paper's algorithm (the equations: tests/core/test_scaffold_equations.py)."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from testkit import tiny_config_text
from torch.func import functional_call

import mmfl
from mmfl import registry
from mmfl.core.scaffold import control_update
from mmfl.engines.base import TrainOutput
from mmfl.engines.sequential import local_batches
from mmfl.engines.pair_store import ControlVariates
from mmfl.experiment import checkpoint, runner
from mmfl.experiment.config import config_from_dict
from mmfl.experiment.federation import build_federation
from mmfl.types import Population


def _raw(rounds=3, **clients):
    raw = tomllib.loads(tiny_config_text(rounds=rounds, sampler="scaffold"))
    raw["clients"].update(clients)
    return raw


def _cfg(rounds=3, engine="sequential", sampler_opts=None, top=None, **clients):
    raw = _raw(rounds, **clients)
    raw["engine"] = engine
    raw["sampler"].update(sampler_opts or {})
    raw.update(top or {})
    return config_from_dict(raw)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_control_store_keeps_the_server_control_the_weighted_mean(tmp_path, dtype):
    """c_s = sum_i d_{i,s} c_{i,s} after every update (the paper's c = mean_i c_i with d = 1/N)."""
    holds = np.array([[1, 1], [1, 0], [1, 1], [0, 1]], bool)
    pop = Population(holds * np.array([[3], [1], [2], [4]]), np.ones(4, np.int64), ("a", "b"))
    dims = [3, 2]
    cv = ControlVariates(holds, dims, dtype=dtype, path=tmp_path if dtype == "float16" else None)
    gen = torch.Generator().manual_seed(1)
    lr = np.array([0.1, 0.5])
    for clients, tasks in [([0, 2, 0, 3], [0, 0, 1, 1]), ([1, 2], [0, 1]), ([0, 1, 2], [0, 0, 0])]:
        clients, tasks = np.array(clients), np.array(tasks)
        corr = cv.corrections(clients, tasks)
        for s, r in corr.items():  # r = c_s - c_{i,s}
            want = cv.server[s][None, :] - cv.clients.get(s, clients[tasks == s]).numpy()
            np.testing.assert_array_equal(r.numpy(), want)
        updates = {s: torch.randn((int((tasks == s).sum()), dims[s]), generator=gen)
                   for s in np.unique(tasks).tolist()}
        out = TrainOutput(clients, tasks, updates, np.zeros(len(clients)),
                          np.full(len(clients), 3, np.int64))
        before = [cv.clients.get(s, clients[tasks == s]).numpy().astype(np.float64)
                  for s in range(2)]
        c_before = [cv.server[s].copy() for s in range(2)]
        cv.update(out, lr, pop.data_weight)
        for s in range(2):
            everyone = np.flatnonzero(holds[:, s])
            c_all = cv.clients.get(s, everyone).numpy().astype(np.float64)
            np.testing.assert_allclose(cv.server[s], pop.data_weight[everyone, s] @ c_all,
                                       rtol=0, atol=1e-5)
            if s in updates:  # option II for the active pairs
                mine = clients[tasks == s]
                expect, _ = control_update(before[s], c_before[s], updates[s].numpy(),
                                           np.full(len(mine), 3), lr[s])
                tol = 1e-2 * np.abs(expect).max() if dtype == "float16" else 1e-6
                np.testing.assert_allclose(cv.clients.get(s, mine).numpy(), expect,
                                           rtol=0, atol=tol)
    assert cv.nbytes == cv.clients.nbytes + 4 * sum(dims)
    state = cv.state_dict()
    other = ControlVariates(holds, dims, dtype=dtype)
    other.load_state_dict(state)
    for s in range(2):
        np.testing.assert_array_equal(other.server[s], cv.server[s])
        np.testing.assert_array_equal(other.clients.rows[s], cv.clients.rows[s])


# -- full runs against a plain re-implementation ----------------------------------------------

def _reference(cfg, rounds):
    """SCAFFOLD written out directly (full participation: every client holds one task and every
    processor is active, p = 1): corrected local SGD, option II, w -= sum_i d_i G_i,
    c += sum_i d_i Delta c_i. float64 controls, the runner's batches and initial models."""
    fed = build_federation(cfg)
    pop = fed.population
    eng = registry.get("engine", "sequential").obj(fed, seed=cfg.seed)
    w = [p.double() for p in eng.init_params()]
    c = [torch.zeros_like(p) for p in w]
    c_i = {}
    for t in range(rounds):
        new_w = [p.clone() for p in w]
        for s, td in enumerate(fed.tasks):
            model, lr = eng.models[s], td.spec.lr
            names = [n for n, _ in model.named_parameters()]
            shapes = [p.shape for _, p in model.named_parameters()]
            delta_c = torch.zeros_like(c[s])
            for i in np.flatnonzero(pop.holds[:, s]).tolist():
                ci = c_i.get((i, s), torch.zeros_like(c[s]))
                y = w[s].clone()
                k = 0
                for batch in local_batches(td.client_indices[i], td.spec.local_epochs,
                                           td.spec.batch_size, cfg.seed, t, i, s):
                    y32 = y.float().requires_grad_(True)
                    parts = torch.split(y32, [int(np.prod(sh)) for sh in shapes])
                    p = {n: v.view(sh) for n, v, sh in zip(names, parts, shapes)}
                    b = torch.from_numpy(batch)
                    loss = F.nll_loss(functional_call(model, p, (eng.train_x[s][b],)),
                                      eng.train_y[s][b])
                    (g,) = torch.autograd.grad(loss, y32)
                    y = y - lr * (g.double() + c[s] - ci)
                    k += 1
                G = w[s] - y
                ci_new = ci - c[s] + G / (k * lr)
                delta_c += pop.data_weight[i, s] * (ci_new - ci)
                c_i[(i, s)] = ci_new
                new_w[s] -= cfg.server_lr * pop.data_weight[i, s] * G
            c[s] = c[s] + delta_c
        w = new_w
    return w, c, c_i, pop


@pytest.mark.parametrize("engine", ["sequential", "vectorized"])
def test_run_matches_plain_scaffold(tmp_path, engine):
    rounds = 3
    cfg = _cfg(rounds, engine, top={"server": {"lr": 0.8}}, active_rate=1.0, processors=1,
               tasks_per_client=1)
    mmfl.run(cfg, tmp_path / "r")
    arrays, _ = checkpoint.load_with_rows(tmp_path / "r" / runner.CHECKPOINT)
    w, c, c_i, pop = _reference(cfg, rounds)
    for s in range(2):
        np.testing.assert_allclose(arrays[f"param.{s}"], w[s].numpy(), rtol=0, atol=2e-5)
        np.testing.assert_allclose(arrays[f"controls.c.{s}"], c[s].numpy(), rtol=0, atol=2e-4)
        assert float(np.abs(arrays[f"controls.c.{s}"]).max()) > 1e-2
        holders = np.flatnonzero(pop.holds[:, s])
        ref = np.stack([c_i[(i, s)].numpy() for i in holders])
        np.testing.assert_allclose(arrays[f"controls.h.{s}"], ref, rtol=0, atol=2e-4)
    # without the corrections (plain random sampling) the models differ
    mmfl.run(cfg.replace(**{"sampler.name": "random"}), tmp_path / "plain")
    plain, _ = checkpoint.load(tmp_path / "plain" / runner.CHECKPOINT)
    assert max(float(np.abs(plain[f"param.{s}"] - arrays[f"param.{s}"]).max())
               for s in range(2)) > 1e-3


def test_costs_memory_and_invariant_in_a_sampled_run(tmp_path):
    cfg = _cfg(4)
    summary = mmfl.run(cfg, tmp_path / "r")
    res = mmfl.read_results(tmp_path / "r")
    pop = build_federation(cfg).population
    arrays, _ = checkpoint.load_with_rows(tmp_path / "r" / runner.CHECKPOINT)
    dims = [arrays[f"param.{s}"].size for s in range(2)]
    want_bytes = 4 * sum(int(pop.holds[:, s].sum()) * d + d for s, d in enumerate(dims))
    for row in res.rounds:
        assert int(row["model_uploads"]) == 2 * int(row["local_trainings"]) > 0
        assert int(row["scalar_uploads"]) == int(row["forward_passes"]) == 0
        assert int(row["stale_bytes"]) == want_bytes
    assert summary["cost"]["stale_memory_bytes"] == want_bytes
    assert summary["cost"]["model_uploads"] == 2 * summary["cost"]["local_trainings"]
    for s in range(2):  # c_s = sum_i d_{i,s} c_{i,s}
        holders = np.flatnonzero(pop.holds[:, s])
        np.testing.assert_allclose(arrays[f"controls.c.{s}"],
                                   pop.data_weight[holders, s] @ arrays[f"controls.h.{s}"],
                                   rtol=0, atol=1e-5)
        assert arrays["controls.stored"][:, s].any()


@pytest.mark.parametrize("variant", [
    {"engine": "vectorized", "top": {"stale_dtype": "float16", "stale_on_disk": True}},
    {"engine": "sequential", "sampler_opts": {"aggregator": "average"}},
])
def test_resume_is_byte_identical(tmp_path, variant):
    full = _cfg(5, variant["engine"], variant.get("sampler_opts"), variant.get("top"))
    mmfl.run(full, tmp_path / "full")
    mmfl.run(full.replace(rounds=2), tmp_path / "part")
    mmfl.run(full, tmp_path / "part", resume=True)
    for f in ("metrics.csv", "rounds.csv"):
        assert (tmp_path / "part" / f).read_bytes() == (tmp_path / "full" / f).read_bytes(), f
    a, _ = checkpoint.load_with_rows(tmp_path / "full" / runner.CHECKPOINT)
    b, _ = checkpoint.load_with_rows(tmp_path / "part" / runner.CHECKPOINT)
    assert sorted(a) == sorted(b) and any(k.startswith("controls.c.") for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
