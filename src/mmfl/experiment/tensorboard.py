"""Watching a run in TensorBoard (``[logging] tensorboard = "DIR"``, ``mmfl run --tensorboard
DIR``): a :class:`~mmfl.experiment.recording.Callback` that writes each round's numbers as
scalars, step = the round, into event files under DIR.

Tags: ``accuracy/<task>``, ``loss/<task>`` (rounds that were evaluated), ``accuracy/mean`` and
``accuracy/worst``, ``train_loss/<task>``, ``clients/<task>`` (pairs aggregated),
``cost/<counter>`` (the round's local trainings, forward passes, scalar and model uploads, local
steps), ``sim_time`` (cumulative: the x axis of an accuracy-against-time view) and
``seconds/round``. A resumed run appends to the same folder. Needs the
``tensorboard`` package (the ``logging`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmfl.errors import ConfigError

__all__ = ["TensorBoardCallback"]


class TensorBoardCallback:
    """Writes a run's rounds to TensorBoard event files under ``log_dir``."""

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir).expanduser()
        self._writer = None

    def on_start(self, cfg, federation, start_round: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("logging.tensorboard", "needs the tensorboard package: pip install "
                              "'mmfl[logging]'", str(self.log_dir)) from None
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=start_round + 1
                                     if start_round else None)

    def on_round(self, r) -> None:
        w, step = self._writer, r.round
        if w is None:
            return
        if r.accuracy is not None:
            for name, acc, loss in zip(r.task_names, r.accuracy, r.loss):
                w.add_scalar(f"accuracy/{name}", float(acc), step)
                w.add_scalar(f"loss/{name}", float(loss), step)
            w.add_scalar("accuracy/mean", float(sum(r.accuracy) / len(r.accuracy)), step)
            w.add_scalar("accuracy/worst", float(min(r.accuracy)), step)
        for t in r.tasks:
            w.add_scalar(f"clients/{t.task}", t.clients, step)
            if t.train_loss is not None:
                w.add_scalar(f"train_loss/{t.task}", float(t.train_loss), step)
        for key, value in {**r.cost.as_dict(), "local_steps": r.local_steps}.items():
            w.add_scalar(f"cost/{key}", int(value), step)
        w.add_scalar("sim_time", float(r.sim_time), step)
        w.add_scalar("seconds/round", float(r.seconds), step)
        w.flush()

    def on_end(self, summary: dict[str, Any]) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
