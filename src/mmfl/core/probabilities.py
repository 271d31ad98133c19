"""Optimal variance-reduced sampling probabilities (docs/algorithms.md section 4).

Given non-negative scores ``U[b, s] = U_{s,b}`` (section 5: already multiplied by d_{i,s}/B_i and
zero where client i(b) holds no data for s), these functions choose the inclusion probabilities
``p[b, s] = p_{s|b}`` that minimise the variance proxy of section 4

    V(p) = sum_{s,b} U_{s,b}^2 / p_{s|b}

under the constraints of section 1 (p >= 0, sum_s p_{s|b} <= 1, p = 0 where U = 0 or the pair is
not eligible) and either one total budget sum_{s,b} p_{s|b} = m (:func:`optimal_probabilities`,
the closed form) or one budget per model sum_b p_{s|b} <= m_s
(:func:`optimal_probabilities_per_model`, the MMFL-FairVR variant, solved exactly by dual
decomposition).

Public functions:

* :func:`optimal_probabilities` - the contract ``optimal_probabilities(scores, budget)`` of
  DESIGN.md: the (P, S) matrix of section 4.
* :func:`optimal_probabilities_info` - the same plus a record (expected count, capped
  processors, water level lambda, note for the round's record).
* :func:`optimal_probabilities_per_model` / :func:`optimal_probabilities_per_model_info` - the
  per-model budget variant.
* :func:`uniform_probabilities` - the no-information fallback (uniform over eligible pairs).
* :func:`sampling_variance` - V(p), for diagnostics and tests.

Everything is pure numpy, vectorised over processors, and never mutates its inputs.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "optimal_probabilities",
    "optimal_probabilities_info",
    "optimal_probabilities_per_model",
    "optimal_probabilities_per_model_info",
    "sampling_variance",
    "uniform_probabilities",
]

# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_scores(scores: np.ndarray, eligible: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Validated (U, eligible): U a fresh float64 (P, S) copy, zero where not eligible."""
    u = np.array(scores, dtype=np.float64, copy=True)
    if u.ndim != 2:
        raise ValueError(f"scores must be a 2-D (P, S) array, got shape {u.shape}")
    # (u >= 0) is False for NaN, so one pass rejects negatives and NaN.
    if u.size and not (u >= 0).all():
        if np.isnan(u).any():
            raise ValueError("scores must not contain NaN")
        raise ValueError(f"scores must be >= 0, got minimum {float(np.nanmin(u))!r}")
    if u.size and not np.isfinite(u).all():
        raise ValueError("scores must be finite (got +inf)")
    if eligible is None:
        elig = np.ones(u.shape, dtype=bool)
    else:
        elig = np.asarray(eligible, dtype=bool)
        if elig.shape != u.shape:
            raise ValueError(f"eligible must have the scores' shape {u.shape}, got {elig.shape}")
        u[~elig] = 0.0
    return u, elig


def _check_budget(budget: float, name: str = "budget") -> float:
    try:
        m = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number >= 0, got {budget!r}") from None
    if math.isnan(m) or math.isinf(m) or m < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {budget!r}")
    return m


# --------------------------------------------------------------------------------------------
# Diagnostics and the uniform fallback
# --------------------------------------------------------------------------------------------


