"""Local optimizers (tasks[i].optimizer): every engine's steps equal torch.optim's on the same
batches; state starts fresh each round."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmfl
from mmfl.engines.sequential import SequentialEngine, local_batches
from mmfl.engines.vectorized import VectorizedEngine
from mmfl.experiment.config import config_from_dict
from mmfl.experiment.federation import build_federation
from mmfl.tasks.optimizers import LocalOptimizer

CASES = [
    ("sgd", {"momentum": 0.9}),
    ("sgd", {"momentum": 0.5, "nesterov": True, "weight_decay": 0.01}),
    ("sgd", {"weight_decay": 0.1}),
    ("adam", {}),
    ("adam", {"betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.01}),
    ("adamw", {}),
    ("adamw", {"weight_decay": 0.1}),
]


def _fed(optimizer, options, model="mlp", lr=0.05, epochs=2, batch=16):
    cfg = config_from_dict({
        "name": "opt", "seed": 0, "rounds": 1, "clients": {"count": 5, "active_rate": 1.0},
        "tasks": [{"name": "d", "dataset": "digits", "model": model, "lr": lr,
                   "local_epochs": epochs, "batch_size": batch, "optimizer": optimizer,
                   "optimizer_options": options}]})
    return build_federation(cfg)


def _torch_reference(fed, w0, client, round_, seed, optimizer, options, lr):
    """torch.optim on the sequential engine's batches: the update G."""
    td = fed.tasks[0]
    eng = SequentialEngine(fed, seed=seed)
    model = eng.models[0]
    torch.nn.utils.vector_to_parameters(w0.clone(), model.parameters())
    opts = {"sgd": dict(momentum=0.0, nesterov=False, weight_decay=0.0),
            "adam": dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
            "adamw": dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)}[optimizer]
    opts.update({k: tuple(v) if k == "betas" else v for k, v in options.items()})
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    opt = cls[optimizer](model.parameters(), lr=lr, **opts)
    x, y = eng.train_x[0], eng.train_y[0]
    for b in local_batches(td.client_indices[client], td.spec.local_epochs,
                           td.spec.batch_size, seed, round_, client, 0):
        b = torch.from_numpy(b)
        opt.zero_grad()
        F.nll_loss(model(x[b]), y[b]).backward()
        opt.step()
    return w0 - torch.nn.utils.parameters_to_vector(model.parameters()).detach()


@pytest.mark.parametrize("optimizer, options", CASES)
@pytest.mark.parametrize("cls", [SequentialEngine, VectorizedEngine])
def test_engine_steps_equal_torch_optim(cls, optimizer, options):
    fed = _fed(optimizer, options)
    eng = cls(fed, seed=3)
    w0 = eng.init_params()
    clients = np.arange(5)
    out = eng.train(w0, clients, np.zeros(5, np.int64), 2)
    for k, i in enumerate(clients):
        want = _torch_reference(fed, w0[0], int(i), 2, 3, optimizer, options, 0.05)
        if cls is SequentialEngine:  # the oracle is torch.optim itself
            assert torch.equal(out.updates[0][k], want)
        else:  # vmap's gradients differ in the last bits; Adam's normalised step (about lr
            # per coordinate) magnifies that where a coordinate's gradient is near zero
            tol = 1e-5 if optimizer == "sgd" else 1e-4
            assert float((out.updates[0][k] - want).abs().max()) < tol, (optimizer, options, i)


def test_state_starts_fresh_each_round():
    """Two rounds from the same global model give the same update as one round."""
    fed = _fed("adam", {})
    eng = VectorizedEngine(fed, seed=0)
    w0 = eng.init_params()
    a = eng.train(w0, np.arange(5), np.zeros(5, np.int64), 0).updates[0].clone()
    eng.train(w0, np.arange(5), np.zeros(5, np.int64), 1)
    b = eng.train(w0, np.arange(5), np.zeros(5, np.int64), 0).updates[0]
    assert torch.equal(a, b)


def test_plain_sgd_keeps_the_fast_paths_and_their_numbers():
    """sgd without momentum or decay is the papers' step: unchanged results."""
    fed = _fed("sgd", {})
    eng = VectorizedEngine(fed, seed=0)
    assert eng._layers[0] is not None  # the mlp still takes the batched-matmul path
    w0 = eng.init_params()
    ref = SequentialEngine(fed, seed=0).train(w0, np.arange(5), np.zeros(5, np.int64), 0)
    out = eng.train(w0, np.arange(5), np.zeros(5, np.int64), 0)
    assert float((out.updates[0] - ref.updates[0]).abs().max()) < 1e-5


def test_local_optimizer_on_stacked_clients_matches_one_client_at_a_time():
    torch.manual_seed(0)
    p = torch.randn(3, 4)
    grads = [torch.randn(3, 4) for _ in range(4)]
    stacked = LocalOptimizer("adamw", {"betas": [0.9, 0.999], "eps": 1e-8,
                                       "weight_decay": 0.1}, 0.01)
    q = p.clone()
    for t, g in enumerate(grads):
        k = 3 if t < 2 else 2  # the third client has two steps only
        stacked.tick()
        stacked.step("w", q, g[:k])
    for c in range(3):
        single = torch.nn.Parameter(p[c].clone())
        ref = torch.optim.AdamW([single], lr=0.01, weight_decay=0.1)
        for t, g in enumerate(grads):
            if c == 2 and t >= 2:
                break
            single.grad = g[c].clone()
            ref.step()
        assert torch.allclose(q[c], single.detach(), atol=1e-6)


@pytest.mark.parametrize("key, value, message", [
    ("optimizer", "rmsprop", r"tasks\[0\]\.optimizer: must be one of"),
    ("optimizer_options", {"betas": [0.9]}, r"optimizer_options\.betas: must be \[beta1, beta2\]"),
    ("optimizer_options", {"nesterov": True}, r"optimizer_options\.nesterov: needs momentum"),
    ("optimizer_options", {"eps": 1e-8}, r"optimizer_options\.eps: unknown option"),
])
def test_bad_optimizer_settings_name_the_key(key, value, message):
    task = {"name": "d", "dataset": "digits", key: value}
    if key == "optimizer_options" and "betas" in value:
        task["optimizer"] = "adam"
    with pytest.raises(mmfl.ConfigError, match=message):
        config_from_dict({"name": "x", "tasks": [task]})
