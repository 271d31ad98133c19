"""Splitting datasets across clients: who holds which task, and which samples.

Two steps, both driven by an explicit ``rng``:

1. :func:`task_membership` decides which of the S tasks each of the N clients holds (the
   client-model membership matrix of docs/algorithms.md section 1), covering every task.
2. :func:`partition` splits one task's training set among the clients that hold it
   ("holders"). Clients hold sorted index arrays into the dataset's train arrays, never copies.

Partition kinds (options in :data:`PARTITION_OPTIONS`):

- ``iid``: shuffle and split into equal parts (sizes differ by at most 1).
- ``dirichlet``: per class, proportions ~ Dirichlet(alpha * 1_h) (label skew; small alpha = skewed).
- ``classes``: each holder gets c = max(1, floor(class_ratio * K)) distinct classes (the papers'
  label skew): a random permutation of the K classes laid out in a cycle, holder j taking the c
  classes from position j * c (mod K), so with h * c >= K every class is held by some holder and
  classes are held about equally often. Each class is split equally among its holders.
- ``natural``: the dataset's own groups (e.g. ``synthetic`` devices) mapped onto holders.
- ``class_ranges``: the authors' non-IID rule (their ``dataset.noniid``), see
  :func:`class_ranges_partition`: per-client sample counts drawn from ranges for groups of
  clients, classes chosen greedily by the most samples left, samples taken in dataset order.

Two readings of "90% of the clients get 10% of the data": ``skew_clients = 0.9, skew_data =
0.1`` (``iid``, ``classes``) gives the data-poor 90% of the holders 10% of the samples in all;
the authors' ``--unbalance 0.9 0.1`` scales the per-client range of the first 90% of clients by
0.1 (``class_ranges`` with ``sample_ranges = [[0.9, 9, 15], [0.1, 90, 150]]``), so the poor
90% hold about 47% of the samples and the rich 10% about 53%.

Quantity skew (``iid`` and ``classes``): a fraction ``skew_clients`` of the holders, drawn by
``rng``, share only a fraction ``skew_data`` of the samples (the papers: 90% of the clients get
10% of the data); the other holders share the rest. In ``classes`` the per-class splits are
fitted so that the holders' totals follow the skew (see :func:`_class_shares`).

Empty holders: every holder gets at least one sample whenever the task has at least as many
samples as holders (``natural``: at least as many groups). Otherwise some holders get an empty
array, which means that client simply does not hold the task (n_{i,s} = 0).
"""

from __future__ import annotations

import heapq
import logging
from typing import Any

import numpy as np

from mmfl.registry import Option

log = logging.getLogger(__name__)

__all__ = ["PARTITION_KINDS", "PARTITION_OPTIONS", "partition", "partition_summary",
           "split_counts", "task_membership"]

_SKEW_OPTIONS = {
    "skew_clients": Option(float, 0.0, "0..1", "fraction of holders in the data-poor group "
                           "(0 = no quantity skew)"),
    "skew_data": Option(float, 0.0, "0..1", "fraction of the samples the data-poor group shares"),
}

#: Options of each partition kind, for validating a ``[tasks.partition]`` table.
PARTITION_OPTIONS: dict[str, dict[str, Option]] = {
    "iid": dict(_SKEW_OPTIONS),
    "dirichlet": {
        "alpha": Option(float, 0.5, "> 0", "Dirichlet concentration; small = strong label skew"),
    },
    "classes": {
        "class_ratio": Option(float, 0.3, "(0..1]",
                              "each client holds max(1, floor(class_ratio * K)) classes"),
        **_SKEW_OPTIONS,
    },
    "natural": {},
    "class_ranges": {
        "class_ratio": Option(float, 0.3, "(0..1]",
                              "each client holds int(class_ratio * K) classes (at least 1)"),
        "sample_ranges": Option(
            "table", ((1.0, 90, 150),), "",
            "[[fraction, min, max], ...]: the first fraction of ALL clients (by client index) "
            "draws n_i uniformly in min..max, the next fraction the next range, ... The authors' "
            "Fashion-MNIST at data_ratio 0.3 is [[1.0, 90, 150]]; with --unbalance 0.9 0.1 it "
            "is [[0.9, 9, 15], [0.1, 90, 150]]"),
    },
}
PARTITION_KINDS = tuple(PARTITION_OPTIONS)


