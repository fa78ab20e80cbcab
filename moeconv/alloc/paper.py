"""The allocation of Chowdhury et al. (ICLR 2026): combined Λ/MaxVar order and equally spaced bit levels.

The order follows the paper's public code (``bitallocutils.py``): experts sorted
by Λ ascending, then, walking the Λ order from its last expert to its first,
an expert is moved forward to the first position whose expert has ζ·MaxVar
below its own MaxVar.  First in the order = most precision.

The level counts follow the paper's three-level policy: start from the two
adjacent levels that bracket the average, then trade pairs of middle experts
for one high and one low expert (which keeps the average) as far as the region
of the average allows.  The one difference from the paper's code: the paper
rounds ``frac * n_experts`` in every layer, multiplying a rounding error by the
number of layers; here the number of upper-level experts is rounded once for
the whole model and spread over the layers (layers differ by at most one), so
the result stays within half an expert of the budget.  When ``frac * n_experts``
is a whole number (every setting in the paper) both give the same counts.
"""

from __future__ import annotations

import numpy as np

__all__ = ["combined_order", "paper_orders", "level_counts", "assign_levels"]


def combined_order(lam: np.ndarray, maxvar: np.ndarray, zeta: float = 3.0) -> np.ndarray:
    """The paper's order of one layer's experts (first = most precision)."""
    lam, maxvar = np.asarray(lam, dtype=np.float64), np.asarray(maxvar, dtype=np.float64)
    if lam.shape != maxvar.shape or lam.ndim != 1:
        raise ValueError(f"Λ and MaxVar must be 1-D of one length, got {lam.shape} and {maxvar.shape}")
    by_lambda = np.argsort(lam, kind="stable")
    order = [int(e) for e in by_lambda]
    for expert in by_lambda[::-1]:
        smaller = np.flatnonzero(zeta * maxvar[order] < maxvar[expert])
        here = order.index(int(expert))
        if smaller.size and here > smaller[0]:
            order.insert(int(smaller[0]), order.pop(here))
    return np.array(order, dtype=np.int64)


def paper_orders(lam: np.ndarray, maxvar: np.ndarray, zeta: float = 3.0) -> np.ndarray:
    """``combined_order`` for every layer of ``[n_layers, n_experts]`` signals."""
    return np.stack([combined_order(l_row, v_row, zeta) for l_row, v_row in zip(lam, maxvar)])


def _spread(total: int, n_layers: int) -> np.ndarray:
    """``total`` experts over ``n_layers`` layers, the first ``total % n_layers`` layers taking one more."""
    base, extra = divmod(int(total), n_layers)
    return base + (np.arange(n_layers) < extra).astype(np.int64)


def level_counts(n_layers: int, n_experts: int, levels: tuple[int, ...], costs: tuple[float, ...], avg: float) -> np.ndarray:
    """How many experts of each layer get each level: ``[n_layers, len(levels)]``.

    ``levels`` are the bit-widths (descending; three must be equally spaced, as
    the paper requires), ``costs`` what one weight costs at each level under
    the budget in force (code bits, or stored bits with scales and zeros), and
    ``avg`` the budget in the same unit.
    """
    c = np.asarray(costs, dtype=np.float64)
    if len(levels) not in (2, 3) or len(costs) != len(levels):
        raise ValueError(f"--bit-levels needs two or three levels, got {list(levels)}")
    if any(a <= b for a, b in zip(levels, levels[1:])) or np.any(np.diff(c) >= 0):
        raise ValueError(f"--bit-levels must be strictly descending, got {list(levels)}")
    if len(levels) == 3 and levels[0] - levels[1] != levels[1] - levels[2]:
        raise ValueError(f"three --bit-levels must be equally spaced (the paper's policy), got {list(levels)}")
    if avg < c[-1] - 1e-9:
        raise ValueError(f"--avg-bits {avg:g} is below the lowest level's cost ({c[-1]:.4g} bits per weight, as --budget counts them)")
    n_total = n_layers * n_experts
    counts = np.zeros((n_layers, len(levels)), dtype=np.int64)
    if len(levels) == 2:
        upper, lower = 0, 1
    else:
        upper, lower = (0, 1) if avg >= c[1] else (1, 2)
    frac = min(max((avg - c[lower]) / (c[upper] - c[lower]), 0.0), 1.0)
    counts[:, upper] = _spread(round(frac * n_total), n_layers)
    counts[:, lower] = n_experts - counts[:, upper]
    if len(levels) == 3:
        span = c[0] - c[2]
        if avg > c[0] - span / 3:
            trades = counts[:, 1] // 2
        elif avg >= c[0] - 2 * span / 3:
            trades = counts[:, 1] // 3
        else:
            trades = np.zeros(n_layers, dtype=np.int64)
        counts += trades[:, None] * np.array([1, -2, 1])
    return counts


def assign_levels(orders: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Level index of every expert ``[n_layers, n_experts]``: the first ``counts[l, 0]`` of layer l's order get level 0, ..."""
    orders = np.asarray(orders)
    rank = np.argsort(orders, axis=1)
    bounds = np.cumsum(counts, axis=1)
    return (rank[:, :, None] >= bounds[:, None, :]).sum(axis=2)
