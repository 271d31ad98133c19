"""Engine conformance: every engine reproduces the ``sequential`` oracle.

The same local-training problems (unequal client sizes, batch sizes that do not divide them,
two local epochs) are solved by each engine in :data:`ENGINES`; updates and parameters must agree
within 1e-5 and the run metrics within 1e-4. To add an engine append its registry name to
:data:`ENGINES` (and, if it needs options, an entry to :data:`MAKERS`). Engine ``flower`` is
checked on whole runs against ``vectorized`` (:func:`test_flower_run_matches_vectorized`,
marker ``flower``).
"""

from __future__ import annotations

import copy
import csv
import dataclasses

import numpy as np
import pytest
import torch

from testkit import assert_metrics_match

import mmfl
from mmfl import registry
from mmfl.engines.base import Engine
from mmfl.engines.vectorized import VectorizedEngine
from mmfl.experiment import checkpoint, runner
from mmfl.experiment.config import config_from_dict
from mmfl.experiment.federation import build_federation

#: Engines checked against the sequential oracle.
ENGINES = ["vectorized"]
#: Optional engine factories (name -> callable(federation, seed)); default: the registry entry.
MAKERS = {
    "vectorized-generic": lambda fed, seed: VectorizedEngine(fed, seed=seed, fast_path=False),
}

PARAM_TOL = 1e-5
METRIC_TOL = 1e-4


def _task(name, dataset, model, *, lr, batch, partition, dataset_options=None,
          model_options=None, train_samples=0, test_samples=0):
    t = {"name": name, "dataset": dataset, "model": model, "lr": lr, "local_epochs": 2,
         "batch_size": batch, "partition": partition, "train_samples": train_samples,
         "test_samples": test_samples}
    if dataset_options:
        t["dataset_options"] = dataset_options
    if model_options:
        t["model_options"] = model_options
    return t


BASE = {
    "name": "conformance",
    "seed": 11,
    "rounds": 3,
    "engine": "sequential",
    "clients": {"count": 12, "active_rate": 0.5, "processors": {1: 0.5, 2: 0.5},
                "tasks_per_client": {2: 0.5, 3: 0.5}},
    "sampler": {"name": "random"},
    "tasks": [
        # dirichlet label skew: very unequal client sizes
        _task("digits_mlp", "digits", "mlp", lr=0.1, batch=7,
              partition={"kind": "dirichlet", "alpha": 0.3}, model_options={"hidden": 24,
                                                                            "layers": 2}),
        # quantity skew: 90% of the clients share 20% of the data
        _task("wave_logreg", "mnist1d", "logreg", lr=0.2, batch=10,
              partition={"kind": "iid", "quantity_skew": {"clients": 0.7, "data": 0.2}},
              dataset_options={"num_samples": 900}),
        _task("synth_mlp", "synthetic", "mlp", lr=0.05, batch=9,
              partition={"kind": "dirichlet", "alpha": 0.2},
              dataset_options={"num_groups": 8, "mean_samples": 60}, model_options={"hidden": 16}),
        _task("digits_cnn", "digits", "cnn", lr=0.05, batch=6,
              partition={"kind": "dirichlet", "alpha": 0.5}, model_options={"hidden": 32},
              train_samples=240, test_samples=120),
    ],
}


def _config(**changes):
    raw = copy.deepcopy(BASE)
    raw.update(changes)
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def federation():
    return build_federation(_config())


def _make(name, fed, seed):
    if name in MAKERS:
        return MAKERS[name](fed, seed)
    return registry.get("engine", name).obj(fed, seed=seed, threads=1)


def _all_pairs(fed):
    """Every (client, task) pair with data, sorted by (task, client)."""
    n = fed.population.n_samples
    tasks, clients = np.nonzero(n.T > 0)
    return clients.astype(np.int64), tasks.astype(np.int64)


