"""Tests of mmfl.tasks.models: shapes, log-probabilities, deterministic init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmfl import registry
from mmfl.errors import ConfigError
from mmfl.tasks.models import build_model, num_parameters


def params(m):
    return [p.detach().clone() for p in m.parameters()]


@pytest.mark.parametrize(
    "name,options,shape",
    [
        ("logreg", {}, (1, 8, 8)),
        ("logreg", {}, (60,)),
        ("mlp", {}, (40,)),
        ("mlp", {"hidden": 16, "layers": 3}, (1, 8, 8)),
        ("cnn", {}, (1, 28, 28)),
        ("cnn", {"hidden": 32}, (1, 8, 8)),
        ("cnn", {"hidden": 16}, (3, 5, 7)),
    ],
)
def test_output_is_log_probabilities(name, options, shape):
    model = build_model(name, options, shape, 10, init_seed=0)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    out = model(x)
    assert out.shape == (4, 10)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(4))
    assert (out <= 0).all()
    loss = F.nll_loss(out, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_registered():
    assert {"logreg", "mlp", "cnn"} <= set(registry.names("model"))


def test_cnn_papers_architecture_size():
    m = build_model("cnn", {}, (1, 28, 28), 10, init_seed=0)
    # conv1 32*25+32, conv2 64*32*25+64, fc1 3136*512+512, fc2 512*10+10
    assert num_parameters(m) == 832 + 51264 + 1606144 + 5130


def test_mlp_layers():
    m = build_model("mlp", {"hidden": 8, "layers": 2}, (5,), 3, init_seed=0)
    assert num_parameters(m) == (5 * 8 + 8) + (8 * 8 + 8) + (8 * 3 + 3)


@pytest.mark.parametrize("shape", [(40,), (1, 3, 3), (28, 28)])
def test_cnn_rejects_non_images(shape):
    with pytest.raises(ConfigError, match="image input"):
        build_model("cnn", {}, shape, 10, init_seed=0)


def test_unknown_option_and_model():
    with pytest.raises(ConfigError, match="model.width"):
        build_model("mlp", {"width": 3}, (4,), 2, init_seed=0)
    with pytest.raises(ConfigError, match="valid"):
        build_model("transformer", {}, (4,), 2, init_seed=0)


@pytest.mark.parametrize("name,shape", [("mlp", (40,)), ("cnn", (1, 8, 8)), ("logreg", (7,))])
def test_deterministic_init_and_global_rng_untouched(name, shape):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = params(build_model(name, {}, shape, 10, init_seed=7))
    b = params(build_model(name, {}, shape, 10, init_seed=7))
    c = params(build_model(name, {}, shape, 10, init_seed=8))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_large_init_seed():
    from mmfl.rng import torch_seed

    s = torch_seed(2**31 - 1, "init", 3)
    a = params(build_model("logreg", {}, (3,), 2, init_seed=s))
    b = params(build_model("logreg", {}, (3,), 2, init_seed=s))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
