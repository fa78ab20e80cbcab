"""Orders that the paper's order must beat, fed through the same levels and counts.

Each function returns ``[n_layers, n_experts]`` expert indices, first = most
precision, so that the only difference between two level-based allocations is
the order: the budget, the levels and the per-layer counts are shared.
Ties keep the lower expert index first.
"""

from __future__ import annotations

import numpy as np

__all__ = ["frequency_order", "maxvar_order", "random_order"]


def frequency_order(frequency: np.ndarray) -> np.ndarray:
    """Most often routed first (routing counts or probability mass on calibration text)."""
    return np.argsort(-np.asarray(frequency, dtype=np.float64), axis=1, kind="stable")


def maxvar_order(maxvar: np.ndarray) -> np.ndarray:
    """Largest MaxVar first: the paper's reason for MaxVar is that such experts suffer most from few bits."""
    return np.argsort(-np.asarray(maxvar, dtype=np.float64), axis=1, kind="stable")


def random_order(n_layers: int, n_experts: int, seed: int = 0) -> np.ndarray:
    """A seeded random permutation per layer (the floor any signal has to clear)."""
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((n_layers, n_experts)), axis=1, kind="stable")
