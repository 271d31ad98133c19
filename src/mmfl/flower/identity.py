"""Who a Flower node is: checking a node's claim to be client i, and recording refusals.

A node says which client it is in its ``query.discover`` reply (:mod:`mmfl.flower.messages`).
:class:`Claims` checks that against what the server knows: the federation's n_{i,s}, the
shard fingerprints of the identity file (:func:`mmfl.flower.shards.write_identity`) and, under
SuperNode authentication, the public key Flower registered for the node (``NodeInfo.
public_key``, which Flower 1.42 shows the ServerApp through ``grid.get_nodes()``).
:class:`RejectionLog` writes every refused node and rejected reply to the log and to the run's
``flower/rejected.jsonl``. The policy that uses both (second claims, liveness) is the engine's
(:class:`mmfl.flower.server.FlowerEngine`).
"""

from __future__ import annotations

import datetime as _dt
import logging

import numpy as np

from mmfl.flower.workdir import append_record

log = logging.getLogger(__name__)

#: File name (under ``OUT/flower/``) of the refused nodes and rejected replies.
REJECTED = "rejected.jsonl"


class Claims:
    """Checks discovery replies against the server's knowledge.

    Args:
        population: the federation's population (``num_clients``, ``num_tasks``,
            ``n_samples``).
        identity_file: the identity file ("" = check n_{i,s} only).
    """

    def __init__(self, population, identity_file: str = ""):
        self.population = population
        self.identity: dict[int, dict] = {}
        if identity_file:
            from mmfl.flower.shards import load_identity

            self.identity = load_identity(identity_file)

    @property
    def keyed(self) -> bool:
        """Whether some client is bound to a public key (then :func:`node_keys` is needed)."""
        return any("key" in f for f in self.identity.values())

    def check(self, nid: int, reply, keys: dict[int, str]) -> tuple[int | None, str]:
        """(claimed client, why the claim of node ``nid`` is refused, or "") for its discovery
        reply; ``keys``: node id -> registered key digest (:func:`node_keys`)."""
        pop = self.population
        try:
            met = reply.content["metrics"]
            client = int(met["client"])
            n = np.asarray(met["n-samples"], np.int64)
            conf = reply.content["config"] if "config" in reply.content else {}
            sha = str(conf.get("sha256", ""))
        except (KeyError, TypeError, ValueError) as e:
            return None, f"malformed discovery reply ({type(e).__name__}: {e})"
        if not 0 <= client < pop.num_clients:
            return client, f"claims client {client}, but the federation has {pop.num_clients}"
        if n.shape != (pop.num_tasks,) or not np.array_equal(n, pop.n_samples[client]):
            return client, (f"its shard holds n = {n.tolist()} samples per task, the server's "
                            f"federation {pop.n_samples[client].tolist()} (shard of another "
                            f"config, or not client {client}'s)")
        if not self.identity:
            return client, ""
        fp = self.identity.get(client)
        if fp is None:
            return client, f"client {client} has no fingerprint in the identity file"
        if sha != fp["sha256"]:
            return client, (f"its shard's sha256 {sha[:12] or '(none)'}... differs from client "
                            f"{client}'s fingerprint {fp['sha256'][:12]}...")
        if "key" in fp and keys.get(nid) != fp["key"]:
            return client, (f"its public key {keys[nid][:12] if nid in keys else '(none)'}... "
                            f"is not the key registered for client {client}")
        return client, ""


def node_keys(grid) -> dict[int, str]:
    """node id -> digest of its registered public key, for the nodes whose key Flower shows
    (``grid.get_nodes()``; only nodes registered under SuperNode authentication have one)."""
    from mmfl.flower.certs import public_key_digest

    out = {}
    for info in getattr(grid, "get_nodes", lambda: ())():
        key = bytes(getattr(info, "public_key", b"") or b"")
        if key:
            try:
                out[int(info.node_id)] = public_key_digest(key)
            except (ValueError, TypeError):
                continue
    return out


class RejectionLog:
    """Logs refused nodes and rejected replies and appends them, one JSON object per line
    (``time``, ``round``, ``node``, ``what``, ``client``, ``reason``), to ``path`` (created
    0600 on the first record; "" = the log only)."""

    def __init__(self, path: str = ""):
        self.path = path

    def record(self, node: int, what: str, client: int | None, reason: str,
               round: int) -> None:
        log.warning("flower: rejected %s from node %s (client %s): %s", what, node, client,
                    reason)
        if not self.path:
            return
        rec = {"time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "round": round,
               "node": int(node), "what": what, "client": client, "reason": reason}
        try:
            append_record(self.path, rec)
        except OSError as e:
            log.warning("flower: cannot record the rejection in %s (%s)", self.path, e)
