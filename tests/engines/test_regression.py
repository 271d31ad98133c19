"""``tasks[i].loss = "mse"``: regression with a user model on real-valued targets.

The sequential engine equals an explicit PyTorch loop with ``F.mse_loss``; the vectorized engine
equals the sequential one within 1e-6; evaluation reports the test MSE as loss and R^2 as
accuracy (hand-computed here); every misuse is a one-line ConfigError naming its key.
"""

from __future__ import annotations

import json
import runpy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mmfl
from mmfl.engines.base import Engine
from mmfl.engines.sequential import SequentialEngine
from mmfl.engines.vectorized import VectorizedEngine
from mmfl.experiment.config import config_from_dict
from mmfl.experiment.federation import build_federation
from mmfl.tasks.losses import r_squared, squared_errors, task_loss

from testkit import ROOT


class Net(torch.nn.Module):
    """Linear - tanh - Linear(k); returns (B,) when ``flat`` (k = 1)."""

    def __init__(self, d: int, k: int, flat: bool):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(d, 8), torch.nn.Tanh(),
                                        torch.nn.Linear(8, k))
        self.flat = flat

    def forward(self, x):
        out = self.body(x)
        return out.squeeze(-1) if self.flat else out


def _linear_data(options, data_dir, seed):
    """y = x W + 0.1 noise, x (n, 5); targets (n,) for k = 1 (``flat``), else (n, k)."""
    rng = np.random.default_rng(seed)
    k, n = options["k"], 300
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = x @ rng.normal(size=(5, k)) + 0.1 * rng.normal(size=(n, k))
    if options["flat"]:
        y = y[:, 0]
    return mmfl.Dataset("linear_test", x[:240], y[:240], x[240:], y[240:], num_classes=k,
                        input_shape=(5,), regression=True)


@pytest.fixture(scope="module", autouse=True)
def registered():
    mmfl.register("dataset", "linear_test", options={
        "k": mmfl.Option(int, 1, "> 0", "targets per sample"),
        "flat": mmfl.Option(bool, True, "", "(n,) targets")})(_linear_data)
    mmfl.register("model", "net_test", options={
        "flat": mmfl.Option(bool, True, "", "(B,) output")})(
        lambda o, shape, k: Net(int(np.prod(shape)), k, o["flat"]))
    mmfl.register("model", "two_outputs_test")(
        lambda o, shape, k: torch.nn.Linear(int(np.prod(shape)), 2))
    mmfl.register("model", "classifier_test")(
        lambda o, shape, k: torch.nn.Sequential(torch.nn.Linear(int(np.prod(shape)), k),
                                                torch.nn.LogSoftmax(-1)))


def _cfg(k=1, flat=True, loss="mse", dataset="linear_test", model="net_test", **task):
    t = {"name": "r", "dataset": dataset, "model": model, "loss": loss, "lr": 0.05,
         "local_epochs": 2, "batch_size": 7, **task}
    if dataset == "linear_test":
        t["dataset_options"] = {"k": k, "flat": flat}
    if model == "net_test":
        t["model_options"] = {"flat": flat}
    return config_from_dict({"name": "reg", "seed": 3, "rounds": 3,
                             "clients": {"count": 6, "active_rate": 1.0}, "tasks": [t]})


def _train(cls, fed, **kw):
    eng = cls(fed, seed=3, **kw)
    w0 = eng.init_params()
    clients = np.flatnonzero(fed.population.n_samples[:, 0] > 0)
    return eng, w0, clients, eng.train(w0, clients, np.zeros(len(clients), np.int64), 0)


@pytest.mark.parametrize("k, flat", [(1, True), (1, False), (3, False)])
def test_sequential_equals_an_explicit_mse_loop(k, flat):
    """E = 2 epochs of batch 7 (a smaller last batch): the update equals torch.optim.SGD on
    F.mse_loss over exactly the engine's batches within 1e-6."""
    from mmfl.engines.sequential import local_batches

    fed = build_federation(_cfg(k, flat))
    eng, w0, clients, out = _train(SequentialEngine, fed)
    ds = fed.tasks[0].dataset
    for row, i in enumerate(clients):
        ref = Net(5, k, flat)
        torch.nn.utils.vector_to_parameters(w0[0].clone(), ref.parameters())
        opt = torch.optim.SGD(ref.parameters(), lr=0.05)
        losses = []
        for b in local_batches(fed.tasks[0].client_indices[i], 2, 7, 3, 0, int(i), 0):
            opt.zero_grad()
            loss = F.mse_loss(ref(torch.from_numpy(ds.x_train[b])), torch.from_numpy(ds.y_train[b]))
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        want = w0[0] - torch.nn.utils.parameters_to_vector(ref.parameters()).detach()
        assert float((out.updates[0][row] - want).abs().max()) < 1e-6
        assert out.train_loss[row] == pytest.approx(np.mean(losses), abs=1e-6)


