"""Optimal sampling under one budget per model (docs/algorithms.md section 4.5, the MMFL-FairVR
variant): minimise V(p) = sum U^2 / p subject to sum_s p_{s|b} <= 1 and sum_b p_{s|b} <= m_s,
solved exactly by dual decomposition with a certified duality gap. The single-budget closed form
is :mod:`mmfl.core.probabilities`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from mmfl.core.probabilities import check_scores, water_fill

__all__ = ["PerModelInfo", "optimal_probabilities_per_model",
           "optimal_probabilities_per_model_info"]


@dataclass(frozen=True)
class PerModelInfo:
    """What :func:`optimal_probabilities_per_model_info` found.

    Attributes:
        expected: sum of p.
        per_model: (S,) column sums sum_b p_{s|b}.
        budgets: (S,) m_s.
        nu: (S,) model multipliers (score^2 units).
        iterations: Newton iterations.
        method: which step of the method produced p ("" when no solve was needed).
        gap: the certified relative duality gap.
        fallback: "equal" (all scores zero: equal scores on eligible pairs) or "".
        note: text for the round's record ("" when every column sum reaches m_s).
    """

    expected: float = 0.0
    per_model: np.ndarray = field(default_factory=lambda: np.zeros(0))
    budgets: np.ndarray = field(default_factory=lambda: np.zeros(0))
    nu: np.ndarray = field(default_factory=lambda: np.zeros(0))
    iterations: int = 0
    method: str = ""
    gap: float = 0.0
    fallback: str = ""
    note: str = ""


# Dual of docs/algorithms.md section 4.5: p_{s|b} = U_{s,b} / sqrt(mu_b + nu_s) and
#     g(mu, nu) = sum_{U>0} 2 U_{s,b} sqrt(mu_b + nu_s) - sum_b mu_b - sum_s m_s nu_s.
# The solvers stop on the certificate V(p_f) - g <= tol * V(p_f), p_f = p(mu, nu) shrunk onto
# the feasible set (rows, then columns).


def _feasible(p: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Shrink p (in place) to sum_s p <= 1 per row, then to sum_b p <= m_s per column."""
    p /= np.maximum(p.sum(axis=1, keepdims=True), 1.0)
    col = p.sum(axis=0)
    p *= np.minimum(1.0, m / np.where(col > 0, col, 1.0))
    return p


def _dual_point(u: np.ndarray, pos: np.ndarray, mu: np.ndarray, nu: np.ndarray):
    """(p, r) at (mu, nu): r = (mu_b + nu_s)^(-1/2) and p = U r on the support, 0 elsewhere."""
    d = mu[:, None] + nu[None, :]
    r = np.zeros(u.shape)
    with np.errstate(divide="ignore"):
        np.divide(1.0, np.sqrt(d, where=pos, out=np.ones(u.shape)), out=r, where=pos)
    return u * r, r


def _dual_value(u: np.ndarray, r: np.ndarray, mu: np.ndarray, nu: np.ndarray, m) -> float:
    """g(mu, nu) = sum 2 U sqrt(mu + nu) - sum mu - m . nu."""
    root = np.divide(u, r, out=np.zeros(u.shape), where=r > 0)  # U sqrt(mu + nu)
    return float(2.0 * root.sum() - mu.sum() - m @ nu)


def _certificate(u: np.ndarray, pos: np.ndarray, p: np.ndarray, m: np.ndarray):
    """(p_f, V(p_f)): p shrunk onto the feasible set and its objective."""
    pf = _feasible(p.copy(), m)
    with np.errstate(divide="ignore"):
        v = float(np.sum(u[pos] ** 2 / pf[pos]))
    return pf, v


