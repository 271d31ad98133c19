"""Benchmark mmfl.core.probabilities (docs/algorithms.md section 4). Prints a table; asserts nothing.

1. optimal_probabilities (closed form) at P = 1,000,000 processors, S = 10 models, against the
   1 s target.
2. optimal_probabilities_per_model (FairVR per-model budgets) at P = 2,000, S = 5 against a
   general convex solver (cvxpy + Clarabel, conic epigraph form), on two instances:
   "typical": exponential scores, m = 0.1 P (no processor constraint binds),
   "hard": heavy-tailed scores (exponential^3), m = 0.5 P (hundreds of processors bind).
   Target: >= 100x faster at equal objective (within 1e-6 relative).

Run: .venv/bin/python benchmarks/bench_probabilities.py   (needs cvxpy for part 2)
"""

from __future__ import annotations

import time

import numpy as np

from mmfl.core.per_model import optimal_probabilities_per_model_info
from mmfl.core.probabilities import optimal_probabilities, sampling_variance


def _best_of(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _cvxpy_solve(u: np.ndarray, budgets: np.ndarray):
    """min sum U^2/p s.t. rows <= 1, columns <= m_s by cvxpy + Clarabel.

    Returns (p, build + solve seconds, solver-only seconds).
    """
    import cvxpy as cp
    import scipy.sparse as sp

    t0 = time.perf_counter()
    scale = u.max()
    un = u / scale
    num_p, num_s = un.shape
    b, s = np.nonzero(un > 0)
    n = b.size
    x, t = cp.Variable(n), cp.Variable(n)
    rows = sp.csr_matrix((np.ones(n), (b, np.arange(n))), shape=(num_p, n))
    cols = sp.csr_matrix((np.ones(n), (s, np.arange(n))), shape=(num_s, n))
    cons = [rows @ x <= 1, cols @ x <= budgets,
            cp.SOC(x + t, cp.vstack([2 * un[b, s], x - t]), axis=0)]
    prob = cp.Problem(cp.Minimize(cp.sum(t)), cons)
    prob.solve(solver="CLARABEL")
    total = time.perf_counter() - t0
    p = np.zeros(un.shape)
    p[b, s] = np.maximum(x.value, 1e-300)
    # shrink onto the feasible set (solver tolerance allows ~1e-8 violations)
    p /= np.maximum(p.sum(axis=1, keepdims=True), 1.0)
    p *= np.minimum(1.0, budgets / p.sum(axis=0))
    return p, total, float(prob.solver_stats.solve_time or float("nan"))


def bench_closed_form() -> None:
    rng = np.random.default_rng(0)
    num_p, num_s = 1_000_000, 10
    u = rng.exponential(size=(num_p, num_s)) * (rng.random((num_p, num_s)) < 0.6)
    m = 0.1 * num_p
    t, p = _best_of(lambda: optimal_probabilities(u, m), 3)
    print("## optimal_probabilities (closed form), P = 1,000,000, S = 10, m = 0.1 P")
    print(f"{'time (best of 3)':<28}{t:10.3f} s")
    print(f"{'ratio to the 1 s target':<28}{t / 1.0:10.3f}  ({'meets' if t < 1 else 'misses'})")
    print(f"{'sum p (= m)':<28}{p.sum():14.3f}")
    print()


def bench_per_model() -> None:
    try:
        import cvxpy  # noqa: F401
    except ImportError:
        print("## per-model solver vs cvxpy: skipped (cvxpy not installed)")
        return
    rng = np.random.default_rng(5)
    num_p, num_s = 2000, 5
    cases = {}
    u = rng.exponential(size=(num_p, num_s)) * (rng.random((num_p, num_s)) < 0.6)
    cases["typical"] = (u, rng.dirichlet(np.ones(num_s)) * 0.1 * num_p)
    u = (rng.exponential(size=(num_p, num_s)) * (rng.random((num_p, num_s)) < 0.6)) ** 3
    cases["hard"] = (u, rng.dirichlet(np.ones(num_s)) * 0.5 * num_p)
    print("## optimal_probabilities_per_model vs cvxpy + Clarabel, P = 2,000, S = 5")
    head = (f"{'case':<9}{'method':<27}{'binding rows':>13}{'mmfl s':>10}{'cvxpy s':>10}"
            f"{'(solve s)':>10}{'speed-up':>10}{'V mmfl':>14}{'V cvxpy':>14}{'rel diff':>11}")
    print(head)
    print("-" * len(head))
    for name, (u, budgets) in cases.items():
        t_ours, (p, info) = _best_of(lambda: optimal_probabilities_per_model_info(u, budgets), 5)
        p_ref, t_ref, t_solve = _cvxpy_solve(u, budgets)
        v = sampling_variance(u / u.max(), p)
        v_ref = sampling_variance(u / u.max(), p_ref)
        binding = int((p.sum(axis=1) > 1 - 1e-9).sum())
        print(f"{name:<9}{info.method:<27}{binding:>13d}{t_ours:>10.4f}{t_ref:>10.3f}"
              f"{t_solve:>10.3f}{t_ref / t_ours:>9.0f}x{v:>14.6e}{v_ref:>14.6e}"
              f"{(v - v_ref) / v_ref:>11.1e}")
    print("rel diff = (V mmfl - V cvxpy) / V cvxpy (negative: mmfl lower); V in units of "
          "max(U)^2; target: speed-up >= 100x with |rel diff| <= 1e-6")


if __name__ == "__main__":
    bench_closed_form()
    bench_per_model()
