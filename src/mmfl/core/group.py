"""Group-based client sampling (docs/algorithms.md section 7, "group") - a PROTOTYPE.

The VTC 2025-Spring paper's exact rule was not reachable; this is the prototype that
docs/algorithms.md section 7 describes: (1) group the available clients once, (2) late clients
join their nearest group, (3) a cyclic buffer maps groups to models, group g serving
``buffer[(g + t + phase) mod L]`` in round t, (4) sample within each group with budget
m_g = m E_g / E, uniformly or by section 4's optimum over LVR scores. Details the reference
leaves open, chosen here:

* ``label`` grouping: the majority task is the argmax of the data profile (``profile``,
  default d_{i,:}: raw counts would put almost every client in the group of the model with
  the largest per-client datasets); ties go to the lowest task index. With G < S, task s owns
  group s mod G (tasks share groups). A late client joins the least-populated group of its
  majority task.
* ``similarity`` grouping: k-means++ start from ``mmfl.rng.stream(seed, "group-kmeans")``; a
  client without a positive loss uses its data profile; a late client joins the group of the
  nearest centre (Euclidean). No group is empty while N >= G.
* Rotation: the initial phase makes group g serve model (g + t) mod S when every model is
  active from round 0. Newcomers (including a model that rejoins) enter at the buffer's front
  and the phase is reset so that group 0 serves the first this round; their order is the
  alpha-fair draw of stream ``(seed, "group-join", t)`` on ``state.task_losses``.
* ``within = "optimal"``: only the served pairs' losses are probed; a served pair without a
  loss gets its group's mean known loss for that model (1 if none is known).

The probabilities are the true ones, so ``unbiased`` estimates the serving groups' update
sum_{i in C_s(t)} d_{i,s} G_{i,s} (``optimal``: over clients with a positive score), not the
full one; see docs/algorithms.md section 7 for the 1/L step length and its remedies.

The second sampler here, ``group_pipeline`` (:class:`GroupPipelineAllocator`), is the rule of
the VTC 2025 authors' research code (haoran-zh/mmfl-Dec, commits 651f3b6-6fe8969): class-block
or random groups, a pipeline buffer of models entering by a loss^alpha draw, uniform or optimal
sampling inside each group; docs/group_sampling.md compares the two.

Pure numpy; randomness comes only from the ``rng`` argument of ``allocate`` (the draw) and
from ``mmfl.rng.stream(seed, ...)`` (k-means start, random groups, join order, the pipeline's
entering model). No function mutates its inputs.
"""

from __future__ import annotations

import numpy as np

from mmfl.core.allocators import Allocator, fedfair_distribution
from mmfl.core.drawing import draw, processor_slots
from mmfl.core.probabilities import optimal_probabilities, optimal_probabilities_info
from mmfl.errors import ConfigError
from mmfl.registry import Option, register
from mmfl.rng import GROUP_JOIN, GROUP_KMEANS, GROUP_PIPELINE, stream
from mmfl.types import Assignment, Population, RoundState, Signal

__all__ = ["GroupAllocator", "GroupPipelineAllocator", "class_block_groups", "kmeans",
           "label_groups", "pipeline_step", "random_groups", "task_groups"]


# --------------------------------------------------------------------------------------------
# Grouping helpers
# --------------------------------------------------------------------------------------------


def task_groups(task: int, num_tasks: int, num_groups: int) -> np.ndarray:
    """The groups owned by majority task ``task`` under ``label`` grouping: (k,) int.

    {g < G : g mod S = task} when that is not empty (G >= S gives every task >= 1 group),
    otherwise {task mod G} (G < S: tasks share groups). Example: S = 2, G = 5 -> task 0 owns
    (0, 2, 4), task 1 owns (1, 3); S = 3, G = 2 -> tasks 0, 1, 2 map to groups 0, 1, 0.
    """
    own = np.arange(task, num_groups, max(num_tasks, 1))
    return own if own.size else np.array([task % num_groups])


def label_groups(profile: np.ndarray, num_groups: int) -> np.ndarray:
    """Majority-task grouping (the ``label`` prototype): (k,) int group of each row.

    Args:
        profile: (k, S) float >= 0, data profile of k clients (rows need not be normalised).
        num_groups: G >= 1.

    Returns:
        (k,) int in [0, G). Row j has majority task s = argmax profile[j] (lowest index on ties,
        task 0 for an all-zero row); the clients of task s are spread round robin, in row order,
        over :func:`task_groups` (s).
    """
    x = np.asarray(profile, dtype=np.float64)
    k, s_count = x.shape
    major = np.argmax(x, axis=1) if s_count else np.zeros(k, np.int64)
    out = np.zeros(k, np.int64)
    for s in np.unique(major):
        rows = np.flatnonzero(major == s)
        own = task_groups(int(s), max(s_count, 1), num_groups)
        out[rows] = own[np.arange(rows.size) % own.size]
    return out


