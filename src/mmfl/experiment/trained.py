"""The trained models back: each task's final weights as a plain ``state_dict`` file, and
:func:`load_model` / :func:`load_data` to use them.

A completed run writes ``models/<task>.safetensors``: the model's ``state_dict`` under its
standard parameter names (the user's own module, without mmfl's log-softmax wrapper of
:mod:`mmfl.tasks.losses`), readable with safetensors and torch alone, e.g.::

    from safetensors.torch import load_file
    model = MyNet()
    model.load_state_dict(load_file("runs/demo/models/fmnist.safetensors"))

Its metadata names the model, its options, input shape, classes, loss and round, which is what
:func:`load_model` builds the module from (the model must be registered in the session, as it
was for the run). With ``[logging] keep_models = k`` the run also keeps the weights after every
k-th round R (R = k, 2k, ...) as ``models/<task>.round<R>.safetensors``, the same format;
``load_model(run, task, round=R)`` loads that file, the final one or the checkpoint's weights
when one of them is of round R. A resumed run first deletes the kept files of rounds after its
checkpoint (it writes them again, identical, as it redoes those rounds). :func:`load_data` rebuilds a task's test (or train) split exactly as the
engines evaluated on it, input scaling included.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils import vector_to_parameters

from mmfl.tasks.buffers import vector_to_buffers

from mmfl.errors import ResultsError
from mmfl.experiment import tomlio

__all__ = ["FOLDER", "drop_kept_after", "kept_rounds", "load_data", "load_model",
           "write_models"]

FOLDER = "models"
FORMAT = "mmfl-model-1"


def _plain_module(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside mmfl's loss wrapper (itself otherwise)."""
    from mmfl.tasks.losses import LogSoftmaxOutput

    return model.inner if isinstance(model, LogSoftmaxOutput) else model


def kept_name(task: str, round_: int) -> str:
    """File name (in :data:`FOLDER`) of ``task``'s weights kept after round ``round_``."""
    return f"{task}.round{int(round_)}.safetensors"


def kept_rounds(run_dir: str | Path, task: str) -> list[int]:
    """The rounds R whose ``models/<task>.round<R>.safetensors`` the run kept, sorted."""
    folder, head = Path(run_dir) / FOLDER, f"{task}.round"
    if not folder.is_dir():
        return []
    rounds = (p.name[len(head):-len(".safetensors")] for p in folder.glob("*.safetensors")
              if p.name.startswith(head))
    return sorted(int(r) for r in rounds if r.isdigit())


def drop_kept_after(out: Path, round_: int) -> None:
    """Delete every task's kept weights of rounds after ``round_`` (a resumed run redoes
    those rounds, so no file outlives the checkpoint it resumes from)."""
    folder = out / FOLDER
    for p in folder.glob("*.round*.safetensors") if folder.is_dir() else ():
        r = p.name.removesuffix(".safetensors").rpartition(".round")[2]
        if r.isdigit() and int(r) > round_:
            p.unlink()


def write_models(out: Path, federation, engine, params, round_: int, *,
                 kept: bool = False) -> None:
    """Write ``models/<task>.safetensors`` (or, ``kept``, ``models/<task>.round<R>.
    safetensors`` with R = ``round_``) of every task from the engine's modules, ``params`` (S,)
    the flat global weights after ``round_`` rounds and the server's buffers."""
    from safetensors.torch import save_file

    from mmfl.tasks.losses import LogSoftmaxOutput

    folder = out / FOLDER
    folder.mkdir(exist_ok=True)
    for s, (td, model, flat) in enumerate(zip(federation.tasks, engine.models, params)):
        spec, ds = td.spec, td.dataset
        copy_ = copy.deepcopy(model).cpu()  # the file holds CPU tensors, whatever the device
        vector_to_parameters(flat.detach().clone(), copy_.parameters())
        if engine.has_buffers(s):
            vector_to_buffers(engine.buffers[s], copy_)
        state = {k: v.detach().contiguous() for k, v in _plain_module(copy_).state_dict().items()}
        meta = {"format": FORMAT, "task": spec.name, "model": spec.model,
                "model_options": json.dumps(dict(spec.model_options), sort_keys=True),
                "input_shape": json.dumps([int(d) for d in ds.input_shape]),
                "num_classes": str(int(ds.num_classes)), "round": str(int(round_)),
                "loss": ("mse" if getattr(engine, "is_regression", lambda s: False)(s)
                         else "cross_entropy"
                         if isinstance(model, LogSoftmaxOutput) else "nll")}
        name = kept_name(spec.name, round_) if kept else f"{spec.name}.safetensors"
        tmp = folder / f"{name}.tmp"
        save_file(state, str(tmp), metadata=meta)
        tmp.replace(folder / name)