@pytest.mark.parametrize("k, flat, optimizer", [(1, True, "sgd"), (3, False, "sgd"),
                                                (3, False, "adam")])
def test_vectorized_matches_the_sequential_oracle(k, flat, optimizer):
    fed = build_federation(_cfg(k, flat, optimizer=optimizer))
    _, w0, clients, seq = _train(SequentialEngine, fed)
    vec_eng, _, _, vec = _train(VectorizedEngine, fed)
    assert np.array_equal(seq.steps, vec.steps)
    assert float((seq.updates[0] - vec.updates[0]).abs().max()) < 1e-6
    assert np.allclose(seq.train_loss, vec.train_loss, atol=1e-6)
    # the batched LVR probe equals the base engine's per-pair loop
    tasks = np.zeros(len(clients), np.int64)
    assert np.allclose(vec_eng.probe_losses(w0, clients, tasks),
                       Engine.probe_losses(vec_eng, w0, clients, tasks), atol=1e-6)


def test_evaluation_reports_test_mse_and_r_squared():
    """Hand computation on the test split: MSE = SSE / (n k), R^2 = 1 - SSE / SST with SST
    pooled over the k outputs; and 1 - R^2 = MSE / (mean per-output variance)."""
    fed = build_federation(_cfg(3, False))
    eng = SequentialEngine(fed, seed=3)
    w = eng.init_params()
    acc, loss = eng.evaluate(w)
    ds = fed.tasks[0].dataset
    model = Net(5, 3, False)
    torch.nn.utils.vector_to_parameters(w[0].clone(), model.parameters())
    with torch.no_grad():
        pred = model(torch.from_numpy(ds.x_test)).double().numpy()
    y = ds.y_test.astype(np.float64)
    sse = ((pred - y) ** 2).sum()
    sst = ((y - y.mean(0)) ** 2).sum()
    assert loss[0] == pytest.approx(sse / y.size, rel=1e-6)
    assert acc[0] == pytest.approx(1 - sse / sst, rel=1e-6)
    assert 1 - acc[0] == pytest.approx(loss[0] / y.var(0).mean(), rel=1e-6)


