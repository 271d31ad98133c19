"""Model factories: ``factory(options, input_shape, num_classes) -> torch.nn.Module``.

Each factory is registered under the ``"model"`` kind. Every model maps a batch of inputs
(B, *input_shape) to **log-probabilities** (B, num_classes) (it ends with ``log_softmax``), so
the training loss is ``F.nll_loss`` and accuracy is ``argmax`` of the output.

Use :func:`build_model` to construct a model with a deterministic initialisation that does not
disturb torch's global random state.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmfl.errors import ConfigError
from mmfl.registry import Option, get, register, resolve_options

log = logging.getLogger(__name__)

__all__ = ["CNN", "AuthorsCNN", "CharLSTM", "MLP", "LogReg", "build_model", "eval_mode", "make_authors_cnn",
           "make_cnn", "make_logreg", "make_lstm", "make_mlp", "num_parameters"]


def _flat_size(input_shape: Sequence[int]) -> int:
    return int(math.prod(int(d) for d in input_shape))


class LogReg(nn.Module):
    """Multinomial logistic regression: flatten (B, *input_shape) -> linear -> log_softmax."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, *input_shape) -> (B, num_classes) log-probabilities."""
        return F.log_softmax(self.fc(x.flatten(1)), dim=1)


class MLP(nn.Module):
    """Flatten -> ``layers`` x (Linear(hidden) + ReLU) -> Linear(num_classes) -> log_softmax."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 64, layers: int = 1):
        super().__init__()
        blocks: list[nn.Module] = []
        width = in_features
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.body = nn.Sequential(*blocks)
        self.out = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, *input_shape) -> (B, num_classes) log-probabilities."""
        return F.log_softmax(self.out(self.body(x.flatten(1))), dim=1)


