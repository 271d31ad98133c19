"""tasks[i].init_weights: initial weights from a file (paired comparisons with another code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import mmfl
from mmfl.engines.sequential import SequentialEngine
from mmfl.experiment.config import config_from_dict
from mmfl.experiment.federation import build_federation


def _fed(path=""):
    return build_federation(config_from_dict({
        "name": "w", "seed": 0, "rounds": 1, "clients": {"count": 4, "active_rate": 1.0},
        "tasks": [{"name": "d", "dataset": "digits", "model": "mlp", "init_weights": str(path)}]}))


def _arrays(seed=5):
    """Arrays shaped like the mlp's parameters, under other names."""
    model = SequentialEngine(_fed(), seed=0).models[0]
    rng = np.random.default_rng(seed)
    return {f"layer{k}": rng.normal(size=p.shape).astype(np.float32)
            for k, p in enumerate(model.parameters())}


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_weights_from_a_file_are_the_initial_global_model(tmp_path, suffix):
    arrays = _arrays()
    path = tmp_path / f"w{suffix}"
    np.savez(path, **arrays) if suffix == ".npz" else save_file(arrays, str(path))
    w0 = SequentialEngine(_fed(path), seed=0).init_params()[0]
    want = torch.cat([torch.from_numpy(a).reshape(-1) for a in arrays.values()])
    assert torch.equal(w0, want)
    other_seed = SequentialEngine(_fed(path), seed=9).init_params()[0]
    assert torch.equal(other_seed, want)  # the file, not the seed, decides


def test_mismatched_or_unreadable_files_name_the_key(tmp_path):
    arrays = _arrays()
    arrays.pop(next(iter(arrays)))
    np.savez(tmp_path / "short.npz", **arrays)
    with pytest.raises(mmfl.ConfigError, match=r"tasks\[0\]\.init_weights: .*shapes"):
        SequentialEngine(_fed(tmp_path / "short.npz"), seed=0)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(mmfl.ConfigError, match=r"tasks\[0\]\.init_weights: cannot read"):
        SequentialEngine(_fed(tmp_path / "bad.npz"), seed=0)
