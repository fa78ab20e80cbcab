"""Exact multiple-choice knapsack: one candidate per expert, least total damage within a bit budget.

Two exact steps, both needed at scale:

1. Lagrangian reduction.  For any λ >= 0, every feasible choice x satisfies
   ``damage(x) >= L(λ) + Σ_i r_i(x_i)`` where ``L(λ) = Σ_i min_j (d_ij + λ c_ij) - λ B``
   and ``r_ij = d_ij + λ c_ij - min_k (d_ik + λ c_ik) >= 0``.  With an incumbent of
   damage z, a candidate with ``r_ij > z - L(λ)`` cannot be part of any better
   solution and is dropped; experts left with one candidate are fixed.
2. Dynamic programming over the remaining budget, in units of the greatest
   common divisor of the candidates' cost differences (exact: every reachable
   total is a multiple of it), choosing per expert the candidate that
   minimizes ``dp[u - cost] + damage``.

Costs are integers (bits), damages non-negative floats; ``inf`` marks a
candidate an expert does not have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["KnapsackResult", "solve_mckp"]

#: Largest DP table (experts x budget units) attempted before giving up with a clear error.
MAX_DP_CELLS = 400_000_000


@dataclass(frozen=True)
class KnapsackResult:
    """The chosen candidate index per expert, its total cost and damage, and the Lagrangian lower bound."""

    choice: np.ndarray
    cost: int
    damage: float
    lower_bound: float


def solve_mckp(costs, damages, budget: int, max_dp_cells: int = MAX_DP_CELLS, reduce: bool = True) -> KnapsackResult:
    """Minimize ``Σ damages[i, choice[i]]`` subject to ``Σ costs[i, choice[i]] <= budget``, exactly.

    ``reduce=False`` skips the Lagrangian reduction (the DP then sees every
    candidate); the answer is the same, only slower, which the tests check.
    """
    costs = np.asarray(costs, dtype=np.int64)
    damages = np.asarray(damages, dtype=np.float64)
    if costs.shape != damages.shape or costs.ndim != 2 or costs.shape[0] == 0:
        raise ValueError(f"costs and damages must be equal [n_experts, n_candidates] arrays, got {costs.shape} and {damages.shape}")
    if np.any(costs < 0) or np.any(np.isnan(damages)) or np.any(damages < 0):
        raise ValueError("knapsack costs and damages must be non-negative (and damages not NaN)")
    allowed = np.isfinite(damages)
    if not allowed.any(axis=1).all():
        raise ValueError(f"expert {int(np.flatnonzero(~allowed.any(axis=1))[0])} has no candidate with a finite damage")
    cheapest = np.where(allowed, costs, np.iinfo(np.int64).max).min(axis=1)
    if cheapest.sum() > budget:
        raise ValueError(f"budget of {budget} bits is below the cheapest choice for every expert ({int(cheapest.sum())} bits)")

    lam, lower_bound, incumbent = _lagrangian(costs, damages, budget)
    reduced = damages + lam * costs
    reduced = reduced - reduced.min(axis=1, keepdims=True)
    gap = _damage(damages, incumbent) - lower_bound
    keep = allowed & (reduced <= gap + 1e-9 * max(1.0, abs(gap)) + 1e-12) if reduce else allowed.copy()
    keep[np.arange(len(incumbent)), incumbent] = True
    choice = _dp(costs, np.where(keep, damages, np.inf), budget, max_dp_cells)
    if _damage(damages, incumbent) < _damage(damages, choice):
        choice = incumbent
    return KnapsackResult(choice, int(costs[np.arange(len(choice)), choice].sum()), _damage(damages, choice), lower_bound)


def _damage(damages: np.ndarray, choice: np.ndarray) -> float:
    return float(damages[np.arange(len(choice)), choice].sum())


def _best(costs, damages, lam):
    return np.argmin(damages + lam * costs, axis=1)


def _lagrangian(costs, damages, budget) -> tuple[float, float, np.ndarray]:
    """λ near the dual optimum (bisection on the subgradient), the dual bound, and a feasible incumbent."""
    rows = np.arange(costs.shape[0])

    def spent(choice):
        return costs[rows, choice].sum()

    def dual(lam):
        return float((damages + lam * costs).min(axis=1).sum() - lam * budget)

    choice = _best(costs, damages, 0.0)
    if spent(choice) <= budget:
        return 0.0, dual(0.0), choice
    hi = 1.0
    while spent(_best(costs, damages, hi)) > budget:
        hi *= 2.0
    lo = 0.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if spent(_best(costs, damages, mid)) > budget:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    lam = lo if dual(lo) > dual(hi) else hi
    return lam, dual(lam), _best(costs, damages, hi)


def _dp(costs, damages, budget, max_dp_cells) -> np.ndarray:
    """Exact DP over the budget in GCD units; experts with one candidate left are fixed first."""
    n = costs.shape[0]
    allowed = np.isfinite(damages)
    base = np.where(allowed, costs, np.iinfo(np.int64).max).min(axis=1)
    shifted = np.where(allowed, costs - base[:, None], 0)
    unit = int(np.gcd.reduce(shifted[allowed])) or 1
    capacity = (budget - int(base.sum())) // unit
    spans = np.where(allowed, shifted, 0).max(axis=1) // unit
    open_experts = np.flatnonzero(allowed.sum(axis=1) > 1)
    capacity = min(capacity, int(spans[open_experts].sum()))
    if open_experts.size * (capacity + 1) > max_dp_cells:
        raise ValueError(
            f"exact knapsack too large after reduction ({open_experts.size} experts x {capacity + 1} budget units "
            f"of {unit} bits); use fewer candidates"
        )
    choice = np.argmin(np.where(allowed, costs, np.iinfo(np.int64).max), axis=1)
    best = np.zeros(capacity + 1)
    back = np.zeros((open_experts.size, capacity + 1), dtype=np.int16)
    for row, i in enumerate(open_experts):
        nxt = np.full(capacity + 1, np.inf)
        for j in np.flatnonzero(allowed[i]):
            step = int(shifted[i, j]) // unit
            if step > capacity:
                continue
            trial = best[: capacity + 1 - step] + damages[i, j]
            better = trial < nxt[step:]
            nxt[step:][better] = trial[better]
            back[row, step:][better] = j
        best = nxt
    u = capacity
    for row in range(open_experts.size - 1, -1, -1):
        i = open_experts[row]
        j = int(back[row, u])
        choice[i] = j
        u -= int(shifted[i, j]) // unit
    return choice