def kmeans(
    x: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with a k-means++ start and a fixed number of iterations.

    Args:
        x: (n, F) float features (not mutated).
        k: number of clusters, >= 1.
        rng: generator for the k-means++ start (the only randomness).
        iterations: Lloyd steps (assign, then recompute centres), >= 1.

    Returns:
        (labels (n,) int in [0, k), centres (k, F) float). When n >= k no cluster is empty: after
        each assignment an empty cluster takes the point farthest from its centre among clusters
        with >= 2 members. When n < k, point j is cluster j and clusters n..k-1 are empty (their
        centres are +inf so nothing is ever nearest to them).
    """
    x = np.asarray(x, dtype=np.float64)
    n, f = x.shape
    centres = np.full((k, f), np.inf)
    if n == 0:
        return np.zeros(0, np.int64), centres
    if n <= k:
        centres[:n] = x
        return np.arange(n, dtype=np.int64), centres
    # k-means++: first centre uniform, then proportional to the squared distance to the nearest.
    centres[0] = x[rng.integers(n)]
    d2 = np.sum((x - centres[0]) ** 2, axis=1)
    for c in range(1, k):
        tot = d2.sum()
        j = int(rng.choice(n, p=d2 / tot)) if tot > 0 else int(rng.integers(n))
        centres[c] = x[j]
        d2 = np.minimum(d2, np.sum((x - centres[c]) ** 2, axis=1))
    labels = np.zeros(n, np.int64)
    for _ in range(max(int(iterations), 1)):
        dist = np.sum((x[:, None, :] - centres[None, :, :]) ** 2, axis=2)
        labels = np.argmin(dist, axis=1)
        own = dist[np.arange(n), labels]
        for c in range(k):
            if (labels == c).any():
                continue
            sizes = np.bincount(labels, minlength=k)
            movable = sizes[labels] >= 2
            j = int(np.argmax(np.where(movable, own, -1.0)))
            labels[j] = c
            own[j] = 0.0
        for c in range(k):
            centres[c] = x[labels == c].mean(axis=0)
    return labels, centres


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------


@register(
    "sampler",
    "group",
    options={
        "groups": Option(int, 0, ">= 0", "number of client groups G; 0 = number of tasks S"),
        "grouping": Option(str, "label", "one of label|similarity",
                           "label: by majority task (stands in for the authors' majority label; "
                           "the core sees no labels); similarity: k-means on normalised local "
                           "losses (data profile when no losses are measured)"),
        "profile": Option(str, "data_weight", "one of data_weight|samples",
                          "client data profile for label grouping and the similarity fallback: "
                          "d_{i,:} (share of each model's data) or n_{i,:} normalised"),
        "within": Option(str, "uniform", "one of uniform|optimal",
                         "sampling inside a group: uniform, or section 4's optimum over LVR "
                         "scores (probes the served pairs' local losses)"),
        "alpha": Option(float, 3.0, ">= 0",
                        "alpha-fair exponent of the order in which joining models enter the "
                        "rotation"),
        "iterations": Option(int, 20, ">= 1", "k-means iterations (similarity grouping)"),
    },
    doc="Group-based sampling (VTC 2025 prototype): client groups rotate over the models.",
)
class GroupAllocator(Allocator):
    """Group-based client sampling, the PROTOTYPE of VTC 2025 (docs/algorithms.md section 7).

    The rule and what the unbiased aggregator estimates: docs/algorithms.md section 7 and the
    module docstring (the choices made where the reference is silent).

    State (checkpointed as numpy arrays by :meth:`state_dict`): ``groups`` (N,) int group of each
    client (-1 = not yet seen available), ``centres`` (G, S) float k-means centres (similarity),
    ``buffer`` (L,) int the rotation, ``phase`` and flags. Options: see the registry entry.
    """

    def __init__(self, options: dict | None, population: Population, seed: int = 0) -> None:
        super().__init__(options, population, seed)
        s_count = population.num_tasks
        self.num_groups = int(self.opt("groups") or 0) or max(s_count, 1)
        self.grouping = str(self.opt("grouping"))
        self.within = str(self.opt("within"))
        self.profile_kind = str(self.opt("profile"))
        self.alpha = float(self.opt("alpha"))
        self.iterations = int(self.opt("iterations"))
        for name, value, allowed in (("grouping", self.grouping, ("label", "similarity")),
                                     ("within", self.within, ("uniform", "optimal")),
                                     ("profile", self.profile_kind, ("data_weight", "samples"))):
            if value not in allowed:
                raise ValueError(f"group sampler: {name} must be one of {allowed}, got {value!r}")
        need_loss = self.within == "optimal" or self.grouping == "similarity"
        self.requires = frozenset({Signal.LOCAL_LOSS}) if need_loss else frozenset()
        n = population.num_clients
        self.groups = np.full(n, -1, np.int64)
        self.centres = np.full((self.num_groups, s_count), np.inf)
        self.grouped = False
        self.loss_features = False
        self.buffer = np.zeros(0, np.int64)
        self.phase = 0
        self.started = False

    # -- features ---------------------------------------------------------------------------
    def profile(self, population: Population) -> np.ndarray:
        """(N, S) float: each client's data profile, rows summing to 1 (0 for empty rows)."""
        base = (population.data_weight if self.profile_kind == "data_weight"
                else population.n_samples.astype(np.float64))
        tot = base.sum(axis=1, keepdims=True)
        return np.divide(base, tot, out=np.zeros(base.shape), where=tot > 0)

    def features(self, state: RoundState) -> tuple[np.ndarray, np.ndarray]:
        """((N, S) features, (N,) bool "row is a loss row") for similarity grouping.

        A row is the client's local losses (``state.signals.local_loss``; NaN and unheld entries
        count 0) normalised to sum 1 when it has a positive entry, else its data profile.
        """
        prof = self.profile(state.population)
        loss = state.signals.local_loss
        if loss is None:
            return prof, np.zeros(prof.shape[0], bool)
        lv = np.where(state.population.holds, np.nan_to_num(np.asarray(loss, np.float64),
                                                            nan=0.0, posinf=0.0), 0.0)
        lv = np.maximum(lv, 0.0)
        tot = lv.sum(axis=1, keepdims=True)
        has = tot[:, 0] > 0
        x = np.where(has[:, None], lv / np.where(tot > 0, tot, 1.0), prof)
        return x, has

    # -- grouping ---------------------------------------------------------------------------
    def _form_groups(self, state: RoundState) -> tuple[np.ndarray, np.ndarray, bool]:
        """(groups (N,), centres (G, S), used losses) for the clients available now (pure)."""
        pop = state.population
        avail = np.flatnonzero(np.asarray(state.available, bool))
        groups = np.full(pop.num_clients, -1, np.int64)
        centres = np.full((self.num_groups, pop.num_tasks), np.inf)
        if self.grouping == "label":
            groups[avail] = label_groups(self.profile(pop)[avail], self.num_groups)
            return groups, centres, False
        x, has = self.features(state)
        rng = stream(self.seed, GROUP_KMEANS)
        labels, centres = kmeans(x[avail], self.num_groups, rng, self.iterations)
        groups[avail] = labels
        return groups, centres, bool(has[avail].any())

    def _place_new(self, state: RoundState, groups: np.ndarray) -> np.ndarray:
        """Copy of ``groups`` with newly available ungrouped clients in their nearest group."""
        new = np.flatnonzero(np.asarray(state.available, bool) & (groups < 0))
        if new.size == 0:
            return groups
        out = groups.copy()
        if self.grouping == "label":
            prof = self.profile(state.population)
            s_count = max(state.population.num_tasks, 1)
            for i in new.tolist():
                major = int(np.argmax(prof[i])) if prof.shape[1] else 0
                own = task_groups(major, s_count, self.num_groups)
                sizes = np.bincount(out[out >= 0], minlength=self.num_groups)[own]
                out[i] = int(own[int(np.argmin(sizes))])
            return out
        x = self.features(state)[0]
        if not self.loss_features:
            x = self.profile(state.population)
        finite = np.isfinite(self.centres).all(axis=1)
        if not finite.any():  # no centre (cannot happen once grouped): fill empty groups
            return out
        dist = np.sum((x[new][:, None, :] - np.where(finite[:, None], self.centres, 0.0)) ** 2,
                      axis=2)
        dist[:, ~finite] = np.inf
        out[new] = np.argmin(dist, axis=1)
        return out

    # -- rotation ---------------------------------------------------------------------------
    def _active(self, state: RoundState) -> np.ndarray:
        s_count = state.population.num_tasks
        if state.task_active is None:
            return np.ones(s_count, bool)
        return np.asarray(state.task_active, bool)

    def _rotation(self, state: RoundState) -> tuple[np.ndarray, int]:
        """(buffer (L,), phase) for round ``state.round`` after joins and leaves (pure)."""
        t = int(state.round)
        active = self._active(state)
        if not self.started:
            buf = np.flatnonzero(active).astype(np.int64)
            return buf, (-t) % max(buf.size, 1)
        old = self.buffer
        present = np.zeros(active.size, bool)
        present[old] = True
        joining = np.flatnonzero(active & ~present)
        if joining.size == 0 and active[old].all():
            return old, self.phase
        if old.size:
            p0 = (t + self.phase) % old.size
            rolled = np.roll(old, -p0)
            kept = rolled[active[rolled]]
        else:
            kept = old
        if joining.size > 1:
            losses = (np.ones(active.size) if state.task_losses is None
                      else np.asarray(state.task_losses, np.float64))
            rng = stream(self.seed, GROUP_JOIN, t)
            left = list(joining.tolist())
            order = []
            while left:
                pi = fedfair_distribution(losses[left], self.alpha)
                j = int(rng.choice(len(left), p=pi))
                order.append(left.pop(j))
            joining = np.array(order, np.int64)
        buf = np.concatenate([joining, kept]).astype(np.int64)
        return buf, (-t) % max(buf.size, 1)

    @staticmethod
    def _served(buffer: np.ndarray, phase: int, t: int, num_groups: int) -> np.ndarray:
        if buffer.size == 0:
            return np.full(num_groups, -1, np.int64)
        return buffer[(np.arange(num_groups) + t + phase) % buffer.size]

    def group_models(self, state: RoundState) -> np.ndarray:
        """(G,) int: the model each group serves in round ``state.round`` (-1 = none)."""
        buf, phase = self._rotation(state)
        return self._served(buf, phase, int(state.round), self.num_groups)

    def schedule(self, state: RoundState) -> np.ndarray:
        """(N,) int: the model client i may train this round (-1: unavailable, not grouped,
        no active model for its group, or it does not hold its group's model). Pure: uses the
        cached groups (grouping happens in :meth:`allocate`)."""
        groups = self._place_new(state, self.groups) if self.grouped else self.groups
        return self._schedule(state, groups, self.group_models(state))

    @staticmethod
    def _schedule(state: RoundState, groups: np.ndarray, models: np.ndarray) -> np.ndarray:
        served = np.where(groups >= 0, models[np.maximum(groups, 0)], -1)
        ok = served >= 0
        elig = state.eligible
        ok[ok] = elig[np.flatnonzero(ok), served[ok]]
        return np.where(ok, served, -1)

    # -- runner hooks -----------------------------------------------------------------------
    def probe_pairs(self, state: RoundState) -> np.ndarray:
        """(N, S) bool pairs whose local loss the runner measures this round.

        Before grouping (similarity or optimal): every eligible pair. Afterwards: the eligible
        pairs of newly available clients (similarity: their feature) and, for ``within =
        "optimal"``, the pairs each client is scheduled to serve (its LVR score).
        """
        elig = state.eligible
        if not self.requires:
            return np.zeros(elig.shape, bool)
        if not self.grouped:
            return elig.copy()
        need = np.zeros(elig.shape, bool)
        avail = np.asarray(state.available, bool)
        new = avail & (self.groups < 0)
        if self.grouping == "similarity":
            need |= elig & new[:, None]
        if self.within == "optimal":
            sched = self.schedule(state)
            i = np.flatnonzero(sched >= 0)
            need[i, sched[i]] = True
        return need & elig

    # -- allocation -------------------------------------------------------------------------
    def _optimal_column(self, state: RoundState, members: np.ndarray, s: int, m_g: float,
                        ) -> tuple[np.ndarray, str]:
        """(len(proc),) q of the group's schedulable processors and a note (section 4)."""
        pop = state.population
        loss = state.signals.local_loss
        if loss is None:
            raise ValueError("group sampler with within='optimal' needs signals.local_loss; "
                             "run it through the runner")
        f = np.asarray(loss, np.float64)[members, s]
        f = np.where(np.isfinite(f), np.maximum(f, 0.0), np.nan)
        if np.isnan(f).any():
            known = f[~np.isnan(f)]
            f = np.where(np.isnan(f), known.mean() if known.size else 1.0, f)
        u_client = pop.data_weight[members, s] * f / pop.capacity[members]
        u = np.repeat(u_client, pop.capacity[members])[:, None]
        p, info = optimal_probabilities_info(u, m_g)
        return p[:, 0], info.note

    def allocate(self, state: RoundState, rng: np.random.Generator) -> Assignment:
        """Group, rotate, and draw round ``state.round`` (see the module docstring).

        Returns an :class:`Assignment` from :func:`~mmfl.core.drawing.draw` with the true
        (P, S) matrix: p_{s|b} > 0 only for s = the model of b's group, b's client available and
        holding s. ``probabilities.sum()`` is min(m, E) for ``uniform`` (E schedulable
        processors), at most that for ``optimal``.
        """
        pop = state.population
        avail = np.asarray(state.available, bool)
        # commit grouping, late clients and the rotation (idempotent for a repeated round)
        if not self.grouped and avail.any():
            self.groups, self.centres, self.loss_features = self._form_groups(state)
            self.grouped = True
        elif self.grouped:
            self.groups = self._place_new(state, self.groups)
        self.buffer, self.phase = self._rotation(state)
        self.started = True
        t = int(state.round)
        models = self._served(self.buffer, self.phase, t, self.num_groups)
        sched = self._schedule(state, self.groups, models)

        p = np.zeros((pop.num_processors, pop.num_tasks))
        proc_client = pop.processor_client
        proc_model = sched[proc_client]
        proc_ok = proc_model >= 0
        e_total = int(proc_ok.sum())
        m = float(state.budget)
        notes = ["groups->models " + ",".join(str(int(s)) for s in models)]
        if e_total and m > 0:
            if self.within == "uniform":
                b = np.flatnonzero(proc_ok)
                p[b, proc_model[b]] = min(1.0, m / e_total)
            else:
                proc_group = self.groups[proc_client]
                for g in range(self.num_groups):
                    b = np.flatnonzero(proc_ok & (proc_group == g))
                    if b.size == 0:
                        continue
                    s = int(models[g])
                    members = np.flatnonzero((self.groups == g) & (sched == s))
                    q, note = self._optimal_column(state, members, s, m * b.size / e_total)
                    p[b, s] = q  # members ascending, processors contiguous: same order as b
                    if note:
                        notes.append(f"group {g}: {note}")
        expected = float(p.sum())
        if expected < m - 1e-9:
            notes.append(f"expected slots {expected:.4g} < m={m:g} ({e_total} schedulable "
                         "processors)")
        return draw(p, pop, rng, note="; ".join(notes))

    # -- checkpoint -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Groups, k-means centres, rotation buffer and phase, flags: numpy arrays only."""
        return {
            "groups": self.groups.copy(),
            "centres": self.centres.copy(),
            "buffer": self.buffer.copy(),
            "phase": np.array([self.phase], np.int64),
            "flags": np.array([self.grouped, self.loss_features, self.started], bool),
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` returned (arrays are copied)."""
        self.groups = np.array(state["groups"], np.int64)
        self.centres = np.array(state["centres"], np.float64)
        self.buffer = np.array(state["buffer"], np.int64).reshape(-1)
        self.phase = int(np.asarray(state["phase"]).reshape(-1)[0])
        flags = np.asarray(state["flags"], bool).reshape(-1)
        self.grouped, self.loss_features, self.started = (bool(x) for x in flags[:3])


# --------------------------------------------------------------------------------------------
# group_pipeline: the VTC 2025 authors' code (docs/group_sampling.md)
# --------------------------------------------------------------------------------------------


def class_block_groups(held: np.ndarray, num_groups: int) -> np.ndarray:
    """Label grouping of the authors' code: (N,) int group of each client.

    The K classes are cut into G contiguous blocks, class c in block floor(c G / K) (K = 10,
    G = 2: classes 0-4 and 5-9, the authors' ``group_labels``). A client joins the block that
    holds most of its classes; a tie goes to the highest tied block (the authors' ``g1 > g2``
    test sends a tie to the second group). A client without classes ties everywhere: last group.

    Args:
        held: (N, K) bool, client i holds a training sample of class c.
        num_groups: G >= 1.
    """
    held = np.asarray(held, bool)
    n, k = held.shape
    block = (np.arange(k) * num_groups) // max(k, 1)
    counts = np.zeros((n, num_groups), np.int64)
    for g in range(num_groups):
        counts[:, g] = held[:, block == g].sum(axis=1)
    return (num_groups - 1 - np.argmax(counts[:, ::-1], axis=1)).astype(np.int64)


def random_groups(num_clients: int, num_groups: int, rng: np.random.Generator) -> np.ndarray:
    """(N,) int: the authors' first grouping (mmfl-Dec commit 51ef63b): the clients in a random
    order, the j-th of them in group j mod G (sizes differ by at most one)."""
    out = np.zeros(num_clients, np.int64)
    out[rng.permutation(num_clients)] = np.arange(num_clients) % num_groups
    return out


def pipeline_step(buffer: np.ndarray, losses: np.ndarray, alpha: float,
                  rng: np.random.Generator, active: np.ndarray | None = None) -> np.ndarray:
    """The authors' buffer update (mmfl-Dec ``main.py`` at a3c2b2d-6fe8969): (G,) int.

    ``buffer[g]`` is the model group g trains. The last entry leaves; the entering model is
    drawn from the active models not left in the buffer (the one that left included) with

        P(s) = f_s^alpha / sum_{s' candidate} f_{s'}^alpha,

    f_s the latest global (test) loss of model s (all 1 before any evaluation, like the
    authors' initial ``global_results``), and is put in front: group 0 trains the newcomer,
    group g + 1 what group g trained. With G = S the draw has one candidate and the buffer
    rotates cyclically. No candidate (more groups than active models): -1 (the group idles).

    Args:
        buffer: (G,) int model per group (-1 = none).
        losses: (S,) float f_s; NaN / inf count as the worst (1e8).
        alpha: the exponent, >= 0 (0: uniform among the candidates).
        rng: generator of the draw (one ``choice`` when there is a candidate).
        active: (S,) bool or None (= all): models that may enter.
    """
    buffer = np.asarray(buffer, np.int64)
    f = np.asarray(losses, np.float64)
    s_count = f.size
    active = np.ones(s_count, bool) if active is None else np.asarray(active, bool)
    kept = buffer[:-1]
    cand = np.flatnonzero(active & ~np.isin(np.arange(s_count), kept))
    new = -1
    if cand.size:
        pi = fedfair_distribution(f[cand], alpha + 1.0)  # f^((alpha + 1) - 1), in log space
        new = int(cand[int(rng.choice(cand.size, p=pi))])
    return np.concatenate([[new], kept]).astype(np.int64)


@register(
    "sampler",
    "group_pipeline",
    options={
        "groups": Option(int, 2, ">= 1",
                         "number of client groups G (at most the number of tasks): each round "
                         "group g trains one model, a different one per group"),
        "grouping": Option(str, "label", "one of label|random|gradient",
                           "label: majority block of the client's classes of task label_task "
                           "(the authors' code); random: a random equal split (their first "
                           "version); gradient: k-means on the rows of the pairwise distances "
                           "of round 0's updates summed over the tasks (their unwired draft; "
                           "round 0 trains every client on every task)"),
        "label_task": Option(int, -1, ">= -1",
                             "label grouping: the task whose class sets decide (-1 = the last "
                             "task, as in the authors' code)"),
        "within": Option(str, "uniform", "one of uniform|optimal",
                         "inside a group: uniform (exactly floor(m / G) clients without "
                         "replacement), or the closed-form optimum of docs/algorithms.md "
                         "section 4 on d_{i,s} f_{i,s} with budget floor(m / G), independent "
                         "draws (probes the served pairs' local losses)"),
        "alpha": Option(float, 3.0, ">= 0",
                        "the entering model is s with probability f_s^alpha / sum f^alpha, f the "
                        "latest global test loss"),
        "weight": Option(str, "global", "one of global|group",
                         "d of the unbiased coefficient d / p: global d_{i,s} (the authors' "
                         "code; a served group moves its model by its share of the full "
                         "update) or the group's own share n_{i,s} / sum_{j in g} n_{j,s}"),
        "probability": Option(str, "true", "one of true|authors",
                              "uniform slots aggregate with the true inclusion probability "
                              "floor(m / G) / E_g, or with C = m / P as the authors' code "
                              "(biased when the groups differ in size)", authors="authors"),
        "iterations": Option(int, 20, ">= 1", "k-means iterations (gradient grouping)"),
    },
    doc="Group-based sampling as the VTC 2025 authors' code builds it: G client groups, a "
        "loss-driven pipeline of models.",
)
class GroupPipelineAllocator(Allocator):
    """Group-based client sampling as the VTC 2025 paper's authors coded it (docs/group_sampling.md).

    1. Grouping, once, of all N clients into G groups (``grouping``): :func:`class_block_groups`
       on the class sets of task ``label_task``; :func:`random_groups`; or ``gradient``: round 0
       trains every eligible pair (N S local trainings, ``Signal.UPDATE_DISTANCE``) and
       :func:`kmeans` clusters the rows of D = sum_s D_s, D_s[i, j] = ||G_{i,s} - G_{j,s}|| /
       eta_s.
    2. The buffer (G,) maps groups to models: (0, 1, ..., G-1) in round 0, then
       :func:`pipeline_step` after every round's draw (losses as known at that allocation).
    3. Inside group g, serving model s on its E_g schedulable processors (available clients
       of the group holding s): k = floor(m / G) slots. ``uniform``: exactly min(k, E_g)
       processors without replacement, p = min(k, E_g) / E_g. ``optimal``: the closed form of
       docs/algorithms.md section 4 on U_b = d_{i,s} f_{i,s} / B_i with budget k, drawn
       independently (the authors scale d to the group's share; the optimum is scale-free).
    4. The slots carry the true probabilities (``probability = "authors"``: C = m / P on
       uniform slots) and share 1/B_i, times sum_j n_{j,s} / sum_{j in g} n_{j,s} under
       ``weight = "group"``. With the default ``unbiased`` aggregator the expected update of a
       served model is sum_{i in g, schedulable} d_{i,s} G_{i,s} (``weight = "group"``: that sum
       divided by the group's share of the model's data).

    Not reproduced: the authors weight the k-th update of a model with d of the k-th client of
    the round's whole list (right for group 0, another client's d for group 1); the
    balanced data of their experiment makes that small (docs/group_sampling.md).

    State (checkpointed): ``groups`` (N,), ``buffer`` (G,) for round ``next_round``, the
    buffer of the round before (a repeated round draws the same), flags.
    """

    def __init__(self, options: dict | None, population: Population, seed: int = 0) -> None:
        super().__init__(options, population, seed)
        s_count = population.num_tasks
        self.num_groups = int(self.opt("groups"))
        if self.num_groups > s_count:
            raise ConfigError("sampler.groups", f"must be at most the number of tasks "
                              f"({s_count}): every group trains a different model",
                              self.num_groups)
        label_task = int(self.opt("label_task"))
        if label_task >= s_count:
            raise ConfigError("sampler.label_task", f"must be -1 or a task index below "
                              f"{s_count}", label_task)
        self.label_task = s_count - 1 if label_task < 0 else label_task
        self.grouping = str(self.opt("grouping"))
        self.within = str(self.opt("within"))
        self.alpha = float(self.opt("alpha"))
        self.weight = str(self.opt("weight"))
        self.authors_p = str(self.opt("probability")) == "authors"
        self.iterations = int(self.opt("iterations"))
        self.needs_held_classes = self.grouping == "label"
        need = set()
        if self.within == "optimal":
            need.add(Signal.LOCAL_LOSS)
        if self.grouping == "gradient":
            need.add(Signal.UPDATE_DISTANCE)
        self.requires = frozenset(need)
        self.held: np.ndarray | None = None
        self.groups = np.full(population.num_clients, -1, np.int64)
        self.grouped = False
        self.buffer = np.arange(self.num_groups, dtype=np.int64)
        self.previous = self.buffer.copy()
        self.next_round = 0

    # -- grouping ---------------------------------------------------------------------------
    def set_held_classes(self, held: list[np.ndarray]) -> None:
        """Keep the (N, K) class sets of task ``label_task`` (label grouping)."""
        self.held = np.asarray(held[self.label_task], bool)

    def form_groups(self, state: RoundState) -> np.ndarray:
        """(N,) int group of every client (pure; :meth:`allocate` keeps the first result)."""
        n = state.population.num_clients
        if self.grouping == "label":
            if self.held is None:
                raise ValueError("group_pipeline with grouping='label' needs the clients' "
                                 "class sets (set_held_classes); run it through the runner")
            return class_block_groups(self.held, self.num_groups)
        rng = stream(self.seed, GROUP_KMEANS)
        if self.grouping == "random":
            return random_groups(n, self.num_groups, rng)
        dist = state.signals.update_distance
        if dist is None:
            raise ValueError("group_pipeline with grouping='gradient' needs "
                             "signals.update_distance in its first round; run it through "
                             "the runner")
        return kmeans(np.asarray(dist, np.float64), self.num_groups, rng, self.iterations)[0]

    def requires_at(self, round: int) -> frozenset[Signal]:
        """Local losses every round (``within = "optimal"``); the full computation and its
        update distances only until the groups are formed (``gradient``)."""
        if self.grouped:
            return self.requires - {Signal.UPDATE_DISTANCE}
        return self.requires

    # -- the pipeline -----------------------------------------------------------------------
    def buffer_for(self, round: int) -> np.ndarray:
        """(G,) int: the model each group trains in round ``round`` (the stored buffer; the
        previous one when ``round`` repeats the last allocated round)."""
        return self.previous if round == self.next_round - 1 else self.buffer

    def schedule(self, state: RoundState, groups: np.ndarray | None = None) -> np.ndarray:
        """(N,) int: the model client i may train this round, -1 when ungrouped, unavailable,
        its group serves no model, or it does not hold (or the round excludes) that model."""
        groups = self.groups if groups is None else groups
        buf = self.buffer_for(int(state.round))
        served = np.where(groups >= 0, buf[np.maximum(groups, 0)], -1)
        ok = served >= 0
        i = np.flatnonzero(ok)
        ok[i] = state.eligible[i, served[i]]
        return np.where(ok, served, -1)

    def probe_pairs(self, state: RoundState) -> np.ndarray:
        """(N, S) bool: the served pairs (whose local loss ``optimal`` needs); every eligible
        pair before a gradient grouping exists."""
        if not self.grouped and self.grouping == "gradient":
            return state.eligible.copy()
        groups = self.groups if self.grouped else self.form_groups(state)
        sched = self.schedule(state, groups)
        need = np.zeros(state.eligible.shape, bool)
        i = np.flatnonzero(sched >= 0)
        need[i, sched[i]] = True
        return need

    # -- allocation -------------------------------------------------------------------------
    def _group_p(self, state: RoundState, b: np.ndarray, s: int, k: int) -> np.ndarray:
        """(len(b),) inclusion probabilities of the group's processors ``b`` on model s."""
        if self.within == "uniform":
            return np.full(b.size, min(k, b.size) / b.size)
        pop = state.population
        loss = state.signals.local_loss
        if loss is None:
            raise ValueError("group_pipeline with within='optimal' needs signals.local_loss; "
                             "run it through the runner")
        client = pop.processor_client[b]
        f = np.asarray(loss, np.float64)[client, s]
        f = np.where(np.isfinite(f), np.maximum(f, 0.0), np.nan)
        if np.isnan(f).all():
            f = np.ones_like(f)
        f = np.where(np.isnan(f), np.nanmean(f), f)
        u = pop.data_weight[client, s] * f / pop.capacity[client]
        return optimal_probabilities(u[:, None], float(k))[:, 0]

    def allocate(self, state: RoundState, rng: np.random.Generator) -> Assignment:
        """Group (first call), draw round ``state.round`` group by group, move the pipeline.

        Returns an :class:`Assignment` whose matrix holds the true probabilities; its slots
        carry the aggregation's probability and share (see the class docstring).
        """
        pop = state.population
        t = int(state.round)
        if not self.grouped:
            self.groups, self.grouped = self.form_groups(state), True
        buf = self.buffer_for(t)
        sched = self.schedule(state)
        proc_client = pop.processor_client
        proc_model = sched[proc_client]
        proc_group = self.groups[proc_client]
        m = float(state.budget)
        k = int(np.floor(m / self.num_groups + 1e-9)) if m > 0 else 0
        p = np.zeros((pop.num_processors, pop.num_tasks))
        chosen: list[np.ndarray] = []
        tasks: list[np.ndarray] = []
        for g in range(self.num_groups):
            s = int(buf[g])
            b = np.flatnonzero((proc_group == g) & (proc_model == s)) if s >= 0 else []
            if len(b) == 0 or k == 0:
                continue
            p[b, s] = self._group_p(state, b, s, k)
            if self.within == "uniform":
                pick = np.sort(rng.choice(b, size=min(k, b.size), replace=False))
                chosen.append(pick)
                tasks.append(np.full(pick.size, s, np.int64))
        notes = ["groups->models " + ",".join(str(int(x)) for x in buf)]
        if p.sum() < m - 1e-9:
            notes.append(f"expected slots {p.sum():.4g} < m={m:g} (floor(m/G)={k} per group)")
        note = "; ".join(notes)
        if self.within == "uniform":
            bb = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
            ss = np.concatenate(tasks) if tasks else np.zeros(0, np.int64)
            order = np.argsort(bb, kind="stable")  # processors ascending, as draw gives them
            a = processor_slots(pop, bb[order], ss[order], p[bb[order], ss[order]], p, note)
        else:
            a = draw(p, pop, rng, note=note)
        a = self._aggregation_terms(state, a)
        if t >= self.next_round:  # move the pipeline once per round
            losses = (np.ones(pop.num_tasks) if state.task_losses is None
                      else np.asarray(state.task_losses, np.float64))
            self.previous = buf.copy()
            self.buffer = pipeline_step(buf, losses, self.alpha, stream(self.seed,
                                        GROUP_PIPELINE, t), state.task_active)
            self.next_round = t + 1
        return a

    def _aggregation_terms(self, state: RoundState, a: Assignment) -> Assignment:
        """``a`` with the slots' probability and share of options ``probability`` / ``weight``."""
        if not (self.weight == "group" or (self.authors_p and self.within == "uniform")):
            return a
        pop = state.population
        prob, share = a.probability.copy(), a.share.copy()
        if self.weight == "group":
            n = pop.n_samples.astype(np.float64)
            for g in range(self.num_groups):
                in_g = self.groups == g
                for s in np.unique(a.task[in_g[a.client]]).tolist():
                    k = in_g[a.client] & (a.task == s)
                    share[k] *= n[:, s].sum() / n[in_g, s].sum()
        if self.authors_p and self.within == "uniform":
            prob[:] = min(1.0, float(state.budget) / max(pop.num_processors, 1))
        return Assignment(a.processor, a.client, a.task, prob, share, a.probabilities,
                          a.note, a.expected_slots)

    # -- checkpoint -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Groups, the buffer for ``next_round`` and the one before: numpy arrays only."""
        return {"groups": self.groups.copy(), "buffer": self.buffer.copy(),
                "previous": self.previous.copy(),
                "rounds": np.array([self.next_round, int(self.grouped)], np.int64)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` returned (arrays are copied)."""
        self.groups = np.array(state["groups"], np.int64)
        self.buffer = np.array(state["buffer"], np.int64).reshape(-1)
        self.previous = np.array(state["previous"], np.int64).reshape(-1)
        rounds = np.asarray(state["rounds"], np.int64).reshape(-1)
        self.next_round, self.grouped = int(rounds[0]), bool(rounds[1])