# --------------------------------------------------------------------------------------------
# membership


def task_membership(
    num_clients: int,
    num_tasks: int,
    tasks_per_client: int | dict[int, float],
    rng: np.random.Generator,
) -> np.ndarray:
    """Which tasks each client holds.

    Args:
        num_clients: N.
        num_tasks: S.
        tasks_per_client: k, the number of tasks every client holds, or a distribution
            {k: probability} from which each client's k is drawn. Every k must be in 1..S.
        rng: the generator.

    Returns:
        (N, S) bool membership matrix. Each client's k tasks are uniform without replacement;
        then every task nobody holds is given to a client drawn by ``rng``: the client swaps one
        of its tasks that some other client also holds for the uncovered one (so its k is kept);
        only when there are fewer holdings than tasks (sum of k < S) does a client gain a task.

    Raises:
        ValueError: k outside 1..S, bad probabilities, or N < 1 / S < 1.
    """
    N, S = int(num_clients), int(num_tasks)
    if N < 1 or S < 1:
        raise ValueError(f"need at least one client and one task (got N={N}, S={S})")
    if isinstance(tasks_per_client, dict):
        ks = np.array([int(k) for k in tasks_per_client], dtype=np.int64)
        probs = np.array([float(v) for v in tasks_per_client.values()], dtype=np.float64)
        if len(ks) == 0 or (probs < 0).any() or not np.isfinite(probs).all():
            raise ValueError("tasks per client: probabilities must be finite and >= 0")
        if abs(probs.sum() - 1.0) > 1e-6:
            raise ValueError(f"tasks per client: probabilities must sum to 1 (got {probs.sum():g})")
        k_of = rng.choice(ks, size=N, p=probs / probs.sum())
    else:
        if isinstance(tasks_per_client, bool) or int(tasks_per_client) != tasks_per_client:
            raise ValueError(f"tasks per client must be an integer (got {tasks_per_client!r})")
        ks = np.array([int(tasks_per_client)])
        k_of = np.full(N, int(tasks_per_client), np.int64)
    if (ks < 1).any() or (ks > S).any():
        raise ValueError(f"tasks per client must lie in 1..{S} (got {sorted(set(ks.tolist()))})")

    member = np.zeros((N, S), dtype=bool)
    for i in range(N):
        member[i, rng.choice(S, size=int(k_of[i]), replace=False)] = True

    for s in range(S):
        if member[:, s].any():
            continue
        count = member.sum(axis=0)
        # clients that can give up a task someone else also holds
        donors = np.flatnonzero((member & (count > 1)[None, :]).any(axis=1))
        if len(donors):
            i = int(rng.choice(donors))
            give = np.flatnonzero(member[i] & (count > 1))
            member[i, int(rng.choice(give))] = False
        else:
            i = int(rng.choice(np.flatnonzero(~member.all(axis=1))))
        member[i, s] = True
    return member


# --------------------------------------------------------------------------------------------
# sample partitions


def split_counts(n: int, weights: np.ndarray, min_each: int = 0) -> np.ndarray:
    """Integer counts summing to ``n``, proportional to ``weights`` (largest remainder).

    Args:
        n: total to split.
        weights: (h,) non-negative weights (normalised internally; all zero = equal).
        min_each: a minimum per part, applied only when ``n >= min_each * h`` (taken from the
            largest parts).

    Returns:
        (h,) int64 counts, sum ``n``. Deterministic (ties go to the lower index).
    """
    w = np.asarray(weights, dtype=np.float64)
    h = len(w)
    if h == 0:
        return np.zeros(0, np.int64)
    tot = w.sum()
    w = w / tot if tot > 0 else np.full(h, 1.0 / h)
    raw = w * n
    counts = np.floor(raw).astype(np.int64)
    rem = n - int(counts.sum())
    if rem > 0:
        order = np.argsort(-(raw - counts), kind="stable")
        counts[order[:rem]] += 1
    if min_each > 0 and n >= min_each * h:
        short = np.flatnonzero(counts < min_each)
        if short.size:
            _top_up(counts, short, min_each)
    return counts