class CNN(nn.Module):
    """The FedAvg-style CNN of the MMFL papers' Fashion-MNIST experiments.

    conv 5x5 (32 channels, padding 2) + ReLU + maxpool 2, conv 5x5 (64 channels, padding 2) +
    ReLU + maxpool 2, flatten, Linear(hidden) + ReLU, Linear(num_classes), log_softmax. On
    (1, 28, 28) inputs the flattened size is 64 * 7 * 7 = 3136.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: int = 512):
        super().__init__()
        c, h, w = (int(d) for d in input_shape)
        self.conv1 = nn.Conv2d(c, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        flat = 64 * (h // 2 // 2) * (w // 2 // 2)
        self.fc1 = nn.Linear(flat, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, num_classes) log-probabilities."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return F.log_softmax(self.fc2(x), dim=1)


class AuthorsCNN(nn.Module):
    """The ``MnistCNN`` of the authors' public code (haoran-zh/mmfl-Dec, ``utility/model_list.py``)
    for "Towards Optimal Heterogeneous Client Sampling in Multi-Model FL", quirks included.

    Layers (on (1, 28, 28) inputs; any (C, H, W) works, flattened size 64 * (H//4) * (W//4)):
    conv1 = Conv2d(C, 32, 3x3, stride 1, padding 1) -> MaxPool2d(2) -> conv2 = Conv2d(32, 64,
    3x3, padding 1) -> MaxPool2d(2) -> flatten (64 * 7 * 7 = 3136) -> fc1 = Linear(3136,
    hidden=512) -> fc2 = Linear(hidden, num_classes) -> ReLU -> Softmax.

    The quirks, kept on purpose: **no nonlinearity** after either convolution nor between fc1
    and fc2 (the network is piecewise linear only through the max-pools and the final ReLU);
    the ReLU acts on the logits, and the model's output is the softmax ``q`` of those, which
    their ``CrossEntropyLoss`` then log-softmaxes again ("double softmax"): the loss is
    ``-log_softmax(q)[y]`` with q in [0, 1], so it never drops below ``log(1 + (K-1)/e)``
    (about 1.46 for K = 10) and its gradients are small.

    mmfl's model contract is that ``forward`` returns log-probabilities for ``F.nll_loss``, so
    :meth:`forward` returns ``log_softmax(q)``: ``nll(forward(x), y)`` is exactly their
    ``CrossEntropyLoss()(q, y)``, and ``argmax`` (their prediction) is the same. :meth:`scores`
    returns ``q`` itself, what their loss (and their class masking,
    :mod:`mmfl.tasks.masking`) sees; :meth:`scores_from_log_probs` recovers it from the output.

    Initialisation as theirs: conv weights ``kaiming_uniform_`` with torch's defaults (a = 0,
    fan_in, leaky_relu gain: bound sqrt(6 / fan_in)), conv biases torch's default uniform
    (+-1/sqrt(fan_in)), linear weights ``xavier_normal_``, linear biases 0 (re-initialised
    after construction, in module order, as their constructor and ``init_param`` do).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: int = 512):
        super().__init__()
        c, h, w = (int(d) for d in input_shape)
        self.conv1 = nn.Conv2d(c, 32, kernel_size=3, stride=1, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, stride=1, padding=1)
        self.fc1 = nn.Linear(64 * (h // 2 // 2) * (w // 2 // 2), hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        for m in self.modules():
            if type(m) is nn.Conv2d:
                nn.init.kaiming_uniform_(m.weight)
            elif type(m) is nn.Linear:
                nn.init.xavier_normal_(m.weight)
        for m in self.modules():
            if type(m) is nn.Linear:
                nn.init.zeros_(m.bias)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, num_classes) ``q = softmax(relu(fc2(fc1(features))))``, the
        authors' model output (probabilities; their loss log-softmaxes them again)."""
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        x = self.fc2(self.fc1(x.flatten(1)))
        return F.softmax(F.relu(x), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, num_classes) log-probabilities ``log_softmax(q)``."""
        return F.log_softmax(self.scores(x), dim=1)

    @staticmethod
    def scores_from_log_probs(logp: torch.Tensor) -> torch.Tensor:
        """The scores q (..., K) from this model's output ``logp = log_softmax(q)`` (..., K).

        ``logp = q - logsumexp(q)`` and ``sum(q) = 1``, so ``q = logp - mean(logp) + 1/K``
        (exact up to float rounding, about 1e-7 in float32). Pure tensor arithmetic, so it
        runs inside ``torch.func.vmap`` / ``functional_call``; gradients through it equal those
        through q (the softmax's backward removes the constant component the mean subtracts).
        """
        k = logp.shape[-1]
        return logp - logp.mean(dim=-1, keepdim=True) + 1.0 / k


@register("model", "logreg", options={})
def make_logreg(options: dict, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Logistic regression on the flattened input."""
    return LogReg(_flat_size(input_shape), num_classes)


@register(
    "model",
    "mlp",
    options={
        "hidden": Option(int, 64, "1..65536", "width of each hidden layer"),
        "layers": Option(int, 1, "1..64", "number of hidden layers"),
    },
)
def make_mlp(options: dict, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multi-layer perceptron with ReLU hidden layers on the flattened input."""
    return MLP(_flat_size(input_shape), num_classes,
               hidden=int(options.get("hidden", 64)), layers=int(options.get("layers", 1)))


@register(
    "model",
    "cnn",
    options={"hidden": Option(int, 512, "1..65536", "width of the fully connected layer")},
)
def make_cnn(options: dict, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The papers' Fashion-MNIST CNN (two 5x5 conv + pool layers, FC 512); images (C, H, W)."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or shape[1] < 4 or shape[2] < 4:
        raise ConfigError("model", "cnn needs image input (C, H, W) with H, W >= 4", shape)
    return CNN(shape, num_classes, hidden=int(options.get("hidden", 512)))


@register(
    "model",
    "authors_cnn",
    options={"hidden": Option(int, 512, "1..65536", "width of fc1")},
)
def make_authors_cnn(options: dict, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The authors' MnistCNN (haoran-zh/mmfl-Dec), quirks included: two 3x3 conv + pool layers
    without ReLU, fc 512 without ReLU, ReLU + softmax on the logits (see :class:`AuthorsCNN`)."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or shape[1] < 4 or shape[2] < 4:
        raise ConfigError("model", "authors_cnn needs image input (C, H, W) with H, W >= 4",
                          shape)
    return AuthorsCNN(shape, num_classes, hidden=int(options.get("hidden", 512)))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (batch norm reads its running statistics and updates none,
    dropout is off), back in the mode it had afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def build_model(
    name: str,
    options: dict | None,
    input_shape: Sequence[int],
    num_classes: int,
    init_seed: int,
) -> nn.Module:
    """Construct registered model ``name`` with parameters initialised from ``init_seed``.

    The initialisation runs under :func:`torch.random.fork_rng` with ``torch.manual_seed(
    init_seed)``, so the same seed gives bit-identical parameters and torch's global random state
    is left untouched. Missing options get their registered defaults (unknown ones raise
    :class:`ConfigError` keyed ``model.<option>``). Derive ``init_seed`` with
    ``mmfl.rng.torch_seed(seed, "init", task_index)``.

    Returns:
        the model in float32 on the CPU, in train mode.
    """
    entry = get("model", name, key="model")
    opts = resolve_options("model", dict(options or {}), entry.options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(init_seed))
        model = entry.obj(opts, tuple(int(d) for d in input_shape), int(num_classes))
    log.debug("built model %s with %d parameters", name, num_parameters(model))
    return model


def num_parameters(model: nn.Module) -> int:
    """Total number of trainable scalars of ``model``."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


class CharLSTM(nn.Module):
    """The character LSTM of the MMFL papers' Shakespeare task (the LEAF / FedAvg model).

    Embedding (``vocab`` rows, ``embed`` dims) -> ``layers`` stacked LSTM layers of ``hidden``
    units -> the top layer's output at the last time step -> Linear(num_classes) -> log_softmax.
    Papers: vocab 80 characters (+ 1 reserved index here), embed 8, 2 layers of 256 units.

    Inputs are character indices stored as **float32** (every :class:`~mmfl.tasks.datasets.
    Dataset` holds float32 inputs and the engines feed ``x[idx]`` as float32): ``forward`` casts
    them to int64 and clamps them into [0, vocab - 1], so an out-of-range index reads the last
    row (the reserved unknown/padding index of ``shakespeare``).

    The recurrence is written with plain matmuls rather than ``nn.LSTM``: torch has no vmap
    batching rule for its fused RNN kernels (``torch.func.vmap`` falls back to a slow per-client
    loop with a warning), while matmuls batch over the clients of the vectorized engine's
    ``vmap(grad(functional_call(...)))``. No in-place ops, no data-dependent control flow (the
    time loop has the fixed length of the input).
    Parameter names and shapes are those of ``nn.LSTM`` (``lstm.weight_ih_l{k}`` (4H, in),
    ``lstm.weight_hh_l{k}`` (4H, H), ``lstm.bias_ih_l{k}``, ``lstm.bias_hh_l{k}``, gate order
    i, f, g, o) and so is the initialisation (uniform in +-1/sqrt(H)): a state dict loads into an
    ``nn.LSTM`` of the same sizes and gives the same outputs.
    """

    def __init__(self, vocab: int, num_classes: int, embed: int = 8, hidden: int = 256,
                 layers: int = 2):
        super().__init__()
        self.vocab, self.hidden_size, self.num_layers = int(vocab), int(hidden), int(layers)
        self.embedding = nn.Embedding(self.vocab, int(embed))
        self.lstm = _LSTMParams(int(embed), self.hidden_size, self.num_layers)
        self.fc = nn.Linear(self.hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L) character indices (any dtype) -> (B, num_classes) log-probabilities."""
        idx = x.long().clamp(0, self.vocab - 1)
        seq = self.embedding(idx)  # (B, L, E)
        H = self.hidden_size
        for k in range(self.num_layers):
            w_ih = getattr(self.lstm, f"weight_ih_l{k}")
            w_hh = getattr(self.lstm, f"weight_hh_l{k}")
            b_ih = getattr(self.lstm, f"bias_ih_l{k}")
            b_hh = getattr(self.lstm, f"bias_hh_l{k}")
            # the biases are added separately, not as (b_ih + b_hh): the gradients of a sum's
            # two operands are one tensor, and torch.func would return them aliased (an engine
            # updating one in place would then change the other)
            proj = torch.matmul(seq, w_ih.t()) + b_ih  # (B, L, 4H): input part of every step
            h = seq.new_zeros(seq.shape[0], H)
            c = seq.new_zeros(seq.shape[0], H)
            outs = []
            # unbind, not proj[:, t]: the backward of L selects would zero-fill L full-size
            # gradients (quadratic in L); unbind's backward is one stack
            for p_t in proj.unbind(1):
                gates = p_t + torch.matmul(h, w_hh.t()) + b_hh
                i, f, g, o = gates.chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                if k + 1 < self.num_layers:
                    outs.append(h)
            if k + 1 < self.num_layers:
                seq = torch.stack(outs, dim=1)
        return F.log_softmax(self.fc(h), dim=1)


class _LSTMParams(nn.Module):
    """The parameters of a stacked LSTM, named and initialised like ``nn.LSTM``'s."""

    def __init__(self, input_size: int, hidden: int, layers: int):
        super().__init__()
        bound = 1.0 / math.sqrt(hidden)
        for k in range(layers):
            width = input_size if k == 0 else hidden
            for name, shape in ((f"weight_ih_l{k}", (4 * hidden, width)),
                                (f"weight_hh_l{k}", (4 * hidden, hidden)),
                                (f"bias_ih_l{k}", (4 * hidden,)),
                                (f"bias_hh_l{k}", (4 * hidden,))):
                p = nn.Parameter(torch.empty(shape))
                nn.init.uniform_(p, -bound, bound)
                self.register_parameter(name, p)


@register(
    "model",
    "lstm",
    options={
        "hidden": Option(int, 256, "1..65536", "LSTM units per layer"),
        "layers": Option(int, 2, "1..64", "stacked LSTM layers"),
        "embed": Option(int, 8, "1..65536", "character embedding dimension"),
        "vocab": Option(int, 0, "0..1000000", "embedding rows; 0 = num_classes + 1 (the characters "
                        "plus the reserved unknown/padding index of shakespeare)"),
    },
)
def make_lstm(options: dict, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The papers' Shakespeare character LSTM (embed 8, 2 x 256 LSTM, FC); input (seq_len,)."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 1 or shape[0] < 1:
        raise ConfigError("model", "lstm needs sequence input (seq_len,) of character indices",
                          shape)
    vocab = int(options.get("vocab", 0)) or int(num_classes) + 1
    return CharLSTM(vocab, num_classes, embed=int(options.get("embed", 8)),
                    hidden=int(options.get("hidden", 256)), layers=int(options.get("layers", 2)))
