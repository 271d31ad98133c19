"""Helpers shared by the tests (importable as ``testkit``; tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY = """
name = "tiny"
seed = 3
rounds = {rounds}
engine = "sequential"

[clients]
count = 16
active_rate = 0.3
processors = {{ 1 = 0.5, 2 = 0.5 }}
tasks_per_client = {{ 1 = 0.5, 2 = 0.5 }}

[sampler]
name = "{sampler}"

[[tasks]]
name = "digits"
dataset = "digits"
model = "mlp"
lr = 0.1
local_epochs = 1
batch_size = 16
[tasks.partition]
kind = "classes"
class_ratio = 0.3

[[tasks]]
name = "wave"
dataset = "mnist1d"
model = "logreg"
lr = 0.1
local_epochs = 1
batch_size = 32
[tasks.dataset_options]
num_samples = 1200
[tasks.partition]
kind = "dirichlet"
alpha = 0.5
"""


def tiny_config_text(rounds: int = 4, sampler: str = "random") -> str:
    return TINY.format(rounds=rounds, sampler=sampler)


def run_cli(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m mmfl.cli ARGS`` in a subprocess; returns the completed process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "mmfl.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)


def idx_bytes(a, code: int = 0x08) -> bytes:
    """The idx-format bytes of array ``a`` (type code 0x08 = uint8, 0x0D = float32, ...)."""
    import struct

    import numpy as np

    from mmfl.tasks.datasets import IDX_DTYPES

    header = bytes([0, 0, code, a.ndim]) + b"".join(struct.pack(">I", d) for d in a.shape)
    return header + np.ascontiguousarray(a, dtype=IDX_DTYPES[code]).tobytes()


def write_file(path: Path, raw: bytes) -> Path:
    """Write ``raw`` to ``path`` (gzipped when the name ends in .gz), creating folders."""
    import gzip

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


def default_sigint() -> None:
    """``preexec_fn`` for a child that a test interrupts with SIGINT: a shell that runs the test
    suite in the background (``cmd &``) starts it with SIGINT ignored, and the child would
    inherit that; restore the default so that Python raises KeyboardInterrupt there."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


# -- engine conformance --------------------------------------------------------------------------

#: metrics.csv columns two runs with the same assignments must share exactly
ASSIGNMENT_COLUMNS = ("round", "task", "clients", "slots", "local_trainings", "local_steps")


def assert_metrics_match(rows_a, rows_b, tol: float) -> None:
    """metrics.csv rows of two runs (csv.DictReader rows, same order): the assignment columns
    equal, accuracy / loss / train_loss blank in the same rows and within ``tol`` elsewhere."""
    for x, y in zip(rows_a, rows_b):
        for col in ASSIGNMENT_COLUMNS:
            assert x[col] == y[col], (col, x, y)
        for col in ("accuracy", "loss", "train_loss"):
            assert (x[col] == "") == (y[col] == ""), (col, x, y)
            if x[col]:
                assert abs(float(x[col]) - float(y[col])) <= tol, (col, x, y)


# -- Monte-Carlo checks --------------------------------------------------------------------------

def assert_mean_within(samples, target, *, k: float = 4.0) -> None:
    """The mean of ``samples`` over axis 0 ((reps, ...) draws of an estimator) lies within ``k``
    standard errors of ``target`` in every coordinate (an unbiasedness check)."""
    import numpy as np

    samples = np.asarray(samples, dtype=np.float64)
    mean = samples.mean(axis=0)
    se = samples.std(axis=0, ddof=1) / np.sqrt(samples.shape[0])
    assert np.all(np.abs(mean - target) <= k * se + 1e-12), (mean, target, se)


def assert_frequency_within(counts, reps: int, p, *, k: float = 4.0) -> None:
    """Observed frequencies ``counts / reps`` of events with probabilities ``p`` lie within ``k``
    binomial standard errors of ``p`` (an inclusion-probability check)."""
    import numpy as np

    p = np.asarray(p, dtype=np.float64)
    se = np.sqrt(p * (1 - p) / reps)
    freq = np.asarray(counts, dtype=np.float64) / reps
    assert np.all(np.abs(freq - p) <= k * se + 1e-12), (freq, p, se)


def tampered_shard(path: Path, dest: Path, *, shift_labels=False, lr=None, drop=0) -> Path:
    """A copy of Flower shard ``path`` at ``dest``: labels shifted by one, every task's
    metadata lr replaced, and/or the last ``drop`` samples of every held task dropped (a rogue
    node's data in the Flower tests)."""
    import json

    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("meta")))
    for s, t in enumerate(meta["tasks"]):
        if lr is not None:
            t["lr"] = lr
        if shift_labels:
            arrays[f"y{s}"] = (arrays[f"y{s}"] + 1) % 10
        if drop and t["n"] > drop:
            arrays[f"x{s}"], arrays[f"y{s}"] = arrays[f"x{s}"][:-drop], arrays[f"y{s}"][:-drop]
            t["n"] -= drop
    dest.parent.mkdir(parents=True, exist_ok=True)
    np.savez(dest, meta=np.array(json.dumps(meta)), **arrays)
    return dest