def _top_up(counts: np.ndarray, short: np.ndarray, min_each: int) -> None:
    """Raise ``counts[short]`` to ``min_each`` in place, in ``short`` order, each time taking
    from the currently largest part (lowest index among equals).

    Same result as calling ``argmax(counts)`` for every unit moved, in O((h + moves) log h)
    instead of O(h * moves): a heap of (-count, index) over the parts above ``min_each`` (the
    only possible donors; a part below it only rises to ``min_each``).
    """
    heap = [(-c, j) for j, c in enumerate(counts.tolist()) if c > min_each]
    heapq.heapify(heap)
    for j in short.tolist():
        need = min_each - int(counts[j])
        while need > 0:
            neg, donor = heapq.heappop(heap)
            take = min(need, -neg - min_each)
            counts[donor] -= take
            counts[j] += take
            need -= take
            if -neg - take > min_each:
                heapq.heappush(heap, (neg + take, donor))


class _Remaining:
    """The ascending list of positions ``0..h-1`` not yet removed, with O(log h) "k-th
    remaining" (a Fenwick tree of 0/1 flags), for drawing without replacement one
    ``rng.choice`` at a time."""

    def __init__(self, present: np.ndarray) -> None:
        self.size = len(present)
        tree = [0, *np.asarray(present, np.int64).tolist()]
        self.count = sum(tree)
        for i in range(1, self.size + 1):  # O(h) build: add each node to its parent
            parent = i + (i & -i)
            if parent <= self.size:
                tree[parent] += tree[i]
        self.tree = tree
        self.top = 1 << max(self.size.bit_length() - 1, 0)

    def pop(self, k: int) -> int:
        """Remove and return the k-th (0-based) remaining position."""
        tree, pos, step = self.tree, 0, self.top
        while step:
            nxt = pos + step
            if nxt <= self.size and tree[nxt] <= k:
                pos = nxt
                k -= tree[nxt]
            step >>= 1
        i = pos + 1
        while i <= self.size:
            tree[i] -= 1
            i += i & -i
        self.count -= 1
        return pos


def _skew_weights(
    h: int, options: dict[str, Any], rng: np.random.Generator, hold: np.ndarray | None = None
) -> np.ndarray:
    """(h,) weights of each holder under quantity skew (equal when there is no skew).

    round(skew_clients * h) holders are data-poor and each get skew_data / their count; the
    other (data-rich) holders each get (1 - skew_data) / their count. The rich holders are drawn
    by ``rng``; with ``hold`` ((h, K) bool, the classes of each holder) they are drawn greedily
    so that together they hold as many distinct classes as possible (ties broken by ``rng``),
    otherwise a class held only by poor holders would go to them entirely.
    """
    sc = float(options.get("skew_clients", 0.0))
    sd = float(options.get("skew_data", 0.0))
    w = np.full(h, 1.0 / max(h, 1))
    n_poor = int(round(sc * h))
    if sc <= 0 or n_poor == 0 or n_poor >= h:
        return w
    n_rich = h - n_poor
    rich = np.zeros(h, bool)
    if hold is None:
        rich[rng.choice(h, size=n_rich, replace=False)] = True
    else:
        covered = np.zeros(hold.shape[1], bool)
        picked = 0
        while picked < n_rich:
            gain = np.where(rich, -1, (hold & ~covered[None, :]).sum(axis=1))
            if gain.max() <= 0:
                break
            j = int(rng.choice(np.flatnonzero(gain == gain.max())))
            rich[j] = True
            covered |= hold[j]
            picked += 1
        if picked < n_rich:
            # every held class is covered: all gains are 0, so each further pick is uniform
            # among the holders not yet rich (the same rng.choice over the same ascending list)
            rest = _Remaining(~rich)
            for _ in range(n_rich - picked):
                rich[rest.pop(int(rng.choice(rest.count)))] = True
    w[~rich] = sd / n_poor
    w[rich] = (1.0 - sd) / n_rich
    return w


