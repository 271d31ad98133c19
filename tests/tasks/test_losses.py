"""``tasks[i].loss``: models that return logits train with the cross-entropy loss, exactly as
an explicit PyTorch loop does; log-probability models keep their nll loss untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmfl
from mmfl.engines.sequential import SequentialEngine
from mmfl.engines.vectorized import VectorizedEngine
from mmfl.experiment.config import config_from_dict
from mmfl.experiment.federation import build_federation
from mmfl.tasks.losses import LogSoftmaxOutput, attach_loss, is_log_probabilities


class Logits(torch.nn.Module):
    """A PyTorch-tutorial model: returns logits."""

    def __init__(self, d, k):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, 16),
                                        torch.nn.ReLU(), torch.nn.Linear(16, k))

    def forward(self, x):
        return self.body(x)


@pytest.fixture(scope="module", autouse=True)
def registered():
    mmfl.register("model", "logits_test")(
        lambda options, input_shape, num_classes: Logits(int(np.prod(input_shape)), num_classes))
    mmfl.register("model", "wrong_shape_test")(
        lambda options, input_shape, num_classes: torch.nn.Flatten())


def _fed(model="logits_test", loss="auto", epochs=2, batch=10_000):
    cfg = config_from_dict({
        "name": "loss", "seed": 0, "rounds": 1, "clients": {"count": 4, "active_rate": 1.0},
        "tasks": [{"name": "d", "dataset": "digits", "model": model, "lr": 0.3, "loss": loss,
                   "local_epochs": epochs, "batch_size": batch}]})
    return build_federation(cfg)


def test_auto_wraps_logits_and_leaves_log_probability_models_alone():
    assert isinstance(SequentialEngine(_fed(), seed=0).models[0], LogSoftmaxOutput)
    mlp = SequentialEngine(_fed(model="mlp"), seed=0).models[0]
    assert not isinstance(mlp, LogSoftmaxOutput)  # mmfl's own models: unchanged


@pytest.mark.parametrize("cls", [SequentialEngine, VectorizedEngine])
def test_logits_model_matches_an_explicit_cross_entropy_loop(cls):
    """Full-batch SGD for E = 2 epochs: the update equals torch's own loop with
    F.cross_entropy on the logits within 1e-5."""
    fed = _fed()
    eng = cls(fed, seed=0)
    w0 = eng.init_params()
    clients = np.arange(4)
    out = eng.train(w0, clients, np.zeros(4, dtype=np.int64), 0)
    td = fed.tasks[0]
    for k, i in enumerate(clients):
        ref = Logits(int(np.prod(td.dataset.input_shape)), td.dataset.num_classes)
        torch.nn.utils.vector_to_parameters(w0[0].clone(), ref.parameters())
        opt = torch.optim.SGD(ref.parameters(), lr=0.3)
        idx = td.client_indices[i]
        x = torch.as_tensor(np.asarray(td.dataset.x_train[idx], np.float32))
        y = torch.as_tensor(np.asarray(td.dataset.y_train[idx], np.int64))
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            opt.step()
        want = w0[0] - torch.nn.utils.parameters_to_vector(ref.parameters()).detach()
        assert float((out.updates[0][k] - want).abs().max()) < 1e-5


def test_sequential_and_vectorized_agree_on_a_logits_model():
    fed = _fed(batch=8, epochs=1)
    outs = []
    for cls in (SequentialEngine, VectorizedEngine):
        eng = cls(fed, seed=0)
        outs.append(eng.train(eng.init_params(), np.arange(4), np.zeros(4, np.int64), 0))
    assert float((outs[0].updates[0] - outs[1].updates[0]).abs().max()) < 1e-5
    assert np.allclose(outs[0].train_loss, outs[1].train_loss, atol=1e-5)


def test_explicit_nll_on_logits_names_the_key():
    with pytest.raises(mmfl.ConfigError, match=r"tasks\[0\]\.loss: 'nll' needs a model that "
                                               r"returns log-probabilities"):
        SequentialEngine(_fed(loss="nll"), seed=0)


def test_a_model_with_the_wrong_output_shape_is_refused():
    with pytest.raises(mmfl.ConfigError, match=r"tasks\[0\]\.model: must return a \(batch, 10\)"):
        SequentialEngine(_fed(model="wrong_shape_test"), seed=0)


def test_the_start_up_check_touches_no_random_stream_and_keeps_train_mode():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5))
    before = torch.random.get_rng_state()
    wrapped = attach_loss(model, "auto", torch.ones(2, 4), 3, 0)
    assert torch.equal(before, torch.random.get_rng_state())
    assert wrapped.training and isinstance(wrapped, LogSoftmaxOutput)
    assert list(wrapped.parameters()) == list(model.parameters())  # no parameter added


def test_is_log_probabilities():
    z = torch.randn(5, 7)
    assert is_log_probabilities(F.log_softmax(z, dim=1))
    assert not is_log_probabilities(z)
    assert not is_log_probabilities(torch.full((2, 3), float("nan")))


def test_a_logits_model_runs_end_to_end_and_learns(tmp_path):
    cfg = config_from_dict({
        "name": "e2e", "seed": 0, "rounds": 6, "clients": {"count": 8, "active_rate": 1.0},
        "tasks": [{"name": "d", "dataset": "digits", "model": "logits_test", "lr": 0.3}]})
    summary = mmfl.run(cfg, tmp_path / "r")
    assert summary["tasks"]["d"]["accuracy"] > 0.5
    assert "loss" not in mmfl.read_results(tmp_path / "r").config["tasks"][0]  # auto: default
    model = mmfl.load_model(tmp_path / "r", "d")  # the user's own module, returning logits
    assert isinstance(model, Logits)
    x, y = mmfl.load_data(tmp_path / "r", "d")
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).double().mean())
    assert acc == summary["tasks"]["d"]["accuracy"]
