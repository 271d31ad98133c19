"""Flower ServerApp: FedAvg over precomputed per-round client lists.

:func:`make_server_app` returns a ServerApp whose main loop writes what it measured into the
``results`` dict it is given (``run_simulation`` runs the ServerApp in a thread of the calling
process, so the caller reads it after the simulation returns).
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

NODE_WAIT_S = 120.0
REPLY_TIMEOUT_S = 600.0


def _check(replies: list[Message], expected: int, what: str) -> None:
    for rep in replies:
        if rep.has_error():
            raise RuntimeError(f"{what}: error reply (code {rep.error.code}): {rep.error.reason}")
    if len(replies) != expected:
        raise RuntimeError(f"{what}: {len(replies)} of {expected} replies before the timeout")


def fedavg(models: list[list[np.ndarray]], n: np.ndarray) -> list[np.ndarray]:
    """sum_k (n_k / sum n) w_k per parameter array (accumulated in float64, returned float32)."""
    a = np.asarray(n, np.float64) / float(np.sum(n))
    return [sum(ak * m[j].astype(np.float64) for ak, m in zip(a, models)).astype(np.float32)
            for j in range(len(models[0]))]


def make_server_app(spec: str, rounds: list[list[int]], init: list[np.ndarray],
                    num_nodes: int, results: dict, t_start: float) -> ServerApp:
    """ServerApp for ``len(rounds)`` FedAvg rounds; round t trains the clients ``rounds[t]``.

    ``results`` receives: ``startup_s`` (``t_start`` to the end of node discovery and the
    warm-up query), ``round_s`` (list, one per round: send, wait for all replies, aggregate),
    ``client_train_s`` (per round, the sum of the clients' own training time), ``final`` (the
    final parameter arrays), ``end`` (perf_counter at the end of the main loop), or ``error``.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            _main(grid)
        except BaseException as e:  # reported by the caller; run_simulation would hide it
            results["error"] = e
        results["end"] = time.perf_counter()

    def _main(grid: Grid) -> None:
        deadline = time.perf_counter() + NODE_WAIT_S
        while len(node_ids := list(grid.get_node_ids())) < num_nodes:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"only {len(node_ids)} of {num_nodes} nodes after "
                                   f"{NODE_WAIT_S:.0f} s")
            time.sleep(0.05)
        # start-up: which node is which mmfl client (and warm every actor's cache)
        msgs = [Message(RecordDict({"config": ConfigRecord({"spec": spec})}), dst_node_id=nid,
                        message_type="query") for nid in node_ids]
        replies = list(grid.send_and_receive(msgs, timeout=REPLY_TIMEOUT_S))
        _check(replies, len(msgs), "query")
        node_of = {int(r.content["metrics"]["partition-id"]): r.metadata.src_node_id
                   for r in replies}
        results["startup_s"] = time.perf_counter() - t_start
        arrays = [a.copy() for a in init]
        results["round_s"], results["client_train_s"], results["train_loss"] = [], [], []
        for t, clients in enumerate(rounds):
            t0 = time.perf_counter()
            record = ArrayRecord(arrays)
            msgs = [Message(RecordDict({"arrays": record,
                                        "config": ConfigRecord({"spec": spec, "round": t})}),
                            dst_node_id=node_of[i], message_type="train", group_id=str(t))
                    for i in clients]
            replies = list(grid.send_and_receive(msgs, timeout=REPLY_TIMEOUT_S))
            _check(replies, len(msgs), f"round {t + 1}")
            replies.sort(key=lambda r: int(r.content["metrics"]["partition-id"]))
            n = np.array([int(r.content["metrics"]["num-examples"]) for r in replies])
            arrays = fedavg([r.content["arrays"].to_numpy_ndarrays() for r in replies], n)
            results["round_s"].append(time.perf_counter() - t0)
            results["client_train_s"].append(
                sum(float(r.content["metrics"]["train-seconds"]) for r in replies))
            results["train_loss"].append(
                float(np.average([float(r.content["metrics"]["train-loss"]) for r in replies],
                                 weights=n)))
        results["final"] = arrays

    return app