def _class_shares(hold: np.ndarray, n_class: np.ndarray, weights: np.ndarray,
                  iterations: int = 200) -> np.ndarray:
    """(h, K) split of each class among its holders for the ``classes`` kind.

    Without quantity skew (equal ``weights``) every class is split equally among its holders.
    With skew, iterative proportional fitting finds shares supported on ``hold`` whose class
    totals are ``n_class`` and whose holder totals approach ``weights * n``, so the data-poor
    holders together get about ``skew_data`` of the samples even though each class has its own
    mix of poor and rich holders. (When a class is held only by data-poor holders they share
    all of it, so the poor fraction can exceed ``skew_data``.)
    """
    A = hold.astype(np.float64)
    if np.allclose(weights, weights[0]):
        return A
    A *= (n_class > 0)[None, :]
    target = weights / weights.sum() * n_class.sum()
    for _ in range(iterations):
        rows = A.sum(axis=1)
        A *= np.divide(target, rows, out=np.zeros_like(rows), where=rows > 0)[:, None]
        cols = A.sum(axis=0)
        A *= np.divide(n_class, cols, out=np.zeros_like(cols), where=cols > 0)[None, :]
    return A


def _fill_empty(parts: list[np.ndarray], labels: np.ndarray) -> list[np.ndarray]:
    """Give each empty part one sample from the largest part (lowest index among equals), the
    donor's last sample of its most frequent class. A heap of (-length, index) finds the
    largest part in O(log h)."""
    lens = [len(p) for p in parts]
    if sum(lens) < len(parts) or all(lens):
        return parts
    heap = [(-n, j) for j, n in enumerate(lens) if n]
    heapq.heapify(heap)
    for j in range(len(parts)):
        if lens[j]:
            continue
        neg, donor = heapq.heappop(heap)
        p = parts[donor]
        vals, cnt = np.unique(labels[p], return_counts=True)
        pos = int(np.flatnonzero(labels[p] == vals[np.argmax(cnt)])[-1])
        parts[j] = p[pos:pos + 1]
        parts[donor] = np.delete(p, pos)
        lens[j] = 1
        heapq.heappush(heap, (neg + 1, donor))
        heapq.heappush(heap, (-1, j))
    return parts


def _grouped(owner: np.ndarray, h: int) -> list[np.ndarray]:
    """h sorted index arrays: part j holds the positions where ``owner == j`` (-1 = nobody).

    One stable argsort instead of h scans; the parts are views into one (n,) array.
    """
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner[owner >= 0], minlength=h)
    ends = (np.cumsum(counts) + (len(owner) - int(counts.sum()))).tolist()
    starts = [ends[0] - int(counts[0])] + ends[:-1] if h else []
    return [order[a:b] for a, b in zip(starts, ends)]  # np.split is ~10x slower per part


def _owners_of(parts: list[np.ndarray], n: int) -> np.ndarray:
    """(n,) int64 owner of each sample (-1 = none) from disjoint parts."""
    owner = np.full(n, -1, np.int64)
    if parts:
        lens = np.fromiter(map(len, parts), np.int64, count=len(parts))
        owner[np.concatenate(parts).astype(np.int64, copy=False)] = np.repeat(
            np.arange(len(parts)), lens)
    return owner


