"""Bit accounting for routed-expert weights: what a choice costs and what a budget allows.

``stored`` counts every bit written for the weight (codes, scales, zero points,
double-quant constants; ``moeconv_numpy.schemes.stored_bits``), ``code-bits``
only the nominal code bits papers quote (``code_bits``).  A budget of B bits
per weight allows ``floor(B * n)`` bits for the ``n`` routed-expert weights.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from moeconv_numpy.schemes import code_bits, scheme_info, stored_bits

from .source import Expert

__all__ = ["BUDGET_MODES", "group_size_of", "weight_bits", "expert_bits", "cost_matrix", "budget_bits"]

BUDGET_MODES = ("stored", "code-bits")


def group_size_of(spec) -> int:
    """The group (block) size a spec really uses: its own, or its scheme's default."""
    return spec.group_size or scheme_info(spec.scheme).default_group_size


def weight_bits(spec, shape: tuple[int, int], mode: str) -> int:
    """Bits of one weight of ``shape`` quantized with ``spec``, counted as ``mode`` says."""
    if mode == "stored":
        return stored_bits(spec.scheme, tuple(shape), group_size_of(spec), bool(spec.double_quant))
    if mode == "code-bits":
        return code_bits(spec.scheme, tuple(shape))
    raise ValueError(f"--budget must be one of {', '.join(BUDGET_MODES)}, got {mode!r}")


def expert_bits(expert: Expert, spec, mode: str) -> int:
    """Bits of one expert's projections, all quantized with ``spec``."""
    return _shapes_bits(expert.shapes, spec, mode)


@lru_cache(maxsize=4096)
def _shapes_bits(shapes: tuple, spec, mode: str) -> int:
    return sum(weight_bits(spec, shape, mode) for shape in shapes)


def cost_matrix(experts: list[Expert], candidates: list, mode: str) -> np.ndarray:
    """``[n_experts, n_candidates]`` integer costs (computed once per distinct expert shape)."""
    rows: dict[tuple, list[int]] = {}
    for expert in experts:
        if expert.shapes not in rows:
            rows[expert.shapes] = [_shapes_bits(expert.shapes, spec, mode) for spec in candidates]
    return np.array([rows[expert.shapes] for expert in experts], dtype=np.int64)


def budget_bits(experts: list[Expert], avg_bits: float) -> int:
    """The bit budget of ``avg_bits`` per routed-expert weight."""
    if not (isinstance(avg_bits, (int, float)) and math.isfinite(avg_bits) and avg_bits > 0):
        raise ValueError(f"--avg-bits must be a positive number, got {avg_bits!r}")
    return math.floor(avg_bits * sum(e.numel for e in experts))
