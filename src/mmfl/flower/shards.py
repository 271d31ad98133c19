"""Client shards: one ``.npz`` file per mmfl client holding only that client's training data.

A Flower ClientApp (:mod:`mmfl.flower.client`) trains from its client's shard and nothing else;
in deployment each SuperNode is given the absolute path of its shard (node config
``data-file``), in simulation the shards of a run are written to a temporary folder
(:mod:`mmfl.flower.simulation`). The server still builds the whole federation from the config
(test sets for evaluation, the population n_{i,s} and B_i for the allocator); the shards are
what the clients see.

Layout of ``client-<i>.npz`` (plain numpy arrays, no pickle; loading one costs milliseconds):

* ``meta``: a 0-d unicode array with a JSON document: ``format`` (``mmfl-shard-1``), ``client``
  (i), ``num_clients`` (N) and ``tasks``: per task s (all S tasks, in config order) ``name``, ``model``, ``model_options``,
  ``input_shape``, ``num_classes``, ``lr``, ``local_epochs``, ``batch_size`` and ``n`` (n_{i,s},
  0 when the client does not hold the task), and ``class_mask`` only when it is not ``"none"``
  (so shards of configs without class masking are unchanged).
* ``x<s>``: (n_{i,s}, *input_shape) the client's training inputs of task s, in the order of its
  index array ``client_indices[i]`` (dtype of the dataset).
* ``y<s>``: (n_{i,s},) int64 labels.

Identity. :func:`fingerprint` is what the server knows about a shard: its n_{i,s} and the
SHA-256 of the file. ``mmfl flower-local`` writes the fingerprints of all shards (and, with
``--auth``, each node's public-key digest) into an identity file (:func:`write_identity`)
that the ServerApp reads; a node whose discovery reply disagrees with it is refused
(:mod:`mmfl.flower.server`). Training hyperparameters in ``meta`` are informative only: the
ClientApp trains with what the server's messages say.

Keeping the samples in index order makes the client's local batches those of the ``sequential``
engine: :func:`mmfl.engines.sequential.local_batches` shuffles positions ``0..n-1`` with the same
stream, and ``x<s>[perm] == x_train[indices[perm]]``. The experiment seed (which derives that
stream) and the round come with every train message, so a shard does not depend on them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmfl.errors import DataError
from mmfl.tasks.spec import TrainingSpec

FORMAT = "mmfl-shard-1"
IDENTITY_FORMAT = "mmfl-identity-1"


@dataclass(frozen=True)
class TaskShard:
    """One task as one client sees it.

    Attributes:
        spec: how the task's model trains (its ``index`` is s, the position in the config).
        input_shape: shape of one input sample; num_classes: K.
        x: (n, *input_shape) training inputs; y: (n,) int64 labels.
    """

    spec: TrainingSpec
    input_shape: tuple[int, ...]
    num_classes: int
    x: np.ndarray
    y: np.ndarray

    @property
    def num_samples(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Shard:
    """A loaded client shard: client i, N, and its S tasks in config order."""

    client: int
    num_clients: int
    tasks: tuple[TaskShard, ...]

    @property
    def n_samples(self) -> np.ndarray:
        """(S,) int n_{i,s} of this client."""
        return np.array([t.num_samples for t in self.tasks], dtype=np.int64)


def shard_name(client: int) -> str:
    """File name of client ``client``'s shard inside a shard folder."""
    return f"client-{int(client)}.npz"


def shard_federation(cfg, federation):
    """The federation whose shards the nodes hold: ``federation`` without the data of the
    pairs its clients refuse (``clients.preferences`` with willingness 0; the population the
    server checks the nodes' claims against has n_{i,s} = 0 there,
    :meth:`mmfl.experiment.preferences.Preferences.restrict`); ``federation`` itself without
    refusals. The runner still takes ``federation`` (it draws the preferences from it)."""
    from mmfl.experiment.preferences import Preferences

    return Preferences.from_config(cfg, federation.population).restrict(federation)