def partition(
    labels: np.ndarray,
    holders: np.ndarray,
    kind: str,
    options: dict[str, Any],
    num_classes: int,
    rng: np.random.Generator,
    groups: np.ndarray | None = None,
    num_clients: int | None = None,
) -> list[np.ndarray]:
    """Split a training set among its holders.

    Args:
        labels: (n,) int labels in [0, num_classes) of the dataset's training samples.
        holders: (h,) int client ids holding this task (only their number h and order matter).
        kind: one of :data:`PARTITION_KINDS`.
        options: the kind's options (missing ones take the defaults of :data:`PARTITION_OPTIONS`).
        num_classes: K.
        rng: the generator.
        groups: (n,) int natural group of each sample; required by ``natural``.
        num_clients: N, all clients of the federation (``class_ranges`` draws for every client
            in index order, holders or not; default ``max(holders) + 1``).

    Returns:
        h sorted, disjoint int64 index arrays into range(n), one per holder in ``holders`` order.
        ``iid``, ``dirichlet`` and ``natural`` use every sample; ``classes`` uses every sample of
        every class held by some holder. An empty array means the holder gets no data (only when
        there are fewer samples than holders).

    Raises:
        ValueError: unknown kind, bad options, or ``natural`` without enough groups.
    """
    labels = np.asarray(labels)
    h = len(np.asarray(holders))
    n = len(labels)
    if kind not in PARTITION_OPTIONS:
        raise ValueError(f"unknown partition kind {kind!r}; kinds: {', '.join(PARTITION_KINDS)}")
    if h == 0:
        return []
    opts = {k: spec.default for k, spec in PARTITION_OPTIONS[kind].items()}
    opts.update(options or {})
    K = int(num_classes)

    if kind == "iid":
        perm = rng.permutation(n)
        counts = split_counts(n, _skew_weights(h, opts, rng), min_each=1)
        owner = np.empty(n, np.int64)
        owner[perm] = np.repeat(np.arange(h), counts)

    elif kind == "dirichlet":
        alpha = float(opts["alpha"])
        if not alpha > 0:
            raise ValueError(f"dirichlet alpha must be > 0 (got {alpha})")
        seq, own = [], []  # samples in class order, each class in its drawn order
        for c in range(K):
            idx = rng.permutation(np.flatnonzero(labels == c))
            if len(idx) == 0:
                continue
            q = rng.dirichlet(np.full(h, alpha))
            if not np.isfinite(q).all() or q.sum() <= 0:  # underflow at tiny alpha
                q = np.zeros(h)
                q[rng.integers(h)] = 1.0
            seq.append(idx)
            own.append(np.repeat(np.arange(h), split_counts(len(idx), q)))
        if seq:
            seq_all, own_all = np.concatenate(seq), np.concatenate(own)
            # each holder's samples in that order (what _fill_empty's "last" refers to)
            parts = [seq_all[g] for g in _grouped(own_all, h)]
        else:
            parts = [np.zeros(0, np.int64) for _ in range(h)]
        owner = _owners_of(_fill_empty(parts, labels), n)

    elif kind == "classes":
        ratio = float(opts["class_ratio"])
        if not 0 < ratio <= 1:
            raise ValueError(f"class_ratio must lie in (0, 1] (got {ratio})")
        c_per = max(1, int(np.floor(ratio * K + 1e-9)))
        cycle = rng.permutation(K)
        hold = np.zeros((h, K), dtype=bool)
        hold[np.repeat(np.arange(h), c_per),
             cycle[(np.arange(h)[:, None] * c_per + np.arange(c_per)[None, :]) % K].ravel()] = True
        weights = _skew_weights(h, opts, rng, hold)
        n_class = np.bincount(labels[(labels >= 0) & (labels < K)].astype(np.int64), minlength=K)
        share = _class_shares(hold, n_class, weights)
        owner = np.full(n, -1, np.int64)
        for c in range(K):
            owners = np.flatnonzero(hold[:, c])
            idx = rng.permutation(np.flatnonzero(labels == c))
            if len(owners) == 0 or len(idx) == 0:
                continue
            counts = split_counts(len(idx), share[owners, c], min_each=1)
            owner[idx] = np.repeat(owners, counts)

    elif kind == "class_ranges":
        holders = np.asarray(holders, np.int64)
        n_all = int(num_clients) if num_clients is not None else int(holders.max()) + 1
        parts = class_ranges_partition(labels, n_all, float(opts["class_ratio"]),
                                       ranges_option(opts["sample_ranges"]), K, rng)
        return [np.sort(parts[i]) for i in holders.tolist()]

    else:  # natural
        if groups is None:
            raise ValueError("partition kind 'natural' needs a dataset with natural groups "
                             "(e.g. synthetic)")
        groups = np.asarray(groups)
        if groups.shape != labels.shape:
            raise ValueError(f"groups must have shape {labels.shape} (got {groups.shape})")
        ids, rank = np.unique(groups, return_inverse=True)
        if len(ids) < h:
            raise ValueError(f"partition kind 'natural': the dataset has {len(ids)} groups but "
                             f"{h} clients hold the task; use at most {len(ids)} clients or "
                             "another kind")
        owner = (rank % h).astype(np.int64)

    return _grouped(owner, h)


def ranges_option(value: Any) -> list[tuple[float, int, int]]:
    """Validate ``sample_ranges``: [[fraction, min, max], ...], fractions summing to 1."""
    bad = ValueError("sample_ranges must be a list of [fraction, min, max] with fractions in "
                     "(0, 1] summing to 1 and integers 0 <= min <= max <= 1000000000")
    if not isinstance(value, (list, tuple)) or not value:
        raise bad
    out = []
    for row in value:
        if not isinstance(row, (list, tuple)) or len(row) != 3:
            raise bad
        f, lo, hi = row
        if (isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1
                or any(isinstance(v, bool) or not isinstance(v, int) for v in (lo, hi))
                or not 0 <= lo <= hi <= 10**9):
            raise bad
        out.append((float(f), int(lo), int(hi)))
    if abs(sum(f for f, _, _ in out) - 1.0) > 1e-6:
        raise bad
    return out