def test_r_squared_by_hand():
    y = torch.tensor([1.0, 2.0, 3.0, 4.0])  # mean 2.5, SST = 5
    assert r_squared(0.0, y) == 1.0
    assert r_squared(5.0, y) == 0.0        # the mean's own error
    assert r_squared(1.25, y) == 0.75


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 4), st.booleans(), st.integers(0, 2**31 - 1))
def test_squared_errors_average_to_torch_mse(n, k, flat, seed):
    """The mean of the per-sample losses is F.mse_loss of the batch, for (n,) and (n, k)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn((n,) if flat and k == 1 else (n, k), generator=g)
    out = torch.randn((n, k), generator=g)
    per = squared_errors(out, y)
    assert per.shape == (n,)
    assert torch.allclose(per.mean(), F.mse_loss(out.reshape(y.shape), y), atol=1e-6)
    assert torch.allclose(task_loss(out, y, True, "sum"), per.sum())


def test_auto_picks_mse_on_a_regression_dataset():
    fed = build_federation(_cfg(loss="auto"))
    a = _train(SequentialEngine, fed)[3]
    b = _train(SequentialEngine, build_federation(_cfg(loss="mse")))[3]
    assert torch.equal(a.updates[0], b.updates[0])


@pytest.mark.parametrize("change, key, text", [
    ({"dataset": "digits", "model": "mlp"}, r"tasks\[0\]\.loss", "needs real-valued targets"),
    ({"loss": "nll"}, r"tasks\[0\]\.loss", "needs class labels"),
    ({"loss": "cross_entropy"}, r"tasks\[0\]\.loss", "needs class labels"),
    ({"model": "mlp"}, r"tasks\[0\]\.model", "mmfl's own models are classifiers"),
    ({"model": "classifier_test", "k": 3, "flat": False}, r"tasks\[0\]\.loss",
     "returns log-probabilities"),
    ({"model": "two_outputs_test"}, r"tasks\[0\]\.model",
     r"must return a \(batch, 1\) tensor of predictions \(or \(batch,\)\)"),
    ({"partition": {"kind": "dirichlet"}}, r"tasks\[0\]\.partition\.kind", "splits by class"),
])
def test_misuse_is_a_config_error_naming_the_key(change, key, text):
    kw = dict(change)
    k, flat = kw.pop("k", 1), kw.pop("flat", True)
    cfg = _cfg(k, flat, **kw)
    with pytest.raises(mmfl.ConfigError, match=key + ": .*" + text):
        SequentialEngine(build_federation(cfg), seed=0)


def test_config_refuses_class_masking_and_flower_with_mse():
    with pytest.raises(mmfl.ConfigError, match=r"tasks\[0\]\.class_mask: must be \"none\""):
        _cfg(class_mask="zero")
    with pytest.raises(mmfl.ConfigError, match=r"tasks\[0\]\.loss: .*not on engine flower"):
        _cfg().replace(engine="flower")


def test_dataset_checks_regression_targets():
    x = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match=r"must be \(n, num_classes\) = \(n, 2\)"):
        mmfl.Dataset("d", x, np.zeros(4), x, np.zeros(4), 2, (2,), regression=True)
    with pytest.raises(ValueError, match="non-finite"):
        mmfl.Dataset("d", x, np.array([0, 1, np.nan, 2]), x, np.zeros(4), 1, (2,),
                     regression=True)
    ds = mmfl.Dataset("d", x, np.arange(4) / 3, x, np.arange(4), 1, (2,), regression=True)
    assert ds.y_train.dtype == np.float32 and ds.y_train[1] == np.float32(1 / 3)


def test_describe_a_regression_task():
    from mmfl.experiment.describe import describe_federation

    cfg = _cfg(3, False)
    text = describe_federation(cfg, build_federation(cfg))
    assert "3 regression targets" in text and "label histogram" not in text


def test_example_regression_runs_end_to_end(tmp_path):
    """examples/regression.py: trains, and load_model + load_data reproduce summary.json's
    R^2 (the accuracy column) exactly; the model learns (R^2 > 0.3 on diabetes)."""
    mod = runpy.run_path(str(ROOT / "examples" / "regression.py"))
    r2 = mod["main"](str(tmp_path / "reg"))
    summary = json.loads((tmp_path / "reg" / "summary.json").read_text())
    assert r2 == pytest.approx(summary["tasks"]["diabetes"]["accuracy"], abs=1e-12)
    assert r2 > 0.3
    rows = (tmp_path / "reg" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("round,task,accuracy,loss")


def test_whole_runs_on_both_engines_report_the_same_metrics(tmp_path):
    """Three rounds of random sampling with Adam, sequential against vectorized: every round's
    R^2 and test MSE agree within 1e-6 (the sequential engine is the oracle)."""
    import csv

    rows = {}
    for engine in ("sequential", "vectorized"):
        cfg = _cfg(3, False, optimizer="adam").replace(engine=engine,
                                                        **{"clients.active_rate": 0.5})
        mmfl.run(cfg, tmp_path / engine)
        with open(tmp_path / engine / "metrics.csv", newline="") as f:
            rows[engine] = [(float(r["accuracy"]), float(r["loss"])) for r in csv.DictReader(f)]
    assert len(rows["sequential"]) == 3
    assert np.allclose(rows["sequential"], rows["vectorized"], rtol=0, atol=1e-6)
    assert rows["sequential"][-1][0] > rows["sequential"][0][0]  # R^2 improves


def test_engine_flower_refuses_a_regression_dataset_under_loss_auto(tmp_path):
    """loss = "auto" passes the config check with engine flower; the run's start-up names
    tasks[0].loss once the dataset turns out to be a regression one."""
    from mmfl.experiment.runner import Runner

    cfg = _cfg(loss="auto").replace(engine="flower")
    runner = Runner(cfg, tmp_path / "r", engine_factory=lambda fed: SequentialEngine(fed, seed=0))
    with pytest.raises(mmfl.ConfigError, match=r"^tasks\[0\]\.loss: regression .*not on engine "
                                               r"flower"):
        runner._build()
