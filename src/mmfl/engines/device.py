"""Where the engines compute: the top-level ``device`` ("cpu", "cuda", "cuda:N" or "auto").

An engine moves its tasks' datasets (train and test tensors) and models to the device once,
when it is built; local training and evaluation then run there. What crosses between the
engine and the rest of mmfl stays on the CPU: the global flat parameters w_s go to the device
once per task and round (the server's broadcast), the updates G and the final buffers come back
once per task and round (the uploads), and aggregation, server optimizers, stale stores,
update checks and checkpoints are unchanged. Minibatch index arrays (a few hundred integers per
step) are the only per-step transfer.

Determinism:

* ``cpu`` (the default): bit-exact. The same config and seed give byte-identical metrics on
  every run, whatever ``threads`` is (every kernel runs on one thread).
* ``cuda``: :func:`resolve_device` sets ``torch.backends.cudnn.deterministic = True``,
  ``torch.backends.cudnn.benchmark = False``, ``torch.use_deterministic_algorithms(True,
  warn_only=True)`` and, when it is unset, ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS's
  requirement for reproducible matrix products). Repeated runs on the same GPU model, driver
  and torch build then agree as far as PyTorch has deterministic kernels (an operation without
  one warns instead of failing); GPU results differ from CPU ones by float32 rounding
  (``benchmarks/bench_device.py`` measures by how much).
"""

from __future__ import annotations

import logging
import os

import torch

from mmfl.errors import ConfigError

__all__ = ["resolve_device"]

log = logging.getLogger(__name__)


def resolve_device(name: str | torch.device = "cpu", key: str = "device") -> torch.device:
    """The torch device of a ``device`` setting: "cpu"; "cuda" / "cuda:N" (a ConfigError
    naming ``key`` when torch sees no such GPU); "auto" = "cuda" when available, else "cpu".
    Choosing a GPU switches on the deterministic settings of the module docstring."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        log.info("device auto: %s", name)
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ConfigError(key, 'must be "cpu", "cuda", "cuda:N" or "auto"', name)
    if not torch.cuda.is_available():
        raise ConfigError(key, f"needs a CUDA GPU, but torch {torch.__version__} sees none; "
                          'use "cpu" (or "auto": a GPU when there is one)', name)
    index = int(name[5:]) if name.startswith("cuda:") else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ConfigError(key, f"there are {torch.cuda.device_count()} CUDA devices "
                          f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})", name)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.device("cuda", index)