def class_ranges_partition(labels: np.ndarray, num_clients: int, class_ratio: float,
                           ranges: list[tuple[float, int, int]], num_classes: int,
                           rng: np.random.Generator) -> list[np.ndarray]:
    """The authors' non-IID split (their ``utility/dataset.py`` ``noniid``), for all N clients.

    Clients are visited in index order 0..N-1. Group g of ``ranges`` = (fraction f_g, lo_g,
    hi_g) covers clients int(F_{g-1} N) .. int(F_g N) - 1 (F the cumulative fractions; the last
    group ends at N), so the same clients are the rich ones in every task. Client i:

    1. draws n_i uniformly in lo_g..hi_g;
    2. chooses c = max(1, int(class_ratio * K)) classes one at a time, each the class with the
       most samples not yet given to any client (ties uniformly at random), without repeats;
    3. takes its n_i samples round-robin over its c classes, starting at a uniformly random one
       of them, each time the next sample of that class in dataset order that no earlier client
       took (an exhausted class is skipped; a client gets fewer than n_i only when all its
       classes are exhausted).

    Every task restarts from the beginning of the dataset, so tasks on the same dataset share
    their first images (as in the authors' code).

    Returns:
        N int64 index arrays (in the order taken; callers sort them).
    """
    labels = np.asarray(labels)
    K = int(num_classes)
    c = max(1, int(class_ratio * K + 1e-9))
    by_class = [np.flatnonzero(labels == k) for k in range(K)]
    size = np.array([len(b) for b in by_class], dtype=np.int64)
    taken = np.zeros(K, dtype=np.int64)  # samples of each class given out so far
    bounds = np.cumsum([f for f, _, _ in ranges])
    ends = [int(b * num_clients + 1e-9) for b in bounds[:-1]] + [num_clients]
    group = np.searchsorted(np.asarray(ends), np.arange(num_clients), side="right")
    parts = []
    for i in range(num_clients):
        _, lo, hi = ranges[int(group[i])]
        n_i = int(rng.integers(lo, hi + 1))
        temp = (size - taken).astype(np.float64)  # samples left per class
        chosen = []
        for _ in range(c):
            best = np.flatnonzero(temp == temp.max())
            k = int(best[rng.integers(len(best))]) if len(best) > 1 else int(best[0])
            temp[k] = -1.0
            chosen.append(k)
        u = int(rng.integers(c))
        out = []
        for _ in range(n_i):
            for _ in range(c):  # skip exhausted classes
                if taken[chosen[u]] < size[chosen[u]]:
                    break
                u = (u + 1) % c
            k = chosen[u]
            if taken[k] >= size[k]:
                break
            out.append(by_class[k][taken[k]])
            taken[k] += 1
            u = (u + 1) % c
        parts.append(np.asarray(out, dtype=np.int64))
    return parts


def partition_summary(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> dict:
    """Sizes and label diversity of a partition (for ``mmfl describe``).

    Args:
        labels: (n,) int labels.
        parts: h index arrays into ``labels``.
        num_classes: K.

    Returns:
        {"clients": h, "samples": total assigned, "empty": holders with no sample,
         "size": {"min", "median", "max"}, "classes": {"min", "mean", "max"}} (classes = distinct
        labels per holder), plain Python numbers.
    """
    labels = np.asarray(labels)
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    classes = np.array([len(np.unique(labels[p])) for p in parts], dtype=np.int64)
    if len(parts) == 0:
        sizes = classes = np.zeros(1, np.int64)
    return {
        "clients": len(parts),
        "samples": int(sizes.sum()),
        "empty": int((sizes == 0).sum()) if len(parts) else 0,
        "num_classes": int(num_classes),
        "size": {"min": int(sizes.min()), "median": float(np.median(sizes)),
                 "max": int(sizes.max())},
        "classes": {"min": int(classes.min()), "mean": float(classes.mean()),
                    "max": int(classes.max())},
    }