def sampling_variance(scores: np.ndarray, probabilities: np.ndarray) -> float:
    """V(p) = sum_{s,b} U_{s,b}^2 / p_{s|b} over entries with U > 0 (docs/algorithms.md section 4).

    Args:
        scores: (P, S) float >= 0, U.
        probabilities: (P, S) float, p.

    Returns:
        V(p) as a float; ``inf`` when some U > 0 has p = 0.
    """
    u = np.asarray(scores, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    if u.shape != p.shape:
        raise ValueError(f"scores {u.shape} and probabilities {p.shape} must have one shape")
    pos = u > 0
    if (p[pos] <= 0).any():
        return math.inf
    return float(np.sum(u[pos] ** 2 / p[pos]))


def uniform_probabilities(eligible: np.ndarray, budget: float) -> np.ndarray:
    """Uniform sampling over eligible pairs: the no-information fallback of section 4.

    Every processor with at least one eligible model is active with probability
    q_b = min(1, m / P_elig) and, when active, trains one of its eligible models uniformly:
    p_{s|b} = q_b / |{s : eligible[b, s]}| on eligible pairs, 0 elsewhere.

    Args:
        eligible: (P, S) bool.
        budget: m >= 0.

    Returns:
        (P, S) float; it sums to min(m, P_elig).
    """
    elig = np.asarray(eligible, dtype=bool)
    if elig.ndim != 2:
        raise ValueError(f"eligible must be a 2-D (P, S) array, got shape {elig.shape}")
    m = _check_budget(budget)
    count = elig.sum(axis=1)
    n_el = int((count > 0).sum())
    p = np.zeros(elig.shape, dtype=np.float64)
    if n_el == 0 or m == 0:
        return p
    q = min(1.0, m / n_el)
    rate = np.divide(q, count, out=np.zeros(count.shape, np.float64), where=count > 0)
    p[elig] = np.broadcast_to(rate[:, None], elig.shape)[elig]
    return p


# --------------------------------------------------------------------------------------------
# One total budget: the closed form (section 4, steps 1-4)
# --------------------------------------------------------------------------------------------


def _water_fill(mass: np.ndarray, m: float) -> tuple[np.ndarray, float, int]:
    """q_b = min(1, M_b / lambda) with sum_b q_b = min(m, #{M_b > 0}) (section 4, steps 1-3).

    Args:
        mass: (P,) float >= 0, M_b = sum_s U_{s,b}.
        m: budget > 0.

    Returns:
        (q (P,), lambda, number of capped processors). ``lambda`` is ``nan`` when every
        positive-mass processor is capped (m >= #{M_b > 0}; any lambda <= min M_b would do) and
        ``inf`` when no processor has positive mass.

    Method: with the positive masses sorted ascending, M_(1) <= ... <= M_(K), capping the c
    largest leaves lambda_c = T_c / (m - c) with T_c = M_(1) + ... + M_(K-c) (summed from the
    smallest, so it is accurate). The optimum caps the smallest c in {0, ..., ceil(m) - 1} with
    M_(K-c) <= lambda_c, i.e. the paper's largest l = K - c. All candidate c are tested at
    once (no loop over processors): O(P log P) for the sort, O(m) for the test.
    """
    pos = mass > 0
    k = int(pos.sum())
    q = np.zeros(mass.shape, dtype=np.float64)
    if k == 0:
        return q, math.inf, 0
    if m >= k:
        q[pos] = 1.0
        return q, math.nan, k
    asc = np.sort(mass[pos])
    tail = np.cumsum(asc)  # tail[j] = sum of the j + 1 smallest masses
    c = np.arange(min(math.ceil(m), k))  # candidate numbers of capped processors, all < m
    idx = k - 1 - c
    ok = asc[idx] * (m - c) <= tail[idx]
    # ok[-1] holds exactly: m - c <= 1 and tail >= asc there.
    c0 = int(np.argmax(ok))
    inv_lam = (m - c0) / float(tail[k - 1 - c0])  # 1 / lambda (no overflow for tiny m)
    q = np.minimum(1.0, mass * inv_lam)
    lam = 1.0 / inv_lam if inv_lam > 0 else math.inf
    return q, lam, c0


def optimal_probabilities_info(
    scores: np.ndarray,
    budget: float,
    *,
    eligible: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """The optimal (P, S) sampling matrix of docs/algorithms.md section 4, with a record.

    Minimises V(p) = sum_{s,b} U_{s,b}^2 / p_{s|b} subject to p >= 0, sum_s p_{s|b} <= 1,
    sum_{s,b} p_{s|b} = m and p = 0 where U = 0. With M_b = sum_s U_{s,b}:

        q_b = min(1, M_b / lambda),  sum_b q_b = m  (water-filling; section 4 steps 1-3),
        p_{s|b} = q_b * U_{s,b} / M_b               (step 4; 0 where M_b = 0).

    Edge cases (never NaN):

    * m = 0: all zeros.
    * m >= K = #{b : M_b > 0}: every positive-mass processor gets q_b = 1, so the expected number
      of slots sum p = K < m; the record says so.
    * M_b = 0 while others are positive: q_b = 0.
    * all scores zero (no information): :func:`uniform_probabilities` over the eligible pairs.

    Args:
        scores: (P, S) float >= 0, U_{s,b} (rows processors b, columns models s). Not mutated.
        budget: m >= 0 (may be fractional).
        eligible: optional (P, S) bool; ineligible pairs get p = 0 (their scores are ignored).
            Default: every pair is eligible. Only used beyond masking by the all-zero fallback.

    Returns:
        (p, info): p (P, S) float in [0, 1] with row sums <= 1; info a dict with
        ``expected`` (sum of p), ``budget`` (m), ``positive`` (K), ``capped`` (#{q_b = 1}),
        ``lambda`` (the water level in score units; nan when all are capped, inf without
        positive scores), ``fallback`` ("uniform" or ""), ``note`` (text for the round's record,
        "" when sum p = m).

    Raises:
        ValueError: scores not 2-D, negative, NaN or inf; budget negative, NaN or inf; eligible
            of the wrong shape.

    Complexity: O(P S + P log P) time, vectorised (no Python loop over processors).

    Example (section 4's worked example): scores [[0.6, 0.1], [0.3, 0], [0.3, 0], [0.4, 1.8]]
    and m = 2 give q = (7/13, 3/13, 3/13, 1) and p[0] = (6/13, 1/13), p[3] = (2/11, 9/11).
    """
    u, elig = _check_scores(scores, eligible)
    m = _check_budget(budget)
    num_p = u.shape[0]
    info: dict = {
        "expected": 0.0,
        "budget": m,
        "positive": 0,
        "capped": 0,
        "lambda": math.inf,
        "fallback": "",
        "note": "",
    }
    p = np.zeros(u.shape, dtype=np.float64)
    if m == 0 or u.size == 0:
        if m > 0:
            info["note"] = f"no processor or model: expected slots 0 < m={m:g}"
        return p, info
    scale = float(u.max())
    if scale == 0.0:
        p = uniform_probabilities(elig, m)
        n_el = int(elig.any(axis=1).sum())
        expected = float(p.sum())
        info.update(
            expected=expected,
            capped=n_el if m >= n_el else 0,
            fallback="uniform",
            note="all scores are zero: uniform over eligible pairs"
            + (f"; only {n_el} eligible processors, expected slots {n_el} < m={m:g}"
               if m > n_el else ""),
        )
        return p, info
    u /= scale  # scale invariance: p does not change; avoids overflow of M_b
    mass = u.sum(axis=1)
    q, lam, capped = _water_fill(mass, m)
    ratio = np.divide(q, mass, out=np.zeros(num_p), where=mass > 0)
    p = u
    p *= ratio[:, None]
    np.minimum(p, 1.0, out=p)
    k = int((mass > 0).sum())
    expected = float(p.sum())
    info.update(
        expected=expected,
        positive=k,
        capped=int(capped),
        **{"lambda": lam * scale if np.isfinite(lam) else lam},
    )
    if m > k:
        info["note"] = (
            f"only {k} processors have positive scores for budget m={m:g}: each used with "
            f"q=1, expected slots {k} < m"
        )
    return p, info


def optimal_probabilities(
    scores: np.ndarray,
    budget: float,
    *,
    eligible: np.ndarray | None = None,
) -> np.ndarray:
    """The optimal (P, S) matrix p_{s|b} of docs/algorithms.md section 4 (the DESIGN.md contract).

    Closed form: q_b = min(1, M_b / lambda) with M_b = sum_s U_{s,b} and lambda such that
    sum_b q_b = m, then p_{s|b} = q_b U_{s,b} / M_b. See :func:`optimal_probabilities_info` for
    the edge cases and for the record (expected count when m exceeds the processors with
    positive scores).

    Args:
        scores: (P, S) float >= 0, U_{s,b}. Not mutated.
        budget: m >= 0, possibly fractional.
        eligible: optional (P, S) bool mask (default: all eligible).

    Returns:
        (P, S) float in [0, 1], row sums <= 1, total min(m, #{b : M_b > 0}).
    """
    return optimal_probabilities_info(scores, budget, eligible=eligible)[0]


# --------------------------------------------------------------------------------------------
# One budget per model (the MMFL-FairVR variant of section 4)
# --------------------------------------------------------------------------------------------
#
# Problem: min V(p) = sum U^2/p  s.t.  sum_s p_{s|b} <= 1 (multiplier mu_b),
#                                     sum_b p_{s|b} <= m_s (multiplier nu_s),  p >= 0.
# Minimising the Lagrangian over p gives p_{s|b} = U_{s,b} / sqrt(mu_b + nu_s) and the dual
#     g(mu, nu) = sum_{U>0} 2 U_{s,b} sqrt(mu_b + nu_s) - sum_b mu_b - sum_s m_s nu_s,
# concave, to be maximised over mu, nu >= 0. For ANY mu, nu >= 0, g(mu, nu) <= V* <= V(p_f) for
# every feasible p_f: the solvers below stop on this certificate, V(p_f) - g <= tol * V(p_f),
# with p_f = p(mu, nu) shrunk onto the feasible set (rows, then columns).


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

    Processor b's part, 2 sum_s U_{s,b} sqrt(mu_b + nu_s) - mu_b, has derivative phi_b(mu_b) - 1
    with phi_b(mu) = sum_s U_{s,b} / sqrt(mu + nu_s) (the row sum of p), decreasing. So mu_b = 0
    when phi_b(0) <= 1 (row slack), else the root of phi_b = 1, which lies in the bracket
    [M_b^2 - max_s nu_s, M_b^2 - min_s nu_s] (max / min over the row's support). If some
    nu_s = 0 on the row's support, phi_b(0) is infinite and mu_b > 0: the row binds and p stays
    finite. Root: safeguarded Newton on psi(mu) = phi(mu)^(-2) - 1 (exactly linear when the
    row's nu are equal, so one step), bisection whenever Newton leaves the bracket.

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
    """-d^2 G / dnu^2 (S x S) for G(nu) = g(mu(nu), nu), assembled without cancellation.

    a = U r^3 / 2 (= -dp/dnu at fixed mu). A processor contributes diag(a_b) when its row is
    slack and the weighted Laplacian diag(a_b) - a_b a_b^T / A_b when it binds (A_b = sum_s
    a_{s,b}; mu_b moves with nu). That diagonal, a_s (A_b - a_s) / A_b, is formed from the sum
    of the OTHER entries (exclusive prefix + suffix sums), so a dominant a_s cannot cancel the
    small eigenvalues away.
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

    Free set: nu_s > 0 or dG/dnu_s = sum_b p_{s|b} - m_s > 0. Step: (H_FF + damping * diag(c_F))
    d_F = grad_F with H = -d^2G/dnu^2 and c_s = sum_b a_{s,b} (Levenberg-Marquardt, needed along
    the flat direction (nu + c, mu - c) when every processor binds), applied in y = nu^(-1/2)
    and, when it would cross 0, also projected in nu; the better candidate must pass an Armijo
    test on G. Quadratic once the sets of binding rows / models settle; can stall at
    the kinks where a row switches between slack and binding, hence the barrier fallback.

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
    """Phase 2: log-barrier Newton on the dual in (mu, nu) > 0; robust at every kink.

    Maximises phi_t = g(mu, nu) + t (sum_b log mu_b + sum_s log nu_s) for decreasing t. The
    negated Hessian [[diag(A + t/mu^2), a], [a^T, diag(c + t/nu^2)]] has a diagonal mu-block, so
    the Newton step eliminates mu in closed form and solves an S x S Schur system: O(P S^2) per
    step. Fraction-to-boundary step, Armijo backtracking on phi_t; t shrinks by 10x (and to a
    tenth of the current gap per constraint) once the Newton decrement is small.

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
    q, lam, _ = _water_fill(mass, float(m.sum()))
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
) -> tuple[np.ndarray, dict]:
    """Optimal sampling under one budget per model (docs/algorithms.md section 4, FairVR variant).

    Solves exactly (to ``tol``) the convex problem

        minimise   V(p) = sum_{s,b} U_{s,b}^2 / p_{s|b}
        subject to sum_s p_{s|b} <= 1 for every processor b   (multiplier mu_b >= 0),
                   sum_b p_{s|b} <= m_s for every model s     (multiplier nu_s >= 0),
                   p >= 0, p = 0 where U = 0 or the pair is ineligible.

    Method (dual decomposition). Minimising the Lagrangian over p gives
    p_{s|b} = U_{s,b} / sqrt(mu_b + nu_s) and the concave dual
    g(mu, nu) = sum 2 U_{s,b} sqrt(mu_b + nu_s) - sum_b mu_b - sum_s m_s nu_s over mu, nu >= 0.

    1. Closed forms first. (a) The single-budget optimum with m = sum_s m_s
       (:func:`optimal_probabilities`) solves a relaxation; if its column sums respect every
       m_s it is optimal (always for S = 1, and whenever no model budget binds).
       (b) p_{s|b} = m_s U_{s,b} / sum_b' U_{s,b'} (every model binds, no processor does) is
       optimal when its row sums are <= 1. Both cost O(P S) (+ the sort of (a)).
    2. Otherwise, dual Newton on nu (S variables) with mu eliminated exactly: for fixed nu
       each processor maximises 2 sum_s U_{s,b} sqrt(mu_b + nu_s) - mu_b, so mu_b = 0 when
       sum_s U_{s,b} / sqrt(nu_s) <= 1 (row slack), else the root of
       sum_s U_{s,b} / sqrt(mu_b + nu_s) = 1 in [M_b^2 - max nu, M_b^2 - min nu] (safeguarded
       Newton, vectorised over processors). With some nu_s = 0 on a row's support the row sum
       at mu_b = 0 is infinite, so mu_b > 0: the processor constraint binds and p stays finite.
       G(nu) = max_mu g is concave with gradient sum_b p_{s|b} - m_s and a closed-form S x S
       Hessian (assembled without cancellation). Projected Levenberg-Marquardt Newton steps
       (the damping handles the flat direction (nu + c, mu - c) when every processor binds),
       each tried both in nu and in y = nu^(-1/2) (in which a column sum over slack rows is
       linear, so shrinking nu_s cannot overshoot past 0), the better accepted by an Armijo
       test on G. Starts from (b)'s multipliers.
    3. Fallback if 2 stalls at a kink (a processor switching between slack and binding): a
       log-barrier Newton method on (mu, nu) > 0, whose steps eliminate the diagonal mu-block
       and solve an S x S Schur system.

    Stopping rule (a certificate, not a heuristic): for any mu, nu >= 0, g(mu, nu) <= V* <=
    V(p_f), where p_f is p(mu, nu) shrunk onto the feasible set (rows to <= 1, then columns to
    <= m_s). The solver stops when (V(p_f) - g) / V(p_f) <= ``tol`` and returns p_f, so the result
    is always feasible and its objective is within ``tol`` (relative) of the optimum.

    Complexity: O(P S^2 + P S k) per Newton iteration (k ~ 3-10 inner Newton steps, on the
    binding rows only); typically 3-15 iterations.

    Edge cases: m_s = 0 or a model without positive scores -> that column is 0; budgets larger
    than the processors can give -> nu_s = 0 and a column sum below m_s (see the note); all
    scores zero -> the same problem with U = 1 on every eligible pair (no information: equal
    scores); all budgets zero -> zeros. With S = 1 (or budgets so large that none binds) the
    result equals :func:`optimal_probabilities` with m = sum_s m_s.

    Args:
        scores: (P, S) float >= 0, U_{s,b}. Not mutated.
        budgets: (S,) float >= 0, m_s.
        eligible: optional (P, S) bool mask (default: all eligible).
        tol: relative duality gap at which to stop (certified; see above).
        max_iter: maximum Newton iterations (per phase).

    Returns:
        (p, info): p (P, S) float in [0, 1], row sums <= 1, column sums <= m_s; info a dict with
        ``expected`` (sum p), ``per_model`` ((S,) column sums), ``budgets`` ((S,) m_s), ``nu``
        ((S,) model multipliers, score^2 units), ``iterations``, ``method`` (which step of the
        method produced p), ``gap`` (the certified relative duality gap), ``fallback`` ("equal"
        or ""), ``note`` ("" when every column sum reaches m_s).

    Raises:
        ValueError: bad scores (see :func:`optimal_probabilities_info`), budgets not (S,),
            negative, NaN or inf.
    """
    u, elig = _check_scores(scores, eligible)
    num_p, num_s = u.shape
    mb = np.array(budgets, dtype=np.float64, copy=True)
    if mb.shape != (num_s,):
        raise ValueError(f"budgets must have shape (S,) = ({num_s},), got {np.shape(budgets)}")
    if not (mb >= 0).all() or not np.isfinite(mb).all():
        raise ValueError(f"budgets must be finite numbers >= 0, got {mb.tolist()}")
    info: dict = {
        "expected": 0.0,
        "per_model": np.zeros(num_s),
        "budgets": mb,
        "nu": np.zeros(num_s),
        "iterations": 0,
        "method": "",
        "gap": 0.0,
        "fallback": "",
        "note": "",
    }
    p = np.zeros(u.shape, dtype=np.float64)
    if u.size == 0 or not (mb > 0).any():
        return p, info
    scale = float(u.max())
    if scale == 0.0:
        if not elig.any():
            info["note"] = "no eligible pair: all probabilities are zero"
            return p, info
        u = elig.astype(np.float64)
        scale = 1.0
        info["fallback"] = "equal"
    else:
        u /= scale
    active_s = (mb > 0) & (u > 0).any(axis=0)
    rows = np.flatnonzero((u[:, active_s] > 0).any(axis=1))
    if rows.size:
        sub = u[np.ix_(rows, np.flatnonzero(active_s))]
        p_sub, nu_sub, it, method, gap = _solve_per_model(sub, mb[active_s], tol, max_iter)
        info["method"] = method
        info["gap"] = gap
        np.minimum(p_sub, 1.0, out=p_sub)
        p[np.ix_(rows, np.flatnonzero(active_s))] = p_sub
        with np.errstate(over="ignore"):  # score^2 units may exceed the float range
            info["nu"][active_s] = nu_sub * scale * scale
        info["iterations"] = it
    col = p.sum(axis=0)
    info["per_model"] = col
    info["expected"] = float(col.sum())
    short = np.flatnonzero(col < mb * (1 - 1e-6))
    notes = []
    if info["fallback"]:
        notes.append("all scores are zero: equal scores on eligible pairs")
    if short.size:
        notes.append(
            "models "
            + ", ".join(f"{s} ({col[s]:.6g} < m_s={mb[s]:g})" for s in short)
            + " cannot use their whole budget (too few processors with positive scores, or "
            "their processors are full)"
        )
    info["note"] = "; ".join(notes)
    return p, info


def optimal_probabilities_per_model(
    scores: np.ndarray,
    budgets: np.ndarray,
    *,
    eligible: np.ndarray | None = None,
) -> np.ndarray:
    """Optimal (P, S) matrix under per-model budgets m_s (docs/algorithms.md section 4, FairVR).

    minimise sum U^2/p s.t. sum_s p_{s|b} <= 1, sum_b p_{s|b} <= m_s, p >= 0, p = 0 where U = 0;
    see :func:`optimal_probabilities_per_model_info` for the method and the edge cases.

    Args:
        scores: (P, S) float >= 0, U_{s,b}. Not mutated.
        budgets: (S,) float >= 0, m_s.
        eligible: optional (P, S) bool mask (default: all eligible).

    Returns:
        (P, S) float in [0, 1], row sums <= 1, column sums <= m_s.
    """
    return optimal_probabilities_per_model_info(scores, budgets, eligible=eligible)[0]
