"""The authors' MnistCNN (model ``authors_cnn``): architecture, quirks, loss, initialisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmfl import registry
from mmfl.engines.base import count_flops
from mmfl.errors import ConfigError
from mmfl.tasks.models import AuthorsCNN, build_model, num_parameters


@pytest.fixture(scope="module")
def model():
    return build_model("authors_cnn", {}, (1, 28, 28), 10, init_seed=0)


def _x(n=6, shape=(1, 28, 28), seed=0):
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


def test_registered_with_hidden_option():
    assert "authors_cnn" in registry.names("model")
    m = build_model("authors_cnn", {"hidden": 32}, (1, 8, 8), 10, init_seed=0)
    assert tuple(m.fc1.weight.shape) == (32, 64 * 2 * 2)


def test_parameter_shapes_and_count(model):
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert shapes == [("conv1.weight", (32, 1, 3, 3)), ("conv1.bias", (32,)),
                      ("conv2.weight", (64, 32, 3, 3)), ("conv2.bias", (64,)),
                      ("fc1.weight", (512, 3136)), ("fc1.bias", (512,)),
                      ("fc2.weight", (10, 512)), ("fc2.bias", (10,))]
    assert model.conv1.stride == (1, 1) and model.conv1.padding == (1, 1)
    assert model.conv2.stride == (1, 1) and model.conv2.padding == (1, 1)
    assert num_parameters(model) == (32 * 9 + 32) + (64 * 32 * 9 + 64) + (3136 * 512 + 512) \
        + (512 * 10 + 10)
    assert not any(True for _ in model.buffers())


def test_forward_is_the_hand_written_composition(model):
    """No nonlinearity after the convolutions nor between fc1 and fc2; ReLU, softmax on the
    logits; forward = log_softmax of those probabilities."""
    x = _x()
    p = dict(model.named_parameters())
    a = F.max_pool2d(F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=1), 2)
    a = F.max_pool2d(F.conv2d(a, p["conv2.weight"], p["conv2.bias"], padding=1), 2)
    z = F.linear(F.linear(a.flatten(1), p["fc1.weight"], p["fc1.bias"]),
                 p["fc2.weight"], p["fc2.bias"])
    q = torch.softmax(torch.relu(z), dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model.scores(x), q, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(x), torch.log_softmax(q, dim=1), rtol=0, atol=1e-6)
        # a ReLU between the layers would change the output (some pre-activations are < 0)
        z_relu = F.linear(torch.relu(F.linear(a.flatten(1), p["fc1.weight"], p["fc1.bias"])),
                          p["fc2.weight"], p["fc2.bias"])
        assert float((z_relu - z).abs().max()) > 1e-3


def test_output_is_log_probabilities_of_the_scores(model):
    x = _x()
    with torch.no_grad():
        q, out = model.scores(x), model(x)
    assert out.shape == q.shape == (6, 10)
    torch.testing.assert_close(q.sum(1), torch.ones(6))
    torch.testing.assert_close(out.exp().sum(1), torch.ones(6))
    assert (out.argmax(1) == q.argmax(1)).all()
    torch.testing.assert_close(AuthorsCNN.scores_from_log_probs(out), q, rtol=0, atol=1e-6)


def test_nll_of_forward_is_their_cross_entropy_of_q(model):
    """Their loss: CrossEntropyLoss on the softmax output q ("double softmax")."""
    x, y = _x(), torch.tensor([0, 3, 9, 1, 1, 7])
    ours = F.nll_loss(model(x), y)
    g_ours = torch.autograd.grad(ours, list(model.parameters()))
    theirs = torch.nn.CrossEntropyLoss()(model.scores(x), y)
    g_theirs = torch.autograd.grad(theirs, list(model.parameters()))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the double softmax bounds the loss below by log(1 + (K - 1) / e)
    assert float(ours.detach()) > math.log(1 + 9 / math.e) - 1e-6


def test_initialisation_like_theirs(model):
    for conv in (model.conv1, model.conv2):
        fan_in = conv.weight[0].numel()
        bound = math.sqrt(6.0 / fan_in)  # kaiming_uniform_, a = 0
        w = conv.weight.detach()
        assert float(w.abs().max()) <= bound
        assert float(w.abs().max()) > 0.9 * bound  # uniform over the whole range
        assert abs(float(w.std()) - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)
        # torch's default conv bias: uniform in +-1/sqrt(fan_in)
        assert float(conv.bias.detach().abs().max()) <= 1 / math.sqrt(fan_in)
        assert float(conv.bias.detach().abs().max()) > 0
    for lin in (model.fc1, model.fc2):
        assert float(lin.bias.detach().abs().max()) == 0.0
        fan_in, fan_out = lin.in_features, lin.out_features
        std = math.sqrt(2.0 / (fan_in + fan_out))  # xavier_normal_
        assert abs(float(lin.weight.detach().std()) - std) < 0.1 * std
        assert abs(float(lin.weight.detach().mean())) < 0.1 * std


def test_deterministic_for_a_seed():
    a = build_model("authors_cnn", {"hidden": 16}, (1, 8, 8), 10, init_seed=5)
    b = build_model("authors_cnn", {"hidden": 16}, (1, 8, 8), 10, init_seed=5)
    c = build_model("authors_cnn", {"hidden": 16}, (1, 8, 8), 10, init_seed=6)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize("shape", [(3, 8, 12), (1, 5, 7)])
def test_general_image_shapes(shape):
    m = build_model("authors_cnn", {"hidden": 8}, shape, 4, init_seed=0)
    assert m.fc1.in_features == 64 * (shape[1] // 4) * (shape[2] // 4)
    out = m(_x(3, shape))
    assert out.shape == (3, 4)


@pytest.mark.parametrize("shape", [(40,), (1, 3, 3), (28, 28)])
def test_rejects_non_images(shape):
    with pytest.raises(ConfigError, match="image input"):
        build_model("authors_cnn", {}, shape, 10, init_seed=0)


def test_flop_count_is_analytic(model):
    """Only Conv2d/Linear carry parameters, so the analytic counter applies: 2 FLOPs per
    multiply-add of conv1 (28x28 outputs), conv2 (14x14 outputs), fc1, fc2."""
    want = 2 * (32 * 9 * 28 * 28 + 64 * 32 * 9 * 14 * 14 + 3136 * 512 + 512 * 10)
    assert count_flops(model, _x(1)) == want


def test_vectorized_fast_paths_decline_it(model):
    from mmfl.engines.batched_cnn import cnn_spec
    from mmfl.engines.vectorized import _linear_stack

    assert cnn_spec(model, (1, 28, 28)) is None
    assert _linear_stack(model) is None