def load_model(run_dir: str | Path, task: str, *, round: int | None = None) -> torch.nn.Module:
    """Task ``task``'s trained model of the run in ``run_dir``, in eval mode: the final one, or
    with ``round`` = R the weights after round R, where the run kept them: its
    ``models/<task>.round<R>.safetensors`` (``[logging] keep_models``), the final file or the
    checkpoint when either is of round R; otherwise a ResultsError listing the rounds there
    are. The module is the registered model as written (a logits model returns logits, mmfl's
    own models log-probabilities); its ``argmax`` over :func:`load_data`'s inputs gives the
    accuracy the run reported for that round."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mmfl.tasks.models import build_model

    run_dir = Path(run_dir)
    path = run_dir / FOLDER / f"{task}.safetensors"
    if not path.exists():
        known = sorted(p.name.removesuffix(".safetensors") for p in (run_dir / FOLDER).glob(
            "*.safetensors")) if (run_dir / FOLDER).is_dir() else []
        raise ResultsError(f"{path}: no such model file (tasks with one: "
                           f"{', '.join(known) or 'none; the run has not completed'})")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ResultsError(f"{path}: not an mmfl model file")
    model = build_model(meta["model"], json.loads(meta["model_options"]),
                        tuple(json.loads(meta["input_shape"])), int(meta["num_classes"]), 0)
    kept = run_dir / FOLDER / kept_name(task, round) if round is not None else path
    if round is None or round == int(meta["round"]):
        model.load_state_dict(load_file(str(path)))
    elif kept.is_file():
        model.load_state_dict(load_file(str(kept)))
    else:
        _load_checkpoint_round(model, run_dir, task, round, int(meta["round"]))
    return model.eval()


def _load_checkpoint_round(model: torch.nn.Module, run_dir: Path, task: str, round_: int,
                           final: int):
    """The checkpoint's weights and buffers of ``task`` into ``model`` when the checkpoint is
    of round ``round_``; else a ResultsError listing the rounds kept (``final``: the final
    file's round)."""
    from mmfl.experiment import checkpoint
    from mmfl.experiment.rundir import CHECKPOINT
    from mmfl.tasks.buffers import float_buffers

    names = list(tomlio.load(run_dir / "config.toml").get("tasks", []))
    s = next((k for k, t in enumerate(names) if t.get("name") == task), None)
    arrays, meta = checkpoint.load(run_dir / CHECKPOINT) if (run_dir / CHECKPOINT).is_file() \
        else ({}, {})
    at = int(meta.get("round", -1))
    if s is None or at != round_:
        there = sorted({*kept_rounds(run_dir, task), final, *([at] if at >= 0 else [])})
        raise ResultsError(f"{run_dir}: the weights of {task} after round {round_} are not "
                           f"kept (rounds kept: {', '.join(map(str, there))}; keep more with "
                           "[logging] keep_models)")
    vector_to_parameters(torch.from_numpy(np.array(arrays[f"param.{s}"])), model.parameters())
    if f"engine.buffers.{s}" in arrays and float_buffers(model):
        vector_to_buffers(torch.from_numpy(np.array(arrays[f"engine.buffers.{s}"])), model)


def load_data(run_dir: str | Path, task: str, split: str = "test", *,
              data_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of ``task``'s ``split`` ("test" or "train") exactly as the run's engines
    used them: float32 inputs (N, *input_shape) after mmfl's preprocessing, int64 labels (N,)
    (a regression task: float32 targets (N,) or (N, k))."""
    from mmfl.experiment.config import config_from_dict, resolve_data_dir
    from mmfl.experiment.federation import task_dataset

    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    cfg = config_from_dict(tomlio.load(Path(run_dir) / "config.toml"))
    names = [t.name for t in cfg.tasks]
    if task not in names:
        raise ResultsError(f"{run_dir}: no task {task!r} (tasks: {', '.join(names)})")
    ds = task_dataset(cfg, names.index(task),
                      resolve_data_dir(cfg, None if data_dir is None else str(data_dir)))
    x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
    target = np.float32 if ds.regression else np.int64
    return (torch.from_numpy(np.array(x, dtype=np.float32)),
            torch.from_numpy(np.array(y, dtype=target)))