def test_federation_is_a_hard_case(federation):
    n = federation.population.n_samples
    for s, td in enumerate(federation.tasks):
        sizes = n[:, s][n[:, s] > 0]
        assert sizes.max() >= 2 * sizes.min(), "client sizes should be unequal"
        assert np.any(sizes % td.spec.batch_size != 0), "some last batches should be partial"
        assert np.any(sizes > td.spec.batch_size), "some clients should take several steps"


@pytest.mark.parametrize("engine", ENGINES + list(MAKERS))
@pytest.mark.parametrize("round", [0, 5])
def test_train_matches_sequential(federation, engine, round):
    fed = federation
    seq = _make("sequential", fed, 11)
    other = _make(engine, fed, 11)
    params = seq.init_params()
    # move away from the initial point so that every model is in a generic state
    params = [p + 0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(s))
              for s, p in enumerate(params)]
    clients, tasks = _all_pairs(fed)
    a = seq.train(params, clients, tasks, round)
    b = other.train(params, clients, tasks, round)
    np.testing.assert_array_equal(a.clients, b.clients)
    np.testing.assert_array_equal(a.tasks, b.tasks)
    np.testing.assert_array_equal(a.steps, b.steps)
    assert (a.steps > 0).all()
    np.testing.assert_allclose(b.train_loss, a.train_loss, rtol=0, atol=PARAM_TOL)
    assert sorted(a.updates) == sorted(b.updates)
    for s in a.updates:
        assert a.updates[s].shape == b.updates[s].shape
        assert a.updates[s].dtype == b.updates[s].dtype == torch.float32
        err = float((a.updates[s] - b.updates[s]).abs().max())
        assert err <= PARAM_TOL, f"task {s}: max |dG| = {err}"
        assert float(a.updates[s].abs().max()) > 1e-3  # the updates are not trivially zero


@pytest.mark.parametrize("engine", ENGINES + list(MAKERS))
def test_train_subset_unsorted_and_empty(federation, engine):
    """A subset of pairs in arbitrary order, a client without data, a single pair."""
    fed = federation
    seq, other = _make("sequential", fed, 5), _make(engine, fed, 5)
    params = seq.init_params()
    n = fed.population.n_samples
    empty = np.flatnonzero(n[:, 1] == 0)
    holders = np.flatnonzero(n[:, 1] > 0)
    clients = np.array([holders[2], holders[0], *empty[:1], holders[1]], dtype=np.int64)
    tasks = np.array([1, 1, *([1] * len(empty[:1])), 1], dtype=np.int64)
    assert len(empty)
    for c, t in ((clients, tasks), (clients[:1], tasks[:1])):
        a = seq.train(params, c, t, 2)
        b = other.train(params, c, t, 2)
        np.testing.assert_array_equal(b.clients, c)
        np.testing.assert_array_equal(a.steps, b.steps)
        np.testing.assert_allclose(b.train_loss, a.train_loss, rtol=0, atol=PARAM_TOL)
        assert float((a.updates[1] - b.updates[1]).abs().max()) <= PARAM_TOL
        if len(c) > 2:  # the client without data: no step, zero update
            assert b.steps[2] == 0 and b.train_loss[2] == 0
            assert float(b.updates[1][2].abs().max()) == 0.0


@pytest.mark.parametrize("fast_path", [True, False])
def test_client_chunks_do_not_change_results(federation, monkeypatch, fast_path):
    """Stacked parameters are processed in client chunks when they would exceed the budget."""
    import mmfl.engines.vectorized as vec

    fed = federation
    eng = VectorizedEngine(fed, seed=2, fast_path=fast_path)
    params = eng.init_params()
    clients, tasks = _all_pairs(fed)
    whole = eng.train(params, clients, tasks, 1)
    # chunks of 3 clients for the smallest model, of 1 or a few for the others
    monkeypatch.setattr(vec, "STACK_BUDGET", 2 * min(p.numel() for p in params) * 3)
    chunked = eng.train(params, clients, tasks, 1)
    np.testing.assert_array_equal(whole.steps, chunked.steps)
    np.testing.assert_allclose(whole.train_loss, chunked.train_loss, rtol=0, atol=1e-6)
    for s in whole.updates:
        assert float((whole.updates[s] - chunked.updates[s]).abs().max()) <= 1e-6