def write_shards(federation, folder: str | Path) -> list[Path]:
    """Write one shard per client of ``federation`` (a
    :class:`~mmfl.experiment.federation.Federation`) into ``folder`` (created if missing);
    returns the N absolute paths, path i being client i's (``folder/client-<i>.npz``).

    Every shard lists all S tasks; a task the client does not hold, or holds with n_{i,s} = 0
    in the population (a refused pair, :func:`shard_federation`), has n = 0 samples.
    """
    folder = Path(folder).resolve()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    pop = federation.population
    specs = []
    for td in federation.tasks:
        cfg, ds = td.spec, td.dataset
        specs.append({
            "name": cfg.name, "model": cfg.model, "model_options": dict(cfg.model_options),
            "input_shape": [int(d) for d in ds.input_shape], "num_classes": int(ds.num_classes),
            "lr": float(cfg.lr), "local_epochs": int(cfg.local_epochs),
            "batch_size": int(cfg.batch_size),
        })
        mask = cfg.class_mask
        if mask != "none":
            specs[-1]["class_mask"] = mask
    paths = []
    for i in range(pop.num_clients):
        arrays: dict[str, np.ndarray] = {}
        tasks = []
        for s, td in enumerate(federation.tasks):
            idx = td.client_indices[i] if pop.n_samples[i, s] else td.client_indices[i][:0]
            arrays[f"x{s}"] = np.ascontiguousarray(td.dataset.x_train[idx])
            arrays[f"y{s}"] = np.ascontiguousarray(td.dataset.y_train[idx], dtype=np.int64)
            tasks.append({**specs[s], "n": len(idx)})
        meta = {"format": FORMAT, "client": i,
                "num_clients": int(pop.num_clients), "tasks": tasks}
        path = folder / shard_name(i)
        tmp = path.with_suffix(".tmp.npz")
        # private from the first byte (0600): a shard is one client's training data
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
        tmp.replace(path)  # a reader never sees half a file
        paths.append(path)
    return paths


def load_shard(path: str | Path) -> Shard:
    """Read a shard written by :func:`write_shards`. A missing or malformed file is a
    one-line :class:`~mmfl.errors.DataError` naming it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != FORMAT:
                raise DataError(f"{path}: not an mmfl client shard (format "
                                f"{meta.get('format')!r}, expected {FORMAT!r})")
            tasks = []
            for s, t in enumerate(meta["tasks"]):
                x, y = z[f"x{s}"], z[f"y{s}"]
                if len(x) != t["n"] or len(y) != t["n"]:
                    raise DataError(f"{path}: task {t['name']} holds {len(y)} samples, its "
                                    f"header says {t['n']}")
                spec = TrainingSpec(
                    name=t["name"], model=t["model"], lr=float(t["lr"]),
                    local_epochs=int(t["local_epochs"]), batch_size=int(t["batch_size"]),
                    model_options=dict(t["model_options"]),
                    class_mask=str(t.get("class_mask", "none")), index=s)
                tasks.append(TaskShard(spec, tuple(t["input_shape"]), int(t["num_classes"]),
                                       x, y))
    except FileNotFoundError:
        raise DataError(f"{path}: client shard not found (write it with "
                        "mmfl.flower.shards.write_shards)") from None
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: unreadable client shard ({type(e).__name__}: {e})") from None
    return Shard(int(meta["client"]), int(meta["num_clients"]), tuple(tasks))


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def fingerprint(path: str | Path) -> dict:
    """What the server knows of a shard: ``client``, ``n`` (n_{i,s} per task) and ``sha256``
    of the file. A node claiming client i must report the same ``n`` and ``sha256``."""
    shard = load_shard(path)
    return {"client": shard.client, "n": shard.n_samples.tolist(),
            "sha256": file_sha256(path)}


def write_identity(paths, file: str | Path, keys: dict[int, str] | None = None) -> dict:
    """Write the identity file of a deployment (mode 0600): per client i the fingerprint of
    shard ``paths[i]`` and, when ``keys`` gives one, ``key`` = the SHA-256 of its SuperNode's
    public key (:func:`mmfl.flower.certs.public_key_digest`). Returns the document."""
    clients = []
    for i, p in enumerate(paths):
        fp = fingerprint(p)
        if fp["client"] != i:
            raise DataError(f"{p}: holds client {fp['client']}'s shard, expected client {i}")
        if keys and keys.get(i):
            fp["key"] = keys[i]
        clients.append(fp)
    doc = {"format": IDENTITY_FORMAT, "clients": clients}
    file = Path(file)
    tmp = file.with_name(file.name + ".tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w",
                   encoding="utf-8") as f:
        f.write(json.dumps(doc, indent=1) + "\n")
    tmp.replace(file)
    return doc


def load_identity(file: str | Path) -> dict[int, dict]:
    """Client i -> its fingerprint (``n``, ``sha256``, optional ``key``) from an identity file;
    a missing or malformed file is a one-line DataError."""
    try:
        doc = json.loads(Path(file).read_text(encoding="utf-8"))
        if doc.get("format") != IDENTITY_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {IDENTITY_FORMAT!r}")
        return {int(c["client"]): {"n": [int(x) for x in c["n"]], "sha256": str(c["sha256"]),
                                   **({"key": str(c["key"])} if c.get("key") else {})}
                for c in doc["clients"]}
    except FileNotFoundError:
        raise DataError(f"{file}: identity file not found") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{file}: unreadable identity file ({e})") from None
