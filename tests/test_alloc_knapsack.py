"""The exact multiple-choice knapsack against brute force on small random instances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moeconv.alloc.knapsack import solve_mckp


def brute_force(costs, damages, budget):
    best = np.inf
    for choice in itertools.product(*(range(costs.shape[1]) for _ in range(costs.shape[0]))):
        rows = np.arange(costs.shape[0])
        if costs[rows, choice].sum() <= budget:
            best = min(best, damages[rows, choice].sum())
    return best


def random_instance(rng, n, k, shared_costs):
    base = rng.integers(1, 20, size=k) * 8
    costs = np.tile(base, (n, 1)) if shared_costs else rng.integers(1, 20, size=(n, k)) * 8
    damages = rng.random((n, k)) * 10.0
    if rng.random() < 0.3:
        damages[rng.random((n, k)) < 0.2] = np.inf
        damages[np.arange(n), rng.integers(0, k, size=n)] = rng.random(n)
    cheapest = np.where(np.isfinite(damages), costs, 10**9).min(axis=1).sum()
    dearest = np.where(np.isfinite(damages), costs, 0).max(axis=1).sum()
    return costs, damages, int(rng.integers(cheapest, dearest + 1))


@pytest.mark.parametrize("seed", range(60))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    costs, damages, budget = random_instance(rng, int(rng.integers(1, 7)), int(rng.integers(1, 5)), seed % 2 == 0)
    result = solve_mckp(costs, damages, budget)
    rows = np.arange(costs.shape[0])
    assert costs[rows, result.choice].sum() == result.cost <= budget
    assert np.isfinite(result.damage)
    assert result.damage == pytest.approx(brute_force(costs, damages, budget), rel=1e-12, abs=1e-12)
    assert result.lower_bound <= result.damage + 1e-9


@pytest.mark.parametrize("seed", range(10))
def test_reduction_path_matches_plain_dp(seed):
    """Many experts with shared costs (as in a real model): the Lagrangian-reduced problem keeps the optimum."""
    rng = np.random.default_rng(100 + seed)
    n, k = 40, 6
    costs = np.tile(np.array([24, 32, 40, 48, 56, 72]) * 96, (n, 1))
    damages = np.sort(rng.random((n, k)) * rng.random((n, 1)) * 100, axis=1)[:, ::-1].copy()
    budget = int(costs[:, 0].sum() + rng.random() * (costs[:, -1] - costs[:, 0]).sum())
    reduced = solve_mckp(costs, damages, budget)
    plain = solve_mckp(costs, damages, budget, reduce=False)
    assert reduced.cost <= budget
    assert reduced.damage == pytest.approx(plain.damage, rel=1e-12)
    # a greedy by damage-per-bit cannot do better than the exact answer
    assert reduced.damage <= damages[np.arange(n), 0].sum()


def test_unconstrained_budget_takes_least_damage():
    costs = np.array([[1, 2, 3], [1, 2, 3]])
    damages = np.array([[3.0, 2.0, 1.0], [5.0, 0.5, 0.4]])
    result = solve_mckp(costs, damages, 100)
    assert result.choice.tolist() == [2, 2]


def test_infeasible_budget_names_the_minimum():
    with pytest.raises(ValueError, match="cheapest choice for every expert \\(2 bits\\)"):
        solve_mckp(np.array([[1, 2], [1, 2]]), np.ones((2, 2)), 1)


def test_dp_size_guard():
    costs = np.array([[1, 1000, 1001]] * 3)
    damages = np.array([[2.0, 1.0, 0.0]] * 3)
    with pytest.raises(ValueError, match="too large"):
        solve_mckp(costs, damages, 2500, max_dp_cells=1000, reduce=False)