@pytest.mark.parametrize("engine", ["sequential", *ENGINES])
def test_non_finite_updates_are_returned_for_the_servers_check(federation, engine):
    """Engines produce updates; judging them is the server's update check's job
    (mmfl.experiment.update_check), the same for every engine."""
    fed = federation
    eng = _make(engine, fed, 1)
    params = eng.init_params()
    params[2] = params[2].clone()
    params[2][0] = float("nan")
    clients, tasks = _all_pairs(fed)
    out = eng.train(params, clients, tasks, 0)
    assert out.rejected is None
    assert not bool(torch.isfinite(out.updates[2]).all())
    assert all(bool(torch.isfinite(g).all()) for s, g in out.updates.items() if s != 2)


def test_fast_path_is_used_for_linear_models(federation):
    eng = VectorizedEngine(federation, seed=0)
    kinds = [td.spec.model for td in federation.tasks]
    assert [layers is not None for layers in eng._layers] == [k in ("mlp", "logreg")
                                                              for k in kinds]


def _metrics(path):
    with open(path / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("engine", ENGINES)
def test_runs_match_sequential(tmp_path, engine):
    cfg_seq = _config(engine="sequential")
    cfg_other = _config(engine=engine)
    mmfl.run(cfg_seq, tmp_path / "seq")
    mmfl.run(cfg_other, tmp_path / engine)
    rs, ro = _metrics(tmp_path / "seq"), _metrics(tmp_path / engine)
    assert len(rs) == len(ro) == BASE["rounds"] * len(BASE["tasks"])
    assert_metrics_match(rs, ro, METRIC_TOL)
    # the final global parameters (from the runs' checkpoints)
    ps, _ = checkpoint.load(tmp_path / "seq" / runner.CHECKPOINT)
    po, _ = checkpoint.load(tmp_path / engine / runner.CHECKPOINT)
    for s in range(len(BASE["tasks"])):
        np.testing.assert_allclose(po[f"param.{s}"], ps[f"param.{s}"], rtol=0, atol=PARAM_TOL)


def test_probe_losses_match_per_client_loop(federation):
    fed = federation
    eng = VectorizedEngine(fed, seed=3)
    params = eng.init_params()
    clients, tasks = _all_pairs(fed)
    n = fed.population.n_samples
    # add a pair without data and a repeated pair
    empty = np.flatnonzero(n[:, 0] == 0)
    clients = np.concatenate([clients, empty[:1], clients[:1]])
    tasks = np.concatenate([tasks, np.zeros(len(empty[:1]), np.int64), tasks[:1]])
    got = eng.probe_losses(params, clients, tasks)
    want = Engine.probe_losses(eng, params, clients, tasks)  # the plain per-pair loop
    assert got.shape == (len(clients),)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert (got[n[clients, tasks] > 0] > 0).all()
    # after training the probe changes; still equal to the loop
    out = eng.train(params, clients[:6], tasks[:6], 0)
    assert out.steps.sum() > 0


# -- SCAFFOLD corrections (Engine.train(..., corrections=...)) ------------------------------------

def _corrections(eng, tasks, scale=0.05, seed=0):
    """Random (U_s, D_s) corrections r = c_s - c_{i,s} for the pairs of each task."""
    gen = torch.Generator().manual_seed(seed)
    dims = eng.num_parameters()
    return {s: scale * torch.randn((int((tasks == s).sum()), dims[s]), generator=gen)
            for s in np.unique(tasks).tolist()}


@pytest.mark.parametrize("engine", ["sequential", *ENGINES, *MAKERS])
def test_zero_corrections_equal_plain_training_exactly(federation, engine):
    eng = _make(engine, federation, 4)
    params = eng.init_params()
    clients, tasks = _all_pairs(federation)
    plain = eng.train(params, clients, tasks, 1)
    zero = {s: torch.zeros_like(g) for s, g in plain.updates.items()}
    corrected = eng.train(params, clients, tasks, 1, corrections=zero)
    np.testing.assert_array_equal(plain.steps, corrected.steps)
    np.testing.assert_array_equal(plain.train_loss, corrected.train_loss)
    for s in plain.updates:
        assert torch.equal(plain.updates[s], corrected.updates[s]), s


@pytest.mark.parametrize("engine", ENGINES + list(MAKERS))
@pytest.mark.parametrize("round", [0, 3])
def test_train_with_corrections_matches_sequential(federation, engine, round):
    fed = federation
    seq, other = _make("sequential", fed, 11), _make(engine, fed, 11)
    params = seq.init_params()
    clients, tasks = _all_pairs(fed)
    corr = _corrections(seq, tasks, seed=round)
    plain = seq.train(params, clients, tasks, round)
    a = seq.train(params, clients, tasks, round, corrections=corr)
    b = other.train(params, clients, tasks, round, corrections=corr)
    np.testing.assert_array_equal(a.steps, b.steps)
    np.testing.assert_allclose(b.train_loss, a.train_loss, rtol=0, atol=PARAM_TOL)
    for s in a.updates:
        err = float((a.updates[s] - b.updates[s]).abs().max())
        assert err <= PARAM_TOL, f"task {s}: max |dG| = {err}"
        # the corrections matter: the updates move by about lr * K * r
        assert float((a.updates[s] - plain.updates[s]).abs().max()) > 1e-3


@pytest.mark.parametrize("engine", ["sequential", *ENGINES])
def test_single_step_correction_is_lr_times_r(federation, engine):
    """One full-batch step: G = lr (g(w) + r), so G_corrected - G_plain = lr * r."""
    fed = dataclasses.replace(federation, tasks=tuple(
        dataclasses.replace(td, spec=dataclasses.replace(td.spec, local_epochs=1,
                                                           batch_size=10_000))
        for td in federation.tasks))
    eng = _make(engine, fed, 2)
    params = eng.init_params()
    clients, tasks = _all_pairs(fed)
    corr = _corrections(eng, tasks, seed=9)
    plain = eng.train(params, clients, tasks, 0)
    corrected = eng.train(params, clients, tasks, 0, corrections=corr)
    assert (corrected.steps == 1).all()
    for s, r in corr.items():
        lr = fed.tasks[s].spec.lr
        np.testing.assert_allclose(corrected.updates[s] - plain.updates[s], lr * r,
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("fast_path", [True, False])
def test_client_chunks_with_corrections(federation, monkeypatch, fast_path):
    """Each client keeps its own correction when its task's clients are trained in chunks."""
    import mmfl.engines.vectorized as vec

    fed = federation
    eng = VectorizedEngine(fed, seed=2, fast_path=fast_path)
    params = eng.init_params()
    clients, tasks = _all_pairs(fed)
    order = np.random.default_rng(0).permutation(len(clients))  # pairs in arbitrary order
    clients, tasks = clients[order], tasks[order]
    corr = _corrections(eng, tasks, seed=5)
    whole = eng.train(params, clients, tasks, 1, corrections=corr)
    monkeypatch.setattr(vec, "STACK_BUDGET", 2 * min(p.numel() for p in params) * 3)
    chunked = eng.train(params, clients, tasks, 1, corrections=corr)
    ref = _make("sequential", fed, 2).train(params, clients, tasks, 1, corrections=corr)
    for s in whole.updates:
        assert float((whole.updates[s] - chunked.updates[s]).abs().max()) <= 1e-6
        assert float((ref.updates[s] - chunked.updates[s]).abs().max()) <= PARAM_TOL


@pytest.mark.parametrize("engine", ["sequential", *ENGINES])
def test_corrections_must_match_the_pairs(federation, engine):
    eng = _make(engine, federation, 0)
    params = eng.init_params()
    clients, tasks = _all_pairs(federation)
    corr = _corrections(eng, tasks)
    bad = dict(corr)
    bad[0] = bad[0][1:]
    with pytest.raises(ValueError, match=r"corrections\[0\] must have shape"):
        eng.train(params, clients, tasks, 0, corrections=bad)
    del bad[0]
    with pytest.raises(ValueError, match="missing task 0"):
        eng.train(params, clients, tasks, 0, corrections=bad)


def test_generic_path_handles_aliased_gradients():
    """A model whose forward adds two same-shaped parameters: torch.func can return one tensor
    as the gradient of both; the update must still equal the sequential engine's."""
    import torch

    import mmfl
    from mmfl.engines.sequential import SequentialEngine
    from mmfl.experiment.config import config_from_dict
    from mmfl.experiment.federation import build_federation

    class TwoBias(torch.nn.Module):
        def __init__(self, d, k):
            super().__init__()
            self.lin = torch.nn.Linear(d, k, bias=False)
            self.b1 = torch.nn.Parameter(torch.zeros(k))
            self.b2 = torch.nn.Parameter(torch.zeros(k))

        def forward(self, x):
            return torch.log_softmax(self.lin(x.flatten(1)) + (self.b1 + self.b2), dim=1)

    @mmfl.register("model", "two_bias_test")
    def two_bias(options, input_shape, num_classes):
        return TwoBias(int(np.prod(input_shape)), num_classes)

    cfg = config_from_dict({
        "name": "alias", "seed": 0, "rounds": 1, "clients": {"count": 4, "active_rate": 1.0},
        "tasks": [{"name": "d", "dataset": "digits", "model": "two_bias_test", "lr": 0.5,
                   "batch_size": 16}]})
    fed = build_federation(cfg)
    clients, tasks = np.arange(4), np.zeros(4, dtype=np.int64)
    outs = []
    for cls in (SequentialEngine, VectorizedEngine):
        eng = cls(fed, seed=0)
        outs.append(eng.train(eng.init_params(), clients, tasks, 0).updates[0])
    assert float((outs[0] - outs[1]).abs().max()) < 1e-5


def test_init_params_are_the_initial_weights_after_training():
    from mmfl.engines.sequential import SequentialEngine
    from mmfl.experiment.config import config_from_dict
    from mmfl.experiment.federation import build_federation

    cfg = config_from_dict({
        "name": "init", "seed": 0, "rounds": 1, "clients": {"count": 4, "active_rate": 1.0},
        "tasks": [{"name": "d", "dataset": "digits", "model": "mlp", "lr": 0.5}]})
    for cls in (SequentialEngine, VectorizedEngine):
        eng = cls(build_federation(cfg), seed=0)
        w0 = eng.init_params()
        eng.train(w0, np.arange(4), np.zeros(4, dtype=np.int64), 0)
        assert all(bool((a == b).all()) for a, b in zip(w0, eng.init_params())), cls.__name__


@pytest.mark.parametrize("name, shape", [("mlp", (1, 28, 28)), ("cnn", (1, 8, 8)),
                                         ("logreg", (40,)), ("lstm", (12,))])
def test_flop_count_matches_pytorch_flop_counter(name, shape):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mmfl.engines.base import count_flops
    from mmfl.tasks.models import build_model

    model = build_model(name, {}, shape, 10, 0)
    x = torch.zeros(1, *shape)
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert count_flops(model, x) == counter.get_total_flops() > 0


@pytest.mark.parametrize("fast_path", [True, False])
def test_size_groups_bound_padding_and_match_sequential(fast_path):
    """Quantity skew with a batch larger than the small clients: a few big clients must not pad
    the many small ones to their batch length (padded rows < 2x the real rows at every step),
    and the grouped training still reproduces the sequential oracle."""
    import mmfl.engines.vectorized as vec
    from mmfl.engines.sequential import SequentialEngine

    cfg = config_from_dict({
        "name": "skew", "seed": 3, "rounds": 1, "clients": {"count": 20, "active_rate": 1.0},
        "tasks": [_task("digits_skew", "digits", "mlp", lr=0.1, batch=64,
                        partition={"kind": "iid", "quantity_skew": {"clients": 0.8, "data": 0.1}},
                        model_options={"hidden": 16})]})
    fed = build_federation(cfg)
    n = fed.population.n_samples[:, 0]
    clients = np.flatnonzero(n > 0).astype(np.int64)
    tasks = np.zeros(len(clients), dtype=np.int64)
    bs = fed.tasks[0].spec.batch_size
    assert n[clients].min() * 4 < bs < n[clients].max(), "a skewed federation"
    groups = vec.client_groups(np.arange(len(clients)), n[clients], bs, chunk=len(clients))
    assert len(groups) >= 2
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(clients)))
    padded = real = 0
    for g in groups:
        plan = vec.batch_plan([fed.tasks[0].client_indices[i] for i in clients[g]], clients[g],
                              0, 2, bs, 3, 0)
        full = np.minimum(n[clients[g]], bs)
        assert plan.idx.shape[2] <= 2 * full.min()  # the group's batch lengths within 2x
        padded += sum(plan.active) * plan.idx.shape[2]
        real += int((plan.weight > 0).sum())
    assert padded < 2 * real
    params = SequentialEngine(fed, seed=3).init_params()
    a = SequentialEngine(fed, seed=3).train(params, clients, tasks, 0)
    b = VectorizedEngine(fed, seed=3, fast_path=fast_path).train(params, clients, tasks, 0)
    np.testing.assert_array_equal(a.steps, b.steps)
    np.testing.assert_allclose(b.train_loss, a.train_loss, rtol=0, atol=PARAM_TOL)
    assert float((a.updates[0] - b.updates[0]).abs().max()) <= PARAM_TOL


