"""Tests of the ``lstm`` model (the papers' character LSTM) and its training in both engines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_standard_datasets import PLAY, leaf_users, text_samples, write_leaf

from mmfl import registry
from mmfl.engines.sequential import SequentialEngine
from mmfl.engines.vectorized import VectorizedEngine
from mmfl.errors import ConfigError
from mmfl.experiment.config import config_from_dict
from mmfl.experiment.federation import build_federation
from mmfl.tasks import standard_datasets as SD
from mmfl.tasks.models import CharLSTM, build_model, num_parameters


def small(**kw):
    opts = {"hidden": 16, "embed": 4}
    opts.update(kw)
    return build_model("lstm", opts, (12,), 80, 3)


def chars(n, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 81, (n, L), generator=g).float()


def test_registered_options_and_paper_size():
    entry = registry.get("model", "lstm")
    assert {k: v.default for k, v in entry.options.items()} == {
        "hidden": 256, "layers": 2, "embed": 8, "vocab": 0}
    m = build_model("lstm", {}, (80,), 80, 0)
    assert isinstance(m, CharLSTM)
    assert m.embedding.weight.shape == (81, 8)  # 80 characters + the reserved index
    assert m.lstm.weight_ih_l0.shape == (1024, 8) and m.lstm.weight_hh_l1.shape == (1024, 256)
    assert m.fc.weight.shape == (80, 256)
    # embedding + 2 LSTM layers (both biases, as nn.LSTM) + FC
    expect = 81 * 8 + 4 * 256 * (8 + 256 + 2) + 4 * 256 * (256 + 256 + 2) + 256 * 80 + 80
    assert num_parameters(m) == expect
    assert not list(m.buffers())


def test_output_is_log_probabilities():
    m = small()
    out = m(chars(5, 12))
    assert out.shape == (5, 80)
    np.testing.assert_allclose(out.exp().sum(1).detach().numpy(), 1.0, atol=1e-5)


def test_matches_torch_lstm():
    """Same parameter names and gate order as nn.LSTM: identical outputs."""
    for layers in (1, 2, 3):
        m = small(layers=layers)
        ref = torch.nn.LSTM(4, 16, layers, batch_first=True)
        ref.load_state_dict({k[len("lstm."):]: v for k, v in m.state_dict().items()
                             if k.startswith("lstm.")})
        x = chars(6, 12, seed=layers)
        seq, _ = ref(m.embedding(x.long()))
        expect = F.log_softmax(m.fc(seq[:, -1]), dim=1)
        torch.testing.assert_close(m(x), expect, atol=1e-5, rtol=0)


def test_init_like_torch_lstm_and_deterministic():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a, b = small(), small()
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    bound = 1 / 16 ** 0.5
    for name, p in a.lstm.named_parameters():
        assert float(p.detach().abs().max()) <= bound, name
    c = build_model("lstm", {"hidden": 16, "embed": 4}, (12,), 80, 4)
    assert not torch.equal(c.lstm.weight_hh_l0, a.lstm.weight_hh_l0)


def test_options_and_bad_input():
    m = small(layers=1, vocab=100)
    assert m.embedding.weight.shape == (100, 4) and not hasattr(m.lstm, "weight_ih_l1")
    assert build_model("lstm", {"hidden": 8}, (5,), 10, 0).embedding.weight.shape == (11, 8)
    with pytest.raises(ConfigError, match="sequence input"):
        build_model("lstm", {}, (1, 28, 28), 10, 0)
    with pytest.raises(ConfigError, match="hidden"):
        build_model("lstm", {"hidden": 0}, (5,), 10, 0)


def test_out_of_range_indices_are_clamped():
    m = small()
    x = chars(3, 12)
    hi, lo = x.clone(), x.clone()
    hi[:, 4] = 500.0
    lo[:, 4] = -3.0
    ref_hi, ref_lo = x.clone(), x.clone()
    ref_hi[:, 4] = 80.0
    ref_lo[:, 4] = 0.0
    torch.testing.assert_close(m(hi), m(ref_hi))
    torch.testing.assert_close(m(lo), m(ref_lo))


def test_input_is_not_modified_and_grad_flows():
    m = small()
    x = chars(4, 12)
    before = x.clone()
    loss = F.nll_loss(m(x), torch.arange(4))
    loss.backward()
    assert torch.equal(x, before)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert float(m.lstm.weight_hh_l0.grad.abs().sum()) > 0


def test_vmap_grad_matches_per_client_autograd():
    from torch.func import functional_call, grad_and_value, vmap

    m = small()

    def loss(p, x, y, c):
        logp = functional_call(m, p, (x,))
        return -(logp.gather(1, y.unsqueeze(1)).squeeze(1) * c).sum()

    K, B = 3, 5
    g = torch.Generator().manual_seed(0)
    P = {n: (p.detach() + 0.05 * torch.randn((K, *p.shape), generator=g))
         for n, p in m.named_parameters()}
    x = chars(K * B, 12, seed=9).view(K, B, 12)
    y = torch.randint(0, 80, (K, B), generator=g)
    c = torch.full((K, B), 1.0 / B)
    c[2, 3:] = 0.0  # padding, as the vectorized engine uses
    grads, values = vmap(grad_and_value(loss))(P, x, y, c)
    # no two gradients share memory: the vectorized engine scales them in place
    ptrs = [g.untyped_storage().data_ptr() for g in grads.values()]
    assert len(set(ptrs)) == len(ptrs)
    for k in range(K):
        params = {n: v[k].clone().requires_grad_(True) for n, v in P.items()}
        val = loss(params, x[k], y[k], c[k])
        val.backward()
        assert abs(float(values[k]) - float(val.detach())) < 1e-5
        for n, p in params.items():
            torch.testing.assert_close(grads[n][k], p.grad, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------- engines


@pytest.fixture
def shakespeare_federation(tmp_path, monkeypatch):
    monkeypatch.delenv("MMFL_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    SD.clear_cache()
    # 6 roles of 12..22 samples (>= 80 in all: one per class at least); batches of 5
    train = {f"ROLE{u}": text_samples(PLAY, 12 + 2 * u, start=7 * u) for u in range(6)}
    _, test = leaf_users(6, seed=1)
    test = {f"ROLE{u}": v for u, v in enumerate(test.values())}
    write_leaf(tmp_path / "shakespeare", train, test)
    cfg = config_from_dict({
        "name": "lstm-conformance", "seed": 4, "rounds": 2, "engine": "sequential",
        "clients": {"count": 6, "active_rate": 0.5, "processors": 1},
        "sampler": {"name": "random"},
        "tasks": [{"name": "shake", "dataset": "shakespeare", "model": "lstm", "lr": 0.5,
                   "local_epochs": 2, "batch_size": 5, "partition": {"kind": "natural"},
                   "dataset_options": {"seq_len": 10},
                   "model_options": {"hidden": 12, "embed": 4, "layers": 2}}],
    })
    yield build_federation(cfg, tmp_path)
    SD.clear_cache()


def test_engines_give_the_same_update(shakespeare_federation):
    fed = shakespeare_federation
    n = fed.population.n_samples[:, 0]
    assert (n > 0).all() and np.any(n % 5)
    seq = SequentialEngine(fed, seed=4)
    vec = VectorizedEngine(fed, seed=4)
    assert vec._layers == [None]  # the generic vmap path
    params = seq.init_params()
    params = [params[0] + 0.01 * torch.randn(params[0].shape,
                                             generator=torch.Generator().manual_seed(0))]
    clients = np.arange(6, dtype=np.int64)
    tasks = np.zeros(6, dtype=np.int64)
    a = seq.train(params, clients, tasks, 1)
    b = vec.train(params, clients, tasks, 1)
    np.testing.assert_array_equal(a.steps, b.steps)
    assert (a.steps >= 6).all()
    np.testing.assert_allclose(b.train_loss, a.train_loss, rtol=0, atol=1e-5)
    err = float((a.updates[0] - b.updates[0]).abs().max())
    assert err <= 1e-5, err
    assert float(a.updates[0].abs().max()) > 1e-3
    acc, loss = vec.evaluate(params)
    assert 0 <= acc[0] <= 1 and np.isfinite(loss[0])
    probe = vec.probe_losses(params, clients, tasks)
    np.testing.assert_allclose(probe, seq.probe_losses(params, clients, tasks), atol=1e-5)