def _inner_mu(
    u: np.ndarray, pos: np.ndarray, nu: np.ndarray, guess: np.ndarray | None = None
) -> np.ndarray:
    """mu(nu) = argmax_{mu >= 0} g(mu, nu): one 1-D problem per processor, vectorised.

    docs/algorithms.md section 4.5, step 2: mu_b = 0 on slack rows (phi_b(0) <= 1), else the root
    of phi_b(mu_b) = sum_s U_{s,b} / sqrt(mu_b + nu_s) = 1 in [M_b^2 - max nu, M_b^2 - min nu]
    (over the row's support). Root: safeguarded Newton on phi^(-2) - 1 (one step when the row's
    nu are equal), bisection whenever Newton leaves the bracket.

    Args:
        u: (P, S) float >= 0, every row with a positive entry.
        pos: (P, S) bool, u > 0.
        nu: (S,) float >= 0.
        guess: optional (P,) previous mu (warm start: used where it lies inside the bracket).

    Returns:
        (P,) float mu >= 0.
    """
    mu = np.zeros(u.shape[0])
    nu_row = np.broadcast_to(nu, u.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        phi0 = np.where(pos, u / np.sqrt(nu_row), 0.0).sum(axis=1)
    rows = np.flatnonzero(phi0 > 1.0)
    if rows.size == 0:
        return mu
    ur, nr, pr = u[rows], nu_row[rows], pos[rows]
    m2 = ur.sum(axis=1) ** 2
    lo = np.maximum(0.0, m2 - np.where(pr, nr, -np.inf).max(axis=1))
    numin = np.where(pr, nr, np.inf).min(axis=1)
    hi = m2 - numin
    # Start left of the root, where Newton on the concave psi is monotone: phi(x) >= 1 for
    # x <= U_j^2 - nu_j (any j) and for x <= Z^2, Z = sum of U_s with nu_s = 0 (phi(0) is then
    # infinite); x = 0 when every nu_s > 0 (phi(0) > 1 is finite there).
    zero = (ur * (pr & (nr == 0))).sum(axis=1)
    x = np.maximum.reduce([lo, zero**2, np.where(pr, ur * ur - nr, 0.0).max(axis=1)])
    x = np.minimum(x, hi)
    if guess is not None:
        g0 = guess[rows]
        x = np.where((g0 > x) & (g0 < hi), g0, x)
    out = np.empty(rows.size)
    live = np.arange(rows.size)  # rows still iterating (compressed every step)
    for _ in range(200):
        rr = np.where(pr, 1.0 / np.sqrt(np.where(pr, x[:, None] + nr, 1.0)), 0.0)
        phi = (ur * rr).sum(axis=1)
        above = phi > 1.0
        lo = np.where(above, x, lo)
        hi = np.where(above, hi, x)
        dpsi = (ur * rr**3).sum(axis=1) / phi**3
        x_new = x - (phi**-2 - 1.0) / dpsi
        x_new = np.where((x_new >= lo) & (x_new <= hi), x_new, 0.5 * (lo + hi))
        # mu only matters through mu + nu_s: converge relative to x + min_s nu_s
        tol_x = 1e-14 * (x + numin)
        done = (np.abs(x_new - x) <= tol_x) | (phi == 1.0) | (hi - lo <= tol_x)
        out[live[done]] = x_new[done]
        keep = ~done
        if not keep.any():
            break
        live, x, lo, hi, numin = live[keep], x_new[keep], lo[keep], hi[keep], numin[keep]
        ur, nr, pr = ur[keep], nr[keep], pr[keep]
    else:
        out[live] = x
    mu[rows] = out
    return mu


def _neg_hessian(a: np.ndarray, bind: np.ndarray) -> np.ndarray:
    """-d^2 G / dnu^2 (S x S) for G(nu) = g(mu(nu), nu) (docs/algorithms.md section 4.5).

    a = U r^3 / 2 (P, S); bind (P,) bool marks binding rows. The diagonal of a binding row's
    Laplacian, a_s (A_b - a_s) / A_b, is formed from the sum of the OTHER entries (prefix +
    suffix sums), so a dominant a_s cannot cancel the small eigenvalues away.
    """
    ab = a[bind]
    big = ab.sum(axis=1, keepdims=True)
    others = (np.cumsum(ab, axis=1) - ab) + (np.cumsum(ab[:, ::-1], axis=1)[:, ::-1] - ab)
    diag = a[~bind].sum(axis=0) + (ab * others / big).sum(axis=0)
    w = ab / np.sqrt(big)
    hneg = -(w.T @ w)
    np.fill_diagonal(hneg, diag)
    return hneg


def _newton_nu(u, pos, m, nu, tol, max_iter):
    """Phase 1: projected damped Newton on G(nu) = max_mu g(mu, nu), mu exact (:func:`_inner_mu`).

    docs/algorithms.md section 4.5, step 2. Free set: nu_s > 0 or dG/dnu_s = sum_b p_{s|b} - m_s
    > 0; the step solves (H_FF + damping * diag(c_F)) d_F = grad_F, c_s = sum_b a_{s,b}. Can
    stall at kinks (rows switching between slack and binding): then :func:`_barrier` runs.

    Returns (p_f, V(p_f), g, nu, mu, iterations, converged).
    """
    num_s = u.shape[1]
    mu = _inner_mu(u, pos, nu)
    p, r = _dual_point(u, pos, mu, nu)
    g = _dual_value(u, r, mu, nu, m)
    damping = 1e-12
    for it in range(1, max_iter + 1):
        pf, v = _certificate(u, pos, p, m)
        if v - g <= tol * v:
            return pf, v, g, nu, mu, it, True
        grad = p.sum(axis=0) - m
        free = (nu > 0) | (grad > 0)
        a = 0.5 * p * r * r
        f = np.flatnonzero(free)
        hff = _neg_hessian(a, mu > 0)[np.ix_(f, f)]
        curv = np.diag(a.sum(axis=0)[f])
        accepted = False
        for _ in range(40):
            try:
                d_f = np.linalg.solve(hff + damping * curv, grad[f])
            except np.linalg.LinAlgError:
                d_f = grad[f] / (damping * np.diag(curv))
            d = np.zeros(num_s)
            d[f] = d_f
            # Two candidates from one direction: the step taken in y = nu^(-1/2), in which a
            # column sum over slack rows is linear (it shrinks nu geometrically, never past 0),
            # and the plain step projected onto nu >= 0 (reaches nu_s = 0 for slack models).
            shrink = (d < 0) & (nu > 0)
            with np.errstate(over="ignore"):
                ratio = np.divide(d, 2.0 * nu, out=np.zeros(num_s), where=shrink)
                cands = [np.where(shrink, nu / (1.0 - ratio) ** 2, np.maximum(0.0, nu + d))]
            if (nu + d < 0).any():
                cands.append(np.maximum(0.0, nu + d))
            best_t = None
            for nu_c in cands:
                mu_c = _inner_mu(u, pos, nu_c, mu)
                p_c, r_c = _dual_point(u, pos, mu_c, nu_c)
                g_c = _dual_value(u, r_c, mu_c, nu_c, m)
                if best_t is None or g_c > best_t[4]:
                    best_t = (nu_c, mu_c, p_c, r_c, g_c)
            nu_t, mu_t, p_t, r_t, g_t = best_t
            if g_t >= g + 1e-4 * float(grad @ (nu_t - nu)) - 1e-14 * abs(g):
                accepted = True
                break
            damping = min(damping * 10.0, 1e30)
        if not accepted:
            break
        damping = max(damping / 10.0, 1e-12)
        nu, mu, p, r, g = nu_t, mu_t, p_t, r_t, g_t
    pf, v = _certificate(u, pos, p, m)
    return pf, v, g, nu, mu, max_iter, v - g <= tol * v


def _barrier(u, pos, m, tol, max_iter):
    """Phase 2: log-barrier Newton on the dual in (mu, nu) > 0 (docs/algorithms.md section 4.5).

    Maximises g(mu, nu) + t (sum_b log mu_b + sum_s log nu_s) for decreasing t: one S x S Schur
    solve per step, O(P S^2). t shrinks 10x (and to a tenth of the gap per constraint) once the
    Newton decrement is small.

    Returns (p_f, V(p_f), g, nu, mu, iterations, converged).
    """
    num_p, num_s = u.shape
    n_con = num_p + num_s
    # strictly feasible start: mu_b = M_b^2 makes every row sum < 1, nu_s = (M_s / m_s)^2
    # every column sum < m_s
    mu = u.sum(axis=1) ** 2
    nu = (u.sum(axis=0) / m) ** 2
    p, r = _dual_point(u, pos, mu, nu)
    g = _dual_value(u, r, mu, nu, m)
    best = (*_certificate(u, pos, p, m), g, nu, mu)
    t = max(best[1] - g, 1e-300) / n_con
    for it in range(1, max_iter + 1):
        g_mu = p.sum(axis=1) - 1.0 + t / mu
        g_nu = p.sum(axis=0) - m + t / nu
        a = 0.5 * p * r * r
        bar_mu = t / mu**2
        d_mu = a.sum(axis=1) + bar_mu
        others = (np.cumsum(a, axis=1) - a) + (np.cumsum(a[:, ::-1], axis=1)[:, ::-1] - a)
        w = a / d_mu[:, None]
        schur = -(a.T @ w)
        np.fill_diagonal(schur, (w * (others + bar_mu[:, None])).sum(axis=0) + t / nu**2)
        rhs = g_nu - w.T @ g_mu
        try:
            dn = np.linalg.solve(schur, rhs)
        except np.linalg.LinAlgError:
            dn = rhs / np.diag(schur)
        dm = (g_mu - a @ dn) / d_mu
        decrement = float(g_mu @ dm + g_nu @ dn)
        step = 1.0
        for x, dx in ((mu, dm), (nu, dn)):
            neg = dx < 0
            if neg.any():
                step = min(step, 0.99 * float(np.min(-x[neg] / dx[neg])))
        phi = g + t * (np.log(mu).sum() + np.log(nu).sum())
        for _ in range(50):
            mu_t, nu_t = mu + step * dm, nu + step * dn
            p_t, r_t = _dual_point(u, pos, mu_t, nu_t)
            g_t = _dual_value(u, r_t, mu_t, nu_t, m)
            phi_t = g_t + t * (np.log(mu_t).sum() + np.log(nu_t).sum())
            if phi_t >= phi + 1e-4 * step * decrement - 1e-15 * (abs(phi) + abs(g)):
                break
            step *= 0.5
        mu, nu, p, r, g = mu_t, nu_t, p_t, r_t, g_t
        pf, v = _certificate(u, pos, p, m)
        if v - g < best[1] - best[2]:
            best = (pf, v, g, nu, mu)
        if v - g <= tol * v:
            return pf, v, g, nu, mu, it, True
        if decrement <= 100.0 * t or step < 1e-12:
            t = max(min(0.1 * t, 0.1 * (v - g) / n_con), 1e-300)
    return (*best, max_iter, False)


def _solve_per_model(
    u: np.ndarray, m: np.ndarray, tol: float, max_iter: int
) -> tuple[np.ndarray, np.ndarray, int, str, float]:
    """Solve the per-model problem. u (P, S) scaled to max 1, every row and column with a
    positive entry; m (S,) > 0.

    Returns (p, nu, iterations, method, gap): p feasible, nu the model multipliers, gap the
    certified relative duality gap (V(p) - g(mu, nu)) / V(p).
    """
    pos = u > 0
    num_s = u.shape[1]
    mass = u.sum(axis=1)

    def certified(p, mu, nu):
        pf, v = _certificate(u, pos, p, m)
        _, r = _dual_point(u, pos, mu, nu)
        return pf, max(0.0, (v - _dual_value(u, r, mu, nu, m)) / v)

    # (a) the single-total-budget optimum (m = sum_s m_s) solves a relaxation: when it respects
    #     every m_s it is optimal here too (always for S = 1, or when no model budget binds).
    #     Multipliers: nu_s = lambda^2, mu_b = M_b^2 - lambda^2 on capped rows.
    q, lam, _ = water_fill(mass, float(m.sum()))
    p = u * (q / mass)[:, None]
    if (p.sum(axis=0) <= m * (1.0 + 1e-12)).all():
        lam2 = lam**2 if np.isfinite(lam) else 0.0
        nu = np.full(num_s, lam2)
        mu = np.where(q >= 1.0, np.maximum(mass**2 - lam2, 0.0), 0.0)
        pf, gap = certified(p, mu, nu)
        return pf, nu, 0, "single-budget closed form", gap
    # (b) every model budget binds and no processor does: p = m_s U_{s,b} / sum_b U_{s,b}
    #     (nu_s = (sum_b U_{s,b} / m_s)^2, mu = 0) when those rows sum to <= 1.
    nu = (u.sum(axis=0) / m) ** 2
    p = u * (m / u.sum(axis=0))
    if (p.sum(axis=1) <= 1.0 + 1e-12).all():
        pf, gap = certified(p, np.zeros(u.shape[0]), nu)
        return pf, nu, 0, "per-model closed form", gap
    # (c) Newton on nu from (b)'s multipliers; (d) the barrier method if (c) stalls.
    pf, v, g, nu, mu, it, ok = _newton_nu(u, pos, m, nu, tol, max_iter)
    method = "dual Newton"
    if not ok:
        pf2, v2, g2, nu2, mu2, it2, _ = _barrier(u, pos, m, tol, max_iter)
        method = "dual Newton + barrier"
        it += it2
        if v2 - g2 < v - g:
            pf, v, g, nu = pf2, v2, g2, nu2
    return pf, nu, it, method, max(0.0, (v - g) / v)


def optimal_probabilities_per_model_info(
    scores: np.ndarray,
    budgets: np.ndarray,
    *,
    eligible: np.ndarray | None = None,
    tol: float = 1e-11,
    max_iter: int = 200,
) -> tuple[np.ndarray, PerModelInfo]:
    """Optimal sampling under one budget per model (docs/algorithms.md section 4.5, FairVR).

    Minimises V(p) = sum_{s,b} U_{s,b}^2 / p_{s|b} subject to sum_s p_{s|b} <= 1,
    sum_b p_{s|b} <= m_s and p = 0 where U = 0 or the pair is ineligible, by dual decomposition:
    two closed forms, then dual Newton on nu, then a log-barrier fallback (section 4.5). It
    stops on a certified relative duality gap <= ``tol``, so p is always feasible and within
    ``tol`` of the optimum.

    Complexity: O(P S^2 + P S k) per Newton iteration (k ~ 3-10 inner Newton steps, on the
    binding rows only); typically 3-15 iterations. The closed forms cost O(P S + P log P).

    Edge cases: m_s = 0 or a model without positive scores gives a zero column; budgets beyond
    what the processors can supply give nu_s = 0 and a column sum below m_s (noted); all scores
    zero is solved with U = 1 on every eligible pair (``fallback = "equal"``); all budgets zero
    gives zeros. With S = 1 (or no binding model budget) the result equals
    :func:`mmfl.core.probabilities.optimal_probabilities` with m = sum_s m_s.

    Args:
        scores: (P, S) float >= 0, U_{s,b}. Not mutated.
        budgets: (S,) float >= 0, m_s.
        eligible: optional (P, S) bool mask (default: all eligible).
        tol: relative duality gap at which to stop (certified; see above).
        max_iter: maximum Newton iterations (per phase).

    Returns:
        (p, info): p (P, S) float in [0, 1], row sums <= 1, column sums <= m_s; info a
        :class:`PerModelInfo`.

    Raises:
        ValueError: bad scores (see :func:`optimal_probabilities_info`), budgets not (S,),
            negative, NaN or inf.
    """
    u, elig = check_scores(scores, eligible)
    num_p, num_s = u.shape
    mb = np.array(budgets, dtype=np.float64, copy=True)
    if mb.shape != (num_s,):
        raise ValueError(f"budgets must have shape (S,) = ({num_s},), got {np.shape(budgets)}")
    if not (mb >= 0).all() or not np.isfinite(mb).all():
        raise ValueError(f"budgets must be finite numbers >= 0, got {mb.tolist()}")
    info = PerModelInfo(per_model=np.zeros(num_s), budgets=mb, nu=np.zeros(num_s))
    p = np.zeros(u.shape, dtype=np.float64)
    if u.size == 0 or not (mb > 0).any():
        return p, info
    scale = float(u.max())
    fallback = ""
    if scale == 0.0:
        if not elig.any():
            return p, dataclasses.replace(info, note="no eligible pair: all probabilities are zero")
        u = elig.astype(np.float64)
        scale = 1.0
        fallback = "equal"
    else:
        u /= scale
    active_s = (mb > 0) & (u > 0).any(axis=0)
    rows = np.flatnonzero((u[:, active_s] > 0).any(axis=1))
    nu = np.zeros(num_s)
    it, method, gap = 0, "", 0.0
    if rows.size:
        sub = u[np.ix_(rows, np.flatnonzero(active_s))]
        p_sub, nu_sub, it, method, gap = _solve_per_model(sub, mb[active_s], tol, max_iter)
        np.minimum(p_sub, 1.0, out=p_sub)
        p[np.ix_(rows, np.flatnonzero(active_s))] = p_sub
        with np.errstate(over="ignore"):  # score^2 units may exceed the float range
            nu[active_s] = nu_sub * scale * scale
    col = p.sum(axis=0)
    short = np.flatnonzero(col < mb * (1 - 1e-6))
    notes = []
    if fallback:
        notes.append("all scores are zero: equal scores on eligible pairs")
    if short.size:
        notes.append(
            "models "
            + ", ".join(f"{s} ({col[s]:.6g} < m_s={mb[s]:g})" for s in short)
            + " cannot use their whole budget (too few processors with positive scores, or "
            "their processors are full)"
        )
    return p, dataclasses.replace(info, expected=float(col.sum()), per_model=col, nu=nu,
                                  iterations=it, method=method, gap=gap, fallback=fallback,
                                  note="; ".join(notes))


def optimal_probabilities_per_model(
    scores: np.ndarray,
    budgets: np.ndarray,
    *,
    eligible: np.ndarray | None = None,
) -> np.ndarray:
    """Optimal (P, S) matrix under per-model budgets m_s (docs/algorithms.md section 4.5, FairVR).

    The matrix of :func:`optimal_probabilities_per_model_info` without its record (see there
    for the constraints and edge cases).

    Args:
        scores: (P, S) float >= 0, U_{s,b}. Not mutated.
        budgets: (S,) float >= 0, m_s.
        eligible: optional (P, S) bool mask (default: all eligible).

    Returns:
        (P, S) float in [0, 1], row sums <= 1, column sums <= m_s.
    """
    return optimal_probabilities_per_model_info(scores, budgets, eligible=eligible)[0]
