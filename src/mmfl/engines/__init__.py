"""How local training runs. ``sequential`` is the plain per-pair PyTorch loop: the reference
oracle every faster engine must match (see tests/engines)."""

from mmfl.engines.base import Engine, TrainOutput
from mmfl.engines.sequential import SequentialEngine
from mmfl.engines.vectorized import VectorizedEngine

__all__ = ["Engine", "SequentialEngine", "TrainOutput", "VectorizedEngine"]