# -- engine flower (Flower ClientApps under Flower's simulation engine, Ray) ---------------------
# Not in ENGINES: a FlowerEngine exists only inside a Flower ServerApp, so it is checked on whole
# runs; its train() against sequential, pair by pair, is in tests/flower/test_engine.py.

def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.flower
def test_flower_run_matches_vectorized(tmp_path):
    """Same config and seed: the same assignments as ``vectorized`` every round, metrics within
    METRIC_TOL and final parameters within PARAM_TOL."""
    pytest.importorskip("flwr")
    mmfl.run(_config(engine="vectorized"), tmp_path / "vec")
    summary = mmfl.run(_config(engine="flower"), tmp_path / "flower")
    assert summary["engine"] == "flower" and summary["status"] == "completed"
    rv, rf = _metrics(tmp_path / "vec"), _metrics(tmp_path / "flower")
    assert len(rv) == len(rf) == BASE["rounds"] * len(BASE["tasks"])
    assert_metrics_match(rv, rf, METRIC_TOL)
    for x, y in zip(_rows(tmp_path / "vec" / "rounds.csv"),
                    _rows(tmp_path / "flower" / "rounds.csv")):
        for col in ("available", "budget", "expected_slots", "slots", "local_trainings",
                    "model_uploads", "missing", "note"):
            assert x[col] == y[col], (col, x, y)
        assert y["missing"] == "0"
    pv, _ = checkpoint.load(tmp_path / "vec" / runner.CHECKPOINT)
    pf, _ = checkpoint.load(tmp_path / "flower" / runner.CHECKPOINT)
    for s in range(len(BASE["tasks"])):
        np.testing.assert_allclose(pf[f"param.{s}"], pv[f"param.{s}"], rtol=0, atol=PARAM_TOL)
